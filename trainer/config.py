"""Training configuration: YAML file + `--key value` command-line overrides, validated before any work starts.

Every key of `TrainConfig` can appear in the YAML file and on the command line. Values from the command line are
parsed as YAML scalars (so `--lr 3e-4`, `--compile true`, `--betas 0.9,0.95`, `--data_dir null` work) and then
checked against the field's type. A mapping key (`optimizer_args`) also takes dotted overrides:
`--optimizer_args.nesterov false`. Any problem raises ConfigError with one line naming the key and what is allowed;
train.py prints it and exits with status 2.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from trainer.errors import ConfigError

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "default.yaml"
SCHEDULES = ("wsd", "cosine", "constant")
QR_METHODS = ("qr", "cqr", "rcqr")
SCALAR_OPTIMIZERS = ("adamw", "lion")


@dataclass
class TrainConfig:
    # model
    model_dim: int = 128
    n_layer: int = 2
    n_head: int = 4
    sequence_length: int = 128
    vocab_size: int = 50304
    # batching: batch_size is global sequences per step; accumulation = batch_size / (device_batch_size x dp ranks)
    batch_size: int = 16
    device_batch_size: int = 16
    num_iterations: int = 100
    # learning-rate schedule: wsd = linear warmup, constant, linear warmdown to zero (the Dion trainer's schedule)
    schedule: str = "wsd"
    warmup_ratio: float = 0.0
    warmdown_ratio: float = 0.2
    # optimizer: `optimizer` is the matrix algorithm, `scalar_opt` the one for embeddings, vectors and LM head
    optimizer: str = "dion"
    scalar_opt: str | None = None
    lr: float = 0.01
    scalar_lr: float | None = None
    mu: float = 0.95
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.01
    epsilon: float = 1e-8
    rank_fraction: float = 1.0
    rank_multiple_of: int = 1
    power_iters: int = 1
    qr_method: str = "rcqr"
    cqr_warmup_steps: int = 150
    rcqr_oversample: float = 1.25
    optimizer_args: dict = field(default_factory=dict)
    fused_backward: bool = False
    grad_clip: float = 0.0
    # evaluation, checkpoints, logging
    val_loss_every: int = 25
    val_tokens: int = 65536
    log_every: int = 1
    checkpoint_dir: str | None = None
    checkpoint_freq: int = 0
    keep_checkpoints: int = 2
    sigterm_grace_seconds: float = 30.0  # on SIGTERM, save if the last save took less than what is left of this
    run_dir: str = "runs/default"
    data_dir: str | None = None
    seed: int = 0
    compile: bool = False
    mixed_precision: bool = False
    wandb_project_name: str = "dion-gpt"
    wandb_job_name: str | None = None
    no_wandb: bool = True
    debug: bool = False
    # parallelism (product = world size; unset = 1, all unset = DDP over every rank)
    dp_size: int | None = None
    fs_size: int | None = None
    tp_size: int | None = None
    replicate_mesh_grad_sync: bool = True

    @property
    def resolved_checkpoint_dir(self) -> Path:
        return Path(self.checkpoint_dir) if self.checkpoint_dir else Path(self.run_dir) / "checkpoints"

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["betas"] = list(self.betas)
        return out


_FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
_TYPES = typing.get_type_hints(TrainConfig)


def _type_name(tp) -> str:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    if typing.get_origin(tp) is tuple:
        return "a list of two numbers"
    return {int: "an integer", float: "a number", bool: "true/false", str: "a string",
            dict: "a mapping"}.get(tp, str(tp))


def _coerce(key: str, value: Any, tp) -> Any:
    """Check `value` against the annotation `tp` (ints are accepted for floats); raise ConfigError if it fails."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(key, value, arg)
            except ConfigError:
                pass
    elif origin is tuple:
        if isinstance(value, str):
            value = [yaml.safe_load(v) for v in value.strip("[]()").split(",")]
        if isinstance(value, (list, tuple)) and len(value) == 2:
            return tuple(_coerce(key, v, float) for v in value)
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "3e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
    elif tp is dict:
        if isinstance(value, dict):
            return _numeric_strings_to_float(value)
    raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")


def _numeric_strings_to_float(value: Any) -> Any:
    """YAML 1.1 reads exponent numbers without a dot ("1e-3") as strings; in free-form mappings
    (optimizer_args) there is no field type to fix that later, so convert them here."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    if isinstance(value, dict):
        return {k: _numeric_strings_to_float(v) for k, v in value.items()}
    return value


def _unknown_key(key: str, where: str) -> ConfigError:
    close = difflib.get_close_matches(key, _FIELDS, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return ConfigError(f"{where}: unknown key {key!r}{hint}; run `python train.py --help` for the list of keys")


def parse_cli_overrides(argv: list[str]) -> tuple[Path | None, dict[str, Any]]:
    """`--config PATH` and `--key value` pairs (also `--key=value`). Values are parsed as YAML scalars."""
    config_path, overrides = None, {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--") or len(arg) == 2:
            raise ConfigError(f"command line: expected --key value, got {arg!r}")
        key, eq, value = arg[2:].partition("=")
        if not eq:
            if i + 1 >= len(argv):
                raise ConfigError(f"--{key}: missing value")
            value = argv[i + 1]
            i += 1
        i += 1
        if key == "config":
            config_path = Path(value)
            continue
        parsed = yaml.safe_load(value) if value != "" else ""
        base, _, sub = key.partition(".")
        if base not in _FIELDS:
            raise _unknown_key(base, "command line")
        if sub:
            if _TYPES[base] is not dict:
                raise ConfigError(f"--{key}: only mapping keys (optimizer_args) take dotted sub-keys")
            overrides.setdefault(base, {})[sub] = _numeric_strings_to_float(parsed)
        else:
            overrides[key] = parsed
    return config_path, overrides


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
        raise ConfigError(f"{path}: expected a mapping of key: value at the top level")
    for key in data:
        if key not in _FIELDS:
            raise _unknown_key(key, str(path))
    return data


def build_config(argv: list[str]) -> TrainConfig:
    """The config from `--config` (default configs/default.yaml) with command-line overrides, validated."""
    config_path, overrides = parse_cli_overrides(argv)
    values = load_yaml(config_path or DEFAULT_CONFIG)
    for key, value in overrides.items():
        if _TYPES[key] is dict and isinstance(value, dict) and isinstance(values.get(key), dict):
            values[key] = {**values[key], **value}
        else:
            values[key] = value
    kwargs = {key: _coerce(key, value, _TYPES[key]) for key, value in values.items()}
    config = TrainConfig(**kwargs)
    validate(config)
    return config


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def validate(c: TrainConfig) -> None:
    """Value checks that need no process group (mesh sizes vs world size are checked in trainer.distributed)."""
    from models.gpt import GPT2_VOCAB_SIZE, GPTConfig
    from optimizers.registry import OPTIMIZERS

    try:
        GPTConfig(vocab_size=c.vocab_size, n_layer=c.n_layer, n_head=c.n_head, model_dim=c.model_dim,
                  sequence_length=c.sequence_length)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    _require(c.vocab_size >= GPT2_VOCAB_SIZE,
             f"vocab_size: must be >= {GPT2_VOCAB_SIZE} (GPT-2 tokens); 50304 is the padded size, got {c.vocab_size}")
    for key in ("batch_size", "device_batch_size", "num_iterations", "val_tokens", "log_every", "keep_checkpoints",
                "rank_multiple_of", "power_iters"):
        _require(getattr(c, key) > 0, f"{key}: must be a positive integer, got {getattr(c, key)}")
    _require(c.sigterm_grace_seconds >= 0, f"sigterm_grace_seconds: must be >= 0, got {c.sigterm_grace_seconds}")
    for key in ("val_loss_every", "checkpoint_freq", "cqr_warmup_steps"):
        _require(getattr(c, key) >= 0, f"{key}: must be >= 0 (0 = off), got {getattr(c, key)}")
    _require(c.batch_size % c.device_batch_size == 0,
             f"batch_size: {c.batch_size} is not divisible by device_batch_size={c.device_batch_size}")
    _require(c.schedule in SCHEDULES, f"schedule: {c.schedule!r} is not one of {', '.join(SCHEDULES)}")
    for key in ("warmup_ratio", "warmdown_ratio"):
        _require(0.0 <= getattr(c, key) <= 1.0, f"{key}: must lie in [0, 1], got {getattr(c, key)}")
    _require(c.warmup_ratio + c.warmdown_ratio <= 1.0,
             f"warmup_ratio + warmdown_ratio: must be <= 1, got {c.warmup_ratio + c.warmdown_ratio}")
    _require(c.optimizer in OPTIMIZERS,
             f"optimizer: unknown name {c.optimizer!r}; registered: {', '.join(sorted(OPTIMIZERS))}")
    _require(c.scalar_opt is None or c.scalar_opt in SCALAR_OPTIMIZERS,
             f"scalar_opt: {c.scalar_opt!r} is not one of {', '.join(SCALAR_OPTIMIZERS)}")
    _require(math.isfinite(c.lr) and c.lr > 0, f"lr: must be a positive number, got {c.lr}")
    _require(c.scalar_lr is None or c.scalar_lr > 0, f"scalar_lr: must be positive or null, got {c.scalar_lr}")
    _require(0.0 <= c.mu < 1.0, f"mu: must lie in [0, 1), got {c.mu}")
    _require(all(0.0 <= b < 1.0 for b in c.betas), f"betas: each must lie in [0, 1), got {list(c.betas)}")
    _require(c.weight_decay >= 0, f"weight_decay: must be >= 0, got {c.weight_decay}")
    _require(c.epsilon > 0, f"epsilon: must be positive, got {c.epsilon}")
    _require(0.0 < c.rank_fraction <= 1.0, f"rank_fraction: must lie in (0, 1], got {c.rank_fraction}")
    _require(c.qr_method in QR_METHODS, f"qr_method: {c.qr_method!r} is not one of {', '.join(QR_METHODS)}")
    _require(c.rcqr_oversample >= 1.0, f"rcqr_oversample: must be >= 1, got {c.rcqr_oversample}")
    _require(c.grad_clip >= 0, f"grad_clip: must be >= 0 (0 = off), got {c.grad_clip}")
    for key in ("dp_size", "fs_size", "tp_size"):
        value = getattr(c, key)
        _require(value is None or value >= 1, f"{key}: must be a positive integer or null, got {value}")
    if c.tp_size and c.tp_size > 1:
        _require(c.n_head % c.tp_size == 0, f"tp_size: {c.tp_size} does not divide n_head={c.n_head}")
    _require(not (c.fused_backward and c.grad_clip > 0),
             "fused_backward: cannot be combined with grad_clip (each parameter steps before all gradients exist)")
    if c.data_dir is not None:
        _require(Path(c.data_dir).is_dir(), f"data_dir: {c.data_dir} is not a directory (use null for the "
                 f"embedded corpus, or download shards with data/cached_fineweb10B.py)")
