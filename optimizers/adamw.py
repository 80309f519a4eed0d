"""AdamW with fused (default where it applies) and foreach paths; numerically identical to torch.optim.AdamW
(amsgrad off): the fused path to torch's fused AdamW, the foreach path to its foreach and for-loop AdamW."""
from __future__ import annotations

from collections import defaultdict

import torch
from torch import Tensor
from torch.optim import Optimizer

from optimizers.common.closure import closure_loss
from optimizers.common.param_groups import CheckedParamGroups
from optimizers.common.scalar_updates import adamw_update


def _is_plain(t: Tensor) -> bool:
    return type(t) is torch.Tensor or type(t) is torch.nn.Parameter


def _fused_kernel_applies(*lists: list[Tensor]) -> bool:
    """torch's fused AdamW kernel takes plain CPU or CUDA tensors of one floating dtype on one device."""
    tensors = [t for tensors in lists for t in tensors]
    first = tensors[0]
    return (first.device.type in ("cpu", "cuda") and first.dtype.is_floating_point
            and all(_is_plain(t) and t.dtype == first.dtype and t.device == first.device for t in tensors))


class AdamW(CheckedParamGroups, Optimizer):
    """Decoupled-weight-decay Adam. State per parameter: `step` (float32 scalar tensor, as torch keeps it),
    `exp_avg`, `exp_avg_sq` (same shape and dtype as the parameter), so state dicts are interchangeable with
    torch.optim.AdamW's.

    fused: None (default) runs torch's fused AdamW kernel wherever it applies (plain CPU/CUDA tensors of one dtype:
    one pass over parameters, gradients and states) and the foreach path elsewhere (DTensors, mixed dtypes);
    True asks for the kernel with the same fallback; False always takes the foreach path (on CPU cache-tiled, see
    optimizers/common/foreach_tiles.py).
    """

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.01, fused: bool | None = None):
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
                if group["fused"] is not False and _fused_kernel_applies(params, grads, exp_avgs, exp_avg_sqs):
                    # One step tensor on the parameters' device for the whole bucket (the kernel only reads it).
                    steps = [torch.tensor(step, dtype=torch.float32, device=params[0].device)] * len(params)
                    torch._fused_adamw_(params, grads, exp_avgs, exp_avg_sqs, [], steps,
                                        lr=group["lr"], beta1=beta1, beta2=beta2, weight_decay=group["weight_decay"],
                                        eps=group["eps"], amsgrad=False, maximize=False)
                else:
                    adamw_update(params, grads, exp_avgs, exp_avg_sqs, lr=group["lr"], beta1=beta1, beta2=beta2,
                                 weight_decay=group["weight_decay"], epsilon=group["eps"], step=int(step))
        return loss
