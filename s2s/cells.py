"""Cells: several independent Redis instances behind the gateways (docs/scaling.md).

A *cell* is one Redis with its own workers of every stage. A gateway configured with
``S2S_REDIS_CELLS=a=redis://r1:6379,b=redis://r2:6379`` knows all cells and puts each new
session in one of them; everything of that session (its audio, its VAD owner, its
replies, its owner record, its failover lease) lives in that cell only.

Placement is written into the session id: ``<cell>.<random>`` ('.' never occurs in the
random part, so the split is unambiguous).  Any gateway therefore finds a resumed
session's cell from its id alone, with no lookup and no shared record, and adding a cell
later moves no live session (a session id names its cell; only new sessions can land in
the new one).  Removing or renaming a cell does orphan its sessions: keep names stable.
Tickets (``POST /auth/ticket``) carry their cell the same way.  An id with no known cell
prefix (sessions made before cells were configured) belongs to the first cell, the
"home" cell, which is therefore the old single Redis when a deployment grows into cells.

What is not per session (documented in docs/scaling.md):
- a principal's audio budget per minute lives in the principal's home cell, chosen by
  rendezvous hashing of the principal over the cell names (adding a cell moves a few
  principals' budgets: at most one minute's count is lost);
- a principal's session limit is the sum over the cells that answer;
- capacity (VAD workers × sessions per worker) and stage backlog are judged per cell, and
  a new session goes to the cell with the most room.

Without ``redis_cells`` there is one cell, ``redis_url``, and session ids carry no prefix:
exactly the single-Redis behaviour.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import re
from dataclasses import dataclass, field
from typing import Any

from s2s.config import Settings

NAME_RE = re.compile(r"^[a-z0-9]{1,16}$")
SEP = "."


@dataclass
class Cell:
    name: str
    url: str
    settings: Settings            # the gateway's settings with redis_url = this cell's
    bus: Any = None               # s2s.bus.Bus, made on the server's loop (start())
    failover: Any = None          # gateway.failover.Failover of this cell, when the app runs one
    up: bool = True               # its Redis answered the last admission tick
    info: dict = field(default_factory=dict)  # admission's picture: workers, backlog, live


def parse(spec: str) -> list[tuple[str, str]]:
    """``name=url,name=url`` (or bare URLs, named 0, 1, …) → [(name, url)]; SystemExit
    with the reason when malformed."""
    out: list[tuple[str, str]] = []
    for i, part in enumerate(p.strip() for p in spec.split(",")):
        if not part:
            continue
        name, url = part.split("=", 1) if "=" in part.split("://", 1)[0] else (str(i), part)
        name = name.strip().lower()
        if not NAME_RE.match(name):
            raise SystemExit(f"S2S_REDIS_CELLS: cell name {name!r} must match [a-z0-9]{{1,16}}")
        if not url.strip().startswith(("redis://", "rediss://", "unix://")):
            raise SystemExit(f"S2S_REDIS_CELLS: cell {name!r} has no redis:// URL: {url!r}")
        if name in (n for n, _ in out):
            raise SystemExit(f"S2S_REDIS_CELLS: cell name {name!r} given twice")
        out.append((name, url.strip()))
    if not out:
        raise SystemExit("S2S_REDIS_CELLS is set but names no cell")
    return out


class Cells:
    """The cells one gateway serves; the first is the home cell."""

    def __init__(self, settings: Settings):
        self.settings = settings
        if settings.redis_cells.strip():
            pairs = parse(settings.redis_cells)
            self.prefixed = True
        else:
            pairs = [("0", settings.redis_url)]  # empty: Bus() says so at start()
            self.prefixed = False  # one cell: session ids stay as they always were
        self.cells = [Cell(name, url, dataclasses.replace(settings, redis_url=url))
                      for name, url in pairs]
        self.by_name = {c.name: c for c in self.cells}

    @classmethod
    def of_bus(cls, bus: Any) -> "Cells":
        """One cell around an existing bus (tests, a bare Admission)."""
        cells = cls(bus.settings)
        cells.cells[0].bus = bus
        return cells

    def __iter__(self):
        return iter(self.cells)

    def __len__(self) -> int:
        return len(self.cells)

    @property
    def home(self) -> Cell:
        return self.cells[0]

    def start(self) -> None:
        from s2s.bus import Bus  # here: this module stays importable without redis

        for cell in self.cells:
            if cell.bus is None:
                cell.bus = Bus(cell.settings)

    async def close(self) -> None:
        await asyncio.gather(*(c.bus.close() for c in self.cells if c.bus is not None),
                             return_exceptions=True)

    # --- placement -------------------------------------------------------------------
    def of(self, key: str | None) -> Cell:
        """The cell of a session id or ticket: its prefix; the home cell when it has none
        (or names no cell of ours)."""
        if self.prefixed and key and SEP in key:
            cell = self.by_name.get(key.split(SEP, 1)[0])
            if cell is not None:
                return cell
        return self.home

    def owns(self, cell: Cell, key: str) -> bool:
        return self.of(key) is cell

    def name(self, cell: Cell, token: str) -> str:
        """A new session id or ticket in ``cell``."""
        return f"{cell.name}{SEP}{token}" if self.prefixed else token

    def principal_cell(self, principal: str) -> Cell:
        """The principal's home cell, for its per-minute audio budget: rendezvous hashing,
        so adding a cell moves only the principals that now hash highest on it."""
        if len(self.cells) == 1:
            return self.home
        return max(self.cells, key=lambda c: hashlib.sha256(
            f"{c.name}\0{principal}".encode()).digest())

    def choose(self, recent: dict[str, int] | None = None) -> Cell:
        """Where a new session goes: among the cells whose Redis answered last, the one
        with the most free room (capacity − live sessions, from admission's picture,
        plus ``recent`` placements not counted there yet); a cell with no known capacity
        counts as having room; ties go to fewer sessions, then to the earlier cell."""
        up = [c for c in self.cells if c.up] or self.cells
        recent = recent or {}

        def room(c: Cell) -> tuple[float, float]:
            cap, live = c.info.get("capacity"), c.info.get("live", 0) + recent.get(c.name, 0)
            free = (cap - live) / cap if cap else 1.0
            return (free, -live)

        return max(up, key=room)

    # --- views over every cell ----------------------------------------------------------
    async def live_workers(self, max_age_s: float = 5.0) -> dict[str, list[dict]]:
        """Live workers of every cell that answers (each tagged with its cell), for /sd
        and /healthz; raises only when no cell answers."""
        results = await asyncio.gather(*(asyncio.wait_for(c.bus.live_workers(max_age_s), 2)
                                         for c in self.cells), return_exceptions=True)
        merged: dict[str, list[dict]] = {}
        errors = []
        for cell, got in zip(self.cells, results):
            if isinstance(got, BaseException):
                errors.append(got)
                continue
            for stage, ws in got.items():
                merged.setdefault(stage, []).extend(
                    {**w, "cell": cell.name} if self.prefixed else w for w in ws)
        if len(errors) == len(self.cells):
            raise errors[0]
        return merged
