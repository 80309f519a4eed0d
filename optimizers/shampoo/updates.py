"""Pure update functions of Distributed Shampoo (Gupta et al. 2018; Anil et al. 2020; Shi et al. 2023).

State tensors are updated in place; directions are returned. A block G of order k has one factor per dimension:
a full (d_i, d_i) matrix or a (d_i,) diagonal. Element-wise states may be stored in a lower precision than the
arithmetic (bfloat16 parameters); they are then updated in float32 and written back.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from optimizers.shampoo.config import GraftingType


def _write_back(stored: Tensor, computed: Tensor) -> None:
    if computed is not stored:
        stored.copy_(computed)


@torch.no_grad()
def update_first_moment(exp_avg: Tensor, grad: Tensor, *, beta1: float, step: int, bias_correction: bool,
                        dtype: torch.dtype) -> Tensor:
    """m <- b1 m + (1 - b1) g; returns m / (1 - b1^t) (or m without bias correction) in `dtype`."""
    m = exp_avg.to(dtype)
    m.lerp_(grad.to(dtype), 1.0 - beta1)
    _write_back(exp_avg, m)
    return m / (1.0 - beta1 ** step) if bias_correction else m.clone()


@torch.no_grad()
def update_grafting_state(grafting_state: Tensor, grad: Tensor, *, grafting_type: GraftingType, beta2: float,
                          dtype: torch.dtype) -> None:
    """ADAGRAD: a <- a + g^2.   RMSPROP, ADAM: v <- b2 v + (1 - b2) g^2.   (SGD has no state.)"""
    g = grad.to(dtype)
    v = grafting_state.to(dtype)
    if grafting_type is GraftingType.ADAGRAD:
        v.addcmul_(g, g)
    else:
        v.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
    _write_back(grafting_state, v)


@torch.no_grad()
def grafting_direction(first_moment: Tensor, grafting_state: Tensor | None, *, grafting_type: GraftingType,
                       epsilon: float, beta2: float, step: int) -> Tensor:
    """The grafted method's update direction for the (bias-corrected) first moment m:

        SGD: m     ADAGRAD, RMSPROP: m / (sqrt(v) + eps)     ADAM: m / (sqrt(v / (1 - b2^t)) + eps)
    """
    if grafting_type is GraftingType.SGD:
        return first_moment
    denominator = grafting_state.to(first_moment.dtype).sqrt()
    if grafting_type is GraftingType.ADAM:
        denominator.div_(math.sqrt(1.0 - beta2 ** step))
    return first_moment / denominator.add_(epsilon)


@torch.no_grad()
def update_kronecker_factors(block_grad: Tensor, factors: list[Tensor], diagonal: tuple[bool, ...], *,
                             beta2: float) -> None:
    """For each dimension i of the block, with G_(i) the mode-i unfolding (d_i rows):

        L_i <- b2 L_i + (1 - b2) G_(i) G_(i)^T        (b2 = 1: L_i <- L_i + G_(i) G_(i)^T, AdaGrad-style sums)
        diagonal factor: l_i <- b2 l_i + (1 - b2) diag(G_(i) G_(i)^T)
    """
    g = block_grad.to(factors[0].dtype)
    weight = 1.0 if beta2 == 1.0 else 1.0 - beta2
    for dim, (factor, is_diagonal) in enumerate(zip(factors, diagonal)):
        others = [d for d in range(g.ndim) if d != dim]
        if is_diagonal:
            statistic = g.square().sum(dim=others) if others else g.square()
        else:
            statistic = torch.tensordot(g, g, dims=(others, others))
        if beta2 != 1.0:
            factor.mul_(beta2)
        factor.add_(statistic, alpha=weight)


def diagonal_inverse_root(diagonal: Tensor, root: int, epsilon: float) -> Tensor:
    """(l + eps)^(-1/p) element-wise: the inverse root of a diagonal factor (negative rounding noise clamped to 0)."""
    return (diagonal.clamp(min=0.0) + epsilon).pow(-1.0 / root)


@torch.no_grad()
def apply_kronecker_preconditioner(block: Tensor, root_inverses: list[Tensor], diagonal: tuple[bool, ...]) -> Tensor:
    """G x_1 P_1 x_2 P_2 ... x_k P_k, the mode-i products with the symmetric root inverses P_i = L_i^(-1/(2k))
    (for a matrix: P_1 G P_2). Each contraction consumes dimension 0 and appends the result as the last
    dimension, so after k of them the dimensions are back in order."""
    x = block.to(root_inverses[0].dtype)
    for root_inverse, is_diagonal in zip(root_inverses, diagonal):
        if is_diagonal:
            x = (x * root_inverse.reshape(-1, *([1] * (x.ndim - 1)))).movedim(0, -1)
        else:
            x = torch.tensordot(x, root_inverse, dims=([0], [0]))
    return x


@torch.no_grad()
def graft(direction: Tensor, grafted: Tensor) -> Tensor:
    """Layer-wise grafting: direction * ||grafted||_F / ||direction||_F (zero when the direction is zero)."""
    direction_norm = torch.linalg.vector_norm(direction)
    scale = torch.where(direction_norm > 0, torch.linalg.vector_norm(grafted) / direction_norm, 0.0)
    return direction * scale
