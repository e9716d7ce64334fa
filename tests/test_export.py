"""Personalised models as a product (fedrep.export): a real short FedRep run, its clients exported
to files, loaded back and reproducing the run's reported per-client accuracy bit for bit; a new
client onboarded on the final body; every refusal names the file, field or client."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import SMALL_FMNIST, fedrep_cli
from fedrep.algorithms.sampling import new_clients
from fedrep.config import ConfigError
from fedrep.data.federated import FMNIST_MEAN, FMNIST_STD, load_client_data
from fedrep.export import (
    ExportError,
    ExportMeta,
    NoPersonalModel,
    evaluate_client,
    export_all,
    export_client,
    load_exported,
    personalize,
    predict,
    read_inputs,
    reported_client_metrics,
    torchscript_path,
)
from fedrep.results import CLIENT_STATE, RunDir, client_state_file, read_head_versions

pytestmark = pytest.mark.e2e

ROUNDS, HELD_OUT_SHARE, NEW_CLIENT_EPOCHS = 3, 0.34, 3


@pytest.fixture(scope="module")
def fedrep_run(tmp_path_factory: pytest.TempPathFactory, fmnist_dir: Path) -> Path:
    """A finished 3-round FedRep run: 6 clients, half sampled per round, 2 held out as new clients
    (they never train; after the last round they fine-tune a fresh head on the final body and
    report). One run for every xdist worker: the first to get here runs it, the others wait."""
    from filelock import FileLock

    base = tmp_path_factory.getbasetemp()
    root = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    run = root / "export-fedrep"
    with FileLock(str(root / "export-fedrep.lock")):
        if not (root / "export-fedrep.done").is_file():
            shutil.rmtree(run, ignore_errors=True)
            fedrep_cli("run", *SMALL_FMNIST, "--rounds", str(ROUNDS), "--set", f"run-dir={run}",
                       "--set", f"new-clients={HELD_OUT_SHARE}",
                       "--set", f"new-client-epochs={NEW_CLIENT_EPOCHS}")
            (root / "export-fedrep.done").write_text("")
    return run


def _trained(run_dir: Path, up_to: int = ROUNDS) -> set[int]:
    return {r["partition"] for r in RunDir(run_dir).read_audit()
            if r["kind"] == "train" and r["round"] <= up_to}


def _accuracy(model: torch.nn.Module, meta: ExportMeta, x: torch.Tensor, y: torch.Tensor) -> float:
    return float(np.mean(predict(model, x.numpy(), meta) == y.numpy()))


def test_exported_models_reproduce_the_reported_accuracy_bit_for_bit(fedrep_run: Path, tmp_path: Path):
    cfg = RunDir(fedrep_run).saved_config()
    held = new_clients(6, HELD_OUT_SHARE, seed=3)
    summary = export_all(fedrep_run, tmp_path / "all")
    assert summary.round == ROUNDS
    assert set(summary.written) == _trained(fedrep_run)  # `--all`: every client with a head
    assert set(summary.skipped) == set(range(6)) - set(summary.written) and held <= set(summary.skipped)
    for client, why in summary.skipped.items():
        assert f"client {client} " in why
        assert ("held-out new clients" if client in held else "never sampled") in why
    reported = reported_client_metrics(fedrep_run)
    assert set(reported) == set(summary.written)
    for client, path in summary.written.items():
        assert path.name == f"client-{client}-round-{ROUNDS}.pt"
        model, meta = load_exported(path)
        assert (meta.client, meta.round, meta.strategy, meta.input_shape) == (client, ROUNDS, "fedrep",
                                                                              (1, 28, 28))
        assert meta.personal_keys == ("head.weight", "head.bias") and meta.config["seed"] == 3
        data = load_client_data(cfg, client)
        assert _accuracy(model, meta, data.x_test, data.y_test) == reported[client]["accuracy"]
        again = evaluate_client(fedrep_run, client)  # the rule's own evaluate, the run's generator
        assert again["accuracy"] == again["reported-accuracy"] == reported[client]["accuracy"]
        assert again["loss"] == again["reported-loss"] == reported[client]["loss"]
    # An earlier round: that round's body with the head the client held then.
    first = sorted(_trained(fedrep_run, up_to=1))[0]
    path = export_client(fedrep_run, first, round=1, out=tmp_path)
    model, meta = load_exported(path)
    data = load_client_data(cfg, first)
    assert meta.round == 1 and path.parent == tmp_path
    assert _accuracy(model, meta, data.x_test, data.y_test) == reported_client_metrics(fedrep_run, 1)[first][
        "accuracy"]


def _as_fedavg(fedrep_run: Path, folder: Path) -> Path:
    """The FedRep run's folder turned into a FedAvg one with RunDir's own writers: strategy fedavg
    in config.json (and its digest in state.json), each checkpoint the whole model (the FedRep
    body with client 0's last head). A second Flower run would double this file's time."""
    shutil.copytree(fedrep_run, folder)
    run = RunDir(folder)
    cfg = run.saved_config().model_copy(update={"strategy": "fedavg"})
    run.write_config(cfg)
    run.write_state(ROUNDS, "completed")
    head = read_head_versions(client_state_file(folder / CLIENT_STATE, 0))
    head = head[max(head)]
    for server_round in range(1, ROUNDS + 1):
        run.save_checkpoint(server_round, {**run.load_checkpoint(server_round),
                                           **{k: v.numpy() for k, v in head.items()}})
    shutil.rmtree(folder / CLIENT_STATE)  # FedAvg keeps nothing on the clients
    return folder


def test_a_strategy_with_nothing_personal_exports_the_global_model_for_every_client(fedrep_run: Path,
                                                                                   tmp_path: Path):
    """FedAvg keeps nothing on the client: every client's model is the round's global model, so
    clients that never trained (held-out ones too) export, with no head to refuse on."""
    folder = _as_fedavg(fedrep_run, tmp_path / "fedavg")
    summary = export_all(folder, tmp_path / "out", round=2)
    assert set(summary.written) == set(range(6)) and not summary.skipped
    body = RunDir(folder).load_checkpoint(2)
    for client, path in summary.written.items():
        model, meta = load_exported(path)
        assert meta.personal_keys == () and meta.strategy == "fedavg" and meta.client == client
        assert sorted(model.state_dict()) == sorted(body)
        assert all(np.array_equal(model.state_dict()[k].numpy(), v) for k, v in body.items())
    held = sorted(new_clients(6, HELD_OUT_SHARE, seed=3))[0]
    assert export_client(folder, held, out=tmp_path / "held.pt").is_file()


def test_export_refuses_clients_without_a_head_and_rounds_without_a_checkpoint(fedrep_run: Path,
                                                                                 tmp_path: Path):
    out = tmp_path / "x.pt"
    held = sorted(new_clients(6, HELD_OUT_SHARE, seed=3))[0]
    with pytest.raises(NoPersonalModel, match=rf"client {held} has no personal model as of round {ROUNDS}.*"
                                              rf"held-out.*fedrep personalize RUN_DIR --data {held}") as err:
        export_client(fedrep_run, held, out=out)
    assert err.value.client == held and "\n" not in str(err.value)
    late = sorted(_trained(fedrep_run) - _trained(fedrep_run, up_to=1))[0]  # first trained after round 1
    with pytest.raises(NoPersonalModel, match=rf"client {late} .*never sampled to train in round 1,.*"
                                              r"export round \d or later"):
        export_client(fedrep_run, late, round=1, out=out)
    for bad in (0, ROUNDS + 1):
        with pytest.raises(ExportError, match=rf"round={bad}: .* has completed rounds 1-{ROUNDS}"):
            export_client(fedrep_run, 0, round=bad, out=out)
    with pytest.raises(ExportError, match="client=6: .* has clients 0-5"):
        export_client(fedrep_run, 6, out=out)
    with pytest.raises(ConfigError, match="not a fedrep run folder"):
        export_client(tmp_path, 0, out=out)
    copy = tmp_path / "run"
    shutil.copytree(fedrep_run, copy)
    (copy / "checkpoints" / "round-0002.pt").unlink()
    with pytest.raises(ExportError, match=r"round=2: .* has no checkpoint for that round .*round-0002.pt is "
                                          r"missing.*rounds with a checkpoint: \[1, 3\]"):
        export_client(copy, 0, round=2, out=out)
    gone = sorted(_trained(fedrep_run))[0]
    client_state_file(copy / CLIENT_STATE, gone).unlink()
    with pytest.raises(NoPersonalModel, match=rf"client {gone}: its head file .*partition-0000{gone}.pt is "
                                              "missing, though it trained in round"):
        export_client(copy, gone, out=out)
    assert not out.exists()


def test_load_and_predict_on_npy_and_image_files(fedrep_run: Path, tmp_path: Path):
    from PIL import Image

    client = sorted(_trained(fedrep_run))[0]
    model, meta = load_exported(export_client(fedrep_run, client, out=tmp_path))
    data = load_client_data(RunDir(fedrep_run).saved_config(), client)
    x = data.x_test[:6].numpy()
    expected = predict(model, x, meta)
    np.save(tmp_path / "batch.npy", x)
    np.save(tmp_path / "one.npy", x[0])  # one sample: a batch of one
    inputs = read_inputs([tmp_path / "batch.npy", tmp_path / "one.npy"], meta)
    assert inputs.shape == (7, 1, 28, 28) and np.array_equal(inputs[:6], x)
    assert np.array_equal(predict(model, inputs, meta), np.concatenate([expected, expected[:1]]))
    # Images: the data set's own pixels as PNG files come back as the very same inputs.
    pngs = []
    for i, sample in enumerate(x):
        pixels = np.rint((sample[0] * FMNIST_STD + FMNIST_MEAN) * 255).astype(np.uint8)
        pngs.append(tmp_path / f"img{i}.png")
        Image.fromarray(pixels, mode="L").save(pngs[-1])
    from_images = read_inputs(pngs, meta)
    assert np.array_equal(from_images, x) and np.array_equal(predict(model, from_images, meta), expected)
    big = tmp_path / "big.jpg"  # a colour photo of another size: grayscale, resized
    Image.fromarray(np.full((56, 40, 3), 200, dtype=np.uint8), mode="RGB").save(big)
    assert read_inputs(big, meta).shape == (1, 1, 28, 28)
    # Shapes that do not fit are refused, naming both.
    np.save(tmp_path / "flat.npy", x[:, 0])
    with pytest.raises(ExportError, match=r"flat.npy: the model takes inputs of shape \(N, 1, 28, 28\).* "
                                          r"got \(6, 28, 28\)"):
        read_inputs(tmp_path / "flat.npy", meta)
    with pytest.raises(ExportError, match=r"inputs: .*\(N, 1, 28, 28\).*got \(6, 3, 28, 28\)"):
        predict(model, np.repeat(x, 3, axis=1), meta)
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(ExportError, match=r"notes.txt: unknown input type '.txt'"):
        read_inputs(tmp_path / "notes.txt", meta)
    (tmp_path / "broken.png").write_bytes(b"not a png")
    with pytest.raises(ExportError, match="broken.png is not a readable image"):
        read_inputs(tmp_path / "broken.png", meta)


def test_damaged_or_foreign_files_are_refused_naming_the_file_and_field(fedrep_run: Path, tmp_path: Path):
    path = export_client(fedrep_run, sorted(_trained(fedrep_run))[0], out=tmp_path / "good.pt")
    payload = torch.load(path, weights_only=True)

    def saved(name: str, changed: dict) -> Path:
        target = tmp_path / name
        torch.save(changed, target)
        return target

    no_round = {k: v for k, v in payload["meta"].items() if k != "round"}
    with pytest.raises(ExportError, match=r"no-round.pt is not a usable fedrep model file \(meta.round: "
                                          "Field required"):
        load_exported(saved("no-round.pt", {**payload, "meta": no_round}))
    with pytest.raises(ExportError, match=r"newer.pt: meta.format_version is 2, written by a newer fedrep"):
        load_exported(saved("newer.pt", {**payload, "meta": {**payload["meta"], "format_version": 2}}))
    bad_shape = {**payload["state"], "head.bias": torch.zeros(3)}
    with pytest.raises(ExportError, match=r"state\['head.bias'\] has shape \(3,\), model 'cnn' needs "
                                          r"\(10,\)"):
        load_exported(saved("shape.pt", {**payload, "state": bad_shape}))
    bad_config = {**payload["meta"], "config": {**payload["meta"]["config"], "lr": -1}}
    with pytest.raises(ExportError, match=r"config.pt: .*meta.config.*'lr' = -1"):
        load_exported(saved("config.pt", {**payload, "meta": bad_config}))
    with pytest.raises(ExportError, match=r"strategy.pt: .*unknown strategy 'nope'"):
        load_exported(saved("strategy.pt", {**payload, "meta": {**payload["meta"], "config": {
            **payload["meta"]["config"], "strategy": "nope"}}}))
    (tmp_path / "garbage.pt").write_bytes(b"\x00" * 64)
    with pytest.raises(ExportError, match="garbage.pt is not a usable fedrep model file"):
        load_exported(tmp_path / "garbage.pt")
    with pytest.raises(ExportError, match="missing.pt does not exist"):
        load_exported(tmp_path / "missing.pt")


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:DeprecationWarning")
def test_torchscript_copy_gives_the_eager_models_logits(fedrep_run: Path, tmp_path: Path):
    client = sorted(_trained(fedrep_run))[-1]
    path = export_client(fedrep_run, client, out=tmp_path / "c.pt", torchscript=True)
    scripted = torchscript_path(path)
    assert scripted.name == "c.torchscript.pt" and scripted.is_file()
    model, meta = load_exported(path)
    extra = {"fedrep-meta.json": ""}
    traced = torch.jit.load(str(scripted), _extra_files=extra)
    x = load_client_data(RunDir(fedrep_run).saved_config(), client).x_test
    with torch.no_grad():
        assert torch.equal(traced(x), model(x)) and torch.equal(traced(x[:1]), model(x[:1]))
    assert f'"client": {client}' in extra["fedrep-meta.json"].decode()


def test_personalize_trains_a_new_clients_head_on_the_final_body(fedrep_run: Path, tmp_path: Path):
    run = RunDir(fedrep_run)
    cfg = run.saved_config()
    held = sorted(new_clients(6, HELD_OUT_SHARE, seed=3))
    # A held-out partition: exactly what the run's new-clients step reported for it.
    from fedrep.compare import final_client_metrics

    newcomers = final_client_metrics(run, new=True)
    for client in held:
        model, meta = load_exported(personalize(fedrep_run, client, NEW_CLIENT_EPOCHS, tmp_path))
        assert meta.client == client and meta.test_examples == newcomers[client]["num-examples"]
        assert meta.test_accuracy == newcomers[client]["accuracy-finetuned"]
    # An .npz from outside the run: body unchanged, head trained from the initial one.
    data = load_client_data(cfg, held[0])
    npz = tmp_path / "mine.npz"
    np.savez(npz, x_train=data.x_train.numpy(), y_train=data.y_train.numpy(),
             x_test=data.x_test.numpy(), y_test=data.y_test.numpy())
    path = personalize(fedrep_run, npz, 2, tmp_path / "mine.pt")
    model, meta = load_exported(path)
    assert meta.client is None and meta.round == ROUNDS and "mine.npz" in meta.source
    body = run.load_checkpoint(ROUNDS)
    state = model.state_dict()
    assert all(np.array_equal(state[k].numpy(), v) for k, v in body.items())
    from fedrep.models import build_model

    initial = build_model(cfg).state_dict()
    assert not torch.equal(state["head.weight"], initial["head.weight"])
    assert meta.test_accuracy is not None and meta.test_examples == data.num_test
    assert _accuracy(model, meta, data.x_test, data.y_test) == meta.test_accuracy
    # Without test data: trained, exported, no accuracy to report.
    np.savez(tmp_path / "train-only.npz", x_train=data.x_train.numpy(), y_train=data.y_train.numpy())
    assert load_exported(personalize(fedrep_run, tmp_path / "train-only.npz", 1, tmp_path))[1].test_accuracy \
        is None
    # Refused: labels outside the run's classes, inputs of another shape, no labels, no epochs.
    x, y = data.x_train.numpy(), data.y_train.numpy()
    cases = {
        "labels.npz": ({"x_train": x, "y_train": np.full_like(y, 10)},
                       r"y_train: labels must lie in \[0, 10\)"),
        "shape.npz": ({"x_train": x[:, 0], "y_train": y}, r"x_train must have shape \(N, 1, 28, 28\).*got "
                                                          rf"\({len(y)}, 28, 28\)"),
        "nolabels.npz": ({"x_train": x}, r"nolabels.npz lacks y_train"),
        "half-test.npz": ({"x_train": x, "y_train": y, "x_test": x}, "give both x_test and y_test"),
    }
    for name, (arrays, message) in cases.items():
        np.savez(tmp_path / name, **arrays)
        with pytest.raises(ExportError, match=message):
            personalize(fedrep_run, tmp_path / name, 1, tmp_path / "refused.pt")
    with pytest.raises(ExportError, match="epochs=0: give a whole number of head epochs, 1 or more"):
        personalize(fedrep_run, npz, 0, tmp_path / "refused.pt")
    assert not (tmp_path / "refused.pt").exists()


def test_the_cli_exports_predicts_evaluates_and_onboards_as_the_readme_shows(fedrep_run: Path,
                                                                              tmp_path: Path):
    """The README's commands on a finished run: export client K, predict with the file, evaluate
    K against what the run reported, onboard a new client from an .npz, export every client."""
    client = min(_trained(fedrep_run))
    model_file = tmp_path / f"client-{client}.pt"
    out = fedrep_cli("export", str(fedrep_run), "--client", str(client), "--out", str(model_file)).stdout
    assert f"exported: {model_file}" in out
    data = load_client_data(RunDir(fedrep_run).saved_config(), client)
    np.save(tmp_path / "x.npy", data.x_test.numpy())
    printed = fedrep_cli("predict", str(model_file), "--input", str(tmp_path / "x.npy")).stdout.split()
    model, meta = load_exported(model_file)
    assert [int(p) for p in printed] == predict(model, data.x_test.numpy(), meta).tolist()
    csv = tmp_path / "p.csv"
    fedrep_cli("predict", str(model_file), "--input", str(tmp_path / "x.npy"), "--out", str(csv))
    assert np.loadtxt(tmp_path / "p.csv", dtype=int).tolist() == [int(p) for p in printed]
    result = json.loads(fedrep_cli("evaluate", str(fedrep_run), "--client", str(client)).stdout)
    assert result["accuracy"] == result["reported-accuracy"]
    np.savez(tmp_path / "new.npz", x_train=data.x_train.numpy(), y_train=data.y_train.numpy())
    out = fedrep_cli("personalize", str(fedrep_run), "--data", str(tmp_path / "new.npz"), "--epochs", "1",
                     "--out", str(tmp_path / "new.pt")).stdout
    assert f"exported: {tmp_path / 'new.pt'}" in out and load_exported(tmp_path / "new.pt")[1].client is None
    out = fedrep_cli("export", str(fedrep_run), "--all", "--out", str(tmp_path / "all")).stdout
    assert f"exported {len(_trained(fedrep_run))} clients of round {ROUNDS}" in out
    # A user's mistake is one line naming the fix, exit 2.
    bad = fedrep_cli("predict", str(model_file), "--input", str(tmp_path / "missing.npy"), check=False)
    assert bad.returncode == 2 and "missing.npy does not exist" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_onboarding_gives_a_finished_runs_new_clients_their_heads(fedrep_run: Path, tmp_path: Path):
    """`fedrep run --resume RUN --onboard`: no round is trained; the clients that never trained
    (the held-out ones) train a head on the final body through the ClientApp, exactly as the run's
    new-clients step did (same accuracy, bit for bit), keep it, and can then be exported."""
    from fedrep.compare import final_client_metrics

    run_dir = tmp_path / "run"
    shutil.copytree(fedrep_run, run_dir, ignore=shutil.ignore_patterns(".lock"))
    held = sorted(new_clients(6, HELD_OUT_SHARE, seed=3))
    with pytest.raises(NoPersonalModel):
        export_client(run_dir, held[0], out=tmp_path / "before.pt")
    proc = fedrep_cli("run", "--resume", str(run_dir), "--onboard")
    assert f"onboarded {len(held)} new clients on round {ROUNDS}'s body" in proc.stderr
    run = RunDir(run_dir)
    rows = run.read_onboarded()
    assert [r["partition"] for r in rows] == held and run.last_completed_round() == ROUNDS
    reported = final_client_metrics(RunDir(fedrep_run), new=True)
    for row in rows:
        assert row["accuracy-finetuned"] == reported[row["partition"]]["accuracy-finetuned"]
        model, meta = load_exported(export_client(run_dir, row["partition"], out=tmp_path / "c.pt"))
        data = load_client_data(run.saved_config(), row["partition"])
        assert _accuracy(model, meta, data.x_test, data.y_test) == row["accuracy-finetuned"]
    assert run.saved_config().onboard is False  # a one-off: a later resume trains again
    again = fedrep_cli("run", "--resume", str(run_dir), "--onboard")
    assert "onboarded 0 new clients" in again.stderr and len(RunDir(run_dir).read_onboarded()) == len(held)


def test_track_mirrors_a_finished_run_into_tensorboard(fedrep_run: Path, tmp_path: Path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = tmp_path / "run"
    shutil.copytree(fedrep_run, run_dir, ignore=shutil.ignore_patterns(".lock"))
    out = fedrep_cli("track", str(run_dir), "--tracking", "tensorboard").stdout
    assert f"mirrored {ROUNDS} rounds" in out
    accumulator = EventAccumulator(str(run_dir / "tensorboard"))
    accumulator.Reload()
    rows = RunDir(run_dir).read_metrics()
    assert [e.step for e in accumulator.Scalars("train-loss")] == [r["round"] for r in rows]
