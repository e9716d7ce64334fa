"""`fedrep run` on an existing multi-node Ray cluster (``RAY_ADDRESS``), and the cluster configs in
deploy/ray that start one on real machines."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from single_process import run_reference

from conftest import SMALL_FMNIST, fedrep_cli
from fedrep.algorithms.fedrep import FedRepUpdate
from fedrep.results import RunDir
from fedrep.simulation import clients_at_once, worker_runtime_env

DEPLOY_RAY = Path(__file__).resolve().parents[1] / "deploy" / "ray"
# One CPU per node, so exactly one client actor fits on each: three nodes, three actors, and Ray
# has to place them on three different nodes. The object store is kept at its small end.
NODE_ARGS: dict[str, Any] = {"num_cpus": 1, "object_store_memory": 128 * 2**20}


# --- the cluster configs ----------------------------------------------------------------------------

def _load(name: str) -> Any:
    return yaml.safe_load((DEPLOY_RAY / name).read_text())


def test_cluster_launcher_config_has_gpu_workers_that_install_fedrep():
    cfg = _load("cluster.yaml")
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    assert head["resources"]["CPU"] == 0, "clients must run on the workers, not on the head"
    assert "--num-cpus=0" in " ".join(cfg["head_start_ray_commands"])
    gpu_types = [t for t in types.values() if t["resources"].get("GPU", 0) >= 1]
    assert gpu_types, "no worker type with GPUs"
    # Flower sizes its actor pool once, from the nodes alive at the start: none may be missing.
    assert all(t["min_workers"] >= 1 for t in gpu_types)
    assert any("ray start --address=$RAY_HEAD_IP:6379" in c for c in cfg["worker_start_ray_commands"])
    setup = " ".join(cfg["setup_commands"])
    assert "torch==2.13.0" in setup and "download.pytorch.org/whl/cu" in setup
    assert "pip install" in setup and "/home/ray/fedrep" in setup
    assert "/home/ray/fedrep" in cfg["file_mounts"], "the project must reach every node"
    assert cfg["docker"]["image"].startswith(f"rayproject/ray:{_ray_version()}-")


def test_cluster_launcher_config_follows_rays_schema():
    import jsonschema
    import ray

    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    jsonschema.validate(_load("cluster.yaml"), schema)


def test_kuberay_manifest_has_a_cpu_less_head_and_a_gpu_worker_group():
    docs = [d for d in yaml.safe_load_all((DEPLOY_RAY / "raycluster.yaml").read_text()) if d]
    (cluster,) = [d for d in docs if d["kind"] == "RayCluster"]
    assert cluster["apiVersion"] == "ray.io/v1"
    spec = cluster["spec"]
    assert spec["rayVersion"] == _ray_version()
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    (group,) = spec["workerGroupSpecs"]
    assert group["minReplicas"] >= 1 and group["replicas"] >= group["minReplicas"]
    (container,) = group["template"]["spec"]["containers"]
    assert int(container["resources"]["limits"]["nvidia.com/gpu"]) >= 1
    head_image = spec["headGroupSpec"]["template"]["spec"]["containers"][0]["image"]
    assert container["image"] == head_image and "fedrep" in head_image  # one image, this project


def test_cluster_image_installs_cuda_torch_and_this_project():
    dockerfile = (DEPLOY_RAY / "Dockerfile").read_text()
    assert f"FROM rayproject/ray:{_ray_version()}-py311-gpu" in dockerfile
    assert "torch==2.13.0" in dockerfile and "download.pytorch.org/whl/cu" in dockerfile
    assert "pip install" in dockerfile and "COPY" in dockerfile


def _ray_version() -> str:
    """The configs must run the Ray that flwr pins: a driver joins only a cluster of its own version."""
    import ray

    return ray.__version__


# --- what the driver tells Ray ----------------------------------------------------------------------

def test_client_slots_are_counted_node_by_node():
    nodes = [{"Resources": {"CPU": 8.0, "GPU": 1.0}}, {"Resources": {"CPU": 8.0}}, {"Resources": {}}]
    assert clients_at_once(nodes, cpus=1, gpus=0) == 16
    assert clients_at_once(nodes, cpus=1, gpus=0.25) == 4  # the GPU-less node hosts none
    assert clients_at_once(nodes, cpus=3, gpus=0) == 4  # 2 + 2, not 16 // 3


def test_workers_get_the_drivers_import_path_and_data_settings(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("FEDREP_DATA_DIR", "/data/fmnist")
    monkeypatch.delenv("FEDREP_CLIENT_CACHE", raising=False)
    env = worker_runtime_env()["env_vars"]
    assert env["FEDREP_DATA_DIR"] == "/data/fmnist" and "FEDREP_CLIENT_CACHE" not in env
    assert env["PYTHONPATH"].split(os.pathsep)[: len(sys.path)] == sys.path


# --- a real run on a three-node cluster -------------------------------------------------------------

@pytest.fixture
def ray_cluster() -> Iterator[Any]:
    """Ray's own multi-node test cluster: a head and two worker nodes, each its own raylet with
    its own resources, on this machine (so they share its filesystem and Python)."""
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args=NODE_ARGS)
    try:
        for _ in range(2):
            cluster.add_node(**NODE_ARGS)
        cluster.wait_for_nodes()
        yield cluster
    finally:
        cluster.shutdown()


def client_execution_nodes(address: str) -> set[str]:
    """The Ray nodes on which a ClientApp ran (Flower's ``ClientAppActor.run`` tasks), read from
    the task events the cluster's GCS keeps. ``ray.util.state`` reads the same events but only
    through the dashboard, which the minimal Ray that flwr[simulation] installs does not have."""
    import ray
    from ray._private.state import state
    from ray.core.generated import gcs_pb2

    ray.init(address=address, logging_level="WARNING")
    try:
        raw_events = state._connect_and_get_accessor().get_task_events()
    finally:
        ray.shutdown()
    events = [gcs_pb2.TaskEvents.FromString(raw) for raw in raw_events]
    return {event.state_updates.node_id.hex() for event in events
            if event.task_info.name in CLIENT_TASKS and event.state_updates.node_id}


# Flower's backend's actor method, and fedrep's batched backend's (the default in simulations)
CLIENT_TASKS = ("ClientAppActor.run", "BatchClientAppActor.run_batch")


@pytest.mark.e2e
def test_run_spreads_clients_over_an_existing_cluster(ray_cluster: Any, fmnist_dir: Path, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")  # silence a FutureWarning here
    run_dir = tmp_path / "on-cluster"
    proc = fedrep_cli("run", *SMALL_FMNIST, "--rounds", "2", "--set", f"run-dir={run_dir}",
                      "--set", f"data-dir={fmnist_dir}", timeout=240,
                      env={**os.environ, "RAY_ADDRESS": ray_cluster.address})
    assert (f"[fedrep] Ray cluster at {ray_cluster.address}: 3 nodes, 3 CPUs, 0 GPUs; "
            "client-cpus=1 client-gpus=0 -> 3 clients at a time") in proc.stderr

    run = RunDir(run_dir)
    assert run.state()["status"] == "completed"
    assert [row["round"] for row in run.read_metrics()] == [1, 2]

    cluster_nodes = {node.node_id for node in [ray_cluster.head_node, *ray_cluster.worker_nodes]}
    used = client_execution_nodes(ray_cluster.address)
    assert used <= cluster_nodes and len(used) >= 2, f"clients ran on {len(used)} of 3 nodes"

    # Where a client runs changes nothing: the result is the single-process reference's.
    cfg = run.saved_config()
    reference = run_reference(cfg, FedRepUpdate(cfg), rounds=2)
    final = run.load_checkpoint(2)
    for key, value in reference.shared.items():
        np.testing.assert_allclose(final[key], value.numpy(), rtol=1e-5, atol=1e-6, err_msg=key)
