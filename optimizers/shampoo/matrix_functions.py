"""Inverse p-th roots of symmetric positive semi-definite matrices, (A + epsilon I)^(-1/p).

Two methods: a symmetric eigendecomposition (exact up to rounding; retried in float64 when it fails, which happens
for ill-conditioned float32 inputs on some backends) and the coupled inverse Newton iteration (matrix products only).
"""
from __future__ import annotations

import torch
from torch import Tensor

from optimizers.shampoo.config import RootInverseMethod


def _eigh_inverse_root(matrix: Tensor, root: int, epsilon: float) -> Tensor | None:
    """None when the decomposition fails or returns non-finite values."""
    try:
        eigenvalues, eigenvectors = torch.linalg.eigh(matrix)
    except torch.linalg.LinAlgError:
        return None
    if not bool(torch.isfinite(eigenvalues).all()):
        return None
    # A is PSD by construction: negative eigenvalues are rounding noise and are clamped before the ridge is added.
    scales = (eigenvalues.clamp(min=0.0) + epsilon).pow(-1.0 / root)
    return (eigenvectors * scales) @ eigenvectors.T


def matrix_inverse_root_eigen(matrix: Tensor, root: int, epsilon: float) -> Tensor:
    """(A + eps I)^(-1/p) for a symmetric PSD (n, n) matrix, in the matrix's dtype.

        A = Q diag(lambda) Q^T   =>   (A + eps I)^(-1/p) = Q diag((max(lambda, 0) + eps)^(-1/p)) Q^T

    A failed or non-finite decomposition is retried in float64; if that fails too a ValueError is raised.
    """
    result = _eigh_inverse_root(matrix, root, epsilon)
    if result is None and matrix.dtype != torch.float64:
        result = _eigh_inverse_root(matrix.double(), root, epsilon)
    if result is None:
        raise ValueError(f"DistributedShampoo: eigendecomposition of a {tuple(matrix.shape)} factor matrix failed in "
                         "float64 too (non-finite gradients?)")
    return result.to(matrix.dtype)


def matrix_inverse_root_newton(matrix: Tensor, root: int, epsilon: float, max_iterations: int,
                               tolerance: float) -> Tensor:
    """(A + eps I)^(-1/p) by the coupled inverse Newton iteration (Guo & Higham 2006; Anil et al. 2020, Alg. 3).

        z = (1 + p) / (2 ||A + eps I||_F);   X_0 = z^(1/p) I;   M_0 = z (A + eps I)
        T_k = ((p + 1) I - M_k) / p;   X_{k+1} = X_k T_k;   M_{k+1} = T_k^p M_k

    The invariant M_k = X_k^p (A + eps I) gives X_k -> (A + eps I)^(-1/p) as M_k -> I; the Frobenius norm bounds the
    spectral norm, so the eigenvalues of M_0 lie in (0, (p + 1) / 2] where the iteration converges, each of them
    moving closer to 1 at every step, so the error ||M_k - I||_F decreases in exact arithmetic. The iteration stops
    when the error is <= tolerance, after max_iterations, or when it stops decreasing once below 1 (the quadratic
    phase, where only rounding can stall it; far from convergence tiny eigenvalues grow by a factor of about
    (1 + 1/p)^p per step, a change float32 may not resolve in the error, so there it goes on).
    """
    identity = torch.eye(matrix.shape[0], dtype=matrix.dtype, device=matrix.device)
    ridged = matrix + epsilon * identity
    z = (1.0 + root) / (2.0 * torch.linalg.matrix_norm(ridged))
    x = z.pow(1.0 / root) * identity
    m = z * ridged
    error = torch.linalg.matrix_norm(m - identity)
    for _ in range(max_iterations):
        if error <= tolerance:
            break
        t = ((root + 1) * identity - m) / root
        next_m = torch.linalg.matrix_power(t, root) @ m
        next_error = torch.linalg.matrix_norm(next_m - identity)
        if next_error >= error and error < 1.0:
            break
        x, m, error = x @ t, next_m, next_error
    return x


def matrix_inverse_root(matrix: Tensor, root: int, epsilon: float, method: RootInverseMethod,
                        compute_dtype: torch.dtype, newton_max_iterations: int = 100,
                        newton_tolerance: float = 1e-6) -> Tensor:
    """(A + eps I)^(-1/p) computed in `compute_dtype` by `method`, returned in A's dtype."""
    work = matrix.to(compute_dtype)
    if method is RootInverseMethod.EIGEN:
        result = matrix_inverse_root_eigen(work, root, epsilon)
    else:
        result = matrix_inverse_root_newton(work, root, epsilon, newton_max_iterations, newton_tolerance)
    return result.to(matrix.dtype)
