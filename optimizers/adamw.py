"""AdamW with foreach (default) and fused paths; numerically identical to torch.optim.AdamW (amsgrad off)."""
from __future__ import annotations

from collections import defaultdict

import torch
from torch import Tensor
from torch.optim import Optimizer

from optimizers.closure import closure_loss
from optimizers.scalar_updates import adamw_update


def _is_plain(t: Tensor) -> bool:
    return type(t) is torch.Tensor or type(t) is torch.nn.Parameter


class AdamW(Optimizer):
    """Decoupled-weight-decay Adam. State per parameter: `step` (float32 scalar tensor, as torch keeps it),
    `exp_avg`, `exp_avg_sq` (same shape and dtype as the parameter), so state dicts are interchangeable with
    torch.optim.AdamW's.

    fused=True runs torch's fused AdamW kernel (plain tensors of one dtype; DTensors fall back to foreach).
    """

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.01, fused: bool = False):
        if lr < 0.0:
            raise ValueError(f"AdamW: lr must be >= 0, got {lr}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"AdamW: betas must lie in [0, 1), got {betas}")
        if eps < 0.0:
            raise ValueError(f"AdamW: eps must be >= 0, got {eps}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, fused=fused))

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure_loss(closure)
        for group in self.param_groups:
            # Parameters that skipped a step (no grad) have their own step count: bucket by it.
            buckets: dict[float, list[Tensor]] = defaultdict(list)
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = torch.tensor(0.0)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
                buckets[float(state["step"])].append(p)
            beta1, beta2 = group["betas"]
            for step, params in buckets.items():
                states = [self.state[p] for p in params]
                grads = [p.grad for p in params]
                exp_avgs = [s["exp_avg"] for s in states]
                exp_avg_sqs = [s["exp_avg_sq"] for s in states]
                if group["fused"] and all(_is_plain(p) for p in params) and len({p.dtype for p in params}) == 1:
                    torch._fused_adamw_(params, grads, exp_avgs, exp_avg_sqs, [], [s["step"] for s in states],
                                        lr=group["lr"], beta1=beta1, beta2=beta2, weight_decay=group["weight_decay"],
                                        eps=group["eps"], amsgrad=False, maximize=False)
                else:
                    adamw_update(params, grads, exp_avgs, exp_avg_sqs, lr=group["lr"], beta1=beta1, beta2=beta2,
                                 weight_decay=group["weight_decay"], epsilon=group["eps"], step=int(step))
        return loss


def build(ctx) -> Optimizer:
    """Registry builder: AdamW on the matrices, and on everything else unless a scalar_opt was chosen."""
    kwargs = ctx.constructor_kwargs(AdamW, lr=ctx.lr, betas=ctx.betas, eps=ctx.epsilon,
                                    weight_decay=ctx.weight_decay)
    if ctx.scalar_opt_explicit and ctx.scalar_opt != "adamw":
        return ctx.with_scalar_optimizer(AdamW(ctx.matrix_params, **kwargs))
    groups = [dict(params=ctx.matrix_params)] + ctx.scalar_param_groups(algorithm_key=False)
    return AdamW(groups, **kwargs)
