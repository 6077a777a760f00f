"""What a client session works with, handed to it by the app (``create_app``) rather
than looked up in the ASGI scope: the settings, the home cell's bus, the authenticator,
admission control and the per-principal slots, the cells and their failover loops, and
the gateway's registry of open sessions."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from s2s.bus import Bus
from s2s.config import Settings

from .auth import Authenticator
from .slots import Slots

if TYPE_CHECKING:
    from s2s.cells import Cells

    from .admission import Admission
    from .failover import Failover


@dataclass
class GatewayContext:
    settings: Settings
    bus: Bus                                  # the home cell's
    auth: Authenticator
    sessions: dict[str, Any]                  # this gateway's open sessions, by sid
    slots: Slots
    admission: "Admission | None" = None
    cells: "Cells | None" = None
    failover: "Failover | None" = None        # the home cell's failover loop

    def cell(self, key: str | None) -> tuple[Bus, "Failover | None"]:
        """The bus and failover loop of the cell a session id (or ticket) names."""
        if self.cells is None or key is None:
            return self.bus, self.failover
        cell = self.cells.of(key)
        return cell.bus, cell.failover
