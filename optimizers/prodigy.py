"""Prodigy (Mishchenko & Defazio 2024, "Prodigy: An Expeditiously Adaptive Parameter-Free Learner"): Adam whose
step size d is estimated on the fly (D-adaptation), so `lr` stays at 1.0 and only scales the estimate.

One d is shared by all param groups. The estimate is

    d_hat = d_coef * sum_k (d_k / d0) dlr_k <g_k, x_0 - x_k>  /  || s_k ||_1,   s_k = beta3 s_{k-1} + (d_k/d0) dlr_k g_k

and d grows monotonically (never faster than `growth_rate` per step). Equal to the authors' `prodigyopt.Prodigy`
when every group has the same lr; unlike it, groups may use different lrs (e.g. the LM head's 1/sqrt(d) scaling):
each group's step is d * its lr, and its statistics enter the estimate with that step size.

Under torch.distributed with sharded (DTensor) parameters the two sums of the estimate are all-reduced, each local
contribution weighted by 1 / (number of ranks holding the same elements), so replicated and sharded parameters
count once. `slice_p` > 1 keeps statistics on every slice_p-th element only (of the local shard).

Typical settings: lr 1.0, betas (0.9, 0.99), weight decay 0.1 (decoupled), `schedule: constant` with no warmup and
`safeguard_warmup` + `use_bias_correction` on, or a schedule with warmup; d_coef 0.5-2 is the knob to tune.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.tensor import DTensor, Shard
from torch.optim import Optimizer

from optimizers.common import foreach_tiles
from optimizers.common.closure import closure_loss
from optimizers.common.foreach_tiles import tiled
from optimizers.common.param_groups import CheckedParamGroups
from optimizers.common.tensors import local_tensor


@torch.no_grad()
@tiled(3)
def prodigy_moments_update(grads: list[Tensor], exp_avgs: list[Tensor] | None, exp_avg_sqs: list[Tensor], *,
                           d: float, beta1: float, beta2: float) -> None:
    """Moments of the d-scaled gradient:  m <- beta1 m + d (1 - beta1) g;   v <- beta2 v + d^2 (1 - beta2) g^2."""
    if exp_avgs is not None:
        torch._foreach_mul_(exp_avgs, beta1)
        torch._foreach_add_(exp_avgs, grads, alpha=d * (1.0 - beta1))
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=d * d * (1.0 - beta2))


@torch.no_grad()
@tiled(3)
def prodigy_apply_update(params: list[Tensor], numerators: list[Tensor], exp_avg_sqs: list[Tensor], *, dlr: float,
                         d: float, epsilon: float, decoupled_weight_decay: float) -> None:
    """p <- p - wd dlr p;   p <- p - dlr m / (sqrt(v) + d eps)     (numerators: m, or d g when beta1 = 0)."""
    denominators = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_add_(denominators, d * epsilon)
    if decoupled_weight_decay != 0.0:
        torch._foreach_add_(params, params, alpha=-decoupled_weight_decay * dlr)
    torch._foreach_addcdiv_(params, numerators, denominators, value=-dlr)


def prodigy_d_estimate(d: float, d_max: float, d0: float, numerator: float, denominator: float, *, d_coef: float,
                       growth_rate: float) -> tuple[float, float, float]:
    """d_hat = d_coef numerator / denominator; d jumps to d_hat the first time it grows, then d = min(d_max,
    d growth_rate) with d_max = max(d_max, d_hat). Returns (d, d_max, d_hat)."""
    d_hat = d_coef * numerator / denominator
    if d == d0:
        d = max(d, d_hat)
    d_max = max(d_max, d_hat)
    return min(d_max, d * growth_rate), d_max, d_hat


def _share_of_world(p: Tensor, world: int) -> float:
    """1 / (number of ranks that hold the same elements of p): plain tensors are replicated on every rank."""
    if not isinstance(p, DTensor):
        return 1.0 / world
    shards = math.prod(p.device_mesh.size(i) for i, placement in enumerate(p.placements)
                       if isinstance(placement, Shard))
    return shards / world


class Prodigy(CheckedParamGroups, Optimizer):
    """Prodigy. State per parameter: "step", "s" and "p0" (flattened, every slice_p-th element; p0 is a scalar 0
    when the initial parameter is all zeros), "exp_avg" (if beta1 > 0) and "exp_avg_sq". Group keys (identical in
    every group): d, d_max, d_hat, d_numerator, d_denom, k (steps), so the estimate survives a state_dict round trip.

    beta3: EMA of the estimate's statistics (None: sqrt(beta2)). decouple: AdamW-style weight decay (else L2 added
    to the gradient). use_bias_correction: Adam's bias correction of the step. safeguard_warmup: leave lr out of
    the s statistic (stable under LR warmup).
    """

    def __init__(self, params, lr: float = 1.0, betas: tuple[float, float] = (0.9, 0.999), beta3: float | None = None,
                 eps: float = 1e-8, weight_decay: float = 0.0, decouple: bool = True,
                 use_bias_correction: bool = False, safeguard_warmup: bool = False, d0: float = 1e-6,
                 d_coef: float = 1.0, growth_rate: float = float("inf"), slice_p: int = 1):
        if lr <= 0.0:
            raise ValueError(f"Prodigy: lr must be > 0, got {lr}")
        if d0 <= 0.0:
            raise ValueError(f"Prodigy: d0 must be > 0, got {d0}")
        if eps <= 0.0:
            raise ValueError(f"Prodigy: eps must be > 0, got {eps}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"Prodigy: betas must lie in [0, 1), got {betas}")
        if growth_rate < 1.0:
            raise ValueError(f"Prodigy: growth_rate must be >= 1, got {growth_rate}")
        if slice_p < 1:
            raise ValueError(f"Prodigy: slice_p must be >= 1, got {slice_p}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), beta3=beta3, eps=eps, weight_decay=weight_decay,
                                      decouple=decouple, use_bias_correction=use_bias_correction,
                                      safeguard_warmup=safeguard_warmup, d0=d0, d_coef=d_coef,
                                      growth_rate=growth_rate, slice_p=slice_p, d=d0, d_max=d0, d_hat=d0,
                                      d_numerator=0.0, d_denom=0.0, k=0))

    def _init_state(self, p: Tensor, slice_p: int, beta1: float) -> dict:
        state = self.state[p]
        if not state:
            local = local_tensor(p.detach())
            sliced = local.reshape(-1)[::slice_p]
            state["step"] = 0
            state["s"] = torch.zeros_like(sliced)
            state["p0"] = sliced.clone() if local.any() else torch.tensor(0, device=p.device, dtype=p.dtype)
            if beta1 > 0.0:
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return state

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure_loss(closure)
        shared = self.param_groups[0]
        beta1, beta2 = shared["betas"]
        beta3 = shared["beta3"] if shared["beta3"] is not None else math.sqrt(beta2)
        k, d, d0 = shared["k"], shared["d"], shared["d0"]
        bias_correction = (math.sqrt(1.0 - beta2 ** (k + 1)) / (1.0 - beta1 ** (k + 1))
                           if shared["use_bias_correction"] else 1.0)
        distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1 and any(
            isinstance(p, DTensor) for g in self.param_groups for p in g["params"])
        world = dist.get_world_size() if distributed else 1

        numerator_terms, denominator_terms, active = [], [], []
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            slice_p, decay, dlr = group["slice_p"], group["weight_decay"], d * group["lr"] * bias_correction
            states = [self._init_state(p, slice_p, beta1) for p in params]
            grads = [local_tensor(p.grad) for p in params]
            if decay != 0.0 and not group["decouple"]:
                grads = torch._foreach_add(grads, [local_tensor(p) for p in params], alpha=decay)
            active.append((group, params, grads, states, dlr))
            if not params or group["lr"] == 0.0:
                continue
            s_scale = (d / d0) * (d if group["safeguard_warmup"] else dlr)
            if slice_p == 1 and not distributed and self._statistics_tileable(params, grads, states, beta1):
                dot, l1_norm = self._tiled_statistics(params, grads, states, d=d, beta1=beta1, beta2=beta2,
                                                      beta3=beta3, s_scale=s_scale)
                numerator_terms.append((d / d0) * dlr * dot)
                denominator_terms.append(l1_norm)
                continue
            sliced_grads = [g.reshape(-1)[::slice_p] for g in grads]
            shares = [_share_of_world(p, world) if distributed else 1.0 for p in params]
            # <g, x0 - x> on the sliced elements, weighted (d / d0) dlr.
            dots = torch.stack([torch.dot(g, s["p0"] - local_tensor(p).reshape(-1)[::slice_p]) * share for g, s, p, share
                                in zip(sliced_grads, states, params, shares)])
            numerator_terms.append((d / d0) * dlr * dots.double().sum())
            prodigy_moments_update(grads, [local_tensor(s["exp_avg"]) for s in states] if beta1 > 0.0 else None,
                                   [local_tensor(s["exp_avg_sq"]) for s in states], d=d, beta1=beta1, beta2=beta2)
            s_list = [s["s"] for s in states]
            torch._foreach_mul_(s_list, beta3)
            torch._foreach_add_(s_list, sliced_grads, alpha=s_scale)
            l1_norms = torch.stack(torch._foreach_norm(s_list, 1)).double()
            denominator_terms.append((l1_norms * torch.tensor(shares, dtype=torch.float64,
                                                              device=l1_norms.device)).sum())
        if not numerator_terms:
            return loss
        sums = torch.stack([torch.stack(numerator_terms).sum(), torch.stack(denominator_terms).sum()])
        if distributed:
            dist.all_reduce(sums)
        delta_numerator, d_denom = sums.tolist()
        if d_denom == 0.0:
            return loss
        d_numerator = shared["d_numerator"] * beta3 + delta_numerator
        d, d_max, d_hat = prodigy_d_estimate(d, shared["d_max"], d0, d_numerator, d_denom, d_coef=shared["d_coef"],
                                             growth_rate=shared["growth_rate"])
        for group, params, grads, states, dlr in active:
            group.update(d=d, d_max=d_max, d_hat=d_hat, d_numerator=d_numerator, d_denom=d_denom, k=group["k"] + 1)
            if not params:
                continue
            for s in states:
                s["step"] += 1
            numerators = ([local_tensor(s["exp_avg"]) for s in states] if beta1 > 0.0
                          else torch._foreach_mul(grads, d))
            prodigy_apply_update([local_tensor(p) for p in params], numerators, [local_tensor(s["exp_avg_sq"]) for s in states],
                                 dlr=dlr, d=d, epsilon=group["eps"],
                                 decoupled_weight_decay=group["weight_decay"] if group["decouple"] else 0.0)
        return loss

    @staticmethod
    def _statistics_tileable(params: list[Tensor], grads: list[Tensor], states: list[dict], beta1: float) -> bool:
        lists = [params, grads, [s["s"] for s in states], [s["exp_avg_sq"] for s in states]]
        if beta1 > 0.0:
            lists.append([s["exp_avg"] for s in states])
        return foreach_tiles.tileable(lists, foreach_tiles.TILE_ELEMENTS)

    @staticmethod
    def _tiled_statistics(params: list[Tensor], grads: list[Tensor], states: list[dict], *, d: float, beta1: float,
                          beta2: float, beta3: float, s_scale: float) -> tuple[Tensor, Tensor]:
        """The statistics pass of a step (slice_p = 1, plain CPU tensors) slice by slice, so that its four passes
        (<g, x0 - x>, the moments, s, ||s||_1) read each slice from DRAM once (see optimizers/common/foreach_tiles.py).
        Returns (sum <g, x0 - x>, sum ||s||_1) in float64; the same sums as the untiled pass, accumulated per
        slice."""
        dot = torch.zeros((), dtype=torch.float64)
        l1_norm = torch.zeros((), dtype=torch.float64)
        size = foreach_tiles.TILE_ELEMENTS
        for p, g, state in zip(params, grads, states):
            p, g, p0, s = p.detach().view(-1), g.view(-1), state["p0"], state["s"]
            v = state["exp_avg_sq"].view(-1)
            m = state["exp_avg"].view(-1) if beta1 > 0.0 else None
            for start in range(0, p.numel(), size):
                piece = slice(start, start + size)
                initial = p0[piece] if p0.dim() > 0 else p0  # p0 is a scalar 0 for an all-zero initial parameter
                dot += torch.dot(g[piece], initial - p[piece]).double()
                prodigy_moments_update.untiled([g[piece]], None if m is None else [m[piece]], [v[piece]], d=d,
                                               beta1=beta1, beta2=beta2)
                s_piece = s[piece].mul_(beta3).add_(g[piece], alpha=s_scale)
                l1_norm += torch.linalg.vector_norm(s_piece, 1).double()
        return dot, l1_norm
