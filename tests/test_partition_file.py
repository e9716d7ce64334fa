"""Partitions made elsewhere: fedrep's JSON index file and PFLlib's folders, read and refused."""

from __future__ import annotations

import json
import pickle
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from fedrep.config import ConfigError
from fedrep.data import partition_file as pf
from fedrep.data.partition import ClientIndices
from fedrep.data.partition_file import (
    PARTITION_FILE_SCHEMA,
    PartitionFileError,
    check_pfllib,
    inspect_pfllib,
    is_pfllib_folder,
    load_pfllib_client,
    read_index_partition,
    write_index_partition,
)
from fedrep.data.store import DataError
from fixtures_partitions import (
    RunsCommand,
    disjoint_parts,
    pfllib_client_data,
    write_npz,
    write_pfllib_folder,
)

SIZES = [(30, 10), (7, 3), (12, 0)]  # the last client has an empty test split, which is allowed


def _one_line(err: pytest.ExceptionInfo[BaseException]) -> str:
    text = str(err.value)
    assert "\n" not in text, text
    return text


# --- PFLlib folders -----------------------------------------------------------------------------


def test_pfllib_folder_replays_exactly(tmp_path: Path):
    root = write_pfllib_folder(tmp_path / "MNIST", SIZES, num_classes=10, shape=(1, 28, 28), seed=4)
    assert is_pfllib_folder(root)
    folder = check_pfllib(root, num_clients=3)
    assert (folder.num_clients, folder.num_classes, folder.sample_shape) == (3, 10, (1, 28, 28))
    written = pfllib_client_data(SIZES, num_classes=10, shape=(1, 28, 28), seed=4)
    for client, (train, test) in enumerate(written):
        x_train, y_train, x_test, y_test = load_pfllib_client(root, client)
        assert (x_train.dtype, y_train.dtype, x_test.dtype, y_test.dtype) == (
            np.float32, np.int64, np.float32, np.int64)
        assert (len(y_train), len(y_test)) == SIZES[client]
        np.testing.assert_array_equal(x_train, train["x"])
        np.testing.assert_array_equal(y_train, train["y"])
        np.testing.assert_array_equal(x_test, test["x"])
        np.testing.assert_array_equal(y_test, test["y"])
        assert x_test.shape == (SIZES[client][1], 1, 28, 28)


def test_pfllib_any_sample_shape_and_class_count(tmp_path: Path):
    """The images need not come from a data set fedrep knows."""
    root = write_pfllib_folder(tmp_path / "Custom", [(5, 2), (4, 4)], num_classes=3, shape=(3, 8, 6))
    folder = check_pfllib(root, 2)
    assert (folder.num_classes, folder.sample_shape) == (3, (3, 8, 6))
    assert load_pfllib_client(root, 1)[0].shape == (4, 3, 8, 6)


def test_inspect_reads_only_config_and_client_zero(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    root = write_pfllib_folder(tmp_path / "p", SIZES)
    for path in [*root.glob("test/*.npz"), root / "train" / "1.npz", root / "train" / "2.npz"]:
        path.unlink()
    opened: list[str] = []
    real_zipfile = zipfile.ZipFile

    def counting(file, *args, **kwargs):
        opened.append(str(file))
        return real_zipfile(file, *args, **kwargs)

    monkeypatch.setattr(pf.zipfile, "ZipFile", counting)
    folder = inspect_pfllib(root)
    assert (folder.num_clients, folder.sample_shape) == (3, (1, 28, 28))
    assert opened == [str(root / "train" / "0.npz")]
    with pytest.raises(DataError, match="test/0.npz is missing"):
        check_pfllib(root, 3)


def test_is_pfllib_folder(tmp_path: Path):
    assert not is_pfllib_folder(tmp_path)
    assert not is_pfllib_folder(tmp_path / "absent")
    (tmp_path / "config.json").write_text("{}")
    assert not is_pfllib_folder(tmp_path)  # no train/
    (tmp_path / "train").mkdir()
    assert is_pfllib_folder(tmp_path)
    assert not is_pfllib_folder(tmp_path / "config.json")


def _config(root: Path, **changes: object) -> None:
    config = json.loads((root / "config.json").read_text())
    config.update(changes)
    config = {k: v for k, v in config.items() if v is not None}
    (root / "config.json").write_text(json.dumps(config))


def _client1(split: str = "train") -> Callable[[Path], Path]:
    return lambda root: root / split / "1.npz"


# (name, how to damage a good 2-client folder, the file the message must name, a phrase it must hold)
BAD_FOLDERS: list[tuple[str, Callable[[Path], object], str, str]] = [
    ("no config.json", lambda r: (r / "config.json").unlink(), "config.json", "missing"),
    ("config not JSON", lambda r: (r / "config.json").write_text("{num_clients: 2"), "config.json",
     "not JSON"),
    ("config without num_classes", lambda r: _config(r, num_classes=None), "config.json", "num_classes"),
    ("config num_clients not a number", lambda r: _config(r, num_clients="2"), "config.json", "num_clients"),
    ("no train/1.npz", lambda r: (r / "train" / "1.npz").unlink(), "train/1.npz", "missing"),
    ("no test/1.npz", lambda r: (r / "test" / "1.npz").unlink(), "test/1.npz", "missing"),
    ("no test/0.npz", lambda r: (r / "test" / "0.npz").unlink(), "test/0.npz", "missing"),
    ("not a zip", lambda r: (r / "train" / "1.npz").write_bytes(b"not a zip file"), "train/1.npz",
     "cannot be read"),
    ("truncated npz", lambda r: (r / "test" / "1.npz").write_bytes((r / "test" / "1.npz").read_bytes()[:60]),
     "test/1.npz", "cannot be read"),
    ("npz without data", lambda r: write_npz(_client1()(r), x=np.zeros((2, 1, 28, 28), np.float32),
                                             y=np.zeros(2, np.int64)), "train/1.npz", "no 'data'"),
    ("data not a dict", lambda r: write_npz(_client1()(r), data=np.zeros(3)), "train/1.npz", "dict"),
    ("dict without y", lambda r: write_npz(_client1()(r), data={"x": np.zeros((2, 1, 28, 28), np.float32)}),
     "train/1.npz", "'x' and 'y'"),
    ("len(x) != len(y)", lambda r: write_npz(_client1()(r), data={
        "x": np.zeros((3, 1, 28, 28), np.float32), "y": np.zeros(2, np.int64)}), "train/1.npz",
     "3 samples but 'y' holds 2"),
    ("x integer", lambda r: write_npz(_client1("test")(r), data={
        "x": np.zeros((2, 1, 28, 28), np.int64), "y": np.zeros(2, np.int64)}), "test/1.npz", "float array"),
    ("x 1-D", lambda r: write_npz(_client1()(r), data={
        "x": np.zeros(2, np.float32), "y": np.zeros(2, np.int64)}), "train/1.npz", "2 dimensions"),
    ("x a list", lambda r: write_npz(_client1()(r), data={"x": [[0.0]], "y": np.zeros(1, np.int64)}),
     "train/1.npz", "float array"),
    ("y float", lambda r: write_npz(_client1()(r), data={
        "x": np.zeros((2, 1, 28, 28), np.float32), "y": np.zeros(2, np.float32)}), "train/1.npz",
     "integer label"),
    ("other sample shape", lambda r: write_npz(_client1("test")(r), data={
        "x": np.zeros((2, 1, 28, 27), np.float32), "y": np.zeros(2, np.int64)}), "test/1.npz",
     "client 0's have (1, 28, 28)"),
    ("label too big", lambda r: write_npz(_client1()(r), data={
        "x": np.zeros((2, 1, 28, 28), np.float32), "y": np.array([0, 10])}), "train/1.npz",
     "label 10 is outside 0..9"),
    ("negative label", lambda r: write_npz(_client1()(r), data={
        "x": np.zeros((2, 1, 28, 28), np.float32), "y": np.array([-1, 0])}), "train/1.npz",
     "label -1 is outside"),
    ("empty train split", lambda r: write_npz(_client1()(r), data={
        "x": np.zeros((0, 1, 28, 28), np.float32), "y": np.zeros(0, np.int64)}), "train/1.npz",
     "no train samples"),
    ("NaN pixels", lambda r: write_npz(_client1()(r), data={
        "x": np.full((2, 1, 28, 28), np.nan, np.float32), "y": np.zeros(2, np.int64)}), "train/1.npz", "NaN"),
]


@pytest.mark.parametrize(("damage", "file", "phrase"), [case[1:] for case in BAD_FOLDERS],
                         ids=[case[0] for case in BAD_FOLDERS])
def test_bad_pfllib_folder_refused_naming_the_file(tmp_path: Path, damage, file: str, phrase: str):
    root = write_pfllib_folder(tmp_path / "p", [(6, 3), (5, 2)])
    damage(root)
    with pytest.raises((DataError, PartitionFileError)) as err:
        check_pfllib(root, 2)
    text = _one_line(err)
    assert str(root / file) in text, text
    assert phrase in text, text


def test_num_clients_mismatch_names_the_fix(tmp_path: Path):
    root = write_pfllib_folder(tmp_path / "p", [(6, 3), (5, 2)])
    with pytest.raises(PartitionFileError) as err:
        check_pfllib(root, 5)
    text = _one_line(err)
    assert str(root / "config.json") in text and "--set num-clients=2" in text
    assert isinstance(err.value, ConfigError)


def test_load_client_out_of_range(tmp_path: Path):
    root = write_pfllib_folder(tmp_path / "p", [(6, 3), (5, 2)])
    with pytest.raises(PartitionFileError, match=r"client 2 is outside 0\.\.1"):
        load_pfllib_client(root, 2)


def test_load_client_checks_shape_against_client_zero(tmp_path: Path):
    root = write_pfllib_folder(tmp_path / "p", [(6, 3), (5, 2)])
    write_npz(root / "train" / "1.npz", data={"x": np.zeros((2, 3, 28, 28), np.float32),
                                              "y": np.zeros(2, np.int64)})
    with pytest.raises(DataError, match="client 0's have"):
        load_pfllib_client(root, 1)


def test_load_client_sees_a_replaced_client_zero(tmp_path: Path):
    """The per-process inspect cache is keyed on the files, so a regenerated folder is re-read."""
    root = write_pfllib_folder(tmp_path / "p", [(6, 3), (5, 2)], num_classes=10)
    assert load_pfllib_client(root, 1)[0].shape[1:] == (1, 28, 28)
    write_pfllib_folder(root, [(6, 3), (5, 2)], shape=(3, 4, 4), seed=9)
    assert load_pfllib_client(root, 1)[0].shape[1:] == (3, 4, 4)


@pytest.mark.parametrize("where", ["data", "x"])
@pytest.mark.parametrize("split_file", ["train/0.npz", "test/1.npz"])
def test_malicious_pickle_refused_without_running(tmp_path: Path, where: str, split_file: str):
    root = write_pfllib_folder(tmp_path / "p", [(6, 3), (5, 2)])
    marker, control = tmp_path / "pwned", tmp_path / "contr"  # same length: the pickle stays valid
    hostile = RunsCommand(f"touch {marker}")
    content = hostile if where == "data" else {"x": hostile, "y": np.zeros(1, np.int64)}
    write_npz(root / split_file, data=content)
    # the file really is hostile: a plain unpickler would run it (here against the control marker)
    with zipfile.ZipFile(root / split_file) as archive, archive.open("data.npy") as member:
        np.lib.format.read_magic(member)
        np.lib.format.read_array_header_1_0(member)
        raw = member.read()
    pickle.loads(raw.replace(str(marker).encode(), str(control).encode()))
    assert control.exists()
    with pytest.raises(DataError) as err:
        check_pfllib(root, 2)
    text = _one_line(err)
    assert str(root / split_file) in text and "refusing to load" in text, text
    with pytest.raises(DataError):
        load_pfllib_client(root, 1)
    assert not marker.exists()


# --- fedrep's JSON index file -------------------------------------------------------------------


def _assert_same(a: list[ClientIndices], b: list[ClientIndices]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.train.dtype == np.int64 and x.test.dtype == np.int64
        np.testing.assert_array_equal(x.train, y.train)
        np.testing.assert_array_equal(x.test, y.test)


@pytest.mark.parametrize("dataset", ["fashion-mnist", None])
def test_index_partition_round_trips(tmp_path: Path, dataset: str | None):
    parts = disjoint_parts(7, num_train=200, num_test=50, seed=2)
    path = tmp_path / "p.json"
    write_index_partition(path, parts, dataset)
    raw = json.loads(path.read_text())
    assert raw["format"] == "fedrep-partition/1" and ("dataset" in raw) == (dataset is not None)
    _assert_same(read_index_partition(path, 7, 200, 50, "fashion-mnist"), parts)


def test_index_partition_sorts_and_allows_empty_test(tmp_path: Path):
    path = tmp_path / "p.json"
    clients = [{"train": [9, 1, 4], "test": []}, {"train": [0], "test": [2, 1]}]
    path.write_text(json.dumps({"format": "fedrep-partition/1", "clients": clients}))
    parts = read_index_partition(path, 2, 10, 3, "fashion-mnist")
    _assert_same(parts, [ClientIndices(np.array([1, 4, 9]), np.array([], np.int64)),
                         ClientIndices(np.array([0]), np.array([1, 2]))])


def test_schema_text_example_is_a_valid_file(tmp_path: Path):
    """The printed schema stays accurate: its example reads, and it names every rule we enforce."""
    lines = PARTITION_FILE_SCHEMA.splitlines()
    example = "\n".join(lines[1:lines.index(next(line for line in lines if line.startswith("- ")))])
    path = tmp_path / "example.json"
    path.write_text(example)
    parts = read_index_partition(path, 2, 10, 3, "fashion-mnist")
    assert [p.train.tolist() for p in parts] == [[0, 5, 9], [3, 4]]
    for phrase in ("fedrep-partition/1", "num-clients", "must not be empty", "twice", "two clients",
                   "No other keys"):
        assert phrase in PARTITION_FILE_SCHEMA


def _file(clients: object, **top: object) -> dict:
    return {"format": "fedrep-partition/1", "dataset": "fashion-mnist", "clients": clients, **top}


GOOD = [{"train": [0, 1], "test": [0]}, {"train": [2, 3], "test": [1]}]

# (name, file content, phrases the one-line message must hold); run with 2 clients, 10 train, 5 test
BAD_FILES: list[tuple[str, object, list[str]]] = [
    ("not JSON", "{'format': 1", ["is not JSON"]),
    ("not an object", [1, 2], ["must be a JSON object"]),
    ("wrong format", {**_file(GOOD), "format": "fedrep-partition/2"}, ["'format'", "fedrep-partition/1"]),
    ("no format", {"clients": GOOD}, ["'format' is missing"]),
    ("no clients", {"format": "fedrep-partition/1"}, ["'clients' is missing"]),
    ("unknown top key", _file(GOOD, seed=3), ["unknown key 'seed'", "format, dataset, clients"]),
    ("unknown client key", _file([GOOD[0], {**GOOD[1], "labels": [1]}]),
     ["client 1 has an unknown key 'labels'", "train, test"]),
    ("client missing test", _file([GOOD[0], {"train": [2]}]), ["client 1 test is missing"]),
    ("client not an object", _file([GOOD[0], [2, 3]]), ["client 1 must be a JSON object"]),
    ("index a string", _file([{"train": [0, "1"], "test": []}, GOOD[1]]),
     ["client 0 train[1]", "whole number"]),
    ("index a float", _file([{"train": [0.0], "test": []}, GOOD[1]]), ["client 0 train[0]", "whole number"]),
    ("index a bool", _file([GOOD[0], {"train": [2], "test": [True]}]), ["client 1 test[0]", "whole number"]),
    ("other data set", {**_file(GOOD), "dataset": "cifar10"}, ["'cifar10'", "'fashion-mnist'"]),
    ("too many clients", _file([*GOOD, {"train": [5], "test": [3]}]),
     ["holds 3 clients", "num-clients=2", "--set num-clients=3"]),
    ("empty train", _file([GOOD[0], {"train": [], "test": [1]}]), ["client 1 has no train indices"]),
    ("train index too big", _file([GOOD[0], {"train": [2, 10], "test": [1]}]),
     ["client 1 train index 10 is outside 0..9"]),
    ("negative test index", _file([{"train": [0], "test": [-1]}, GOOD[1]]),
     ["client 0 test index -1 is outside 0..4"]),
    ("duplicate in a client", _file([{"train": [3, 0, 3], "test": []}, {"train": [2], "test": []}]),
     ["client 0 lists train index 3 more than once"]),
    ("train shared", _file([GOOD[0], {"train": [2, 1], "test": [1]}]),
     ["train index 1 is held by client 0 and client 1"]),
    ("test shared", _file([GOOD[0], {"train": [2], "test": [0]}]),
     ["test index 0 is held by client 0 and client 1"]),
]


@pytest.mark.parametrize(("content", "phrases"), [case[1:] for case in BAD_FILES],
                         ids=[case[0] for case in BAD_FILES])
def test_bad_index_partition_refused(tmp_path: Path, content: object, phrases: list[str]):
    path = tmp_path / "p.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    with pytest.raises(PartitionFileError) as err:
        read_index_partition(path, 2, 10, 5, "fashion-mnist")
    text = _one_line(err)
    assert text.startswith(f"partition-file {path}"), text
    for phrase in phrases:
        assert phrase in text, text
    assert isinstance(err.value, ConfigError)


def test_missing_index_partition(tmp_path: Path):
    with pytest.raises(PartitionFileError, match="does not exist"):
        read_index_partition(tmp_path / "nope.json", 2, 10, 5, "fashion-mnist")


def test_huge_index_refused_not_overflowed(tmp_path: Path):
    path = tmp_path / "p.json"
    path.write_text(json.dumps(_file([GOOD[0], {"train": [2**70], "test": []}])))
    with pytest.raises(PartitionFileError, match=f"client 1 train index {2**70} is outside"):
        read_index_partition(path, 2, 10, 5, "fashion-mnist")
