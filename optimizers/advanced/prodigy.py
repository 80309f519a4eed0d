"""Prodigy members of the advanced family: Prodigy_Adv (Adam direction) and Prodigy_Lion_Adv (Lion direction), both
with Prodigy's D-adaptation of the step size (Mishchenko & Defazio 2023, "Prodigy: An Expeditiously Adaptive
Parameter-Free Learner", Algorithm 4 as in the reference package prodigyopt)."""
from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.distributed.tensor import DTensor

from optimizers.advanced.base import (AdvancedOptimizer, UpdateResult, check_ademamix_options, check_common_options,
                                      check_option)
from optimizers.advanced.factored import Moment
from optimizers.advanced.features import Features
from optimizers.advanced.sharding import (ShardReducer, local_tensor, per_shard_state, read_prefix, shard_groups,
                                          write_prefix)
from optimizers.advanced.transforms import lion_direction_, normalize


def check_prodigy_options(optimizer: str, d0: float, d_coef: float, growth_rate: float, beta3, slice_p: int) -> None:
    check_option(optimizer, "d0", d0, d0 > 0.0, "> 0")
    check_option(optimizer, "d_coef", d_coef, d_coef > 0.0, "> 0")
    check_option(optimizer, "growth_rate", growth_rate, growth_rate >= 1.0, ">= 1 (inf for unbounded growth)")
    check_option(optimizer, "beta3", beta3, beta3 is None or 0.0 <= beta3 < 1.0, "None (sqrt(beta2)) or in [0, 1)")
    check_option(optimizer, "slice_p", slice_p, isinstance(slice_p, int) and slice_p >= 1, "an integer >= 1")


# D-adaptation statistics of one parameter (sliced to every slice_p-th entry), with dlr = d lr:
#   numerator   += (d / d0) dlr <g, p0 - p>
#   s           <- beta3 s + (d / d0) dlr g        (safeguard_warmup: (d / d0) d g)
#   denominator += |s|_1
# and once per step:  r = beta3 r_prev + numerator;  d_hat = d_coef r / denominator;
#   d <- max(d, d_hat) while d = d0;  d_max <- max(d_max, d_hat);  d <- min(d_max, d growth_rate)
class DAdaptation(AdvancedOptimizer):
    """Shared D-adaptation. The estimate d, its running numerator and the step count k live in every param group
    (identical values, so they are saved by state_dict and survive load_state_dict); d0, d_coef, growth_rate,
    beta3, slice_p, safeguard_warmup and use_bias_correction are read from the first group. Unlike prodigyopt, groups
    may have different learning rates (each group's steps and statistics use its own dlr = d lr).

    Ordering: parameters are updated with the d of the previous step and d is re-estimated after all of them (so
    that each parameter can be updated in its own backward hook). prodigyopt re-estimates d before the updates but
    still steps with the previous d; the only difference is that its denominator sqrt(v) + eps d uses the new d.
    State per parameter adds `s` and `p0` (the initial parameter, sliced; a scalar 0 when a plain parameter started
    all zero), both over the local shard (`per_shard_state` buffers). With slice_p > 1 a sharded parameter samples
    every slice_p-th entry of each shard, a different (equally valid) subsample than the unsharded tensor's."""

    def __init__(self, params, defaults: dict, features: Features):
        super().__init__(params, defaults, features)
        # One running (numerator, denominator) pair per set of shard groups, reduced once per step, in a fixed order
        # (the same on every rank).
        self._d_sums: dict[tuple, Tensor] = {}
        for group in self.param_groups:
            for param in group["params"]:
                key = shard_groups(param)
                if key not in self._d_sums:
                    self._d_sums[key] = torch.zeros(2, dtype=torch.float64, device=local_tensor(param).device)

    def _init_state(self, param: Tensor, local: Tensor, state: dict, group: dict) -> None:
        super()._init_state(param, local, state, group)
        sliced = self._sliced(local)
        if isinstance(param, DTensor) or local.any():
            state["s"], state["p0"] = per_shard_state(param, [sliced.numel()] * 2, [torch.float32] * 2)
            write_prefix(state, "p0", sliced.float())
        else:
            # A parameter that starts all zero (zero-initialized projections) needs no copy of its start.
            state["s"] = per_shard_state(param, [sliced.numel()], [torch.float32])[0]
            state["p0"] = torch.zeros((), device=local.device)

    def _sliced(self, tensor: Tensor) -> Tensor:
        return tensor.detach().flatten()[::self.param_groups[0]["slice_p"]]

    def _prodigy_beta3(self) -> float:
        first = self.param_groups[0]
        return first["beta3"] if first["beta3"] is not None else math.sqrt(first["betas"][1])

    def _dlr(self, group: dict) -> float:
        first = self.param_groups[0]
        dlr = group["d"] * group["lr"]
        if first["use_bias_correction"]:
            beta1, beta2 = first["betas"]
            k = first["k"] + 1
            dlr *= math.sqrt(1.0 - beta2 ** k) / (1.0 - beta1 ** k)
        return dlr

    def _accumulate_d_statistics(self, param: Tensor, local: Tensor, grad: Tensor, state: dict, group: dict,
                                 dlr: float) -> None:
        first = self.param_groups[0]
        d, d0 = group["d"], first["d0"]
        sliced_grad, sliced_param = self._sliced(grad), self._sliced(local).float()
        p0 = state["p0"] if state["p0"].ndim == 0 else read_prefix(state, "p0", sliced_grad.numel()).float()
        numerator = (d / d0) * dlr * torch.dot(sliced_grad, p0 - sliced_param)
        weight = (d / d0) * d if first["safeguard_warmup"] else (d / d0) * dlr
        s = read_prefix(state, "s", sliced_grad.numel())
        s.mul_(self._prodigy_beta3()).add_(sliced_grad, alpha=weight)
        sums = self._d_sums[shard_groups(param)]
        sums[0] += numerator.double()
        sums[1] += s.abs().sum().double()

    def _finish_step(self) -> None:
        totals = torch.zeros(2, dtype=torch.float64)
        for key, sums in self._d_sums.items():
            totals += ShardReducer(key)(sums.clone()).cpu()
            sums.zero_()
        numerator, denominator = totals.tolist()
        if denominator == 0.0:
            return  # no gradient this step (or all zero): nothing to adapt
        first = self.param_groups[0]
        numerator += self._prodigy_beta3() * first["d_numerator"]
        d, d_max = first["d"], first["d_max"]
        d_hat = first["d_coef"] * numerator / denominator
        if d == first["d0"]:
            d = max(d, d_hat)
        d_max = max(d_max, d_hat)
        d = min(d_max, d * first["growth_rate"])
        for group in self.param_groups:
            group.update(d=d, d_max=d_max, d_numerator=numerator, k=group["k"] + 1)


class Prodigy_Adv(DAdaptation):
    """Prodigy with an Adam direction (equal to prodigyopt.Prodigy, decoupled weight decay, with every feature off;
    see DAdaptation for the ordering of the d update). Use lr = 1 (a multiplier of the adapted step size d).

        m <- beta1 m + (1 - beta1) d g;   v <- beta2 v + (1 - beta2) d^2 g^2
        u = (m [+ alpha_t m_slow]) / (sqrt(v) + d eps)    [or (4/pi) atan2(., sqrt(v)) with use_atan2]
        p <- p (1 - dlr wd) - dlr u,      dlr = d lr
    State: step, exp_avg (beta1 > 0), exp_avg_sq, exp_avg_slow (AdEMAMix, an EMA of d g), s, p0.
    """
    SUPPORTED_FEATURES = frozenset(Features.names())

    def __init__(self, params, lr: float = 1.0, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, beta3: float | None = None, d0: float = 1e-6, d_coef: float = 1.0,
                 growth_rate: float = float("inf"), safeguard_warmup: bool = False, use_bias_correction: bool = False,
                 slice_p: int = 11, alpha: float = 5.0, beta3_ema: float = 0.9999, ademamix_warmup_steps: int = 0,
                 *, factored: bool = False, use_AdEMAMix: bool = False, orthogonal_gradient: bool = False,
                 cautious_mask: bool = False, grams: bool = False, use_atan2: bool = False,
                 stochastic_rounding: bool = False):
        name = type(self).__name__
        check_common_options(name, lr, betas, weight_decay)
        check_option(name, "eps", eps, eps >= 0.0, ">= 0")
        check_prodigy_options(name, d0, d_coef, growth_rate, beta3, slice_p)
        check_ademamix_options(name, betas[0], alpha, beta3_ema, ademamix_warmup_steps)
        features = Features.pick(locals())
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, beta3=beta3, d=d0, d0=d0,
                        d_max=d0, d_numerator=0.0, d_coef=d_coef, growth_rate=growth_rate, k=0,
                        safeguard_warmup=safeguard_warmup, use_bias_correction=use_bias_correction, slice_p=slice_p,
                        alpha=alpha, beta3_ema=beta3_ema, ademamix_warmup_steps=ademamix_warmup_steps)
        super().__init__(params, defaults, features)
        self._first = Moment("exp_avg", signed=True, factored=factored)
        self._second = Moment("exp_avg_sq", signed=False, factored=factored)

    def _moments(self, group: dict) -> list[Moment]:
        first = [self._first] if group["betas"][0] > 0.0 else []
        return first + [self._second] + self._slow_moments()

    def _direction(self, param: Tensor, local: Tensor, grad: Tensor, state: dict, group: dict,
                   reducer: ShardReducer) -> UpdateResult:
        beta1, beta2 = group["betas"]
        d, dlr = group["d"], self._dlr(group)
        self._accumulate_d_statistics(param, local, grad, state, group, dlr)
        second = self._second.load(state, grad.shape)
        second.mul_(beta2).addcmul_(grad, grad, value=d * d * (1.0 - beta2))
        denominator = second.sqrt()
        self._second.store(state, second)
        if beta1 > 0.0:
            first = self._first.load(state, grad.shape)
            first.mul_(beta1).add_(grad, alpha=d * (1.0 - beta1))
            numerator = first.clone()
            self._first.store(state, first)
        else:
            numerator = grad * d
        numerator = self._add_slow_momentum(state, group, numerator, grad, state["step"], source_scale=d)
        update = normalize(numerator, denominator, d * group["eps"], self.features.use_atan2)
        return self._shape_update(update, grad, reducer), dlr, dlr * group["weight_decay"]


class Prodigy_Lion_Adv(DAdaptation):
    """Lion with Prodigy's D-adaptation: the momentum tracks d g and the sign step has size dlr = d lr. Use lr = 1.

        u = sign(beta1 m + (1 - beta1) d g);   m <- beta2 m + (1 - beta2) d g
        p <- p (1 - dlr wd) - dlr u
    While d stays at d0 (e.g. with a tiny d_coef) this is Lion with learning rate d0 lr (the sign ignores the
    scale of d g). State: step, exp_avg, s, p0.
    """
    SUPPORTED_FEATURES = frozenset({"factored", "orthogonal_gradient", "cautious_mask", "stochastic_rounding"})

    def __init__(self, params, lr: float = 1.0, betas: tuple[float, float] = (0.9, 0.99),
                 weight_decay: float = 0.0, beta3: float | None = None, d0: float = 1e-6, d_coef: float = 1.0,
                 growth_rate: float = float("inf"), safeguard_warmup: bool = False, slice_p: int = 11, *,
                 factored: bool = False, use_AdEMAMix: bool = False, orthogonal_gradient: bool = False,
                 cautious_mask: bool = False, grams: bool = False, use_atan2: bool = False,
                 stochastic_rounding: bool = False):
        name = type(self).__name__
        check_common_options(name, lr, betas, weight_decay)
        check_prodigy_options(name, d0, d_coef, growth_rate, beta3, slice_p)
        features = Features.pick(locals())
        defaults = dict(lr=lr, betas=tuple(betas), weight_decay=weight_decay, beta3=beta3, d=d0, d0=d0, d_max=d0,
                        d_numerator=0.0, d_coef=d_coef, growth_rate=growth_rate, k=0,
                        safeguard_warmup=safeguard_warmup, use_bias_correction=False, slice_p=slice_p)
        super().__init__(params, defaults, features)
        self._momentum = Moment("exp_avg", signed=True, factored=factored)

    def _moments(self, group: dict) -> list[Moment]:
        return [self._momentum]

    def _direction(self, param: Tensor, local: Tensor, grad: Tensor, state: dict, group: dict,
                   reducer: ShardReducer) -> UpdateResult:
        beta1, beta2 = group["betas"]
        d, dlr = group["d"], self._dlr(group)
        self._accumulate_d_statistics(param, local, grad, state, group, dlr)
        momentum = self._momentum.load(state, grad.shape)
        update = lion_direction_(momentum, grad * d, beta1, beta2)
        self._momentum.store(state, momentum)
        return self._shape_update(update, grad, reducer), dlr, dlr * group["weight_decay"]
