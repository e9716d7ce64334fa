"""Validated configuration for every external input: the Flower run config, experiment files, CLI.

One model, :class:`RunConfig`, is the single source of truth. Flower hands the ServerApp and every
ClientApp a flat ``{key: value}`` run config (``[tool.flwr.app.config]`` in ``pyproject.toml`` fused
with ``--run-config`` overrides); experiment files are flat TOML with the same keys; CLI flags map
onto the same keys. Keys are kebab-case, as Flower writes them.

The keys are declared by their owners, by concern (:mod:`fedrep.keys`): the core run keys here
(:class:`CoreKeys`), the built-in rules' local-update keys in :mod:`fedrep.algorithms.update_keys`,
and each data-set family's facts (:class:`~fedrep.keys.DatasetSpec`) and keys in
``fedrep/data/*_spec.py``. A strategy plugin's own options are its pydantic model, given under
``strategy-options`` and validated by the plugin.

Defaults follow the FedRep paper (Collins et al., ICML 2021) and its official code
(github.com/lgcollins/FedRep, ``utils/options.py`` and ``scripts/FedRep_cifar10_2shards.sh``);
each field's description says where its default comes from.

A bad key or value fails *at start*, with the key's name, what was given and what is allowed:
:func:`parse_run_config` raises :class:`ConfigError` whose message is meant for a human.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import tomllib
from pydantic import (
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from fedrep.algorithms.privacy_keys import PrivacyKeys, privacy_problem
from fedrep.algorithms.robust_keys import RobustKeys, aggregation_problem
from fedrep.algorithms.update_keys import LocalUpdateKeys
from fedrep.data import domains_spec, images_spec, leaf_spec, linear_spec
from fedrep.data.domains_spec import MULTI_DOMAIN, DomainKeys
from fedrep.data.images_spec import ImageKeys
from fedrep.data.leaf_spec import LeafKeys
from fedrep.data.linear_spec import LinearTaskKeys
from fedrep.keys import ConfigError, DatasetSpec, KeySection, kebab

# Every data set, as its family declares it (fedrep/data/*_spec.py).
DATASETS: dict[str, DatasetSpec] = {
    spec.name: spec
    for family in (images_spec, leaf_spec, linear_spec, domains_spec) for spec in family.SPECS
}
# The models each data set can run; the first is the default, the official code's choice.
DATASET_MODELS: dict[str, tuple[str, ...]] = {name: spec.models for name, spec in DATASETS.items()}
NATURAL_CLIENTS = tuple(name for name, spec in DATASETS.items() if spec.natural_clients)
INDEXABLE = tuple(name for name, spec in DATASETS.items() if spec.indexable)
DatasetName = Literal[tuple(DATASETS)]  # type: ignore[valid-type]

__all__ = ["ConfigError", "RunConfig", "parse_run_config", "DATASETS", "MULTI_DOMAIN"]


class CoreKeys(KeySection):
    """The keys every run has, whatever its strategy and data set."""

    # --- what to run -----------------------------------------------------------------------
    strategy: str = Field(
        "fedrep",
        description="Registered strategy plugin name (see `fedrep strategies`).",
    )
    strategy_options: str = Field(
        "",
        description="The strategy plugin's own options as a TOML inline table, e.g. '{mu = 0.01}' "
        "(see `fedrep strategies`).",
    )
    dataset: DatasetName = Field(
        "fashion-mnist", description="Data set: Fashion-MNIST IDX files; the paper's Table 1 sets "
        "'cifar10'/'cifar100' (python-pickle archives) and 'femnist'/'sent140' (LEAF JSON, LEAF's "
        "writers / Twitter users as clients; sent140 also needs GloVe vectors); 'pfllib' (a "
        "PFLlib-generated folder given as partition-file, its arrays used as they are); the paper's "
        "Sec. 5 linear task; or a multi-domain set for KD3A: 'fmnist-domains' (five domains derived "
        "from Fashion-MNIST, offline) or 'digit-five' (KD3A's .mat files). See docs/data.md.",
    )
    model: Literal["cnn", "mlp", "linear", "cnn-bn", "cnn-cifar100", "fedavg-cnn", "femnist-cnn",
                   "lstm", "kd3a-digit"] = Field(
        "cnn",
        description="Network; when not given, the official one for the data set (fashion-mnist, "
        "cifar10: cnn; cifar100: cnn-cifar100; femnist: mlp; sent140: lstm; pfllib: fedavg-cnn). "
        "'cnn' is the paper's CIFAR CNN (official models/Nets.py CNNCifar) sized "
        "for the input; 'cnn-cifar100' the official CNNCifar100; 'mlp' the official MLP; "
        "'femnist-cnn' the official CNN_FEMNIST; 'lstm' the official Sent140 RNNSent; 'fedavg-cnn' "
        "PFLlib's FedAvgCNN (conv32-conv64-fc512); 'linear' the Sec. 5 model y = w^T B^T x; 'cnn-bn' "
        "a BatchNorm CNN (KD3A's digit network, narrowed) for 3x32x32 domains or 1x28x28 "
        "Fashion-MNIST (BN-only personalization: strategy 'split' with personal_batchnorm); 'kd3a-digit' "
        "KD3A's official Digit-Five network (model/digit5.py: conv 64-64-128, fc 8192-3072-2048).",
    )

    # --- federation and data split ------------------------------------------------------------
    num_clients: int = Field(100, ge=1, description="Number of clients n (official default 100).")
    partition: Literal["pathological", "dirichlet", "iid", "natural", "file"] = Field(
        "pathological",
        description="'pathological': s classes per client in equal shards (paper's CIFAR setting); "
        "'dirichlet': Dir(alpha) label skew; 'iid'; 'natural': LEAF's users are the clients "
        "(femnist, sent140: the default there); 'file': the clients of partition-file (a fedrep "
        "JSON of index lists, see `fedrep config --partition-schema`, or a PFLlib folder).",
    )
    partition_file: str = Field(
        "", description="partition = 'file': a JSON of per-client train/test index lists into the "
        "data set (fashion-mnist, cifar10, cifar100), or, with dataset 'pfllib', PFLlib's folder "
        "(config.json, train/<i>.npz, test/<i>.npz) read as it is.",
    )
    classes_per_client: int = Field(
        2, ge=1, description="s, classes per client for 'pathological' (official shard_per_user=2)."
    )
    dirichlet_alpha: float = Field(0.5, gt=0, description="Concentration alpha for 'dirichlet'.")
    max_train_per_client: int = Field(
        0, ge=0, description="Cap on each client's train samples (0 = whole shard)."
    )
    max_test_per_client: int = Field(
        0, ge=0, description="Cap on each client's local test samples (0 = whole shard)."
    )
    data_dir: str = Field(
        "",
        description="Directory with the IDX files; empty = $FEDREP_DATA_DIR, then Debian's "
        "/usr/share/datasets/fashion-mnist, then download.",
    )

    model_width: int = Field(
        0, ge=0, description="cnn-bn: channels of the first conv layer (0 = 32; 64 is the official "
        "digit network's width). Narrow models make fast tests.")

    # --- rounds and participation ----------------------------------------------------------------
    num_rounds: int = Field(
        10, ge=1, description="Communication rounds T (paper CIFAR: 100; 10 keeps the default job short).")
    fraction_train: float = Field(
        0.1, gt=0, le=1, description="Fraction of clients sampled per round (official frac=0.1)."
    )
    fraction_evaluate: float = Field(
        1.0, gt=0, le=1, description="Fraction of clients evaluated (paper: all clients)."
    )
    eval_every: int = Field(1, ge=1, description="Evaluate every k rounds (and always at the last).")

    new_clients: float = Field(
        0.0, ge=0, lt=1, description="Share of the clients held out of training (the paper's "
        "generalisation to new clients): they never train and are not evaluated during the run; "
        "after the last round each trains from the final model for new-client-epochs (FedRep: a "
        "head on the final representation; FedAvg+FT: its fine-tune) and reports new-clients-* "
        "metrics.")
    aggregation_weights: Literal["samples", "equal", "official"] = Field(
        "samples", description="How the server weights the clients' shared parameters: by train "
        "sample count (FedAvg's rule), 'equal', or 'official': as the official main_fedrep.py "
        "(lens = ones for CIFAR/MNIST: equal; LEAF: sample counts). Identical on equal shards.")
    # --- reproducibility, resources and output --------------------------------------------------
    seed: int = Field(
        1, ge=0, description="Seeds data split, model init, sampling and shuffles (official 1)."
    )
    client_threads: int = Field(
        1, ge=1, description="torch intra-op threads per client process (1 keeps runs bitwise repeatable)."
    )
    client_cpus: float = Field(
        1.0, gt=0, description="CPUs Ray reserves per simulated client (sets parallelism)."
    )
    client_gpus: float = Field(
        0.0, ge=0, description="GPUs (fractions allowed) Ray reserves per simulated client."
    )
    wait_for_clients: float = Field(
        120.0, ge=0, description="Seconds the server waits for all num-clients nodes to connect."
    )
    reply_timeout: float = Field(
        3600.0, gt=0, description="Seconds a round waits for its replies. A client that has not "
        "answered by then counts as failed for that round (node-lost in events.jsonl) and the round "
        "goes on. In a deployment a SuperNode that restarts mid-round, before the SuperLink has "
        "marked it offline, never answers the message it had (Flower 1.41): lower this to a few "
        "times a round's training time to bound that wait.",
    )
    on_damaged_head: Literal["stop", "restart"] = Field(
        "stop",
        description="A client whose saved head (client-state file) cannot be read: 'stop' the run "
        "before the round counts, naming the file (restore it and resume); 'restart' that client "
        "from a fresh head, reported in events.jsonl (fedrep run --restart-damaged-heads).",
    )
    out_dir: str = Field("runs", description="Parent folder for new run folders.")
    tracking: str = Field(
        "", description="Mirror every metric row and the config to experiment trackers: "
        "'tensorboard' (RUN_DIR/tensorboard), 'mlflow' ($MLFLOW_TRACKING_URI, else "
        "sqlite RUN_DIR/mlflow.db), or both comma-separated; empty = none. The run folder stays the "
        "source of truth. Needs the extra: pip install -e \".[tensorboard]\" / \".[mlflow]\".")
    run_dir: str = Field("", description="Run folder; empty = a new folder under out-dir.")
    resume: bool = Field(False, description="Continue the run in run-dir from its last completed round.")
    onboard: bool = Field(
        False, description="With resume on a finished run: train no round; every connected client "
        "that never trained in it (held-out new clients; on a deployment, SuperNodes that joined "
        "after the run) gets a head on the final body (new-client-epochs, the head-only path), keeps "
        "it like any head and reports accuracy before/after (onboarded.jsonl). `fedrep run --resume "
        "RUN_DIR --onboard`, or on a SuperLink `flwr run . CONN --run-config 'resume=true "
        "run-dir=\"RUN_DIR\" onboard=true'`.")


class RunConfig(CoreKeys, LocalUpdateKeys, RobustKeys, PrivacyKeys, ImageKeys, LeafKeys, DomainKeys,
                LinearTaskKeys):
    """Everything one federated run needs: the core keys and every concern's section, one flat
    key space (field aliases are the run-config keys). Each section checks its own keys; the
    checks across sections (a model that fits the data set, a partition the data set allows) are
    here."""

    @model_validator(mode="before")
    @classmethod
    def _dataset_defaults(cls, values: Any) -> Any:
        """A data set given without a model or partition gets its own (the official model; LEAF's
        users as clients; a PFLlib folder's clients) and the official script's settings
        (:attr:`DatasetSpec.defaults`) for keys not given, so `--dataset sent140` is a whole run."""
        if not isinstance(values, dict):
            return values
        spec = DATASETS.get(values.get("dataset", "fashion-mnist"))
        if spec is None:
            return values
        out = dict(values)
        if "model" not in out:
            out["model"] = spec.models[0]
        if "partition" not in out and spec.default_partition:
            out["partition"] = spec.default_partition
        for key, value in spec.defaults.items():
            if key not in out and key.replace("-", "_") not in out:
                out[key] = value
        return out

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        """pydantic reads ``true`` as 1 for an int field; ``eval-every = true`` is a mistake."""
        if isinstance(value, bool) and cls.model_fields[info.field_name].annotation is not bool:
            raise ValueError("a true/false value where a number or text is expected")
        return value

    @field_validator("tracking")
    @classmethod
    def _known_trackers(cls, spec: str) -> str:
        from fedrep.tracking import parse_spec  # local: tracking imports this module

        try:
            parse_spec(spec)
        except ConfigError as err:
            raise ValueError(str(err).removeprefix(f"tracking = {spec!r}: ")) from None
        return spec

    @field_validator("strategy")
    @classmethod
    def _strategy_is_registered(cls, name: str) -> str:
        from fedrep.registry import available_strategies  # local: registry imports plugins

        names = available_strategies()
        if name not in names:
            raise ValueError(f"unknown strategy {name!r}; installed: {', '.join(sorted(names))}")
        return name

    @field_validator("strategy_options", mode="before")
    @classmethod
    def _options_as_text(cls, value: Any) -> Any:
        """Flower run configs hold scalars only, so a table given as a dict (TOML file, --set)
        travels as its inline-table text."""
        return toml_value(value) if isinstance(value, dict) else value

    @model_validator(mode="after")
    def _options_valid(self) -> RunConfig:
        from fedrep.registry import get_strategy

        if self.strategy_options.strip():
            get_strategy(self.strategy).parse_options(self.strategy_options)
        return self

    @model_validator(mode="after")
    def _consistent(self) -> RunConfig:
        spec = DATASETS[self.dataset]
        if self.model not in spec.models:
            raise ValueError(
                f"model {self.model!r} does not fit dataset {self.dataset!r}; use one of {spec.models}"
            )
        self._check_partition()
        n_classes = self.num_classes()
        if (
            self.dataset != "linear-synthetic"
            and self.partition == "pathological"
            and self.classes_per_client > n_classes
        ):
            raise ValueError(
                f"classes-per-client={self.classes_per_client} exceeds the {n_classes} classes of "
                f"{self.dataset}; use 1..{n_classes}"
            )
        if self.new_clients and spec.multi_domain:
            raise ValueError("new-clients holds clients out of training; a multi-domain set's "
                             "clients are its domains: leave new-clients at 0")
        if self.new_clients and round(self.new_clients * self.num_clients) >= self.num_clients:
            raise ValueError(f"new-clients={self.new_clients} holds out every one of the "
                             f"{self.num_clients} clients; use a smaller share")
        if self.resume and not self.run_dir:
            raise ValueError("resume=true needs run-dir: the folder of the run to continue")
        self._check_robustness(spec.multi_domain)
        self._check_privacy(spec.multi_domain)
        if self.onboard and not self.resume:
            raise ValueError("onboard=true gives new clients heads on a finished run's body: use it "
                             "with resume (fedrep run --resume RUN_DIR --onboard)")
        if self.onboard and spec.multi_domain:
            raise ValueError("onboard=true trains heads for new clients; a multi-domain set's "
                             "clients are its fixed domains: leave onboard off")
        return self

    def _check_robustness(self, multi_domain: bool) -> None:
        """Robust aggregation and attacks: settings a round could not run, refused at start."""
        if multi_domain and (self.aggregation != "mean" or self.attack != "none"):
            raise ValueError("aggregation / attack apply to strategies that average a shared part; "
                             "KD3A weights its domains itself (its robustness: malicious-domain)")
        # (an attack with attack-share 0 is a sweep's clean point)
        if self.attack == "none" and self.attack_share > 0:
            raise ValueError(f"attack-share={self.attack_share} but attack='none': name the attack "
                             "(label-flip, sign-flip, scale) or set attack-share=0")
        federation, per_round = self.federation_size(), self.clients_per_round()
        problem = aggregation_problem(self.aggregation, per_round, self.trim_fraction,
                                      self.byzantine_clients, self.krum_select)
        if problem:
            raise ValueError(f"aggregation={self.aggregation!r}: {problem} (fraction-train="
                             f"{self.fraction_train} of {federation} clients); raise fraction-train or "
                             "num-clients, or lower byzantine-clients")

    def _check_privacy(self, multi_domain: bool) -> None:
        """Differential privacy: settings whose guarantee would not hold, refused at start."""
        if self.dp == "none":
            return
        if multi_domain or self.strategy == "local":
            raise ValueError(f"dp={self.dp!r} protects what clients share; {self.strategy} on "
                             f"{self.dataset} shares no averaged part: set dp='none'")
        problem = privacy_problem(self.dp, self.dp_clipping, self.dp_adaptive_clip, self.dp_noise_multiplier,
                                  self.dp_epsilon_budget, self.aggregation)
        if problem:
            raise ValueError(f"dp={self.dp!r}: {problem}")
        if self.dp_adaptive_clip:
            from fedrep.algorithms.privacy import count_stddev, update_noise_multiplier

            update_noise_multiplier(self.dp_noise_multiplier,
                                    count_stddev(self.dp_count_stddev, self.clients_per_round()))

    def _check_partition(self) -> None:
        if (self.dataset in NATURAL_CLIENTS) != (self.partition == "natural"):
            raise ValueError(
                f"partition={self.partition!r} with dataset={self.dataset!r}: LEAF's data sets "
                f"({', '.join(NATURAL_CLIENTS)}) and only they use partition='natural' (their users "
                "are the clients)")
        if self.partition == "file":
            if not self.partition_file:
                raise ValueError("partition='file' needs partition-file: a fedrep JSON of index "
                                 "lists, or a PFLlib folder (with dataset='pfllib')")
            if self.dataset not in (*INDEXABLE, "pfllib"):
                raise ValueError(f"partition='file' reads clients of {', '.join(INDEXABLE)} (JSON index "
                                 f"lists) or a PFLlib folder (dataset='pfllib'), not {self.dataset!r}")
        elif self.dataset == "pfllib":
            raise ValueError("dataset='pfllib' reads a PFLlib folder: set partition='file' and "
                             "partition-file=FOLDER")
        elif self.partition_file:
            raise ValueError(f"partition-file is set, but partition={self.partition!r}; set "
                             "partition='file' to use it, or leave partition-file empty")

    def federation_size(self) -> int:
        """The clients that train: all but the held-out new clients."""
        from fedrep.algorithms.sampling import new_clients

        return self.num_clients - len(new_clients(self.num_clients, self.new_clients, self.seed))

    def clients_per_round(self) -> int:
        """How many clients a training round samples when every one is connected."""
        from fedrep.algorithms.sampling import num_sampled

        return num_sampled(self.federation_size(), self.fraction_train)

    def equal_aggregation(self) -> bool:
        """Whether clients' shared parameters are averaged with equal weights (always under
        central DP)."""
        if self.dp == "central":
            return True
        if self.aggregation_weights == "official":
            return self.dataset not in NATURAL_CLIENTS
        return self.aggregation_weights == "equal"

    def num_classes(self) -> int:
        """Classes of the data set (0 for a PFLlib folder, whose config.json says)."""
        if self.dataset == leaf_spec.FEMNIST.name:
            return self.femnist_num_classes()
        return DATASETS[self.dataset].num_classes

    def to_flower(self) -> dict[str, Any]:
        """The flat kebab-case mapping Flower's run config carries."""
        return self.model_dump(by_alias=True)


def toml_value(value: Any) -> str:
    """A Python scalar/list as TOML value text (for Flower run-config files and overrides)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):  # an inline table; keys quoted unless TOML allows them bare
        keys = [k if re.fullmatch(r"[A-Za-z0-9_-]+", str(k)) else toml_value(str(k)) for k in value]
        return "{" + ", ".join(f"{k} = {toml_value(v)}" for k, v in zip(keys, value.values(),
                                                                       strict=True)) + "}"
    return repr(value)


def allowed_keys() -> list[str]:
    return sorted(kebab(name) for name in RunConfig.model_fields)


def _describe(key: str) -> str:
    field = RunConfig.model_fields.get(key.replace("-", "_"))
    return f" ({field.description})" if field and field.description else ""


def _format_errors(err: ValidationError, source: str) -> str:
    lines = [f"invalid {source}:"]
    for item in err.errors():
        loc = ".".join(str(part) for part in item["loc"])
        if item["type"] == "extra_forbidden":
            close = difflib.get_close_matches(loc, allowed_keys(), n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            lines.append(
                f"  - unknown key '{loc}'.{hint} Valid keys: {', '.join(allowed_keys())}"
            )
            continue
        msg = item["msg"].removeprefix("Value error, ")
        if loc:
            given = item.get("input")
            lines.append(f"  - '{loc}' = {given!r}: {msg}{_describe(loc)}")
        else:
            lines.append(f"  - {msg}")
    return "\n".join(lines)


def parse_run_config(values: Mapping[str, Any], source: str = "run config") -> RunConfig:
    """Validate a flat kebab-case mapping; raise :class:`ConfigError` naming every bad key."""
    try:
        return RunConfig.model_validate(dict(values))
    except ValidationError as err:
        raise ConfigError(_format_errors(err, source)) from None


def read_toml(path: Path, what: str) -> dict[str, Any]:
    """A TOML file's table, or one :class:`ConfigError` line naming the file and the problem
    (missing, unreadable, not UTF-8 text, not TOML)."""
    if not path.is_file():
        raise ConfigError(f"{what} {path} does not exist; pass an existing TOML file")
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise ConfigError(f"{what} {path} is not UTF-8 text (byte {err.start}: {err.reason}); "
                          "pass a TOML file") from None
    except OSError as err:
        raise ConfigError(f"{what} {path} cannot be read: {err.strerror or err}") from None
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{what} {path} is not valid TOML: {err}") from None


def load_experiment_file(path: str | Path) -> dict[str, Any]:
    """Read a flat TOML experiment file (same keys as the run config). Validation happens later,
    after CLI overrides are merged, so the error names the final value."""
    path = Path(path)
    data = read_toml(path, "experiment file")
    # strategy-options is the one key whose value is a table ({mu = 0.01}); RunConfig takes it
    nested = [key for key, value in data.items()
              if isinstance(value, dict) and key not in ("strategy-options", "strategy_options")]
    if nested:
        raise ConfigError(
            f"experiment file {path}: tables {nested} are not supported; write flat keys such as "
            "'num-rounds = 10' at the top level"
        )
    return data


def parse_override(text: str) -> tuple[str, Any]:
    """Parse one ``key=value`` CLI override with TOML value syntax (strings may be unquoted)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not key=value (e.g. --set head-epochs=5)")
    key, raw = (part.strip() for part in text.split("=", 1))
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key, value
