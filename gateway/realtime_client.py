"""Realtime client events -> the native session (docs/realtime.md, "Client events").

Each handler takes the connection's ``RealtimeSocket`` (``rt``), the event and its
``event_id``; what it asks of the native session it queues as native messages
(``rt.to_native``) or audio (``rt.to_native_audio``), and it answers with Realtime events.

Every path that brings audio in holds at most ``MAX_AUDIO_S`` of it (a push-to-talk
buffer, audio items, the audio waiting to be paced into the session), and typed turns
and cancels are charged to the connection's typed-message bucket before anything reaches
the session, so a refused ``response.create`` leaves its typed items pending."""

from __future__ import annotations

import base64
import binascii
import uuid
from typing import Any, Awaitable, Callable

import numpy as np

from s2s.audio import StreamResampler

from . import g711, realtime_tools
from .limits import MAX_AUDIO_S
from .messages import MAX_TEXT_CHARS
from .realtime_events import NATIVE_SR, UnsupportedConfig, user_text_item

MIN_COMMIT_S = 0.1
MAX_ID_CHARS = 64           # a client's item id comes back in later events: kept short
MAX_AUDIO_BYTES = int(MAX_AUDIO_S * NATIVE_SR) * 2


def new_item_id() -> str:
    return "item_" + uuid.uuid4().hex[:20]


def resampled(resampler: StreamResampler, pcm: bytes) -> bytes:
    return np.asarray(resampler(np.frombuffer(pcm, "<i2")), "<i2").tobytes()


def to_native_pcm(rt: Any, audio: bytes) -> bytes:
    """Client audio in the session's input format -> 16-bit PCM at NATIVE_SR."""
    fmt = rt.config.input_format
    if fmt == "audio/pcm":
        return audio[: len(audio) // 2 * 2]
    pcm = g711.decode(audio, "ulaw" if fmt == "audio/pcmu" else "alaw")
    if rt.in_resampler is None:
        rt.in_resampler = StreamResampler(8000, NATIVE_SR, dtype="int16")
    return resampled(rt.in_resampler, pcm)


def trail_silence(rt: Any) -> bytes:
    """Silence after speech that lets the VAD end the utterance at once."""
    trail_ms = rt.settings.vad_min_silence_ms + rt.settings.vad_speech_pad_ms + 200
    return bytes(int(NATIVE_SR * trail_ms / 1000) * 2)


async def session_update(rt: Any, event: dict, eid: str | None) -> None:
    session = event.get("session")
    if not isinstance(session, dict):
        raise UnsupportedConfig("invalid_value", "session must be an object", eid, "session")
    old, rt.config = rt.config, rt.config.updated(session, eid)
    configure: dict = {}
    if rt.config.instructions != old.instructions:
        configure["instructions"] = rt.config.instructions
    vad = rt.config.vad_settings()
    if vad and vad != old.vad_settings():
        configure["vad"] = vad
    if (rt.config.tools, rt.config.tool_choice) != (old.tools, old.tool_choice):
        configure.update(realtime_tools.native_configure(rt.config))
    if configure:  # the native session applies them (the LLM's prompt, the VAD)
        rt.to_native({"type": "configure", **configure})
    await rt.emit("session.updated", session=rt.config.describe(rt.sid))


async def _held(rt: Any, pcm: bytes, eid: str | None) -> bool:
    """Add audio to the push-to-talk buffer, unless that would pass the audio cap."""
    if len(rt.ptt) + len(pcm) > MAX_AUDIO_BYTES:
        await rt.error("buffer_too_large", f"more than {MAX_AUDIO_S:.0f} s of audio without "
                       "a commit", eid)
        return False
    rt.ptt += pcm
    return True


async def append(rt: Any, event: dict, eid: str | None) -> None:
    audio = event.get("audio")
    try:
        raw = base64.b64decode(audio, validate=True) if isinstance(audio, str) else None
    except (binascii.Error, ValueError):
        raw = None
    if raw is None:
        await rt.error("invalid_value", "audio must be base64-encoded audio", eid, "audio")
        return
    if rt.config.input_format == "audio/pcm" and len(raw) % 2:
        await rt.error("invalid_value", "audio/pcm must be 16-bit samples (an even number of "
                       "bytes)", eid, "audio")
        return
    pcm = to_native_pcm(rt, raw)
    if rt.config.turn_detection is None:
        if await _held(rt, pcm, eid):
            rt.audio_in_s += len(pcm) / 2 / NATIVE_SR
        return
    rt.audio_in_s += len(pcm) / 2 / NATIVE_SR
    rt.to_native_audio(pcm)


async def commit(rt: Any, event: dict, eid: str | None) -> None:
    item_id = new_item_id()
    if rt.config.turn_detection is None:
        if len(rt.ptt) < MIN_COMMIT_S * NATIVE_SR * 2:
            await rt.error("input_audio_buffer_commit_empty", "buffer too small: commit needs "
                           "at least 100 ms of audio", eid)
            return
        pcm, rt.ptt = bytes(rt.ptt), bytearray()
        rt.to_native_audio(pcm + trail_silence(rt))
    else:  # server VAD: silence ends the user's speech now
        rt.to_native_audio(trail_silence(rt))
    await rt.emit("input_audio_buffer.committed", item_id=item_id,
                  previous_item_id=rt.last_item or None)
    rt.mark_committed(item_id)
    rt.next_user_item = item_id


async def clear(rt: Any, event: dict, eid: str | None) -> None:
    rt.ptt = bytearray()
    await rt.emit("input_audio_buffer.cleared")


async def item_create(rt: Any, event: dict, eid: str | None) -> None:
    item = event.get("item")
    if not isinstance(item, dict):
        await rt.error("invalid_value", "item must be an object", eid, "item")
        return
    if item.get("type") == "function_call_output":
        await realtime_tools.call_output(rt, item, eid)
        return
    if item.get("type", "message") != "message" or item.get("role") != "user":
        await rt.error("unsupported_item", "only user messages and function_call_output "
                       "items can be added (no system, assistant or function_call items)",
                       eid, "item.type")
        return
    texts, audio = [], b""
    for part in item.get("content") or []:
        if not isinstance(part, dict):
            continue
        if part.get("type") in ("input_text", "text") and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif part.get("type") == "input_audio" and isinstance(part.get("audio"), str):
            try:
                audio += base64.b64decode(part["audio"], validate=True)
            except (binascii.Error, ValueError):
                await rt.error("invalid_value", "input_audio must be base64", eid,
                               "item.content")
                return
        else:
            await rt.error("unsupported_content", "content parts must be input_text or "
                           "input_audio", eid, "item.content")
            return
    text = " ".join(t.strip() for t in texts if t.strip())
    if not text and not audio:
        await rt.error("invalid_value", "the item has no text or audio", eid, "item.content")
        return
    item_id = item.get("id")
    item_id = new_item_id() if item_id is None else item_id
    if not isinstance(item_id, str) or not 0 < len(item_id) <= MAX_ID_CHARS:
        await rt.error("invalid_value", f"item.id must be a string of 1 to {MAX_ID_CHARS} "
                       "characters", eid, "item.id")
        return
    if text and len(" ".join(rt.texts_pending + [text])) > MAX_TEXT_CHARS:
        await rt.error("buffer_too_large", f"more than {MAX_TEXT_CHARS} characters of typed "
                       "text without a response.create", eid, "item.content")
        return
    if audio:  # an audio message: as if appended, committed at response.create
        pcm = to_native_pcm(rt, audio)
        if len(rt.ptt) + len(pcm) > MAX_AUDIO_BYTES:
            await rt.error("buffer_too_large", f"more than {MAX_AUDIO_S:.0f} s of audio "
                           "without a response.create", eid, "item.content")
            return
        rt.ptt += pcm
    full = user_text_item(item_id, text)
    await rt.emit("conversation.item.added", previous_item_id=rt.last_item or None, item=full)
    await rt.emit("conversation.item.done", previous_item_id=rt.last_item or None, item=full)
    rt.last_item = item_id
    if text:
        rt.texts_pending.append(text)


async def response_create(rt: Any, event: dict, eid: str | None) -> None:
    overrides = event.get("response")
    if isinstance(overrides, dict) and ("tools" in overrides or "tool_choice" in overrides):
        await rt.error("unsupported_value", "per-response tools and tool_choice are not "
                       "served: set them with session.update", eid, "response.tools")
        return
    if rt.tool_outputs:  # the client's results (and any typed text): one turn answers them
        if not rt.typed.take():
            await _rate_limited(rt, "response.create", eid)
            return  # the outputs stay pending: a later response.create sends them
        outputs, rt.tool_outputs = rt.tool_outputs, []
        text, rt.texts_pending = " ".join(rt.texts_pending), []
        rt.to_native({"type": "tool_output", "outputs": outputs, "text": text})
        return
    if rt.texts_pending:
        if not rt.typed.take():
            await _rate_limited(rt, "response.create", eid)
            return  # the typed items stay pending: a later response.create answers them
        text, rt.texts_pending = " ".join(rt.texts_pending), []
        rt.text_turns += 1
        rt.to_native({"type": "text", "text": text})
    elif rt.ptt:
        await commit(rt, event, eid)
    # Audio turns are answered as soon as they are committed (by the server VAD or by
    # input_audio_buffer.commit): response.create then has nothing more to start.


async def response_cancel(rt: Any, event: dict, eid: str | None) -> None:
    if rt.response is None or rt.response.done:
        await rt.error("response_cancel_not_active", "there is no response in progress", eid)
        return
    if not rt.typed.take():
        await _rate_limited(rt, "response.cancel", eid)
        return
    rt.to_native({"type": "cancel"})


async def truncate(rt: Any, event: dict, eid: str | None) -> None:
    item_id, end_ms = event.get("item_id"), event.get("audio_end_ms")
    response = rt.responses.get(item_id) if isinstance(item_id, str) else None
    if response is None:
        await rt.error("item_not_found", f"no assistant item {str(item_id)[:40]!r}", eid,
                       "item_id")
        return
    if isinstance(end_ms, bool) or not isinstance(end_ms, int) or end_ms < 0:
        await rt.error("invalid_value", "audio_end_ms must be a non-negative integer", eid,
                       "audio_end_ms")
        return
    rt.to_native({"type": "truncate", "turn": response.turn,
                  "text": response.heard_text(end_ms / 1000)})
    await rt.emit("conversation.item.truncated", item_id=item_id,
                  content_index=event.get("content_index", 0), audio_end_ms=end_ms)


async def output_clear(rt: Any, event: dict, eid: str | None) -> None:
    if rt.response is not None and not rt.response.done:
        if not rt.typed.take():
            await _rate_limited(rt, "output_audio_buffer.clear", eid)
            return
        rt.to_native({"type": "cancel"})
    await rt.emit("output_audio_buffer.cleared", response_id=getattr(rt.response, "id", None))


async def _rate_limited(rt: Any, what: str, eid: str | None) -> None:
    await rt.error("rate_limited", f"more than {rt.settings.max_typed_rate:g} typed turns and "
                   f"cancels per second: {what} refused", eid)


Handler = Callable[[Any, dict, "str | None"], Awaitable[None]]
CLIENT_EVENTS: dict[str, Handler] = {
    "session.update": session_update,
    "input_audio_buffer.append": append,
    "input_audio_buffer.commit": commit,
    "input_audio_buffer.clear": clear,
    "conversation.item.create": item_create,
    "response.create": response_create,
    "response.cancel": response_cancel,
    "conversation.item.truncate": truncate,
    "output_audio_buffer.clear": output_clear,
}
