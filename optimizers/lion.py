"""Lion (Chen et al. 2023). Typical settings: lr 3-10x smaller than AdamW's, weight decay 3-10x larger (the
effective decay is lr * wd), betas (0.9, 0.99)."""
from __future__ import annotations

import torch
from torch.optim import Optimizer

from optimizers.common.closure import closure_loss
from optimizers.common.param_groups import CheckedParamGroups
from optimizers.common.scalar_updates import lion_update


class Lion(CheckedParamGroups, Optimizer):
    """Sign-of-interpolated-momentum update. State per parameter: `exp_avg` (same shape and dtype)."""

    def __init__(self, params, lr: float = 1e-4, betas: tuple[float, float] = (0.9, 0.99),
                 weight_decay: float = 0.0):
        if lr < 0.0:
            raise ValueError(f"Lion: lr must be >= 0, got {lr}")
        if not (0.0 <= betas[0] <= 1.0 and 0.0 <= betas[1] <= 1.0):
            raise ValueError(f"Lion: betas must lie in [0, 1], got {betas}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure_loss(closure)
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            for p in params:
                if not self.state[p]:
                    self.state[p]["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            beta1, beta2 = group["betas"]
            lion_update(params, [p.grad for p in params], [self.state[p]["exp_avg"] for p in params],
                        lr=group["lr"], beta1=beta1, beta2=beta2, weight_decay=group["weight_decay"])
        return loss
