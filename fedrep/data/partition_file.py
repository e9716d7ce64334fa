"""Partitions made elsewhere: fedrep's JSON index file, and PFLlib's per-client folders as written.

Comparing against another framework's numbers means training on *its* split, not on one redrawn
by our partitioners with a different random stream. Two forms are read:

* :func:`read_index_partition`: our documented JSON file (:data:`PARTITION_FILE_SCHEMA`), index
  lists into a data set fedrep already loads. :func:`write_index_partition` exports one.
* :func:`check_pfllib` / :func:`load_pfllib_client`: the folder PFLlib's generators write
  (``config.json``, ``train/<i>.npz``, ``test/<i>.npz``), whose arrays *are* the data, so the
  images need not come from a data set fedrep knows.

Everything is checked before a run starts and every refusal is one line that names the file (and
the client, where there is one): a bad split found in round 40 wastes the 39 rounds before it.
PFLlib's ``.npz`` files hold a pickled dict; they are read with :func:`~fedrep.data.store.load_npy_object`
(arrays and plain containers only), never ``np.load(allow_pickle=True)``, so a data file cannot run
code on the machine that reads it.
"""

from __future__ import annotations

import functools
import json
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from fedrep.data.partition import ClientIndices, PartitionError
from fedrep.data.store import DataError, load_npy_object
from fedrep.files import atomic_write

FORMAT = "fedrep-partition/1"

PARTITION_FILE_SCHEMA = f"""\
fedrep partition file (JSON), format "{FORMAT}":
  {{"format": "{FORMAT}",
   "dataset": "fashion-mnist",
   "clients": [{{"train": [0, 5, 9], "test": [1, 2]}},
               {{"train": [3, 4], "test": [0]}}]}}
- format  (required) exactly "{FORMAT}".
- dataset (optional) the data set the indices point into; when given it must be the run's dataset.
- clients (required) one entry per client: entry i is partition-id i, and there must be exactly
  num-clients entries.
- train, test (both required) whole-number indices, counted from 0, into the data set's train and
  test splits. train must not be empty; test may be. No index may appear twice within a client,
  and no train or test index may belong to two clients.
- No other keys are allowed, at the top level or in a client entry."""


class PartitionFileError(PartitionError):
    """A partition file (or PFLlib folder) that does not fit this run; the message names the file,
    the client where there is one, and the fix."""


# --- fedrep's JSON index file -------------------------------------------------------------------


class _ClientEntry(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    train: list[int]
    test: list[int]


class _PartitionFileModel(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    format: Literal["fedrep-partition/1"]
    dataset: str | None = None
    clients: list[_ClientEntry]


_ALLOWED_KEYS = {0: "format, dataset, clients", 2: "train, test"}
_TYPE_WORDS = {"model_type": "must be a JSON object", "dict_type": "must be a JSON object",
               "list_type": "must be a list", "int_type": "must be a whole number",
               "string_type": "must be a string"}


def _where(loc: tuple[int | str, ...]) -> str:
    """A pydantic location in the user's words: ``('clients', 3, 'train', 5)`` -> ``client 3 train[5]``."""
    if len(loc) >= 2 and loc[0] == "clients" and isinstance(loc[1], int):
        rest = loc[2:]
        return f"client {loc[1]}" + (f" {rest[0]}" + "".join(f"[{p}]" for p in rest[1:]) if rest else "")
    return f"'{'.'.join(str(p) for p in loc)}'" if loc else "the file"


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _schema_problem(item: Any) -> str:
    """One pydantic error as a phrase; the location says which client, the phrase what to write."""
    loc = tuple(item["loc"])
    kind = item["type"]
    if kind == "extra_forbidden":
        owner = _where(loc[:-1]) if len(loc) > 1 else "the file"
        allowed = _ALLOWED_KEYS.get(len(loc) - 1, "")
        return f"{owner} has an unknown key {str(loc[-1])!r} (allowed: {allowed})"
    if kind == "missing":
        return f"{_where(loc)} is missing"
    if kind == "literal_error" and loc == ("format",):
        return f"'format' is {_short(item['input'])}; it must be exactly {FORMAT!r}"
    words = _TYPE_WORDS.get(kind, item["msg"])
    return f"{_where(loc)} {words} (got {_short(item['input'])})"


def _schema_error(path: Path, err: ValidationError) -> PartitionFileError:
    items = err.errors()
    more = f" (and {len(items) - 3} more problems)" if len(items) > 3 else ""
    problems = "; ".join(_schema_problem(i) for i in items[:3])
    return PartitionFileError(f"partition-file {path}: {problems}{more}. `fedrep config` prints the schema")


def _parse(path: Path) -> _PartitionFileModel:
    """The file validated against the schema (types and keys only; indices are checked later)."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise PartitionFileError(f"partition-file {path} does not exist; pass an existing file") from None
    except (OSError, UnicodeDecodeError) as err:
        raise PartitionFileError(f"partition-file {path} cannot be read ({err})") from None
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as err:
        raise PartitionFileError(f"partition-file {path} is not JSON ({err}); "
                                 "`fedrep config` prints the schema") from None
    try:
        return _PartitionFileModel.model_validate(raw)
    except ValidationError as err:
        raise _schema_error(path, err) from None


def _bounds(size: int) -> str:
    return f"0..{size - 1}" if size > 0 else "the split, which is empty"


def _index_array(path: Path, client: int, split: str, values: list[int], size: int) -> np.ndarray:
    """One client's indices into one split, sorted int64, after the range and duplicate checks."""
    bad = next((v for v in values if v < 0 or v >= size), None)
    if bad is not None:
        raise PartitionFileError(f"partition-file {path}: client {client} {split} index {bad} is "
                                 f"outside {_bounds(size)}")
    array = np.sort(np.asarray(values, dtype=np.int64))
    repeated = array[1:][array[1:] == array[:-1]]
    if repeated.size:
        raise PartitionFileError(f"partition-file {path}: client {client} lists {split} index "
                                 f"{repeated[0]} more than once; list each index once")
    return array


def _check_disjoint(path: Path, arrays: Sequence[np.ndarray], split: str) -> None:
    """No sample in two clients: the paper trains and evaluates each client on its own samples."""
    if not arrays:
        return
    flat = np.concatenate(arrays)
    owner = np.repeat(np.arange(len(arrays)), [len(a) for a in arrays])
    order = np.argsort(flat, kind="stable")  # equal indices keep client order: owner[k] < owner[k+1]
    ordered, owners = flat[order], owner[order]
    clash = np.flatnonzero(ordered[1:] == ordered[:-1])
    if clash.size:
        k = clash[0]
        raise PartitionFileError(f"partition-file {path}: {split} index {ordered[k]} is held by client "
                                 f"{owners[k]} and client {owners[k + 1]}; each sample belongs to one client")


def read_index_partition(path: Path, num_clients: int, num_train: int, num_test: int,
                         dataset: str) -> list[ClientIndices]:
    """Client i's train and test indices (sorted int64) from a ``fedrep-partition/1`` file.

    ``num_train`` / ``num_test`` are the sizes of ``dataset``'s splits; ``num_clients`` is the run's.
    Raises :class:`PartitionFileError` naming the file and the client on any mismatch."""
    path = Path(path)
    parsed = _parse(path)
    if parsed.dataset is not None and parsed.dataset != dataset:
        raise PartitionFileError(f"partition-file {path} indexes data set {parsed.dataset!r} but this "
                                 f"run uses {dataset!r}; use a partition file made for {dataset!r}")
    held = len(parsed.clients)
    if held != num_clients:
        raise PartitionFileError(f"partition-file {path} holds {held} clients but the run has "
                                 f"num-clients={num_clients}; set --set num-clients={held}")
    parts = []
    for client, entry in enumerate(parsed.clients):
        if not entry.train:
            raise PartitionFileError(f"partition-file {path}: client {client} has no train indices; "
                                     "every client needs at least one train sample")
        parts.append(ClientIndices(_index_array(path, client, "train", entry.train, num_train),
                                   _index_array(path, client, "test", entry.test, num_test)))
    _check_disjoint(path, [p.train for p in parts], "train")
    _check_disjoint(path, [p.test for p in parts], "test")
    return parts


def write_index_partition(path: Path, parts: Sequence[ClientIndices], dataset: str | None) -> None:
    """Export ``parts`` as a ``fedrep-partition/1`` file (one client per line, so a diff shows
    which client changed), written atomically. ``dataset=None`` leaves the key out."""
    header: dict[str, Any] = {"format": FORMAT}
    if dataset is not None:
        header["dataset"] = dataset
    clients = [json.dumps({"train": [int(i) for i in np.asarray(p.train).ravel()],
                           "test": [int(i) for i in np.asarray(p.test).ravel()]}, separators=(",", ":"))
               for p in parts]
    head = json.dumps(header)[:-1]  # '{"format": ...' without the closing brace
    body = ",\n  ".join(clients)
    text = f'{head},\n "clients": [\n  {body}\n ]}}\n' if clients else f'{head}, "clients": []}}\n'
    atomic_write(Path(path), text.encode("utf-8"))


# --- PFLlib's folder layout ---------------------------------------------------------------------

_PFLLIB_HINT = ("point partition-file at the folder a PFLlib generator wrote (config.json, train/<i>.npz, "
                "test/<i>.npz), or regenerate it")


@dataclass(frozen=True)
class PfllibFolder:
    """What a PFLlib folder holds, from its config.json and client 0's train file."""

    root: Path
    num_clients: int
    num_classes: int
    sample_shape: tuple[int, ...]  # one sample, e.g. (1, 28, 28) or (3, 32, 32)


class _PfllibConfig(BaseModel):
    """The two keys fedrep needs; PFLlib's others (non_iid, alpha, ...) are ignored."""

    model_config = ConfigDict(extra="ignore", strict=True)

    num_clients: int = Field(ge=1)
    num_classes: int = Field(ge=1)


def is_pfllib_folder(path: Path) -> bool:
    """A directory with ``config.json`` and ``train/``: how a partition-file value is told apart."""
    path = Path(path)
    return path.is_dir() and (path / "config.json").is_file() and (path / "train").is_dir()


def _read_config(root: Path) -> _PfllibConfig:
    config = root / "config.json"
    if not root.is_dir():
        raise DataError(f"{root} is not a folder; {_PFLLIB_HINT}")
    if not config.is_file():
        raise DataError(f"{config} is missing; {_PFLLIB_HINT}")
    try:
        raw = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DataError(f"{config} is not JSON ({err}); {_PFLLIB_HINT}") from None
    try:
        return _PfllibConfig.model_validate(raw)
    except ValidationError as err:
        item = err.errors()[0]
        key = ".".join(str(p) for p in item["loc"]) or "the file"
        what = "is missing" if item["type"] == "missing" else f"= {_short(item.get('input'))}: {item['msg']}"
        raise DataError(f"{config}: {key!r} {what}; PFLlib writes whole numbers num_clients "
                        f"and num_classes >= 1") from None


def _split_file(root: Path, split: str, client: int) -> Path:
    return root / split / f"{client}.npz"


def _npy_dtype(stream: BinaryIO) -> np.dtype:
    """The dtype in a ``.npy`` header, so a plain array is named as such instead of being handed to
    :func:`load_npy_object`, which expects the object array PFLlib writes."""
    major, _ = np.lib.format.read_magic(stream)
    header = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
    return header(stream)[2]


def _read_npz_dict(path: Path) -> Any:
    """The object PFLlib pickled into ``path`` (``np.savez_compressed(f, data=dict)``), unpickled
    with the arrays-only unpickler: anything else in the pickle is refused before it is built."""
    if not path.is_file():
        raise DataError(f"{path} is missing; {_PFLLIB_HINT}")
    try:
        with zipfile.ZipFile(path) as archive:
            if "data.npy" not in archive.namelist():
                raise DataError(f"{path} has no 'data' array; PFLlib writes "
                                "np.savez_compressed(f, data={'x': ..., 'y': ...})")
            with archive.open("data.npy") as member:
                dtype = _npy_dtype(member)
            if dtype != np.dtype(object):
                raise DataError(f"{path}: 'data' is a plain {dtype} array, not the dict "
                                "{'x': ..., 'y': ...} PFLlib pickles into it")
            with archive.open("data.npy") as member:
                return load_npy_object(member)
    except DataError:
        raise
    except Exception as err:  # a corrupt or hostile file may fail in any way; none of it is trusted
        reason = " ".join(f"{type(err).__name__}: {err}".split())
        raise DataError(f"{path} cannot be read as a PFLlib .npz ({reason}); {_PFLLIB_HINT}") from None


def _validated_split(path: Path, obj: Any, num_classes: int,
                     shape: tuple[int, ...] | None) -> tuple[np.ndarray, np.ndarray]:
    """``(x float32, y int64)`` from one unpickled PFLlib dict, after every check a model needs."""
    if not isinstance(obj, dict) or "x" not in obj or "y" not in obj:
        got = sorted(map(str, obj)) if isinstance(obj, dict) else type(obj).__name__
        raise DataError(f"{path}: 'data' must be a dict with keys 'x' and 'y' (got {got})")
    x, y = obj["x"], obj["y"]
    if not isinstance(x, np.ndarray) or x.ndim < 2 or not np.issubdtype(x.dtype, np.floating):
        what = f"{x.dtype} array of shape {x.shape}" if isinstance(x, np.ndarray) else type(x).__name__
        raise DataError(f"{path}: 'x' must be a float array (samples, ...) with at least 2 dimensions, "
                        f"got {what}")
    if not isinstance(y, np.ndarray) or y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
        what = f"{y.dtype} array of shape {y.shape}" if isinstance(y, np.ndarray) else type(y).__name__
        raise DataError(f"{path}: 'y' must be a 1-D integer label array, got {what}")
    if len(x) != len(y):
        raise DataError(f"{path}: 'x' holds {len(x)} samples but 'y' holds {len(y)} labels")
    if shape is not None and tuple(x.shape[1:]) != shape:
        raise DataError(f"{path}: samples have shape {tuple(x.shape[1:])} but client 0's have {shape}; "
                        "every client file must hold samples of one shape")
    if y.size and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        bad = int(y.min()) if int(y.min()) < 0 else int(y.max())
        raise DataError(f"{path}: label {bad} is outside 0..{num_classes - 1} "
                        f"(config.json says num_classes={num_classes})")
    if not np.isfinite(x).all():
        raise DataError(f"{path}: 'x' holds NaN or infinite values")
    return x.astype(np.float32, copy=False), y.astype(np.int64, copy=False)


def _read_split(root: Path, split: str, client: int, num_classes: int,
                shape: tuple[int, ...] | None) -> tuple[np.ndarray, np.ndarray]:
    path = _split_file(root, split, client)
    x, y = _validated_split(path, _read_npz_dict(path), num_classes, shape)
    if split == "train" and len(y) == 0:
        raise DataError(f"{path}: client {client} has no train samples; every client needs at least one")
    return x, y


def inspect_pfllib(root: Path) -> PfllibFolder:
    """Clients, classes and sample shape, from config.json and ``train/0.npz`` only: cheap enough
    to call when the run config is validated, before any client starts."""
    root = Path(root)
    config = _read_config(root)
    x, _ = _read_split(root, "train", 0, config.num_classes, None)
    return PfllibFolder(root, config.num_clients, config.num_classes, tuple(int(d) for d in x.shape[1:]))


@functools.lru_cache(maxsize=8)
def _inspect_stamped(root: str, stamp: tuple[int, ...]) -> PfllibFolder:
    del stamp  # part of the cache key only: replacing either file reads it again
    return inspect_pfllib(Path(root))


def _inspect_cached(root: Path) -> PfllibFolder:
    """:func:`inspect_pfllib`, read once per process while config.json and train/0.npz are unchanged
    (a client process loading several partitions should not decode client 0 each time)."""
    try:
        stats = [(root / "config.json").stat(), _split_file(root, "train", 0).stat()]
    except OSError:
        return inspect_pfllib(root)  # raises the error that names the missing file
    stamp = tuple(v for s in stats for v in (s.st_ino, s.st_size, s.st_mtime_ns))
    return _inspect_stamped(str(root.resolve()), stamp)


def load_pfllib_client(root: Path, client: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(x_train float32, y_train int64, x_test float32, y_test int64)`` of one client, exactly as
    PFLlib wrote them (already normalised by its generator; nothing is rescaled here)."""
    root = Path(root)
    folder = _inspect_cached(root)
    if not 0 <= client < folder.num_clients:
        raise PartitionFileError(f"{root / 'config.json'}: client {client} is outside "
                                 f"0..{folder.num_clients - 1} (num_clients={folder.num_clients})")
    x_train, y_train = _read_split(root, "train", client, folder.num_classes, folder.sample_shape)
    x_test, y_test = _read_split(root, "test", client, folder.num_classes, folder.sample_shape)
    return x_train, y_train, x_test, y_test


def check_pfllib(root: Path, num_clients: int) -> PfllibFolder:
    """Every client file of a PFLlib folder decoded and checked, before a run starts.

    Missing files are reported first (a cheap listing), then each client is read one at a time,
    so a 100-client folder never sits in memory whole."""
    root = Path(root)
    folder = inspect_pfllib(root)
    if folder.num_clients != num_clients:
        raise PartitionFileError(f"{root / 'config.json'}: the PFLlib folder holds {folder.num_clients} "
                                 f"clients but the run has num-clients={num_clients}; set "
                                 f"--set num-clients={folder.num_clients}")
    for client in range(num_clients):
        for split in ("train", "test"):
            if not _split_file(root, split, client).is_file():
                raise DataError(f"{_split_file(root, split, client)} is missing; {_PFLLIB_HINT}")
    for client in range(num_clients):
        for split in ("train", "test"):
            _read_split(root, split, client, folder.num_classes, folder.sample_shape)
    return folder
