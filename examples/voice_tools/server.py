"""The example tools (tools.py) as an MCP server, with the official `mcp` SDK.

    python examples/voice_tools/server.py                  # stdio
    python examples/voice_tools/server.py --http 8765      # streamable HTTP at /mcp

Attach it to s2s (docs/tools.md):

    S2S_LLM_MCP_SERVERS="stdio:python examples/voice_tools/server.py" s2s up
    S2S_LLM_MCP_SERVERS="http://127.0.0.1:8765/mcp" s2s up
"""

from __future__ import annotations

import argparse
import functools
import os
import sys

from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp_types import ToolAnnotations

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import tools  # noqa: E402  (beside this file, whatever the working directory)



def told(fn):
    """A tool's ValueError is its answer to the user ("there is no order 999"), not a crash."""
    @functools.wraps(fn)
    def run(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except ValueError as e:
            raise ToolError(str(e)) from None
    return run


server = MCPServer("s2s-voice-tools")
for fn in tools.TOOLS:
    server.add_tool(told(fn), annotations=ToolAnnotations(read_only_hint=fn.__name__ in tools.READ_ONLY,
                                                    idempotent_hint=True),
                    meta={"s2s/examples": tools.EXAMPLES[fn.__name__]}, structured_output=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--http", type=int, metavar="PORT", help="serve streamable HTTP on PORT")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--slow", type=float, default=0.0,
                        help="seconds each order lookup takes (to hear the filler)")
    args = parser.parse_args()
    tools.SLOW_S = args.slow
    if args.http:
        server.run("streamable-http", host=args.host, port=args.http)
    else:
        server.run("stdio")


if __name__ == "__main__":
    main()
