"""How a run stops on a signal: Ctrl-C (SIGINT) and SIGTERM end it the same way.

``timeout``, systemd and batch schedulers stop a job with SIGTERM. Python's default is to die on
the spot, and ``ray.init`` replaces it with ``sys.exit`` from wherever the main thread is, which
ends in Ray's shutdown stack dump and exit 134. Raising :class:`Terminated`, a KeyboardInterrupt,
unwinds through Flower's and Ray's ``except Exception`` exactly as Ctrl-C does, so the CLI prints
its one line with the resume command and exits 143.

A module of its own (not ``fedrep.cli``): under ``python -m fedrep.cli`` the CLI module is
``__main__``, and a class defined there would not be the class other modules raise.
"""

from __future__ import annotations

import signal
import threading
from typing import Any


class Terminated(KeyboardInterrupt):
    """SIGTERM arrived."""


def on_sigterm(signum: int, frame: Any) -> None:
    raise Terminated


def stop_on_sigterm() -> None:
    """Make SIGTERM raise :class:`Terminated` (main thread only; signals go there)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, on_sigterm)
