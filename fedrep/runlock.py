"""One writer per run folder: an OS file lock held for the whole run.

Two processes writing one run folder (a second ``fedrep run --resume`` while the first still
runs) interleave rounds in ``metrics.jsonl`` and both report success. The lock makes the second
one fail at once, naming the process that holds the folder.

The lock is ``flock(2)`` on ``RUN_DIR/.lock``: the kernel releases it when the holder exits, however
it exits (Ctrl-C, SIGTERM, SIGKILL, a crash), so a stale lock cannot outlive its process. The file
also records the holder's PID, host and start time, only to say who holds it; when the lock is free
but the file names another process, that process died holding it, and we say we took it over.

Within one process the lock is re-entrant: the CLI takes it before Ray starts, and the ServerApp
(which runs in a thread of the same process under ``fedrep run``, or in its own process under
``flwr run`` and on a deployment) takes it again when it opens the folder.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import sys
import threading
import time
from pathlib import Path
from typing import IO

from fedrep.config import ConfigError
from fedrep.files import file_mode

LOCK_NAME = ".lock"


class RunFolderBusy(ConfigError):
    """Another live process holds the run folder."""


class _Held:
    def __init__(self, handle: IO[str]) -> None:
        self.handle = handle
        self.count = 0


_held: dict[Path, _Held] = {}
_guard = threading.Lock()


def _holder(text: str) -> dict[str, object]:
    try:
        info = json.loads(text)
    except json.JSONDecodeError:
        return {}
    return info if isinstance(info, dict) else {}


def _describe(info: dict[str, object]) -> str:
    if not info:
        return "another process (it left no details)"
    return f"process {info.get('pid')} on {info.get('host')} (since {info.get('started')})"


def acquire(run_dir: str | Path) -> None:
    """Hold ``run_dir`` for this process until :func:`release` (or the process ends).

    Raises :class:`RunFolderBusy` at once, naming the holder, when another process holds it."""
    path = Path(run_dir).resolve()
    with _guard:
        held = _held.get(path)
        if held is None:
            held = _Held(_lock(path))
            _held[path] = held
        held.count += 1


def release(run_dir: str | Path) -> None:
    path = Path(run_dir).resolve()
    with _guard:
        held = _held.get(path)
        if held is None:
            return
        held.count -= 1
        if held.count <= 0:
            del _held[path]
            # a clean release leaves no holder details, so the next taker reports no take-over
            with contextlib.suppress(OSError):
                held.handle.seek(0)
                held.handle.truncate()
            held.handle.close()  # closing the descriptor drops the flock


def release_all() -> None:
    """Release every lock this process holds (the CLI on its way out, however it leaves)."""
    for path in list(_held):
        with _guard:
            held = _held.get(path)
            if held is not None:
                held.count = 1
        release(path)


@contextlib.contextmanager
def holding(run_dir: str | Path):
    acquire(run_dir)
    try:
        yield
    finally:
        release(run_dir)


def holds(run_dir: str | Path) -> bool:
    """Whether this process holds ``run_dir``'s lock."""
    return Path(run_dir).resolve() in _held


def check_free(run_dir: str | Path) -> None:
    """Fail, naming the holder, if another process holds ``run_dir`` now (without taking it):
    for a route whose ServerApp runs in another process and takes the lock itself."""
    path = Path(run_dir).resolve()
    if holds(path) or not (path / LOCK_NAME).is_file():
        return
    handle = (path / LOCK_NAME).open("r")
    try:
        if not _flock_settled(handle, fcntl.LOCK_SH):
            raise RunFolderBusy(_busy_message(path, _holder(handle.read())))
    finally:
        handle.close()


def _busy_message(path: Path, info: dict[str, object]) -> str:
    return (f"run folder {path} is in use by {_describe(info)}; a second writer would mix the two "
            f"runs' rounds. Wait for it to finish, or stop it (kill {info.get('pid', 'PID')}) and "
            f"then `fedrep run --resume {path}`")


# A lock released a moment ago can still look taken: a child process forked (by Ray, matplotlib,
# a tracker...) while this process held it keeps a copy of the descriptor, and with it the lock,
# until it execs (the descriptor is close-on-exec). A real holder writes its details at once, so
# a taken lock whose file names nobody is retried this long before it counts as busy.
SETTLE_SECONDS = 3.0


def _flock_settled(handle: IO[str], mode: int) -> bool:
    """Take ``mode`` on ``handle`` without blocking; on a lock held by a holder that left no
    details, retry for :data:`SETTLE_SECONDS`. False when it stays taken."""
    deadline = time.monotonic() + SETTLE_SECONDS
    while True:
        try:
            fcntl.flock(handle.fileno(), mode | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            handle.seek(0)
            if _holder(handle.read()) or time.monotonic() >= deadline:
                handle.seek(0)
                return False
            time.sleep(0.05)


def _lock(path: Path) -> IO[str]:
    lock_file = path / LOCK_NAME
    fd = os.open(lock_file, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, file_mode())
    handle = os.fdopen(fd, "r+")
    try:
        taken = _flock_settled(handle, fcntl.LOCK_EX)
    except OSError:
        handle.close()
        raise
    if not taken:
        info = _holder(handle.read())
        handle.close()
        raise RunFolderBusy(_busy_message(path, info))
    previous = _holder(handle.read())
    me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
    if previous and (previous.get("pid"), previous.get("host")) != (me["pid"], me["host"]):
        print(f"[fedrep] {path}: took over the lock of {_describe(previous)}, which is gone",
              file=sys.stderr, flush=True)
    handle.seek(0)
    handle.truncate()
    handle.write(json.dumps(me) + "\n")
    handle.flush()
    return handle
