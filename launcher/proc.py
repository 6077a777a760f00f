"""Child processes that never outlive their parent."""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
from typing import Iterable

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


def stop_processes(procs: Iterable[subprocess.Popen], grace_s: float = 15.0) -> None:
    """SIGTERM every process still running, then wait for each up to ``grace_s`` (all of
    them drain at once), SIGKILLing one that outlasts it."""
    procs = list(procs)
    for p in procs:
        if p.poll() is None:
            p.terminate()
    for p in procs:
        try:
            p.wait(grace_s)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
