"""FEMNIST and Sent140 from the JSON files LEAF generates, and GloVe word vectors for Sent140.

LEAF (github.com/TalwalkarLab/leaf) writes ``data/train/*.json`` and ``data/test/*.json``, each one
object ``{"users": [...], "num_samples": [...], "user_data": {user: {"x": [...], "y": [...]}}}``.
There is nothing to download: the data must be generated with LEAF's ``preprocess.sh``
(:func:`how_to_get` gives the commands), so the loader only locates, checks, decodes once and
memory-maps, like :mod:`fedrep.data.fashion_mnist`.

* FEMNIST: each ``x`` is a 28x28 image flattened row-major as ``pixel / 255`` (background 1.0, ink
  dark); ``y`` is 0..61 (digits, then A-Z, then a-z: LEAF's ``relabel_class``). A class selection
  (:data:`FEMNIST_CLASSES`) keeps some labels and renumbers them from 0: the official FedRep run
  (``FedRep_femnist.sh``: ``--num_classes 10``) has 10 outputs, so only the digits can occur in it.
* Sent140: each ``x`` is ``[tweet id, date, query, user, text]``; the text (index 4, as
  ``process_x`` in FedRep's ``models/language_utils.py``) becomes ``max_words`` word ids with
  ``line_to_indices``' rules; ``y`` is 0 (negative) or 1 (positive).

Clients are the first ``num_clients`` users of the train files (sorted by name, users in each file's
``users`` order) that have train and test samples, as in FedRep's ``main_fedrep.py``. Parsing LEAF's
JSON is slow (full FEMNIST is ~36 files of 100+ MB), so the selected clients are decoded once into
the cache (:func:`fedrep.data.store.cached_arrays`) and memory-mapped on later calls; only as many
files as the selection needs are parsed.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from fedrep.data.store import DataError, cache_dir, cached_arrays, data_dirs, decoded_dir

__all__ = [
    "DataError", "LeafClient", "FEMNIST_CLASSES", "femnist_clients", "sent140_clients", "leaf_dirs",
    "how_to_get", "tweet_words",
]

DATASETS = ("femnist", "sent140")
LEAF_REPO = "https://github.com/TalwalkarLab/leaf"
GLOVE_URL = "https://nlp.stanford.edu/data/glove.6B.zip"
GLOVE_NAMES = ("glove.6B.300d.txt", "embs.json")  # GloVe's text file, or LEAF's get_embs.py output
GLOVE_DIM = 300

FEMNIST_SIDE = 28
FEMNIST_PIXELS = FEMNIST_SIDE * FEMNIST_SIDE
FEMNIST_LABELS = 62
FEMNIST_CLASSES: dict[str, range] = {
    "digits": range(0, 10),  # the official FedRep run (10 outputs)
    "letters-a-j": range(36, 46),  # lower-case a..j: another 10-class task
    "all": range(0, 62),
}
SENT140_TEXT_FIELD = 4  # FedRep models/language_utils.py process_x: raw_x_batch[4]
SENT140_MAX_WORDS = 25  # line_to_indices(..., max_words=25)
SENT140_LABELS = 2

# line_to_indices -> split_line: words (letters, digits, _ and ') and . , ! ? ; as tokens of their own.
_TWEET_WORDS = re.compile(r"[\w']+|[.,!?;]")
_SPLITS = ("train", "test")
_ARRAYS = ("users", *(f"{s}_{a}" for s in _SPLITS for a in ("x", "y", "offsets")))
_CACHE_FORMAT = 1  # part of the cache key: bump when the decoded layout changes
# Pixel code k -> the float32 of LEAF's k / 255 (float64 division, as numpy's ``vec / 255``).
_PIXEL_VALUES = (np.arange(256, dtype=np.float64) / 255).astype(np.float32)

Sample = tuple[Any, np.ndarray]  # (images or tweet texts, labels int64) of one user and split
Convert = Callable[[Path, str, list[Any], list[Any]], Sample]


@dataclass(frozen=True)
class LeafClient:
    """One LEAF user: FEMNIST ``x`` float32 (n, 28, 28), Sent140 ``x`` int32 (n, max_words) word
    ids; ``y`` int64."""

    user: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


@dataclass(frozen=True)
class _Picked:
    user: str
    train: Sample
    test: Sample


def how_to_get(dataset: str) -> str:
    """The LEAF commands that generate ``dataset`` (``-t sample`` puts every user in train and test,
    which FedRep's per-user evaluation needs)."""
    text = (f"Generate it with LEAF: `git clone {LEAF_REPO} && cd leaf/data/{dataset} && "
            f"./preprocess.sh -s niid --sf 1.0 -k 0 -t sample`, then run with "
            f"`--set data-dir=leaf/data/{dataset}/data`")
    if dataset == "sent140":
        text += (f", and put glove.6B.300d.txt (from {GLOVE_URL}) or embs.json (the output of LEAF's "
                 "models/sent140/get_embs.sh) in that folder")
    return text + "."


# --- finding the files -----------------------------------------------------------------------------
def _check_dataset(dataset: str) -> None:
    if dataset not in DATASETS:
        raise ValueError(f"unknown LEAF data set {dataset!r}; choose one of {', '.join(DATASETS)}")


def _split_names(dataset: str) -> list[tuple[str, str]]:
    """LEAF's ``train``/``test``; FEMNIST also FedRep's ``mytrain``/``mytest`` (the selection its
    ``main_fedrep.py`` reads, which is not published)."""
    return [("train", "test"), *([("mytrain", "mytest")] if dataset == "femnist" else [])]


def _places(dataset: str, base: Path) -> list[tuple[Path, Path]]:
    """(train, test) folder pairs tried inside ``base``, in order: ``base`` itself (LEAF's
    ``data/<dataset>/data``), ``base/data`` (``base`` is ``data/<dataset>``), ``base/<dataset>/data``
    (``base`` is LEAF's ``data`` folder) and ``base/data/<dataset>/data`` (the LEAF checkout); in
    each, ``train``/``test`` before FEMNIST's ``mytrain``/``mytest``."""
    roots = [base, base / "data", base / dataset / "data", base / "data" / dataset / "data"]
    return [(root / tr, root / te) for root in roots for tr, te in _split_names(dataset)]


def _json_files(folder: Path) -> list[Path]:
    """The ``.json`` files of ``folder`` sorted by name: the order FedRep reads them in."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.glob("*.json") if p.is_file())


def _find_leaf(dataset: str, data_dir: str | os.PathLike[str] | None) -> tuple[Path, Path, Path]:
    """(base folder, train folder, test folder) of the first place holding both."""
    _check_dataset(dataset)
    bases = data_dirs(data_dir, cache_dir() / dataset)
    for base in bases:
        for train, test in _places(dataset, base):
            if _json_files(train) and _json_files(test):
                return base, train, test
    raise DataError(_not_found(dataset, bases))


def _not_found(dataset: str, bases: list[Path]) -> str:
    names = " (or mytrain/mytest)" if dataset == "femnist" else ""
    half = [f"{tr} has .json files but {te} has none." for base in bases
            for tr, te in _places(dataset, base) if _json_files(tr) and not _json_files(te)]
    subfolders = f"data/, {dataset}/data/ and data/{dataset}/data/"
    return (f"{dataset} (LEAF JSON) not found: no train/ and test/ folders{names} of .json files in "
            f"{', '.join(str(b) for b in bases)} (nor in their {subfolders} subfolders). "
            + "".join(f"{h} " for h in half) + how_to_get(dataset))


def leaf_dirs(dataset: str, data_dir: str | os.PathLike[str] | None) -> tuple[Path, Path]:
    """The train and test folders of ``dataset`` ("femnist" or "sent140") that the loaders read."""
    _, train, test = _find_leaf(dataset, data_dir)
    return train, test


def _glove_places(base: Path, train: Path) -> list[Path]:
    """Where the GloVe file may lie: the data folder, its parent, its ``sent140`` subfolder and the
    folder holding ``train/``."""
    places: list[Path] = []
    for folder in (base, base.parent, base / "sent140", train.parent):
        if folder not in places:
            places.append(folder)
    return places


def _find_glove(base: Path, train: Path) -> Path:
    places = _glove_places(base, train)
    for folder in places:
        for name in GLOVE_NAMES:
            if (folder / name).is_file():
                return folder / name
    raise DataError(
        f"sent140 needs GloVe word vectors: neither {' nor '.join(GLOVE_NAMES)} is in "
        f"{', '.join(str(p) for p in places)}. Download {GLOVE_URL}, unzip it and put glove.6B.300d.txt "
        f"in {base} (or put there the embs.json that LEAF's models/sent140/get_embs.sh writes)."
    )


# --- reading LEAF's JSON -------------------------------------------------------------------------------
def _read_json(path: Path, how: str) -> Any:
    """One LEAF file, whole: LEAF writes each with a single ``json.dump``."""
    try:
        with path.open("rb") as fh:
            return json.load(fh)
    except (OSError, ValueError, RecursionError) as err:
        raise DataError(f"cannot read {path} as JSON ({err}); it is truncated or damaged: regenerate it. "
                        f"{how}") from None


def _leaf_users(path: Path, how: str) -> Iterator[tuple[str, list[Any], list[Any]]]:
    """(user, x, y) of one LEAF file in its ``users`` order, each checked against ``num_samples``."""
    data = _read_json(path, how)
    if not isinstance(data, dict):
        raise DataError(f"{path} is not a LEAF data file (its top level is not an object). {how}")
    for key in ("users", "num_samples", "user_data"):
        if key not in data:
            raise DataError(f"{path} has no {key!r} key, so it is not a LEAF data file. {how}")
    users, counts, user_data = data["users"], data["num_samples"], data["user_data"]
    if not isinstance(users, list) or not all(isinstance(u, str) for u in users):
        raise DataError(f"{path}: 'users' is not a list of user names. {how}")
    if not isinstance(counts, list) or len(counts) != len(users):
        raise DataError(f"{path}: 'num_samples' does not hold one count per user in 'users'. {how}")
    if not isinstance(user_data, dict):
        raise DataError(f"{path}: 'user_data' is not an object keyed by user. {how}")
    for user, count in zip(users, counts, strict=True):
        x, y = _user_xy(path, user, count, user_data.get(user), how)
        yield user, x, y


def _user_xy(path: Path, user: str, count: Any, entry: Any, how: str) -> tuple[list[Any], list[Any]]:
    if not isinstance(entry, dict):
        raise DataError(f"{path}: user {user!r} is in 'users' but has no entry in 'user_data'. {how}")
    x, y = _samples_list(path, user, entry, "x", how), _samples_list(path, user, entry, "y", how)
    if count != len(x):
        raise DataError(f"{path}: user {user!r}: 'num_samples' says {count!r} but 'x' holds {len(x)} "
                        f"samples. {how}")
    if len(x) != len(y):
        raise DataError(f"{path}: user {user!r}: 'x' holds {len(x)} samples but 'y' holds {len(y)}. {how}")
    return x, y


def _samples_list(path: Path, user: str, entry: dict[str, Any], key: str, how: str) -> list[Any]:
    value = entry.get(key)
    if not isinstance(value, list):
        raise DataError(f"{path}: user {user!r} has no {key!r} list in 'user_data'. {how}")
    return value


def _labels(path: Path, user: str, y: list[Any], num_labels: int, how: str) -> np.ndarray:
    """``y`` as int64, every entry an integer (not a bool, not a float) in 0..num_labels-1."""
    for i, value in enumerate(y):
        if type(value) is not int or not 0 <= value < num_labels:
            raise DataError(f"{path}: user {user!r}: 'y'[{i}] = {_short(value)} is not a label "
                            f"0..{num_labels - 1}. {how}")
    return np.asarray(y, dtype=np.int64).reshape(len(y))


def _short(value: Any, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# --- FEMNIST -----------------------------------------------------------------------------------------
def _femnist_pixels(path: Path, user: str, x: list[Any], how: str) -> np.ndarray:
    """(n, 28, 28) images: uint8 codes k when every value is exactly k/255 (what LEAF writes; a
    quarter of the memory and cache), else float32 of the values as written."""
    if not x:
        return np.empty((0, FEMNIST_SIDE, FEMNIST_SIDE), dtype=np.uint8)
    try:
        values = np.asarray(x, dtype=np.float64)
    except (ValueError, TypeError):
        values = None
    if values is None or values.shape != (len(x), FEMNIST_PIXELS) or not _in_unit(values).all():
        raise DataError(f"{path}: user {user!r}: 'x'[{_bad_image(x)}] is not {FEMNIST_PIXELS} numbers in "
                        f"[0, 1] (a {FEMNIST_SIDE}x{FEMNIST_SIDE} image scaled by 1/255, as LEAF writes it). "
                        f"{how}")
    codes = np.rint(values * 255)
    if np.array_equal(codes / 255, values):
        return codes.astype(np.uint8).reshape(-1, FEMNIST_SIDE, FEMNIST_SIDE)
    return values.astype(np.float32).reshape(-1, FEMNIST_SIDE, FEMNIST_SIDE)


def _in_unit(values: np.ndarray) -> np.ndarray:
    return (values >= 0) & (values <= 1)  # NaN fails both


def _bad_image(x: list[Any]) -> int:
    """Index of the first row of ``x`` that is not 784 numbers in [0, 1] (for the error message)."""
    for i, row in enumerate(x):
        try:
            values = np.asarray(row, dtype=np.float64)
        except (ValueError, TypeError):
            return i
        if values.shape != (FEMNIST_PIXELS,) or not _in_unit(values).all():
            return i
    return 0


def _femnist_user(classes: range, how: str, path: Path, user: str, x: list[Any], y: list[Any]) -> Sample:
    """One user's images and labels, the labels in ``classes`` only, renumbered from 0."""
    labels = _labels(path, user, y, FEMNIST_LABELS, how)
    images = _femnist_pixels(path, user, x, how)
    keep = (labels >= classes.start) & (labels < classes.stop)
    return images[keep], labels[keep] - classes.start


def _pixels_float32(images: np.ndarray) -> np.ndarray:
    """float32 pixels exactly as LEAF wrote them, from either stored form."""
    return _PIXEL_VALUES[images] if images.dtype == np.uint8 else np.asarray(images, dtype=np.float32)


def _concat_images(parts: list[np.ndarray]) -> np.ndarray:
    if all(p.dtype == np.uint8 for p in parts):
        return np.concatenate(parts)
    return np.concatenate([_pixels_float32(p) for p in parts])


# --- selection (both data sets) ------------------------------------------------------------------------
class _TestUsers:
    """The test files' users, parsed one file at a time and only as far as the selection needs:
    with ``-t sample`` LEAF's test file k holds the users of train file k, so the first clients need
    only the first test files."""

    def __init__(self, files: list[Path], convert: Convert, how: str) -> None:
        self._files = iter(files)
        self._convert = convert
        self._how = how
        self._ready: dict[str, Sample] = {}

    def pop(self, user: str) -> Sample | None:
        while user not in self._ready:
            path = next(self._files, None)
            if path is None:
                return None
            for name, x, y in _leaf_users(path, self._how):
                self._ready[name] = self._convert(path, name, x, y)
        return self._ready.pop(user)


def _select(dataset: str, train_dir: Path, test_dir: Path, num_clients: int, convert: Convert,
            what: str = "") -> list[_Picked]:
    """The first ``num_clients`` train users (files by name, users in file order) with at least one
    train and one test sample after ``convert``: FedRep's ``main_fedrep.py`` takes the first
    ``num_users`` users in reading order."""
    how = how_to_get(dataset)
    tests = _TestUsers(_json_files(test_dir), convert, how)
    picked: list[_Picked] = []
    for path in _json_files(train_dir):
        for user, x, y in _leaf_users(path, how):
            train = convert(path, user, x, y)
            test = tests.pop(user)
            if test is None:
                raise DataError(f"user {user!r} of {path} is in none of the test files in {test_dir}; "
                                f"LEAF's `-t sample` puts every user in both, so regenerate the data. {how}")
            if len(train[1]) and len(test[1]):
                picked.append(_Picked(user, train, test))
                if len(picked) == num_clients:
                    return picked
    raise DataError(f"{dataset}: only {len(picked)} users in {train_dir} have train and test samples{what}, "
                    f"but {num_clients} clients were asked for; use `--set num-clients={len(picked)}` or "
                    f"regenerate with LEAF keeping more users (a larger --sf). {how}")


def _offsets(sizes: list[int]) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)]).astype(np.int64)


def _split_arrays(picked: list[_Picked],
                  concat_x: Callable[[list[Any]], np.ndarray]) -> dict[str, np.ndarray]:
    """All clients' samples of each split concatenated, with offsets: client i's are
    ``[offsets[i], offsets[i + 1])``."""
    arrays = {"users": np.array([p.user for p in picked], dtype=str)}
    for split in _SPLITS:
        samples = [getattr(p, split) for p in picked]
        arrays[f"{split}_x"] = concat_x([x for x, _ in samples])
        arrays[f"{split}_y"] = np.concatenate([y for _, y in samples]).astype(np.int64)
        arrays[f"{split}_offsets"] = _offsets([len(y) for _, y in samples])
    return arrays


def _clients(arrays: dict[str, np.ndarray], x_view: Callable[[np.ndarray], np.ndarray]) -> list[LeafClient]:
    """Per-client views of the (memory-mapped) concatenated arrays."""
    tr, te = arrays["train_offsets"], arrays["test_offsets"]
    return [
        LeafClient(str(user),
                   x_view(arrays["train_x"][tr[i]:tr[i + 1]]), arrays["train_y"][tr[i]:tr[i + 1]],
                   x_view(arrays["test_x"][te[i]:te[i + 1]]), arrays["test_y"][te[i]:te[i + 1]])
        for i, user in enumerate(arrays["users"])
    ]


def _sources(train: Path, test: Path, *extra: Path) -> list[Path]:
    return [*_json_files(train), *_json_files(test), *extra]


def _variant(classes: str, num_clients: int, max_words: int) -> str:
    return f"v{_CACHE_FORMAT}:{classes}:{num_clients}:{max_words}"


def _check_count(name: str, value: int) -> None:
    if value < 1:
        raise ValueError(f"{name} must be at least 1, got {value}")


def femnist_clients(data_dir: str | os.PathLike[str] | None, num_clients: int,
                    classes: str = "digits") -> list[LeafClient]:
    """The first ``num_clients`` FEMNIST users with samples of ``classes`` (a key of
    :data:`FEMNIST_CLASSES`) in both splits; ``x`` float32 (n, 28, 28) exactly as LEAF wrote the
    pixels, ``y`` renumbered to 0..len(classes)-1."""
    if classes not in FEMNIST_CLASSES:
        raise ValueError(f"unknown FEMNIST classes {classes!r}; choose one of {', '.join(FEMNIST_CLASSES)}")
    _check_count("num_clients", num_clients)
    _, train, test = _find_leaf("femnist", data_dir)
    wanted = FEMNIST_CLASSES[classes]
    convert = partial(_femnist_user, wanted, how_to_get("femnist"))
    what = f" with labels {wanted.start}..{wanted.stop - 1} (classes={classes!r})"

    def decode() -> dict[str, np.ndarray]:
        return _split_arrays(_select("femnist", train, test, num_clients, convert, what), _concat_images)

    folder = decoded_dir("femnist", _sources(train, test), variant=_variant(classes, num_clients, 0))
    return _clients(cached_arrays(folder, _ARRAYS, decode), _pixels_float32)


# --- Sent140 ------------------------------------------------------------------------------------------
def tweet_words(text: str, max_words: int = SENT140_MAX_WORDS) -> list[str]:
    """The first ``max_words`` tokens of a tweet, as FedRep's ``line_to_indices`` (via ``split_line``)
    cuts them: no lower-casing, so "Happy" is not GloVe's "happy"."""
    return _TWEET_WORDS.findall(text)[:max_words]


def _word_ids(words: list[str], index: dict[str, int], max_words: int) -> list[int]:
    """``line_to_indices``: unknown words and the padding up to ``max_words`` are both ``len(index)``."""
    unknown = len(index)
    return [index.get(w, unknown) for w in words] + [unknown] * (max_words - len(words))


def _sent140_user(how: str, path: Path, user: str, x: list[Any], y: list[Any]) -> Sample:
    labels = _labels(path, user, y, SENT140_LABELS, how)
    for i, row in enumerate(x):
        if not isinstance(row, list) or len(row) <= SENT140_TEXT_FIELD:
            raise DataError(f"{path}: user {user!r}: 'x'[{i}] is not a list of at least "
                            f"{SENT140_TEXT_FIELD + 1} fields [tweet id, date, query, user, text]. {how}")
        if not isinstance(row[SENT140_TEXT_FIELD], str):
            raise DataError(f"{path}: user {user!r}: 'x'[{i}][{SENT140_TEXT_FIELD}] (the tweet text) is not "
                            f"a string. {how}")
    return [row[SENT140_TEXT_FIELD] for row in x], labels


def _sent140_arrays(picked: list[_Picked], glove: Path, max_words: int) -> dict[str, np.ndarray]:
    """Word ids of every selected tweet and the embedding rows of only the words they use (sorted,
    so the ids do not depend on the GloVe file's order); the last row, all zeros, is the
    unknown-word and padding id, as LEAF's ``get_embs.py`` appends it."""
    needed = {w for p in picked for s in _SPLITS for t in getattr(p, s)[0] for w in tweet_words(t, max_words)}
    vectors = _embeddings(glove, needed)
    vocab = sorted(vectors)
    index = {w: i for i, w in enumerate(vocab)}
    embeddings = np.zeros((len(vocab) + 1, GLOVE_DIM), dtype=np.float32)
    for i, word in enumerate(vocab):
        embeddings[i] = vectors[word]

    def to_ids(texts: list[list[str]]) -> np.ndarray:
        ids = [_word_ids(tweet_words(t, max_words), index, max_words) for tweets in texts for t in tweets]
        return np.asarray(ids, dtype=np.int32).reshape(len(ids), max_words)

    return {**_split_arrays(picked, to_ids), "embeddings": embeddings}


def sent140_clients(data_dir: str | os.PathLike[str] | None, num_clients: int,
                    max_words: int = SENT140_MAX_WORDS) -> tuple[list[LeafClient], np.ndarray]:
    """The first ``num_clients`` Sent140 users and the embedding matrix their word ids index:
    ``x`` int32 (n, max_words), ``y`` 0/1 int64; the matrix is float32 (V + 1, 300), V the GloVe
    words that occur in these clients' tweets (a few MB instead of GloVe's 480 MB), its last row zero
    (unknown word and padding)."""
    _check_count("num_clients", num_clients)
    _check_count("max_words", max_words)
    base, train, test = _find_leaf("sent140", data_dir)
    glove = _find_glove(base, train)
    convert = partial(_sent140_user, how_to_get("sent140"))

    def decode() -> dict[str, np.ndarray]:
        return _sent140_arrays(_select("sent140", train, test, num_clients, convert), glove, max_words)

    variant = _variant("", num_clients, max_words)
    folder = decoded_dir("sent140", _sources(train, test, glove), variant=variant)
    arrays = cached_arrays(folder, (*_ARRAYS, "embeddings"), decode)
    return _clients(arrays, lambda ids: ids), arrays["embeddings"]


# --- GloVe -------------------------------------------------------------------------------------------
def _embeddings(path: Path, needed: set[str]) -> dict[str, np.ndarray]:
    """The vectors of the ``needed`` words found in GloVe's text file or LEAF's ``embs.json``, read
    as a stream: all 400k x 300 would take gigabytes as Python floats. A word listed twice keeps its
    last vector, as the dict LEAF's ``get_word_emb_arr`` builds."""
    try:
        if path.suffix == ".json":
            return _embs_json_vectors(path, needed)
        return _glove_text_vectors(path, needed)
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"cannot read {path} ({err}); download {GLOVE_URL} again.") from None


def _glove_text_vectors(path: Path, needed: set[str]) -> dict[str, np.ndarray]:
    """``word v1 ... v300`` lines; only the needed words' numbers are parsed, every line's count
    is checked (a cut download ends in a short line)."""
    found: dict[str, np.ndarray] = {}
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            word, _, rest = line.rstrip().partition(" ")
            if not rest or rest.count(" ") + 1 != GLOVE_DIM:
                raise _bad_glove_line(path, lineno, f"{rest.count(' ') + 1 if rest else 0} numbers")
            if word in needed:
                try:
                    found[word] = np.asarray([float(v) for v in rest.split(" ")]).astype(np.float32)
                except ValueError:
                    raise _bad_glove_line(path, lineno, "a value that is not a number") from None
    return found


def _bad_glove_line(path: Path, lineno: int, got: str) -> DataError:
    return DataError(f"{path} line {lineno}: expected a word and {GLOVE_DIM} numbers, got {got}; the file "
                     f"is damaged or not glove.6B.300d.txt: download {GLOVE_URL} again.")


def _embs_json_vectors(path: Path, needed: set[str]) -> dict[str, np.ndarray]:
    """``{"vocab": [words], "emba": [[300 floats] per word, zeros]}`` as LEAF's ``get_embs.py``
    writes it (vocab first), walked value by value."""
    with path.open(encoding="utf-8") as fh:
        stream = _JsonStream(fh, path)
        stream.take("{")
        vocab: list[str] | None = None
        found: dict[str, np.ndarray] | None = None
        while stream.peek() != "}":
            key = stream.value()
            stream.take(":")
            if key == "vocab":
                vocab = _embs_vocab(stream)
            elif key == "emba":
                if vocab is None:
                    raise stream.error("'emba' comes before 'vocab' (LEAF's get_embs.py writes vocab first)")
                found = _embs_rows(stream, vocab, needed)
            else:
                stream.value()
            if stream.take(",}") == "}":
                break
    if vocab is None or found is None:
        raise DataError(f"{path} has no {'vocab' if vocab is None else 'emba'!r} key; it is not the "
                        f"embs.json LEAF's models/sent140/get_embs.sh writes.")
    return found


def _embs_vocab(stream: _JsonStream) -> list[str]:
    vocab = stream.value()
    if not isinstance(vocab, list) or not all(isinstance(w, str) for w in vocab):
        raise stream.error("'vocab' is not a list of words")
    return vocab


def _embs_rows(stream: _JsonStream, vocab: list[str], needed: set[str]) -> dict[str, np.ndarray]:
    """Rows of ``emba``: the needed words' parsed and checked, the others skipped unparsed."""
    found: dict[str, np.ndarray] = {}
    stream.take("[")
    row = 0
    while stream.peek() != "]":
        word = vocab[row] if row < len(vocab) else None
        if word is not None and word in needed:
            found[word] = _embs_vector(stream, row, word)
        else:
            stream.skip_flat_array()
        row += 1
        if stream.take(",]") == "]":
            break
    else:
        stream.take("]")
    if row not in (len(vocab), len(vocab) + 1):
        raise stream.error(f"'emba' has {row} rows for {len(vocab)} words in 'vocab'")
    return found


def _embs_vector(stream: _JsonStream, row: int, word: str) -> np.ndarray:
    values = stream.value()
    try:
        vector = np.asarray(values, dtype=np.float64)
    except (ValueError, TypeError):
        vector = np.empty(0)
    if vector.shape != (GLOVE_DIM,) or isinstance(values, str):
        raise stream.error(f"'emba'[{row}] (the vector of {word!r}) is not {GLOVE_DIM} numbers")
    return vector.astype(np.float32)


class _JsonStream:
    """Just enough of an incremental JSON reader to walk embs.json (about 1 GB of text) one value
    at a time with the standard decoder, holding only a window of the file."""

    _DECODER = json.JSONDecoder()

    def __init__(self, fh: TextIO, path: Path, chunk: int = 1 << 20) -> None:
        self._fh, self._path, self._chunk = fh, path, chunk
        self._buf, self._pos, self._done, self._consumed = "", 0, False, 0

    def error(self, what: str) -> DataError:
        return DataError(f"{self._path} near character {self._consumed + self._pos}: {what}; it is not the "
                         "embs.json LEAF's models/sent140/get_embs.sh writes: run it again.")

    def _more(self) -> bool:
        """Append the next chunk to the window (dropping what was consumed); False at the end."""
        data = "" if self._done else self._fh.read(self._chunk)
        if not data:
            self._done = True
            return False
        self._consumed += self._pos
        self._buf, self._pos = self._buf[self._pos:] + data, 0
        return True

    def peek(self) -> str:
        """The next non-space character, not consumed; "" at the end of the file."""
        while True:
            while self._pos < len(self._buf) and self._buf[self._pos] in " \t\n\r":
                self._pos += 1
            if self._pos < len(self._buf):
                return self._buf[self._pos]
            if not self._more():
                return ""

    def take(self, allowed: str) -> str:
        """Consume the next character, which must be one of ``allowed``."""
        char = self.peek()
        if not char or char not in allowed:
            raise self.error(f"expected one of {allowed!r}, found {char!r}" if char else "it ends early")
        self._pos += 1
        return char

    def value(self) -> Any:
        """Decode the next whole value, widening the window until it fits (a value that ends exactly
        at the window's end, such as a number, may continue in the next chunk)."""
        if not self.peek():
            raise self.error("it ends early")
        while True:
            try:
                obj, end = self._DECODER.raw_decode(self._buf, self._pos)
            except json.JSONDecodeError as err:
                if not self._more():
                    raise self.error(err.msg) from None
                continue
            if end < len(self._buf) or not self._more():
                self._pos = end
                return obj

    def skip_flat_array(self) -> None:
        """Skip an array of numbers without parsing it (embedding rows of words no tweet uses)."""
        self.take("[")
        while (end := self._buf.find("]", self._pos)) < 0:
            self._pos = len(self._buf)
            if not self._more():
                raise self.error("it ends early")
        self._pos = end + 1
