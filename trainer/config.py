"""Training configuration by component: YAML sections + command-line overrides, validated before any work starts.

    model:      the model package's own Config (GPTConfig), plus `name` and an optional `preset`
    data:       shards, batch sizes, validation tokens
    optimizer:  `name`, `scalar` (what runs embeddings, norm gains, LM head) and the optimizer's own options: the
                keyword arguments of its class (optimizers.registry.option_fields), each checked by its type here and
                by the class itself on construction
    schedule, parallel, checkpoint, logging, precision: see the dataclasses below (each field has a one-line
                meaning)
    top level:  seed, compile, grad_clip, fused_backward, debug

Command line: `--section.key value` (values are YAML scalars: `--compile true`, `--optimizer.betas 0.9,0.95`,
`--data.dir null`), `--config PATH`, and short aliases for everyday keys (ALIASES: `--lr`, `--optimizer NAME`,
`--num_iterations`, ...). Keys of the old flat format that are not aliases get an error naming their new spelling.

Switching optimizers: when the command line names another optimizer than the config file, the file's optimizer
section is left out and the new optimizer starts from its own training defaults (registry `defaults`), so
`--optimizer prodigy` never inherits Dion's learning rate. Likewise `--model.name` (another model) and
`--model.preset NAME` on the command line replace the file's model fields (further `--model.KEY` overrides apply).
The resolved config (every default spelled out) is written to run_dir/config.yaml.

Any problem raises ConfigError with one line naming the key and what is allowed; main prints it and exits with 2.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

import yaml

from data.loader import ORDERS
from trainer.errors import ConfigError

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "default.yaml"
SCHEDULES = ("wsd", "cosine", "constant")
ACTIVATION_CHECKPOINTING = ("none", "full", "selective")
FSDP_GRADIENT_ACCUMULATION = ("sharded", "unsharded")


def key(default: Any, meaning: str, **kwargs: Any) -> Any:
    """A config field with its one-line meaning (shown by --help)."""
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": meaning}, **kwargs)
    return field(default=default, metadata={"help": meaning}, **kwargs)


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


@dataclass(frozen=True)
class DataConfig:
    dir: str | None = key(None, "directory of token shards (*_train_*.bin, *_val_*.bin); null = the embedded "
                                "Shakespeare corpus")
    batch_size: int = key(8, "global sequences per optimizer step")
    device_batch_size: int | None = key(None, "sequences per micro-batch on each rank; null = batch_size / "
                                              "data-parallel ranks (gradient accumulation fills the rest)")
    val_tokens: int = key(16384, "tokens per validation pass (rounded down to whole batches)")
    order: str = key("sequential", "which tokens each rank reads: sequential (all ranks change shard together) or "
                                   "reference (microsoft/dion's loader, token for token; see data/loader.py)")

    def __post_init__(self):
        _require(self.order in ORDERS, f"data.order: {self.order!r} is not one of {', '.join(ORDERS)}")
        for name in ("batch_size", "val_tokens"):
            _require(getattr(self, name) > 0, f"data.{name}: must be a positive integer, got {getattr(self, name)}")
        _require(self.device_batch_size is None or self.device_batch_size > 0,
                 f"data.device_batch_size: must be a positive integer or null, got {self.device_batch_size}")
        if self.dir is not None:
            _require(Path(self.dir).is_dir(), f"data.dir: {self.dir} is not a directory (use null for the embedded "
                                              f"corpus, or download shards with data/cached_fineweb10B.py)")


@dataclass(frozen=True)
class ScheduleConfig:
    name: str = key("wsd", "LR shape: wsd (warmup, constant, linear warmdown to 0), cosine, constant")
    num_iterations: int = key(300, "optimizer steps of the whole run")
    warmup_ratio: float = key(0.0, "fraction of the steps spent warming up linearly from 0")
    warmdown_ratio: float = key(0.3, "fraction of the steps spent decaying linearly to 0 (wsd)")

    def __post_init__(self):
        _require(self.name in SCHEDULES, f"schedule.name: {self.name!r} is not one of {', '.join(SCHEDULES)}")
        _require(self.num_iterations > 0, f"schedule.num_iterations: must be a positive integer, got "
                                          f"{self.num_iterations}")
        for name in ("warmup_ratio", "warmdown_ratio"):
            _require(0.0 <= getattr(self, name) <= 1.0, f"schedule.{name}: must lie in [0, 1], got "
                                                         f"{getattr(self, name)}")
        _require(self.warmup_ratio + self.warmdown_ratio <= 1.0,
                 f"schedule.warmup_ratio + schedule.warmdown_ratio: must be <= 1, got "
                 f"{self.warmup_ratio + self.warmdown_ratio}")


@dataclass(frozen=True)
class ParallelConfig:
    dp_size: int | None = key(None, "data-parallel replicas (the product of the three sizes = number of processes; "
                                    "all null = DDP over every rank)")
    fs_size: int | None = key(None, "FSDP2 shards per replica")
    tp_size: int | None = key(None, "tensor-parallel ranks (must divide the model's heads)")
    replicate_mesh_grad_sync: bool = key(True, "optimizers that sync replicas themselves (Dion's compressed P/R) "
                                               "do so; false = DDP/FSDP all-reduce full gradients")
    activation_checkpointing: str = key("none", "recompute block activations in backward: none, full (every "
                                                "block), selective (every second block)")
    vocab_parallel: bool = key(True, "with tp_size > 1: shard the token embedding, LM head and cross-entropy on "
                                     "the vocabulary over the TP ranks (false = every TP rank holds and computes "
                                     "the whole head)")
    meta_init: bool = key(True, "when parameters are sharded (fs_size or tp_size > 1): build the model on the meta "
                                "device, parallelize it, then give each rank only its slices (the same initial "
                                "weights); false = build the full model on every rank first")
    fsdp_gradient_accumulation: str = key("sharded", "how FSDP2 accumulates gradients over micro-batches: sharded "
                                                     "(reduce-scatter every micro-batch, keep 1/fs of the gradients "
                                                     "between them) or unsharded (keep full gradients, one "
                                                     "reduce-scatter on the last micro-batch)")

    def __post_init__(self):
        for name in ("dp_size", "fs_size", "tp_size"):
            value = getattr(self, name)
            _require(value is None or value >= 1, f"parallel.{name}: must be a positive integer or null, got {value}")
        _require(self.activation_checkpointing in ACTIVATION_CHECKPOINTING,
                 f"parallel.activation_checkpointing: {self.activation_checkpointing!r} is not one of "
                 f"{', '.join(ACTIVATION_CHECKPOINTING)}")
        _require(self.fsdp_gradient_accumulation in FSDP_GRADIENT_ACCUMULATION,
                 f"parallel.fsdp_gradient_accumulation: {self.fsdp_gradient_accumulation!r} is not one of "
                 f"{', '.join(FSDP_GRADIENT_ACCUMULATION)}")


DTYPES = ("float32", "bfloat16")


@dataclass(frozen=True)
class PrecisionConfig:
    """Each precision decision on its own key (they were one `mixed_precision` switch)."""
    autocast: str = key("auto", "compute dtype of forward and backward (torch.autocast): auto (bfloat16 on CUDA, "
                                "float32 on CPU), float32, bfloat16")
    param_dtype: str = key("float32", "dtype FSDP2 gathers parameters in (MixedPrecisionPolicy.param_dtype)")
    reduce_dtype: str = key("float32", "dtype FSDP2 reduces gradients in (MixedPrecisionPolicy.reduce_dtype)")
    optimizer_states: str = key("float32", "dtype of the optimizer's states where it supports bfloat16 (Dion: "
                                           "momentum and Q, and its Lion/AdamW momenta)")
    optimizer_variances: str = key("float32", "dtype of Dion's AdamW variances when optimizer_states is bfloat16 "
                                              "(bfloat16 = the reference's mixed_precision: true)")

    def __post_init__(self):
        _require(self.autocast in ("auto", *DTYPES), f"precision.autocast: {self.autocast!r} is not one of auto, "
                                                     f"{', '.join(DTYPES)}")
        for name in ("param_dtype", "reduce_dtype", "optimizer_states", "optimizer_variances"):
            _require(getattr(self, name) in DTYPES, f"precision.{name}: {getattr(self, name)!r} is not one of "
                                                    f"{', '.join(DTYPES)}")

    def autocast_dtype(self, device_type: str):
        """The torch dtype to autocast to on `device_type`, or None for float32."""
        import torch
        name = ("bfloat16" if device_type == "cuda" else "float32") if self.autocast == "auto" else self.autocast
        return None if name == "float32" else getattr(torch, name)


@dataclass(frozen=True)
class CheckpointConfig:
    dir: str | None = key(None, "where step_NNNNNNNN checkpoints go; null = run_dir/checkpoints")
    freq: int = key(0, "save every this many steps; 0 = no checkpoints (not even at the end)")
    keep: int = key(2, "newest complete checkpoints kept; older ones are deleted")
    sigterm_grace_seconds: float = key(30.0, "on SIGTERM, save if the last save took less than what is left of this "
                                             "(torchrun waits 30 s before its SIGKILL)")

    def __post_init__(self):
        _require(self.freq >= 0, f"checkpoint.freq: must be >= 0 (0 = off), got {self.freq}")
        _require(self.keep > 0, f"checkpoint.keep: must be a positive integer, got {self.keep}")
        _require(self.sigterm_grace_seconds >= 0, f"checkpoint.sigterm_grace_seconds: must be >= 0, got "
                                                  f"{self.sigterm_grace_seconds}")


@dataclass(frozen=True)
class LoggingConfig:
    run_dir: str = key("runs/default", "output directory: config.yaml, metrics.jsonl, checkpoints")
    log_every: int = key(1, "steps between metrics records")
    val_loss_every: int = key(50, "steps between validation passes; 0 = never")
    wandb: bool = key(False, "log to Weights & Biases (WANDB_MODE=offline works without network)")
    wandb_project: str = key("dion-gpt", "wandb project")
    wandb_job_name: str | None = key(None, "wandb run name; null = wandb's choice")

    def __post_init__(self):
        _require(self.log_every > 0, f"logging.log_every: must be a positive integer, got {self.log_every}")
        _require(self.val_loss_every >= 0, f"logging.val_loss_every: must be >= 0 (0 = off), got "
                                           f"{self.val_loss_every}")


@dataclass(frozen=True)
class ScalarConfig:
    name: str | None = key(None, "what updates embeddings, norm gains and LM head: lion, adamw, or same (the "
                                 "optimizer itself); null = the optimizer's default")
    lr: float | None = key(None, "their learning rate; null = the optimizer's lr (Lion's LM head gets "
                                 "lr / sqrt(model_dim))")

    def __post_init__(self):
        from optimizers.common.scalar_updates import SCALAR_ALGORITHMS
        allowed = (*SCALAR_ALGORITHMS, "same")
        _require(self.name is None or self.name in allowed,
                 f"optimizer.scalar.name: {self.name!r} is not one of {', '.join(allowed)}")
        _require(self.lr is None or math.isfinite(self.lr) and self.lr > 0,
                 f"optimizer.scalar.lr: must be a positive number or null, got {self.lr}")


@dataclass(frozen=True)
class OptimizerConfig:
    """`name` picks the registered optimizer; `options` are its constructor keywords with effective values."""
    name: str = key("dion", "registered optimizer (see the list below)")
    scalar: ScalarConfig = key(ScalarConfig(), "the scalar parameters' optimizer")
    options: dict = key({}, "the optimizer's own keywords (lr, betas, weight_decay, ...)", compare=False)

    @property
    def lr(self) -> float:
        return self.options["lr"]


@dataclass(frozen=True)
class TrainConfig:
    model_name: str
    model: Any  # the model package's Config (GPTConfig)
    data: DataConfig = key(DataConfig(), "training and validation data")
    optimizer: OptimizerConfig = key(OptimizerConfig(), "the optimizer")
    schedule: ScheduleConfig = key(ScheduleConfig(), "learning-rate schedule and run length")
    parallel: ParallelConfig = key(ParallelConfig(), "device mesh")
    checkpoint: CheckpointConfig = key(CheckpointConfig(), "checkpoints")
    logging: LoggingConfig = key(LoggingConfig(), "outputs")
    precision: PrecisionConfig = key(PrecisionConfig(), "dtypes of compute, FSDP2 communication, optimizer states")
    seed: int = key(0, "seed of the model initialization and the optimizers' random draws")
    compile: bool = key(False, "torch.compile each block")
    grad_clip: float = key(0.0, "clip the global gradient norm to this; 0 = off (when the optimizer "
                                 "syncs the replicas itself, the norm of their mean costs a gradient all-reduce)")
    fused_backward: bool = key(False, "step each parameter during backward (the advanced family); needs one "
                                      "micro-batch per step")
    debug: bool = key(False, "autograd anomaly detection")

    def __post_init__(self):
        _require(self.grad_clip >= 0, f"grad_clip: must be >= 0 (0 = off), got {self.grad_clip}")
        _require(not (self.fused_backward and self.grad_clip > 0),
                 "fused_backward: cannot be combined with grad_clip (each parameter steps before all gradients "
                 "exist)")

    @property
    def checkpoint_dir(self) -> Path:
        return Path(self.checkpoint.dir) if self.checkpoint.dir else Path(self.logging.run_dir) / "checkpoints"

    @property
    def tokens_per_step(self) -> int:
        return self.data.batch_size * self.model.sequence_length

    def to_dict(self) -> dict[str, Any]:
        """The resolved config in the YAML layout (loads back to the same config)."""
        out: dict[str, Any] = {"model": {"name": self.model_name, **_plain(dataclasses.asdict(self.model))}}
        out["data"] = _plain(dataclasses.asdict(self.data))
        out["optimizer"] = {"name": self.optimizer.name,
                            "scalar": _plain(dataclasses.asdict(self.optimizer.scalar)),
                            **_plain(self.optimizer.options)}
        for section in SECTIONS:
            if section != "data":
                out[section] = _plain(dataclasses.asdict(getattr(self, section)))
        for name in TOP_LEVEL:
            out[name] = getattr(self, name)
        return out


# Derived from TrainConfig's fields: the sections built by build_section (every dataclass-valued field but the model,
# whose class comes from its package, and the optimizer, whose options come from its class) and the plain keys.
SECTIONS = {f.name: type(f.default) for f in dataclasses.fields(TrainConfig)
            if dataclasses.is_dataclass(f.default) and f.name != "optimizer"}
TOP_LEVEL = tuple(f.name for f in dataclasses.fields(TrainConfig)
                  if f.name not in ("model_name", "model", "optimizer", *SECTIONS))

# Short command-line spellings that stay valid (the CLI people already type) -> their dotted home.
ALIASES = {
    "optimizer": "optimizer.name", "lr": "optimizer.lr", "rank_fraction": "optimizer.rank_fraction",
    "scalar_opt": "optimizer.scalar.name", "num_iterations": "schedule.num_iterations",
    "batch_size": "data.batch_size", "device_batch_size": "data.device_batch_size", "data_dir": "data.dir",
    "model_dim": "model.model_dim", "n_layer": "model.n_layer", "n_head": "model.n_head",
    "sequence_length": "model.sequence_length", "run_dir": "logging.run_dir",
    "val_loss_every": "logging.val_loss_every", "checkpoint_dir": "checkpoint.dir",
    "checkpoint_freq": "checkpoint.freq", "keep_checkpoints": "checkpoint.keep", "dp_size": "parallel.dp_size",
    "fs_size": "parallel.fs_size", "tp_size": "parallel.tp_size", "optimizer_args": "optimizer",
}
# Keys of the old flat format that are no longer accepted as they were, with their new spelling.
RENAMED = {
    "vocab_size": "model.vocab_size", "schedule": "schedule.name", "warmup_ratio": "schedule.warmup_ratio",
    "warmdown_ratio": "schedule.warmdown_ratio", "scalar_lr": "optimizer.scalar.lr", "mu": "optimizer.mu",
    "betas": "optimizer.betas", "weight_decay": "optimizer.weight_decay", "epsilon": "optimizer.epsilon",
    "rank_multiple_of": "optimizer.rank_multiple_of", "power_iters": "optimizer.power_iters",
    "qr_method": "optimizer.qr_method", "cqr_warmup_steps": "optimizer.cqr_warmup_steps",
    "rcqr_oversample": "optimizer.rcqr_oversample", "val_tokens": "data.val_tokens",
    "log_every": "logging.log_every", "no_wandb": "logging.wandb (inverted)",
    "wandb_project_name": "logging.wandb_project", "wandb_job_name": "logging.wandb_job_name",
    "replicate_mesh_grad_sync": "parallel.replicate_mesh_grad_sync",
    "mixed_precision": "precision.param_dtype / precision.optimizer_states (bfloat16)",
}


def _plain(value: Any) -> Any:
    """YAML-safe: tuples as lists, enums as their values, dtypes as names."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Enum):
        return value.value
    if value is not None and not isinstance(value, (bool, int, float, str)):
        return str(value)
    return value


# ---------------------------------------------------------------------------------------------------------------
# Type checking of values against annotations

def _type_name(tp) -> str:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    if typing.get_origin(tp) is tuple:
        return f"a list of {len(typing.get_args(tp))} numbers"
    if isinstance(tp, type) and issubclass(tp, Enum):
        return "one of " + ", ".join(str(m.value) for m in tp)
    return {int: "an integer", float: "a number", bool: "true/false", str: "a string",
            dict: "a mapping"}.get(tp, getattr(tp, "__name__", str(tp)))


def coerce(where: str, value: Any, tp) -> Any:
    """Check `value` against the annotation `tp` (ints are accepted for floats, "1e-3" strings as numbers, enum
    values as enum members); raise ConfigError naming `where` if it fails. Annotations this layer cannot check
    (Any, classes) pass the value through to the constructor that owns it."""
    origin = typing.get_origin(tp)
    if tp is Any or tp is typing.Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return coerce(where, value, arg)
            except ConfigError:
                pass
    elif origin is tuple:
        args = typing.get_args(tp)
        if isinstance(value, str):
            value = [yaml.safe_load(v) for v in value.strip("[]()").split(",")]
        if len(args) == 2 and args[1] is Ellipsis:  # tuple[X, ...]: any length
            if isinstance(value, (list, tuple)):
                return tuple(coerce(where, v, args[0]) for v in value)
        elif isinstance(value, (list, tuple)) and len(value) == len(args):
            return tuple(coerce(where, v, a) for v, a in zip(value, args))
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "3e-4" (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    elif tp is dict:
        if isinstance(value, dict):
            return value
    elif isinstance(tp, type) and issubclass(tp, Enum):
        if isinstance(value, tp):
            return value
        try:
            return tp(value)
        except ValueError:
            pass
    elif isinstance(tp, type) and not isinstance(value, tp):
        pass  # a class this layer does not parse (e.g. torch.dtype): fall through to the error
    else:
        return value
    raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r}")


def _unknown(where: str, name: str, allowed: typing.Iterable[str], extra: str = "",
             also: typing.Iterable[str] = ()) -> ConfigError:
    """Unknown `name`; the hint also considers `also` (e.g. the short aliases)."""
    allowed = list(allowed)
    close = difflib.get_close_matches(name, [*allowed, *also], n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return ConfigError(f"{where}: unknown key {name!r}{hint}{extra}; allowed: {', '.join(allowed)}")


def build_section(cls: type, values: dict[str, Any], where: str) -> Any:
    """A frozen section dataclass from a mapping: unknown keys and wrong types are ConfigErrors; the section's
    __post_init__ checks the values."""
    if not isinstance(values, dict):
        raise ConfigError(f"{where}: expected a mapping of key: value, got {values!r}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in values.items():
        if name not in fields:
            raise _unknown(where, name, fields)
        kwargs[name] = coerce(f"{where}.{name}", value, hints[name])
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except ValueError as error:  # a component's own validation (e.g. GPTConfig)
        raise ConfigError(f"{where}: {error}") from None


# ---------------------------------------------------------------------------------------------------------------
# Reading YAML files and the command line into one nested mapping

def _set(tree: dict, dotted: str, value: Any) -> None:
    node = tree
    *parents, leaf = dotted.split(".")
    for part in parents:
        child = node.get(part)
        if not isinstance(child, dict):
            child = node[part] = {} if child is None else {"name": child}
        node = child
    if isinstance(value, dict) and isinstance(node.get(leaf), dict):
        node[leaf] = _merge(node[leaf], value)
    else:
        node[leaf] = value


def _merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for k, v in update.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _is_old_key(name: str, value: Any, rest: str = "") -> bool:
    """A key of the old flat format (`schedule: wsd` is old, `schedule: {name: wsd}` is the section)."""
    return name in RENAMED and not (name in SECTIONS and (rest or isinstance(value, dict)))


def _renamed_error(name: str, where: str) -> ConfigError:
    return ConfigError(f"{where}: key {name!r} moved to {RENAMED[name]}; write it there "
                       f"(e.g. --{RENAMED[name].split(' ')[0]} on the command line)")


def parse_cli_overrides(argv: list[str]) -> tuple[Path | None, dict[str, Any]]:
    """`--config PATH` and `--key value` pairs (also `--key=value`) as a nested mapping. Values are YAML."""
    config_path, tree = None, {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--") or len(arg) == 2:
            raise ConfigError(f"command line: expected --key value, got {arg!r}")
        name, eq, text = arg[2:].partition("=")
        if not eq:
            if i + 1 >= len(argv):
                raise ConfigError(f"--{name}: missing value")
            text = argv[i + 1]
            i += 1
        i += 1
        if name == "config":
            config_path = Path(text)
            continue
        value = yaml.safe_load(text) if text != "" else ""
        head, _, rest = name.partition(".")
        if _is_old_key(head, value, rest):
            raise _renamed_error(head, f"--{name}")
        if head in ALIASES and not (head == "optimizer" and rest):
            if head == "optimizer" and isinstance(value, dict):
                dotted = "optimizer"
            else:
                dotted = ALIASES[head] + (f".{rest}" if rest else "")
        else:
            dotted = name
        if head == "optimizer_args" and not rest and not isinstance(value, dict):
            raise ConfigError(f"--{name}: expected a mapping of optimizer options, got {value!r}")
        _set(tree, dotted, value)
    return config_path, tree


def load_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"--config: file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        line = getattr(getattr(error, "problem_mark", None), "line", None)
        where = f" (line {line + 1})" if line is not None else ""
        raise ConfigError(f"{path}: not valid YAML{where}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    for name, value in data.items():
        if _is_old_key(name, value):
            raise _renamed_error(name, str(path))
        if name in ALIASES and name not in ("optimizer",):
            raise ConfigError(f"{path}: key {name!r} moved to {ALIASES[name]}; the config files use sections "
                              f"(see configs/default.yaml)")
    return data


# ---------------------------------------------------------------------------------------------------------------
# Building the TrainConfig

def _build_model(values: Any) -> tuple[str, Any]:
    from models import model_package
    values = dict(values) if isinstance(values, dict) else {"preset": values}
    name = values.pop("name", "gpt")
    try:
        package = model_package(name)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    preset = values.pop("preset", None)
    if preset is not None:
        if preset not in package.PRESETS:
            raise ConfigError(f"model.preset: unknown preset {preset!r}; {name} presets: "
                              f"{', '.join(package.PRESETS)}")
        values = {**dataclasses.asdict(package.PRESETS[preset]), **values}
    return name, build_section(package.Config, values, "model")


def _build_optimizer(values: Any) -> OptimizerConfig:
    from optimizers.registry import OPTIMIZERS, option_fields, resolve_options
    values = dict(values) if isinstance(values, dict) else {"name": values}
    name = values.pop("name", OptimizerConfig.name)
    if name not in OPTIMIZERS:
        raise _unknown("optimizer.name", str(name), sorted(OPTIMIZERS)) if isinstance(name, str) else \
            ConfigError(f"optimizer.name: expected a registered name, got {name!r}")
    scalar = build_section(ScalarConfig, values.pop("scalar", None) or {}, "optimizer.scalar")
    fields = option_fields(name)
    options = {}
    for option, value in values.items():
        if option not in fields:
            raise _unknown("optimizer", option, fields, extra=f" for optimizer {name!r}")
        options[option] = coerce(f"optimizer.{option}", value, fields[option].annotation)
    return OptimizerConfig(name=name, scalar=scalar, options=resolve_options(name, options))


def config_from_tree(tree: dict[str, Any]) -> TrainConfig:
    allowed = ["model", "optimizer", *SECTIONS, *TOP_LEVEL]
    for name in tree:
        if name not in allowed:
            raise _unknown("config", name, allowed, also=ALIASES, extra=" (sections, top-level keys, or the short "
                                                                        "aliases of `train.py --help`)")
    model_name, model = _build_model(tree.get("model") or {})
    sections = {name: build_section(cls, tree.get(name) or {}, name) for name, cls in SECTIONS.items()}
    hints = typing.get_type_hints(TrainConfig)
    top = {name: coerce(name, tree[name], hints[name]) for name in TOP_LEVEL if name in tree}
    return TrainConfig(model_name=model_name, model=model, optimizer=_build_optimizer(tree.get("optimizer") or {}),
                       **sections, **top)


def build_config(argv: list[str]) -> TrainConfig:
    """The config from `--config` (default configs/default.yaml) with command-line overrides, validated."""
    config_path, overrides = parse_cli_overrides(argv)
    tree = load_yaml(config_path or DEFAULT_CONFIG)
    file_optimizer = _optimizer_name(tree.get("optimizer"))
    cli_optimizer = _optimizer_name(overrides.get("optimizer"))
    if cli_optimizer is not None and cli_optimizer != file_optimizer:
        tree = {**tree, "optimizer": {"name": cli_optimizer}}  # the new optimizer starts from its own defaults
    cli_model, file_model = overrides.get("model") or {}, tree.get("model") or {}
    if "name" in cli_model and cli_model["name"] != file_model.get("name", "gpt"):
        tree = {**tree, "model": {}}  # another model: the file's fields belong to the old one
    elif "preset" in cli_model:  # a preset named on the command line is the model
        tree = {**tree, "model": {"name": file_model["name"]} if "name" in file_model else {}}
    return config_from_tree(_merge(tree, overrides))


def _optimizer_name(section: Any) -> str | None:
    if isinstance(section, dict):
        return section.get("name")
    return section


def help_text(argv: list[str]) -> str:
    """--help: the effective config tree for the chosen --config (YAML spelling, one-line meanings), the
    registered optimizers and the chosen optimizer's options."""
    from optimizers.registry import OPTIMIZERS
    argv = [a for a in argv if a not in ("-h", "--help")]
    config = build_config(argv)
    tree = config.to_dict()
    lines = [f"Effective config for {' '.join(argv) or 'configs/default.yaml'} (YAML spelling; override any key "
             f"as --section.key value):", ""]
    meanings = _meanings(config)
    for section, value in tree.items():
        if isinstance(value, dict):
            lines.append(f"{section}:")
            for name, item in value.items():
                if isinstance(item, dict):
                    lines.append(f"  {name}:")
                    for sub, sub_item in item.items():
                        lines.append(_help_line(f"    {sub}: {_yaml_value(sub_item)}",
                                                meanings.get(f"{section}.{name}.{sub}", "")))
                else:
                    lines.append(_help_line(f"  {name}: {_yaml_value(item)}", meanings.get(f"{section}.{name}", "")))
        else:
            lines.append(_help_line(f"{section}: {_yaml_value(value)}", meanings.get(section, "")))
    lines += ["", "Short aliases: " + ", ".join(f"--{a} = --{d}" for a, d in ALIASES.items() if a != "optimizer_args"),
              "", "Optimizers (--optimizer NAME starts from that optimizer's own defaults):"]
    lines += [f"  {name:<22}{spec.description}" for name, spec in sorted(OPTIMIZERS.items())]
    return "\n".join(lines)


def _yaml_value(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True, width=10 ** 6).strip().removesuffix("...").strip()


def _help_line(text: str, meaning: str) -> str:
    return f"{text:<44}# {meaning}" if meaning else text


def _meanings(config: TrainConfig) -> dict[str, str]:
    out = {f"model.{f.name}": f.metadata.get("help", "") for f in dataclasses.fields(config.model)}
    out["model.name"] = "registered model (models.MODELS)"
    for name, cls in SECTIONS.items():
        out.update({f"{name}.{f.name}": f.metadata.get("help", "") for f in dataclasses.fields(cls)})
    out.update({f"optimizer.scalar.{f.name}": f.metadata.get("help", "") for f in dataclasses.fields(ScalarConfig)})
    out["optimizer.name"] = "registered optimizer (see the list below)"
    for option in config.optimizer.options:
        out[f"optimizer.{option}"] = f"keyword of {config.optimizer.name}'s optimizer class"
    out.update({f.name: f.metadata.get("help", "") for f in dataclasses.fields(TrainConfig) if f.name in TOP_LEVEL})
    return out
