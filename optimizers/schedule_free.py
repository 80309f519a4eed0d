"""Schedule-Free AdamW (Defazio et al. 2024, "The Road Less Scheduled"): no LR schedule; the gradient is taken at
an interpolation y of the fast iterate z and the running weighted average x, and x is the model to evaluate.

Only y (the parameters, in train mode) and z are stored, as in the authors' fast implementation:

    train mode: parameters = y = (1 - beta1) z + beta1 x        eval mode: parameters = x

`eval()` before validation and checkpointing, `train()` afterwards (train.py does both). A checkpoint therefore
holds x and z; `step()` called in eval mode (e.g. right after resuming from such a checkpoint) first switches back
to train mode, so a resumed run continues exactly as one that called eval()/train() around the save.
The optimizer starts in train mode (x = y = z before the first step, so both modes coincide).

Typical settings: lr 1-3x AdamW's (e.g. 3e-3 for a 160M GPT), betas (0.9, 0.95), weight decay 0.1, warmup_steps
about 5% of training, `schedule: constant` in the config (the averaging replaces the decay).
"""
from __future__ import annotations

import torch
from torch import Tensor
from torch.optim import Optimizer

from optimizers.common.closure import closure_loss
from optimizers.common.foreach_tiles import tiled
from optimizers.common.hooks import TrainingHooks
from optimizers.common.param_groups import CheckedParamGroups


@torch.no_grad()
@tiled(4)
def schedule_free_adamw_update(ys: list[Tensor], grads: list[Tensor], zs: list[Tensor], exp_avg_sqs: list[Tensor],
                               *, lr: float, beta1: float, beta2: float, weight_decay: float, epsilon: float,
                               step: int, averaging_weight: float) -> None:
    """One step at y (Defazio et al., Algorithm 1 in the y/z form); c = averaging_weight = w_t / sum_i w_i.

        v <- beta2 v + (1 - beta2) g^2
        u = g / (sqrt(v / (1 - beta2^t)) + eps) + wd y
        y <- (1 - c) y + c z + lr (beta1 (1 - c) - 1) u      (= (1 - beta1) z_{t+1} + beta1 x_{t+1})
        z <- z - lr u
    """
    if not ys:
        return
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1.0 - beta2)
    denominators = torch._foreach_div(exp_avg_sqs, 1.0 - beta2 ** step)
    torch._foreach_sqrt_(denominators)
    torch._foreach_add_(denominators, epsilon)
    updates = torch._foreach_div(grads, denominators)
    if weight_decay != 0.0:
        torch._foreach_add_(updates, ys, alpha=weight_decay)
    torch._foreach_lerp_(ys, zs, averaging_weight)
    torch._foreach_add_(ys, updates, alpha=lr * (beta1 * (1.0 - averaging_weight) - 1.0))
    torch._foreach_sub_(zs, updates, alpha=lr)


def averaging_weight(group: dict, lr: float) -> float:
    """Weight of the newest iterate in x: w_t = t^r lr_max^p (lr_max: largest LR so far, so warmup steps count
    less), c_t = w_t / sum_i w_i. Updates the group's running `lr_max` and `weight_sum`."""
    group["lr_max"] = max(lr, group["lr_max"])
    weight = (group["step"] ** group["r"]) * (group["lr_max"] ** group["weight_lr_power"])
    group["weight_sum"] += weight
    return weight / group["weight_sum"] if group["weight_sum"] > 0.0 else 0.0


class ScheduleFreeAdamW(CheckedParamGroups, Optimizer, TrainingHooks):
    """Schedule-Free AdamW, equal to `schedulefree.AdamWScheduleFree`. State per parameter: "z" and "exp_avg_sq".
    Group keys: step, train_mode, lr_max, weight_sum (all saved in the state dict).

    warmup_steps: linear LR warmup inside the optimizer. r: polynomial weighting of the average. weight_lr_power:
    the average weights each iterate by lr_max^weight_lr_power.
    """

    def __init__(self, params, lr: float = 2.5e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, warmup_steps: int = 0, r: float = 0.0, weight_lr_power: float = 2.0):
        if lr < 0.0:
            raise ValueError(f"ScheduleFreeAdamW: lr must be >= 0, got {lr}")
        if not (0.0 < betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"ScheduleFreeAdamW: betas must lie in (0, 1) x [0, 1), got {betas}")
        if warmup_steps < 0:
            raise ValueError(f"ScheduleFreeAdamW: warmup_steps must be >= 0, got {warmup_steps}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                                      warmup_steps=warmup_steps, r=r, weight_lr_power=weight_lr_power, step=0,
                                      train_mode=True, lr_max=-1.0, weight_sum=0.0))

    @torch.no_grad()
    def _switch(self, train_mode: bool) -> None:
        for group in self.param_groups:
            if group["train_mode"] == train_mode:
                continue
            beta1 = group["betas"][0]
            # .get: indexing the state defaultdict would create empty entries, and DCP's get_state_dict takes a
            # non-empty state for an initialized optimizer and then saves or loads no per-parameter state at all.
            params = [p for p in group["params"] if "z" in self.state.get(p, {})]
            if params:
                # x = (y - (1 - beta1) z) / beta1 = lerp(y, z, 1 - 1/beta1);  y = lerp(x, z, 1 - beta1).
                weight = 1.0 - beta1 if train_mode else 1.0 - 1.0 / beta1
                torch._foreach_lerp_(params, [self.state[p]["z"] for p in params], weight)
            group["train_mode"] = train_mode

    def train(self) -> None:
        """Parameters <- y, the point where gradients are taken."""
        self._switch(True)

    def eval(self) -> None:
        """Parameters <- x, the averaged iterate to evaluate and checkpoint."""
        self._switch(False)

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure_loss(closure)
        self.train()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            group["step"] += 1
            warmup = group["warmup_steps"]
            lr = group["lr"] * (group["step"] / warmup if group["step"] <= warmup else 1.0)
            weight = averaging_weight(group, lr)
            for p in params:
                state = self.state[p]
                if not state:
                    state["z"] = p.detach().clone(memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            beta1, beta2 = group["betas"]
            schedule_free_adamw_update(params, [p.grad for p in params], [self.state[p]["z"] for p in params],
                                       [self.state[p]["exp_avg_sq"] for p in params], lr=lr, beta1=beta1,
                                       beta2=beta2, weight_decay=group["weight_decay"], epsilon=group["eps"],
                                       step=group["step"], averaging_weight=weight)
        return loss
