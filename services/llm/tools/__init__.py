"""Tools the LLM stage may call in the voice loop (docs/tools.md).

    registry = ToolRegistry(settings)     # the deployment's tools (settings.llm_tools,
    await registry.start()                # settings.llm_mcp_servers), loaded once per worker
    toolset = registry.for_session(prefs) # ... plus the session's client (Realtime) tools

``spec`` says what a tool is, ``sources`` and ``mcp_client`` load them, ``decide`` lets a
small model choose between speaking and one call (constrained decoding), ``calls`` runs
calls exactly as often as their idempotency allows, and ``turns`` is the voice side.
"""

from .registry import ToolRegistry, ToolSet
from .spec import Tool, ToolError

__all__ = ["Tool", "ToolError", "ToolRegistry", "ToolSet"]
