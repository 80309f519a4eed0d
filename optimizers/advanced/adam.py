"""Adam-style members of the advanced family: Adam_Adv (AdamW), Adopt_Adv (ADOPT) and Simplified_AdEMAMix."""
from __future__ import annotations

import math

from torch import Tensor

from optimizers.advanced.base import (AdvancedOptimizer, UpdateResult, check_ademamix_options, check_common_options,
                                      check_option)
from optimizers.advanced.factored import Moment
from optimizers.advanced.features import Features
from optimizers.advanced.sharding import ShardReducer
from optimizers.advanced.transforms import adopt_normalize, half_life_warmup, normalize

ALL_FEATURES = frozenset(Features.names())


class Adam_Adv(AdvancedOptimizer):
    """AdamW (equal to torch.optim.AdamW with every feature off) with every feature of the family.

        m <- beta1 m + (1 - beta1) g;   v <- beta2 v + (1 - beta2) g^2
        n = m / (1 - beta1^t)  [+ alpha_t m_slow with use_AdEMAMix]
        u = n / (sqrt(v / (1 - beta2^t)) + eps)      [or (4/pi) atan2(n, sqrt(v / (1 - beta2^t))) with use_atan2]
        p <- p (1 - lr wd) - lr u
    beta1 = 0 keeps no first moment (n = g). State: step, exp_avg (beta1 > 0), exp_avg_sq, exp_avg_slow (AdEMAMix).
    AdEMAMix (Pagliardini et al. 2024): alpha ~ 5, beta3_ema ~ 0.9999, ademamix_warmup_steps ~ the run length.
    """
    SUPPORTED_FEATURES = ALL_FEATURES
    ELEMENTWISE_DIRECTION = True

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, alpha: float = 5.0, beta3_ema: float = 0.9999,
                 ademamix_warmup_steps: int = 0, *, factored: bool = False, use_AdEMAMix: bool = False,
                 orthogonal_gradient: bool = False, cautious_mask: bool = False, grams: bool = False,
                 use_atan2: bool = False, stochastic_rounding: bool = False):
        name = type(self).__name__
        check_common_options(name, lr, betas, weight_decay)
        check_option(name, "eps", eps, eps >= 0.0, ">= 0")
        check_ademamix_options(name, betas[0], alpha, beta3_ema, ademamix_warmup_steps)
        features = Features.pick(locals())
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, alpha=alpha,
                        beta3_ema=beta3_ema, ademamix_warmup_steps=ademamix_warmup_steps)
        super().__init__(params, defaults, features)
        self._first = Moment("exp_avg", signed=True, factored=factored)
        self._second = Moment("exp_avg_sq", signed=False, factored=factored)

    def _moments(self, group: dict) -> list[Moment]:
        first = [self._first] if group["betas"][0] > 0.0 else []
        return first + [self._second] + self._slow_moments()

    def _direction(self, param: Tensor, local: Tensor, grad: Tensor, state: dict, group: dict,
                   reducer: ShardReducer) -> UpdateResult:
        beta1, beta2 = group["betas"]
        step = state["step"]
        second = self._second.load(state, grad.shape)
        second.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
        denominator = second.sqrt().div_(math.sqrt(1.0 - beta2 ** step))
        self._second.store(state, second)
        if beta1 > 0.0:
            first = self._first.load(state, grad.shape)
            first.lerp_(grad, 1.0 - beta1)
            numerator = first / (1.0 - beta1 ** step)
            self._first.store(state, first)
        else:
            numerator = grad.clone()
        numerator = self._add_slow_momentum(state, group, numerator, grad, step)
        update = normalize(numerator, denominator, group["eps"], self.features.use_atan2)
        return self._shape_update(update, grad, reducer), group["lr"], group["lr"] * group["weight_decay"]


class Adopt_Adv(Adam_Adv):
    """ADOPT (Taniguchi et al. 2024, "ADOPT: Modified Adam Can Converge with Any beta2", Algorithm 1 with clipping):
    the gradient is normalized by the previous second moment, before the momentum.

        step 1:  v <- g^2 (initialization only, the parameter is unchanged)
        step t + 1, t = 1, 2, ...:
            n = clip(g / max(sqrt(v), eps), t^(1/4))      [or (4/pi) atan2(g, sqrt(v)) with use_atan2]
            m <- beta1 m + (1 - beta1) n                  [+ alpha_t m_slow, m_slow an EMA of n, with use_AdEMAMix]
            p <- p (1 - lr wd) - lr m;     v <- beta2 v + (1 - beta2) g^2
    beta1 = 0 keeps no first moment (m = n). State: step, exp_avg (beta1 > 0), exp_avg_sq, exp_avg_slow (AdEMAMix).
    """
    SUPPORTED_FEATURES = ALL_FEATURES

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.9999), eps: float = 1e-6,
                 weight_decay: float = 0.0, alpha: float = 5.0, beta3_ema: float = 0.9999,
                 ademamix_warmup_steps: int = 0, *, factored: bool = False, use_AdEMAMix: bool = False,
                 orthogonal_gradient: bool = False, cautious_mask: bool = False, grams: bool = False,
                 use_atan2: bool = False, stochastic_rounding: bool = False):
        # Adam_Adv's options and states with other defaults; eps must be positive here.
        check_option(type(self).__name__, "eps", eps, eps > 0.0, "> 0 (it bounds the normalized gradient)")
        super().__init__(params, lr, betas, eps, weight_decay, alpha, beta3_ema, ademamix_warmup_steps,
                         factored=factored, use_AdEMAMix=use_AdEMAMix, orthogonal_gradient=orthogonal_gradient,
                         cautious_mask=cautious_mask, grams=grams, use_atan2=use_atan2,
                         stochastic_rounding=stochastic_rounding)

    def _direction(self, param: Tensor, local: Tensor, grad: Tensor, state: dict, group: dict,
                   reducer: ShardReducer) -> UpdateResult:
        beta1, beta2 = group["betas"]
        second = self._second.load(state, grad.shape)
        if state["step"] == 1:
            second.addcmul_(grad, grad)
            self._second.store(state, second)
            return None
        update_count = state["step"] - 1
        normalized = adopt_normalize(grad, second, group["eps"], update_count, self.features.use_atan2)
        second.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
        self._second.store(state, second)
        if beta1 > 0.0:
            first = self._first.load(state, grad.shape)
            first.lerp_(normalized, 1.0 - beta1)
            numerator = first.clone()
            self._first.store(state, first)
        else:
            numerator = normalized.clone()
        update = self._add_slow_momentum(state, group, numerator, normalized, update_count)
        return self._shape_update(update, grad, reducer), group["lr"], group["lr"] * group["weight_decay"]


class Simplified_AdEMAMix(AdvancedOptimizer):
    """Simplified AdEMAMix (Morwani et al. 2025, "Connections between Schedule-Free Optimizers, AdEMAMix, and
    Accelerated SGD Variants"): one accumulator momentum (not an EMA) plus a weighted current gradient.

        beta1_t = beta1 warmed up from min_beta1 by half-life (beta1_warmup_steps > 0), else beta1
        m <- beta1_t m + g;   v <- beta2 v + (1 - beta2) g^2
        p <- p (1 - lr wd) - lr (alpha g + m) / (sqrt(v / (1 - beta2^t)) + eps)

    Learning rate: m sums about 1 / (1 - beta1) gradients, so with beta1 = 0.99 its updates are ~100x larger than
    Adam's; use a learning rate ~100x smaller than Adam's (the authors suggest lr_adam sqrt((1 - min_beta1)(1 -
    beta1)) with a beta1 warmup). alpha: ~100 for small batches, ~0 for large ones. State: step, exp_avg, exp_avg_sq.
    """
    SUPPORTED_FEATURES = frozenset({"factored", "orthogonal_gradient", "stochastic_rounding"})
    ELEMENTWISE_DIRECTION = True

    def __init__(self, params, lr: float = 1e-5, betas: tuple[float, float] = (0.99, 0.95), eps: float = 1e-8,
                 weight_decay: float = 0.0, alpha: float = 0.0, beta1_warmup_steps: int = 0,
                 min_beta1: float = 0.9, *, factored: bool = False, use_AdEMAMix: bool = False,
                 orthogonal_gradient: bool = False, cautious_mask: bool = False, grams: bool = False,
                 use_atan2: bool = False, stochastic_rounding: bool = False):
        name = type(self).__name__
        check_common_options(name, lr, betas, weight_decay)
        check_option(name, "eps", eps, eps >= 0.0, ">= 0")
        check_option(name, "alpha", alpha, alpha >= 0.0, ">= 0")
        check_option(name, "beta1_warmup_steps", beta1_warmup_steps,
                     isinstance(beta1_warmup_steps, int) and beta1_warmup_steps >= 0, "an integer >= 0")
        check_option(name, "min_beta1", min_beta1, 0.0 < min_beta1 < 1.0, "in (0, 1)")
        features = Features.pick(locals())
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, alpha=alpha,
                        beta1_warmup_steps=beta1_warmup_steps, min_beta1=min_beta1)
        super().__init__(params, defaults, features)
        self._first = Moment("exp_avg", signed=True, factored=factored)
        self._second = Moment("exp_avg_sq", signed=False, factored=factored)

    def _moments(self, group: dict) -> list[Moment]:
        return [self._first, self._second]

    def _direction(self, param: Tensor, local: Tensor, grad: Tensor, state: dict, group: dict,
                   reducer: ShardReducer) -> UpdateResult:
        beta1_final, beta2 = group["betas"]
        step = state["step"]
        beta1 = half_life_warmup(group["min_beta1"], beta1_final, step, group["beta1_warmup_steps"])
        first = self._first.load(state, grad.shape)
        first.mul_(beta1).add_(grad)
        numerator = first.add(grad, alpha=group["alpha"])
        self._first.store(state, first)
        second = self._second.load(state, grad.shape)
        second.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
        denominator = second.sqrt().div_(math.sqrt(1.0 - beta2 ** step))
        self._second.store(state, second)
        update = normalize(numerator, denominator, group["eps"], use_atan2=False)
        return update, group["lr"], group["lr"] * group["weight_decay"]
