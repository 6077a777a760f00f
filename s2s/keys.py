"""Redis key names. Keys of one session share the hash tag ``{sid}`` so they can
live on one Redis Cluster slot."""

SESSIONS = "s2s:vad:sessions"  # group "vad": one entry per open session
DEAD = "s2s:dead"              # dead letters: entries that kept killing the workers taking them
WORKERS = "s2s:workers"        # sorted set: member "stage|worker_id|metrics_url", score heartbeat
LIVE = "s2s:live"              # sorted set: open client sessions (all gateways), score refresh time
STAGE_STREAMS = {"stt": "s2s:stt", "llm": "s2s:llm", "tts": "s2s:tts", "vad": SESSIONS}


def stage_stream(stage: str) -> str:
    """The shared input stream of a stage (custom stages get ``s2s:<name>``)."""
    return STAGE_STREAMS.get(stage, f"s2s:{stage}")


def audio(sid: str) -> str:
    return f"s2s:audio:{{{sid}}}"


def out(sid: str) -> str:
    return f"s2s:out:{{{sid}}}"


def turn(sid: str) -> str:
    return f"s2s:turn:{{{sid}}}"


def ctx(sid: str) -> str:
    return f"s2s:ctx:{{{sid}}}"


def vad_pos(sid: str) -> str:
    """Last audio entry id the session's VAD owner has processed (for takeover)."""
    return f"s2s:vadpos:{{{sid}}}"


def vad_state(sid: str) -> str:
    """JSON snapshot of the session stage's state at ``vad_pos`` (for takeover), written
    together with it (one MULTI) and deleted when the session ends."""
    return f"s2s:vadstate:{{{sid}}}"


def owner(sid: str) -> str:
    """The principal that opened the session: only it may resume it."""
    return f"s2s:owner:{{{sid}}}"


def principal_sessions(principal: str) -> str:
    """Sorted set of a principal's open sessions (score: last refresh)."""
    return f"s2s:psess:{principal}"


def principal_audio(principal: str, minute: int) -> str:
    """Seconds of audio a principal sent in one wall-clock minute."""
    return f"s2s:paudio:{principal}:{minute}"


def ticket(digest: str) -> str:
    """A one-time WebSocket ticket (by its hash), holding the principal's JSON."""
    return f"s2s:ticket:{digest}"


def prefs(sid: str) -> str:
    """Hash of what the client asked for: ``instructions`` (the session's system prompt),
    ``heard:<turn>`` (what the user heard of that turn's reply: the history keeps that)."""
    return f"s2s:prefs:{{{sid}}}"


def stage_state(sid: str, stage: str) -> str:
    """A shared stage's small per-session value (STT: the thought heard so far), so the
    next turn may go to any worker of that stage.  Written with the session TTL and
    refreshed with every turn, it expires on its own (not in ``session_keys``: only that
    stage's ACL user may touch it)."""
    return f"s2s:stage:{{{sid}}}:{stage}"


def session_keys(sid: str) -> list[str]:
    return [audio(sid), out(sid), turn(sid), ctx(sid), vad_pos(sid), vad_state(sid), owner(sid),
            prefs(sid), session_gateway(sid)]


# --- gateways (failover) ---------------------------------------------------------------
GATEWAYS = "s2s:gateways"  # sorted set: member gateway id, score = when its lease lapses


def session_gateway(sid: str) -> str:
    """Hash of the session's owning gateway: ``gw`` (its id; "" once the session was
    ended) and ``open`` (the id of the session's entry in ``s2s:vad:sessions``)."""
    return f"s2s:gw:{{{sid}}}"


def gateway_sessions(gateway_id: str) -> str:
    """Set of the session ids a gateway holds (so a live gateway can release them
    once that gateway's lease lapses)."""
    return f"s2s:gwsessions:{gateway_id}"
