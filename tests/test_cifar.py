"""CIFAR-10/100 loading from small copies in the real formats (tests/fixtures_cifar.py): both layouts,
exact pixel order, every refusal, the verified download from a loopback server, the decode cache."""

from __future__ import annotations

import dataclasses
import functools
import http.server
import os
import tarfile
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from fedrep.data import cifar
from fedrep.data.store import DataError, cache_dir, sha256_of
from fixtures_cifar import (
    LAYOUTS,
    batch_dict,
    split_arrays,
    write_cifar_archive,
    write_cifar_folder,
    write_pickle,
)


@pytest.fixture(autouse=True)
def _hermetic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A cache of this test's own (the decode-once checks count on an empty one), no data folder
    from the environment, and offline unless a test says otherwise."""
    monkeypatch.setenv("FEDREP_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("FEDREP_DATA_DIR", raising=False)
    monkeypatch.setenv("FEDREP_OFFLINE", "1")


def _trust(monkeypatch: pytest.MonkeyPatch, name: str, archive: Path, **changes: object) -> None:
    """Make SPECS[name] publish ``archive``'s checksum and size (plus ``changes``, e.g. a url)."""
    spec = dataclasses.replace(cifar.SPECS[name], sha256=sha256_of(archive), size=archive.stat().st_size,
                               **changes)
    monkeypatch.setitem(cifar.SPECS, name, spec)


def _assert_matches_fixture(name: str, train: cifar.Split, test: cifar.Split, per_batch: int = 20) -> None:
    for split, got in (("train", train), ("test", test)):
        data, labels = split_arrays(name, split, per_batch)
        assert got.images.dtype == np.uint8 and got.images.shape == (len(data), 32, 32, 3)
        assert got.labels.dtype == np.int64 and got.labels.shape == (len(data),)
        np.testing.assert_array_equal(got.labels, labels)
        # Pixel (r, c) of channel ch is byte 1024 ch + 32 r + c of the row: indexed, not reshaped.
        r, c, ch = np.meshgrid(np.arange(32), np.arange(32), np.arange(3), indexing="ij")
        np.testing.assert_array_equal(got.images, data[:, ch * 1024 + r * 32 + c])
    first = train.images[0]  # the fixture's image with constant planes R=10, G=20, B=30
    assert (first[..., 0] == 10).all() and (first[..., 1] == 20).all() and (first[..., 2] == 30).all()
    ramp = train.images[1, ..., 0]  # R[r, c] = (32 r + c) % 256: rows are rows, not columns
    assert ramp[0, 1] == 1 and ramp[1, 0] == 32 and ramp[3, 5] == 101


def _one_line(err: pytest.ExceptionInfo[DataError]) -> str:
    msg = str(err.value)
    assert "\n" not in msg
    return msg


# --- the two layouts -----------------------------------------------------------------------------
@pytest.mark.parametrize("name", cifar.DATASETS)
def test_extracted_folder_loads_with_exact_pixels_and_labels(tmp_path: Path, name: str):
    folder = write_cifar_folder(tmp_path / "data", name)
    assert cifar.locate(name, tmp_path / "data") == folder
    train, test = cifar.load(name, tmp_path / "data")
    per_member = 20
    assert len(train.labels) == per_member * len(LAYOUTS[name].train)
    assert len(test.labels) == per_member * len(LAYOUTS[name].test)
    _assert_matches_fixture(name, train, test)


def test_cifar100_uses_the_fine_labels(tmp_path: Path):
    write_cifar_folder(tmp_path, "cifar100", per_batch=200)
    train, _ = cifar.load("cifar100", tmp_path)
    fine = np.asarray(batch_dict("cifar100", "train", per_batch=200)[b"fine_labels"])
    np.testing.assert_array_equal(train.labels, fine)
    assert train.labels.max() > 19  # beyond the 20 coarse classes


def test_data_dir_may_be_the_extracted_folder_itself_even_renamed(tmp_path: Path):
    folder = write_cifar_folder(tmp_path, "cifar10")
    _assert_matches_fixture("cifar10", *cifar.load("cifar10", folder))
    renamed = folder.rename(tmp_path / "my-cifar")
    assert cifar.locate("cifar10", renamed) == renamed


def test_fedrep_data_dir_is_searched(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    folder = write_cifar_folder(tmp_path, "cifar10")
    monkeypatch.setenv("FEDREP_DATA_DIR", str(tmp_path))
    assert cifar.locate("cifar10") == folder


@pytest.mark.parametrize("name", cifar.DATASETS)
def test_archive_loads_when_its_checksum_is_the_published_one(tmp_path: Path, monkeypatch, name: str):
    archive = write_cifar_archive(tmp_path, name)
    _trust(monkeypatch, name, archive)
    assert cifar.locate(name, tmp_path) == archive
    _assert_matches_fixture(name, *cifar.load(name, tmp_path))
    assert not (tmp_path / LAYOUTS[name].folder).exists()  # read from the tar.gz, nothing extracted


def test_archive_is_preferred_over_the_folder_next_to_it(tmp_path: Path):
    write_cifar_folder(tmp_path, "cifar10")
    archive = write_cifar_archive(tmp_path, "cifar10")
    assert cifar.locate("cifar10", tmp_path) == archive


def test_unknown_name_is_refused():
    with pytest.raises(ValueError, match="cifar10, cifar100"):
        cifar.locate("cifar1000")


# --- refusals ----------------------------------------------------------------------------------
def test_archive_with_another_checksum_is_refused_naming_it(tmp_path: Path):
    archive = write_cifar_archive(tmp_path, "cifar10")  # SPECS keeps the official checksum
    with pytest.raises(DataError) as err:
        cifar.load("cifar10", tmp_path)
    msg = _one_line(err)
    assert str(archive) in msg and sha256_of(archive)[:16] in msg
    assert cifar.SPECS["cifar10"].sha256[:16] in msg and str(cifar.SPECS["cifar10"].size) in msg
    assert "delete it and fetch it again" in msg.lower() and cifar.SPECS["cifar10"].url in msg
    assert not (cache_dir() / "cifar10" / "decoded").exists()  # nothing half-built in the cache


def test_truncated_archive_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    archive = write_cifar_archive(tmp_path, "cifar10", per_batch=200)
    _trust(monkeypatch, "cifar10", archive)
    archive.write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])
    with pytest.raises(DataError, match="corrupt or truncated") as err:
        cifar.load("cifar10", tmp_path)
    assert str(archive) in _one_line(err)


def test_archive_passing_its_checksum_but_unreadable_is_refused(tmp_path: Path, monkeypatch):
    """A checksum pinned to a broken file (a hand-edited SPECS) still gives one line, not a traceback."""
    archive = write_cifar_archive(tmp_path, "cifar10", per_batch=200)
    archive.write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])
    _trust(monkeypatch, "cifar10", archive)
    with pytest.raises(DataError) as err:
        cifar.load("cifar10", tmp_path)
    assert str(archive) in _one_line(err)


def test_archive_without_a_batch_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    folder = write_cifar_folder(tmp_path / "staging", "cifar10")
    (folder / "test_batch").unlink()
    archive = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname=folder.name)
    _trust(monkeypatch, "cifar10", archive)
    with pytest.raises(DataError, match="has no member cifar-10-batches-py/test_batch") as err:
        cifar.load("cifar10", tmp_path)
    assert str(archive) in _one_line(err)


def test_truncated_pickle_in_folder_is_refused(tmp_path: Path):
    folder = write_cifar_folder(tmp_path, "cifar10")
    victim = folder / "data_batch_4"
    victim.write_bytes(victim.read_bytes()[:1000])
    with pytest.raises(DataError, match="truncated") as err:
        cifar.load("cifar10", tmp_path)
    assert str(victim) in _one_line(err)


def test_missing_batch_file_is_named(tmp_path: Path):
    folder = write_cifar_folder(tmp_path, "cifar10")
    (folder / "data_batch_2").unlink()
    with pytest.raises(DataError, match="is missing") as err:
        cifar.load("cifar10", tmp_path)
    assert str(folder / "data_batch_2") in _one_line(err)


def test_wrong_label_count_names_file_and_key(tmp_path: Path):
    folder = write_cifar_folder(tmp_path, "cifar10")
    batch = batch_dict("cifar10", "data_batch_3")
    batch[b"labels"] = batch[b"labels"][:-1]  # type: ignore[index]
    write_pickle(folder / "data_batch_3", batch)
    with pytest.raises(DataError) as err:
        cifar.load("cifar10", tmp_path)
    assert "cifar-10-batches-py/data_batch_3: b'labels' has 19 entries for 20 images" in _one_line(err)
    assert not (cache_dir() / "cifar10" / "decoded").exists()


@pytest.mark.parametrize(("name", "member", "bad_label"),
                         [("cifar10", "data_batch_5", 10), ("cifar10", "test_batch", -1),
                          ("cifar100", "test", 100)])
def test_labels_out_of_range_are_refused(tmp_path: Path, name: str, member: str, bad_label: int):
    folder = write_cifar_folder(tmp_path, name)
    batch = batch_dict(name, member)
    key = b"fine_labels" if name == "cifar100" else b"labels"
    batch[key][7] = bad_label  # type: ignore[index]
    write_pickle(folder / member, batch)
    with pytest.raises(DataError) as err:
        cifar.load(name, tmp_path)
    assert f"{folder / member}: {key!r} holds {bad_label}" in _one_line(err)


@pytest.mark.parametrize(("data", "found"), [(np.zeros((20, 3072), np.float32), "float32"),
                                              (np.zeros((20, 1024), np.uint8), "(20, 1024)")])
def test_image_data_of_the_wrong_type_or_width_is_refused(tmp_path: Path, data: np.ndarray, found: str):
    folder = write_cifar_folder(tmp_path, "cifar10")
    batch = batch_dict("cifar10", "data_batch_1")
    batch[b"data"] = data
    write_pickle(folder / "data_batch_1", batch)
    with pytest.raises(DataError, match="expected uint8 with 3072 columns") as err:
        cifar.load("cifar10", tmp_path)
    assert f"{folder / 'data_batch_1'}: b'data' is" in _one_line(err) and found in str(err.value)


class _RunsACommand:
    """Unpickling this with plain ``pickle`` would run a shell command."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # type: ignore[override]
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("layout", ["folder", "archive"])
def test_pickle_with_code_is_refused_without_running_it(tmp_path: Path, monkeypatch, layout: str):
    marker = tmp_path / "pwned"
    data_dir = tmp_path / "data"
    folder = write_cifar_folder(tmp_path / "staging" if layout == "archive" else data_dir, "cifar10")
    batch = batch_dict("cifar10", "data_batch_1")
    batch[b"data"] = _RunsACommand(marker)
    write_pickle(folder / "data_batch_1", batch)
    if layout == "archive":
        data_dir.mkdir()
        with tarfile.open(data_dir / "cifar-10-python.tar.gz", "w:gz") as tar:
            tar.add(folder, arcname=folder.name)
        _trust(monkeypatch, "cifar10", data_dir / "cifar-10-python.tar.gz")
    with pytest.raises(DataError, match="refusing to load") as err:
        cifar.load("cifar10", data_dir)
    assert "data_batch_1" in _one_line(err)
    assert not marker.exists()


# --- download ----------------------------------------------------------------------------------
class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the base class's name
        pass


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    """A loopback HTTP server over ``tmp_path/served``: (that folder, its base URL)."""
    root = tmp_path / "served"
    root.mkdir()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0),
                                             functools.partial(_QuietHandler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield root, f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def _raw_files(name: str) -> list[str]:
    raw = cache_dir() / name / "raw"
    return sorted(p.name for p in raw.iterdir()) if raw.exists() else []


def test_download_is_kept_when_its_checksum_matches(served, monkeypatch: pytest.MonkeyPatch):
    root, base = served
    archive = write_cifar_archive(root, "cifar10")
    _trust(monkeypatch, "cifar10", archive, url=base + archive.name)
    monkeypatch.delenv("FEDREP_OFFLINE")
    got = cifar.locate("cifar10")
    assert got == cache_dir() / "cifar10" / "raw" / "cifar-10-python.tar.gz"
    assert got.read_bytes() == archive.read_bytes()
    archive.unlink()  # a second call uses the downloaded copy, no new request
    _assert_matches_fixture("cifar10", *cifar.load("cifar10"))
    assert _raw_files("cifar10") == ["cifar-10-python.tar.gz"]


def test_download_with_the_wrong_checksum_leaves_nothing(served, monkeypatch: pytest.MonkeyPatch):
    root, base = served
    archive = write_cifar_archive(root, "cifar100")
    _trust(monkeypatch, "cifar100", archive, url=base + archive.name)
    monkeypatch.setitem(cifar.SPECS, "cifar100",
                        dataclasses.replace(cifar.SPECS["cifar100"], sha256="0" * 64))
    monkeypatch.delenv("FEDREP_OFFLINE")
    with pytest.raises(DataError, match="wrong checksum") as err:
        cifar.load("cifar100")
    assert base + archive.name in _one_line(err)
    assert _raw_files("cifar100") == []


def test_failed_download_leaves_nothing(served, monkeypatch: pytest.MonkeyPatch):
    _, base = served
    monkeypatch.setitem(cifar.SPECS, "cifar10",
                        dataclasses.replace(cifar.SPECS["cifar10"], url=base + "no-such-file.tar.gz"))
    monkeypatch.delenv("FEDREP_OFFLINE")
    with pytest.raises(DataError, match="failed") as err:
        cifar.load("cifar10")
    assert "404" in _one_line(err)
    assert _raw_files("cifar10") == []


def test_offline_gives_not_found_with_how_to_get_it(served, monkeypatch: pytest.MonkeyPatch):
    root, base = served  # reachable, so only the rules can stop the download
    archive = write_cifar_archive(root, "cifar10")
    _trust(monkeypatch, "cifar10", archive, url=base + archive.name)
    with pytest.raises(DataError, match="CIFAR-10 not found") as err:  # FEDREP_OFFLINE=1
        cifar.load("cifar10")
    msg = _one_line(err)
    assert str(cache_dir() / "cifar10" / "raw") in msg and base + archive.name in msg
    assert "cifar-10-python.tar.gz" in msg and "cifar-10-batches-py/" in msg and "$FEDREP_DATA_DIR" in msg
    monkeypatch.delenv("FEDREP_OFFLINE")
    with pytest.raises(DataError, match="not found"):
        cifar.locate("cifar10", allow_download=False)
    empty = root.parent / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match=f"not found \\(looked in: {empty}\\)"):
        cifar.load("cifar10", empty)  # an explicit folder means "these files", never a download
    assert _raw_files("cifar10") == [] and list(empty.iterdir()) == []


# --- decode once ---------------------------------------------------------------------------------
def _zero_keeping_stat(path: Path) -> None:
    """Same size and mtime (the decode cache's key), contents gone: a read of it would fail."""
    st = path.stat()
    path.write_bytes(b"\0" * st.st_size)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_archive_is_decoded_once_then_memory_mapped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    archive = write_cifar_archive(tmp_path, "cifar10")
    _trust(monkeypatch, "cifar10", archive)
    first_train, _ = cifar.load("cifar10", tmp_path)
    _zero_keeping_stat(archive)
    train, test = cifar.load("cifar10", tmp_path)  # neither hashed nor decompressed again
    assert isinstance(train.images, np.memmap) and isinstance(test.labels, np.memmap)
    np.testing.assert_array_equal(train.images, first_train.images)
    _assert_matches_fixture("cifar10", train, test)
    (entry,) = (cache_dir() / "cifar10" / "decoded").iterdir()
    assert sorted(p.name for p in entry.iterdir()) == [f"{n}.npy" for n in sorted(cifar.ARRAY_NAMES)]


def test_folder_is_decoded_once(tmp_path: Path):
    folder = write_cifar_folder(tmp_path, "cifar100")
    cifar.load("cifar100", tmp_path)
    _zero_keeping_stat(folder / "train")
    train, test = cifar.load("cifar100", tmp_path)
    assert isinstance(train.images, np.memmap)
    _assert_matches_fixture("cifar100", train, test)


def test_another_expected_checksum_is_a_new_decode(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A cache entry built under one trusted checksum is not served under another."""
    archive = write_cifar_archive(tmp_path, "cifar10")
    _trust(monkeypatch, "cifar10", archive)
    cifar.load("cifar10", tmp_path)
    monkeypatch.setitem(cifar.SPECS, "cifar10", dataclasses.replace(cifar.SPECS["cifar10"], sha256="f" * 64))
    with pytest.raises(DataError, match="corrupt or truncated"):
        cifar.load("cifar10", tmp_path)
