"""Child processes that never outlive their parent."""

from __future__ import annotations

import ctypes
import os
import signal
import sys

PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """preexec_fn for children: own process group (Ctrl-C reaches only the parent,
    which then stops children in order) and SIGTERM when the parent dies, even by
    SIGKILL, so no orphan is ever left behind (Linux only; a no-op elsewhere)."""
    os.setsid()
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL("libc.so.6", use_errno=True)
            libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        except OSError:
            pass
