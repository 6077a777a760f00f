"""Four example tools for a voice assistant: the time in a city, unit conversion, a
calculator and an order lookup (made-up orders).  Plain functions: server.py serves
them over MCP; S2S_LLM_TOOLS can also name them directly (examples.voice_tools.tools:TOOLS).
Results are short sentences: the assistant says them."""

from __future__ import annotations

import ast
import datetime as dt
import operator
import time
from typing import Annotated, Literal
from zoneinfo import ZoneInfo

from pydantic import Field

CITIES = {"tokyo": "Asia/Tokyo", "paris": "Europe/Paris", "london": "Europe/London",
          "new york": "America/New_York", "berlin": "Europe/Berlin", "sydney": "Australia/Sydney",
          "rome": "Europe/Rome", "madrid": "Europe/Madrid", "chicago": "America/Chicago",
          "los angeles": "America/Los_Angeles", "beijing": "Asia/Shanghai",
          "moscow": "Europe/Moscow", "dubai": "Asia/Dubai", "toronto": "America/Toronto",
          "mumbai": "Asia/Kolkata", "cairo": "Africa/Cairo", "mexico city": "America/Mexico_City",
          "seoul": "Asia/Seoul", "singapore": "Asia/Singapore", "lisbon": "Europe/Lisbon"}
ORDERS = {"4521": "shipped on Monday and arrives on Thursday",
          "77": "being packed and ships tomorrow",
          "1234": "delivered yesterday",
          "8810": "waiting for payment",
          "305": "cancelled, and the refund is on its way"}
# unit -> (dimension, factor to the base unit)
UNITS = {"meter": ("length", 1.0), "kilometer": ("length", 1000.0), "mile": ("length", 1609.344),
         "foot": ("length", 0.3048), "inch": ("length", 0.0254), "centimeter": ("length", 0.01),
         "yard": ("length", 0.9144), "gram": ("mass", 1.0), "kilogram": ("mass", 1000.0),
         "pound": ("mass", 453.59237), "ounce": ("mass", 28.349523), "liter": ("volume", 1.0),
         "milliliter": ("volume", 0.001), "gallon": ("volume", 3.785411), "cup": ("volume", 0.236588)}
ALIASES = {"km": "kilometer", "m": "meter", "mi": "mile", "ft": "foot", "feet": "foot",
           "in": "inch", "cm": "centimeter", "g": "gram", "kg": "kilogram", "lb": "pound",
           "lbs": "pound", "oz": "ounce", "l": "liter", "ml": "milliliter", "c": "celsius",
           "f": "fahrenheit", "metre": "meter", "kilometre": "kilometer", "litre": "liter",
           "degrees celsius": "celsius", "degrees fahrenheit": "fahrenheit"}
SLOW_S = 0.0  # tests make the order lookup slow to hear the filler


def _unit(name: str) -> str:
    u = name.strip().lower()
    u = ALIASES.get(u, u)
    if u.endswith("es") and u[:-2] in UNITS:
        u = u[:-2]
    elif u.endswith("s") and u[:-1] in UNITS | {"celsius": 0, "fahrenheit": 0}:
        u = u[:-1]
    if u == "feet":
        u = "foot"
    return u


def get_time(city: str) -> str:
    """The current local time in a city."""
    zone = CITIES.get(city.strip().lower())
    if zone is None:
        raise ValueError(f"I do not know the time zone of {city}")
    now = dt.datetime.now(ZoneInfo(zone))
    return f"It is {now.strftime('%H:%M')} in {city.strip().title()}."


# the units convert_units knows, as its schema's enum: a caller (a small model under a
# grammar) can only name one of them, and a speech recognizer can be told to expect them
Unit = Literal["meter", "kilometer", "centimeter", "mile", "yard", "foot", "inch", "gram",
               "kilogram", "pound", "ounce", "liter", "milliliter", "gallon", "cup", "celsius",
               "fahrenheit"]


def convert_units(value: float, from_unit: Unit, to_unit: Unit) -> str:
    """Convert a value from one unit to another (length, mass, volume, temperature)."""
    a, b = _unit(from_unit), _unit(to_unit)
    if {a, b} <= {"celsius", "fahrenheit"}:
        out = value if a == b else (value * 9 / 5 + 32 if a == "celsius" else (value - 32) * 5 / 9)
    elif a in UNITS and b in UNITS and UNITS[a][0] == UNITS[b][0]:
        out = value * UNITS[a][1] / UNITS[b][1]
    else:
        raise ValueError(f"cannot convert {from_unit} to {to_unit}")
    return f"{value:g} {from_unit} is {round(out, 2):g} {to_unit}."


_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
        ast.Div: operator.truediv, ast.Pow: operator.pow, ast.Mod: operator.mod,
        ast.USub: operator.neg, ast.UAdd: operator.pos}


# arithmetic only, as the schema's pattern: a caller under a grammar cannot write
# "20 * 100 = 200" or words
Expression = Annotated[str, Field(pattern=r"^[-(0-9][0-9.+*/%() -]*$")]


def calculate(expression: Expression) -> str:
    """Evaluate an arithmetic expression (numbers, + - * / % ** and parentheses)."""
    text = expression.replace("x", "*").replace("×", "*").replace("÷", "/").replace("^", "**")

    def ev(node):
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            right = ev(node.right)
            if isinstance(node.op, ast.Pow) and abs(right) > 100:
                raise ValueError("exponent too large")
            return _OPS[type(node.op)](ev(node.left), right)
        if isinstance(node, ast.UnaryOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](ev(node.operand))
        raise ValueError(f"not arithmetic: {expression}")

    result = ev(ast.parse(text, mode="eval"))
    return f"{expression} is {round(result, 4):g}."


def lookup_order(order_id: str) -> str:
    """The status of a customer's order, by its order number."""
    if SLOW_S:
        time.sleep(SLOW_S)
    key = "".join(ch for ch in order_id if ch.isalnum()).lstrip("0") or order_id
    status = ORDERS.get(key)
    if status is None:
        raise ValueError(f"there is no order {order_id}")
    return f"Order {key} is {status}."


EXAMPLES = {  # few-shot requests for a small model (not the eval's: bench/eval_set.py)
    "get_time": [{"request": "What time is it in Rome?", "arguments": {"city": "Rome"}},
                 {"request": "Tell me the current time in Berlin.",
                  "arguments": {"city": "Berlin"}}],
    "convert_units": [{"request": "How many ounces are in 2 liters?",
                       "arguments": {"value": 2, "from_unit": "liter", "to_unit": "ounce"}},
                      {"request": "Convert 10 kilograms to pounds.",
                       "arguments": {"value": 10, "from_unit": "kilogram", "to_unit": "pound"}}],
    "calculate": [{"request": "How much is 3 plus 4?", "arguments": {"expression": "3 + 4"}},
                  {"request": "What is 9 times 6?", "arguments": {"expression": "9 * 6"}}],
    "lookup_order": [{"request": "Has my order 55 arrived?", "arguments": {"order_id": "55"}},
                     {"request": "Check the status of order 612.",
                      "arguments": {"order_id": "612"}}],
}
READ_ONLY = {"get_time", "convert_units", "calculate", "lookup_order"}
TOOLS = [get_time, convert_units, calculate, lookup_order]
for _fn in TOOLS:  # what s2s's @tool would say, without importing s2s
    _fn.__s2s_tool__ = {"idempotent": _fn.__name__ in READ_ONLY,
                        "examples": EXAMPLES[_fn.__name__]}
