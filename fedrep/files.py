"""Small file helpers shared by the run folder, client state and the data cache.

Every file the run folder holds gets the same mode, ``0o666`` minus the process umask (``0644``
with the usual umask 022), whichever helper wrote it: :func:`atomic_write` gives its temporary
file that mode before the rename (``tempfile`` creates ``0600``), and appended files are created
with ``open``, which applies the umask to ``0o666`` itself.
"""

from __future__ import annotations

import contextlib
import io
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

TEMP_PREFIX = "."  # temporary files are ``.<name>.<random>``, next to their target
TEMP_SUFFIX_LEN = 10  # a leading dot, the name, a dot and tempfile's 8 random characters


def file_mode() -> int:
    """The mode a plain ``open(path, "w")`` would give a new file under this process's umask."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def atomic_write(path: Path, data: bytes) -> None:
    """Write-then-rename, so a reader (or a resumed run) never sees a half-written file.

    On any failure (a full disk, a name too long, a permission) the temporary file is removed
    and the ``OSError`` names ``path``, so that the user learns which file, not only that the disk
    is full."""
    tmp_name: str | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, delete=False,
                                         prefix=f"{TEMP_PREFIX}{path.name}.") as tmp:
            tmp_name = tmp.name
            tmp.write(data)
            tmp.flush()
            os.fsync(tmp.fileno())
            os.fchmod(tmp.fileno(), file_mode())
        os.replace(tmp_name, path)
        tmp_name = None
    except OSError as err:
        raise OSError(err.errno, err.strerror or str(err), str(path)) from err
    finally:
        if tmp_name is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp_name)


def is_temp_of(name: str, target: str) -> bool:
    """Whether ``name`` is a temporary file :func:`atomic_write` leaves when killed writing
    ``target``."""
    return name.startswith(f"{TEMP_PREFIX}{target}.") and len(name) == len(target) + TEMP_SUFFIX_LEN


def remove_stale_temp_files(folder: Path) -> list[Path]:
    """Delete the temporary files a killed :func:`atomic_write` left anywhere under ``folder``;
    only safe while nothing else writes there (the run lock). Returns what was removed."""
    removed = []
    for tmp in folder.rglob(f"{TEMP_PREFIX}*.*"):
        target = tmp.name[len(TEMP_PREFIX):-(TEMP_SUFFIX_LEN - len(TEMP_PREFIX))]
        if tmp.is_file() and is_temp_of(tmp.name, target):
            with contextlib.suppress(OSError):
                tmp.unlink()
                removed.append(tmp)
    return removed


def torch_bytes(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def numpy_bytes(arr: Any) -> bytes:
    import numpy as np

    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()
