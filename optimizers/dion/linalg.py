"""Pure tensor math of Dion (Ahn et al. 2025, "Dion: Distributed Orthonormalized Updates", arXiv 2504.05295).

Every function works on one matrix (m x r) or a stack of them (b x m x r) and has no distributed code: the
optimizers in `dion_reference`, `dion` and `dion_async` call these pieces between their collectives. Where a
quantity is a sum over the rows of a row-sharded matrix (a Gram matrix P^T P, a sketch S P, column norms), the
function returns the local partial sum and the caller all-reduces it before the next piece.

Orthonormalization: the three QR methods return the same matrix, the thin Q factor of P whose triangular factor has a
positive diagonal (unique for full-rank P), so they are interchangeable and comparable in tests:
- "qr": Householder QR, signs of the columns fixed so that diag(R) > 0.
- "cqr": CholeskyQR2: R1 = chol(P^T P), P1 = P R1^{-1}, then the same pass on P1 (R2 = chol(P1^T P1), Q = P1 R2^{-1}).
  One pass loses orthogonality as eps cond(P)^2 grows (|Q^T Q - I| = 0.5 at cond 1e4 in float32); the second pass
  restores it to round-off when P1 is close to orthonormal, which `gram_near_identity` checks (else fall back).
- "rcqr": randomized Cholesky QR (the paper's Algorithm 2): R1 from a Householder QR of the sketch S P (S Gaussian,
  k x m with k ~ oversample r), P1 = P R1^{-1}, then one Cholesky QR pass on P1. Stable up to cond(P) ~ 1/eps.
All of them run in float32, or float64 for float64 inputs (`compute_dtype`).
"""
from __future__ import annotations

import contextlib
import math

import torch
from torch import Tensor

# Rows of the rcqr sketch are a multiple of this (full tiles on accelerators; the reference implementation's choice).
SKETCH_ROW_MULTIPLE = 128
# A Cholesky-based factor whose smallest diagonal entry is below this fraction of its largest describes a numerically
# rank-deficient P (cond(P) > 1e3): Cholesky QR would return columns far from orthonormal, so the caller falls back.
CHOLESKY_MIN_DIAGONAL_RATIO = 1e-3
# CholeskyQR2 accepts its first pass when max |P1^T P1 - I| is at most this: P1 is then close to orthonormal and the
# second pass leaves |Q^T Q - I| at float32 round-off (its error is ~ eps cond(P1)^2). Otherwise (float32 P with
# cond(P) ~ 1e4 and above) the caller falls back.
CHOLESKY_QR2_MAX_GRAM_ERROR = 0.1


def compute_dtype(t: Tensor) -> torch.dtype:
    """float32 for bfloat16/float16/float32 inputs, float64 for float64: orthonormalization and norms never run in
    a 16-bit format."""
    return torch.promote_types(t.dtype, torch.float32)


def low_rank_dim(m: int, n: int, rank_fraction: float, rank_multiple_of: int) -> int:
    """r = min(ceil(rank_fraction min(m, n) / rank_multiple_of) rank_multiple_of, m, n).

    The product is rounded to 6 decimals first so that e.g. 0.3 * 10 counts as 3, not 4."""
    rank = rank_multiple_of * math.ceil(round(rank_fraction * min(m, n), 6) / rank_multiple_of)
    return min(rank, m, n)


def sketch_rows(rank: int, oversample: float) -> int:
    """k = ceil(oversample r / 128) 128."""
    return SKETCH_ROW_MULTIPLE * math.ceil(oversample * rank / SKETCH_ROW_MULTIPLE)


def gaussian_sketch(rows: int, columns: int, seed: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """S ~ N(0, 1/k), k x m (k = rows), drawn from a generator seeded with `seed` (any non-negative integer below
    2^64) on `device`. The CPU generator (mt19937) keeps only the low 32 bits of a seed, so the high half is folded
    in: seeds that differ only above bit 32 (the step, in Dion's t * 2^32 + m) still draw different sketches."""
    generator = torch.Generator(device=device)
    generator.manual_seed((seed ^ (seed >> 32)) & 0xFFFFFFFF)
    sketch = torch.randn((rows, columns), generator=generator, device=device, dtype=dtype)
    return sketch.mul_(1.0 / math.sqrt(rows))


def initial_q(rows: int, rank: int, seed: int, device: torch.device) -> Tensor:
    """Q_0 ~ N(0, 1), rows x r, float32, from a generator seeded with `seed` (identical on every rank)."""
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return torch.randn((rows, rank), generator=generator, device=device, dtype=torch.float32)


@contextlib.contextmanager
def full_precision_matmuls():
    """float32 matrix products in full float32 inside, whatever the process chose (train.py lets CUDA use TF32, with
    a 10-bit mantissa): a Gram matrix or sketch computed in TF32 would leave Cholesky QR's result orthonormal to only
    ~1e-3 cond(P)^2. The setting is read when each product is launched, so this holds for the products inside."""
    previous = torch.get_float32_matmul_precision()
    if previous == "highest":
        yield
        return
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)


def gram(P: Tensor) -> Tensor:
    """P^T P in compute_dtype, (..., r, r): a sum over the rows of P (all-reduce it when the rows are sharded),
    with full-precision products (`full_precision_matmuls`)."""
    P = P.to(compute_dtype(P))
    with full_precision_matmuls():
        return P.mT @ P


def nonzero_and_finite(T: Tensor) -> Tensor:
    """Per matrix of a stack (..., a, b): True when every entry is finite and at least one is non-zero (one pass: the
    Frobenius norm is finite and positive). Applied to P, S P or P^T P it tells whether B Q can be orthonormalized."""
    norm = torch.linalg.vector_norm(T, dim=(-2, -1))
    return torch.isfinite(norm) & (norm > 0)


def positive_diagonal_signs(R: Tensor) -> Tensor:
    """sign(diag(R)) with sign(0) = +1, (..., r)."""
    diagonal = R.diagonal(dim1=-2, dim2=-1)
    return torch.where(diagonal < 0, -1.0, 1.0).to(R.dtype)


def householder_orthonormalize(P: Tensor) -> Tensor:
    """Q of P = Q R (Householder) with diag(R) >= 0: Q <- Q diag(sign(diag(R))). (..., m, r), m >= r."""
    Q, R = torch.linalg.qr(P.to(compute_dtype(P)))
    return Q * positive_diagonal_signs(R).unsqueeze(-2)


def sketch_triangular_factor(SP: Tensor) -> Tensor:
    """R1 of S P = Q1 R1 (Householder) with diag(R1) >= 0: R1 <- diag(sign(diag(R1))) R1, (..., r, r)."""
    R = torch.linalg.qr(SP.to(compute_dtype(SP)), mode="r").R
    return R * positive_diagonal_signs(R).unsqueeze(-1)


def cholesky_upper(G: Tensor) -> tuple[Tensor, Tensor]:
    """Upper-triangular R with G = R^T R, and per matrix whether R is usable: the factorization succeeded and
    min diag(R) >= CHOLESKY_MIN_DIAGONAL_RATIO max diag(R) (see the constant). (..., r, r), (...)."""
    R, info = torch.linalg.cholesky_ex(G, upper=True)
    diagonal = R.diagonal(dim1=-2, dim2=-1)
    well_conditioned = diagonal.amin(-1) >= CHOLESKY_MIN_DIAGONAL_RATIO * diagonal.amax(-1)
    return R, (info == 0) & torch.isfinite(diagonal).all(-1) & well_conditioned


def gram_near_identity(G: Tensor) -> Tensor:
    """Per matrix of a stack (..., r, r): max |G - I| <= CHOLESKY_QR2_MAX_GRAM_ERROR (NaN counts as far)."""
    eye = torch.eye(G.shape[-1], dtype=G.dtype, device=G.device)
    return (G - eye).abs().amax(dim=(-2, -1)) <= CHOLESKY_QR2_MAX_GRAM_ERROR


def solve_right_upper(P: Tensor, R: Tensor) -> Tensor:
    """P R^{-1} for upper-triangular R, (..., m, r)."""
    return torch.linalg.solve_triangular(R, P, upper=True, left=False)


def column_sq_norms(R: Tensor) -> Tensor:
    """sum_i R_ij^2 per column in compute_dtype, (..., r): a sum over rows (all-reduce it when the rows are
    sharded)."""
    return R.to(compute_dtype(R)).square().sum(-2)


def column_normalize(R: Tensor, sq_norms: Tensor, epsilon: float) -> Tensor:
    """Q = R / (||R_:j|| + eps) column by column, in compute_dtype (Algorithm 1: Q_t = ColumnNormalize(R_t))."""
    return R.to(compute_dtype(R)) / (sq_norms.sqrt().unsqueeze(-2) + epsilon)


def update_scale(fan_out: int, fan_in: int) -> float:
    """sqrt(m / n) for X of shape m x n (fan_out x fan_in): the update P Q^T has unit spectral norm per input RMS."""
    return math.sqrt(fan_out / fan_in)
