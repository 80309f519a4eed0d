"""Dion (Ahn et al. 2025, "Dion: Distributed Orthonormalized Updates", arXiv 2504.05295) as an optax
GradientTransformation: the slow, obviously-correct JAX twin of `optimizers.dion.reference.DionReference`.

Every matrix is updated on its own, in a Python loop over the leaves, with the same arithmetic order as the PyTorch
reference. `optimizers.experimental.dion_optax` is the optimized version (batched, mixed precision, sharded) and is
tested against this module step by step.

The optimizer is the partition (optax.partition) of three transforms selected by a label per leaf:
  "dion"   -> scale_by_dion -> add_decayed_weights(weight_decay) -> scale_by_learning_rate(learning_rate)
  "adamw"  -> optax.adamw(scalar_learning_rate, betas, epsilon, scalar_weight_decay)
  "lion"   -> optax.lion(scalar_learning_rate, betas, scalar_weight_decay)
By default 2D leaves are "dion" and every other leaf gets `scalar_algorithm`; `labels` overrides that (for example to
send the embedding table and the LM head to AdamW).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.scipy.linalg import solve_triangular

QR_METHODS = ("qr", "cqr", "rcqr")
SCALAR_ALGORITHMS = ("adamw", "lion")
ALGORITHMS = ("dion", *SCALAR_ALGORITHMS)
# How a 2D leaf stores a linear map: (fan_out, fan_in) like torch.nn.Linear.weight, or (fan_in, fan_out) like a
# flax.linen.Dense kernel. Only the update scale sqrt(fan_out / fan_in) depends on it.
WEIGHT_LAYOUTS = ("out_in", "in_out")

# Rows of the rcqr sketch are a multiple of this (the PyTorch reference's choice: full tiles on accelerators).
SKETCH_ROW_MULTIPLE = 128
# A Cholesky factor whose smallest diagonal entry is below this fraction of its largest describes a numerically
# rank-deficient P: the Cholesky-based methods then fall back (cqr -> rcqr -> Householder QR), as in PyTorch.
CHOLESKY_MIN_DIAGONAL_RATIO = 1e-3
# CholeskyQR2 accepts its first pass when max |Q1^T Q1 - I| is at most this (optimizers/dion/linalg.py explains).
CHOLESKY_QR2_MAX_GRAM_ERROR = 0.1


@dataclass(frozen=True)
class DionOptions:
    """Hyper-parameters shared by the reference and the optimized optax Dion, validated on construction.

    rank_fraction: r / min(m, n), in (0, 1]; r is rounded up to a multiple of rank_multiple_of and capped at
    min(m, n). mu: momentum decay of the error feedback. betas, epsilon: AdamW/Lion coefficients (epsilon is also the
    column-norm floor of Dion's Q). power_iters: power-iteration steps per update. qr_method: "qr" (Householder),
    "cqr" (Cholesky QR; randomized Cholesky QR for the first cqr_warmup_steps steps and whenever the Cholesky factor
    fails or is ill-conditioned) or "rcqr" (randomized Cholesky QR with a sketch of ceil(rcqr_oversample r / 128) 128
    rows; Householder QR when its Cholesky factor fails). scalar_algorithm: "adamw" or "lion" for unlabelled non-2D
    leaves.
    weight_layout: "out_in" (PyTorch's nn.Linear.weight) or "in_out" (Flax's Dense kernel), for the update scale.
    """
    rank_fraction: float = 1.0
    rank_multiple_of: int = 1
    mu: float = 0.95
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.01
    epsilon: float = 1e-8
    power_iters: int = 1
    qr_method: str = "rcqr"
    cqr_warmup_steps: int = 150
    rcqr_oversample: float = 1.25
    scalar_algorithm: str = "adamw"
    weight_layout: str = "out_in"

    def __post_init__(self):
        object.__setattr__(self, "betas", tuple(self.betas))
        checks = [
            ("rank_fraction", 0.0 < self.rank_fraction <= 1.0, "a float in (0, 1]"),
            ("rank_multiple_of", isinstance(self.rank_multiple_of, int) and self.rank_multiple_of >= 1,
             "an integer >= 1"),
            ("mu", 0.0 <= self.mu <= 1.0, "a float in [0, 1]"),
            ("betas", len(self.betas) == 2 and all(0.0 <= b < 1.0 for b in self.betas),
             "two floats in [0, 1)"),
            ("weight_decay", self.weight_decay >= 0.0, "a float >= 0"),
            ("epsilon", self.epsilon >= 0.0, "a float >= 0"),
            ("power_iters", isinstance(self.power_iters, int) and self.power_iters >= 1, "an integer >= 1"),
            ("qr_method", self.qr_method in QR_METHODS, "one of " + ", ".join(QR_METHODS)),
            ("cqr_warmup_steps", isinstance(self.cqr_warmup_steps, int) and self.cqr_warmup_steps >= 0,
             "an integer >= 0"),
            ("rcqr_oversample", self.rcqr_oversample >= 1.0, "a float >= 1"),
            ("scalar_algorithm", self.scalar_algorithm in SCALAR_ALGORITHMS,
             "one of " + ", ".join(SCALAR_ALGORITHMS)),
            ("weight_layout", self.weight_layout in WEIGHT_LAYOUTS, "one of " + ", ".join(WEIGHT_LAYOUTS)),
        ]
        for key, ok, allowed in checks:
            if not ok:
                raise ValueError(f"dion: {key}={getattr(self, key)!r} is invalid; allowed: {allowed}")


def matrix_rank(shape: tuple[int, int], rank_fraction: float, rank_multiple_of: int) -> int:
    """r = min(ceil(rank_fraction min(m, n) / rank_multiple_of) rank_multiple_of, m, n); the product is rounded to 6
    decimals first (0.3 * 10 counts as 3, not 4), as in the PyTorch version."""
    m, n = shape
    rank = rank_multiple_of * math.ceil(round(rank_fraction * min(m, n), 6) / rank_multiple_of)
    return min(rank, m, n)


def update_scale(shape: tuple[int, int], weight_layout: str) -> float:
    """sqrt(fan_out / fan_in): the update P Q^T then has unit spectral norm per unit input RMS."""
    rows, columns = shape
    return math.sqrt(rows / columns) if weight_layout == "out_in" else math.sqrt(columns / rows)


def q_shape(shape: tuple[int, int], rank: int) -> tuple[int, int]:
    """Dion works on the tall orientation of X (m x n): on X^T when m < n. Q spans the short side: min(m, n) x r."""
    return (min(shape), rank)


def seed_keys(seed: int) -> tuple[jax.Array, jax.Array]:
    """(key of the initial Q matrices, key of the rcqr sketches), both derived from `seed`."""
    q_key, sketch_key = jax.random.split(jax.random.key(seed))
    return q_key, sketch_key


def initial_q(q_key: jax.Array, index: int, shape: tuple[int, int], rank: int, dtype) -> jax.Array:
    """Q_0 ~ N(0, 1), drawn from q_key folded with the index of the matrix among the Dion leaves."""
    key = jax.random.fold_in(q_key, index)
    return jax.random.normal(key, q_shape(shape, rank), dtype=jnp.float32).astype(dtype)


def sketch_rows(rank: int, oversample: float) -> int:
    """k = ceil(oversample r / 128) 128."""
    return SKETCH_ROW_MULTIPLE * math.ceil(oversample * rank / SKETCH_ROW_MULTIPLE)


def nonzero_and_finite(T: jax.Array) -> jax.Array:
    """True when every entry of T is finite and one at least is non-zero: B Q can then be orthonormalized."""
    return jnp.all(jnp.isfinite(T)) & jnp.any(T != 0)


def positive_diagonal_signs(R: jax.Array) -> jax.Array:
    """sign(diag(R)) with sign(0) = +1."""
    return jnp.where(jnp.diagonal(R) < 0, -1.0, 1.0).astype(R.dtype)


def right_solve_upper(P: jax.Array, R: jax.Array) -> jax.Array:
    """P R^{-1} for upper-triangular R: solves X R = P as R^T X^T = P^T."""
    return solve_triangular(R, P.T, trans="T", lower=False).T


def cholesky_upper(A: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Upper-triangular R with A = R^T R, and whether R is usable: finite, and min diag(R) >= 1e-3 max diag(R)
    (CHOLESKY_MIN_DIAGONAL_RATIO: beyond cond(P) ~ 1e3, Cholesky QR leaves the columns far from orthonormal)."""
    R = jnp.linalg.cholesky(A).T
    diagonal = jnp.diagonal(R)
    usable = jnp.all(jnp.isfinite(diagonal)) & (jnp.min(diagonal) >= CHOLESKY_MIN_DIAGONAL_RATIO * jnp.max(diagonal))
    return R, usable


def householder_orthonormalize(P: jax.Array) -> jax.Array:
    """Q of the Householder QR P = Q R (P: m x r, m >= r, float32), column signs fixed so that diag(R) >= 0."""
    Q, R = jnp.linalg.qr(P)
    return Q * positive_diagonal_signs(R)[None, :]


def cholesky_qr(P: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Cholesky QR (float32): R = chol(P^T P), Q = P R^{-1}; and whether R was usable."""
    R, usable = cholesky_upper(P.T @ P)
    return right_solve_upper(P, R), usable


def cholesky_qr2(P: jax.Array) -> tuple[jax.Array, jax.Array]:
    """CholeskyQR2 (float32): Cholesky QR twice, Q1 = cholesky_qr(P), Q = cholesky_qr(Q1); usable when both factors
    are and max |Q1^T Q1 - I| <= CHOLESKY_QR2_MAX_GRAM_ERROR. One pass leaves |Q^T Q - I| ~ eps cond(P)^2 (0.5 at
    cond 1e4); the second restores orthonormality to round-off when the first was close."""
    Q1, usable = cholesky_qr(P)
    G1 = Q1.T @ Q1
    R2, usable2 = cholesky_upper(G1)
    near_identity = jnp.max(jnp.abs(G1 - jnp.eye(G1.shape[0], dtype=G1.dtype))) <= CHOLESKY_QR2_MAX_GRAM_ERROR
    return right_solve_upper(Q1, R2), usable & usable2 & near_identity


def randomized_cholesky_qr(P: jax.Array, key: jax.Array, oversample: float) -> tuple[jax.Array, jax.Array]:
    """Randomized Cholesky QR (Dion paper, Algorithm 2), float32, P: m x r with m > r:

        S ~ N(0, 1/k) of shape k x m;  R1 = qr_R(S P) with diag(R1) >= 0;  P1 = P R1^{-1}
        Q = cholesky_qr(P1)                         (one pass to restore orthonormality)
    Returns (Q, whether the Cholesky factor was usable).
    """
    rows, rank = P.shape
    k = sketch_rows(rank, oversample)
    sketch = jax.random.normal(key, (k, rows), dtype=jnp.float32) * math.sqrt(1.0 / k)
    R1 = jnp.linalg.qr(sketch @ P, mode="r")
    R1 = R1 * positive_diagonal_signs(R1)[:, None]
    return cholesky_qr(right_solve_upper(P, R1))


def orthonormalize(P: jax.Array, qr_method: str, use_cqr: jax.Array, key: jax.Array, oversample: float) -> jax.Array:
    """Orthonormal columns spanning those of P (m x r, m >= r, non-zero and finite), float32.

    All methods return the same matrix, the Q factor whose triangular factor has a positive diagonal (unique for a
    full-rank P). "cqr" runs Cholesky QR once `use_cqr` (the warm-up is over) and falls back to "rcqr" when the
    factor is unusable; "rcqr" falls back to Householder QR likewise, and takes it directly for a square P.
    """
    P = P.astype(jnp.float32)
    rows, rank = P.shape
    householder = lambda: householder_orthonormalize(P)
    if qr_method == "qr":
        return householder()

    def rcqr():
        if rows <= rank:
            return householder()
        Q, usable = randomized_cholesky_qr(P, key, oversample)
        return jax.lax.cond(usable, lambda: Q, householder)

    if qr_method == "rcqr":
        return rcqr()

    def cqr():
        Q, usable = cholesky_qr2(P)
        return jax.lax.cond(usable, lambda: Q, rcqr)

    return jax.lax.cond(use_cqr, cqr, rcqr)


def column_normalize(R: jax.Array, epsilon: float) -> jax.Array:
    """Q = R_:j / (||R_:j|| + eps) column by column, float32 (Algorithm 1: Q_t = ColumnNormalize(R_t))."""
    R = R.astype(jnp.float32)
    return R / (jnp.sqrt(jnp.sum(R * R, axis=-2, keepdims=True)) + epsilon)


def dion_direction(G: jax.Array, M: jax.Array, Q: jax.Array, key: jax.Array, use_cqr: jax.Array,
                   options: DionOptions) -> tuple[jax.Array, jax.Array, jax.Array]:
    """One Dion step (Algorithm 1) for one matrix X (m x n): returns (direction, new momentum, new Q); the caller
    applies X <- X (1 - lr wd) - lr direction.

    A is the tall orientation of B = M + G (A = B^T when m < n) and Q is min(m, n) x r. For each power iteration
        P = orth(A Q);  R = A^T P;  Q <- R
    then
        M <- B - (1 - mu) P R^T                   (error feedback, in X's orientation)
        Q <- ColumnNormalize(R)                   (float32)
        direction = sqrt(fan_out / fan_in) P Q^T  (in X's orientation; sqrt(m / n) for "out_in" weights)
    The power iteration runs in the momentum's dtype. When A Q is zero or non-finite (B zero or non-finite) the
    step is skipped: M and Q are kept and the direction is zero.
    """
    m, n = G.shape
    transposed = m < n
    B = (M + G).astype(M.dtype)
    A = B.T if transposed else B
    R = Q.astype(B.dtype)
    valid = jnp.array(True)
    for _ in range(options.power_iters):
        P = A @ R
        valid = valid & nonzero_and_finite(P)
        P = orthonormalize(jnp.where(valid, P, 0.0), options.qr_method, use_cqr, key, options.rcqr_oversample)
        P = P.astype(B.dtype)
        R = A.T @ P
    P = jnp.where(valid, P, 0.0)
    Q_new = jnp.where(valid, column_normalize(R, options.epsilon), Q.astype(jnp.float32))
    feedback = P @ R.T
    M_new = jnp.where(valid, B - (1.0 - options.mu) * (feedback.T if transposed else feedback), M)
    update = P @ Q_new.astype(B.dtype).T
    direction = update_scale((m, n), options.weight_layout) * (update.T if transposed else update)
    return direction.astype(G.dtype), M_new.astype(M.dtype), Q_new.astype(Q.dtype)


class ScaleByDionState(NamedTuple):
    count: jax.Array  # int32 scalar: steps taken
    momentum: Any  # pytree like the Dion leaves
    Q: Any  # pytree: min(m, n) x r per Dion leaf


def check_matrices(params) -> None:
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        if leaf.ndim != 2:
            raise ValueError(f"dion: leaf {jax.tree_util.keystr(path)} has shape {tuple(leaf.shape)}; the 'dion' label "
                             f"needs 2D matrices (label it {' or '.join(repr(a) for a in SCALAR_ALGORITHMS)})")


def scale_by_dion(options: DionOptions, seed: int = 0) -> optax.GradientTransformation:
    """The Dion direction sqrt(fan_out / fan_in) P Q^T of every leaf (all 2D). State: step count, momentum, Q.

    The rcqr sketch of leaf i at step t is drawn from the sketch key of `seed_keys(seed)` folded with (t, i):
    deterministic, and identical on every device.
    """
    q_key, sketch_key = seed_keys(seed)

    def init(params):
        check_matrices(params)
        leaves, treedef = jax.tree_util.tree_flatten(params)
        momentum = [jnp.zeros_like(x) for x in leaves]
        Q = [initial_q(q_key, i, x.shape, matrix_rank(x.shape, options.rank_fraction, options.rank_multiple_of),
                       x.dtype) for i, x in enumerate(leaves)]
        return ScaleByDionState(jnp.zeros([], jnp.int32), jax.tree_util.tree_unflatten(treedef, momentum),
                                jax.tree_util.tree_unflatten(treedef, Q))

    def update(updates, state, params=None):
        del params
        step = state.count + 1
        use_cqr = step > options.cqr_warmup_steps
        step_key = jax.random.fold_in(sketch_key, step)
        grads, treedef = jax.tree_util.tree_flatten(updates)
        momentum = treedef.flatten_up_to(state.momentum)
        Q = treedef.flatten_up_to(state.Q)
        results = [dion_direction(g, m, q, jax.random.fold_in(step_key, i), use_cqr, options)
                   for i, (g, m, q) in enumerate(zip(grads, momentum, Q))]
        directions, momentum, Q = ([r[j] for r in results] for j in range(3))
        unflatten = lambda leaves: jax.tree_util.tree_unflatten(treedef, leaves)
        return unflatten(directions), ScaleByDionState(step, unflatten(momentum), unflatten(Q))

    return optax.GradientTransformation(init, update)


def default_labels(params, scalar_algorithm: str):
    """The label "dion" for 2D leaves, scalar_algorithm for every other leaf."""
    return jax.tree_util.tree_map(lambda x: "dion" if jnp.ndim(x) == 2 else scalar_algorithm, params)


def resolve_labels(labels, scalar_algorithm: str) -> Callable:
    """A function params -> labels (optax.partition's param_labels) that checks every label is known."""

    def checked(tree):
        for path, label in jax.tree_util.tree_leaves_with_path(tree):
            if label not in ALGORITHMS:
                raise ValueError(f"dion: labels{jax.tree_util.keystr(path)}={label!r} is invalid; "
                                 f"allowed: {', '.join(ALGORITHMS)}")
        return tree

    if labels is None:
        return lambda params: checked(default_labels(params, scalar_algorithm))
    if callable(labels):
        return lambda params: checked(labels(params))
    checked(labels)
    return lambda params: labels


def dion(learning_rate: float | optax.Schedule, *, rank_fraction: float = 1.0, rank_multiple_of: int = 1,
         qr_method: str = "rcqr", mu: float = 0.95, betas: tuple[float, float] = (0.9, 0.95),
         weight_decay: float = 0.01, epsilon: float = 1e-8, power_iters: int = 1, cqr_warmup_steps: int = 150,
         rcqr_oversample: float = 1.25, scalar_algorithm: str = "adamw",
         scalar_learning_rate: float | optax.Schedule | None = None, scalar_weight_decay: float | None = None,
         labels=None, weight_layout: str = "out_in", seed: int = 0) -> optax.GradientTransformation:
    """Dion on the 2D leaves, AdamW or Lion (`scalar_algorithm`) on the rest; see the module docstring.

    learning_rate (a float or an optax schedule of the step count) scales the Dion update; the scalar algorithm uses
    scalar_learning_rate and scalar_weight_decay (default: the Dion ones). labels: a pytree (or a function of the
    params returning one) of "dion" / "adamw" / "lion" per leaf, as optax.partition takes. weight_layout: "out_in"
    for (fan_out, fan_in) matrices (PyTorch's convention), "in_out" for Flax Dense kernels.
    """
    options = DionOptions(rank_fraction=rank_fraction, rank_multiple_of=rank_multiple_of, mu=mu, betas=betas,
                          weight_decay=weight_decay, epsilon=epsilon, power_iters=power_iters, qr_method=qr_method,
                          cqr_warmup_steps=cqr_warmup_steps, rcqr_oversample=rcqr_oversample,
                          scalar_algorithm=scalar_algorithm, weight_layout=weight_layout)
    scalar_lr = learning_rate if scalar_learning_rate is None else scalar_learning_rate
    scalar_wd = weight_decay if scalar_weight_decay is None else scalar_weight_decay
    beta1, beta2 = options.betas
    transforms = {
        "dion": optax.chain(scale_by_dion(options, seed), optax.add_decayed_weights(weight_decay),
                            optax.scale_by_learning_rate(learning_rate)),
        "adamw": optax.adamw(scalar_lr, b1=beta1, b2=beta2, eps=epsilon, weight_decay=scalar_wd),
        "lion": optax.lion(scalar_lr, b1=beta1, b2=beta2, weight_decay=scalar_wd),
    }
    return optax.partition(transforms, resolve_labels(labels, scalar_algorithm))
