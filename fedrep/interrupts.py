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


class StopRequested(KeyboardInterrupt):
    """Raised in a simulated federation's server thread when its caller was interrupted."""


class InProcessStop:
    """Stop requests for a federation whose ServerApp runs in a thread of this process (Flower's
    Simulation Runtime). Ctrl-C reaches only the main thread; without this, the server thread
    would go on, finish the round in flight and write it to the run folder after the caller got
    KeyboardInterrupt, then wait an hour for replies from workers that are gone, keeping the
    interpreter from exiting. The round loop checks :meth:`requested` while it waits and before
    it writes a round; the simulation waits (:meth:`wait_idle`) until it has let go."""

    def __init__(self) -> None:
        self._requested = threading.Event()
        self._idle = threading.Event()
        self._idle.set()

    def reset(self) -> None:
        self._requested.clear()

    def request(self) -> None:
        self._requested.set()

    def requested(self) -> bool:
        return self._requested.is_set()

    def check(self, where: str) -> None:
        if self._requested.is_set():
            raise StopRequested(f"stopped by the caller {where}")

    def begin(self) -> None:
        self._idle.clear()

    def end(self) -> None:
        self._idle.set()

    def wait_idle(self, timeout: float) -> bool:
        return self._idle.wait(timeout)


IN_PROCESS = InProcessStop()
