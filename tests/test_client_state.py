"""Which version of its head a client restores: node state, its own file, or fresh."""

from __future__ import annotations

from pathlib import Path

import torch
from flwr.app import Context, RecordDict

from clients.state import load_personal, save_personal, state_root


def _ctx(node_config: dict | None = None) -> Context:
    return Context(run_id=1, node_id=7, node_config=node_config or {}, state=RecordDict(),
                   run_config={})


def _head(value: float) -> dict[str, torch.Tensor]:
    return {"head.weight": torch.full((2, 3), value), "head.bias": torch.full((2,), value)}


def test_fresh_then_node_state_then_file(tmp_path: Path):
    deployed = {"state-dir": str(tmp_path / "node")}  # a SuperNode hosting one client
    ctx = _ctx(deployed)
    assert load_personal(ctx, str(tmp_path), 3, server_round=1, expected=_head(0.0)) == (None, "fresh")
    save_personal(ctx, str(tmp_path), 3, 1, _head(1.0))
    params, source = load_personal(ctx, str(tmp_path), 3, server_round=2, expected=_head(0.0))
    assert source == "node-state" and params["head.bias"][0] == 1.0
    # a new process (empty node state) finds the client's own file
    params, source = load_personal(_ctx(deployed), str(tmp_path), 3, server_round=2, expected=_head(0.0))
    assert source == "file" and params["head.weight"][0, 0] == 1.0


def test_simulated_nodes_keep_heads_on_disk_only(tmp_path: Path):
    """A simulation holds every virtual node's context in one process: no head may stay there."""
    ctx = _ctx()
    save_personal(ctx, str(tmp_path), 3, 1, _head(2.0))
    assert len(ctx.state.array_records) == 0 and len(ctx.state.config_records) == 0
    params, source = load_personal(ctx, str(tmp_path), 3, server_round=2, expected=_head(0.0))
    assert source == "file" and params["head.bias"][0] == 2.0


def test_restore_picks_newest_version_before_the_round(tmp_path: Path):
    """Killed in round 5 after this client wrote its round-5 head: re-running round 5 must start
    from the round-3 head, not the half-finished run's round-5 head."""
    ctx = _ctx()
    save_personal(ctx, str(tmp_path), 0, 3, _head(3.0))
    save_personal(ctx, str(tmp_path), 0, 5, _head(5.0))
    params, source = load_personal(_ctx(), str(tmp_path), 0, server_round=5, expected=_head(0.0))
    assert source == "file" and params["head.bias"][0] == 3.0
    params, _ = load_personal(_ctx(), str(tmp_path), 0, server_round=6, expected=_head(0.0))
    assert params["head.bias"][0] == 5.0
    # the node state holds round 5, which is not older than round 5: the file decides
    params, source = load_personal(ctx, str(tmp_path), 0, server_round=5, expected=_head(0.0))
    assert source == "file" and params["head.bias"][0] == 3.0
    save_personal(ctx, str(tmp_path), 0, 7, _head(7.0))  # only two versions are kept
    versions = torch.load(tmp_path / "client-state" / "partition-00000.pt", weights_only=True)
    assert sorted(versions) == [5, 7]


def test_node_state_dir_keeps_runs_apart(tmp_path: Path):
    a = state_root(_ctx({"state-dir": str(tmp_path)}), "/runs/a/run1")
    b = state_root(_ctx({"state-dir": str(tmp_path)}), "/other/run1")
    assert a.parent == tmp_path and a != b


def test_any_damaged_head_file_is_named_not_a_traceback(tmp_path) -> None:
    """Random bytes (a disk error, a truncated copy) always give HeadFileDamaged with the path:
    torch's weights-only unpickler fails with IndexError on some of them, not only the usual errors."""
    import random
    import warnings

    import pytest

    from fedrep.results import HeadFileDamaged, read_head_versions

    path = tmp_path / "client-0.pt"
    for seed in range(400):
        path.write_bytes(random.Random(seed).randbytes(300 if seed % 2 else 50))
        with warnings.catch_warnings(), pytest.raises(HeadFileDamaged, match="client-0.pt"):
            warnings.simplefilter("ignore")  # torch warns about the unknown pickle protocols
            read_head_versions(path)
