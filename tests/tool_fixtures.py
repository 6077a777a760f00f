"""Deployment tools for the tests (S2S_LLM_TOOLS=tests.tool_fixtures:TOOLS): each call
appends a line to $S2S_TEST_TOOL_LOG (so a test counts how often it really ran) and
takes $S2S_TEST_TOOL_SLEEP seconds."""

from __future__ import annotations

import os
import time

from s2s.services.llm.tools.spec import tool


def _ran(name: str, arg: str) -> None:
    path = os.environ.get("S2S_TEST_TOOL_LOG")
    if path:
        with open(path, "a") as f:
            f.write(f"{name} {arg}\n")
    time.sleep(float(os.environ.get("S2S_TEST_TOOL_SLEEP", "0")))


@tool(idempotent=False, examples=[{"request": "Order a pizza for me.",
                                   "arguments": {"item": "pizza"}}])
def place_order(item: str) -> str:
    """Place an order for an item (charges the customer)."""
    _ran("place_order", item)
    return f"Order placed for one {item}, number 5521."


@tool(idempotent=True, examples=[{"request": "Do you have umbrellas in stock?",
                                  "arguments": {"item": "umbrella"}}])
def check_stock(item: str) -> str:
    """How many of an item are in stock."""
    _ran("check_stock", item)
    return f"There are 17 {item} in stock."


def broken_lookup(item: str) -> str:
    """Look an item up in a catalogue that is down."""
    raise RuntimeError("the catalogue service is down")


TOOLS = [place_order, check_stock, broken_lookup]
