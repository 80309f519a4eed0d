"""Pure element-wise transforms shared by the advanced optimizer family, each written once.

Tensors are float32 working copies of one parameter's local shard. Functions that need a sum over the whole
(possibly sharded) tensor take `shard_sum`, a callable that sums a small tensor of partial sums over the shards of
that parameter in place and returns it (the identity for a plain tensor), so the result is the same as on the full
tensor.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

ShardSum = Callable[[Tensor], Tensor]

# Floor for squared norms and dot products: far below any float32 gradient scale, above float32's smallest normal.
_TINY = 1e-30
# Floor for the cautious mask's kept fraction: a step where (almost) nothing agrees is at most 1000x amplified.
_MIN_KEPT_FRACTION = 1e-3
# atan2 scale: a ratio m / sqrt(v) of 1 (a typical Adam update entry) maps to 1, and |update| <= 2.
ATAN2_SCALE = 4.0 / math.pi


def no_shards(partial_sums: Tensor) -> Tensor:
    return partial_sums


# OrthoGrad (Prieto et al. 2025, "Grokking at the Edge of Numerical Stability"), on the flattened tensor:
#   g_perp = g - (<w, g> / <w, w>) w;   g_out = g_perp * ||g|| / ||g_perp||
def orthogonalize_gradient(weight: Tensor, grad: Tensor, shard_sum: ShardSum = no_shards) -> Tensor:
    """Component of `grad` orthogonal to `weight`, rescaled to the norm of `grad`. Returns a new tensor; a zero
    weight leaves the gradient unchanged."""
    sums = shard_sum(torch.stack([(weight * grad).sum(), (weight * weight).sum(), (grad * grad).sum()]))
    projection = sums[0] / sums[1].clamp(min=_TINY)
    orthogonal = grad - projection * weight
    orthogonal_norm_sq = shard_sum((orthogonal * orthogonal).sum().reshape(1))[0]
    return orthogonal.mul_((sums[2] / orthogonal_norm_sq.clamp(min=_TINY)).sqrt())


# Cautious optimizers (Liang et al. 2024): keep an update entry only where it agrees in sign with the gradient,
#   u <- u * 1[u g > 0] / max(mean(1[u g > 0]), 1e-3)
# so that the mean step size is preserved.
def cautious_mask_(update: Tensor, grad: Tensor, shard_sum: ShardSum = no_shards) -> Tensor:
    """Masks `update` in place and returns it."""
    keep = (update * grad > 0).to(update.dtype)
    counts = shard_sum(torch.stack([keep.sum(), torch.tensor(float(keep.numel()), device=keep.device)]))
    kept_fraction = (counts[0] / counts[1]).clamp(min=_MIN_KEPT_FRACTION)
    return update.mul_(keep).div_(kept_fraction)


# Grams (Cao et al. 2024, "Grams: Gradient Descent with Adaptive Momentum Scaling"):  u <- sign(g) |u|
def grams_(update: Tensor, grad: Tensor) -> Tensor:
    """Replaces the sign of `update` by the sign of `grad` in place and returns it."""
    return update.abs_().mul_(grad.sign())


# Adam's normalization, or its bounded atan2 variant (Everett et al. 2024, "Scaling Exponents Across
# Parameterizations and Optimizers"), which needs no epsilon:
#   u = n / (d + eps)          or          u = (4 / pi) atan2(n, d)
def normalize(numerator: Tensor, denominator: Tensor, epsilon: float, use_atan2: bool) -> Tensor:
    """`denominator` is a root second moment (>= 0). Returns a new tensor."""
    if use_atan2:
        return torch.atan2(numerator, denominator).mul_(ATAN2_SCALE)
    return numerator / (denominator + epsilon)


# AdEMAMix (Pagliardini et al. 2024, "The AdEMAMix Optimizer", eq. 4 schedules) over T warmup steps:
#   alpha_t = min(t alpha / T, alpha)
#   beta3_t = min(exp(ln(beta1) ln(beta3) / ((1 - t/T) ln(beta3) + (t/T) ln(beta1))), beta3)
# i.e. alpha grows linearly and beta3's half-life grows linearly from beta1's to beta3's.
def ademamix_alpha(alpha: float, step: int, warmup_steps: int) -> float:
    if warmup_steps <= 0:
        return alpha
    return min(step * alpha / warmup_steps, alpha)


def ademamix_beta3(beta1: float, beta3: float, step: int, warmup_steps: int) -> float:
    """Requires 0 < beta1 when warmup_steps > 0 (checked by the optimizers)."""
    if warmup_steps <= 0 or step >= warmup_steps:
        return beta3
    fraction = step / warmup_steps
    log_beta1, log_beta3 = math.log(beta1), math.log(beta3)
    return min(math.exp(log_beta1 * log_beta3 / ((1.0 - fraction) * log_beta3 + fraction * log_beta1)), beta3)


# Simplified AdEMAMix's beta1 warmup (Morwani et al. 2025): the half-life h(beta) = ln(0.5) / ln(beta) - 1 grows
# linearly from h(min_beta1) to h(beta1) over the warmup, and beta = 0.5 ** (1 / (h + 1)).
def half_life_warmup(beta_start: float, beta_end: float, step: int, warmup_steps: int) -> float:
    if warmup_steps <= 0 or step >= warmup_steps:
        return beta_end
    fraction = step / warmup_steps

    def half_life(beta: float) -> float:
        return math.log(0.5) / math.log(beta + 1e-8) - 1.0
    mixed = (1.0 - fraction) * half_life(beta_start) + fraction * half_life(beta_end)
    return 0.5 ** (1.0 / (mixed + 1.0))


# ADOPT (Taniguchi et al. 2024, Algorithm 1 with clipping): the gradient is normalized by the *previous* second
# moment and clipped,   n_t = clip(g_t / max(sqrt(v_{t-1}), eps), t^(1/4)),   t = 1, 2, ... the update count;
# with atan2:           n_t = (4 / pi) atan2(g_t, sqrt(v_{t-1}))   (bounded, no eps, no clip)
def adopt_normalize(grad: Tensor, previous_second_moment: Tensor, epsilon: float, update_count: int,
                    use_atan2: bool) -> Tensor:
    root = previous_second_moment.sqrt()
    if use_atan2:
        return torch.atan2(grad, root).mul_(ATAN2_SCALE)
    clip = update_count ** 0.25
    return (grad / root.clamp_(min=epsilon)).clamp_(-clip, clip)


# Stochastic rounding to bfloat16: add uniform noise below bf16's last mantissa bit to the float32 bit pattern and
# truncate. A value x between neighbours a < x < b rounds to b with probability (x - a) / (b - a), so E[round(x)] = x.
def copy_stochastic_(target: Tensor, source: Tensor) -> Tensor:
    """target (bfloat16) <- stochastically rounded source (float32), in place."""
    bits = source.contiguous().view(torch.int32)
    noise = torch.randint(0, 1 << 16, bits.shape, dtype=torch.int32, device=bits.device)
    rounded = bits.add(noise).bitwise_and_(-65536)  # -65536 = 0xFFFF0000: keep sign, exponent, 7 mantissa bits
    return target.copy_(rounded.view(torch.float32))


# Lion (Chen et al. 2023, Algorithm 2):  u = sign(beta1 m + (1 - beta1) g);  m <- beta2 m + (1 - beta2) g
def lion_direction_(momentum: Tensor, grad: Tensor, beta1: float, beta2: float) -> Tensor:
    """Updates `momentum` in place and returns the sign update (a new tensor)."""
    update = momentum.lerp(grad, 1.0 - beta1).sign_()
    momentum.lerp_(grad, 1.0 - beta2)
    return update
