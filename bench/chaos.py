"""``s2s chaos``: kill parts of a live stack mid-turn and measure what the users notice.

Starts its own stack as separate processes: a private Redis, two gateways and
``--per-stage`` (2) workers of every stage.  ``--sessions`` clients talk to it with real
speech (tests/data/jfk.wav, /work/shared/audio or ``--wav``, plus questions spoken by the
project's Piper voice, ``--synth``), one utterance at a time, waiting for each reply.
Meanwhile faults are injected at random moments while a turn is in flight:

- ``worker`` (any stage) or ``vad|stt|llm|tts``: SIGKILL one worker of that stage (the
  one holding pending work when there is one: mid-turn), started again at once as an
  orchestrator would.  A stage is only hit while another of its workers is live.
- ``gateway``: SIGKILL a gateway; its clients resume on the other one (with their
  session id), and it is started again on its port.
- ``redis``: restart Redis (persistence off; ``--aof``: append-only file on).

A turn is *hit* when a fault fell between its first spoken sample and its end.  Per
fault kind the report gives turns completed / attempted, the voice-to-voice latency
of hit turns against unhit ones (p50, p95, and the difference: the added latency),
reply audio heard twice or with gaps (from the (turn, seq, chunk) marks the gateway
sends), replies whose audio does not cover their text, and turns with no reply.  It
prints a table, writes JSON (``--json-out``) and a plot (``--plot``).  Every loop is
bounded (``--kills``, ``--duration``); the stack is stopped at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from s2s.launcher.proc import stop_processes

from .stack import with_private_key

ROOT = Path(__file__).resolve().parents[1]
SR = 16000
FRAME = SR * 20 // 1000                  # 20 ms of mic audio per message
STAGES = ("vad", "stt", "llm", "tts")
FAULTS = ("worker", *STAGES, "gateway", "redis")
SHARED_AUDIO = ROOT.parent / "shared" / "audio"  # the shared/ folder beside a checkout


# --- the stack ---------------------------------------------------------------------------------
class Stack:
    """Redis, two gateways and N workers per stage as child processes, each restartable."""

    def __init__(self, per_stage: int, aof: bool, logdir: Path, env: dict[str, str]):
        from s2s.launcher.redis_server import RedisServer, free_port

        self.redis = RedisServer(appendonly=aof)
        self.logdir = logdir
        self.per_stage = per_stage
        self.gateway_ports = [free_port(), free_port()]
        self.env = with_private_key({**os.environ, "HF_HUB_OFFLINE": "1",
                                     "PYTHONUNBUFFERED": "1", "S2S_METRICS_PORT": "0", **env})
        self.procs: dict[str, subprocess.Popen] = {}   # name -> process
        self.killed: set[int] = set()
        self.count = 0

    @property
    def urls(self) -> list[str]:
        return [f"ws://127.0.0.1:{p}/ws" for p in self.gateway_ports]

    def _spawn(self, name: str, argv: list[str]) -> None:
        from s2s.launcher.proc import die_with_parent

        self.count += 1
        log = open(self.logdir / f"{name}.{self.count}.log", "wb")
        self.procs[name] = subprocess.Popen(
            [sys.executable, "-m", "s2s", *argv], env={**self.env, "S2S_REDIS_URL": self.redis.url},
            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, preexec_fn=die_with_parent)
        log.close()

    def start_gateway(self, i: int) -> None:
        self._spawn(f"gateway{i}", ["gateway", "--host", "127.0.0.1",
                                    "--port", str(self.gateway_ports[i])])

    def start_worker(self, name: str) -> None:
        self._spawn(name, ["worker", name.split("#")[0]])

    def start(self) -> None:
        self.redis.start()
        for i in range(len(self.gateway_ports)):
            self.start_gateway(i)
        for stage in STAGES:
            for k in range(self.per_stage):
                self.start_worker(f"{stage}#{k}")

    def live_workers(self, max_age_s: float = 2.0) -> dict[str, list[int]]:
        """Pids of the workers heartbeating now, by stage (killed ones left out)."""
        import redis

        client = redis.Redis.from_url(self.redis.url, socket_timeout=2)
        try:
            members = client.zrangebyscore("s2s:workers", time.time() - max_age_s, "+inf")
        finally:
            client.close()
        out: dict[str, list[int]] = {}
        for m in members:
            stage, consumer, _ = m.decode().split("|", 2)
            pid = int(consumer.rsplit("-", 2)[1])
            if pid not in self.killed:
                out.setdefault(stage, []).append(pid)
        return out

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            live = self.live_workers(3.0)
            if all(len(live.get(s, [])) >= self.per_stage for s in STAGES):
                return
            for name, p in self.procs.items():
                if p.poll() is not None:
                    raise RuntimeError(f"{name} exited with {p.returncode} at start "
                                       f"(logs in {self.logdir})")
            time.sleep(0.5)
        raise TimeoutError(f"the stack was not ready in {timeout:.0f} s (logs in {self.logdir})")

    def busy_pids(self, stage: str) -> list[int]:
        """Pids of the stage's workers holding pending entries (mid-turn) now."""
        import redis

        from s2s import keys

        client = redis.Redis.from_url(self.redis.url, socket_timeout=2)
        try:
            info = client.xpending(keys.stage_stream(stage), stage)
        except Exception:
            return []
        finally:
            client.close()
        pids = []
        for c in info.get("consumers") or []:
            name = c["name"].decode() if isinstance(c["name"], bytes) else c["name"]
            if int(c.get("pending", 0)) > 0:
                try:
                    pids.append(int(name.rsplit("-", 2)[1]))
                except (IndexError, ValueError):
                    pass
        return pids

    def kill_worker(self, stage: str, rng: random.Random) -> int | None:
        """SIGKILL a worker of ``stage`` (a busy one if any) and start a new one; None when
        no other worker of the stage is live (the stage would be down, not failing over)."""
        live = self.live_workers().get(stage, [])
        if len(live) < 2:
            return None
        busy = [p for p in self.busy_pids(stage) if p in live]
        pid = rng.choice(busy or live)
        name = next((n for n, p in self.procs.items() if p.pid == pid), None)
        if name is None:
            return None
        self.killed.add(pid)
        os.kill(pid, signal.SIGKILL)
        self.procs[name].wait()
        self.start_worker(name)
        return pid

    def kill_gateway(self, rng: random.Random, down_s: float = 1.0) -> int:
        i = rng.randrange(len(self.gateway_ports))
        proc = self.procs[f"gateway{i}"]
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        time.sleep(down_s)
        self.start_gateway(i)
        return proc.pid

    def restart_redis(self, down_s: float = 1.0) -> None:
        self.redis.restart(down_s)

    def stop(self) -> None:
        stop_processes(self.procs.values(), grace_s=15)
        self.redis.stop()


# --- one client session ----------------------------------------------------------------------
@dataclass
class Attempt:
    session: int
    utterance: int
    started: float                        # wall time of the first spoken sample sent
    speech_end: float = 0.0               # ... of the last one
    ended: float = 0.0                    # reply done, or given up
    turn: int | None = None
    transcript: str = ""
    reply: str = ""
    completed: bool = False               # a reply_done for the turn that answers it
    v2v_ms: float | None = None           # speech end -> first reply audio byte
    duplicates: int = 0                   # audio pieces heard twice
    gaps: int = 0                         # audio pieces skipped
    text_without_audio: int = 0           # reply sentences that got no audio
    resumes: int = 0
    whole: bool | None = None             # the transcript holds the words said (None: unknown)
    hit_by: list[str] = field(default_factory=list)

    @property
    def once(self) -> bool:
        """Completed, its reply audio heard exactly once, whole, and matching its text."""
        return self.completed and not self.duplicates and not self.gaps and \
            not self.text_without_audio


def audio_faults(chunks: Sequence[tuple[int, int, bool]]) -> tuple[int, int]:
    """(pieces heard twice, pieces missing) in the order of (seq, chunk, last) heard."""
    dup = gaps = 0
    seen: set[tuple[int, int]] = set()
    expect = (0, 0)
    for seq, chunk, last in chunks:
        if (seq, chunk) in seen:
            dup += 1
            continue
        seen.add((seq, chunk))
        if (seq, chunk) != expect:
            gaps += 1
        expect = (seq + 1, 0) if last else (seq, chunk + 1)
    return dup, gaps


class Speaker:
    """One client session speaking utterances one at a time (real-time paced mic audio,
    silence in between), resuming on another gateway when its connection is lost."""

    def __init__(self, index: int, urls: list[str], reply_timeout_s: float):
        from s2s.client import Tracker

        self.index = index
        self.urls = urls[index % len(urls):] + urls[:index % len(urls)]
        self.reply_timeout_s = reply_timeout_s
        self.tracker = Tracker()
        self.first_audio: dict[int, float] = {}
        self.buf = np.zeros(0, np.int16)      # audio still to be spoken
        self.spoken = asyncio.Event()
        self.connected = asyncio.Event()
        self.stopping = False
        self.busy = False                     # a turn is under way (say() runs)
        self.text_spoken: dict[int, set[int]] = {}  # reply_text seqs with words, per turn
        self.resumes = 0
        self.conn: Any = None
        self.tasks: list[asyncio.Task] = []

    async def start(self) -> None:
        from s2s.client import Connection

        self.conn = await Connection.open(self.urls[0], SR, extra={"audio_marks": True})
        self.connected.set()
        self.tasks = [asyncio.create_task(self._send()), asyncio.create_task(self._receive())]

    async def stop(self) -> None:
        self.stopping = True
        for t in self.tasks:
            t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        if self.conn is not None:
            await self.conn.close()

    async def _reconnect(self) -> bool:
        from s2s.client import Connection

        deadline = time.monotonic() + 30
        i = 0
        while time.monotonic() < deadline and not self.stopping:
            i += 1
            try:
                self.conn = await Connection.open(
                    self.urls[i % len(self.urls)], SR, session_id=self.conn.session_id,
                    timeout=3, extra={"audio_marks": True, "heard": self.tracker.heard()})
                self.resumes += 1
                return True
            except Exception:
                await asyncio.sleep(0.25)
        return False

    async def _receive(self) -> None:
        while not self.stopping:
            msg = await self.conn.recv()
            if msg is None:
                self.connected.clear()
                if not await self._reconnect():
                    return
                self.connected.set()
                continue
            self.tracker.handle(msg)
            if isinstance(msg, dict) and msg.get("type") == "reply_text" and \
                    str(msg.get("text") or "").strip() and isinstance(msg.get("turn"), int):
                self.text_spoken.setdefault(msg["turn"], set()).add(msg.get("seq"))
            n = self.tracker.audio_turn
            if isinstance(msg, bytes) and n is not None and n not in self.first_audio:
                self.first_audio[n] = time.time()

    async def _send(self) -> None:
        silence = np.zeros(FRAME, np.int16)
        next_at = time.monotonic()
        while not self.stopping:
            await self.connected.wait()
            speech = bool(len(self.buf))
            if speech:
                frame, self.buf = self.buf[:FRAME], self.buf[FRAME:]
                if not len(self.buf):
                    self.spoken.set()
            else:
                frame = silence
            try:
                await self.conn.send_audio(frame.tobytes())
            except Exception:  # lost: the receiver resumes; this audio is sent again
                if speech:
                    self.buf = np.concatenate([frame, self.buf])
                    self.spoken.clear()
                await asyncio.sleep(0.05)
                next_at = time.monotonic()
                continue
            next_at += FRAME / SR
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))

    async def say(self, pcm: np.ndarray, utterance: int) -> Attempt:
        self.busy = True
        try:
            return await self._say(pcm, utterance)
        finally:
            self.busy = False

    async def _say(self, pcm: np.ndarray, utterance: int) -> Attempt:
        known = set(self.tracker.turns)
        self.spoken.clear()
        self.buf = np.concatenate([self.buf, pcm])
        a = Attempt(self.index, utterance, started=time.time())
        resumes = self.resumes
        await self.spoken.wait()
        a.speech_end = time.time()
        deadline = time.monotonic() + self.reply_timeout_s
        while time.monotonic() < deadline:
            new = [t for n, t in self.tracker.turns.items() if n not in known and
                   t.transcript.strip()]
            waiting = [t for t in new if not (t.done or t.interrupted or t.superseded)]
            done = [t for t in new if t.done]
            if done and not waiting:
                t = max(done, key=lambda t: t.turn)
                a.completed, a.turn, a.transcript, a.reply = True, t.turn, t.transcript, t.reply
                first = self.first_audio.get(t.turn)
                a.v2v_ms = round((first - a.speech_end) * 1000, 1) if first else None
                a.duplicates, a.gaps = audio_faults(t.chunks)
                audio_seqs = {c[0] for c in t.chunks}
                a.text_without_audio = len(self.text_spoken.get(t.turn, set()) - audio_seqs)
                break
            await asyncio.sleep(0.05)
        else:
            new = [n for n in self.tracker.turns if n not in known]
            a.turn = max(new) if new else None
            if a.turn is not None:
                a.transcript = self.tracker.turns[a.turn].transcript
        a.ended = time.time()
        a.resumes = self.resumes - resumes
        return a


# --- the run -------------------------------------------------------------------------------------
JFK = ("And so my fellow Americans, ask not what your country can do for you, ask what you "
       "can do for your country.")


def words(text: str) -> list[str]:
    import re

    return re.findall(r"[a-z0-9']+", text.lower())


def whole(transcript: str, expected: str | None) -> bool | None:
    """Most (70%) of the expected words were heard (None: the text is not known)."""
    if not expected:
        return None
    want, got = words(expected), set(words(transcript))
    return sum(w in got for w in want) >= 0.7 * len(want)


def utterances(args: argparse.Namespace) -> tuple[list[np.ndarray], list[str | None]]:
    """The speech to say, and its text where known (jfk.wav, the synthesized questions)."""
    from s2s.audio import read_audio

    wavs = list(args.wav or [])
    if not wavs:
        wavs = [ROOT / "tests" / "data" / "jfk.wav"]
        if SHARED_AUDIO.is_dir():
            wavs += [p for p in sorted(SHARED_AUDIO.glob("*.wav")) if p.name != "jfk.wav"]
    out, texts = [], []
    for p in wavs:
        pcm = read_audio(p, SR)
        out.append(pcm[:int(args.max_utterance_s * SR)])  # a lecture is cut to one question's length
        texts.append(JFK if p.name == "jfk.wav" and len(pcm) == len(out[-1]) else None)
    if args.synth:
        from s2s.bench.loadgen import SENTENCES, synthesize

        out += synthesize(args.synth, args.seed)
        sentences = SENTENCES[:]  # the order synthesize() speaks them in
        random.Random(args.seed).shuffle(sentences)
        texts += [sentences[i % len(sentences)] for i in range(args.synth)]
    return out, texts


async def speak_loop(speaker: Speaker, utts: list[np.ndarray], texts: list[str | None],
                     rng: random.Random, stop_at: float, stop: asyncio.Event,
                     attempts: list[Attempt], max_turns: int) -> None:
    for _ in range(max_turns):
        if stop.is_set() or time.monotonic() > stop_at:
            return
        i = rng.randrange(len(utts))
        a = await speaker.say(utts[i], i)
        a.whole = whole(a.transcript, texts[i])
        attempts.append(a)
        await asyncio.sleep(rng.uniform(0.8, 2.0))  # the user listens, then speaks again


async def inject(stack: Stack, args: argparse.Namespace, rng: random.Random,
                 speakers: list[Speaker], attempts: list[Attempt], stop_at: float,
                 faults: list[dict], stop: asyncio.Event) -> None:
    kinds = [args.fault] if args.fault != "worker" else list(STAGES)
    tries = 0
    while len(faults) < args.kills and time.monotonic() < stop_at and tries < args.kills * 50:
        tries += 1
        await asyncio.sleep(rng.uniform(args.min_gap, args.min_gap * 2))
        # a random moment while some turn is under way (spoken or awaiting its reply)
        while not any(s.busy for s in speakers):
            if time.monotonic() > stop_at:
                return
            await asyncio.sleep(0.05)
        await asyncio.sleep(rng.uniform(0, 2.0))
        if not any(s.busy for s in speakers):
            continue  # that turn ended meanwhile: a fault now would hit nothing
        kind = rng.choice(kinds)
        at = time.time()
        if kind in STAGES:
            pid = await asyncio.to_thread(stack.kill_worker, kind, rng)
            if pid is None:
                continue  # no second live worker of that stage yet: try later
            faults.append({"kind": kind, "at": at, "pid": pid})
        elif kind == "gateway":
            faults.append({"kind": kind, "at": at})
            await asyncio.to_thread(stack.kill_gateway, rng)
        else:
            faults.append({"kind": kind, "at": at})
            await asyncio.to_thread(stack.restart_redis)
        print(f"chaos: fault {len(faults)}/{args.kills}: {kind}", flush=True)
        if args.json_out:  # a run cut short still leaves its numbers so far
            mark_hits(attempts, faults)
            Path(args.json_out).write_text(json.dumps(
                {"partial": True, "rows": summarize(attempts, faults), "faults": faults},
                default=str))
        # let every session finish the hit turn and then speak --unhit turns untouched,
        # the baseline the added latency is measured against
        target = len(attempts) + len(speakers) * (1 + args.unhit)
        while len(attempts) < target and time.monotonic() < stop_at:
            await asyncio.sleep(0.1)
    stop.set()


def mark_hits(attempts: list[Attempt], faults: list[dict]) -> None:
    for a in attempts:
        a.hit_by = [f["kind"] for f in faults if a.started <= f["at"] <= (a.ended or time.time())]


def pct(values: Sequence[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)), 1) if len(values) else None


def summarize(attempts: list[Attempt], faults: list[dict]) -> dict[str, Any]:
    unhit = [a for a in attempts if not a.hit_by]
    base = [a.v2v_ms for a in unhit if a.v2v_ms is not None]
    rows = {}
    kinds = sorted({f["kind"] for f in faults})
    groups = [(k, [a for a in attempts if k in a.hit_by]) for k in kinds]
    groups += [("all hit", [a for a in attempts if a.hit_by]), ("unhit", unhit)]
    for name, group in groups:
        v2v = [a.v2v_ms for a in group if a.v2v_ms is not None]
        p50, p95 = pct(v2v, 50), pct(v2v, 95)
        rows[name] = {
            "faults": sum(f["kind"] == name for f in faults) if name in kinds else
            (len(faults) if name == "all hit" else 0),
            "turns": len(group), "completed": sum(a.completed for a in group),
            "heard_once": sum(a.once for a in group),
            "no_reply": sum(not a.completed for a in group),
            "heard_twice": sum(a.duplicates > 0 for a in group),
            "gaps": sum(a.gaps > 0 for a in group),
            "text_without_audio": sum(a.text_without_audio > 0 for a in group),
            "partial_transcript": sum(a.completed and a.whole is False for a in group),
            "v2v_p50_ms": p50, "v2v_p95_ms": p95,
            "added_p50_ms": round(p50 - pct(base, 50), 1) if p50 is not None and base else None,
            "added_p95_ms": round(p95 - pct(base, 95), 1) if p95 is not None and base else None,
        }
    return rows


def format_table(rows: dict[str, Any]) -> str:
    cols = ["faults", "turns", "completed", "heard_once", "no_reply", "heard_twice", "gaps",
            "text_without_audio", "partial_transcript", "v2v_p50_ms", "v2v_p95_ms", "added_p50_ms", "added_p95_ms"]
    head = ["kind", *cols]
    lines = [" | ".join(head), " | ".join("---" for _ in head)]
    for name, row in rows.items():
        lines.append(" | ".join([name, *("-" if row[c] is None else str(row[c]) for c in cols)]))
    return "\n".join(lines)


def plot(attempts: list[Attempt], path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = sorted({k for a in attempts for k in a.hit_by})
    series = [("unhit", [a.v2v_ms for a in attempts if not a.hit_by and a.v2v_ms is not None])]
    series += [(k, [a.v2v_ms for a in attempts if k in a.hit_by and a.v2v_ms is not None])
               for k in kinds]
    fig, ax = plt.subplots(figsize=(7, 4))
    for x, (name, values) in enumerate(series):
        jitter = np.random.default_rng(x).uniform(-0.15, 0.15, len(values))
        ax.scatter(np.full(len(values), x) + jitter, np.asarray(values) / 1000, s=12, alpha=0.6)
        if values:
            ax.hlines(np.percentile(values, [50, 95]) / 1000, x - 0.3, x + 0.3,
                      colors=["k", "r"], linewidth=1)
    ax.set_xticks(range(len(series)), [f"{n}\n({len(v)})" for n, v in series])
    ax.set_ylabel("voice-to-voice latency, s (black p50, red p95)")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


async def run(args: argparse.Namespace) -> dict[str, Any]:
    rng = random.Random(args.seed)
    utts, texts = utterances(args)
    logdir = Path(args.logdir or tempfile.mkdtemp(prefix="s2s-chaos-"))
    logdir.mkdir(parents=True, exist_ok=True)
    env = {"S2S_CLAIM_IDLE_S": str(args.claim_idle_s), "S2S_GATEWAY_LEASE_S": "1.0",
           "S2S_GATEWAY_GRACE_S": "5.0"}
    stack = Stack(args.per_stage, args.aof, logdir, env)
    attempts: list[Attempt] = []
    faults: list[dict] = []
    speakers: list[Speaker] = []
    t0 = time.monotonic()
    try:
        print(f"chaos: starting the stack (logs in {logdir})…", flush=True)
        stack.start()
        await asyncio.to_thread(stack.wait_ready, args.ready_timeout)
        print(f"chaos: ready in {time.monotonic() - t0:.0f} s; {args.sessions} session(s), "
              f"faults: {args.fault} × {args.kills}", flush=True)
        speakers = [Speaker(i, stack.urls, args.reply_timeout) for i in range(args.sessions)]
        for s in speakers:
            await s.start()
        # one unmeasured turn each: models warm, sessions owned
        await asyncio.gather(*(s.say(utts[s.index % len(utts)], -1) for s in speakers))
        stop_at = time.monotonic() + args.duration
        stop = asyncio.Event()
        loops = [speak_loop(s, utts, texts, rng, stop_at, stop, attempts, args.max_turns)
                 for s in speakers]
        injector = asyncio.create_task(inject(stack, args, rng, speakers, attempts, stop_at,
                                              faults, stop))
        await asyncio.gather(*loops)  # they stop once the injector is done, or at stop_at
        injector.cancel()
        await asyncio.gather(injector, return_exceptions=True)
    finally:
        for s in speakers:
            await s.stop()
        await asyncio.to_thread(stack.stop)
    mark_hits(attempts, faults)
    rows = summarize(attempts, faults)
    return {"fault": args.fault, "kills": len(faults), "sessions": args.sessions,
            "per_stage": args.per_stage, "aof": args.aof, "wall_s": round(time.monotonic() - t0),
            "rows": rows, "faults": faults, "logs": str(logdir),
            "attempts": [a.__dict__ | {"once": a.once} for a in attempts]}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--fault", choices=FAULTS, default="worker",
                        help="what to kill: a worker of any stage, of one stage, the gateway, "
                             "or Redis (restarted)")
    parser.add_argument("--kills", type=int, default=20, help="faults to inject")
    parser.add_argument("--sessions", type=int, default=2, help="concurrent client sessions")
    parser.add_argument("--duration", type=float, default=600.0,
                        help="hard limit on the measured part, seconds")
    parser.add_argument("--per-stage", type=int, default=2, help="workers per stage")
    parser.add_argument("--aof", action="store_true", help="Redis with the append-only file on")
    parser.add_argument("--wav", action="append", type=Path, default=None,
                        help="speech file(s) to speak (default: tests/data/jfk.wav and "
                             "../shared/audio/*.wav beside the checkout)")
    parser.add_argument("--synth", type=int, default=4, metavar="N",
                        help="also speak N short questions synthesized with the Piper voice")
    parser.add_argument("--max-utterance-s", type=float, default=12.0,
                        help="longer speech files are cut to this many seconds")
    parser.add_argument("--reply-timeout", type=float, default=30.0,
                        help="seconds after its speech a turn may take before it counts as "
                             "unanswered")
    parser.add_argument("--max-turns", type=int, default=1000, help="turns per session at most")
    parser.add_argument("--unhit", type=int, default=1,
                        help="turns per session left untouched after each fault (the baseline)")
    parser.add_argument("--min-gap", type=float, default=1.0,
                        help="seconds between faults at least (random up to twice that)")
    parser.add_argument("--claim-idle-s", type=float, default=1.0,
                        help="the workers' S2S_CLAIM_IDLE_S")
    parser.add_argument("--ready-timeout", type=float, default=600.0,
                        help="seconds the stack may take to load its models")
    parser.add_argument("--logdir", default=None, help="where the processes' logs go")
    parser.add_argument("--json-out", default="chaos.json", help="write the report here")
    parser.add_argument("--plot", default="chaos.png", help="write the latency plot here")
    parser.add_argument("--seed", type=int, default=0)


def main(args: argparse.Namespace) -> int:
    report = asyncio.run(run(args))
    table = format_table(report["rows"])
    print(table)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(report, indent=1, default=str))
        print(f"json: {args.json_out}")
    if args.plot:
        attempts = [Attempt(**{k: v for k, v in a.items() if k != "once"})
                    for a in report["attempts"]]
        plot(attempts, Path(args.plot), f"s2s chaos: {report['kills']} × {args.fault}, "
             f"{args.sessions} session(s)")
        print(f"plot: {args.plot}")
    hit = report["rows"].get("all hit", {})
    return 0 if report["attempts"] and hit.get("heard_once", 0) == hit.get("turns", 0) else 1


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_arguments(p)
    sys.exit(main(p.parse_args()))
