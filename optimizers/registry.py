"""Optimizer registry: name -> `OptimizerSpec`, used by the trainer (`--optimizer NAME`) and by scripts.

A spec names the optimizer class; the class's keyword arguments ARE the optimizer's options. `option_fields(name)`
turns the constructor signature into the typed option list the config layer validates (`optimizer.<key>` in YAML,
`--optimizer.<key>` on the command line); the constructor checks the values, once. Keywords only the trainer knows
(meshes, token counts, mixed-precision policies) come from the spec's `runtime` function and are not options.
`defaults` are the training defaults of that optimizer (learning rate, weight decay, ...), which replace the
constructor's defaults unless the config sets the key.

Where the non-matrix parameters (embeddings, norm gains, LM head) go is decided here, once, from `scalar`:
- BUILTIN: the optimizer runs Lion/AdamW itself for param groups carrying `algorithm` (Dion, Muon);
- otherwise `optimizer.scalar.name` picks: "same" (the optimizer takes them as extra groups, no weight decay),
  or "lion" / "adamw" (a stand-alone optimizer beside it, combined with CompositeOptimizer).

Classes are imported on first use, so an optional dependency of one optimizer never breaks the others.
Adding an optimizer: one module with the class, plus one line in OPTIMIZERS.
"""
from __future__ import annotations

import functools
import importlib
import inspect
import math
import typing
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import torch
from torch import Tensor

from optimizers.common.scalar_updates import SCALAR_ALGORITHMS


class ScalarPolicy(str, Enum):
    BUILTIN = "builtin"      # param groups with `algorithm` = "lion" / "adamw" inside the optimizer itself
    SAME = "same"            # by default the optimizer takes every parameter
    SEPARATE = "separate"    # by default a stand-alone Lion/AdamW takes the non-matrix parameters


# Keywords supplied by the trainer (from the device mesh, the batch, the precision policy), never user options.
TRAINER_KEYWORDS = frozenset({"params", "replicate_mesh", "outer_shard_mesh", "inner_shard_mesh",
                              "replicate_mesh_grad_sync", "distributed_mesh", "mixed_precision_config",
                              "tokens_per_step", "process_group"})


@dataclass(frozen=True)
class OptimizerSpec:
    """optimizer: "module:Class". scalar: see ScalarPolicy. defaults: training defaults for constructor keywords
    and for `scalar` (name, lr). runtime: "module:function" taking the OptimizerContext and returning the trainer-only
    keywords. syncs_replicate_grads: the optimizer all-reduces data-parallel gradients itself (the trainer then
    leaves the replicate axis out of DDP/FSDP). supports_tensor_parallel: accepts TP-sharded parameters.
    supports_sharding: accepts FSDP2-sharded (DTensor) parameters. low_precision_states: its runtime keywords honour
    ctx.state_dtype (bfloat16 states). description: one line for --help and the README."""
    optimizer: str
    description: str
    scalar: ScalarPolicy = ScalarPolicy.SAME
    defaults: dict[str, Any] = field(default_factory=dict)
    runtime: str | None = None
    syncs_replicate_grads: bool = False
    supports_tensor_parallel: bool = False
    supports_sharding: bool = True
    low_precision_states: bool = False

    def load(self) -> type[torch.optim.Optimizer]:
        return _import(self.optimizer)


def _import(path: str) -> Any:
    module_name, attribute = path.split(":")
    return getattr(importlib.import_module(module_name), attribute)


_ADAMW_LIKE = dict(lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1)
_DION = dict(lr=0.02, mu=0.95, betas=(0.9, 0.95), weight_decay=0.01, scalar=dict(name="lion"))
_DION_RUNTIME = "optimizers.dion.core:runtime_kwargs"
_ADV = "optimizers.advanced"
_ORTHONORMAL = dict(scalar=ScalarPolicy.BUILTIN, defaults=dict(lr=0.02, scalar=dict(name="lion")),
                    runtime="optimizers.muon:runtime_kwargs", supports_tensor_parallel=True)

OPTIMIZERS: dict[str, OptimizerSpec] = {
    "adamw": OptimizerSpec("optimizers.adamw:AdamW", "AdamW (decoupled weight decay)", defaults=_ADAMW_LIKE,
                           supports_tensor_parallel=True),
    "lion": OptimizerSpec("optimizers.lion:Lion", "Lion (sign of interpolated momentum)",
                          defaults=dict(lr=3e-4, betas=(0.9, 0.99), weight_decay=0.5),
                          supports_tensor_parallel=True),
    "shampoo": OptimizerSpec("optimizers.shampoo:DistributedShampoo",
                             "Distributed Shampoo (Adam-grafted Kronecker preconditioner)",
                             scalar=ScalarPolicy.SEPARATE,
                             defaults=dict(lr=1e-3, betas=(0.9, 0.999), epsilon=1e-8, grafting_epsilon=1e-8,
                                           precondition_frequency=20, start_preconditioning_step=20,
                                           scalar=dict(name="adamw"))),
    "muon": OptimizerSpec("optimizers.muon:Muon", "Muon (Newton-Schulz orthogonalized momentum)", **_ORTHONORMAL),
    "normuon": OptimizerSpec("optimizers.muon:NorMuon", "NorMuon (Muon with per-row normalized updates)",
                             **_ORTHONORMAL),
    "dion2": OptimizerSpec("optimizers.muon:Dion2", "Dion2 (orthogonalize the rows/columns of largest momentum)",
                           **_ORTHONORMAL),
    "nordion2": OptimizerSpec("optimizers.muon:NorDion2", "NorDion2 (Dion2 selection + NorMuon normalization)",
                              **_ORTHONORMAL),
    "dion3": OptimizerSpec("optimizers.muon:Dion3", "Dion3: the name microsoft/dion exports for NorDion2",
                           **_ORTHONORMAL),
    "dion_reference": OptimizerSpec("optimizers.dion.reference:DionReference",
                                    "Dion, per-matrix reference implementation", scalar=ScalarPolicy.BUILTIN,
                                    defaults=_DION, runtime=_DION_RUNTIME, syncs_replicate_grads=True,
                                    supports_tensor_parallel=True, low_precision_states=True),
    "dion": OptimizerSpec("optimizers.dion.batched:Dion", "Dion (low-rank orthonormalized updates), batched",
                          scalar=ScalarPolicy.BUILTIN, defaults=_DION, runtime=_DION_RUNTIME,
                          syncs_replicate_grads=True, supports_tensor_parallel=True, low_precision_states=True),
    "dion_async": OptimizerSpec("optimizers.dion.overlapped:DionAsync", "Dion with collectives overlapped with compute",
                                scalar=ScalarPolicy.BUILTIN, defaults=_DION, runtime=_DION_RUNTIME,
                                syncs_replicate_grads=True, supports_tensor_parallel=True,
                                low_precision_states=True),
    "sophia": OptimizerSpec("optimizers.sophia:Sophia", "Sophia-G (clipped Gauss-Newton-Bartlett preconditioning)",
                            defaults=dict(lr=6e-4, betas=(0.965, 0.99), weight_decay=0.2),
                            runtime="optimizers.sophia:runtime_kwargs"),
    "schedule_free_adamw": OptimizerSpec("optimizers.schedule_free:ScheduleFreeAdamW", "Schedule-Free AdamW",
                                         defaults=dict(_ADAMW_LIKE, warmup_steps=0)),
    "prodigy": OptimizerSpec("optimizers.prodigy:Prodigy", "Prodigy (learning-rate-free Adam; lr is a multiplier)",
                             defaults=dict(lr=1.0, betas=(0.9, 0.99), weight_decay=0.1, d0=1e-3,
                                           use_bias_correction=True, safeguard_warmup=True)),
    "soap": OptimizerSpec("optimizers.soap:SOAP", "SOAP (Adam in Shampoo's eigenbasis)", scalar=ScalarPolicy.SEPARATE,
                          defaults=dict(lr=3e-3, betas=(0.95, 0.95), weight_decay=0.01, precondition_frequency=10,
                                        scalar=dict(name="adamw")), supports_sharding=False),
    "adam_adv": OptimizerSpec(f"{_ADV}:Adam_Adv", "Adam with the advanced family's features",
                              defaults=_ADAMW_LIKE, supports_tensor_parallel=True),
    "adopt_adv": OptimizerSpec(f"{_ADV}:Adopt_Adv", "ADOPT with the advanced family's features",
                               defaults=dict(lr=3e-3, weight_decay=0.1), supports_tensor_parallel=True),
    "prodigy_adv": OptimizerSpec(f"{_ADV}:Prodigy_Adv", "Prodigy with the advanced family's features",
                                 defaults=dict(lr=1.0, weight_decay=0.1, d0=1e-3), supports_tensor_parallel=True),
    "simplified_ademamix": OptimizerSpec(f"{_ADV}:Simplified_AdEMAMix", "Simplified AdEMAMix",
                                         defaults=dict(lr=1e-3, weight_decay=0.1), supports_tensor_parallel=True),
    "lion_adv": OptimizerSpec(f"{_ADV}:Lion_Adv", "Lion with the advanced family's features",
                              defaults=dict(lr=1e-3, weight_decay=0.1), supports_tensor_parallel=True),
    "prodigy_lion_adv": OptimizerSpec(f"{_ADV}:Prodigy_Lion_Adv", "Prodigy-Lion with the advanced family's features",
                                      defaults=dict(lr=1.0, weight_decay=0.1, d0=1e-3),
                                      supports_tensor_parallel=True),
}


def registered_names() -> list[str]:
    return sorted(OPTIMIZERS)


def get_spec(name: str) -> OptimizerSpec:
    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer: unknown name {name!r}; registered: {', '.join(registered_names())}")
    return OPTIMIZERS[name]


@dataclass(frozen=True)
class OptionField:
    """One option of an optimizer: a constructor keyword with its type annotation and its effective default."""
    name: str
    annotation: Any
    default: Any


@functools.cache
def option_fields(name: str) -> dict[str, OptionField]:
    """The options of optimizer `name`: its constructor's keywords (minus TRAINER_KEYWORDS), typed by their
    annotations, or what a class taking **options lists in `declared_options()`; the registry's training defaults
    replace the constructor's."""
    spec = get_spec(name)
    cls = spec.load()
    if hasattr(cls, "declared_options"):  # a class taking **options declares them (the orthonormal family)
        declared = cls.declared_options()
    else:
        hints = typing.get_type_hints(cls.__init__)
        declared = [(p.name, hints.get(p.name, Any), p.default) for p in inspect.signature(cls).parameters.values()
                    if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)]
    fields = {}
    for option, annotation, default in declared:
        if option not in TRAINER_KEYWORDS:
            fields[option] = OptionField(option, annotation, spec.defaults.get(option, default))
    unknown = set(spec.defaults) - set(fields) - {"scalar"}
    if unknown:
        raise TypeError(f"registry: defaults of {name!r} name keywords {sorted(unknown)} that {cls.__name__} lacks")
    return fields


@dataclass
class OptimizerContext:
    """Everything needed to build a registered optimizer.

    Parameter lists: `matrix_params` are the 2D weights of the hidden layers; `embedding_params`, `lm_head_params`
    and `vector_params` (norm gains, any 1D tensor) are the scalar parameters (see the module docstring).
    `options`: constructor keywords (defaults from `option_fields` where not given). `scalar`: "lion", "adamw" or
    "same" (None: the spec's default). `scalar_lr`: the scalar parameters' LR (None: the optimizer's lr).
    `state_dtype`: the dtype of the optimizer's states where it supports bfloat16 (`low_precision_states`);
    `variance_dtype`: Dion's AdamW variances when state_dtype is bfloat16.
    `tokens_per_step`: the global batch in tokens (Sophia's Hessian scaling).
    Meshes are DeviceMesh objects or None: `replicate_mesh` (data-parallel replicas whose gradients the optimizer
    may sync itself), `outer_shard_mesh` (FSDP, shards rows), `inner_shard_mesh` (TP, shards columns).
    """
    matrix_params: list[Tensor]
    embedding_params: list[Tensor] = field(default_factory=list)
    lm_head_params: list[Tensor] = field(default_factory=list)
    vector_params: list[Tensor] = field(default_factory=list)
    model_dim: int = 1
    options: dict[str, Any] = field(default_factory=dict)
    scalar: str | None = None
    scalar_lr: float | None = None
    state_dtype: torch.dtype = torch.float32
    variance_dtype: torch.dtype = torch.float32
    tokens_per_step: int = 0
    replicate_mesh: Any = None
    outer_shard_mesh: Any = None
    inner_shard_mesh: Any = None
    replicate_mesh_grad_sync: bool = False

    @classmethod
    def from_groups(cls, groups: dict[str, list[Tensor]], **kwargs: Any) -> OptimizerContext:
        """From a model's `param_groups()` mapping (matrix / embedding / lm_head / vector)."""
        return cls(matrix_params=groups["matrix"], embedding_params=groups["embedding"],
                   lm_head_params=groups["lm_head"], vector_params=groups["vector"], **kwargs)

    def scalar_param_groups(self, lr: float, algorithm: str, algorithm_key: bool) -> list[dict]:
        """Groups for the vectors, embeddings and LM head, without weight decay, at `scalar_lr` (default `lr`). The
        LM head's LR is divided by sqrt(model_dim) when Lion runs it (sign updates have unit size per entry, far too
        large for a d-wide dot product). algorithm_key: tag each group with `algorithm` (BUILTIN optimizers)."""
        lr = self.scalar_lr if self.scalar_lr is not None else lr
        head_lr = lr / math.sqrt(self.model_dim) if algorithm == "lion" else lr
        groups = [dict(params=self.vector_params, lr=lr, weight_decay=0.0),
                  dict(params=self.embedding_params, lr=lr, weight_decay=0.0),
                  dict(params=self.lm_head_params, lr=head_lr, weight_decay=0.0)]
        groups = [g for g in groups if g["params"]]
        if algorithm_key:
            for g in groups:
                g["algorithm"] = algorithm
        return groups


def resolve_options(name: str, options: dict[str, Any]) -> dict[str, Any]:
    """Every option of `name` with its effective value: `options` over the training defaults. Unknown keys raise
    ValueError naming the optimizer and its options."""
    fields = option_fields(name)
    unknown = sorted(set(options) - set(fields))
    if unknown:
        raise ValueError(f"optimizer.{unknown[0]}: not an option of optimizer {name!r}; its options: "
                         f"{', '.join(fields)}")
    return {key: options.get(key, f.default) for key, f in fields.items()
            if key in options or f.default is not inspect.Parameter.empty}


def default_scalar(name: str) -> str:
    spec = get_spec(name)
    scalar = spec.defaults.get("scalar", {}).get("name")
    if scalar is not None:
        return scalar
    return "lion" if spec.scalar is ScalarPolicy.BUILTIN else "same"


def build_optimizer(name: str, ctx: OptimizerContext) -> torch.optim.Optimizer:
    """The optimizer `name` over ctx's parameters, with the scalar parameters placed per the spec's policy."""
    spec = get_spec(name)
    cls = spec.load()
    scalar = ctx.scalar or default_scalar(name)
    allowed = SCALAR_ALGORITHMS if spec.scalar is ScalarPolicy.BUILTIN else (*SCALAR_ALGORITHMS, "same")
    if scalar not in allowed:
        raise ValueError(f"optimizer.scalar.name: {scalar!r} is not available for {name!r}; allowed: "
                         f"{', '.join(allowed)}")
    if scalar == name:  # `--optimizer adamw` with adamw for the scalars is one optimizer
        scalar = "same"
    options = resolve_options(name, ctx.options)
    kwargs = {**options, **(_import(spec.runtime)(ctx) if spec.runtime else {})}
    lr = options.get("lr", 1e-3)
    matrix_group = [dict(params=ctx.matrix_params)] if ctx.matrix_params else []
    if spec.scalar is ScalarPolicy.BUILTIN:
        return cls(matrix_group + ctx.scalar_param_groups(lr, scalar, algorithm_key=True), **kwargs)
    if scalar == "same":
        return cls(matrix_group + ctx.scalar_param_groups(lr, name, algorithm_key=False), **kwargs)
    from optimizers.common.composite import CompositeOptimizer
    matrix_optimizer = cls(matrix_group, **kwargs)
    scalar_groups = ctx.scalar_param_groups(lr, scalar, algorithm_key=False)
    if not scalar_groups:
        return matrix_optimizer
    betas = options.get("betas", (0.9, 0.95))
    if scalar == "adamw":
        from optimizers.adamw import AdamW
        epsilon = options.get("epsilon", options.get("eps", 1e-8))
        scalar_optimizer = AdamW(scalar_groups, lr=lr, betas=betas, eps=epsilon)
    else:
        from optimizers.lion import Lion
        scalar_optimizer = Lion(scalar_groups, lr=lr, betas=betas)
    return CompositeOptimizer([matrix_optimizer, scalar_optimizer])
