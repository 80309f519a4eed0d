"""What Muon, NorMuon, Dion2 and NorDion2 share: typed options (constructor keywords and per-group overrides, one
clear error for an unknown key), param groups whose `algorithm` is the matrix algorithm, "lion" or "adamw" (the
shared element-wise updates of `optimizers.common.scalar_updates`), the LR scale of a matrix, decoupled (optionally
cautious) weight decay, and the orthogonalizer with its distributed execution. A subclass states its options
dataclass and implements `_matrix_step`.
"""
from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass
from enum import Enum
from typing import Any, ClassVar

import torch
import torch.distributed as dist
from torch import Tensor
from torch.optim import Optimizer

from optimizers.common.closure import closure_loss
from optimizers.muon.distributed import MatrixLayout, WholeMatrices
from optimizers.muon.orthogonalize import NS_COEFFICIENTS, Orthogonalizer
from optimizers.common.choices import parse_choice
from optimizers.common.scalar_updates import SCALAR_ALGORITHMS, adamw_update, lion_update


class AdjustLR(str, Enum):
    """How the LR of an (m, n) = (fan_out, fan_in) matrix is scaled. SPECTRAL_NORM: sqrt(m / n), so the update has a
    fixed spectral norm relative to the layer's input/output RMS (Dion's default). RMS_NORM: 0.2 sqrt(max(m, n)),
    which gives the update the RMS of a typical AdamW update (Moonshot). NONE (also spelled None): no scaling."""
    SPECTRAL_NORM = "spectral_norm"
    RMS_NORM = "rms_norm"
    NONE = "none"


def lr_scale(adjust_lr: AdjustLR, shape) -> float:
    """LR multiplier s(m, n) of an (m, n) matrix; see AdjustLR."""
    fan_out, fan_in = shape[0], shape[1]
    if adjust_lr is AdjustLR.SPECTRAL_NORM:
        return math.sqrt(fan_out / fan_in)
    if adjust_lr is AdjustLR.RMS_NORM:
        return 0.2 * math.sqrt(max(fan_out, fan_in))
    return 1.0


@dataclass(frozen=True)
class MatrixOptions:
    """Keys every member accepts, in the constructor and as per-group overrides. betas and epsilon serve the
    scalar algorithms; cautious_wd decays only where sign(X) = sign(update) (Chen et al. 2025, "Cautious Weight
    Decay"); flatten treats 3D+ parameters as m x prod(rest)."""
    lr: float = 0.01
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.95)
    epsilon: float = 1e-8
    adjust_lr: str | None = "spectral_norm"
    cautious_wd: bool = False
    flatten: bool = False

    def validate(self, owner: str) -> None:
        if self.lr < 0.0:
            raise ValueError(f"{owner}: lr must be >= 0, got {self.lr}")
        if self.weight_decay < 0.0:
            raise ValueError(f"{owner}: weight_decay must be >= 0, got {self.weight_decay}")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"{owner}: betas must be two numbers in [0, 1), got {self.betas}")
        parse_adjust_lr(owner, self.adjust_lr)
        for key in ("mu", "ef_decay", "muon_beta2"):
            value = getattr(self, key, None)
            if value is not None and not 0.0 <= value < 1.0:
                raise ValueError(f"{owner}: {key} must lie in [0, 1), got {value}")
        fraction = getattr(self, "fraction", None)
        if fraction is not None and not 0.0 < fraction <= 1.0:
            raise ValueError(f"{owner}: fraction must lie in (0, 1], got {fraction}")


def parse_adjust_lr(owner: str, value: str | None) -> AdjustLR:
    return parse_choice(AdjustLR, owner, "adjust_lr", "none" if value is None else value)


@dataclass(frozen=True)
class ConstructorOptions:
    """Constructor-only keys of every member (not per group). orthogonalizer None: the class's default."""
    orthogonalizer: Any = None
    ns_steps: int = 5
    # one (a, b, c) for every iteration, or one per iteration (REFERENCE_NS_COEFFICIENTS)
    ns_coefficients: tuple[float, float, float] | tuple[tuple[float, float, float], ...] = NS_COEFFICIENTS
    ns_dtype: str | None = None


# Constructor-only keys: the options above and the trainer-supplied mesh.
GLOBAL_KEYS = (*(f.name for f in dataclasses.fields(ConstructorOptions)), "distributed_mesh")
# Group keys besides the options: the parameters, the algorithm running them, and the group's step count.
INTERNAL_GROUP_KEYS = ("params", "algorithm", "step")


def _reject_unknown(owner: str, what: str, given, allowed: list[str]) -> None:
    unknown = sorted(set(given) - set(allowed))
    if unknown:
        raise ValueError(f"{owner}: unknown {what} {', '.join(map(repr, unknown))}; allowed: {', '.join(allowed)}")


class OrthonormalOptimizer(Optimizer):
    """Base of the orthonormal-update family. Subclasses set `options_class` (a MatrixOptions dataclass whose
    defaults are the constructor defaults), `algorithm` (the matrix algorithm's name) and `default_orthogonalizer`.

    Constructor: params, then keywords: the fields of `options_class`, orthogonalizer ("newton_schulz",
    "polar_express" or a callable f(X, epsilon)), ns_steps, ns_coefficients (Newton-Schulz), ns_dtype ("bfloat16",
    "float32"; None: bfloat16 on CUDA, float32 elsewhere), distributed_mesh (DeviceMesh or ProcessGroup over which
    plain, DDP-replicated matrices are split; DTensor parameters always use their own mesh).
    Param-group keys: params, algorithm, and any field of `options_class`.
    """
    options_class: ClassVar[type[MatrixOptions]] = MatrixOptions
    algorithm: ClassVar[str] = ""
    default_orthogonalizer: ClassVar[str] = "polar_express"

    def __init__(self, params, **options: Any):
        name = type(self).__name__
        fields = [f.name for f in dataclasses.fields(self.options_class)]
        _reject_unknown(name, "key(s)", options, fields + list(GLOBAL_KEYS))
        settings = self.options_class(**{k: v for k, v in options.items() if k in fields})
        settings.validate(name)
        constructor = ConstructorOptions(**{k: v for k, v in options.items() if k in GLOBAL_KEYS[:-1]})
        self.orthogonalize = Orthogonalizer.create(
            name, constructor.orthogonalizer or self.default_orthogonalizer, constructor.ns_steps,
            constructor.ns_coefficients, constructor.ns_dtype)
        defaults = {**dataclasses.asdict(settings), "betas": tuple(settings.betas), "algorithm": self.algorithm,
                    "step": 0}
        super().__init__(params, defaults)
        self.whole_matrices = WholeMatrices(_replicate_group(name, options.get("distributed_mesh")))

    @classmethod
    def declared_options(cls) -> list[tuple[str, Any, Any]]:
        """(name, annotation, default) of every user option: the constructor takes **options, so the registry reads
        them from here (the per-group options dataclass, then the constructor-only ones)."""
        out = []
        for options in (cls.options_class, ConstructorOptions):
            hints = typing.get_type_hints(options)
            out += [(f.name, hints[f.name], f.default) for f in dataclasses.fields(options)]
        return out

    def add_param_group(self, param_group: dict) -> None:
        """Checks the group (keys, option values, algorithm, matrix shapes and placements) before adding it."""
        name = type(self).__name__
        fields = [f.name for f in dataclasses.fields(self.options_class)]
        _reject_unknown(name, "param-group key(s)", param_group, list(INTERNAL_GROUP_KEYS) + fields)
        merged = {**self.defaults, **param_group}
        dataclasses.replace(self.options_class(), **{k: merged[k] for k in fields}).validate(name)
        allowed = [self.algorithm, *SCALAR_ALGORITHMS]
        if merged["algorithm"] not in allowed:
            raise ValueError(f"{name}: algorithm={merged['algorithm']!r} is invalid; allowed: {', '.join(allowed)}")
        params = param_group["params"]
        params = [params] if isinstance(params, Tensor) else list(params)
        if merged["algorithm"] == self.algorithm:
            for p in params:
                MatrixLayout.of(p, merged["flatten"], name)
        super().add_param_group({**param_group, "params": params, "betas": tuple(merged["betas"])})

    def layout(self, p: Tensor, group: dict) -> MatrixLayout:
        return MatrixLayout.of(p, group["flatten"], type(self).__name__)

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure_loss(closure)
        matrix_groups: list[tuple[dict, list[Tensor]]] = []
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            group["step"] += 1
            if group["algorithm"] == self.algorithm:
                matrix_groups.append((group, params))
            else:
                self._scalar_step(group, params)
        if matrix_groups:
            self._matrix_step(matrix_groups)
        return loss

    def _matrix_step(self, groups: list[tuple[dict, list[Tensor]]]) -> None:
        raise NotImplementedError

    def _scalar_step(self, group: dict, params: list[Tensor]) -> None:
        beta1, beta2 = group["betas"]
        grads = [p.grad for p in params]
        exp_avgs = [self.state_tensor(p, "exp_avg") for p in params]
        if group["algorithm"] == "lion":
            lion_update(params, grads, exp_avgs, lr=group["lr"], beta1=beta1, beta2=beta2,
                        weight_decay=group["weight_decay"])
        else:
            adamw_update(params, grads, exp_avgs, [self.state_tensor(p, "exp_avg_sq") for p in params],
                         lr=group["lr"], beta1=beta1, beta2=beta2, weight_decay=group["weight_decay"],
                         epsilon=group["epsilon"], step=group["step"])

    def state_tensor(self, p: Tensor, key: str) -> Tensor:
        """A zero-initialised state with the parameter's shape, dtype and placement."""
        state = self.state[p]
        if key not in state:
            state[key] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return state[key]

    def row_state(self, p: Tensor, layout: MatrixLayout, key: str) -> Tensor:
        """A zero-initialised (m, 1) float32 state, the same full tensor on every rank (per-row statistics)."""
        state = self.state[p]
        if key not in state:
            state[key] = torch.zeros(layout.shape[0], 1, dtype=compute_dtype(p.dtype), device=p.device)
        return state[key]

    def scale(self, group: dict, layout: MatrixLayout) -> float:
        return lr_scale(parse_adjust_lr(type(self).__name__, group["adjust_lr"]), layout.shape)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of statistics and post-processing: float64 stays float64, everything else runs in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _replicate_group(owner: str, distributed_mesh: Any) -> Any:
    if hasattr(distributed_mesh, "get_group"):
        if distributed_mesh.ndim != 1:
            raise ValueError(f"{owner}: distributed_mesh must be 1-D, got {distributed_mesh.ndim} dimensions")
        distributed_mesh = distributed_mesh.get_group()
    if distributed_mesh is not None and dist.get_world_size(distributed_mesh) == 1:
        return None
    return distributed_mesh


@torch.no_grad()
def apply_update(param: Tensor, update: Tensor, *, lr: float, scale: float, weight_decay: float,
                 cautious_wd: bool) -> None:
    """Decoupled weight decay first (every member), then the scaled step (both with the group LR):

        X <- X (1 - lr wd)             everywhere, or only where sign(X) = sign(U) when cautious_wd
        X <- X - lr s(m, n) U

    param: this rank's 2D part of X (any dtype); update: U, the same shape, any float dtype."""
    if weight_decay != 0.0:
        if cautious_wd:
            decay = (torch.sign(param) == torch.sign(update)).to(param.dtype) * (lr * weight_decay)
            param.mul_(1.0 - decay)
        else:
            param.mul_(1.0 - lr * weight_decay)
    param.add_(update.to(param.dtype), alpha=-lr * scale)
