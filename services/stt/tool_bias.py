"""What the session's tools expect to hear, as whisper's previous-text prompt
(``stt_tool_bias``): whisper takes the words of its prompt as likelier, so "Convert
thirty degrees Celsius" is less often "thirty debris cells" when a tool's schema lists
"celsius".  Built from what the tools say of themselves (names, descriptions, the
string values their schemas enumerate), never from any request.

The deployment's tools are loaded here as the LLM stage loads them (the same settings,
services/llm/tools); a client's tools come with the session's prefs.  A bias that cannot
be built is no bias: the utterance is decoded as without it."""

from __future__ import annotations

import logging
import re

log = logging.getLogger("s2s.stt")
MAX_WORDS = 48        # ~64 tokens: whisper's prompt keeps the last PROMPT_TOKENS tokens
MAX_ENUM_VALUES = 24  # of all the tools' enums together: names to hear, not a catalogue


def undoubled(text: str) -> str:
    """The utterance once: prompted with words it does not hear, whisper (tiny.en, a short
    window) sometimes says the whole utterance twice ("What time is it in Tokyo? What time
    is it in Tokyo?")."""
    said = text.split()
    half = len(said) // 2
    plain = [re.sub(r"\W", "", w.lower()) for w in said]
    if half >= 2 and len(said) % 2 == 0 and plain[:half] == plain[half:]:
        return " ".join(said[:half])
    return text


def _enums(schema, found: list[str]) -> list[str]:
    if isinstance(schema, dict):
        for value in schema.get("enum", []) or []:
            if isinstance(value, str) and value not in found:
                found.append(value)
        for key, sub in schema.items():
            if key != "enum":
                _enums(sub, found)
    elif isinstance(schema, list):
        for sub in schema:
            _enums(sub, found)
    return found


def _sentence(text: str) -> str:
    first = re.split(r"(?<=[.!?])\s|\n", (text or "").strip(), maxsplit=1)[0]
    return re.sub(r"\s*\([^)]*\)", "", first).rstrip(".")  # asides are not said


def bias_text(tools) -> str:
    """The prompt for ``tools`` (``Tool``s): each tool as words with its description's
    first sentence, then the values its schema enumerates; the enumerated values come last,
    since a prompt too long for whisper is cut at its start."""
    if not tools:
        return ""
    said = [f"{t.name.replace('_', ' ').replace('-', ' ').capitalize()}: "
            f"{_sentence(t.description)}." if t.description else
            f"{t.name.replace('_', ' ').capitalize()}." for t in tools]
    values: list[str] = []
    for t in tools:
        _enums(t.parameters, values)
    text = " ".join(said)
    if values:
        text += " " + ", ".join(values[:MAX_ENUM_VALUES]) + "."
    words = text.split()
    return " ".join(words[-MAX_WORDS:])


class ToolBias:
    """The bias prompt of a session: the deployment's tools (loaded once, at the first
    utterance, in the worker's event loop) and the session's client tools."""

    def __init__(self, settings):
        from s2s.services.llm.tools import ToolRegistry

        self.registry = ToolRegistry(settings)
        self._texts: dict[str, str] = {}  # by the session's client tools (JSON)

    async def prompt(self, prefs: dict[str, str]) -> str:
        key = prefs.get("tools") or ""
        if key not in self._texts:
            try:
                if self.registry.configured:
                    await self.registry.start()
                tools = self.registry.for_session(prefs).offered()
            except Exception as e:  # tools that will not load: decode as before (the
                log.warning("no tool bias: the tools did not load (%s)", e)  # next try
                return ""                                                   # loads again)
            if len(self._texts) >= 256:
                self._texts.pop(next(iter(self._texts)))
            self._texts[key] = bias_text(tools)
        return self._texts[key]

    async def close(self) -> None:
        await self.registry.close()
