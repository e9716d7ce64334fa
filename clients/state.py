"""Where a client keeps its personal parameters (its head, for FedRep) between rounds.

Two layers, both on the client's side of the wire:

* Flower node state (``context.state``): kept by the SuperNode across rounds of one run. Only a
  deployed SuperNode (one client, ``state-dir`` in its node config) uses it. A simulation hosts
  every virtual node's context in the driver's memory, so there the head goes to the file alone
  and memory grows with the clients sampled per round, not with the federation (10,000 clients);
* a node-local file, written by the client itself after every local update, so that a stopped
  run resumes exactly and a restarted node gets its head back. In simulation it lives under the
  run folder (``RUN_DIR/client-state``); a deployed SuperNode sets ``state-dir`` in its node
  config to keep it on its own disk.

Each file holds the two newest versions, tagged by the round that produced them. A client
training in round r restores the newest version from a round < r, so a run killed half-way
through round r (after some clients already wrote round r) still resumes bit-for-bit.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from flwr.app import ConfigRecord, Context

from fedrep.files import atomic_write, torch_bytes
from fedrep.records import from_record_torch, to_record
from fedrep.results import (
    CLIENT_STATE,
    KEEP_HEAD_VERSIONS,
    HeadFileDamaged,
    client_state_file,
    read_head_versions,
)

HEAD_RECORD, META_RECORD = "personal", "personal-meta"

Params = dict[str, torch.Tensor]


def state_root(context: Context, run_dir: str) -> Path:
    node_dir = context.node_config.get("state-dir")
    if node_dir:  # one folder per run, named so that equal folder names elsewhere cannot collide
        tag = hashlib.sha256(str(Path(run_dir).resolve()).encode()).hexdigest()[:10]
        return Path(str(node_dir)) / f"{Path(run_dir).name}-{tag}"
    return Path(run_dir) / CLIENT_STATE


def load_personal(context: Context, run_dir: str, partition: int, server_round: int,
                  expected: Params, restart_damaged: bool = False) -> tuple[Params | None, str]:
    """(params, where-from) of the newest version produced before ``server_round``;
    (None, "fresh") on first contact.

    A state file that does not load, or holds other names or shapes than ``expected``, raises
    :class:`HeadFileDamaged`, unless ``restart_damaged``: then (None, "restarted"), and the next
    save replaces the file."""
    meta = context.state.config_records.get(META_RECORD)
    if meta is not None and int(meta["round"]) < server_round and HEAD_RECORD in context.state:
        return from_record_torch(context.state.array_records[HEAD_RECORD]), "node-state"
    path = client_state_file(state_root(context, run_dir), partition)
    try:
        versions = read_head_versions(path)
        for version in versions.values():
            _check_matches(path, version, expected)
    except HeadFileDamaged:
        if restart_damaged:
            return None, "restarted"
        raise
    earlier = [r for r in versions if r < server_round]
    if earlier:
        return versions[max(earlier)], "file"
    return None, "fresh"


def _check_matches(path: Path, version: Params, expected: Params) -> None:
    if sorted(version) != sorted(expected):
        raise HeadFileDamaged(path, f"holds {sorted(version)[:3]}, not this model's personal "
                                    f"parameters {sorted(expected)[:3]}")
    for name, tensor in version.items():
        if tensor.shape != expected[name].shape:
            raise HeadFileDamaged(path, f"holds {name} of shape {tuple(tensor.shape)}, the model's "
                                        f"is {tuple(expected[name].shape)}")


def keeps_node_state(context: Context) -> bool:
    """Whether this node holds its head in memory too: deployed SuperNodes (``state-dir``) only."""
    return bool(context.node_config.get("state-dir"))


def save_personal(context: Context, run_dir: str, partition: int, server_round: int,
                  params: Params) -> None:
    params = {k: v.detach().clone() for k, v in params.items()}
    if keeps_node_state(context):
        context.state.array_records[HEAD_RECORD] = to_record(params)
        context.state.config_records[META_RECORD] = ConfigRecord({"round": server_round})
    path = client_state_file(state_root(context, run_dir), partition)
    try:
        versions = read_head_versions(path)
    except HeadFileDamaged:  # only reached under on-damaged-head = "restart": replace the file
        versions = {}
    versions[server_round] = params
    for old in sorted(versions)[:-KEEP_HEAD_VERSIONS]:
        del versions[old]
    atomic_write(path, torch_bytes(versions))
