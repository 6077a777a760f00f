"""How many sessions one Redis core holds: simulate an s2s fleet's Redis traffic (no
models) against a real Redis (the bundled Valkey) pinned to one core, ramp the sessions,
report Redis CPU and latency, and compare the load's command mix with the real stack's.

The load is ``bench/redis_load.c`` (compiled here with gcc), on the other core(s): the
control plane as the code runs it now, by command name and rate (``bench/redis_mix.py``,
the model, checked against a profile of the real stack), from the processes that send
it: one gateway per ``--per-gateway`` sessions (pooled command connections and ONE
multiplexed output read), one VAD worker per ``--per-vad`` (ONE multiplexed audio read),
one STT, LLM and TTS worker per ``--per-stage`` (a group read and one subscription to
s2s:turns each).  Per session: the gateway's 20 ms ``Audio`` XADD (its TTL a tenth of the
session TTL apart), the VAD's fenced resume point every 0.22 s, speech emits, utterances
(``EMIT_IF_OWNER``), turn changes published (``INCR_IF_OWNER``), the stages' items (read,
held as long as a stage works, answered, ``ACK_DEL``), the failover touch (``EVAL
GATEWAY_TOUCH``, 2/s), the admission refresh (1/s) and MEMORY USAGE checks (every 5 s);
per process its heartbeats, keep-alives, claims and turn checks.  Frames are the project's
own codec's, the fenced writes the Bus's own Lua scripts.

Latency: a probe process sends one XADD of an audio frame every 10 ms on its own
connection and times it (client-side p50/p99); Redis' own ``INFO latencystats`` and
``commandstats`` give the server-side view.  Redis CPU: /proc deltas.  The ramp stops
when the probe's p99 passes ``--p99-ms`` (5 ms) or the frames are not all sent (Redis did
not take them, or the load's own core was full: the verdict says which); ``--past-bound``
goes on with the larger steps to show what they do.

    python -m s2s.bench.redis_capacity --sessions 500,1000,1500,2000,2500,3000

Numbers depend on the machine and on what else runs on it: print them with the command.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

import redis

from s2s import keys, redis_scripts
from s2s.frames import Audio, ReplyAudio, ReplyText, SpeechStarted, Transcript, Utterance, encode

from . import redis_mix
from .redis_mix import Fleet, Model

FRAME_S = 0.02
FRAME = b"\x01\x02" * 320            # 640 B: 20 ms of 16 kHz 16-bit mono
STAGES = ("stt", "llm", "tts")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cores() -> list[int]:
    return sorted(os.sched_getaffinity(0))


# --- latency probe ------------------------------------------------------------------------
def probe_proc(url: str, stop_wall: float, core, q, rt: bool = False) -> None:
    if core is not None:
        os.sched_setaffinity(0, {core})
    if rt:  # above the machine's other work, below Redis (which it must not preempt)
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(5))
    r = redis.Redis.from_url(url, socket_timeout=2, retry_on_error=[redis.ConnectionError])
    key = keys.audio("probe")
    samples = []
    while time.time() < stop_wall:
        t0 = time.perf_counter()
        try:
            r.xadd(key, {b"f": FRAME}, maxlen=2000, approximate=True)
        except redis.RedisError:
            samples.append(float("inf"))  # a failed call counts as over any bound
            continue
        samples.append((time.perf_counter() - t0) * 1000)
        time.sleep(0.01)
    q.put(samples)


def pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(p / 100 * len(values)))]


# --- redis-server pinned to one core -------------------------------------------------------
class PinnedRedis:
    def __init__(self, core: int, maxmemory: str, rt: bool = False):
        self.core = core
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="s2s-redis-cap-")
        from s2s.launcher.redis_server import RedisServerError, find_redis_server

        try:  # the server `s2s up` runs (the bundled Valkey), whatever else is installed
            server = find_redis_server()
        except RedisServerError as e:
            raise SystemExit(str(e))
        cmd = [server, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
               "--appendonly", "no", "--dir", self.dir, "--maxmemory", maxmemory,
               "--maxmemory-policy", "noeviction", "--maxclients", "20000",
               "--latency-monitor-threshold", "1"]
        if shutil.which("taskset"):
            cmd = ["taskset", "-c", str(core), *cmd]
        if rt:  # FIFO priority: other work on its core no longer preempts Redis
            cmd = ["chrt", "-f", "10", *cmd]
        self.log = os.path.join(self.dir, "redis.log")
        self.proc = subprocess.Popen(cmd + ["--logfile", self.log], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.client = redis.Redis.from_url(self.url)
        for _ in range(100):
            try:
                self.client.ping()
                return
            except redis.ConnectionError:
                time.sleep(0.05)
        raise SystemExit("redis-server did not start")

    def cpu(self) -> float:
        """CPU seconds redis-server used so far (all its threads), from /proc."""
        try:
            with open(f"/proc/{self.proc.pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except OSError:  # no /proc: Redis' own account of its main thread
            info = self.client.info("cpu")
            return info["used_cpu_user"] + info["used_cpu_sys"]

    def died(self) -> str | None:
        """Why redis-server is gone (its log's tail), or None while it runs."""
        with open(self.log, errors="replace") as f:
            tail = f.read()[-1500:]
        if self.proc.poll() is None:
            stats = {k: v for k, v in self.client.info("stats").items() if "reject" in k or
                     "disconnect" in k or "evicted" in k}
            print(f"redis-server still runs: {stats}; its log ends:\n{tail}", file=sys.stderr)
            return None
        return f"redis-server exited ({self.proc.returncode}): {tail}"

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(5)
        shutil.rmtree(self.dir, ignore_errors=True)


def server_latency(client: redis.Redis) -> dict:
    """p50/p99 of XADD and XREAD from Redis' own per-command histograms (Redis 7)."""
    out = {}
    try:
        stats = client.execute_command("INFO", "latencystats")
    except redis.ResponseError:
        return out
    for cmd in ("xadd", "xread", "get"):
        row = stats.get(f"latency_percentiles_usec_{cmd}")
        if isinstance(row, dict):
            out[cmd] = (row.get("p50"), row.get("p99"))
    return out




# --- the load ------------------------------------------------------------------------------
C_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "redis_load.c")


def build_c() -> str:
    """Compile bench/redis_load.c once (into a temporary directory)."""
    if not shutil.which("gcc"):
        raise SystemExit("the load is bench/redis_load.c: it needs gcc to be built")
    out = os.path.join(tempfile.gettempdir(), f"s2s-redis-load-{os.getuid()}")
    if not os.path.exists(out) or os.path.getmtime(out) < os.path.getmtime(C_SOURCE):
        subprocess.run(["gcc", "-O2", "-o", out, C_SOURCE, "-lm"], check=True)
    return out


def shares(n: int, procs: int) -> list[int]:
    return [n // procs + (1 if i < n % procs else 0) for i in range(procs)]


def fleet_of(n: int, args) -> Fleet:
    return Fleet(n, args.per_gateway, args.per_vad, args.per_stage)


def write_params(d: str, model: Model, args, shas: dict, start: float, dur: float) -> None:
    """DIR/params of the C load: the model's rates in ticks and seconds, the scripts."""
    tick = FRAME_S  # the load's clock; the client's messages are model.frame_s apart
    p = {"audio_ticks": max(1, round(model.frame_s / tick)), "start": f"{start:.3f}",
         "duration": f"{dur:.3f}", "cycle_s": model.cycle_s,
         "audio_gap_s": model.audio_gap_s, "reader_own_s": model.reader_own_s,
         "hold_stt": model.hold_s[0], "hold_llm": model.hold_s[1], "hold_tts": model.hold_s[2],
         "heartbeat_per_s": model.heartbeat_per_s, "claim_every_s": model.claim_every_s,
         "keepalive_per_s": model.keepalive_per_s, "turn_check_per_s": model.turn_check_per_s,
         "keda_every_s": model.keda_every_s,
         "save_every_frames": round(model.save_every_s / tick),
         "utterances": model.utterances, "speech_emits": model.speech_emits,
         "transcripts": model.transcripts, "texts": model.texts, "chunks": model.chunks,
         "trims": model.trims, "vadpos_checks": model.vadpos_checks,
         "audio_ttl_ticks": round(model.audio_ttl_every_s / tick),
         "touch_ticks": round(1 / model.touch_per_s / tick),
         "register_ticks": round(1 / model.register_per_s / tick),
         "bytes_ticks": round(model.bytes_every_s / tick), "session_keys": model.session_keys,
         "gw_conns": args.gw_conns, "slots": args.slots, **shas}
    with open(os.path.join(d, "params"), "w") as f:
        f.writelines(f"{k} {v}\n" for k, v in p.items())


def prepare_c(server: "PinnedRedis", n: int, procs: int, model: Model, args, start: float,
              dur: float) -> str:
    """The data directory of the C load: encoded frames, script SHAs, and per load
    process its fleet and sessions, each session with a real entry in s2s:vad:sessions
    pending on its VAD worker's consumer (so the fenced writes check a real owner)."""
    r = server.client
    d = tempfile.mkdtemp(prefix="s2s-load-")
    sid0 = "x" * 22  # the length of a gateway's session ids (token_urlsafe(16))
    state = json.dumps({"in_sr": 16000, "in_samples": 1234567, "samples_16k": 1234567,
                        "at": 1234567, "replay_from": 1230000, "seen16": 1234567,
                        "turn": 12}).encode()
    files = {
        "audio.bin": encode(Audio(sid=sid0, pcm=FRAME * max(1, round(model.frame_s / FRAME_S)),
                                  sr=16000, seq=123456,
                                  marks={"recv": time.time()})),
        "utt.bin": encode(Utterance(sid=sid0, pcm=b"\x00" * (model.utterance_kb * 1024),
                                    sr=16000, turn=12, marks={"speech_end": time.time()})),
        "transcript.bin": encode(Transcript(sid=sid0, turn=12, text="ask not what your "
                                            "country can do for you", marks={"stt": 1.0})),
        "text.bin": encode(ReplyText(sid=sid0, turn=12, text="A sentence of the reply, "
                                     "spoken soon after the question.", marks={"llm": 1.0})),
        "chunk.bin": encode(ReplyAudio(sid=sid0, pcm=b"\x00" * (model.chunk_kb * 1024),
                                       sr=22050, turn=12, marks={"tts": 1.0})),
        "started.bin": encode(SpeechStarted(sid=sid0, turn=12)),
        "state.bin": state,
        "touch.lua": redis_scripts.GATEWAY_TOUCH.encode(),
    }
    for name, data in files.items():
        with open(os.path.join(d, name), "wb") as f:
            f.write(data)
    shas = {name: r.script_load(src) for name, src in (
        ("sha_save", redis_scripts.SAVE_IF_OWNER), ("sha_emit", redis_scripts.EMIT_IF_OWNER),
        ("sha_ackdel", redis_scripts.ACK_DEL), ("sha_keep", redis_scripts.KEEP_ALIVE),
        ("sha_incr", redis_scripts.INCR_IF_OWNER), ("sha_beat", redis_scripts.HEARTBEAT))}
    for stream, group in [*((keys.STAGE_STREAMS[s], s) for s in STAGES), (keys.SESSIONS, "vad")]:
        r.xgroup_create(stream, group, id="$", mkstream=True)
    write_params(d, model, args, shas, start, dur)
    for p, share in enumerate(shares(n, procs)):
        fleet = fleet_of(share, args)
        with open(os.path.join(d, f"fleet.{p}"), "w") as f:
            f.write(f"gateways {fleet.gateways} vads {fleet.vads} stage {fleet.stage_workers}\n")
        rows = []
        for v in range(fleet.vads):
            members = range(v * args.per_vad, min(share, (v + 1) * args.per_vad))
            pipe = r.pipeline(transaction=False)
            for _ in members:
                pipe.xadd(keys.SESSIONS, {b"f": b"open"})
            pipe.execute()
            # the VAD workers come first among the load's workers: w<v> is VAD worker v
            got = r.xreadgroup("vad", f"vad-p{p}-w{v}", {keys.SESSIONS: ">"}, count=len(members))
            ids = [eid.decode() for eid, _ in got[0][1]]
            rows += [(i, i // args.per_gateway, v, eid) for i, eid in zip(members, ids)]
        with open(os.path.join(d, f"entries.{p}"), "w") as f:
            f.writelines(f"{i} {g} {v} {eid}\n" for i, g, v, eid in rows)
    return d


def step(server: "PinnedRedis", n: int, model: Model, args, load_cores: list[int]) -> dict:
    server.client.flushall()
    server.client.config_resetstat()
    server.client.execute_command("LATENCY", "RESET")
    exe = build_c()
    procs = max(1, min(args.procs, n)) if n else 0
    setup = 1.5 + n / 2000  # time to write the sessions' entries and dial the connections
    start = time.time() + setup
    d = prepare_c(server, n, procs, model, args, start, args.duration + 2.0)
    loads = []
    for p in range(procs):
        cmd = [exe, "127.0.0.1", str(server.port), d, str(p)]
        if shutil.which("taskset") and load_cores:
            cmd = ["taskset", "-c", str(load_cores[p % len(load_cores)]), *cmd]
        if args.rt:  # an open-loop schedule the machine's other work cannot delay (bursts)
            cmd = ["chrt", "-f", "5", *cmd]
        loads.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    time.sleep(max(0.0, start + 2.0 - time.time()))  # 2 s of warm-up
    server.client.config_resetstat()
    server.client.execute_command("LATENCY", "RESET")
    cpu0, t0 = server.cpu(), time.time()
    clients = server.client.info("clients")["connected_clients"]
    pq: mp.Queue = mp.Queue()
    probe_core = args.probe_core if args.probe_core is not None else server.core
    probe = mp.Process(target=probe_proc, args=(server.url, t0 + args.duration - 0.5,
                                                 probe_core, pq, args.rt))
    probe.start()
    samples = pq.get(timeout=args.duration + 60)
    probe.join()
    cpu1, t1 = server.cpu(), time.time()
    stats = server.client.info("commandstats")
    lat = server_latency(server.client)
    mem = server.client.info("memory")["used_memory"]
    counts = {"ticks": 0, "late": 0, "errors": 0}
    load_stats: list[dict] = []
    for proc in loads:
        out, err = proc.communicate(timeout=args.duration + 120)
        if proc.returncode:
            raise RuntimeError(f"redis_load failed ({proc.returncode}): {err.decode()[-500:]}")
        if err.strip():
            print(f"  load: {err.decode().strip()[:300]}", file=sys.stderr)
        got = json.loads(out.decode().strip().splitlines()[-1])
        load_stats.append(got)
        counts["ticks"] += got["ticks"]
        counts["late"] += got["late"]
        counts["errors"] += got["write_errors"] + got["redis_errors"]
    shutil.rmtree(d, ignore_errors=True)
    window = t1 - t0
    total = args.duration + 2.0  # the load's whole run (warm-up included)
    calls = sum(v["calls"] for v in stats.values())
    usec = sum(v["usec"] for v in stats.values())
    return {
        "sessions": n,
        "redis_cpu": (cpu1 - cpu0) / window,
        "cmds_per_s": calls / window,
        "usec_per_call": usec / calls if calls else 0.0,
        "frames_per_s": counts["ticks"] / total,  # session ticks of 20 ms sent on time
        "frames_target": n / FRAME_S,
        "late": counts["late"],
        "errors": counts["errors"],
        "p50_ms": pct(samples, 50),
        "p99_ms": pct(samples, 99),
        "server_xadd_p99_us": (lat.get("xadd") or (None, None))[1],
        "used_memory_mb": mem / 1e6,
        "clients": clients,
        # the load's own CPU (near 100 %: the load, not Redis, may be the limit)
        "load_cpu": sum(g["cpu_s"] for g in load_stats) / (time.time() - start) / max(procs, 1),
        # the command mix Redis saw, per second of the window (Lua scripts' inner calls
        # included; the probe's XADDs taken out)
        "calls_per_s": {k.removeprefix("cmdstat_"): (v["calls"] - (len(samples) if k ==
                        "cmdstat_xadd" else 0)) / window for k, v in stats.items()},
        # Redis' time in each command (its own timer), microseconds per second of the window
        "usec_per_s": {k.removeprefix("cmdstat_"): v["usec"] / window for k, v in stats.items()},
        "load": load_stats,
    }


def print_row(row: dict) -> None:
    print(f"{row['sessions']:>8} {row['redis_cpu']:>8.0%} {row['cmds_per_s']:>8.0f} "
          f"{row['usec_per_call']:>7.1f} {row['frames_per_s']:>6.0f}/{row['frames_target']:<6.0f} "
          f"{row['p50_ms']:>7.2f} {row['p99_ms']:>7.2f} {str(row['server_xadd_p99_us']):>15} "
          f"{row['used_memory_mb']:>7.0f} {row['clients']:>7} {row['load_cpu']:>8.0%} "
          f"{row['errors']:>6} {row['late']:>7}", flush=True)


def print_mix(model: Model, profile: dict, row: dict | None, args) -> None:
    """Profile vs model per command, and (``row``) what the load sent at that step."""
    one = redis_mix.per_session_beyond_idle(model)
    extra = {}
    if row and row["sessions"]:
        n = row["sessions"]
        fleet = fleet_of(n, args)
        predicted = redis_mix.rates(model, fleet)
        extra[f"model/sess @{n}"] = {k: v / n for k, v in predicted.items()}
        extra[f"sent/sess @{n}"] = {k: v / n for k, v in row["calls_per_s"].items()}
    print("\nCommand mix, per session-second: the real stack's profile (one session speaking "
          "jfk.wav, beyond the idle stack) against the load's model of one session on one "
          "process of each kind" + (" and, at the last step, the model and what Redis "
                                    "counted, per session, with the fleet's own traffic"
                                    if extra else ""))
    print(redis_mix.format_comparison(redis_mix.compare(one, profile), extra))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sessions", default="500,1000,1500,2000,2500,3000",
                   help="comma-separated ramp of concurrent sessions")
    p.add_argument("--duration", type=float, default=10.0, help="seconds per step")
    p.add_argument("--p99-ms", type=float, default=5.0, help="latency bound of the ramp")
    p.add_argument("--redis-core", type=int, default=None,
                   help="core redis-server is pinned to (default: the last one)")
    p.add_argument("--procs", type=int, default=None,
                   help="load processes (default: one per remaining core)")
    p.add_argument("--per-gateway", type=int, default=500, help="sessions per gateway")
    p.add_argument("--per-vad", type=int, default=50, help="sessions per VAD worker")
    p.add_argument("--per-stage", type=int, default=100,
                   help="sessions per STT, per LLM and per TTS worker")
    p.add_argument("--gw-conns", type=int, default=8,
                   help="pooled command connections per gateway")
    p.add_argument("--slots", type=int, default=32,
                   help="items a stage worker holds at once (its batch slots)")
    p.add_argument("--message-ms", type=int, default=20, choices=(20, 40, 60, 80, 100),
                   help="the clients' audio messages (the web client's 20 ms; the profile's)")
    p.add_argument("--utterance-kb", type=int, default=Model.utterance_kb)
    p.add_argument("--chunk-kb", type=int, default=Model.chunk_kb,
                   help="ReplyAudio chunk payload")
    p.add_argument("--maxmemory", default="4gb")
    p.add_argument("--reprofile", action="store_true",
                   help="first measure the profile again on a real stack (real gateway and "
                        "VAD, timing stubs for the rest; ~1 min) and compare with that")
    p.add_argument("--past-bound", action="store_true",
                   help="go on with the ramp after the bound is passed (to show what larger "
                        "steps do to Redis); the verdict stays the first step past it")
    p.add_argument("--json", action="store_true", help="also print the rows as JSON")
    p.add_argument("--rt", action="store_true",
                   help="run redis-server, the probe and the C load at real-time (FIFO) "
                        "priority (root), so other work on a shared machine does not preempt "
                        "them: the latency then shows Redis' own queueing")
    p.add_argument("--probe-core", type=int, default=None,
                   help="core of the latency probe (default: Redis' own core, so the "
                        "probe measures waiting for Redis, not for the busy load core)")
    args = p.parse_args(argv)
    if args.rt and (os.geteuid() != 0 or not shutil.which("chrt")):
        raise SystemExit("--rt needs root and chrt (util-linux): it sets FIFO priorities")
    model = Model(frame_s=args.message_ms / 1000, utterance_kb=args.utterance_kb,
                  chunk_kb=args.chunk_kb)
    profile = asyncio.run(redis_mix.measure_profile()) if args.reprofile else redis_mix.PROFILE
    all_cores = cores()
    redis_core = args.redis_core if args.redis_core is not None else all_cores[-1]
    load_cores = [c for c in all_cores if c != redis_core] or all_cores
    args.procs = args.procs or len(load_cores)
    ramp = [int(x) for x in args.sessions.split(",") if x.strip()]
    build_c()
    server = PinnedRedis(redis_core, args.maxmemory, args.rt)
    print(f"redis-server pinned to core {redis_core}; load on cores {load_cores} "
          f"({args.procs} processes); {args.duration:.0f} s per step; {args.message_ms} ms "
          f"audio messages; a gateway per "
          f"{args.per_gateway} sessions, a VAD worker per {args.per_vad}, an STT, LLM and TTS "
          f"worker per {args.per_stage}", flush=True)
    header = (f"{'sessions':>8} {'redis CPU':>9} {'cmds/s':>8} {'us/call':>7} {'frames/s':>13} "
              f"{'p50 ms':>7} {'p99 ms':>7} {'srv XADD p99 us':>15} {'mem MB':>7} "
              f"{'clients':>7} {'load CPU':>8} {'errors':>6} {'late':>7}")
    print(header)
    rows, verdict = [], None
    try:
        # Step 0: no sessions, only the probe: what this machine's own noise adds.
        base = step(server, 0, model, args, load_cores)
        print_row(base)
        noisy = base["p99_ms"] > args.p99_ms
        if noisy:
            print(f"note: with no load at all the probe's p99 is {base['p99_ms']:.1f} ms: this "
                  f"machine is busier than the bound, so the latency verdict is skipped and only "
                  f"the CPU figure counts", flush=True)
        for n in ramp:
            try:
                row = step(server, n, model, args, load_cores)
            except Exception as e:  # noqa: BLE001 - report what was measured so far
                reason = server.died() or f"{type(e).__name__}: {e}"
                print(f"{n:>8} step failed ({reason}); the ramp stops here", flush=True)
                verdict = verdict or ("failed", n)
                break
            rows.append(row)
            print_row(row)
            behind = row["frames_per_s"] < 0.9 * row["frames_target"]
            if verdict is None and (row["p99_ms"] > args.p99_ms and not noisy or behind):
                # behind with its own core busy: the load is the limit; else Redis did not
                # take the commands as fast as they came
                verdict = ("load" if behind and row["load_cpu"] >= 0.9 else "redis", n)
            if verdict and not args.past_bound:
                break
    finally:
        server.close()
    ok = [r for r in rows if verdict is None or r["sessions"] < verdict[1]]
    per_core = None
    best = ok[-1] if ok else None
    if best:
        per_core = best["sessions"] / max(best["redis_cpu"], 1e-9)
        fleet = fleet_of(best["sessions"], args)
        print(f"\nlast step within bounds: {best['sessions']} sessions ({fleet.gateways} "
              f"gateways, {fleet.vads} VAD workers, {fleet.stage_workers} workers per stage; "
              f"{best['clients']} Redis clients) at {best['redis_cpu']:.0%} of one Redis core, "
              f"p99 {best['p99_ms']:.2f} ms")
        print(f"Redis CPU per session: {best['redis_cpu'] / best['sessions'] * 1000:.3f} ms/s -> "
              f"~{per_core:.0f} sessions per Redis core at 100% CPU (extrapolated)")
        busy = best["cmds_per_s"] * best["usec_per_call"] / 1e6
        print(f"Redis command time per session: {busy / best['sessions'] * 1000:.3f} ms/s "
              f"(commands only, without socket I/O; "
              f"{best['cmds_per_s'] / best['sessions']:.1f} commands per session per s, "
              f"Lua scripts' inner calls counted)")
    print_mix(model, profile, best or (rows[-1] if rows else None), args)
    if verdict and verdict[0] == "redis":
        print(f"at {verdict[1]} sessions p99 passed {args.p99_ms} ms or Redis took the "
              f"commands slower than they came: Redis (or this machine) is the limit")
    elif verdict and verdict[0] == "load":
        print(f"the load process fell behind real time at {verdict[1]} sessions: the load "
              f"generator, not Redis, was the limit (use more cores / --procs)")
    elif verdict is None:
        print("the ramp ended within bounds: extend --sessions")
    if args.json:
        print(json.dumps({"baseline": base, "rows": rows, "sessions_per_core_extrapolated": per_core,
                          "verdict": verdict}, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
