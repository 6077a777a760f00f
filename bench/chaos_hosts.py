"""Cut worker hosts off the network mid-turn, round after round, and count what users get.

Run from a checkout, as root (it makes network namespaces)::

    sudo .venv/bin/python bench/chaos_hosts.py --rounds 4 --down-s 8

It builds the hosts of ``tests/netns.py`` (a Redis host, a gateway host and worker
hosts A and B, each running a worker of every stage with its real model; see
docs/multihost.md).  Each round, ``--sessions`` new sessions each speak one utterance
(the JFK sentence and short questions spoken by the bundled Piper voice); as soon as
a worker host owns a VAD session and holds an STT, LLM or TTS entry (mid-turn), its
link is cut for ``--down-s`` seconds, then restored (a round where no host ever does
so before the answers arrive counts without a cut).  Per round it reports turns
answered / attempted (a reply with audio, ``reply_done``, within ``--reply-timeout``),
how long after the cut the last one was answered, how long after the link came back
the cut host's four workers heartbeat again, and reply audio that reached a client
twice or differs from the (seq, chunk) pieces of the session's output stream.
Everything is removed at the end (also on Ctrl-C or an error).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
QUESTIONS = ["What is the capital of France?", "How far away is the moon?",
             "Why is the sky blue?", "How many legs does a spider have?"]


def utterances() -> list:
    from s2s.audio import read_audio
    from s2s.bench.eval_set import piper_speech

    return [read_audio(ROOT / "tests" / "data" / "jfk.wav")[int(5.2 * 16000):],
            *piper_speech(list(QUESTIONS), 16000)]


async def one_round(n: int, c, r, utts: list, args: argparse.Namespace) -> dict:
    from s2s import keys
    from s2s.frames import decode
    from tests.netns import STAGES, Speaker, out_audio, pending, registry

    speakers = [Speaker(c.ws_url, utts[(n * args.sessions + i) % len(utts)])
                for i in range(args.sessions)]
    runs = []
    for s in speakers:
        runs.append(asyncio.create_task(s.run(args.reply_timeout + 30)))
        await asyncio.sleep(0.5)
    row: dict = {"round": n + 1, "cut": "-", "held": "-", "answered_after_cut_s": None,
                 "rejoined_after_s": None}
    deadline = time.monotonic() + args.reply_timeout
    host = name = None
    while time.monotonic() < deadline and not all(s.answered() for s in speakers):
        held = await pending(r, c)
        # mid-turn: a host that owns a session and holds work of another stage
        busy = [(h, st) for h, st in held.items()
                if st.get("vad") and any(st.get(x) for x in ("stt", "llm", "tts"))]
        if busy:
            name, stages = busy[0]
            host = c.workers[name]
            host.cut()
            row["cut"], row["held"] = name, ",".join(f"{k}:{len(v)}" for k, v in stages.items())
            break
        await asyncio.sleep(0.05)
    cut_at = time.monotonic()
    restored_at = restored_wall = None

    async def rejoined() -> bool:  # the cut host's four workers heartbeat again
        if restored_at is None or row["rejoined_after_s"] is not None:
            return row["rejoined_after_s"] is not None
        if len((await registry(r, c, restored_wall)).get(name, {})) == len(STAGES):
            row["rejoined_after_s"] = round(time.monotonic() - restored_at, 1)
        return row["rejoined_after_s"] is not None

    answered = False
    while time.monotonic() < deadline:
        if host and restored_at is None and time.monotonic() - cut_at >= args.down_s:
            host.restore()
            restored_at, restored_wall = time.monotonic(), time.time()
        if not answered and all(s.answered() for s in speakers):
            answered = True
            if host:
                row["answered_after_cut_s"] = round(time.monotonic() - cut_at, 1)
        if answered and (not host or (restored_at is not None and await rejoined())):
            break
        await rejoined()
        await asyncio.sleep(0.1)
    if host and restored_at is None:
        host.restore()
    await asyncio.sleep(1)
    for s in speakers:
        s.stop.set()
    await asyncio.gather(*runs, return_exceptions=True)
    row["attempted"] = len(speakers)
    row["answered"] = sum(s.answered() for s in speakers)
    twice = wrong = 0
    for s in speakers:
        if not s.answered():  # what the client and the output stream saw, to look into
            kinds = []
            for _, fields in await r.xrange(keys.out(s.sid)):
                f = decode(fields[b"f"])
                kinds.append(f"{type(f).__name__}:t{f.turn}s{f.seq}")
            events = [(e["t"], e["type"], e.get("turn"), e.get("text"))
                      for e in s.tracker.events]
            print(f"  unanswered {s.sid}: turn key {await r.get(keys.turn(s.sid))}, "
                  f"client {events}, output stream {kinds}", flush=True)
        expected, dupes = await out_audio(r, s.sid)
        twice += dupes
        wrong += sum(1 for t in s.tracker.turns.values()
                     if t.done and t.audio and t.audio != expected.get(t.turn))
    row["pieces_written_twice"], row["turns_with_wrong_audio"] = twice, wrong
    return row


async def run(args: argparse.Namespace) -> list[dict]:
    import redis.asyncio as aioredis

    from tests import netns

    reason = netns.unavailable()
    if reason:
        raise SystemExit(f"cannot make hosts: {reason}")
    netns.remove_stale()
    utts = utterances()
    tmp = Path(tempfile.mkdtemp(prefix="s2s-chaos-hosts-"))
    rows = []
    with netns.Network() as net:
        c = netns.Cluster(net, tmp)
        c.start()
        r = aioredis.from_url(c.redis_url)
        try:
            print(f"hosts up on {net.subnet}; loading models (logs in {tmp})…", flush=True)
            await netns.wait_ready(r, c)
            for n in range(args.rounds):
                rows.append(await one_round(n, c, r, utts, args))
                print(rows[-1], flush=True)
        finally:
            for host in c.workers.values():
                host.restore()
            await r.aclose()
    return rows


def table(rows: list[dict]) -> str:
    cols = ["round", "cut", "held", "answered", "attempted", "answered_after_cut_s",
            "rejoined_after_s", "pieces_written_twice", "turns_with_wrong_audio"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for row in rows:
        lines.append("| " + " | ".join("-" if row.get(k) is None else str(row[k])
                                       for k in cols) + " |")
    done = sum(r["answered"] for r in rows)
    tried = sum(r["attempted"] for r in rows)
    lines.append(f"\nturns answered / attempted: {done}/{tried}; rounds with a cut: "
                 f"{sum(r['cut'] != '-' for r in rows)}/{len(rows)}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=4, help="rounds (one cut each)")
    parser.add_argument("--sessions", type=int, default=2, help="sessions per round")
    parser.add_argument("--down-s", type=float, default=8.0, help="seconds a link stays cut")
    parser.add_argument("--reply-timeout", type=float, default=90.0,
                        help="seconds a round waits for every turn's answer")
    args = parser.parse_args(argv)
    if str(ROOT) not in sys.path:  # tests/netns.py lives in the checkout, not the package
        sys.path.insert(0, str(ROOT))
    rows = asyncio.run(run(args))
    print(table(rows))
    return 0 if all(r["answered"] == r["attempted"] and not r["turns_with_wrong_audio"]
                    for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
