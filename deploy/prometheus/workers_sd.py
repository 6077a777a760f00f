"""File-based Prometheus service discovery from s2s' liveness registry, for compose on host
networking (deploy/compose.hostnet.yml): there every worker binds a free metrics port
(S2S_METRICS_PORT=0, since `--scale stt=2` replicas share one network namespace) and no DNS
names the replicas, so Prometheus cannot find them by itself. Every worker heartbeats its
metrics address into the registry (`s2s:workers`); this loop writes them, grouped by stage,
to a file_sd JSON file every few seconds, and the gateway's address (S2S_SD_GATEWAY) to a
second one. Runs in the s2s-gateway image (it has the package and redis-py):
    python /sd/workers_sd.py           env: S2S_REDIS_URL, S2S_SD_DIR, S2S_SD_GATEWAY
"""

from __future__ import annotations

import json
import os
import sys
import time
import urllib.parse

import redis

from s2s import keys

MAX_AGE_S = 15.0     # heartbeats older than this are dead workers


def write(path: str, groups: list[dict]) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(groups, f)
    os.replace(tmp, path)  # Prometheus never reads half a file


def main() -> int:
    client = redis.Redis.from_url(os.environ["S2S_REDIS_URL"], socket_timeout=5)
    sd_dir = os.environ.get("S2S_SD_DIR", "/sd")
    gateway = os.environ.get("S2S_SD_GATEWAY", "")
    if gateway:
        write(os.path.join(sd_dir, "gateway.json"), [{"targets": [gateway]}])
    while True:
        try:
            now = time.time()
            stages: dict[str, set[str]] = {}
            for member in client.zrangebyscore(keys.WORKERS, now - MAX_AGE_S, "+inf"):
                stage, _worker, url = member.decode().split("|", 2)
                stages.setdefault(stage, set()).add(urllib.parse.urlsplit(url).netloc)
            write(os.path.join(sd_dir, "workers.json"),
                  [{"targets": sorted(t), "labels": {"service": s}} for s, t in sorted(stages.items())])
        except (redis.RedisError, ValueError) as e:  # Redis not up yet / a malformed member
            print(f"workers_sd: {e}", file=sys.stderr, flush=True)
        time.sleep(3)


if __name__ == "__main__":
    sys.exit(main())
