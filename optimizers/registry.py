"""Optimizer registry: a name -> builder dictionary used by train.py (`--optimizer NAME`, `--scalar_opt NAME`).

A builder takes an `OptimizerContext` (the model's parameters split into groups, the optimizer keys of the config,
and the device meshes) and returns a torch.optim.Optimizer. Builders are named as "module:function" strings and
imported on first use, so optional dependencies of one optimizer never slow down or break the others.

Adding an optimizer: one module with a `build(ctx)` function plus one line in OPTIMIZERS.
"""
from __future__ import annotations

import importlib
import inspect
import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import Tensor


@dataclass(frozen=True)
class OptimizerSpec:
    """builder: "module:function". syncs_replicate_grads: the optimizer all-reduces data-parallel gradients itself
    (so train.py leaves the replicate axis out of DDP/FSDP when `replicate_mesh_grad_sync` is true).
    supports_tensor_parallel: it accepts parameters sharded over a TP mesh. elementwise: the update is element-wise, so
    it may run on every parameter group (scalar_opt is then ignored unless given explicitly)."""
    builder: str
    syncs_replicate_grads: bool = False
    supports_tensor_parallel: bool = False
    elementwise: bool = False


OPTIMIZERS: dict[str, OptimizerSpec] = {
    "adamw": OptimizerSpec("optimizers.adamw:build", supports_tensor_parallel=True, elementwise=True),
    "lion": OptimizerSpec("optimizers.lion:build", supports_tensor_parallel=True, elementwise=True),
    "shampoo": OptimizerSpec("optimizers.shampoo:build"),
    "muon": OptimizerSpec("optimizers.muon:build", supports_tensor_parallel=True),
    "normuon": OptimizerSpec("optimizers.muon:build_normuon", supports_tensor_parallel=True),
    "dion2": OptimizerSpec("optimizers.muon:build_dion2", supports_tensor_parallel=True),
    "nordion2": OptimizerSpec("optimizers.muon:build_nordion2", supports_tensor_parallel=True),
    "dion3": OptimizerSpec("optimizers.muon:build_nordion2", supports_tensor_parallel=True),
    "dion_reference": OptimizerSpec("optimizers.dion_reference:build", syncs_replicate_grads=True,
                                    supports_tensor_parallel=True),
    "dion": OptimizerSpec("optimizers.dion:build", syncs_replicate_grads=True, supports_tensor_parallel=True),
    "dion_async": OptimizerSpec("optimizers.dion_async:build", syncs_replicate_grads=True,
                                supports_tensor_parallel=True),
    "sophia": OptimizerSpec("optimizers.sophia:build", elementwise=True),
    "schedule_free_adamw": OptimizerSpec("optimizers.schedule_free:build", elementwise=True),
    "prodigy": OptimizerSpec("optimizers.prodigy:build", elementwise=True),
    "soap": OptimizerSpec("optimizers.soap:build"),
    "adam_adv": OptimizerSpec("optimizers.advanced.build:build_adam_adv", supports_tensor_parallel=True,
                            elementwise=True),
    "adopt_adv": OptimizerSpec("optimizers.advanced.build:build_adopt_adv", supports_tensor_parallel=True,
                            elementwise=True),
    "prodigy_adv": OptimizerSpec("optimizers.advanced.build:build_prodigy_adv", supports_tensor_parallel=True,
                            elementwise=True),
    "simplified_ademamix": OptimizerSpec("optimizers.advanced.build:build_simplified_ademamix", supports_tensor_parallel=True,
                            elementwise=True),
    "lion_adv": OptimizerSpec("optimizers.advanced.build:build_lion_adv", supports_tensor_parallel=True,
                            elementwise=True),
    "prodigy_lion_adv": OptimizerSpec("optimizers.advanced.build:build_prodigy_lion_adv", supports_tensor_parallel=True,
                            elementwise=True),
}

SCALAR_OPTIMIZERS = ("adamw", "lion")


def registered_names() -> list[str]:
    return sorted(OPTIMIZERS)


def get_spec(name: str) -> OptimizerSpec:
    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer: unknown name {name!r}; registered: {', '.join(registered_names())}")
    return OPTIMIZERS[name]


@dataclass
class OptimizerContext:
    """Everything a builder needs.

    Parameter lists: `matrix_params` are the 2D weights of the transformer blocks; `embedding_params`,
    `lm_head_params` and `vector_params` (norm gains, any 1D tensor) go to the scalar algorithm unless the matrix
    optimizer is element-wise and the user did not pick a scalar optimizer.
    `options` holds the `optimizer_args` mapping of the config (keys specific to one optimizer); use
    `constructor_kwargs` to check them against the constructor and get a clear error for an unknown key.
    `tokens_per_step` is the global batch in tokens (Sophia's Hessian scaling needs it).
    Meshes are torch DeviceMesh objects or None: `replicate_mesh` (data-parallel replicas whose gradients the
    optimizer may sync itself), `outer_shard_mesh` (FSDP, shards rows), `inner_shard_mesh` (TP, shards columns).
    """
    matrix_params: list[Tensor]
    embedding_params: list[Tensor]
    lm_head_params: list[Tensor]
    vector_params: list[Tensor]
    model_dim: int
    lr: float = 0.01
    scalar_lr: float | None = None
    mu: float = 0.95
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.01
    epsilon: float = 1e-8
    scalar_opt: str = "lion"
    scalar_opt_explicit: bool = True
    rank_fraction: float = 1.0
    rank_multiple_of: int = 1
    power_iters: int = 1
    qr_method: str = "rcqr"
    cqr_warmup_steps: int = 150
    rcqr_oversample: float = 1.25
    mixed_precision: bool = False
    tokens_per_step: int = 0
    options: dict[str, Any] = field(default_factory=dict)
    replicate_mesh: Any = None
    outer_shard_mesh: Any = None
    inner_shard_mesh: Any = None
    replicate_mesh_grad_sync: bool = False

    @property
    def all_params(self) -> list[Tensor]:
        return self.matrix_params + self.embedding_params + self.lm_head_params + self.vector_params

    def scalar_param_groups(self, algorithm_key: bool = True, algorithm: str | None = None) -> list[dict]:
        """Groups for embeddings, vectors and the LM head, without weight decay. The LM head's LR is scaled by
        1/sqrt(model_dim) when the algorithm running these groups is Lion (sign updates have unit size per entry,
        far too large for a d-wide dot product).

        algorithm_key=True: the groups carry `algorithm` = scalar_opt, the convention of optimizers with built-in
        scalar algorithms (Dion, Muon). `algorithm` names the optimizer that runs the groups when it is not
        scalar_opt (an element-wise optimizer taking every parameter passes its own name)."""
        if algorithm is None and (algorithm_key or self.scalar_opt_explicit):
            algorithm = self.scalar_opt
        lr = self.scalar_lr if self.scalar_lr is not None else self.lr
        head_lr = lr / math.sqrt(self.model_dim) if algorithm == "lion" else lr
        groups = [dict(params=self.vector_params, lr=lr, weight_decay=0.0),
                  dict(params=self.embedding_params, lr=lr, weight_decay=0.0),
                  dict(params=self.lm_head_params, lr=head_lr, weight_decay=0.0)]
        groups = [g for g in groups if g["params"]]
        if algorithm_key:
            for g in groups:
                g["algorithm"] = self.scalar_opt
        return groups

    def scalar_optimizer(self) -> torch.optim.Optimizer | None:
        """A stand-alone AdamW or Lion over the scalar groups (for matrix optimizers without built-in scalar
        algorithms); combine with `optimizers.composite.CompositeOptimizer`."""
        groups = self.scalar_param_groups(algorithm_key=False, algorithm=self.scalar_opt)
        if not groups:
            return None
        if self.scalar_opt == "adamw":
            from optimizers.adamw import AdamW
            return AdamW(groups, lr=self.lr, betas=self.betas, eps=self.epsilon)
        from optimizers.lion import Lion
        return Lion(groups, lr=self.lr, betas=self.betas)

    def with_scalar_optimizer(self, matrix_optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        from optimizers.composite import CompositeOptimizer
        scalar = self.scalar_optimizer()
        return matrix_optimizer if scalar is None else CompositeOptimizer([matrix_optimizer, scalar])

    def constructor_kwargs(self, cls: Callable, **defaults: Any) -> dict[str, Any]:
        """`defaults` updated by `options`, after checking that every option names a parameter of `cls`."""
        accepted = set(inspect.signature(cls).parameters) - {"params", "self"}
        unknown = sorted(set(self.options) - accepted)
        if unknown:
            raise ValueError(f"optimizer_args: unknown key(s) {', '.join(unknown)} for {cls.__name__}; "
                             f"allowed: {', '.join(sorted(accepted))}")
        return {**defaults, **self.options}


def build_optimizer(name: str, ctx: OptimizerContext) -> torch.optim.Optimizer:
    spec = get_spec(name)
    if ctx.scalar_opt not in SCALAR_OPTIMIZERS:
        raise ValueError(f"scalar_opt: unknown name {ctx.scalar_opt!r}; allowed: {', '.join(SCALAR_OPTIMIZERS)}")
    module_name, function_name = spec.builder.split(":")
    builder = getattr(importlib.import_module(module_name), function_name)
    return builder(ctx)
