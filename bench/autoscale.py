"""Autoscaling simulation: KEDA and the HPA, as deploy/k8s configures them, driving real
processes under a ramp of real sessions (``python -m s2s.bench.autoscale``).

What is real: a Redis (the bundled Valkey), the gateways (``s2s gateway``: admission,
sessions, /metrics), the VAD workers (``s2s worker vad``: Silero and the end-of-turn
model, session ownership through ``s2s:vad:sessions``), the worker runtime of every stage
(slots, batching, lookahead, turn holds, claims, SIGTERM drain), and the clients: each
simulated user speaks real speech (tests/data/jfk.wav) through ``s2s.client.Connection``
in 20 ms frames in real time, waits for the reply, listens to it, and speaks again.

What is a STUB: the STT, LLM and TTS models (``s2s.bench.stub_stages``: the real stage
classes with the model call replaced by a sleep that follows the measured CPU figures,
times a slowdown).  They are labelled STUB in their names, logs, texts and in this
bench's output and plot.

The autoscaler: every ScaledObject of deploy/k8s/keda.yaml is parsed (triggers, the
scalingModifiers formula, target, activation, min/max, pollingInterval, the HPA
behaviour with Kubernetes' defaults; ``s2s.bench.autoscale_model``).  Every second the
bench samples what each scaler reads: XPENDING's count and XINFO GROUPS' lag of each
stage's stream and group (the redis-streams triggers), and for the gateway the sum of
``s2s_active_sessions`` over the gateways' /metrics as a Prometheus scraping every
``--scrape`` seconds would return it.  Every ``--sync`` seconds (the HPA's sync period)
it applies the HPA's rule to each, and starts worker or gateway processes or sends
SIGTERM to them (newest first, as a ReplicaSet picks; a gateway after its preStop sleep,
SIGKILL after terminationGracePeriodSeconds) until each Deployment has its replicas.

Two compressions make it fit on one small machine, and the output states both:

- time (``--compress C``): every stabilisation window and scaling-policy period is
  divided by C, a window never below ``--min-window`` (4 HPA syncs: the VAD's 300 s
  scale-down window becomes 60 s at C=10); the HPA's sync period, the pods' start and
  drain, and the users' speech are real time;
- sessions (``--session-scale K``): one simulated session stands for K users where a
  count of sessions is concerned: a VAD worker owns 64/K sessions (S2S_CONCURRENCY) and
  admission caps it at that, a gateway holds 200/K (S2S_MAX_SESSIONS), and the VAD's and
  the gateway's KEDA targets are divided by K (48/K and 150/K a pod).  The stub stages'
  targets (their slots) are not: their load comes from the turns the users speak, and
  ``--slowdown`` sets how slow each stub is (so that a peak of a few dozen sessions
  needs several pods of each).

The lag triggers: XINFO GROUPS' ``lag`` is NULL whenever Redis cannot count it (the bus
deletes the entries it acknowledges), and KEDA's client reads NULL as 0; the bench reads it
the same way, and reports how often it was NULL and what really waited (XLEN - pending).
``--lag-source xlen`` gives the HPA XLEN - pending instead, to see the manifests with that
fixed.

Checks (the summary says yes/no for each, ``--json`` keeps every sample, turn and
event, ``--plot`` draws replicas per stage against load):

- every stage scales out under the ramp, before the voice-to-voice p95 (a sliding
  window of turns) passes its bound (``--p95-bound``; default 1.5x the p95 of the
  first turns, spoken before any scale-out);
- nobody is refused (``busy``, ``too_many_sessions``) while the Deployments are below
  their max;
- every turn is answered, also while pods are removed, and when idle every Deployment
  is back at its minimum.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from s2s import keys

from .autoscale_model import Hpa, Scaler, by_kind, manifests, redis_streams_reading, scalers

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "deploy" / "k8s"
WAV = ROOT / "tests" / "data" / "jfk.wav"
STAGES = ("vad", "stt", "llm", "tts")
DEPLOYMENTS = ("gateway", *STAGES)
SPECS = {"vad": "vad", "stt": "s2s.bench.stub_stages:StubStt",
         "llm": "s2s.bench.stub_stages:StubLlm", "tts": "s2s.bench.stub_stages:StubTts"}
STUBBED = ("stt", "llm", "tts")
VAD_SLOTS = 64          # SessionStage.concurrency: what admission counts a VAD worker for
GATEWAY_SESSIONS = 200  # Settings.max_sessions
SR = 16000
P95_WINDOW_S = 30.0     # the sliding window of the p95 timeline
# settings of config.yaml that name this cluster's addresses, not behaviour
NOT_COPIED = {"S2S_REDIS_URL", "S2S_METRICS_PORT", "REDIS_ADDRESS", "S2S_REDIS_CELLS",
              "S2S_LOG_JSON"}

# How much slower than the measured CPU figures each STUB runs: one simulated user brings
# the turns of one user, so at this bench's 16-24 sessions the stages' queues reach their
# targets (their slots) only if an item takes this much longer (by Little's law, queue =
# arrivals x time in the stage); a real stage reaches them at correspondingly more users.
SLOWDOWN = "stt=20,llm=8,tts=3"
PROFILES: dict[str, dict[str, Any]] = {
    # ~12 minutes: one user alone for 2 turns, 0 -> 24 sessions in 4 min, 2 min held, down in
    # 1 min, idle until every Deployment is back at its minimum
    "full": dict(peak=24, up=240.0, hold=120.0, down=60.0, idle=300.0, session_scale=8,
                 compress=10.0, sync=15.0, scrape=15.0, slowdown=SLOWDOWN, clip=0.0,
                 pause=1.0, baseline_turns=2, frame_ms=100, listen_frame_ms=500,
                 expect=",".join(DEPLOYMENTS)),
    # CI (tests/test_autoscale.py): ~3 minutes, 16 sessions (the gateway stays at one pod),
    # a faster HPA sync
    "quick": dict(peak=16, up=60.0, hold=30.0, down=10.0, idle=90.0, session_scale=8,
                  compress=10.0, sync=3.0, scrape=3.0, slowdown=SLOWDOWN, clip=0.0,
                  pause=0.5, baseline_turns=0, frame_ms=100, listen_frame_ms=500,
                  expect=",".join(STAGES)),
}


def now() -> float:
    return time.monotonic()


# --- pods and Deployments ---------------------------------------------------------------
@dataclass
class Pod:
    deployment: str
    index: int
    proc: subprocess.Popen
    created: float
    log: Path
    port: int = 0                    # gateway: its HTTP port
    ready_at: float | None = None
    terminating_at: float | None = None
    sigterm_at: float | None = None
    exited_at: float | None = None
    exit_code: int | None = None
    cpu_s: float = 0.0               # CPU seconds used, as last read from /proc

    @property
    def name(self) -> str:
        return f"{self.deployment}-{self.index}"

    @property
    def alive(self) -> bool:
        return self.exited_at is None


class Cluster:
    """The Deployments as process groups: ``scale(name, n)`` starts or terminates pods."""

    def __init__(self, redis_url: str, logdir: Path, env: dict[str, str], grace: dict[str, float],
                 pre_stop: dict[str, float], events: list[dict], t0: float):
        self.redis_url = redis_url
        self.logdir = logdir
        self.env = env
        self.grace = grace
        self.pre_stop = pre_stop
        self.events = events
        self.t0 = t0
        self.pods: dict[str, list[Pod]] = {d: [] for d in DEPLOYMENTS}
        self.replicas: dict[str, int] = {d: 0 for d in DEPLOYMENTS}
        self.count = 0
        self.stage_env: dict[str, dict[str, str]] = {d: {} for d in DEPLOYMENTS}

    def event(self, kind: str, **data: Any) -> None:
        self.events.append({"t": round(now() - self.t0, 2), "kind": kind, **data})

    def live(self, name: str) -> list[Pod]:
        """Pods that count as replicas: not terminating, not exited."""
        return [p for p in self.pods[name] if p.alive and p.terminating_at is None]

    def ready(self, name: str) -> list[Pod]:
        return [p for p in self.live(name) if p.ready_at is not None]

    def start(self, name: str) -> Pod:
        from s2s.launcher.redis_server import free_port

        self.count += 1
        index = self.count
        log = self.logdir / f"{name}-{index}.log"
        env = {**self.env, **self.stage_env[name]}
        port = 0
        if name == "gateway":
            port = free_port()
            cmd = [sys.executable, "-m", "s2s.bench.stub_stages", "gateway", "--host",
                   "127.0.0.1", "--port", str(port)]
        else:
            cmd = [sys.executable, "-m", "s2s", "worker", SPECS[name]]
        with open(log, "wb") as out:
            proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                    cwd=ROOT, start_new_session=True)
        pod = Pod(name, index, proc, now(), log, port)
        self.pods[name].append(pod)
        self.event("pod_start", pod=pod.name)
        return pod

    def scale(self, name: str, replicas: int) -> None:
        self.replicas[name] = replicas
        self.reconcile(name)

    def reconcile(self, name: str) -> None:
        live = self.live(name)
        for _ in range(self.replicas[name] - len(live)):
            self.start(name)
        if len(live) > self.replicas[name]:
            # a ReplicaSet deletes not-ready pods first, then the newest
            order = sorted(live, key=lambda p: (p.ready_at is not None, p.created), reverse=False)
            order = [p for p in order if p.ready_at is None] + \
                sorted([p for p in order if p.ready_at is not None], key=lambda p: -p.created)
            for pod in order[:len(live) - self.replicas[name]]:
                self.terminate(pod)

    def terminate(self, pod: Pod) -> None:
        pod.terminating_at = now()
        self.event("pod_terminate", pod=pod.name, pre_stop_s=self.pre_stop.get(pod.deployment, 0))
        if not self.pre_stop.get(pod.deployment):
            self._sigterm(pod)

    def _sigterm(self, pod: Pod) -> None:
        pod.sigterm_at = now()
        if pod.proc.poll() is None:
            pod.proc.send_signal(signal.SIGTERM)

    def tick(self, registry: set[int], gateway_ok: set[int]) -> None:
        """Pod lifecycle: readiness (a worker heartbeats, a gateway's /healthz answers),
        preStop, SIGKILL after the grace period, exits; a pod that exits on its own is
        replaced, as a ReplicaSet does."""
        t = now()
        for name, pods in self.pods.items():
            for pod in pods:
                if not pod.alive:
                    continue
                pod.cpu_s = cpu_seconds(pod.proc.pid) or pod.cpu_s
                code = pod.proc.poll()
                if code is not None:
                    pod.exited_at, pod.exit_code = t, code
                    self.event("pod_exit", pod=pod.name, code=code,
                               drained_s=round(t - pod.sigterm_at, 2) if pod.sigterm_at else None,
                               unexpected=pod.terminating_at is None)
                    continue
                if pod.ready_at is None and pod.terminating_at is None:
                    ok = pod.port in gateway_ok if name == "gateway" else pod.proc.pid in registry
                    if ok:
                        pod.ready_at = t
                        self.event("pod_ready", pod=pod.name, start_s=round(t - pod.created, 2))
                if pod.terminating_at is not None:
                    if pod.sigterm_at is None and \
                            t - pod.terminating_at >= self.pre_stop.get(name, 0):
                        self._sigterm(pod)
                    if t - pod.terminating_at >= self.grace.get(name, 30):
                        pod.proc.kill()
                        self.event("pod_kill", pod=pod.name)
            self.reconcile(name)

    def stop_all(self, timeout: float = 20) -> None:
        procs = [p.proc for pods in self.pods.values() for p in pods if p.proc.poll() is None]
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        deadline = now() + timeout
        for proc in procs:
            try:
                proc.wait(max(0.1, deadline - now()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


# --- the users ---------------------------------------------------------------------------
@dataclass
class TurnRecord:
    user: int
    index: int
    session: str
    gateway: str
    sent_at: float                      # bench time the utterance's last frame was sent
    speech_end_at: float | None = None  # wall clock the frame with the last speech was sent
    answered: bool = False
    answered_at: float | None = None    # bench time of the first reply audio
    v2v_ms: float | None = None         # from the known end of speech
    v2v_vad_ms: float | None = None     # from the VAD's end of the final transcript
    transcript_ms: float | None = None  # ... to its transcript (VAD + STT)
    reply_text_ms: float | None = None  # ... to its first reply text (+ LLM, holds included)
    dropped: str = ""                   # why it got no reply (empty: answered)
    unfinished: bool = False            # answered, but the reply did not end in time
    phase: str = ""


class Service:
    """A Kubernetes Service in front of the gateways: a new connection goes to the ready,
    not terminating gateways in turn."""

    def __init__(self, cluster: Cluster):
        self.cluster = cluster
        self.n = 0

    def urls(self) -> list[tuple[str, str]]:
        pods = self.cluster.ready("gateway")
        if not pods:
            return []
        self.n += 1
        pods = pods[self.n % len(pods):] + pods[:self.n % len(pods)]
        return [(p.name, f"ws://127.0.0.1:{p.port}/ws") for p in pods]


class User:
    """One simulated user: opens a session through the Service, speaks the utterance,
    waits for the reply and listens to it (as long as its audio lasts), pauses, speaks
    again; told to leave, it finishes its turn first.  A refusal is recorded and retried
    after ``retry_s``; a connection lost mid-session (its gateway went) resumes the
    session on another gateway, or opens a new one."""

    def __init__(self, bench: "Bench", uid: int, max_turns: int = 0):
        self.bench = bench
        self.uid = uid
        self.max_turns = max_turns
        self.leave = asyncio.Event()
        self.connected = False
        self.turns = 0
        self.next_at = 0.0  # when the next audio frame is due (monotonic)

    async def run(self) -> None:
        from s2s.client.protocol import Tracker

        b = self.bench
        rng = random.Random(self.uid)
        conn, tracker, pos, gateway = None, Tracker(), 0, ""
        frame = b.frame
        silence = np.zeros(frame, np.int16).tobytes()
        try:
            while not (self.leave.is_set() and conn is None):
                if conn is None:
                    conn, gateway = await self._open(None)
                    if conn is None:
                        return
                    tracker, pos = Tracker(), 0
                    self.receiver = asyncio.create_task(self._receive(conn, tracker))
                if self.leave.is_set():
                    break
                # one turn: a short lead of silence, the utterance, then silence until
                # the reply has been heard to its end
                record = TurnRecord(self.uid, self.turns, conn.session_id, gateway, 0.0,
                                     phase=b.phase(now() - b.t0))
                self.turns += 1
                if self.max_turns and self.turns >= self.max_turns:
                    self.leave.set()
                lead = int(rng.uniform(0.3, 1.0) * SR) // frame * frame
                start_pos = pos + lead
                pcm = np.concatenate([np.zeros(lead, np.int16), b.utterance]).tobytes()
                conn, pos, gateway, tracker = await self._send(conn, pcm, pos, tracker, gateway)
                record.sent_at = now() - b.t0
                speech_end = (start_pos + b.speech_end) / SR
                record.speech_end_at = tracker.sent_at(speech_end)
                b.turns.append(record)
                conn, pos, gateway, tracker = await self._await_reply(
                    conn, pos, tracker, gateway, record, start_pos / SR, speech_end, silence)
                if conn is None:
                    continue
                # a short pause before speaking again
                conn, pos, gateway, tracker = await self._send(
                    conn, bytes(2 * b.listen_frame) * max(1, round(b.args.pause * SR /
                                                                   b.listen_frame)),
                    pos, tracker, gateway, b.listen_frame)
        finally:
            self.connected = False
            if conn is not None:
                await conn.close()

    async def _open(self, session_id: str | None, heard: dict | None = None):
        from s2s.client.protocol import Connection, ProtocolError

        b = self.bench
        while True:
            urls = b.service.urls()
            if not urls:
                await asyncio.sleep(0.5)
                continue
            name, url = urls[0]
            extra = {"audio_marks": True}
            if heard:
                extra["heard"] = heard
            try:
                conn = await Connection.open(url, SR, session_id=session_id, timeout=10,
                                             extra=extra)
                self.connected = True
                return conn, name
            except ProtocolError as e:
                if session_id is not None:
                    return None, ""  # the session is gone: the caller opens a new one
                b.refusal(self.uid, name, e.code or "error", (e.error or {}).get("message", str(e)))
                if self.leave.is_set():
                    return None, ""
                await asyncio.sleep(min(float((e.error or {}).get("retry_after_s") or 5), 5))
            except Exception as e:  # not listening (a gateway going away): the next one
                b.event("connect_failed", user=self.uid, gateway=name, error=str(e)[:200])
                await asyncio.sleep(0.5)

    async def _receive(self, conn, tracker) -> None:
        while True:
            msg = await conn.recv()
            if msg is None:
                return
            tracker.handle(msg)

    async def _resume(self, conn, tracker):
        """The connection was lost: resume the session elsewhere (same tracker), or open
        a new one (new tracker, positions from 0)."""
        b = self.bench
        self.connected = False
        sid = conn.session_id
        b.event("connection_lost", user=self.uid, session=sid, code=conn.close_code)
        new, name = await self._open(sid, tracker.heard())
        if new is not None:
            b.event("resumed", user=self.uid, session=sid, gateway=name)
            self.receiver = asyncio.create_task(self._receive(new, tracker))
            return new, name, tracker, True
        new, name = await self._open(None)
        if new is None:
            return None, "", tracker, False
        from s2s.client.protocol import Tracker

        tracker = Tracker()
        self.receiver = asyncio.create_task(self._receive(new, tracker))
        b.event("reopened", user=self.uid, old=sid, session=new.session_id, gateway=name)
        return new, name, tracker, False

    async def _send(self, conn, pcm: bytes, pos: int, tracker, gateway: str,
                    frame: int = 0):
        """Send ``pcm`` in frames of ``frame`` samples (default ``--frame-ms``) in real time
        (``pos``: samples sent so far in this session).  Returns the connection, position,
        gateway and tracker in use after."""
        frame = frame or self.bench.frame
        step = frame * 2
        frame_s = frame / SR
        for i in range(0, len(pcm), step):
            # real time across calls: each frame is due one frame after the last one
            if self.next_at < now() - 0.5:
                self.next_at = now()  # fell behind (a busy machine): no burst
            delay = self.next_at - now()
            if delay > 0:
                await asyncio.sleep(delay)
            self.next_at += frame_s
            frame = pcm[i:i + step]
            if self.receiver.done():
                conn, gateway, tracker, resumed = await self._resume(conn, tracker)
                if conn is None:
                    return None, pos, "", tracker
                if not resumed:
                    pos = 0
                self.next_at = now()
            try:
                await conn.send_audio(frame)
            except Exception:
                await asyncio.sleep(0.02)
                continue
            pos += len(frame) // 2
            tracker.sent(pos / SR)
        return conn, pos, gateway, tracker

    async def _await_reply(self, conn, pos, tracker, gateway, record: TurnRecord,
                           start_s: float, speech_end_s: float, silence: bytes):
        """Silence until the final transcript's reply audio arrived and played to its end
        (or ``--turn-timeout`` passed: the turn is dropped)."""
        b = self.bench
        deadline = now() + b.args.turn_timeout
        answered = None
        listen_until = None
        end_pos = pos
        while True:
            if answered is None:
                for t in tracker.turns.values():
                    if t.end_s is not None and t.end_s >= speech_end_s - 1.5 and \
                            t.first_audio_at is not None and t.transcript:
                        answered = t
                        deadline = now() + b.args.turn_timeout  # for the reply to end
                        record.answered = True
                        record.answered_at = now() - b.t0 - (time.time() - t.first_audio_at)
                        record.v2v_vad_ms = t.voice_to_voice_ms
                        record.transcript_ms = t.first_transcript_ms
                        record.reply_text_ms = t.first_reply_text_ms
                        if record.speech_end_at is not None:
                            record.v2v_ms = round((t.first_audio_at - record.speech_end_at)
                                                  * 1000, 1)
                        break
            if answered is not None:
                audio_s = len(answered.audio) / 2 / answered.sample_rate \
                    if answered.sample_rate else 0.0
                if answered.done:
                    end = answered.first_audio_at + audio_s
                    listen_until = listen_until or end
                    if time.time() >= end:
                        return conn, pos, gateway, tracker
            if now() > deadline:
                if answered is None:
                    record.dropped = "no reply"
                    b.event("turn_dropped", user=self.uid, session=record.session,
                            turn=record.index, gateway=gateway)
                else:
                    record.unfinished = True
                return conn, pos, gateway, tracker
            old = tracker
            # the first second after the speech in --frame-ms frames (the VAD's end of
            # speech comes as soon as with a microphone's), then --listen-frame-ms ones
            frame = b.frame if pos - end_pos < SR else b.listen_frame
            conn, pos, gateway, tracker = await self._send(
                conn, bytes(2 * frame), pos, tracker, gateway, frame)
            if conn is None:
                record.dropped = record.dropped or ("" if record.answered else "session lost")
                return None, pos, "", tracker
            if tracker is not old and not record.answered:
                # a new session: the turn in flight is gone with the old one
                record.dropped = "session ended with its gateway"
                return conn, pos, gateway, tracker


# --- the bench ---------------------------------------------------------------------------
class Bench:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.t0 = now()
        self.events: list[dict] = []
        self.samples: list[dict] = []
        self.turns: list[TurnRecord] = []
        self.refusals: list[dict] = []
        self.users: list[User] = []
        self.tasks: list[asyncio.Task] = []
        docs = manifests(args.k8s)
        self.deployments = by_kind(docs, "Deployment")
        self.config = by_kind(docs, "ConfigMap")["s2s-config"]["data"]
        self.min_window = args.min_window if args.min_window is not None else 4 * args.sync
        parsed = scalers(args.k8s, args.compress, self.min_window)
        k = args.session_scale
        self.scalers: dict[str, Scaler] = {
            name: (s.scaled(k) if name in ("vad", "gateway") else s) for name, s in parsed.items()}
        self.hpas = {name: Hpa(s) for name, s in self.scalers.items()}
        self.vad_slots = max(1, VAD_SLOTS // k)
        self.gateway_sessions = max(1, GATEWAY_SESSIONS // k)
        self.slowdown = parse_slowdown(args.slowdown, float(k))
        self.prom_value = 0.0
        self.prom_at = -1e9
        self.gateway_sessions_now = 0.0
        self.bound_ms: float | None = args.p95_bound * 1000 if args.p95_bound else None
        self.ramp_at: float | None = None
        self.cpu0 = time.process_time()
        self.truth: dict[str, dict] = {}
        self.expect = [d for d in DEPLOYMENTS if d in args.expect.split(",")]
        self.utterance, self.speech_end = load_utterance(args.wav, args.clip)
        self.frame = SR * args.frame_ms // 1000
        self.listen_frame = SR * (args.listen_frame_ms or args.frame_ms) // 1000

    def event(self, kind: str, **data: Any) -> None:
        self.events.append({"t": round(now() - self.t0, 2), "kind": kind, **data})

    def refusal(self, uid: int, gateway: str, code: str, message: str) -> None:
        snapshot = {d: self.cluster.replicas[d] for d in DEPLOYMENTS}
        at_max = [d for d in DEPLOYMENTS if snapshot[d] >= self.scalers[d].max_replicas]
        r = {"t": round(now() - self.t0, 2), "user": uid, "gateway": gateway, "code": code,
             "message": message[:200], "replicas": snapshot, "at_max": at_max}
        self.refusals.append(r)
        self.event("refusal", **r)

    # --- the load ---
    def target_sessions(self, t: float) -> float:
        """Sessions the ramp asks for at bench time ``t`` (the ramp starts after the
        baseline, at ``ramp_at``)."""
        a = self.args
        if self.ramp_at is None:
            return 1.0
        t -= self.ramp_at
        if t < 0:
            return 1.0
        if t < a.up:
            return a.peak * t / a.up
        if t < a.up + a.hold:
            return float(a.peak)
        if t < a.up + a.hold + a.down:
            return a.peak * (1 - (t - a.up - a.hold) / a.down)
        return 0.0

    def phase(self, t: float) -> str:
        a = self.args
        if self.ramp_at is None or t < self.ramp_at:
            return "baseline"
        t -= self.ramp_at
        for name, end in (("up", a.up), ("hold", a.up + a.hold),
                          ("down", a.up + a.hold + a.down)):
            if t < end:
                return name
        return "idle"

    async def drive(self, t: float) -> None:
        """Start users while the ramp asks for more, tell the oldest to leave while it
        asks for fewer."""
        if self.ramp_at is None:
            return
        want = math.floor(self.target_sessions(t) + 1e-9)
        staying = [u for u in self.users if not u.leave.is_set() and not u.task.done()]
        if want > len(staying):
            for _ in range(want - len(staying)):
                user = User(self, len(self.users))
                user.task = asyncio.create_task(user.run())
                self.users.append(user)
        elif want < len(staying):
            for user in staying[:len(staying) - want]:
                user.leave.set()

    # --- what the scalers read ---
    async def readings(self, r) -> dict[str, dict[str, float]]:
        out: dict[str, dict[str, float]] = {}
        for name in STAGES:
            s = self.scalers[name]
            vals = {}
            for trig in s.triggers:
                m = trig.metadata
                stream = m["stream"]
                try:
                    groups = await r.xinfo_groups(stream)
                except Exception:
                    groups = []
                pending = None
                if "consumerGroup" in m and "lagCount" not in m:
                    try:
                        pending = (await r.xpending(stream, m["consumerGroup"]))["pending"]
                    except Exception:
                        pending = 0
                xlen = await r.xlen(stream)
                vals[trig.name] = redis_streams_reading(groups, pending, xlen, m)
                if "lagCount" in m and self.args.lag_source == "xlen":
                    # what a lag Redis could always count would read: since acknowledged
                    # entries are deleted, everything in the stream not pending waits
                    try:
                        owned = (await r.xpending(stream, m["consumerGroup"]))["pending"]
                    except Exception:
                        owned = 0
                    vals[trig.name] = float(max(0, xlen - owned))
                if "lagCount" in m:
                    # XINFO GROUPS answers a NULL lag when Redis cannot count it (entries
                    # deleted at or after the group's last delivered one: the bus deletes
                    # what it acknowledges); KEDA's client (go-redis) reads NULL as 0.
                    # Since acknowledged entries are deleted, XLEN - pending is what
                    # really waits: kept beside the reading, not given to the HPA.
                    group = next((g for g in groups if _name(g["name"]) == m["consumerGroup"]),
                                 None)
                    try:
                        owned = (await r.xpending(stream, m["consumerGroup"]))["pending"]
                    except Exception:
                        owned = 0
                    self.truth[name] = {"xlen": xlen, "waiting": max(0, xlen - owned),
                                        "lag_null": group is not None and group.get("lag") is None}
            out[name] = vals
        return out

    async def scrape_gateways(self, http) -> tuple[float, set[int]]:
        """Sum of s2s_active_sessions over the gateways (what Prometheus would scrape),
        and the ports whose /healthz answers (readiness)."""
        total, ok = 0.0, set()
        for pod in self.cluster.pods["gateway"]:
            if not pod.alive or pod.sigterm_at is not None:
                continue
            try:
                resp = await http.get(f"http://127.0.0.1:{pod.port}/metrics", timeout=2)
                m = re.search(r"^s2s_active_sessions\s+(\S+)", resp.text, re.M)
                total += float(m.group(1)) if m else 0.0
                health = await http.get(f"http://127.0.0.1:{pod.port}/healthz", timeout=2)
                if health.status_code == 200:
                    ok.add(pod.port)
            except Exception:
                continue
        return total, ok

    async def registry_pids(self, r) -> set[int]:
        members = await r.zrangebyscore(keys.WORKERS, time.time() - 3, "+inf")
        pids = set()
        for m in members:
            consumer = m.decode().split("|")[1]
            match = re.search(r"-(\d+)-[0-9a-f]+$", consumer)
            if match:
                pids.add(int(match.group(1)))
        return pids

    def metric(self, name: str, readings: dict[str, dict[str, float]]) -> float:
        if name == "gateway":
            return self.prom_value
        return self.scalers[name].value(readings[name])

    def p95_window(self, t: float) -> float | None:
        recent = [x.v2v_ms for x in self.turns if x.answered and x.v2v_ms is not None
                  and x.answered_at is not None and t - P95_WINDOW_S <= x.answered_at <= t]
        return float(np.percentile(recent, 95)) if len(recent) >= 3 else None

    async def run(self) -> dict:
        import httpx
        import redis.asyncio as aredis

        from s2s.launcher.redis_server import RedisServer

        from .stack import with_private_key

        a = self.args
        logdir = Path(a.logdir or tempfile.mkdtemp(prefix="s2s-autoscale-"))
        logdir.mkdir(parents=True, exist_ok=True)
        self.logdir = logdir
        server = RedisServer()
        server.start()
        env = {**os.environ, **{k: str(v) for k, v in self.config.items() if k not in NOT_COPIED},
               "S2S_REDIS_URL": server.url, "S2S_METRICS_PORT": "0", "PYTHONUNBUFFERED": "1",
               "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
        with_private_key(env)
        os.environ["S2S_API_KEY"] = env["S2S_API_KEY"]
        grace = {d: float(self.deployments[d]["spec"]["template"]["spec"].get(
            "terminationGracePeriodSeconds", 30)) for d in DEPLOYMENTS}
        pre_stop = {}
        for d in DEPLOYMENTS:
            c = self.deployments[d]["spec"]["template"]["spec"]["containers"][0]
            cmd = ((c.get("lifecycle") or {}).get("preStop") or {}).get("exec", {}).get("command")
            if cmd and cmd[0] == "sleep":
                pre_stop[d] = float(cmd[1])
        self.cluster = Cluster(server.url, logdir, env, grace, pre_stop, self.events, self.t0)
        self.cluster.stage_env["vad"] = {"S2S_CONCURRENCY": str(self.vad_slots)}
        self.cluster.stage_env["gateway"] = {
            "S2S_MAX_SESSIONS": str(self.gateway_sessions),
            "S2S_AUTOSCALE_VAD_SESSIONS": str(self.vad_slots),
            "S2S_PRINCIPAL_MAX_SESSIONS": "0"}  # every simulated user is one principal
        for stage in STUBBED:
            self.cluster.stage_env[stage] = {"S2S_STUB_SLOWDOWN": str(self.slowdown[stage])}
        self.service = Service(self.cluster)
        r = aredis.Redis.from_url(server.url)
        http = httpx.AsyncClient()
        result: dict = {}
        try:
            # the starting point: every Deployment at its minimum, ready
            for d in DEPLOYMENTS:
                self.cluster.scale(d, max(1, self.scalers[d].min_replicas))
            self.say(f"starting {', '.join(DEPLOYMENTS)} (logs in {logdir})")
            deadline = now() + a.start_timeout
            while any(not self.cluster.ready(d) for d in DEPLOYMENTS):
                if now() > deadline:
                    raise TimeoutError(f"the stack was not ready in {a.start_timeout:.0f} s: "
                                       f"logs in {logdir}")
                exited = [p.name for ps in self.cluster.pods.values() for p in ps if not p.alive]
                if exited:
                    raise RuntimeError(f"{exited} exited at start: logs in {logdir}")
                _, ok = await self.scrape_gateways(http)
                self.cluster.tick(await self.registry_pids(r), ok)
                await asyncio.sleep(0.3)
            self.say(f"stack ready: one user speaks {a.baseline_turns} turns (the unloaded "
                     "baseline), then the ramp begins")
            self.t0 = self.cluster.t0 = t_load = now()
            self.events.clear()
            next_sync = next_progress = 0.0
            first = None
            if a.baseline_turns:
                first = User(self, 0, max_turns=a.baseline_turns)
                first.task = asyncio.create_task(first.run())
                self.users.append(first)
            total = math.inf
            while True:
                t = now() - t_load
                if self.ramp_at is None and (first is None or first.task.done()):
                    self.ramp_at = t
                    total = t + a.up + a.hold + a.down
                    self.event("ramp_start")
                    self.say("the ramp begins")
                await self.drive(t)
                readings = await self.readings(r)
                self.gateway_sessions_now, ok = await self.scrape_gateways(http)
                if t - self.prom_at >= a.scrape:
                    self.prom_value, self.prom_at = self.gateway_sessions_now, t
                self.cluster.tick(await self.registry_pids(r), ok)
                decisions = {}
                if t >= next_sync:
                    next_sync = t + a.sync
                    for d in DEPLOYMENTS:
                        current = self.cluster.replicas[d]
                        desired = self.hpas[d].sync(t, self.metric(d, readings), current)
                        decisions[d] = dict(self.hpas[d].last)
                        if desired != current:
                            self.cluster.scale(d, desired)
                            self.event("scale", deployment=d, **{"from": current, "to": desired},
                                       metric=round(self.metric(d, readings), 3),
                                       target=self.scalers[d].target,
                                       why=self.hpas[d].last.get("why"))
                self.record(t, readings, decisions)
                idle_done = t >= total and not any(not u.task.done() for u in self.users) and \
                    all(self.cluster.replicas[d] == max(1, self.scalers[d].min_replicas)
                        and len(self.cluster.live(d)) == len(
                            [p for p in self.cluster.pods[d] if p.alive])
                        for d in DEPLOYMENTS)
                if idle_done and t >= total + a.idle_min:
                    self.say("idle: every Deployment is back at its minimum")
                    break
                if t >= total + a.idle:
                    self.say("idle time over")
                    break
                if t >= next_progress:
                    next_progress = t + a.progress
                    self.progress(t)
                await asyncio.sleep(max(0.05, 1.0 - (now() - t_load - t)))
            result = self.summary()
        finally:
            for u in self.users:
                u.leave.set()
            pending = [u.task for u in self.users if not u.task.done()]
            if pending:
                await asyncio.wait(pending, timeout=a.turn_timeout + 5)
                for task in pending:
                    task.cancel()
            await http.aclose()
            await r.aclose()
            self.cluster.stop_all()
            server.stop()
        return result

    def record(self, t: float, readings: dict, decisions: dict) -> None:
        sample = {"t": round(t, 2), "phase": self.phase(t),
                  "target_sessions": round(self.target_sessions(t), 2),
                  "users_connected": sum(u.connected for u in self.users),
                  "gateway_sessions": self.gateway_sessions_now,
                  "prometheus_sessions": self.prom_value,
                  "refusals": len(self.refusals),
                  "answered": sum(x.answered for x in self.turns),
                  "dropped": sum(bool(x.dropped) for x in self.turns),
                  "p95_ms": self.p95_window(t), "deployments": {}}
        for d in DEPLOYMENTS:
            s = self.scalers[d]
            sample["deployments"][d] = {
                "readings": readings.get(d, {"sessions": self.prom_value}),
                "metric": round(self.metric(d, readings), 3),
                "replicas": self.cluster.replicas[d],
                "ready": len(self.cluster.ready(d)),
                "terminating": len([p for p in self.cluster.pods[d]
                                    if p.alive and p.terminating_at is not None]),
                "desired_raw": (decisions.get(d) or {}).get("raw"),
                "per_pod": round(self.metric(d, readings) / max(1, self.cluster.replicas[d]), 3),
                "target": s.target, **self.truth.get(d, {})}
        self.samples.append(sample)

    def say(self, text: str) -> None:
        print(f"[autoscale {now() - self.t0:7.1f}s] {text}", flush=True)

    def progress(self, t: float) -> None:
        s = self.samples[-1]
        reps = " ".join(f"{d}={s['deployments'][d]['replicas']}({s['deployments'][d]['metric']:g})"
                        for d in DEPLOYMENTS)
        p95 = f"{s['p95_ms']:.0f}" if s["p95_ms"] is not None else "-"
        self.say(f"{s['phase']:>4} sessions {s['users_connected']:>3}/{s['target_sessions']:<5g} "
                 f"replicas(metric) {reps} p95 {p95} ms answered {s['answered']} "
                 f"dropped {s['dropped']} refused {s['refusals']}")

    def lag_summary(self) -> dict[str, dict]:
        """Per stage: how often XINFO GROUPS' lag was NULL (KEDA reads 0), and the most
        entries that really waited (XLEN - pending) while it was."""
        out = {}
        for d in STAGES:
            xs = [s["deployments"][d] for s in self.samples if "lag_null" in s["deployments"][d]]
            null = [x for x in xs if x["lag_null"]]
            out[d] = {"samples": len(xs), "null": len(null),
                      "null_pct": round(100 * len(null) / len(xs)) if xs else None,
                      "max_waiting_while_null": max((x["waiting"] for x in null), default=0),
                      "max_waiting": max((x["waiting"] for x in xs), default=0)}
        return out

    # --- the verdict ---
    def summary(self) -> dict:
        a = self.args
        total = a.up + a.hold + a.down
        answered = [x for x in self.turns if x.answered and x.v2v_ms is not None]
        first_out: dict[str, float | None] = {}
        for d in DEPLOYMENTS:
            ups = [e["t"] for e in self.events if e["kind"] == "scale" and e["deployment"] == d
                   and e["to"] > e["from"]]
            first_out[d] = min(ups) if ups else None
        # the bound: 1.5x the p95 of the baseline's turns (one user alone), else --p95-bound
        base = [x.v2v_ms for x in answered if x.phase == "baseline"]
        baseline = float(np.percentile(base, 95)) if base else None
        bound = self.bound_ms or (1.5 * baseline if baseline else None)
        passed_at = None
        if bound is not None:
            for s in self.samples:
                if s["p95_ms"] is not None and s["p95_ms"] > bound:
                    passed_at = s["t"]
                    break
        peak = {d: max(s["deployments"][d]["replicas"] for s in self.samples) for d in DEPLOYMENTS}
        last = self.samples[-1]["deployments"] if self.samples else {}
        below_max = [r for r in self.refusals if not r["at_max"]]
        sent = [x for x in self.turns]
        dropped = [x for x in sent if not x.answered]
        for x in dropped:
            x.dropped = x.dropped or "the run ended first"
        loads = [s["users_connected"] for s in self.samples]
        expect = self.expect
        checks = {
            "scaled_out": {d: peak[d] > max(1, self.scalers[d].min_replicas) for d in expect},
            "scaled_out_before_p95_bound": {
                d: first_out[d] is not None and (passed_at is None or first_out[d] < passed_at)
                for d in expect},
            "scaled_in_when_idle": {
                d: last.get(d, {}).get("replicas") == max(1, self.scalers[d].min_replicas)
                for d in DEPLOYMENTS},
            "no_refusal_below_max": not below_max,
            "every_turn_answered": not dropped and bool(sent),
        }
        v2v = [x.v2v_ms for x in answered]
        phases: dict[str, dict] = {}
        for name in ("baseline", "up", "hold", "down", "idle"):
            xs = [x.v2v_ms for x in answered if x.phase == name]
            parts = {}
            for key in ("transcript_ms", "reply_text_ms", "v2v_vad_ms"):
                ys = [getattr(x, key) for x in answered if x.phase == name
                      and getattr(x, key) is not None]
                parts[key.replace("_ms", "_p95_ms")] = round(float(np.percentile(ys, 95))) \
                    if ys else None
            phases[name] = {"turns": len(xs),
                            "p50_ms": round(float(np.percentile(xs, 50))) if xs else None,
                            "p95_ms": round(float(np.percentile(xs, 95))) if xs else None,
                            **parts}
        return {
            "what": "autoscaling simulation: real Redis, gateways, VAD workers and clients; "
                    "STT, LLM and TTS are TIMING STUBS (s2s.bench.stub_stages), not models",
            "command": " ".join(["s2s", *sys.argv[1:]] if sys.argv[1:2] == ["autoscale"] else
                                ["python -m s2s.bench.autoscale", *sys.argv[1:]]),
            "settings": {"profile": a.profile, "baseline_turns": a.baseline_turns,
                         "lag_source": a.lag_source,
                         "ramp_at_s": self.ramp_at, "peak_sessions": a.peak, "up_s": a.up,
                         "hold_s": a.hold, "down_s": a.down, "idle_max_s": a.idle,
                         "time_compression": a.compress, "min_window_s": self.min_window,
                         "session_scale": a.session_scale, "hpa_sync_s": a.sync,
                         "prometheus_scrape_s": a.scrape, "stub_slowdown": self.slowdown,
                         "utterance_s": round(len(self.utterance) / SR, 2),
                         "speech_end_s": round(self.speech_end / SR, 2),
                         "vad_sessions_per_pod": self.vad_slots,
                         "gateway_sessions_per_pod": self.gateway_sessions,
                         "scalers": {d: self.scalers[d].describe() for d in DEPLOYMENTS}},
            "checks": checks,
            "ok": all(all(v.values()) if isinstance(v, dict) else v for v in checks.values()),
            "peak_replicas": peak,
            "final_replicas": {d: last.get(d, {}).get("replicas") for d in DEPLOYMENTS},
            "first_scale_out_s": first_out,
            "peak_users": max(loads, default=0),
            "turns": {"spoken": len(sent), "answered": len(sent) - len(dropped),
                      "dropped": len(dropped),
                      "dropped_detail": [x.__dict__ for x in dropped][:20]},
            "voice_to_voice_ms": {
                "p50": round(float(np.percentile(v2v, 50))) if v2v else None,
                "p95": round(float(np.percentile(v2v, 95))) if v2v else None,
                "max": round(max(v2v)) if v2v else None,
                "baseline_p95": round(baseline) if baseline else None,
                "bound": round(bound) if bound else None,
                "window_p95_passed_bound_at_s": passed_at, "by_phase": phases},
            "refusals": {"total": len(self.refusals), "below_max": len(below_max),
                         "by_code": _count(r["code"] for r in self.refusals),
                         "first": self.refusals[:5]},
            "lag_readings": self.lag_summary(),
            "pods": {"started": sum(e["kind"] == "pod_start" for e in self.events),
                     "terminated": sum(e["kind"] == "pod_terminate" for e in self.events),
                     "killed_after_grace": sum(e["kind"] == "pod_kill" for e in self.events),
                     "exited_unexpectedly": [e for e in self.events
                                             if e["kind"] == "pod_exit" and e["unexpected"]],
                     "ready_after_s": _stats([e["start_s"] for e in self.events
                                              if e["kind"] == "pod_ready"]),
                     "drain_s": _stats([e["drained_s"] for e in self.events
                                        if e["kind"] == "pod_exit" and e["drained_s"] is not None])},
            "cpu_s": {**{d: round(sum(p.cpu_s for p in self.cluster.pods[d]), 1)
                         for d in DEPLOYMENTS},
                      "clients (this process)": round(time.process_time() - self.cpu0, 1)},
            "logs": str(self.logdir),
        }


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of a process (Linux /proc), None where unreadable."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


def _name(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _at(t: float | None) -> str:
    return "never" if t is None else f"{t:.0f} s"


def _count(items) -> dict[str, int]:
    out: dict[str, int] = {}
    for i in items:
        out[i] = out.get(i, 0) + 1
    return out


def _stats(xs: list[float]) -> dict[str, float | None]:
    if not xs:
        return {"n": 0, "p50": None, "max": None}
    return {"n": len(xs), "p50": round(float(np.median(xs)), 2), "max": round(max(xs), 2)}


def parse_slowdown(text: str, default: float) -> dict[str, float]:
    out = {s: default for s in STUBBED}
    for item in filter(None, (x.strip() for x in text.split(","))):
        stage, _, value = item.partition("=")
        if stage not in out or not value:
            raise SystemExit(f"--slowdown: {item!r}: use stage=factor for {', '.join(STUBBED)}")
        out[stage] = float(value)
    return out


def load_utterance(path: Path, clip: float) -> tuple[np.ndarray, int]:
    """The speech every user says (int16, 16 kHz), cut at ``clip`` s when set, and the
    sample where its speech ends (silero and the level, as `s2s bench --from-file-end`)."""
    from s2s.audio import read_audio

    from .sweep import speech_end

    pcm = np.asarray(read_audio(str(path), SR), np.int16)
    if clip:
        pcm = pcm[:int(clip * SR)]
    return pcm, speech_end(pcm) + 1


# --- output -----------------------------------------------------------------------------
def format_summary(res: dict) -> str:
    st, ch = res["settings"], res["checks"]
    yes = {True: "yes", False: "NO"}

    def mark(v: bool | None) -> str:
        return "(not checked)" if v is None else yes[v]
    lines = [
        "autoscale simulation (STT, LLM and TTS are TIMING STUBS, not models)",
        f"  ramp 0 -> {st['peak_sessions']} sessions in {st['up_s']:.0f} s, held "
        f"{st['hold_s']:.0f} s, down in {st['down_s']:.0f} s; utterance {st['utterance_s']} s "
        f"of tests/data/jfk.wav (speech ends at {st['speech_end_s']} s)",
        f"  time compression x{st['time_compression']:g} (stabilisation windows and policy "
        f"periods / {st['time_compression']:g}, a window at least {st['min_window_s']:g} s: "
        + ", ".join(f"{d} down {st['scalers'][d]['scale_down']['window_s']:g} s"
                    for d in DEPLOYMENTS)
        + f"); HPA sync every {st['hpa_sync_s']:g} s; "
        f"Prometheus scrape every {st['prometheus_scrape_s']:g} s",
        f"  session scale {st['session_scale']}: a VAD pod owns {st['vad_sessions_per_pod']} "
        f"sessions, a gateway holds {st['gateway_sessions_per_pod']}; KEDA targets vad "
        f"{st['scalers']['vad']['target']:g}, gateway {st['scalers']['gateway']['target']:g} "
        f"a pod (the manifests' / {st['session_scale']})",
        f"  stub slowdown: " + ", ".join(f"{k} x{v:g}" for k, v in st["stub_slowdown"].items()),
        *([f"  lag triggers read: {st['lag_source']}" + (
            " (XINFO GROUPS lag, NULL read as 0, as KEDA)" if st["lag_source"] == "keda" else
            " (XLEN - pending instead of XINFO GROUPS lag: NOT what KEDA reads today)")]
          if any(x["samples"] for x in res["lag_readings"].values()) else []),
        "",
        f"{'deployment':<10} {'min':>3} {'max':>3} {'target':>7} {'first out':>9} {'peak':>4} "
        f"{'final':>5}  scaled out  before bound  in when idle",
    ]
    for d in DEPLOYMENTS:
        sc = st["scalers"][d]
        fo = res["first_scale_out_s"][d]
        lines.append(
            f"{d:<10} {sc['min']:>3} {sc['max']:>3} {sc['target']:>7g} "
            f"{(f'{fo:.0f} s' if fo is not None else '-'):>9} {res['peak_replicas'][d]:>4} "
            f"{res['final_replicas'][d]:>5}  {mark(ch['scaled_out'].get(d)):>10}  "
            f"{mark(ch['scaled_out_before_p95_bound'].get(d)):>12}  "
            f"{mark(ch['scaled_in_when_idle'][d]):>12}")
    v, t, r, p = res["voice_to_voice_ms"], res["turns"], res["refusals"], res["pods"]
    lines += [
        "",
        f"turns: {t['spoken']} spoken, {t['answered']} answered, {t['dropped']} dropped "
        f"(every turn answered: {yes[ch['every_turn_answered']]})",
        f"voice-to-voice from the end of speech: p50 {v['p50']} ms, p95 {v['p95']} ms, max "
        f"{v['max']} ms; unloaded p95 {v['baseline_p95']} ms, bound {v['bound']} ms, "
        f"{P95_WINDOW_S:.0f} s window p95 passed it at "
        f"{_at(v['window_p95_passed_bound_at_s'])}",
        "  by phase: " + ", ".join(
            f"{k} {x['turns']} turns p95 {x['p95_ms']}" for k, x in v["by_phase"].items()),
        f"refusals: {r['total']} ({r['by_code']}), {r['below_max']} while every Deployment was "
        f"below its max (none: {yes[ch['no_refusal_below_max']]})",
        f"pods: {p['started']} started (ready after p50 {p['ready_after_s']['p50']} s, max "
        f"{p['ready_after_s']['max']} s), {p['terminated']} terminated (drained p50 "
        f"{p['drain_s']['p50']} s, max {p['drain_s']['max']} s), {p['killed_after_grace']} "
        f"killed after the grace period, {len(p['exited_unexpectedly'])} exited on their own",
        "CPU seconds: " + ", ".join(f"{k} {v:g}" for k, v in res["cpu_s"].items()),
        *(["XINFO GROUPS lag NULL (KEDA reads 0): " + ", ".join(
            f"{d} {x['null_pct']}% of samples (entries really waiting then: up to "
            f"{x['max_waiting_while_null']})" for d, x in res["lag_readings"].items()
            if x["samples"])] if any(x["samples"] for x in res["lag_readings"].values())
          else []),
        f"all checks: {'PASS' if res['ok'] else 'FAIL'}",
    ]
    return "\n".join(lines)


def plot(res: dict, samples: list[dict], turns: list[TurnRecord], events: list[dict],
         path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    st = res["settings"]
    t = [s["t"] for s in samples]
    fig, axes = plt.subplots(4, 1, figsize=(11, 12), sharex=True,
                             gridspec_kw={"height_ratios": [2, 3, 2, 2]})
    ax = axes[0]
    ax.plot(t, [s["target_sessions"] for s in samples], "k--", lw=1, label="ramp (target)")
    ax.plot(t, [s["users_connected"] for s in samples], "k-", lw=1.5, label="users connected")
    ax.plot(t, [s["gateway_sessions"] for s in samples], color="tab:gray", lw=1,
            label="gateways' s2s_active_sessions")
    ref = [e for e in events if e["kind"] == "refusal"]
    if ref:
        ax.plot([e["t"] for e in ref], [0.5] * len(ref), "rx", ms=8, label="refused")
    ax.set_ylabel("sessions")
    ax.legend(loc="upper right", fontsize=8)
    ax.set_title("Autoscaling simulation: KEDA + HPA from deploy/k8s over real processes\n"
                 f"STT, LLM, TTS = TIMING STUBS (slowdown "
                 + ", ".join(f"{k} x{v:g}" for k, v in st["stub_slowdown"].items())
                 + f"); time compression x{st['time_compression']:g}, session scale "
                 f"{st['session_scale']}", fontsize=10)
    ax = axes[1]
    colors = {"gateway": "tab:gray", "vad": "tab:blue", "stt": "tab:green", "llm": "tab:red",
              "tts": "tab:purple"}
    for i, d in enumerate(DEPLOYMENTS):
        off = (i - 2) * 0.04
        ax.step(t, [s["deployments"][d]["replicas"] + off for s in samples], where="post",
                color=colors[d], lw=1.8, label=f"{d}{' (STUB)' if d in STUBBED else ''}")
    ax.set_ylabel("replicas")
    ax.legend(loc="upper right", fontsize=8, ncol=5)
    ax = axes[2]
    for d in DEPLOYMENTS:
        ax.plot(t, [s["deployments"][d]["metric"] / s["deployments"][d]["target"]
                    for s in samples], color=colors[d], lw=1, label=d)
    for d in STAGES:  # what a lag that Redis could count would have asked for
        ax.plot(t, [(s["deployments"][d]["metric"] - s["deployments"][d]["readings"].get("lag", 0)
                     + s["deployments"][d].get("waiting", 0)) / s["deployments"][d]["target"]
                    for s in samples], color=colors[d], lw=0.8, ls=":")
    ax.set_ylabel("KEDA metric / target\n(dotted: XLEN - pending\nfor the lag)")
    ax.legend(loc="upper right", fontsize=8, ncol=5)
    ax = axes[3]
    xs = [(x.answered_at, x.v2v_ms) for x in turns if x.answered and x.v2v_ms is not None]
    if xs:
        ax.plot([a for a, _ in xs], [b / 1000 for _, b in xs], ".", color="tab:blue", ms=3,
                label="turn voice-to-voice")
    ax.plot(t, [s["p95_ms"] / 1000 if s["p95_ms"] is not None else np.nan for s in samples],
            color="tab:orange", lw=1.5, label=f"p95 of the last {P95_WINDOW_S:.0f} s")
    bound = res["voice_to_voice_ms"]["bound"]
    if bound:
        ax.axhline(bound / 1000, color="r", ls=":", lw=1, label="p95 bound")
    drops = [x for x in turns if x.dropped]
    if drops:
        ax.plot([x.sent_at for x in drops], [0] * len(drops), "rv", label="dropped turn")
    ax.set_ylabel("seconds")
    ax.set_xlabel("time (s): one user alone (the baseline), then up, hold, down, idle")
    ax.legend(loc="upper right", fontsize=8)
    for ax in axes:
        ax.grid(alpha=0.3)
        r0 = st["ramp_at_s"] or 0.0
        for x0 in (r0, r0 + st["up_s"], r0 + st["up_s"] + st["hold_s"],
                   r0 + st["up_s"] + st["hold_s"] + st["down_s"]):
            ax.axvline(x0, color="k", lw=0.5, alpha=0.4)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


# --- CLI -------------------------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true",
                   help="the CI profile: ~3 minutes, 0 -> 16 sessions in 60 s, an HPA sync of "
                        "3 s, no baseline; the four stages must scale (the gateway stays at one "
                        "pod)")
    p.add_argument("--peak", type=int, help="sessions at the top of the ramp")
    p.add_argument("--up", type=float, help="seconds from 0 to --peak sessions")
    p.add_argument("--hold", type=float, help="seconds held at --peak")
    p.add_argument("--down", type=float, help="seconds from --peak back to 0")
    p.add_argument("--idle", type=float, help="at most this long idle after the ramp, waiting "
                                              "for every Deployment to reach its minimum")
    p.add_argument("--idle-min", type=float, default=0.0,
                   help="at least this long idle after the ramp")
    p.add_argument("--session-scale", type=int,
                   help="one simulated session stands for K users: VAD pods own 64/K, "
                        "gateways hold 200/K, the VAD and gateway KEDA targets are / K")
    p.add_argument("--compress", type=float,
                   help="divide every HPA stabilisation window and policy period by this")
    p.add_argument("--min-window", type=float,
                   help="a compressed stabilisation window is never shorter than this (nor "
                        "than its own length); default: 4 HPA syncs")
    p.add_argument("--sync", type=float, help="the HPA's sync period (s; Kubernetes: 15)")
    p.add_argument("--scrape", type=float,
                   help="Prometheus' scrape interval for the gateway's trigger (s)")
    p.add_argument("--slowdown", help="how much slower than the CPU figures each STUB stage "
                                      "is, e.g. stt=6,llm=6,tts=1")
    p.add_argument("--clip", type=float, help="cut the utterance after this many seconds (0: "
                                              "the whole file)")
    p.add_argument("--pause", type=float, help="seconds a user pauses after a reply")
    p.add_argument("--frame-ms", type=int,
                   help="audio per WebSocket message (the reference clients send 20 ms; more "
                        "costs this machine less and changes no count a scaler reads)")
    p.add_argument("--listen-frame-ms", type=int,
                   help="audio per message while a user listens (from 1 s after its speech "
                        "until it speaks again: silence)")
    p.add_argument("--wav", type=Path, default=WAV, help="what every user says")
    p.add_argument("--baseline-turns", type=int,
                   help="turns one user speaks alone before the ramp (the unloaded p95)")
    p.add_argument("--turn-timeout", type=float, default=60.0,
                   help="a turn with no reply after this long is dropped")
    p.add_argument("--p95-bound", type=float, default=0.0,
                   help="voice-to-voice p95 bound (s); 0: 1.5x the p95 before any scale-out")
    p.add_argument("--k8s", type=Path, default=K8S, help="the manifests to follow")
    p.add_argument("--lag-source", choices=("keda", "xlen"), default="keda",
                   help="keda: a lagCount trigger reads XINFO GROUPS' lag as KEDA does (NULL, "
                        "when Redis cannot count it, reads as 0); xlen: XLEN - pending instead "
                        "(what a lag Redis could always count would be: the bus deletes what "
                        "it acknowledges), to see the manifests with that fixed")
    p.add_argument("--expect", help="Deployments that must scale out under the ramp (the "
                                    "checks; default: all, --quick: the four stages)")
    p.add_argument("--start-timeout", type=float, default=180.0)
    p.add_argument("--progress", type=float, default=15.0, help="print a line every N s")
    p.add_argument("--json", type=Path, help="write the summary, samples, turns and events here")
    p.add_argument("--plot", type=Path, help="write the plot (PNG) here")
    p.add_argument("--logdir", type=Path, help="the processes' logs (default: a temp dir)")


def resolve(args: argparse.Namespace) -> argparse.Namespace:
    args.profile = "quick" if args.quick else "full"
    for key, value in PROFILES[args.profile].items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    return args


def main(args: argparse.Namespace) -> int:
    args = resolve(args)
    bench = Bench(args)
    res = asyncio.run(bench.run())
    print(format_summary(res))
    if args.json:
        args.json.write_text(json.dumps({
            "summary": res, "samples": bench.samples,
            "turns": [x.__dict__ for x in bench.turns], "events": bench.events}, indent=1))
        print(f"wrote {args.json}")
    if args.plot:
        plot(res, bench.samples, bench.turns, bench.events, args.plot)
        print(f"wrote {args.plot}")
    return 0 if res["ok"] else 1


def cli(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m s2s.bench.autoscale", description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return main(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(cli())
