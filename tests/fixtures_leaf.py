"""Small FEMNIST / Sent140 data sets and GloVe files in the exact formats LEAF and GloVe write.

Written independently of :mod:`fedrep.data.leaf` (which it tests):

* LEAF JSON (``data/femnist/preprocess/data_to_json.py``, ``data/sent140/preprocess/data_to_json.py``,
  ``data/utils/split_data.py``): one ``json.dump`` of ``{"users", "num_samples", "user_data"}`` per
  file (FEMNIST also ``"hierarchies"``), under ``<root>/data/train`` and ``<root>/data/test`` with
  the same file names, the users split over ``files`` files. The second file is written first, so
  a loader that reads by creation time instead of by name would fail.
* FEMNIST pixels are numpy's ``vec / 255`` of uint8 values, dumped as Python floats.
* Sent140 rows are ``[tweet id, date, query, user, text]`` (the Sentiment140 CSV minus the label).
* GloVe text: ``word v1 ... v300`` per line; LEAF's ``models/sent140/get_embs.py`` makes
  ``{"vocab": [...], "emba": [... one row per word, then a row of zeros]}`` of it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

SIDE = 28
SPLITS = ("train", "test")
DATE = "Mon Apr 06 22:19:45 PDT 2009"

Written = dict[str, dict[str, tuple[object, np.ndarray]]]  # split -> user -> (x, labels)


def leaf_file_name(index: int, split: str) -> str:
    """The names ``split_data.py`` gives (``all_data_<k>_niid_<...>_keep_0_<split>_9.json``)."""
    return f"all_data_{index}_niid_1_keep_0_{split}_9.json"


def write_leaf_json(path: Path, users: Mapping[str, tuple[list, list]], hierarchies: bool = False) -> Path:
    """One LEAF file holding ``users`` (name -> (x, y)) in the given order."""
    data: dict[str, object] = {
        "users": list(users),
        "num_samples": [len(y) for _, y in users.values()],
        "user_data": {u: {"x": x, "y": y} for u, (x, y) in users.items()},
    }
    if hierarchies:
        data["hierarchies"] = [f"writer_{i}" for i in range(len(users))]
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as fh:
        json.dump(data, fh)
    return path


def _write_splits(root: Path, rows: dict[str, dict[str, tuple[list, list]]], files: int,
                  hierarchies: bool) -> None:
    """``rows`` (split -> user -> (x, y)) over ``files`` files per split, users in order."""
    users = list(rows["train"])
    groups = [list(g) for g in np.array_split(np.arange(len(users)), files)]
    for index in reversed(range(files)):  # the last file first: reading order must come from names
        for split in SPLITS:
            chosen = {users[i]: rows[split][users[i]] for i in groups[index]}
            write_leaf_json(root / "data" / split / leaf_file_name(index, split), chosen, hierarchies)


def _femnist_labels(count: int) -> dict[str, tuple[list[int], list[int]]]:
    """``count`` users with digits, upper- and lower-case letters in train and digits in test."""
    return {f"f{i:04d}_{(7 * i) % 100:02d}": ([i % 10, (i + 3) % 10, 10 + i % 26, 36 + i % 10, 36 + i % 3],
                                             [(i + 1) % 10, 36 + (i + 2) % 10])
            for i in range(count)}


def write_leaf_femnist(root: Path, users: Mapping[str, tuple[Sequence[int], Sequence[int]]] | int, *,
                       files: int = 2, seed: int = 0, exact: bool = True) -> Written:
    """FEMNIST LEAF files under ``root/data/{train,test}``; ``users`` maps a name to its (train labels,
    test labels), or is a count of generated users. Pixels are random k/255 (``exact``) or values
    that are not k/255. Returns split -> user -> (images float64 (n, 28, 28), labels) as written."""
    spec = _femnist_labels(users) if isinstance(users, int) else users
    rng = np.random.default_rng(seed)
    written: Written = {s: {} for s in SPLITS}
    rows: dict[str, dict[str, tuple[list, list]]] = {s: {} for s in SPLITS}
    for user, per_split in spec.items():
        for split, labels in zip(SPLITS, per_split, strict=True):
            codes = rng.integers(0, 256, size=(len(labels), SIDE * SIDE))
            values = codes / 255 if exact else (codes + 0.5) / 256
            rows[split][user] = (values.tolist(), [int(v) for v in labels])
            written[split][user] = (values.reshape(-1, SIDE, SIDE), np.asarray(labels, dtype=np.int64))
    _write_splits(root, rows, files, hierarchies=True)
    return written


def _sent140_tweets(count: int) -> dict[str, tuple[list[tuple[str, int]], list[tuple[str, int]]]]:
    words = ["the", "cat", "is", "happy", "sad", "today", "!", "not", "good"]
    return {f"user{i:03d}": ([(f"{words[i % 9]} {words[(i + 2) % 9]} day{i} !", i % 2),
                              (f"not {words[(i + 4) % 9]} .", (i + 1) % 2)],
                             [(f"{words[(i + 1) % 9]} , {words[(i + 5) % 9]}", i % 2)])
            for i in range(count)}


def write_leaf_sent140(root: Path,
                       users: Mapping[str, tuple[Sequence[tuple[str, int]], Sequence[tuple[str, int]]]] | int,
                       *, files: int = 2) -> Written:
    """Sent140 LEAF files under ``root/data/{train,test}``; ``users`` maps a name to its (train,
    test) lists of (tweet text, label 0/1), or is a count of generated users. Returns split -> user
    -> (texts, labels) as written."""
    spec = _sent140_tweets(users) if isinstance(users, int) else users
    written: Written = {s: {} for s in SPLITS}
    rows: dict[str, dict[str, tuple[list, list]]] = {s: {} for s in SPLITS}
    tweet_id = 1467810369
    for user, per_split in spec.items():
        for split, tweets in zip(SPLITS, per_split, strict=True):
            x = []
            for text, _ in tweets:
                tweet_id += 1
                x.append([str(tweet_id), DATE, "NO_QUERY", user, text])
            rows[split][user] = (x, [int(label) for _, label in tweets])
            labels = np.array([label for _, label in tweets], dtype=np.int64)
            written[split][user] = ([text for text, _ in tweets], labels)
    _write_splits(root, rows, files, hierarchies=False)
    return written


def glove_vectors(words: Sequence[str], dim: int = 300, seed: int = 0) -> dict[str, list[str]]:
    """Each word's numbers as GloVe prints them (5 decimals, possibly negative)."""
    rng = np.random.default_rng(seed)
    return {w: [f"{v:.5f}" for v in rng.uniform(-1, 1, size=dim)] for w in words}


def _as_float32(numbers: list[str]) -> np.ndarray:
    return np.array([float(v) for v in numbers]).astype(np.float32)


def write_glove(path: Path, words: Sequence[str], dim: int = 300, seed: int = 0) -> dict[str, np.ndarray]:
    """A ``glove.6B.300d.txt``-format file; returns each word's vector as float32."""
    vectors = glove_vectors(words, dim, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{w} {' '.join(v)}\n" for w, v in vectors.items()), encoding="utf-8")
    return {w: _as_float32(v) for w, v in vectors.items()}


def write_embs_json(path: Path, words: Sequence[str], dim: int = 300, seed: int = 0) -> dict[str, np.ndarray]:
    """What LEAF's ``get_embs.py`` makes of :func:`write_glove`'s file (same numbers for the same
    seed): vocab, one float row per word, one zero row for unknown words."""
    vectors = glove_vectors(words, dim, seed)
    emba = [[float(n) for n in v] for v in vectors.values()] + [[0.0] * dim]
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as fh:
        json.dump({"vocab": list(vectors), "emba": emba}, fh)
    return {w: _as_float32(v) for w, v in vectors.items()}
