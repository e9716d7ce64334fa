"""The Flower ClientApp: restore my personal part, run my strategy's local update, reply with
only the shared part.

Per process, the config is parsed once, the model is built once and each partition's data is
loaded once; a message costs only the local update.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, replace
from functools import lru_cache

import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from clients.state import load_personal, save_personal
from fedrep.algorithms.attacks import attackers, flip_labels, poison_update
from fedrep.algorithms.base import ClientUpdateRule
from fedrep.algorithms.privacy import CLIENT_NOISE, clip_update, local_release, noise_generator
from fedrep.algorithms.training import EVAL, FINETUNE, TRAIN, round_generator
from fedrep.config import RunConfig, parse_run_config
from fedrep.data.federated import ClientData, load_client_data
from fedrep.models import build_model
from fedrep.models.base import SplitModel
from fedrep.models.state import load_full_state
from fedrep.protocol import (
    ACCURACY,
    ARRAYS,
    CONFIG,
    FINETUNE_EPOCHS,
    FINETUNED,
    LOCAL_STEPS,
    LOSS,
    METRICS,
    NODE_DECLARED_ROLE,
    NODE_NUM_PARTITIONS,
    NODE_PARTITION_ID,
    NODE_ROLE,
    NUM_EXAMPLES,
    NUM_PARTITIONS,
    NUM_TEST,
    NUM_TRAIN,
    ONBOARD_ACTION,
    PARTITION_ID,
    PERSONAL_RESTORED,
    RUN_DIR,
    SERVER_ROUND,
    TRAIN_LOSS,
    ActionResult,
    Restored,
)
from fedrep.records import from_record_torch, to_record
from fedrep.registry import client_actions, get_strategy
from fedrep.results import HeadFileDamaged, run_folder_failure

app = ClientApp()



class _ActorShutdownFilter(logging.Filter):
    """Flower's simulation actors log "Manually terminating ClientAppActor" at WARNING when the
    run ends normally; Ray forwards it, so it would end every run's output. Dropped in the actor
    process unless ``fedrep run --verbose`` (``FEDREP_QUIET_ACTORS`` unset)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Manually terminating")


if os.environ.get("FEDREP_QUIET_ACTORS"):
    logging.getLogger("flwr").addFilter(_ActorShutdownFilter())

def _frozen(run_config: dict) -> tuple:
    return tuple(sorted(run_config.items()))


def device_for(cfg: RunConfig) -> str:
    """The GPU Ray assigned to this worker when client-gpus > 0 (Ray sets CUDA_VISIBLE_DEVICES,
    so it is always cuda:0 here), else the CPU."""
    return "cuda" if cfg.client_gpus > 0 and torch.cuda.is_available() else "cpu"


def limit_gpu_memory(cfg: RunConfig) -> None:
    """Hold this client to its share of the GPU. Ray's fractional ``client-gpus`` only counts:
    0.25 lets four clients onto one GPU but stops none of them from filling its memory. PyTorch's
    allocator cap makes a client that outgrows its share fail alone, with an out-of-memory error,
    instead of the neighbours it would starve. CPU runs and whole GPUs are left alone."""
    if 0 < cfg.client_gpus < 1 and torch.cuda.is_available():
        torch.cuda.set_per_process_memory_fraction(cfg.client_gpus, torch.cuda.current_device())


@lru_cache(maxsize=4)
def _setup(frozen_config: tuple) -> tuple[RunConfig, ClientUpdateRule, SplitModel, dict]:
    cfg = parse_run_config(dict(frozen_config), "Flower run config (client)")
    rule = get_strategy(cfg.strategy).client_rule(cfg)
    model = rule.prepare_model(build_model(cfg))
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    limit_gpu_memory(cfg)
    model.to(device_for(cfg))
    torch.set_num_threads(cfg.client_threads)
    return cfg, rule, model, initial


@lru_cache(maxsize=4)
def _keys(frozen_config: tuple) -> tuple[list[str], list[str]]:
    """The (shared, personal) state-dict keys of this run's model: asked of the rule once, since
    they depend on the model's architecture and the run config only (ClientUpdateRule says so),
    not on every message (0.2 ms a message for the paper's CNN)."""
    _, rule, model, _ = _setup(frozen_config)
    return list(rule.shared_keys(model)), list(rule.personal_keys(model))


def _partition(context: Context) -> int:
    try:
        return int(context.node_config[NODE_PARTITION_ID])
    except KeyError:
        raise RuntimeError("node config lacks 'partition-id'; start the SuperNode with "
                           "--node-config 'partition-id=N num-partitions=M'") from None


@dataclass(frozen=True)
class Job:
    """One message's work, with the model loaded and ready."""

    cfg: RunConfig
    rule: ClientUpdateRule
    model: SplitModel
    partition: int
    server_round: int
    run_dir: str
    restored: str  # where the personal part came from: fresh | node-state | file | none
    shared_keys: list[str]  # what the reply carries
    personal_keys: list[str]  # empty for strategies that share everything (FedAvg, FedProx)

    def data(self) -> ClientData:
        return load_client_data(self.cfg, self.partition, device_for(self.cfg))

    def generator(self, purpose: int) -> torch.Generator:
        return round_generator(self.cfg.seed, self.server_round, self.partition, purpose)


_decoded: list[tuple[ArrayRecord, dict[str, torch.Tensor]]] = []  # the newest decoded shared part


def _shared_arrays(record: ArrayRecord) -> dict[str, torch.Tensor]:
    """The tensors of the shared part a message carries, decoded once per record *object*: in a
    simulation, the messages that carry the round's model reach each actor as one object for the
    whole phase (``fedrep/flower_runtime/shared_content.py``), so it is decoded once per phase
    and actor, not once per message. The record is kept with its tensors, so its identity cannot
    be reused while cached; callers only read them (``load_state_dict`` copies)."""
    if _decoded and _decoded[0][0] is record:
        return _decoded[0][1]
    tensors = from_record_torch(record)
    _decoded[:] = [(record, tensors)]
    return tensors


def _prepare(msg: Message, context: Context, after_training: bool) -> Job:
    """Load shared (from the message) + personal (from my state) parameters into the model.

    Training in round r restores the newest personal version from a round < r; evaluation runs
    after round r's training, so it may use the version round r itself produced."""
    frozen = _frozen(dict(context.run_config))
    cfg, rule, model, initial = _setup(frozen)
    expected, personal_keys = _keys(frozen)
    pid = _partition(context)
    server_round = int(msg.content[CONFIG][SERVER_ROUND])
    run_dir = str(msg.content[CONFIG][RUN_DIR])
    newest_allowed = server_round + 1 if after_training else server_round
    shared = _shared_arrays(msg.content[ARRAYS])
    if list(shared) != expected:
        raise RuntimeError(f"server sent {list(shared)[:3]}..., strategy {cfg.strategy} shares "
                           f"{expected[:3]}...; server and client disagree on the strategy")
    if not personal_keys:  # no state file to read (or, in _keep_personal, to write and fsync)
        personal, source = {}, "none"
    else:
        try:
            personal, source = load_personal(context, run_dir, pid, newest_allowed,
                                             {k: initial[k] for k in personal_keys},
                                             restart_damaged=cfg.on_damaged_head == "restart")
        except HeadFileDamaged as err:
            raise run_folder_failure(f"partition {pid}: its head file {err.file} {err.reason}") from None
    if personal is None:
        personal = {k: initial[k] for k in personal_keys}
    load_full_state(model, {**shared, **personal})
    return Job(cfg, rule, model, pid, server_round, run_dir, source, expected, personal_keys)


def _keep_personal(job: Job, context: Context) -> dict:
    """Store the personal part after a local update; the full state dict, for the reply."""
    state = job.model.state_dict()
    if job.personal_keys:
        try:
            save_personal(context, job.run_dir, job.partition, job.server_round,
                          {k: state[k] for k in job.personal_keys})
        except OSError as err:  # a full disk, a lost mount: the round must not count
            raise run_folder_failure(f"partition {job.partition}: cannot write its head file "
                                     f"{err.filename or ''} ({err.strerror or err})") from None
    return state


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Who am I: partition id and count, and sample counts. Loading the data here means a
    missing or corrupt data file stops the run at start, with this node's message."""
    cfg, _, _, _ = _setup(_frozen(dict(context.run_config)))
    pid = _partition(context)
    data = load_client_data(cfg, pid, device_for(cfg))
    info = {PARTITION_ID: pid, NUM_TRAIN: data.num_train, NUM_TEST: data.num_test,
            NUM_PARTITIONS: int(context.node_config.get(NODE_NUM_PARTITIONS, cfg.num_clients))}
    return Message(RecordDict({METRICS: MetricRecord(info)}), reply_to=msg)


def _privatize(job: Job, sent: ArrayRecord, trained: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What leaves the client under DP: its update of the shared part clipped to dp-clip-norm
    (central DP, dp-clipping='client'), and noised with its own stream (local DP)."""
    cfg = job.cfg
    base = {k: v.numpy() for k, v in _shared_arrays(sent).items()}
    mine = {k: v.detach().cpu().numpy() for k, v in trained.items()}
    if cfg.dp == "local":
        rng = noise_generator(cfg.seed, cfg.dp_noise_source, job.server_round, CLIENT_NOISE + job.partition)
        out = local_release(base, mine, cfg.dp_clip_norm, cfg.dp_noise_multiplier, rng)
    else:
        out = clip_update(base, mine, cfg.dp_clip_norm).arrays
    return {k: torch.from_numpy(v) for k, v in out.items()}


@app.train()
def train(msg: Message, context: Context) -> Message:
    job = _prepare(msg, context, after_training=False)
    rule, model, cfg = job.rule, job.model, job.cfg
    data = job.data()
    attacking = cfg.attack != "none" and job.partition in attackers(cfg.num_clients, cfg.attack_share,
                                                                     cfg.seed)
    if attacking and cfg.attack == "label-flip":
        data = replace(data, y_train=flip_labels(data.y_train, cfg.num_classes()))
    result = rule.fit(model, data, job.generator(TRAIN))
    state = _keep_personal(job, context)
    shared_state = {k: state[k] for k in job.shared_keys}
    if cfg.dp == "local" or (cfg.dp == "central" and cfg.dp_clipping == "client"):
        shared_state = _privatize(job, msg.content[ARRAYS], shared_state)
    if attacking and cfg.attack in ("sign-flip", "scale"):  # an attacker sends what it likes: no DP
        shared_state = poison_update(_shared_arrays(msg.content[ARRAYS]), shared_state, cfg.attack,
                                     cfg.attack_scale)
    shared = to_record(shared_state)
    metrics = MetricRecord({
        NUM_EXAMPLES: result.num_examples,
        TRAIN_LOSS: result.loss,
        PARTITION_ID: job.partition,
        LOCAL_STEPS: result.steps,
        PERSONAL_RESTORED: int(Restored.of_source(job.restored)),
    })
    return Message(RecordDict({ARRAYS: shared, METRICS: metrics}), reply_to=msg)


@app.train(ONBOARD_ACTION)
def onboard(msg: Message, context: Context) -> Message:
    """A client that never trained in a finished run gets its head: the same head-only training
    on the final body as the run's new-clients step (same epochs, same random stream), kept like
    any head. Reports local test loss/accuracy with the initial head and with its own."""
    job = _prepare(msg, context, after_training=True)
    data = job.data()
    epochs = int(msg.content[CONFIG][FINETUNE_EPOCHS])
    metrics: dict[str, int | float] = {NUM_EXAMPLES: data.num_test, PARTITION_ID: job.partition,
                                       PERSONAL_RESTORED: int(Restored.of_source(job.restored))}
    loaded = {k: v.clone() for k, v in job.model.state_dict().items()}
    before = job.rule.evaluate(job.model, data, job.generator(EVAL)) if data.num_test else None
    job.model.load_state_dict(loaded)  # rule.evaluate may have fine-tuned in place
    after = job.rule.finetune_and_evaluate(job.model, data, epochs, job.generator(FINETUNE))
    _keep_personal(job, context)
    for suffix, result in (("", before), (FINETUNED, after)):
        if result is not None and data.num_test:
            metrics[LOSS + suffix] = result.loss
            if result.accuracy is not None:
                metrics[ACCURACY + suffix] = result.accuracy
    return Message(RecordDict({METRICS: MetricRecord(metrics)}), reply_to=msg)


def _action_handler(action: str):
    """A ``train.<action>`` handler that hands the message to the strategy's ``act``."""

    def handle(msg: Message, context: Context) -> Message:
        job = _prepare(msg, context, after_training=False)
        inputs = {name: from_record_torch(record) for name, record in msg.content.array_records.items()
                  if name != ARRAYS}
        config = dict(msg.content[CONFIG])
        if NODE_DECLARED_ROLE in context.node_config:  # a deployed node may declare its role
            config[NODE_ROLE] = str(context.node_config[NODE_DECLARED_ROLE])
        result: ActionResult = job.rule.act(action, job.model, job.data(), job.partition, inputs, config,
                                            job.generator(TRAIN))
        if not isinstance(result, ActionResult):
            raise TypeError(f"{type(job.rule).__name__}.act({action!r}) returned {type(result).__name__}, "
                            "not a fedrep.ActionResult")
        _keep_personal(job, context)
        metrics = MetricRecord({**result.metrics, PARTITION_ID: job.partition,
                                PERSONAL_RESTORED: int(Restored.of_source(job.restored))})
        content = RecordDict({METRICS: metrics})
        if result.arrays:
            content[ARRAYS] = to_record(result.arrays)
        for name, state in result.extra.items():
            content[name] = to_record(state)
        return Message(content, reply_to=msg)

    handle.__name__ = f"train_{action}"  # actions are identifiers (the registry checks)
    return handle


# Plugins' own message types (train.<action>), registered the same way for built-ins and third
# parties: whatever the installed plugins declare.
for _action in client_actions():
    app.train(_action)(_action_handler(_action))


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    job = _prepare(msg, context, after_training=True)
    data = job.data()
    metrics: dict[str, int | float] = {NUM_EXAMPLES: data.num_test, PARTITION_ID: job.partition,
                                       PERSONAL_RESTORED: int(Restored.of_source(job.restored))}
    if data.num_test == 0:
        return Message(RecordDict({METRICS: MetricRecord(metrics)}), reply_to=msg)
    finetune = int(msg.content[CONFIG].get(FINETUNE_EPOCHS, 0))
    loaded = {k: v.clone() for k, v in job.model.state_dict().items()} if finetune > 0 else {}
    results = {"": job.rule.evaluate(job.model, data, job.generator(EVAL))}
    if finetune > 0:
        job.model.load_state_dict(loaded)  # rule.evaluate may have fine-tuned in place
        results[FINETUNED] = job.rule.finetune_and_evaluate(job.model, data, finetune,
                                                            job.generator(FINETUNE))
    for suffix, result in results.items():
        metrics[LOSS + suffix] = result.loss
        if result.accuracy is not None:
            metrics[ACCURACY + suffix] = result.accuracy
    return Message(RecordDict({METRICS: MetricRecord(metrics)}), reply_to=msg)
