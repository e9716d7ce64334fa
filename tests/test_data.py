"""Fashion-MNIST loading and the partitioners."""

from __future__ import annotations

import functools
import gzip
import http.server
import shutil
import struct
import threading
from pathlib import Path

import numpy as np
import pytest

from fedrep.config import parse_run_config
from fedrep.data import fashion_mnist, partition
from fedrep.data.federated import load_client_data


def _idx_bytes(arr: np.ndarray) -> bytes:
    return bytes([0, 0, 8, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.tobytes()


# --- loading ---------------------------------------------------------------------------------
def test_decode_idx_roundtrip():
    arr = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    np.testing.assert_array_equal(fashion_mnist.decode_idx(_idx_bytes(arr)), arr)


def test_decode_idx_rejects_truncated():
    raw = _idx_bytes(np.zeros((5, 2, 2), np.uint8))[:-3]
    with pytest.raises(fashion_mnist.DataError, match="truncated"):
        fashion_mnist.decode_idx(raw, "x")


def test_missing_files_name_the_path_and_the_fix(tmp_path: Path):
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(b"")
    with pytest.raises(fashion_mnist.DataError) as err:
        fashion_mnist.locate(tmp_path, allow_download=False)
    msg = str(err.value)
    assert str(tmp_path / "t10k-labels-idx1-ubyte") in msg
    assert "apt-get install dataset-fashion-mnist" in msg and "FEDREP_DATA_DIR" in msg


def test_empty_dir_is_not_found(tmp_path: Path):
    with pytest.raises(fashion_mnist.DataError, match="not found"):
        fashion_mnist.locate(tmp_path, allow_download=False)


def test_corrupt_file_is_refused(tmp_path: Path, fmnist_dir: Path):
    for spec in fashion_mnist.FILES.values():
        src = next(fmnist_dir.glob(spec.stem + "*"))
        shutil.copy(src, tmp_path / src.name)
    victim = next(tmp_path.glob("train-labels*"))
    labels = fashion_mnist.decode_idx(gzip.decompress(victim.read_bytes())).copy()
    labels[0] = (labels[0] + 1) % 10  # one flipped label: structurally valid, wrong content
    victim.write_bytes(gzip.compress(_idx_bytes(labels)))
    with pytest.raises(fashion_mnist.DataError) as err:
        fashion_mnist.load_array(tmp_path, "train-labels")
    assert str(victim) in str(err.value) and "corrupt" in str(err.value)
    victim.write_bytes(victim.read_bytes()[:100])  # truncated gzip stream
    with pytest.raises(fashion_mnist.DataError, match="corrupt or truncated"):
        fashion_mnist.load_array(tmp_path, "train-labels")


def test_real_data_loads_with_expected_shapes(fmnist_dir: Path):
    train, test = fashion_mnist.load(fmnist_dir)
    assert train.images.shape == (60000, 28, 28) and test.labels.shape == (10000,)
    assert sorted(np.unique(train.labels)) == list(range(10))


def test_download_verifies_checksums(tmp_path: Path, fmnist_dir: Path):
    """The download code against a loopback HTTP server serving the real files, then a tampered
    one: the good files are kept, the tampered one is refused."""
    served = tmp_path / "served"
    served.mkdir()
    for spec in fashion_mnist.FILES.values():
        src = next(fmnist_dir.glob(spec.stem + "*"))
        data = src.read_bytes() if src.suffix == ".gz" else gzip.compress(src.read_bytes())
        (served / f"{spec.stem}.gz").write_bytes(data)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    handler.log_message = lambda *a, **k: None  # type: ignore[method-assign]
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}/"
    try:
        fashion_mnist.download(tmp_path / "ok", base_url=base, timeout=10)
        assert fashion_mnist.locate(tmp_path / "ok", allow_download=False) == tmp_path / "ok"
        (served / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(b"\0\0\x08\x01garbage"))
        with pytest.raises(fashion_mnist.DataError, match="wrong checksum"):
            fashion_mnist.download(tmp_path / "bad", base_url=base, timeout=10)
        assert not (tmp_path / "bad" / "t10k-labels-idx1-ubyte.gz").exists()
    finally:
        server.shutdown()


# --- partitioners ------------------------------------------------------------------------------
def _labels(n_per_class: int, classes: int = 10, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).permutation(np.repeat(np.arange(classes), n_per_class))


@pytest.mark.parametrize(("n", "s"), [(100, 2), (100, 5), (30, 3), (7, 10)])
def test_pathological_exact_classes_disjoint_same_class_test(n: int, s: int):
    train, test = _labels(600), _labels(100, seed=1)
    parts = partition.pathological(train, test, n, s, seed=3)
    assert len(parts) == n
    all_train = np.concatenate([p.train for p in parts])
    all_test = np.concatenate([p.test for p in parts])
    assert len(np.unique(all_train)) == len(all_train), "train samples shared between clients"
    assert len(np.unique(all_test)) == len(all_test), "test samples shared between clients"
    assert len({len(p.train) for p in parts}) == 1, "shards are not equal-sized"
    assert len({len(p.test) for p in parts}) == 1
    for p in parts:
        train_classes = set(train[p.train].tolist())
        assert len(train_classes) == s
        assert set(test[p.test].tolist()) == train_classes
    usage = np.bincount(np.concatenate([np.unique(train[p.train]) for p in parts]), minlength=10)
    assert usage.max() - usage.min() <= 1, "classes are not spread evenly over clients"


def test_pathological_equal_shards_at_paper_sizes():
    parts = partition.pathological(_labels(6000), _labels(1000), 100, 2, seed=1)
    assert {len(p.train) for p in parts} == {600}
    assert {len(p.test) for p in parts} == {100}


def test_pathological_names_a_class_with_no_test_images():
    """A test split missing a class the clients train on: a clear error, not a division by zero."""
    test = _labels(100, classes=9, seed=1)  # class 9 never appears in the test split
    with pytest.raises(partition.PartitionError, match=r"class(es)? \[9\] has training images but no test"):
        partition.pathological(_labels(600), test, 100, 2, seed=1)


def test_pathological_at_10000_clients_shares_only_test_images():
    """Fashion-MNIST sizes, n=10,000, s=2: 2,000 holders per class but 1,000 test images per
    class. Train shards stay disjoint (3 images per class); each client gets one test image per
    class, reused cyclically across clients."""
    train, test = _labels(6000), _labels(1000, seed=1)
    parts = partition.pathological(train, test, 10_000, 2, seed=1)
    all_train = np.concatenate([p.train for p in parts])
    assert len(np.unique(all_train)) == len(all_train) == 60_000
    assert {len(p.train) for p in parts} == {6} and {len(p.test) for p in parts} == {2}
    for p in parts[:500]:
        assert set(test[p.test].tolist()) == set(train[p.train].tolist())
    assert len(np.unique(np.concatenate([p.test for p in parts]))) == 10_000  # every image in use


def test_partitions_are_deterministic_in_seed():
    train, test = _labels(600), _labels(100)
    a = partition.pathological(train, test, 50, 2, seed=5)
    b = partition.pathological(train, test, 50, 2, seed=5)
    c = partition.pathological(train, test, 50, 2, seed=6)
    assert all(np.array_equal(x.train, y.train) for x, y in zip(a, b, strict=True))
    assert not all(np.array_equal(x.train, y.train) for x, y in zip(a, c, strict=True))
    d1 = partition.dirichlet(train, test, 20, 0.3, seed=2)
    d2 = partition.dirichlet(train, test, 20, 0.3, seed=2)
    assert all(np.array_equal(x.test, y.test) for x, y in zip(d1, d2, strict=True))


def test_s_larger_than_classes_is_refused():
    with pytest.raises(partition.PartitionError, match="exceeds the 10 classes"):
        partition.pathological(_labels(10), _labels(10), 5, 11, seed=0)


def test_dirichlet_covers_everything_and_test_follows_train():
    train, test = _labels(2000), _labels(2000, seed=4)
    parts = partition.dirichlet(train, test, 10, 0.5, seed=0)
    assert sum(len(p.train) for p in parts) == len(train)
    assert len(np.unique(np.concatenate([p.train for p in parts]))) == len(train)
    for p in parts:  # same class shares in train and test (same Dirichlet draw)
        tr = np.bincount(train[p.train], minlength=10) / len(p.train)
        te = np.bincount(test[p.test], minlength=10) / max(len(p.test), 1)
        assert np.abs(tr - te).max() < 0.02


def test_dirichlet_skew_grows_as_alpha_shrinks():
    train, test = _labels(1000), _labels(200)

    def mean_classes(alpha: float) -> float:
        parts = partition.dirichlet(train, test, 20, alpha, seed=0)
        return float(np.mean([len(np.unique(train[p.train])) for p in parts]))

    assert mean_classes(0.05) < mean_classes(100.0)


def test_iid_equal_disjoint():
    parts = partition.iid(1000, 200, 10, seed=0)
    assert {len(p.train) for p in parts} == {100} and {len(p.test) for p in parts} == {20}
    assert len(np.unique(np.concatenate([p.train for p in parts]))) == 1000


def test_client_data_from_real_files(fmnist_dir: Path):
    cfg = parse_run_config({"num-clients": 100, "classes-per-client": 2,
                            "data-dir": str(fmnist_dir)})
    data = load_client_data(cfg, 17)
    assert data.x_train.shape == (600, 1, 28, 28) and data.num_test == 100
    assert len(set(data.y_train.tolist())) == 2
    assert set(data.y_test.tolist()) == set(data.y_train.tolist())
    assert load_client_data(cfg, 17) is data  # cached: loaded once per process
