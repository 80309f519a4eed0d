"""Orthogonalizers shared by Muon, NorMuon, Dion2 and NorDion2: each maps a batch of matrices G = U S V^T, shape
(batch, m, n), to (an approximation of) its polar factor U V^T.

- "newton_schulz": Keller Jordan's tuned quintic, the same coefficients every iteration (`ns_steps`,
  `ns_coefficients`). Singular values end in roughly [0.7, 1.2], by design. `ns_coefficients` may instead be one
  (a, b, c) per iteration: `REFERENCE_NS_COEFFICIENTS` is microsoft/dion's schedule (configs/reference).
- "polar_express": Amsel, Persson, Musco & Gower 2025, "The Polar Express" (arXiv 2505.16932): a different minimax
  quintic per iteration, so the singular values reach 1 faster: after 5 steps every singular value above ~1e-2 of
  the largest lies in [0.86, 1.14] (Newton-Schulz: [0.68, 1.20]), at half Newton-Schulz's distance to U V^T.
- any callable f(X, epsilon) -> Tensor taking a (..., m, n) batch: it receives the optimizer's working dtype
  unchanged (no hidden bfloat16 cast), for exact references (an SVD in float64) or custom kernels.

The built-ins iterate on the wide orientation (m <= n, transposing tall inputs), so the Gram matrix X X^T is the
smaller of the two; they run in `ns_dtype` (bfloat16 on CUDA, float32 elsewhere by default).
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Callable, Union

import torch
from torch import Tensor

from optimizers.common.choices import parse_choice

# Quintic coefficients from Keller Jordan's Muon: they maximise the slope at zero so 5 steps suffice.
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
# microsoft/dion's Newton-Schulz (dion/muon.py and dion/newton_schulz_triton.py at 0a059a4, with and without Triton):
# a different quintic in each of its 5 iterations. Its Muon, Dion2, NorMuon and NorDion2 all use it.
REFERENCE_NS_COEFFICIENTS = (
    (4.0848, -6.8946, 2.9270),
    (3.9505, -6.3029, 2.6377),
    (3.7418, -5.5913, 2.3037),
    (2.8769, -3.1427, 1.2046),
    (2.8366, -3.0525, 1.2012),
)
# Polar Express, 5 iterations, computed by the paper's algorithm with safety factor 2e-2 and cushion 2 (the
# safety factor is folded into all but the last polynomial). More iterations repeat the last polynomial.
POLAR_EXPRESS_COEFFICIENTS = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)
# Polar Express scales its input by 1 / (1.02 ||X||_F + eps): the spectral norm then lies safely below 1.
POLAR_EXPRESS_INPUT_SAFETY = 1.02
EPSILON = 1e-7
NS_DTYPES = {None: None, "bfloat16": torch.bfloat16, "float32": torch.float32}

OrthogonalizerFunction = Callable[[Tensor, float], Tensor]


class OrthogonalizerName(str, Enum):
    NEWTON_SCHULZ = "newton_schulz"
    POLAR_EXPRESS = "polar_express"


def _quintic_iterations(x: Tensor, coefficients: list[tuple[float, float, float]]) -> Tensor:
    """For each (a, b, c): A = X X^T, X <- a X + (b A + c A A) X, on the wide orientation of x (batch, m, n), whose
    spectral norm must be <= 1. Returns the same shape and dtype."""
    transposed = x.size(-2) > x.size(-1)
    if transposed:
        x = x.mT
    for a, b, c in coefficients:
        gram = x @ x.mT
        poly = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)
        x = torch.baddbmm(x, poly, x, beta=a)
    return x.mT if transposed else x


def coefficient_schedule(coefficients, steps: int, owner: str = "newton_schulz") -> tuple[tuple[float, ...], ...]:
    """One (a, b, c) per iteration: a single triple repeated `steps` times, or `steps` triples as given."""
    coefficients = tuple(coefficients)
    if len(coefficients) == 3 and all(isinstance(c, (int, float)) for c in coefficients):
        return (tuple(float(c) for c in coefficients),) * steps
    if all(isinstance(t, (list, tuple)) and len(t) == 3 for t in coefficients) and len(coefficients) == steps:
        return tuple(tuple(float(c) for c in t) for t in coefficients)
    raise ValueError(f"{owner}: ns_coefficients must be three numbers (a, b, c) or ns_steps = {steps} such triples "
                     f"(one per iteration), got {coefficients}")


@torch.no_grad()
def newton_schulz(matrices: Tensor, steps: int = 5, coefficients=NS_COEFFICIENTS, dtype: torch.dtype = torch.float32,
                  epsilon: float = EPSILON) -> Tensor:
    """Muon's Newton-Schulz quintic: `steps` iterations of (a, b, c) (the same triple each time, or one triple per
    iteration), input scaled by 1 / max(||G||_F, eps). matrices: (batch, m, n) of any float dtype; returns
    (batch, m, n) in `dtype`."""
    x = matrices.to(dtype)
    x = x / x.norm(dim=(-2, -1), keepdim=True).clamp(min=epsilon)
    return _quintic_iterations(x, list(coefficient_schedule(coefficients, steps)))


@torch.no_grad()
def polar_express(matrices: Tensor, steps: int = 5, dtype: torch.dtype = torch.float32,
                  epsilon: float = EPSILON) -> Tensor:
    """Polar Express (arXiv 2505.16932, Algorithm 1 with the degree-5 minimax polynomials): iteration t applies
    p_t(x) = a_t x + b_t x^3 + c_t x^5 to the singular values. matrices: (batch, m, n); returns (batch, m, n) in
    `dtype`."""
    coefficients = [POLAR_EXPRESS_COEFFICIENTS[min(t, len(POLAR_EXPRESS_COEFFICIENTS) - 1)] for t in range(steps)]
    x = matrices.to(dtype)
    x = x / (POLAR_EXPRESS_INPUT_SAFETY * x.norm(dim=(-2, -1), keepdim=True) + epsilon)
    return _quintic_iterations(x, coefficients)


@dataclass(frozen=True)
class Orthogonalizer:
    """The orthogonalizer an optimizer was configured with, applied to a (batch, m, n) stack.

    function: a built-in name or a callable f(X, epsilon); steps and coefficients: the built-ins' iteration count
    and (Newton-Schulz only) its coefficients, one triple per iteration; dtype: the built-ins' working dtype (None: bfloat16 on CUDA,
    float32 elsewhere)."""
    function: Union[OrthogonalizerName, OrthogonalizerFunction]
    steps: int = 5
    coefficients: tuple[tuple[float, float, float], ...] = (NS_COEFFICIENTS,) * 5
    dtype: torch.dtype | None = None
    epsilon: float = EPSILON

    @classmethod
    def create(cls, owner: str, orthogonalizer: Union[str, OrthogonalizerFunction], ns_steps: int,
               ns_coefficients, ns_dtype: str | None) -> "Orthogonalizer":
        """Validates the constructor options of `owner` (errors name the key and the allowed values)."""
        if ns_steps < 1:
            raise ValueError(f"{owner}: ns_steps must be >= 1, got {ns_steps}")
        schedule = coefficient_schedule(ns_coefficients, ns_steps, owner)
        if ns_dtype not in NS_DTYPES:
            raise ValueError(f"{owner}: ns_dtype={ns_dtype!r} is invalid; allowed: "
                             f"{', '.join(map(str, NS_DTYPES))}")
        function = orthogonalizer if callable(orthogonalizer) else parse_choice(
            OrthogonalizerName, owner, "orthogonalizer", orthogonalizer)
        return cls(function, ns_steps, schedule, NS_DTYPES[ns_dtype])

    def working_dtype(self, t: Tensor) -> torch.dtype:
        """The dtype matrices travel and are orthogonalized in: the input's own dtype for a callable."""
        if callable(self.function):
            return t.dtype
        if self.dtype is not None:
            return self.dtype
        return torch.bfloat16 if t.is_cuda else torch.float32

    def __call__(self, matrices: Tensor) -> Tensor:
        """matrices: (batch, m, n) already in `working_dtype`; returns (batch, m, n)."""
        if callable(self.function):
            return self.function(matrices, self.epsilon)
        dtype = self.working_dtype(matrices)
        if self.function is OrthogonalizerName.POLAR_EXPRESS:
            return polar_express(matrices, self.steps, dtype, self.epsilon)
        return newton_schulz(matrices, self.steps, self.coefficients, dtype, self.epsilon)

