"""The command mix of bench/redis_capacity.py's load: what one speaking session, and each
process of the fleet around it, sends Redis, by command name and rate, and the profile
of the real stack it is checked against.

The profile (``PROFILE``) is ``INFO commandstats`` of a real stack (the real gateway and
VAD worker; STT, LLM and TTS the timing stubs of ``s2s.bench.stub_stages``) while one
session speaks tests/data/jfk.wav in 20 ms messages and hears the reply: the commands
beyond the idle stack's, per command, per session-second (``measure_profile`` makes it
again; ``python -m s2s.bench.control_plane --profile --message-ms 20 --sessions ""`` prints
the same window's totals).  Its 19.2 s window is one "cycle" of the model: ~11 s of
speech cut into 5 utterances (5 turn changes), 4 transcripts, 4 reply sentences, 8 reply
audio chunks, and ~8 s of listening.

The model (``Model``) says where each command comes from, so that the C load
(bench/redis_load.c) sends the same commands from the same kind of process, and so that
its rate can be told for a fleet of any size: per session (the audio, the fenced VAD
writes, the failover touch, ...), per process and only while it has work (a VAD worker's
keep-alive of all its sessions, a gateway's heartbeat listing its sessions, the
multiplexed reads), and per process at all times (heartbeats, claims: the idle stack's
share, which the profile subtracts).  ``rates(model, fleet)`` is the whole fleet's
commands per second; ``per_session_beyond_idle(model)`` is what the profile measured."""

from __future__ import annotations

import math
from dataclasses import dataclass

# Commands per speaking session-second beyond the idle stack (87 commands/s), by command
# (Lua scripts' inner calls counted, as commandstats counts them).  Measured on the
# reference machine (2 cores, load average ~1-5) with ``measure_profile``: a 20 s idle
# baseline, per command, then the 19.1 s window.  Other runs of the same profile gave
# 117.5 and 119.1 commands in all (a turn split differently by the VAD): ~10 % between runs.
PROFILE = {
    "xadd": 51.97, "xread": 24.44, "set": 9.56, "evalsha": 9.08, "xpending": 8.36,
    "expire": 7.83, "get": 3.71, "xclaim": 2.51, "hget": 2.04, "eval": 2.04, "sadd": 2.04,
    "zadd": 1.96, "memory|usage": 1.88, "client|setinfo": 0.73, "xack": 0.68, "xdel": 0.68,
    "ping": 0.57, "mget": 0.47, "xreadgroup": 0.41, "hello": 0.37, "xtrim": 0.26,
    "publish": 0.26, "incr": 0.26, "script|load": 0.26, "hgetall": 0.21, "subscribe": 0.16,
    "hset": 0.1, "client|id": 0.1, "xrevrange": 0.05,
}
PROFILE_WINDOW_S = 19.15
# Commands of a session's opening and of new pooled connections (handshakes, script
# loads, the owner record): a one-off per session, spread over the profile's short window
# (2.5 commands a second there); a long session amortises them, so the load leaves them out.
SETUP_COMMANDS = {"client|setinfo", "ping", "hello", "script|load", "subscribe", "hset",
                  "client|id", "xrevrange"}


@dataclass
class Model:
    """Rates of the control plane (the code's constants, cited where they live)."""
    frame_s: float = 0.02            # the client's audio messages (the web client's 20 ms)
    cycle_s: float = PROFILE_WINDOW_S
    # per cycle, from the profile's MONITOR trace
    utterances: int = 5              # VAD -> s2s:stt (EMIT_IF_OWNER), one turn change each
    speech_emits: int = 13           # VAD -> s2s:out (speech started/stopped, status)
    transcripts: int = 4             # STT -> s2s:llm + out
    texts: int = 4                   # LLM -> s2s:tts + out
    chunks: int = 8                  # TTS -> out
    trims: int = 5                   # the gateway's XTRIM of played output (a turn's start)
    vadpos_checks: int = 7           # the gateway's check_vad GET of the VAD's position
    # per session, per second
    save_every_s: float = 0.22       # SAVE_IF_OWNER: session_worker.SAVE_EVERY_S 0.2 s + a read
    touch_per_s: float = 2.0         # GATEWAY_TOUCH: failover, gateway_lease_s / 4
    register_per_s: float = 1.0      # admission.TICK_S: ZADD psess, EXPIRE x2
    bytes_every_s: float = 5.0       # admission.BYTES_EVERY_S: MEMORY USAGE per session key
    session_keys: int = 9            # keys.session_keys
    audio_ttl_every_s: float = 360.0  # bus_streams: a tenth of S2S_SESSION_TTL_S
    # the multiplexed reads (s2s/bus_reader.py)
    audio_gap_s: float = 0.04        # bus_sessions.AUDIO_GAP_S
    reader_own_s: float = 0.006      # the worker's own time per read (profile: 21.7 reads/s)
    out_block_s: float = 1.0         # gateway/output.py READ_BLOCK_MS
    # per process
    keepalive_per_s: float = 2.0     # worker._keep_alive: min(claim_idle_s/3, lease_s/2)
    heartbeat_per_s: float = 4.0     # S2S_HEARTBEAT_S 0.25
    claim_every_s: float = 1.5       # claim_idle_s / 2
    turn_check_per_s: float = 1.0    # turn_watch.CHECK_S (while work is in flight)
    gw_heartbeat_per_s: float = 2.0  # failover, gateway_lease_s / 4
    keda_every_s: float = 5.0        # deploy/k8s/keda.yaml pollingInterval (XLEN per stage)
    # how long a stage item is in flight (so its keep-alive and turn checks run): chosen
    # so that one session's keep-alives match the profile (STT 1, LLM 6, TTS 4 a cycle)
    hold_s: tuple = (0.1, 0.75, 0.5)
    # sizes (the project's codec encodes the frames; these are the payloads)
    utterance_kb: int = 70           # 11 s of speech in 5 utterances, 16 kHz int16
    chunk_kb: int = 62               # the stub reply's ~11 s of 22.05 kHz audio in 8 chunks


@dataclass
class Fleet:
    """How many processes serve ``sessions``: one gateway per ``per_gateway`` sessions,
    one VAD worker per ``per_vad``, one worker of each other stage per ``per_stage``."""
    sessions: int
    per_gateway: int = 500
    per_vad: int = 50
    per_stage: int = 100

    @property
    def gateways(self) -> int:
        return math.ceil(self.sessions / self.per_gateway) if self.sessions else 0

    @property
    def vads(self) -> int:
        return math.ceil(self.sessions / self.per_vad) if self.sessions else 0

    @property
    def stage_workers(self) -> int:  # of each of STT, LLM and TTS
        return math.ceil(self.sessions / self.per_stage) if self.sessions else 0


def _add(out: dict, rate: float, **cmds: float) -> None:
    for cmd, n in cmds.items():
        out[cmd.replace("_", "|")] = out.get(cmd.replace("_", "|"), 0.0) + rate * n


def rates(m: Model, fleet: Fleet, idle: bool = True) -> dict[str, float]:
    """Commands per second the whole fleet sends (``idle``: with what its processes send
    with no session at all)."""
    n, cyc = fleet.sessions, m.cycle_s
    out: dict[str, float] = {}
    if n == 0:
        return out
    # --- per session: the gateway
    _add(out, n / m.frame_s, xadd=1)                              # Audio
    _add(out, n / m.audio_ttl_every_s, expire=1)                  # its TTL, now and then
    _add(out, n * m.touch_per_s, eval=1, hget=1, expire=1, get=1)  # GATEWAY_TOUCH (EVAL)
    _add(out, n * m.register_per_s, zadd=1, expire=2)             # psess, its TTL, owner's
    _add(out, n * m.session_keys / m.bytes_every_s, memory_usage=1)
    _add(out, n * m.trims / cyc, xtrim=1)
    _add(out, n * m.vadpos_checks / cyc, get=1)
    # --- per session: its VAD owner (fenced: each script's XPENDING checks the owner)
    _add(out, n / m.save_every_s, evalsha=1, xpending=1, set=2)
    _add(out, n * m.speech_emits / cyc, evalsha=1, xpending=1, xadd=1, expire=1)
    _add(out, n * m.utterances / cyc, evalsha=1, xpending=1, xadd=1)        # -> s2s:stt
    _add(out, n * m.utterances / cyc, evalsha=1, xpending=1, incr=1, expire=1, publish=1)
    # --- per session: the stages' items (read, in flight, written, ACK_DEL)
    tpi, cpt = m.texts / m.transcripts, m.chunks / m.texts
    _add(out, n * m.utterances / cyc, get=2, set=1, evalsha=1, xack=1, xdel=1)  # STT
    _add(out, n * m.transcripts / cyc, xadd=2, expire=1)
    _add(out, n * m.transcripts / cyc, get=2, hgetall=1, set=2, evalsha=1, xack=1, xdel=1,
         xadd=2 * tpi, expire=tpi)                                             # LLM
    _add(out, n * m.texts / cyc, get=1, evalsha=1, xack=1, xdel=1,
         xadd=cpt, expire=cpt)                                                 # TTS
    items = [n * m.utterances / cyc, n * m.transcripts / cyc, n * m.texts / cyc]
    # each read that finds work is one XREADGROUP (at most one per item)
    _add(out, sum(items), xreadgroup=1)
    # stage keep-alives and turn checks: per worker, while it holds items
    for per_s, hold in zip(items, m.hold_s):
        workers = fleet.stage_workers
        held = per_s * hold                                  # items in flight (Little)
        busy = workers * (1 - math.exp(-held / workers))     # workers holding any
        _add(out, busy * m.keepalive_per_s, evalsha=1, xclaim=1)
        _add(out, held * m.keepalive_per_s, xpending=1)
        _add(out, busy * m.turn_check_per_s, mget=1)
    # --- per process, while it has sessions
    _add(out, fleet.vads * m.keepalive_per_s, evalsha=1, xclaim=1)
    _add(out, n * m.keepalive_per_s, xpending=1)           # one per owned session
    _add(out, fleet.gateways * m.gw_heartbeat_per_s, sadd=1, expire=1)
    _add(out, fleet.gateways * m.register_per_s, zadd=1)   # ZADD s2s:live, all its sids
    # the multiplexed reads: a VAD worker reads all its audio streams every gap (+ its
    # own time); a gateway's output read returns at each write of new output (a stage
    # item's outputs are written together; writes within a read's turnaround come in one
    # read) or after its 1 s block.  Both depend on timing: an estimate, not a count.
    _add(out, fleet.vads / (m.audio_gap_s + m.reader_own_s), xread=1)
    wakes = n * (m.speech_emits + m.transcripts + 2 * m.texts) / cyc / fleet.gateways
    _add(out, fleet.gateways * (wakes / (1 + wakes * m.reader_own_s)
                                + math.exp(-wakes * m.out_block_s) / m.out_block_s), xread=1)
    if idle:  # what the processes send with no session (the idle stack's 87 a second)
        workers = fleet.vads + 3 * fleet.stage_workers
        _add(out, workers * m.heartbeat_per_s, evalsha=1, zadd=1, zremrangebyscore=1,
             zrangebyscore=1)
        _add(out, workers / m.claim_every_s, xautoclaim=1)
        _add(out, fleet.vads * 2, xreadgroup=1)  # the VAD's read of new sessions (500 ms)
        _add(out, fleet.gateways * m.gw_heartbeat_per_s, zadd=1)  # its lease
        _add(out, fleet.gateways * 1.0, zcount=1, xinfo_groups=3, xrange=3, zrangebyscore=1)
        _add(out, 4 / m.keda_every_s, xlen=1)
    return out


def per_session_beyond_idle(m: Model) -> dict[str, float]:
    """One session on a fleet of one process per kind, beyond the idle stack: what
    ``PROFILE`` measured."""
    return rates(m, Fleet(1, 1, 1, 1), idle=False)


def compare(model: dict[str, float], profile: dict[str, float] = PROFILE) -> list[tuple]:
    """(command, profile, model, model/profile) per command, the profile's order; the
    setup commands (``SETUP_COMMANDS``) last, marked."""
    rows = []
    for cmd in sorted(set(profile) | set(model), key=lambda c: -profile.get(c, model.get(c, 0))):
        p, q = profile.get(cmd, 0.0), model.get(cmd, 0.0)
        rows.append((cmd, p, q, q / p if p else float("inf"), cmd in SETUP_COMMANDS))
    return sorted(rows, key=lambda r: r[4])


def format_comparison(rows: list[tuple], extra: dict[str, dict[str, float]] | None = None
                      ) -> str:
    """The comparison as a table; ``extra``: more columns (title -> rates by command)."""
    extra = extra or {}
    head = f"{'command':<15} {'profile':>8} {'model':>8} {'ratio':>6}" + "".join(
        f" {t:>16}" for t in extra)
    lines = [head]
    tp = tm = 0.0
    for cmd, p, q, ratio, setup in rows:
        tp += p
        tm += q
        r = f"{ratio:6.2f}" if ratio != float("inf") else "     -"
        lines.append(f"{cmd:<15} {p:8.2f} {q:8.2f} {r}" + "".join(
            f" {col.get(cmd, 0.0):16.2f}" for col in extra.values())
            + ("   (session setup: not modelled)" if setup else ""))
    lines.append(f"{'all':<15} {tp:8.1f} {tm:8.1f} {tm / tp:6.2f}" + "".join(
        f" {sum(col.values()):16.1f}" for col in extra.values()))
    return "\n".join(lines)


async def measure_profile(idle_s: float = 20.0, out=print) -> dict[str, float]:
    """The profile again, on this machine: a real stack (control_plane.Stack: real
    gateway and VAD, timing stubs for the rest), ``idle_s`` of idle baseline per command,
    then one session speaking jfk.wav in 20 ms messages.  Commands per session-second
    beyond the idle stack, by command."""
    import asyncio
    import tempfile
    import time
    from pathlib import Path

    import numpy as np
    import redis.asyncio as aredis

    from s2s.audio import read_audio

    from . import control_plane as cp

    stack = cp.Stack(1, Path(tempfile.mkdtemp(prefix="s2s-profile-"))).start()
    try:
        await stack.ready()
        r = aredis.Redis.from_url(stack.redis_url)
        try:
            await asyncio.sleep(3)
            before, t0 = await cp.commandstats(r), time.monotonic()
            await asyncio.sleep(idle_s)
            idle_w = time.monotonic() - t0
            idle = cp.delta(await cp.commandstats(r), before)
            speech = np.asarray(read_audio(str(cp.JFK), cp.SR), np.int16)
            sessions = cp.Sessions(stack.url, 1, speech, 0.02)
            before, t0 = await cp.commandstats(r), time.monotonic()
            await sessions.open()
            await asyncio.sleep(len(speech) / cp.SR + 8.0)
            window = time.monotonic() - t0
            busy = cp.delta(await cp.commandstats(r), before)
            await sessions.close()
        finally:
            await r.aclose()
    finally:
        stack.stop()
    rates_ = {cmd: round((calls - idle.get(cmd, (0, 0))[0] / idle_w * window) / window, 2)
              for cmd, (calls, _) in busy.items()}
    out(f"profile: {window:.1f} s, {sessions.replies} reply, "
        f"{sum(rates_.values()):.1f} commands per session-second beyond the idle stack")
    return {k: v for k, v in rates_.items() if abs(v) >= 0.005}
