"""What the three Dion optimizers share: options, state, scalar algorithms, orthonormalization, the registry builder.

`DionReference` (optimizers/dion/reference.py), `Dion` (optimizers/dion/batched.py) and `DionAsync`
(optimizers/dion/overlapped.py) differ only in how they run the matrix update of Algorithm 1 (one matrix at a time, in
same-shape batches, or in batches whose communication overlaps); everything else lives here once:
- the constructor (one signature for all three) and the per-group options, validated with clear errors;
- the optimizer state: `momentum` (X's shape and sharding) and `Q` (n x r, or m x r when Dion works on X^T; rows
  sharded like the matching dimension of X), created on the first step unless a caller put them in `state` already;
- the scalar algorithms (AdamW / Lion from `optimizers.common.scalar_updates`) for groups with `algorithm`
  "adamw" / "lion", including their data-parallel gradient average when the optimizer owns the replica sync:
  started during backward when the loop announces the last micro-batch (`prepare_backward`,
  optimizers/dion/replica_sync.py), else in step();
- `orthonormalize`, the distributed QR step used by all three.

Random numbers are reproducible and identical on every rank: matrix i (its position in the param groups) starts from
Q_0 drawn with seed i, and the rcqr sketch of the matrices with m rows (of Dion's orientation) at step t is drawn with
seed t * 2^32 + m: one sketch per step and row count, shared by a whole batch (the result of rcqr does not depend on
the sketch, which only has to embed P's column space well). A sharded Q or sketch is the local slice of the full
matrix, so every layout computes what a single process computes.
"""
from __future__ import annotations

import abc
import math
from dataclasses import dataclass
from enum import Enum
from typing import Any, Callable, Mapping

import torch
from torch import Tensor
from torch.distributed.tensor import DTensor
from torch.optim import Optimizer

from optimizers.common.choices import group_algorithm, parse_choice
from optimizers.common.closure import closure_loss
from optimizers.common.hooks import TrainingHooks
from optimizers.common.param_groups import CheckedParamGroups
from optimizers.common.scalar_updates import adamw_update, lion_update
from optimizers.common.tensors import local_gradient, local_tensor
from optimizers.dion.distributed import (Collectives, HostFlag, MatrixLayout, all_gather_rows, all_reduce,
                                         all_reduce_mean, as_like, group_size, matrix_layout, process_group,
                                         q_placements, run_blocking)
from optimizers.dion.linalg import (cholesky_upper, compute_dtype, full_precision_matmuls, gaussian_sketch, gram,
                                    gram_near_identity, householder_orthonormalize, initial_q, low_rank_dim,
                                    nonzero_and_finite, sketch_rows, sketch_triangular_factor, solve_right_upper)
from optimizers.dion.replica_sync import BackwardReplicaSync

DION = "dion"  # the param-group algorithm of the matrices


class QRMethod(str, Enum):
    """How P is orthonormalized (see optimizers/dion/linalg.py). The Cholesky-based methods fall back when the factor
    fails or is ill-conditioned: "cqr" to "rcqr", "rcqr" to "qr"."""
    QR = "qr"
    CQR = "cqr"
    RCQR = "rcqr"


def _dtype(key: str, value: Any) -> torch.dtype | None:
    if value is None or isinstance(value, torch.dtype):
        dtype = value
    elif isinstance(value, str) and isinstance(getattr(torch, value, None), torch.dtype):
        dtype = getattr(torch, value)
    else:
        raise ValueError(f"dion: mixed_precision_config.{key}={value!r} is invalid; allowed: None or a floating "
                         f"dtype such as torch.bfloat16 / 'bfloat16'")
    if dtype is not None and not dtype.is_floating_point:
        raise ValueError(f"dion: mixed_precision_config.{key}={value!r} is invalid; allowed: None or a floating "
                         f"dtype such as torch.bfloat16 / 'bfloat16'")
    return dtype


@dataclass(frozen=True)
class DionMixedPrecisionConfig:
    """dtypes of the optimizer states (None: the parameter's dtype). momentum_dtype: Dion's M and the scalar
    algorithms' first moment; Q_dtype: Dion's Q; variance_dtype: AdamW's second moment. The power iteration runs in
    the momentum dtype; orthonormalization, column norms and the scalar updates run in float32."""
    momentum_dtype: torch.dtype | None = None
    Q_dtype: torch.dtype | None = None
    variance_dtype: torch.dtype | None = None

    def __post_init__(self):
        for key in ("momentum_dtype", "Q_dtype", "variance_dtype"):
            object.__setattr__(self, key, _dtype(key, getattr(self, key)))

    @classmethod
    def coerce(cls, value: DionMixedPrecisionConfig | Mapping[str, Any] | None) -> DionMixedPrecisionConfig:
        """Accepts the dataclass, a mapping of its fields (dtype names allowed, as in a YAML config) or None."""
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        if isinstance(value, Mapping):
            unknown = sorted(set(value) - {"momentum_dtype", "Q_dtype", "variance_dtype"})
            if unknown:
                raise ValueError(f"dion: mixed_precision_config: unknown key(s) {', '.join(unknown)}; allowed: "
                                 f"momentum_dtype, Q_dtype, variance_dtype")
            return cls(**value)
        raise ValueError(f"dion: mixed_precision_config must be a DionMixedPrecisionConfig, a mapping or None, got "
                         f"{type(value).__name__}")


def _check_group_options(group: dict) -> None:
    betas = group["betas"]
    checks = [
        ("lr", 0.0 <= group["lr"] < math.inf, "a finite float >= 0"),
        ("mu", 0.0 <= group["mu"] < 1.0, "a float in [0, 1)"),
        ("betas", len(betas) == 2 and all(0.0 <= b < 1.0 for b in betas), "two floats in [0, 1)"),
        ("weight_decay", 0.0 <= group["weight_decay"] < math.inf, "a finite float >= 0"),
        ("epsilon", 0.0 <= group["epsilon"] < math.inf, "a finite float >= 0"),
        ("rank_fraction", 0.0 < group["rank_fraction"] <= 1.0, "a float in (0, 1]"),
        ("rank_multiple_of", isinstance(group["rank_multiple_of"], int) and group["rank_multiple_of"] >= 1,
         "an integer >= 1"),
    ]
    for key, ok, allowed in checks:
        if not ok:
            raise ValueError(f"dion: {key}={group[key]!r} is invalid; allowed: {allowed}")


@dataclass
class MatrixTask:
    """One Dion matrix for one step: local shards (views of the parameter and its states) plus its options."""
    param: Tensor
    grad: Tensor
    momentum: Tensor
    Q: Tensor
    layout: MatrixLayout
    lr: float
    mu: float
    weight_decay: float
    epsilon: float
    qr_method: QRMethod
    compressed: bool
    average_gradient: bool  # the replicas' full-gradient average is still to do (not compressed, not done in backward)
    projection: Tensor | None  # the first P = A Q, averaged over the replicas during backward (None: compute it here)
    step: int

    @property
    def sketch_seed(self) -> int:
        return (self.step << 32) + self.layout.algorithm_shape[0]

    def batch_key(self) -> tuple:
        """Matrices with equal keys are updated together (same shapes, sharding, dtypes and options)."""
        layout = self.layout
        return (layout.shape, layout.transposed, layout.row_group, layout.column_group, tuple(self.param.shape),
                tuple(self.Q.shape), self.param.dtype, self.grad.dtype, self.momentum.dtype, self.Q.dtype, self.lr,
                self.mu, self.weight_decay, self.epsilon, self.qr_method, self.compressed, self.average_gradient,
                self.projection is not None)


def orthonormalize(P: Tensor, qr_method: QRMethod, layout: MatrixLayout, sketch_seed: int,
                   oversample: float) -> Collectives:
    """Orthonormal columns spanning P's (Algorithm 1, line "P_t = Orthogonalize(B_t Q_{t-1})").

    P: (b, local rows, r), already summed over the column shards and replicas; its rows may be sharded over
    layout.row_group. Returns (orthonormal P, valid): (b, local rows, r) in compute_dtype(P) (float32, or float64
    for float64 P) whose columns are orthonormal over all row shards, and (b,) bool, False where a matrix of the stack
    is zero or non-finite (its result is then meaningless). `valid` comes from quantities reduced over the row group,
    so every rank of it agrees, including ranks whose shard has no rows. sketch_seed: the seed of the rcqr sketch,
    one k x m Gaussian applied to every matrix of the stack."""
    rows, _ = layout.algorithm_shape
    rank = P.shape[-1]
    start, length, _ = layout.rows
    P = P.to(compute_dtype(P))
    if qr_method is QRMethod.CQR:
        G = gram(P)
        yield all_reduce(G, layout.row_group)
        valid = nonzero_and_finite(G)
        R, usable = cholesky_upper(torch.where(valid[:, None, None], G, 0.0))
        ok = HostFlag(usable | ~valid)  # read after other batches have been issued (DionAsync), see HostFlag
        yield ok
        if ok:
            # CholeskyQR2: the first pass leaves |P1^T P1 - I| ~ eps cond(P)^2; a second pass on P1 (cond ~ 1)
            # restores orthonormality to round-off, provided the first pass was close (else fall back).
            P1 = solve_right_upper(P, R)
            G1 = gram(P1)
            yield all_reduce(G1, layout.row_group)
            R, usable = cholesky_upper(torch.where(valid[:, None, None], G1, 0.0))
            usable &= gram_near_identity(G1)
            ok = HostFlag(usable | ~valid)
            yield ok
            if ok:
                return solve_right_upper(P1, R), valid
        qr_method = QRMethod.RCQR
    if qr_method is QRMethod.RCQR and rows > rank:
        k = sketch_rows(rank, oversample)
        sketch = gaussian_sketch(k, rows, sketch_seed, P.device, P.dtype)[:, start:start + length]
        with full_precision_matmuls():
            SP = sketch @ P
        yield all_reduce(SP, layout.row_group)
        valid = nonzero_and_finite(SP)
        P1 = solve_right_upper(P, sketch_triangular_factor(torch.where(valid[:, None, None], SP, 0.0)))
        G = gram(P1)
        yield all_reduce(G, layout.row_group)
        R, usable = cholesky_upper(torch.where(valid[:, None, None], G, 0.0))
        ok = HostFlag(usable | ~valid)
        yield ok
        if ok:
            return solve_right_upper(P1, R), valid
    full = yield from all_gather_rows(P, layout.row_group, layout.rows, rows)
    return householder_orthonormalize(full)[:, start:start + length], nonzero_and_finite(full)


class DionBase(CheckedParamGroups, Optimizer, TrainingHooks, abc.ABC):
    """Dion (arXiv 2504.05295, Algorithm 1) for the 2D matrices of `algorithm` = "dion" groups, AdamW or Lion for
    "adamw" / "lion" groups. Subclasses implement `_update_matrices`.

    Per-group options: lr, mu, betas, weight_decay, epsilon, rank_fraction, rank_multiple_of, algorithm.
    Optimizer-wide: power_iters, qr_method ("qr", "cqr", "rcqr"), cqr_warmup_steps (steps that use rcqr before
    "cqr" takes over), rcqr_oversample, the meshes and mixed_precision_config.

    Meshes: replicate_mesh (data-parallel replicas; 1-D DeviceMesh or ProcessGroup), outer_shard_mesh (FSDP2) and
    inner_shard_mesh (TP), 1-D DeviceMeshes (flattened meshes included). With replicate_mesh_grad_sync=True the
    gradients arrive un-averaged over replicate_mesh and the optimizer averages them itself: the low-rank P and R of
    a Dion matrix when (m + n) r < m n (the momenta of the replicas then differ, but their mean is the momentum of
    synchronized training, and every replica applies the same update), the full gradient otherwise and for the
    scalar algorithms. Call `synchronize_for_checkpoint()` before saving so that every replica holds the same state.
    A loop that calls `prepare_backward(last_micro_batch)` before each backward gets the full-gradient averages,
    and the first P = (M + G) Q of compressed matrices that no shard group sums (`projects_in_backward`), started
    during the last micro-batch's backward (bucketed, from post-accumulate-grad hooks; optimizers/dion/replica_sync.py);
    otherwise, and for gradients that no backward produced, step() averages them.
    """

    # Bytes per bucket of the replica averages started during backward (DDP's default bucket size).
    gradient_bucket_bytes = 25 * 2 ** 20
    # Whether the first P = (M + G) Q of a compressed matrix with unsharded rows and columns may be computed and
    # averaged during backward (the subclass then uses MatrixTask.projection in place of its own first P).
    projects_in_backward = True

    def __init__(self, params, lr: float = 0.01, mu: float = 0.95, betas: tuple[float, float] = (0.9, 0.95),
                 weight_decay: float = 0.01, epsilon: float = 1e-8, rank_fraction: float = 1.0,
                 rank_multiple_of: int = 1, power_iters: int = 1, qr_method: str = "rcqr",
                 cqr_warmup_steps: int = 150, rcqr_oversample: float = 1.25, replicate_mesh=None,
                 outer_shard_mesh=None, inner_shard_mesh=None, replicate_mesh_grad_sync: bool = True,
                 mixed_precision_config: DionMixedPrecisionConfig | Mapping[str, Any] | None = None):
        if not (isinstance(power_iters, int) and power_iters >= 1):
            raise ValueError(f"dion: power_iters={power_iters!r} is invalid; allowed: an integer >= 1")
        if not (isinstance(cqr_warmup_steps, int) and cqr_warmup_steps >= 0):
            raise ValueError(f"dion: cqr_warmup_steps={cqr_warmup_steps!r} is invalid; allowed: an integer >= 0")
        if not 1.0 <= rcqr_oversample < math.inf:
            raise ValueError(f"dion: rcqr_oversample={rcqr_oversample!r} is invalid; allowed: a finite float >= 1")
        self._power_iters = power_iters
        self._qr_method = parse_choice(QRMethod, "dion", "qr_method", qr_method)
        self._cqr_warmup_steps = cqr_warmup_steps
        self._rcqr_oversample = float(rcqr_oversample)
        self._mixed_precision = DionMixedPrecisionConfig.coerce(mixed_precision_config)
        replicate_group = process_group(replicate_mesh, "replicate_mesh")
        self._replicate_group = replicate_group if replicate_mesh_grad_sync else None
        self._outer_group = process_group(outer_shard_mesh, "outer_shard_mesh")
        self._inner_group = process_group(inner_shard_mesh, "inner_shard_mesh")
        # Derived from the parameters and meshes, never checkpointed: recomputed after a reshard.
        self._index: dict[Tensor, int] = {}
        self._layouts: dict[Tensor, MatrixLayout] = {}
        self._checked_state: set[Tensor] = set()
        self._backward_sync: BackwardReplicaSync | None = None  # created by the first prepare_backward
        self._group_of: dict[Tensor, dict] = {}  # each parameter's group, refreshed by prepare_backward
        defaults = dict(lr=lr, mu=mu, betas=tuple(betas), weight_decay=weight_decay, epsilon=epsilon,
                        rank_fraction=rank_fraction, rank_multiple_of=rank_multiple_of, algorithm=DION,
                        step=0)
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        group["betas"] = tuple(group["betas"])
        group["algorithm"] = group_algorithm(type(self).__name__, DION, group["algorithm"])
        _check_group_options(group)
        for p in group["params"]:
            if group["algorithm"] == DION and p.dim() != 2:
                raise ValueError(f"dion: a parameter of shape {tuple(p.shape)} is in an algorithm='dion' group, which "
                                 f"takes 2D matrices only; put it in a group with algorithm 'lion' or 'adamw'")
            self._index[p] = len(self._index)

    def prepare_backward(self, last_micro_batch: bool, rescaled_after: bool = False) -> None:
        """Before each backward of a training step. On the last micro-batch (the gradients are final after it) the
        gradients that the replicas average in full, and the first P of the compressed matrices that no shard group
        sums, are averaged during the backward, bucket by bucket as they become final; step() then starts from them.
        Nothing to do unless the optimizer owns the replica sync. rescaled_after: the loop multiplies the gradients
        after backward (clipping by the global norm), so the first P is left to step() (a P taken during backward
        would be dropped there anyway: `BackwardReplicaSync.projection`)."""
        if self._replicate_group is None:
            return
        if self._backward_sync is None:
            params, projected = [], set()
            for group in self.param_groups:
                for p in group["params"]:
                    layout = self._layout(p) if group["algorithm"] == DION else None
                    if layout is not None and layout.compressed(self._replicate_group, self._rank(p, group)):
                        if not (self.projects_in_backward and layout.row_group is None
                                and layout.column_group is None):
                            continue
                        projected.add(p)
                    params.append(p)
            self._backward_sync = BackwardReplicaSync(params, self._replicate_group, self.gradient_bucket_bytes,
                                                      projected, self._first_projection)
        self._group_of = {p: group for group in self.param_groups for p in group["params"]}
        self._backward_sync.arm(last_micro_batch, project=not rescaled_after)

    @torch.no_grad()
    def _first_projection(self, p: Tensor) -> Tensor:
        """P = A Q with A = M + G (or its transpose in Dion's orientation), as the first power iteration computes
        it, from the final gradient and the previous step's M and Q (created here on the first step, as step()
        would create them, so that every step, resumed or not, takes this path)."""
        layout = self._layout(p)
        state = self._matrix_state(p, self._group_of[p], layout)
        momentum = local_tensor(state["momentum"])
        B = torch.add(momentum, local_gradient(p)).to(momentum.dtype)
        A = B.T if layout.transposed else B
        return A @ local_tensor(state["Q"]).to(B.dtype)

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure_loss(closure)
        sync = self._backward_sync
        averaged = sync.synced if sync is not None else set()
        projection = sync.projection if sync is not None else (lambda p: None)
        matrix_tasks: list[MatrixTask] = []
        scalar_groups: list[tuple[dict, list[Tensor]]] = []
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            group["step"] += 1
            if group["algorithm"] == DION:
                matrix_tasks.extend(self._matrix_task(p, group, p in averaged, projection(p)) for p in params)
            else:
                scalar_groups.append((group, params))
        # The scalar gradients' average runs in the background while the matrices are updated.
        scalar_grads = self._scalar_gradients([p for _, params in scalar_groups for p in params], averaged)
        if matrix_tasks:
            self._update_matrices(matrix_tasks)
        grads = iter(scalar_grads())
        for group, params in scalar_groups:
            self._scalar_update(group, params, [next(grads) for _ in params])
        averaged.clear()
        if sync is not None:
            sync.projections.clear()
        return loss

    @abc.abstractmethod
    def _update_matrices(self, tasks: list[MatrixTask]) -> None:
        """Apply Algorithm 1 to every task's matrix (in place on param, momentum and Q)."""

    # ----------------------------------------------------------------------------------------------------- state
    def _state_dtype(self, key: str, param: Tensor) -> torch.dtype:
        configured = {"momentum": self._mixed_precision.momentum_dtype, "Q": self._mixed_precision.Q_dtype,
                      "variance": self._mixed_precision.variance_dtype}[key]
        return configured or param.dtype

    def _adopt(self, param: Tensor, value: Tensor, shape: tuple[int, ...], key: str, local_slices: tuple,
               placements: tuple | None) -> Tensor:
        """A state tensor that a caller provided (or a checkpoint restored): checked against the expected global
        shape, cast to the configured dtype, and turned into a DTensor shard when the parameter is a DTensor."""
        if tuple(value.shape) != tuple(shape):
            raise ValueError(f"dion: state[{key!r}] of a parameter of shape {tuple(param.shape)} has shape "
                             f"{tuple(value.shape)}; expected {tuple(shape)}")
        value = value.to(dtype=self._state_dtype(key, param))
        if isinstance(param, DTensor) and not isinstance(value, DTensor):
            value = as_like(value[local_slices].clone(), param, shape, placements)
        return value

    def _rank(self, p: Tensor, group: dict) -> int:
        """r of a Dion matrix from its group's rank options."""
        rows, columns = self._layout(p).algorithm_shape
        return low_rank_dim(rows, columns, group["rank_fraction"], group["rank_multiple_of"])

    def _matrix_state(self, p: Tensor, group: dict, layout: MatrixLayout) -> dict:
        state = self.state[p]
        if p in self._checked_state:
            return state
        _, columns = layout.algorithm_shape
        rank = self._rank(p, group)
        column_start, column_length = layout.columns
        q_slices = (slice(column_start, column_start + column_length), slice(None))
        placements = q_placements(p, layout) if isinstance(p, DTensor) else None
        if "momentum" in state:
            state["momentum"] = self._adopt(p, state["momentum"], tuple(p.shape), "momentum", layout.x_slices, None)
        else:
            state["momentum"] = torch.zeros_like(p, dtype=self._state_dtype("momentum", p))
        if "Q" in state:
            state["Q"] = self._adopt(p, state["Q"], (columns, rank), "Q", q_slices, placements)
        else:
            full = initial_q(columns, rank, seed=self._index[p], device=local_tensor(p).device)
            state["Q"] = as_like(full[q_slices].to(self._state_dtype("Q", p)), p, (columns, rank), placements)
        self._checked_state.add(p)
        return state

    def _layout(self, p: Tensor) -> MatrixLayout:
        if p not in self._layouts:
            self._layouts[p] = matrix_layout(p, self._outer_group, self._inner_group)
        return self._layouts[p]

    def _matrix_task(self, p: Tensor, group: dict, averaged: bool, projection: Tensor | None) -> MatrixTask:
        """averaged: p.grad already holds the replicas' average; projection: the replicas' average of the first P
        (both done during backward)."""
        layout = self._layout(p)
        state = self._matrix_state(p, group, layout)
        grad = local_gradient(p)
        qr_method = self._qr_method
        if qr_method is QRMethod.CQR and group["step"] <= self._cqr_warmup_steps:
            qr_method = QRMethod.RCQR  # Cholesky QR only once the momentum is well-conditioned
        rank = state["Q"].shape[1]
        compressed = layout.compressed(self._replicate_group, rank)
        return MatrixTask(param=local_tensor(p), grad=grad, momentum=local_tensor(state["momentum"]),
                          Q=local_tensor(state["Q"]), layout=layout, lr=group["lr"], mu=group["mu"],
                          weight_decay=group["weight_decay"], epsilon=group["epsilon"], qr_method=qr_method,
                          compressed=compressed, average_gradient=self._replicate_group is not None and not compressed
                          and not averaged, projection=projection, step=group["step"])

    # ------------------------------------------------------------------------------------------ scalar algorithms
    def _scalar_gradients(self, params: list[Tensor], averaged: set[Tensor]) -> Callable[[], list[Tensor]]:
        """Start averaging the scalar-algorithm gradients over the replicas (when the optimizer owns that sync and
        backward has not done it (`averaged`): one all-reduce per dtype over a flat buffer); the returned function
        waits and gives the local gradients."""
        grads = [local_gradient(p) for p in params]
        if self._replicate_group is None or not grads:
            return lambda: grads
        by_dtype: dict[torch.dtype, list[int]] = {}
        for i, (p, g) in enumerate(zip(params, grads)):
            if p not in averaged:
                by_dtype.setdefault(g.dtype, []).append(i)
        flats = {dtype: torch.cat([grads[i].reshape(-1) for i in indices]) for dtype, indices in by_dtype.items()}
        works = [all_reduce(flat, self._replicate_group) for flat in flats.values()]

        def finish() -> list[Tensor]:
            for work in works:
                work.wait()
            size = group_size(self._replicate_group)
            synced = list(grads)
            for dtype, indices in by_dtype.items():
                pieces = flats[dtype].div_(size).split([grads[i].numel() for i in indices])
                for i, piece in zip(indices, pieces):
                    synced[i] = piece.view_as(grads[i])
            return synced
        return finish

    def _scalar_update(self, group: dict, params: list[Tensor], grads: list[Tensor]) -> None:
        adamw = group["algorithm"] == "adamw"
        for p in params:
            state = self.state[p]
            if "momentum" not in state:
                state["momentum"] = torch.zeros_like(p, dtype=self._state_dtype("momentum", p))
                if adamw:
                    state["variance"] = torch.zeros_like(p, dtype=self._state_dtype("variance", p))
        locals_ = [local_tensor(p) for p in params]
        momenta = [local_tensor(self.state[p]["momentum"]) for p in params]
        beta1, beta2 = group["betas"]
        if adamw:
            variances = [local_tensor(self.state[p]["variance"]) for p in params]
            adamw_update(locals_, grads, momenta, variances, lr=group["lr"], beta1=beta1, beta2=beta2,
                         weight_decay=group["weight_decay"], epsilon=group["epsilon"], step=group["step"])
        else:
            lion_update(locals_, grads, momenta, lr=group["lr"], beta1=beta1, beta2=beta2,
                        weight_decay=group["weight_decay"])

    # ------------------------------------------------------------------------------------------------ checkpoints
    @torch.no_grad()
    def synchronize_for_checkpoint(self) -> None:
        """Average the Dion momenta over the replicas (they differ after compressed P/R syncs; their mean is the
        momentum of synchronized training), so that every replica saves, and continues from, the same state."""
        tensors = []
        for group in self.param_groups:
            if group["algorithm"] != DION:
                continue
            for p in group["params"]:
                state = self.state.get(p)
                if state and self._layout(p).compressed(self._replicate_group, state["Q"].shape[1]):
                    tensors.append(local_tensor(state["momentum"]))
        for dtype in {t.dtype for t in tensors}:
            same = [t for t in tensors if t.dtype == dtype]
            flat = torch.cat([t.reshape(-1) for t in same])
            run_blocking(all_reduce_mean(flat, self._replicate_group))
            for t, piece in zip(same, flat.split([t.numel() for t in same])):
                t.copy_(piece.view_as(t))

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        # torch casts floating-point states to the parameter's dtype; restore the configured state dtypes, and
        # re-check the loaded states (shapes, sharding) on the next step.
        self._checked_state.clear()
        for p, state in self.state.items():
            for key in ("momentum", "Q", "variance"):
                if key in state:
                    state[key] = state[key].to(self._state_dtype(key, p))


def runtime_kwargs(ctx) -> dict:
    """The trainer-supplied keywords of the three Dion classes: the device meshes, who syncs the replicas, and bf16
    momentum and Q (variance in ctx.variance_dtype) when ctx.state_dtype is bfloat16."""
    mixed_precision = None
    if ctx.state_dtype == torch.bfloat16:
        mixed_precision = DionMixedPrecisionConfig(momentum_dtype=torch.bfloat16, Q_dtype=torch.bfloat16,
                                                   variance_dtype=ctx.variance_dtype)
    return dict(replicate_mesh=ctx.replicate_mesh, outer_shard_mesh=ctx.outer_shard_mesh,
                inner_shard_mesh=ctx.inner_shard_mesh, replicate_mesh_grad_sync=ctx.replicate_mesh_grad_sync,
                mixed_precision_config=mixed_precision)
