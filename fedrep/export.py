"""Personalised models as a product: one self-contained file per client, and a way to add clients.

A FedRep run ends with one shared representation (``checkpoints/round-NNNN.pt``, the body the
server averaged) and a personal head per client (``client-state/partition-NNNNN.pt``, which
never left the client). Neither is a model anyone can use alone. This module joins them:

* :func:`export_client` / :func:`export_all`: client K's model as of round R (default: the last
  completed round) in one file, with everything needed to rebuild it;
* :func:`load_exported`, :func:`read_inputs`, :func:`predict`: one call to get the model back,
  inputs from ``.npy`` arrays or image files, class indices out;
* :func:`evaluate_client`: the run's own evaluation of client K in round R, repeated, next to the
  number the run reported for it (:func:`reported_client_metrics`): they are equal, bit for bit;
* :func:`personalize`: onboard a client the run never saw, the way the run's ``new-clients``
  step does (a fresh head trained on the final body, FedRep's head-only path), then export it.

The file (format version :data:`FORMAT_VERSION`) is ``torch.save`` of a plain dict::

    {"meta": {...},                  # ExportMeta as JSON-able values
     "state": {key: tensor, ...}}    # the complete state dict of the strategy's model

so it loads with ``torch.load(path, weights_only=True)``: no pickled code runs. ``meta`` carries
the run's configuration (``RunConfig.to_flower()``), the strategy, model, data set, client,
round, input shape and class count, and how images are turned into inputs (:class:`ImageSpec`).

Decisions:

* Which head belongs to round R: the newest version in the client's state file from a round
  <= R. That is the head the client's own evaluation in round R used (a client evaluating after
  round r's training may read the version round r wrote; see ``clients/state.py``).
* A client that had not trained by round R (never sampled, or one of the run's held-out
  ``new-clients``) has no head: exporting it is refused with a :class:`NoPersonalModel` naming
  the client, the round and the fixes (a later round; :func:`personalize`). The run's evaluation
  does report a number for such a client, that of the *initial* head; a model nobody trained is
  not a product.
* Strategies with nothing personal (``rule.personal_keys(model)`` empty: FedAvg, FedProx,
  FedAvg+FT): every client's model is round R's global model, so every client exports, held-out
  ones included. (FedAvg+FT's reported accuracy comes after a fine-tune its client discards;
  :func:`evaluate_client` repeats it with the rule's own ``evaluate``, the exported file holds the
  global model the client received.)
* Inputs: a ``.npy`` array holds model inputs as they are (already normalised like the run's
  data set, shape ``(N, *input_shape)`` or one sample ``input_shape``); image files are
  converted (grayscale/RGB, resized, normalised as the run's data set does). Shapes that do not
  fit are refused, naming expected and given shape, never reshaped silently.

User errors are :class:`ExportError` (a :class:`~fedrep.config.ConfigError`): one line naming the
file or field and the fix. A damaged run folder raises the run folder's own
:class:`~fedrep.results.RunFileError`.
"""

from __future__ import annotations

import contextlib
import io
import json
import sys
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from fedrep.algorithms.base import ClientUpdateRule
from fedrep.algorithms.training import EVAL, FINETUNE, round_generator
from fedrep.config import MULTI_DOMAIN, ConfigError, RunConfig, parse_run_config
from fedrep.data.federated import FMNIST_MEAN, FMNIST_STD, ClientData, load_client_data
from fedrep.data.transforms import CIFAR_STATS, normalized_chw
from fedrep.files import atomic_write, torch_bytes
from fedrep.models.base import SplitModel
from fedrep.results import (
    CLIENT_STATE,
    KEEP_HEAD_VERSIONS,
    LOAD_ERRORS,
    RunDir,
    RunFileError,
    client_state_file,
    load_error,
    read_head_versions,
)

__all__ = [
    "FORMAT", "FORMAT_VERSION", "ExportError", "NoPersonalModel", "ImageSpec", "ExportMeta",
    "ExportSummary", "export_client", "export_all", "load_exported", "read_inputs", "predict",
    "evaluate_client", "reported_client_metrics", "personalize", "torchscript_path", "image_spec",
    "write_model", "default_name",
]

FORMAT = "fedrep-personal-model"
FORMAT_VERSION = 1
# The batch size of the run's own evaluation (training.evaluate): predicting in the same batches
# keeps every logit, and so every argmax, identical to the numbers the run reported.
PREDICT_BATCH = 128
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
TORCHSCRIPT_META = "fedrep-meta.json"  # the metadata, as an extra file inside a TorchScript archive


class ExportError(ConfigError):
    """A request or an input that cannot be exported, loaded or predicted on; the message (one
    line) names the file or field and what to do instead."""


class NoPersonalModel(ExportError):
    """The client holds no personal part as of the asked round (it never trained by then)."""

    def __init__(self, client: int, message: str) -> None:
        self.client = client
        super().__init__(message)


class ImageSpec(BaseModel):
    """How an image file becomes one model input: the run's data set's own transform."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    mode: Literal["L", "RGB"]  # Pillow mode: grayscale or colour
    height: int = Field(ge=1)
    width: int = Field(ge=1)
    mean: tuple[float, ...]  # per channel, on pixels scaled to [0, 1]
    std: tuple[float, ...]


class ExportMeta(BaseModel):
    """The ``meta`` of an exported file: what the model is and how to rebuild and feed it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    format: Literal["fedrep-personal-model"]
    format_version: int = Field(ge=1, le=FORMAT_VERSION)
    fedrep_version: str
    strategy: str
    model: str
    dataset: str
    task: Literal["classification", "regression"]
    client: int | None = Field(ge=0)  # None: personalised on data from outside the run
    round: int = Field(ge=1)  # the round whose shared parameters (body) the model holds
    input_shape: tuple[int, ...]
    num_classes: int = Field(ge=1)
    shared_keys: tuple[str, ...]  # from the round's checkpoint
    personal_keys: tuple[str, ...]  # the client's own (its head, for FedRep)
    config: dict[str, Any]  # the run's RunConfig.to_flower()
    image: ImageSpec | None  # None: this data set takes no images (text, synthetic, PFLlib)
    source: str  # where the model came from, in words
    test_accuracy: float | None = None  # personalize: on the given test data
    test_examples: int | None = Field(None, ge=0)


@dataclass(frozen=True)
class ExportSummary:
    """What :func:`export_all` wrote, and why each other client was left out."""

    round: int
    written: dict[int, Path] = field(default_factory=dict)
    skipped: dict[int, str] = field(default_factory=dict)


def torchscript_path(path: str | Path) -> Path:
    """The TorchScript file written next to an export: ``client-3-round-5.torchscript.pt``."""
    path = Path(path)
    suffix = ".torchscript.pt"
    return path.with_suffix(suffix) if path.suffix else path.with_name(path.name + suffix)


def default_name(client: int, server_round: int) -> str:
    return f"client-{client}-round-{server_round}.pt"


@contextlib.contextmanager
def _threads(count: int) -> Iterator[None]:
    """Compute with the run's ``client-threads``, as its clients did: float sums split across
    another number of threads may round differently, and a fine-tune would drift from the run's."""
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _shape(shape: Sequence[int]) -> str:
    return "(" + ", ".join(str(s) for s in shape) + ("," if len(shape) == 1 else "") + ")"


# -- what a model needs to know about its run ----------------------------------------------------------
def _input_shape(cfg: RunConfig) -> tuple[int, ...]:
    if cfg.model == "linear":
        return (cfg.linear_dim,)
    from fedrep.data.catalog import sample_shape

    return tuple(int(s) for s in sample_shape(cfg))


def _class_count(cfg: RunConfig) -> int:
    from fedrep.data.catalog import class_count

    return int(class_count(cfg))


def image_spec(cfg: RunConfig, shape: tuple[int, ...]) -> ImageSpec | None:
    """The image transform of the run's data set (``fedrep/data``): Fashion-MNIST's mean/std,
    CIFAR's per-channel statistics, LEAF FEMNIST's plain ``pixel / 255`` (white background 1.0),
    the multi-domain sets' ``[-1, 1]``. None where inputs are not images, or (PFLlib) where the
    folder's inputs were normalised by a generator fedrep does not know."""
    if len(shape) != 3 or shape[0] not in (1, 3):
        return None
    if cfg.dataset == "fashion-mnist":
        mean, std = (FMNIST_MEAN,), (FMNIST_STD,)
    elif cfg.dataset in CIFAR_STATS:
        mean, std = CIFAR_STATS[cfg.dataset]
    elif cfg.dataset == "femnist":
        mean, std = (0.0,), (1.0,)
    elif cfg.dataset in MULTI_DOMAIN:
        mean, std = (0.5,) * shape[0], (0.5,) * shape[0]
    else:
        return None
    if len(mean) != shape[0]:
        return None
    return ImageSpec(mode="L" if shape[0] == 1 else "RGB", height=shape[1], width=shape[2],
                     mean=tuple(mean), std=tuple(std))


def _strategy_model(cfg: RunConfig, shape: tuple[int, ...] | None = None,
                    classes: int | None = None) -> tuple[ClientUpdateRule, SplitModel]:
    """The strategy's client rule and its model, built as the ClientApp builds it (``clients/app.py``
    ``_setup``: ``rule.prepare_model(build_model(cfg))``; Ditto's is a pair). With ``shape`` and
    ``classes`` (a loaded file), a PFLlib network is built from them, not from its data folder,
    which the machine loading the file need not have."""
    from fedrep.registry import get_strategy

    rule = get_strategy(cfg.strategy).client_rule(cfg)
    if cfg.dataset == "pfllib" and shape is not None and classes is not None:
        from fedrep.models import _network  # build_model minus reading the folder

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            network = _network(cfg, shape, classes)
    else:
        from fedrep.models import build_model

        network = build_model(cfg)
    return rule, rule.prepare_model(network)


# -- a finished (or running) run's parts ---------------------------------------------------------------
class _Run:
    """A run folder's configuration, model and parameters, read once for any number of clients."""

    def __init__(self, run_dir: str | Path) -> None:
        self.run = RunDir.open(run_dir)
        self.cfg = self.run.saved_config()
        self.rule, self.model = _strategy_model(self.cfg)
        self.initial = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        self.shared_keys = self.rule.shared_keys(self.model)
        self.personal_keys = self.rule.personal_keys(self.model)
        self.input_shape = _input_shape(self.cfg)
        self.num_classes = _class_count(self.cfg)
        self._bodies: dict[int, dict[str, torch.Tensor]] = {}

    # rounds and clients
    def resolve_round(self, server_round: int | None) -> int:
        last = self.run.last_completed_round()
        if last == 0:
            raise ExportError(f"{self.run.path} has no completed round yet, so no model to take; "
                              "let the run complete a round first")
        if server_round is None:
            return last
        if not 1 <= server_round <= last:
            raise ExportError(f"round={server_round}: {self.run.path} has completed rounds 1-{last}; "
                              f"choose one of them (default: {last}, the last)")
        return server_round

    def check_client(self, client: int) -> None:
        if isinstance(client, bool) or not isinstance(client, int | np.integer):
            raise ExportError(f"client={client!r}: give a partition id (an integer)")
        if not 0 <= client < self.cfg.num_clients:
            raise ExportError(f"client={client}: {self.run.path} has clients 0-{self.cfg.num_clients - 1}")

    @cached_property
    def held_out(self) -> frozenset[int]:
        from fedrep.algorithms.sampling import new_clients

        return new_clients(self.cfg.num_clients, self.cfg.new_clients, self.cfg.seed)

    @cached_property
    def _audit(self) -> list[dict[str, Any]]:
        return self.run.read_audit()

    def trained_rounds(self, client: int) -> list[int] | None:
        """The rounds in which ``client`` trained (and so wrote its head), from messages.jsonl;
        None where the folder keeps no audit to tell."""
        if not self._audit:
            return None
        return sorted({int(r["round"]) for r in self._audit
                       if str(r.get("kind", "")).startswith("train") and not r.get("error")
                       and r.get("partition") == client})

    # parameters
    def body(self, server_round: int) -> dict[str, torch.Tensor]:
        """Round ``server_round``'s shared parameters (the aggregate every client received)."""
        if server_round not in self._bodies:
            path = self.run.checkpoint_path(server_round)
            if not path.is_file():
                kept = sorted(int(p.stem.split("-")[1]) for p in path.parent.glob("round-*.pt")
                              if p.stem.split("-")[1].isdigit())
                have = f"rounds with a checkpoint: {kept}" if kept else "it keeps no checkpoint at all"
                raise ExportError(f"round={server_round}: {self.run.path} has no checkpoint for that round "
                                  f"({path} is missing); choose another round ({have})")
            arrays = self.run.load_checkpoint(server_round)
            if sorted(arrays) != sorted(self.shared_keys):
                raise RunFileError(f"checkpoint {path} holds {sorted(arrays)[:3]}..., not strategy "
                                   f"{self.cfg.strategy}'s shared parameters {self.shared_keys[:3]}...; "
                                   "restore it")
            self._bodies[server_round] = {k: torch.from_numpy(np.array(v)) for k, v in arrays.items()}
        return self._bodies[server_round]

    def personal(self, client: int, server_round: int) -> dict[str, torch.Tensor]:
        """``client``'s personal parameters as of ``server_round``: the newest version its state
        file keeps from a round <= ``server_round``; {} for a strategy with nothing personal."""
        if not self.personal_keys:
            return {}
        path = client_state_file(self.run.path / CLIENT_STATE, client)
        versions = read_head_versions(path)
        expected = {k: self.initial[k] for k in self.personal_keys}
        for version in versions.values():
            if sorted(version) != sorted(expected) or any(
                    version[k].shape != expected[k].shape for k in expected):
                raise RunFileError(f"{path} holds {sorted(version)[:3]}..., not the personal parameters "
                                   f"of this run's model ({sorted(expected)[:3]}...); restore it")
        kept = [r for r in versions if r <= server_round]
        if kept:
            return versions[max(kept)]
        raise NoPersonalModel(client, self._no_head(client, server_round, path, sorted(versions)))

    def _no_head(self, client: int, server_round: int, path: Path, versions: list[int]) -> str:
        trained = self.trained_rounds(client)
        before = None if trained is None else [r for r in trained if r <= server_round]
        onboard = (f"give it a head trained on round {server_round}'s body from its own data "
                   f"(`fedrep personalize RUN_DIR --data {client}`)")
        if before or (before is None and len(versions) >= KEEP_HEAD_VERSIONS):
            if versions:
                return (f"client {client}: its head file {path} keeps the versions of rounds {versions} "
                        f"only (each client keeps its {KEEP_HEAD_VERSIONS} newest), none from round "
                        f"{server_round} or before; export round {versions[0]} or later")
            return (f"client {client}: its head file {path} is missing, though it trained in round"
                    f"{'s' * (len(before or []) > 1)} {before}; restore the file (a deployed SuperNode "
                    f"keeps it under its state-dir: copy it into {path.parent}), or {onboard}")
        if client in self.held_out:
            why = (f"it is one of the run's held-out new clients (new-clients={self.cfg.new_clients}), "
                   "which never train")
        else:
            rounds = "round 1" if server_round == 1 else f"rounds 1-{server_round}"
            why = f"it was never sampled to train in {rounds}"
        keeps = ", ".join(self.personal_keys[:2]) + (", ..." if len(self.personal_keys) > 2 else "")
        fixes = [f"export round {versions[0]} or later (it trained then)"] if versions else []
        fixes.append(onboard)
        return (f"client {client} has no personal model as of round {server_round} of {self.run.path}: "
                f"{why}, and strategy {self.cfg.strategy} keeps {keeps} on each client; "
                + ", or ".join(fixes))

    def load(self, client: int, server_round: int) -> SplitModel:
        """The model ``client`` held in ``server_round`` (body + its personal part), in place."""
        self.model.load_state_dict({**self.initial, **self.body(server_round),
                                    **self.personal(client, server_round)})
        return self.model

    # files
    def meta(self, client: int | None, server_round: int, source: str,
             test_examples: int | None = None, test_accuracy: float | None = None) -> ExportMeta:
        from fedrep import __version__

        return ExportMeta(
            format=FORMAT, format_version=FORMAT_VERSION, fedrep_version=__version__,
            strategy=self.cfg.strategy, model=self.cfg.model, dataset=self.cfg.dataset,
            task=self.model.task, client=client, round=server_round, input_shape=self.input_shape,
            num_classes=self.num_classes, shared_keys=tuple(self.shared_keys),
            personal_keys=tuple(self.personal_keys), config=self.cfg.to_flower(),
            image=image_spec(self.cfg, self.input_shape), source=source,
            test_examples=test_examples, test_accuracy=test_accuracy)

    def export(self, client: int, server_round: int, out: Path, torchscript: bool) -> Path:
        self.check_client(client)
        model = self.load(client, server_round)
        what = "global model" if not self.personal_keys else "shared body + its personal parameters"
        meta = self.meta(client, server_round, f"{self.run.path}: client {client}, round {server_round} "
                                               f"({self.cfg.strategy}: {what})")
        return write_model(model, meta, out, torchscript)


def _target(out: str | Path | None, default_dir: Path, name: str) -> Path:
    """``out`` as a file path; an existing folder (or None: ``default_dir``) gets ``name`` in it."""
    if out is None:
        return default_dir / name
    out = Path(out)
    return out / name if out.is_dir() else out


def write_model(model: SplitModel, meta: ExportMeta, out: Path, torchscript: bool = False) -> Path:
    """Write ``model`` with ``meta`` (atomically: a reader never sees half a file); with
    ``torchscript`` also a traced copy next to it (:func:`torchscript_path`)."""
    state = {k: v.detach().cpu().clone().contiguous() for k, v in model.state_dict().items()}
    payload = {"meta": meta.model_dump(mode="json"), "state": state}
    atomic_write(out, torch_bytes(payload))
    if torchscript:
        atomic_write(torchscript_path(out), _torchscript_bytes(model, meta))
    return out


def _torchscript_bytes(model: SplitModel, meta: ExportMeta) -> bytes:
    """A traced TorchScript archive (loads with ``torch.jit.load``, also from LibTorch/C++,
    without fedrep) holding the metadata as the extra file :data:`TORCHSCRIPT_META`. Traced, not
    scripted: the models are plain feed-forward code, and tracing needs no annotations. PyTorch
    has deprecated TorchScript in favour of ``torch.export``; its deprecation warning is silenced
    here, as the format is still the one a C++ or mobile runtime loads."""
    model.eval()
    example = torch.zeros(2, *meta.input_shape)  # a batch of 2: nothing specialises on batch 1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        traced = torch.jit.trace(model, example)
        buffer = io.BytesIO()
        extra = {TORCHSCRIPT_META: json.dumps(meta.model_dump(mode="json"))}
        torch.jit.save(traced, buffer, _extra_files=extra)
    return buffer.getvalue()


# -- export ------------------------------------------------------------------------------------------
def export_client(run_dir: str | Path, client: int, round: int | None = None, *,
                  out: str | Path | None = None, torchscript: bool = False) -> Path:
    """Write client ``client``'s model as of ``round`` (default: the last completed round) to
    ``out`` (a file; an existing folder, or None for ``RUN_DIR/exports``, gets
    ``client-K-round-R.pt``). Returns the path written.

    Refused, naming the fix: a round that is not completed or has no checkpoint; a client that
    has no personal part as of that round (:class:`NoPersonalModel`)."""
    source = _Run(run_dir)
    source.check_client(client)
    server_round = source.resolve_round(round)
    path = _target(out, source.run.path / "exports", default_name(client, server_round))
    return source.export(client, server_round, path, torchscript)


def client_model(run_dir: str | Path, client: int, round: int | None = None
                 ) -> tuple[SplitModel, ExportMeta]:
    """Client ``client``'s model as of ``round`` (default: the last), in memory, with the
    metadata an export of it would carry; refused as :func:`export_client` refuses."""
    source = _Run(run_dir)
    source.check_client(client)
    server_round = source.resolve_round(round)
    model = source.load(client, server_round)
    where = f"{source.run.path}: client {client}, round {server_round}"
    return model, source.meta(client, server_round, where)


def export_all(run_dir: str | Path, out_dir: str | Path, round: int | None = None,
               torchscript: bool = False) -> ExportSummary:
    """Export every client that has a model as of ``round`` into ``out_dir`` (``client-K-round-R.pt``
    each); clients without one (:class:`NoPersonalModel`) are skipped with the reason. Refused
    when no client has a model."""
    source = _Run(run_dir)
    server_round = source.resolve_round(round)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ExportError(f"{out} is a file; give a folder to export every client into")
    summary = ExportSummary(server_round)
    for client in range(source.cfg.num_clients):
        try:
            summary.written[client] = source.export(client, server_round,
                                                    out / default_name(client, server_round), torchscript)
        except NoPersonalModel as err:
            summary.skipped[client] = str(err)
    if not summary.written:
        raise ExportError(f"no client of {source.run.path} has a model as of round {server_round}; "
                          f"e.g. {summary.skipped[0]}")
    return summary


# -- load and predict --------------------------------------------------------------------------------
def _bad_file(path: Path, why: str) -> ExportError:
    return ExportError(f"{path} is not a usable fedrep model file ({why}); export the client again")


def _validated_meta(path: Path, raw: Any) -> ExportMeta:
    if not isinstance(raw, dict):
        raise _bad_file(path, f"meta is a {type(raw).__name__}, not a mapping")
    if raw.get("format") != FORMAT:
        raise _bad_file(path, f"meta.format is {raw.get('format')!r}, not {FORMAT!r}")
    version = raw.get("format_version")
    if isinstance(version, int) and version > FORMAT_VERSION:
        raise ExportError(f"{path}: meta.format_version is {version}, written by a newer fedrep (this one "
                          f"reads format {FORMAT_VERSION} and older); upgrade fedrep to load it")
    try:
        return ExportMeta.model_validate(raw)
    except ValidationError as err:
        first = err.errors()[0]
        where = "meta." + ".".join(str(p) for p in first["loc"])
        more = f" (and {err.error_count() - 1} more)" if err.error_count() > 1 else ""
        raise _bad_file(path, f"{where}: {first['msg']}{more}") from None


def load_exported(path: str | Path) -> tuple[SplitModel, ExportMeta]:
    """Rebuild an exported model: the run's configuration from the file, the strategy's model
    (as its clients built it), the saved state. The model is in eval mode, on the CPU.

    Checked on the way: the file loads as plain data (``weights_only``), its metadata is an
    :class:`ExportMeta` (errors name the file and the field) and its tensors fit the model."""
    path = Path(path)
    if not path.is_file():
        raise ExportError(f"{path} does not exist; give a file written by export_client or personalize")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except LOAD_ERRORS as err:
        hint = "; a .torchscript.pt file loads with torch.jit.load" if "torchscript" in path.name else ""
        raise _bad_file(path, f"{load_error(err)}{hint}") from None
    if not isinstance(payload, dict) or not {"meta", "state"} <= set(payload):
        got = sorted(payload)[:4] if isinstance(payload, dict) else type(payload).__name__
        raise _bad_file(path, f"expected a dict with 'meta' and 'state', got {got}")
    meta = _validated_meta(path, payload["meta"])
    state = payload["state"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise _bad_file(path, "state is not a dict of tensors")
    try:
        cfg = parse_run_config(meta.config, "meta.config")
    except ConfigError as err:  # e.g. a strategy plugin this machine does not have installed
        raise ExportError(f"{path}: {' '.join(str(err).split())}") from None
    for name in ("strategy", "model", "dataset"):
        if getattr(cfg, name) != getattr(meta, name):
            raise _bad_file(path, f"meta.{name} is {getattr(meta, name)!r}, but meta.config says "
                                  f"{getattr(cfg, name)!r}")
    _, model = _strategy_model(cfg, meta.input_shape, meta.num_classes)
    expected = model.state_dict()
    if sorted(state) != sorted(expected):
        missing, extra = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
        raise _bad_file(path, f"state lacks {missing[:3]} / has unknown {extra[:3]} for model "
                              f"{meta.model!r} of strategy {meta.strategy!r}")
    for key, tensor in state.items():
        if tensor.shape != expected[key].shape:
            raise _bad_file(path, f"state[{key!r}] has shape {tuple(tensor.shape)}, model "
                                  f"{meta.model!r} needs {tuple(expected[key].shape)}")
    model.load_state_dict(state)
    model.eval()
    return model, meta


def _check_inputs(x: np.ndarray, shape: tuple[int, ...], what: str) -> np.ndarray:
    """``x`` as (N, *shape) float32; one sample of ``shape`` becomes a batch of one."""
    if not (np.issubdtype(x.dtype, np.number) or x.dtype == np.bool_):
        raise ExportError(f"{what}: numbers expected, got an array of {x.dtype}")
    if x.shape == shape:
        x = x[None]
    if x.ndim != len(shape) + 1 or tuple(x.shape[1:]) != shape:
        raise ExportError(f"{what}: the model takes inputs of shape (N, {_shape(shape)[1:-1]}) (or one of "
                          f"{_shape(shape)}); got {_shape(x.shape)}")
    return np.ascontiguousarray(x, dtype=np.float32)


def predict(model: SplitModel, inputs: np.ndarray, meta: ExportMeta | None = None,
            batch_size: int = PREDICT_BATCH) -> np.ndarray:
    """Class indices (N,) for ``inputs`` (N, *input_shape), or the outputs of a regression model.
    With ``meta``, inputs of another shape are refused naming both shapes (without it, the model
    itself is the check). Batches of 128 as in the run's evaluation, so that the predictions
    reproduce its accuracy exactly."""
    x = np.asarray(inputs)
    if meta is not None:
        x = _check_inputs(x, meta.input_shape, "inputs")
    else:
        x = np.ascontiguousarray(x, dtype=np.float32)
    tensor = torch.from_numpy(x)
    model.eval()
    outputs = []
    with torch.no_grad():
        for start in range(0, len(tensor), batch_size):
            try:
                outputs.append(model(tensor[start : start + batch_size]))
            except RuntimeError as err:
                raise ExportError(f"inputs of shape {_shape(x.shape)} do not fit the model "
                                  f"({str(err).splitlines()[0][:160]}); give (N, *input_shape) inputs, "
                                  "input_shape as the file's meta says") from None
    if not outputs:
        return np.zeros((0,), dtype=np.int64)
    out = torch.cat(outputs)
    if model.task == "classification":
        return out.argmax(dim=1).numpy()
    return (out[:, 0] if out.ndim == 2 and out.shape[1] == 1 else out).numpy()


def _read_npy(path: Path, meta: ExportMeta) -> np.ndarray:
    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as err:
        raise ExportError(f"{path} is not a readable .npy array ({str(err).splitlines()[0][:120]}); "
                          "save inputs with numpy.save") from None
    if not isinstance(array, np.ndarray):
        raise ExportError(f"{path} holds several arrays (an .npz); give one .npy array of inputs")
    note = (" (.npy arrays are model inputs, normalised as the run's data set; give images as image "
            "files to have them converted)" if meta.image is not None else "")
    try:
        return _check_inputs(array, meta.input_shape, str(path))
    except ExportError as err:
        raise ExportError(f"{err}{note}") from None


def _read_image(path: Path, meta: ExportMeta) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    spec = meta.image
    if spec is None:
        raise ExportError(f"{path}: a {meta.dataset} model ({meta.model}) takes no images, its inputs have "
                          f"shape {_shape(meta.input_shape)}; give a .npy array of such inputs")
    try:
        with Image.open(path) as image:
            image = image.convert(spec.mode)
            if image.size != (spec.width, spec.height):
                image = image.resize((spec.width, spec.height), Image.Resampling.BILINEAR)
            pixels = np.asarray(image, dtype=np.uint8)
    except (OSError, UnidentifiedImageError, ValueError) as err:
        raise ExportError(f"{path} is not a readable image ({err}); give PNG or JPEG files") from None
    if pixels.ndim == 2:
        pixels = pixels[:, :, None]
    # The data sets' own arithmetic (transforms.normalized_chw): (pixel / 255 - mean) / std.
    return normalized_chw(pixels[None], spec.mean, spec.std)[0].numpy()


def read_inputs(paths: str | Path | Sequence[str | Path], meta: ExportMeta) -> np.ndarray:
    """Model inputs (N, *input_shape) float32 from ``.npy`` arrays (model inputs as they are) and
    image files (each converted by ``meta.image``: grayscale or RGB, resized to the model's size,
    normalised as the run's data set), in the order given."""
    items = [paths] if isinstance(paths, str | Path) else list(paths)
    if not items:
        raise ExportError("no input files given; give .npy arrays or image files")
    chunks = []
    for item in items:
        path = Path(item)
        if not path.is_file():
            raise ExportError(f"{path} does not exist; give .npy arrays or image files")
        suffix = path.suffix.lower()
        if suffix == ".npy":
            chunks.append(_read_npy(path, meta))
        elif suffix in IMAGE_SUFFIXES:
            chunks.append(_read_image(path, meta)[None])
        else:
            raise ExportError(f"{path}: unknown input type {suffix or '(no suffix)'!r}; give .npy arrays "
                              f"or image files ({', '.join(IMAGE_SUFFIXES)})")
    return np.concatenate(chunks)


# -- the run's own numbers ---------------------------------------------------------------------------
def reported_client_metrics(run_dir: str | Path, round: int | None = None
                            ) -> dict[int, dict[str, float]]:
    """What each client reported in ``round``'s evaluation (default: the last completed round), by
    partition: the ``evaluate`` replies in ``messages.jsonl`` (the per-client rows behind
    ``metrics.jsonl``'s means; ``accuracy`` is before and ``accuracy-finetuned`` after the final
    fine-tune). Held-out new clients are left out: their row is the new-clients experiment. {}
    when that round had no evaluation."""
    from fedrep.algorithms.sampling import new_clients

    run = RunDir.open(run_dir)
    cfg = run.saved_config()
    server_round = run.last_completed_round() if round is None else round
    held_out = new_clients(cfg.num_clients, cfg.new_clients, cfg.seed)
    return {int(r["partition"]): dict(r.get("metrics", {})) for r in run.read_audit()
            if r["round"] == server_round and r.get("kind") == "evaluate" and not r.get("error")
            and r.get("partition") is not None and int(r["partition"]) not in held_out}


def evaluate_client(run_dir: str | Path, client: int, round: int | None = None
                    ) -> dict[str, Any]:
    """Client ``client``'s evaluation in ``round`` (default: the last completed), repeated: its
    model (as :func:`export_client` writes it), its local test split, the strategy's own
    ``evaluate`` with the generator the run gave it and the run's thread count. Returns
    ``client``, ``round``, ``num-examples``, ``loss``, ``accuracy`` and what the run reported for
    the client in that round (``reported-loss``, ``reported-accuracy``; None where it was not
    evaluated): the same numbers, bit for bit."""
    source = _Run(run_dir)
    source.check_client(client)
    server_round = source.resolve_round(round)
    cfg = source.cfg
    model = source.load(client, server_round)
    with _threads(cfg.client_threads):
        result = source.rule.evaluate(model, load_client_data(cfg, client),
                                      round_generator(cfg.seed, server_round, client, EVAL))
    reported = reported_client_metrics(source.run.path, server_round).get(client, {})
    return {"client": client, "round": server_round, "num-examples": result.num_examples,
            "loss": result.loss, "accuracy": result.accuracy,
            "reported-loss": reported.get("loss"), "reported-accuracy": reported.get("accuracy")}


# -- personalize: a client the run never saw ---------------------------------------------------------------
def _labels(y: np.ndarray, where: str, count: int, meta_task: str, classes: int) -> torch.Tensor:
    if meta_task == "regression":
        if not np.issubdtype(y.dtype, np.number) or y.size != count:
            raise ExportError(f"{where}: one number per sample expected, shape ({count},); got "
                              f"{_shape(y.shape)} of {y.dtype}")
        return torch.from_numpy(np.ascontiguousarray(y, dtype=np.float32).reshape(count, 1))
    if y.shape != (count,):
        raise ExportError(f"{where}: one class label per sample expected, shape ({count},); "
                          f"got {_shape(y.shape)}")
    if not np.issubdtype(y.dtype, np.integer):
        if not (np.issubdtype(y.dtype, np.floating) and np.all(np.mod(y, 1) == 0)):
            raise ExportError(f"{where}: integer class labels expected, got {y.dtype}")
    bad = (y < 0) | (y >= classes)
    if bad.any():
        raise ExportError(f"{where}: labels must lie in [0, {classes}) (the run's {classes} classes); "
                          f"{int(bad.sum())} do not, e.g. {y[bad][0]!r}")
    return torch.from_numpy(np.ascontiguousarray(y, dtype=np.int64))


def _npz_data(path: Path, source: _Run) -> ClientData:
    if not path.is_file():
        raise ExportError(f"{path} does not exist; give an .npz with x_train, y_train (and optionally "
                          "x_test, y_test), or a partition id of the run's data set")
    try:
        loaded = np.load(path, allow_pickle=False)
        arrays = None
        if isinstance(loaded, np.lib.npyio.NpzFile):
            with loaded as npz:
                arrays = {k: npz[k] for k in npz.files}
    except (OSError, ValueError, EOFError) as err:
        raise ExportError(f"{path} is not a readable .npz ({str(err).splitlines()[0][:120]}); save it with "
                          "numpy.savez(path, x_train=..., y_train=..., x_test=..., y_test=...)") from None
    if arrays is None:
        raise ExportError(f"{path} is a single array; save an .npz with x_train, y_train")
    missing = [k for k in ("x_train", "y_train") if k not in arrays]
    if missing:
        raise ExportError(f"{path} lacks {', '.join(missing)} (it holds {sorted(arrays)}); save x_train "
                          "(model inputs) and y_train (class labels)")
    if ("x_test" in arrays) != ("y_test" in arrays):
        raise ExportError(f"{path}: give both x_test and y_test, or neither")
    shape, task = source.input_shape, source.model.task

    def split(name: str) -> tuple[torch.Tensor, torch.Tensor]:
        if f"x_{name}" not in arrays:
            regression = task == "regression"
            no_labels = torch.zeros((0, 1)) if regression else torch.zeros((0,), dtype=torch.int64)
            return torch.zeros((0, *shape)), no_labels
        x = arrays[f"x_{name}"]
        if x.shape == shape or x.ndim != len(shape) + 1 or tuple(x.shape[1:]) != shape:
            raise ExportError(f"{path}: x_{name} must have shape (N, {_shape(shape)[1:-1]}) (the model's "
                              f"inputs, normalised as the run's data set); got {_shape(x.shape)}")
        inputs = torch.from_numpy(_check_inputs(x, shape, f"{path}: x_{name}"))
        labels = _labels(arrays[f"y_{name}"], f"{path}: y_{name}", len(x), task, source.num_classes)
        return inputs, labels

    x_train, y_train = split("train")
    if len(y_train) == 0:
        raise ExportError(f"{path}: x_train holds no samples; a head needs data to train on")
    return ClientData(x_train, y_train, *split("test"))


def personalize(run_dir: str | Path, data: str | Path | int, epochs: int | None = None,
                out: str | Path | None = None, *, round: int | None = None,
                torchscript: bool = False) -> Path:
    """Onboard a new client and export its model: the personal parameters start where a client
    that never trained starts (the run's initial ones), the shared ones are round ``round``'s
    (default: the last); then ``epochs`` (default: the run's ``new-client-epochs``) of the
    strategy's ``finetune_and_evaluate``, the code path of the run's ``new-clients`` step: FedRep
    trains the head alone on the frozen body (body features cached), FedAvg-style strategies
    fine-tune their global model's head, each as its rule says. Returns the written file; its
    ``meta.test_accuracy`` (also printed) is the accuracy on the test data, when there is some.

    ``data``: an ``.npz`` with ``x_train``, ``y_train`` (and optionally ``x_test``, ``y_test``),
    inputs as the model takes them (normalised as the run's data set) and labels in
    ``[0, num_classes)``; or a partition id of the run's data set (a held-out new client gets
    exactly the number the run reported for it). Data of another shape or class range is refused.
    The training draws its shuffles from the run's seed, the round and the partition id (for an
    ``.npz``: ``num-clients``, the first id past the federation)."""
    source = _Run(run_dir)
    cfg = source.cfg
    server_round = source.resolve_round(round)
    epochs = cfg.new_client_epochs if epochs is None else epochs
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ExportError(f"epochs={epochs!r}: give a whole number of head epochs, 1 or more")
    if isinstance(data, int | np.integer) and not isinstance(data, bool):
        partition = int(data)
        source.check_client(partition)
        client_data = load_client_data(cfg, partition)
        _labels(client_data.y_train.numpy(), f"partition {partition}'s training labels",  # KD3A's
                client_data.num_train, source.model.task, source.num_classes)  # target has -1s
        client, stream, name = partition, partition, f"new-client-{partition}-round-{server_round}.pt"
        what = f"partition {partition} of {cfg.dataset}"
    elif isinstance(data, str | Path):
        path = Path(data)
        if path.suffix.lower() != ".npz":
            raise ExportError(f"data={path}: give an .npz file (x_train, y_train, optional x_test, y_test) "
                              "or a partition id")
        client_data = _npz_data(path, source)
        client, stream, name = None, cfg.num_clients, f"{path.stem}-round-{server_round}.pt"
        what = str(path)
    else:
        raise ExportError(f"data={data!r}: give an .npz file or a partition id")
    model = source.model
    model.load_state_dict({**source.initial, **source.body(server_round)})
    with _threads(cfg.client_threads):
        result = source.rule.finetune_and_evaluate(
            model, client_data, epochs, round_generator(cfg.seed, server_round, stream, FINETUNE))
    tested = client_data.num_test > 0
    meta = source.meta(client, server_round,
                       f"{source.run.path}: round {server_round}'s shared parameters, personal ones "
                       f"trained {epochs} epoch{'s' * (epochs > 1)} on {what} (personalize)",
                       test_examples=client_data.num_test if tested else None,
                       test_accuracy=result.accuracy if tested else None)
    target = _target(out, source.run.path / "exports", name)
    path = write_model(model, meta, target, torchscript)
    if tested and result.accuracy is not None:
        print(f"[fedrep] personalized on {what}: test accuracy {result.accuracy:.4f} on "
              f"{client_data.num_test} samples -> {path}", file=sys.stderr, flush=True)
    return path

