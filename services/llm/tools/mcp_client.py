"""MCP servers whose tools a deployment offers (``S2S_LLM_MCP_SERVERS``, separated by
``;``): ``stdio:COMMAND ARGS`` (the server runs as a subprocess of the worker) or a
streamable HTTP URL (``http://host:port/mcp``), through the official ``mcp`` SDK.

Each server's connection lives in a task of its own for the worker's lifetime (the SDK's
context managers must be entered and left in one task); calls reach it from any reply.
A tool is idempotent when the server says so (``idempotentHint``, or ``readOnlyHint``);
few-shot examples may come in the tool's ``_meta`` as ``"s2s/examples"``."""

from __future__ import annotations

import asyncio
import json
import logging
import shlex

from .spec import Tool, ToolError, as_text

log = logging.getLogger("s2s.llm.tools")
CONNECT_TIMEOUT_S = 30.0
EXAMPLES_META = "s2s/examples"


def specs(value: str) -> list[str]:
    return [s.strip() for s in value.split(";") if s.strip()]


class McpServer:
    def __init__(self, spec: str, call_timeout_s: float = 30.0):
        self.spec = spec
        self.call_timeout_s = call_timeout_s
        self.client = None
        self.tools: list[Tool] = []
        self._ready = asyncio.Event()
        self._stop = asyncio.Event()
        self._error: BaseException | None = None
        self._task: asyncio.Task | None = None

    def _target(self):
        from mcp import StdioServerParameters

        if self.spec.startswith("stdio:"):
            argv = shlex.split(self.spec[len("stdio:"):])
            if not argv:
                raise ToolError(f"MCP server {self.spec!r}: stdio: needs a command")
            return StdioServerParameters(command=argv[0], args=argv[1:])
        if self.spec.startswith(("http://", "https://")):
            return self.spec
        raise ToolError(f"MCP server {self.spec!r}: use stdio:COMMAND or an http(s) URL")

    async def start(self) -> list[Tool]:
        target = self._target()
        self._task = asyncio.create_task(self._serve(target), name=f"mcp {self.spec[:40]}")
        try:
            await asyncio.wait_for(self._ready.wait(), CONNECT_TIMEOUT_S)
        except asyncio.TimeoutError:
            await self.close()
            raise ToolError(f"MCP server {self.spec!r} did not answer in "
                            f"{CONNECT_TIMEOUT_S:.0f} s") from None
        if self._error is not None:
            raise ToolError(f"MCP server {self.spec!r}: {self._error}") from None
        return self.tools

    async def _serve(self, target) -> None:
        from mcp import Client

        try:
            async with Client(target, read_timeout_seconds=self.call_timeout_s) as client:
                self.client = client
                listed = await client.list_tools()
                self.tools = [self._tool(t) for t in listed.tools]
                self._ready.set()
                await self._stop.wait()
        except asyncio.CancelledError:
            raise
        except BaseException as e:  # an exception group from the SDK's task group, too
            self._error = e
            log.error("MCP server %s failed: %s", self.spec, e)
        finally:
            self.client = None
            self._ready.set()

    def _tool(self, t) -> Tool:
        hints = t.annotations
        idempotent = bool(hints and (hints.idempotent_hint or hints.read_only_hint))
        meta = t.meta or {}
        return Tool(name=t.name, description=t.description or "", parameters=t.input_schema,
                    idempotent=idempotent, run=self._runner(t.name), source="mcp",
                    examples=list(meta.get(EXAMPLES_META) or []))

    def _runner(self, name: str):
        async def run(arguments: dict) -> str:
            client = self.client
            if client is None:
                raise ToolError(f"MCP server {self.spec!r} is not connected")
            result = await client.call_tool(name, arguments)
            texts = [getattr(c, "text", "") for c in result.content]
            text = " ".join(t for t in texts if t)
            if result.is_error:
                raise ToolError(f"{name}: {text[:200]}")
            if not text and result.structured_content is not None:
                text = json.dumps(result.structured_content, ensure_ascii=False)
            return as_text(text)
        return run

    async def close(self) -> None:
        self._stop.set()
        if self._task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._task), 10)
            except (asyncio.TimeoutError, Exception):
                self._task.cancel()
