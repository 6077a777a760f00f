"""The tools of one reply: the deployment's (loaded once per worker: ``ToolRegistry``)
and the session's client tools (Realtime ``session.update`` ``tools``, kept in the
session's prefs as JSON), with the session's ``tool_choice``."""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass, field

from . import mcp_client, sources
from .spec import Tool, ToolError

log = logging.getLogger("s2s.llm.tools")
CHOICES = ("auto", "none", "required")


@dataclass
class ToolSet:
    tools: dict[str, Tool] = field(default_factory=dict)
    choice: str = "auto"   # auto, none, required, or the one tool's name

    def __bool__(self) -> bool:
        return bool(self.offered())

    def offered(self) -> list[Tool]:
        """The tools the model may call now."""
        if self.choice == "none":
            return []
        if self.choice in CHOICES:
            return list(self.tools.values())
        return [self.tools[self.choice]] if self.choice in self.tools else []

    @property
    def must_call(self) -> bool:
        return self.choice not in ("auto", "none")

    def openai_tools(self) -> list[dict]:
        return [t.openai() for t in self.tools.values()]

    def openai_choice(self) -> str | dict:
        if self.choice in CHOICES:
            return self.choice
        return {"type": "function", "function": {"name": self.choice}}


def client_tools(prefs: dict[str, str]) -> tuple[list[Tool], str]:
    """The session's client tools and tool_choice (validated by the gateway already;
    anything unreadable here counts as none)."""
    tools = []
    try:
        for t in json.loads(prefs.get("tools") or "[]"):
            tools.append(Tool(name=t["name"], description=t.get("description", ""),
                              parameters=t.get("parameters") or {}, run=None, source="client"))
    except (ValueError, TypeError, KeyError, ToolError) as e:
        log.warning("unreadable client tools ignored: %s", e)
        tools = []
    choice = prefs.get("tool_choice") or "auto"
    return tools, choice


class ToolRegistry:
    """The deployment's tools: Python callables and HTTP endpoints (``llm_tools``) and
    MCP servers (``llm_mcp_servers``).  ``start`` runs in the worker's event loop (MCP
    connections live there), at the first turn; a source that fails to load fails that
    turn (a stage error the client hears of) and is tried again at the next one."""

    def __init__(self, settings):
        self.settings = settings
        self.tools: dict[str, Tool] = {}
        self.servers: list[mcp_client.McpServer] = []
        self._started: asyncio.Task | None = None
        self._loop: asyncio.AbstractEventLoop | None = None  # where the connections live

    @property
    def configured(self) -> bool:
        s = self.settings
        return bool(sources.specs(s.llm_tools) or mcp_client.specs(s.llm_mcp_servers))

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        if self._loop is not loop:  # another event loop (a restarted runtime): connect anew
            self._started, self.tools, self.servers, self._loop = None, {}, [], loop
        failed = self._started is not None and self._started.done() and (
            self._started.cancelled() or self._started.exception() is not None)
        if self._started is None or failed:
            if failed:
                await self.close()
                self.tools, self.servers = {}, []
            self._started = asyncio.ensure_future(self._load())
        await asyncio.shield(self._started)

    async def _load(self) -> None:
        s = self.settings
        loaded: list[Tool] = []
        for spec in sources.specs(s.llm_tools):
            loaded += await sources.load(spec)
        for spec in mcp_client.specs(s.llm_mcp_servers):
            server = mcp_client.McpServer(spec, s.llm_tool_timeout_s)
            self.servers.append(server)
            loaded += await server.start()
        for t in loaded:
            if t.name in self.tools:
                raise ToolError(f"two tools are named {t.name!r}")
            self.tools[t.name] = t
        if loaded:
            log.info("tools: %s", ", ".join(f"{t.name} ({t.source}"
                                            f"{', idempotent' if t.idempotent else ''})"
                                            for t in loaded))

    def for_session(self, prefs: dict[str, str]) -> ToolSet:
        tools = dict(self.tools)
        mine, choice = client_tools(prefs)
        for t in mine:  # a session's own tool takes the name over for that session only
            tools[t.name] = t
        return ToolSet(tools, choice)

    async def close(self) -> None:
        for server in self.servers:
            await server.close()
