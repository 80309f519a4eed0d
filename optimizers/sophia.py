"""Sophia-G (Liu et al. 2023, "Sophia: A Scalable Stochastic Second-order Optimizer for Language Model
Pre-training"): sign-momentum clipped by a diagonal Hessian estimate, refreshed every `hessian_interval` steps with
the Gauss-Newton-Bartlett (GNB) estimator. Matches the authors' SophiaG step for step.

The Hessian refresh is a hook driven by the training loop, not something the optimizer can do alone (it needs an
extra forward/backward pass on labels sampled from the model):

    due = optimizer.hessian_update_due()      # before optimizer.step()
    optimizer.step()
    if due:
        zero grads; logits = model(last micro-batch); y ~ softmax(logits);
        mean cross_entropy(logits, y).backward(); optimizer.update_hessian(); zero grads

`hessian_update_due()` becomes true for the k-th step after the previous refresh and stays true until
`update_hessian()` runs, so a loop that asks after the step, or skips a refresh, still refreshes once per k steps.

Typical settings (GPT-2 small/medium, the paper): lr 6e-4 (about AdamW's), betas (0.965, 0.99), rho 0.05,
weight decay 0.2, hessian_interval 10, tokens_per_step = global batch in tokens.
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
def sophia_update(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], hessians: list[Tensor], *,
                  lr: float, beta1: float, rho: float, tokens_per_step: int, weight_decay: float,
                  epsilon: float) -> None:
    """Sophia-G step (the authors' Algorithm 3 with their implementation's constants):

        p <- p (1 - lr wd)
        m <- beta1 m + (1 - beta1) g
        p <- p - lr sign(m) min(|m| / (rho B h + eps), 1)   =   p - lr m / max(|m|, rho B h + eps)

    B = tokens per step: h estimates the Hessian of the mean loss, B h that of the summed loss (the GNB scaling).
    """
    if not params:
        return
    if weight_decay != 0.0:
        torch._foreach_mul_(params, 1.0 - lr * weight_decay)
    torch._foreach_mul_(exp_avgs, beta1)
    torch._foreach_add_(exp_avgs, grads, alpha=1.0 - beta1)
    denominators = torch._foreach_mul(hessians, rho * tokens_per_step)
    torch._foreach_add_(denominators, epsilon)
    torch._foreach_maximum_(denominators, torch._foreach_abs(exp_avgs))
    torch._foreach_addcdiv_(params, exp_avgs, denominators, value=-lr)


@torch.no_grad()
@tiled(2)
def gnb_hessian_update(hessians: list[Tensor], sampled_grads: list[Tensor], *, beta2: float) -> None:
    """Gauss-Newton-Bartlett diagonal estimate, as an EMA:  h <- beta2 h + (1 - beta2) g_hat * g_hat,
    where g_hat is the gradient of the mean loss on labels sampled from the model's own output distribution."""
    if not hessians:
        return
    torch._foreach_mul_(hessians, beta2)
    torch._foreach_addcmul_(hessians, sampled_grads, sampled_grads, value=1.0 - beta2)


class Sophia(CheckedParamGroups, Optimizer, TrainingHooks):
    """Sophia-G. State per parameter: "exp_avg" and "hessian" (shape and dtype of the parameter). Group keys "step"
    (steps taken) and "hessian_step" (the step of the last Hessian refresh) drive `hessian_update_due()` and
    survive state_dict round trips.

    tokens_per_step: the global batch in tokens (B of the GNB estimator; the paper's rho is tuned with it).
    epsilon: floor of the denominator (1e-15 as in the authors' code).
    """

    has_hessian_pass = True

    def __init__(self, params, lr: float = 6e-4, betas: tuple[float, float] = (0.965, 0.99), rho: float = 0.05,
                 weight_decay: float = 0.2, tokens_per_step: int = 0, hessian_interval: int = 10,
                 epsilon: float = 1e-15):
        if lr < 0.0:
            raise ValueError(f"Sophia: lr must be >= 0, got {lr}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"Sophia: betas must lie in [0, 1), got {betas}")
        if rho <= 0.0:
            raise ValueError(f"Sophia: rho must be > 0, got {rho}")
        if tokens_per_step <= 0:
            raise ValueError(f"Sophia: tokens_per_step must be > 0 (the global batch in tokens), got "
                             f"{tokens_per_step}")
        if hessian_interval < 1:
            raise ValueError(f"Sophia: hessian_interval must be >= 1, got {hessian_interval}")
        self.hessian_interval = hessian_interval
        super().__init__(params, dict(lr=lr, betas=tuple(betas), rho=rho, weight_decay=weight_decay,
                                      epsilon=epsilon, tokens_per_step=tokens_per_step, step=0, hessian_step=0))

    def _state(self, p: Tensor) -> dict:
        state = self.state[p]
        if not state:
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["hessian"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return state

    def hessian_update_due(self) -> bool:
        """True when the next step is the `hessian_interval`-th since the last refresh (ask before step())."""
        return any(group["step"] + 1 - group["hessian_step"] >= self.hessian_interval
                   for group in self.param_groups if group["params"])

    def hessian_pass(self, logits_fn) -> None:
        """Gauss-Newton-Bartlett estimate: backpropagate the loss on labels sampled from the model's own predictions
        (logits_fn() -> (..., vocab) logits of the current batch) and fold the gradients into the Hessian estimate.
        The caller clears the model's gradients before and after (they are not gradients of the training loss)."""
        logits = logits_fn()
        flat = logits.view(-1, logits.size(-1))
        sampled = torch.multinomial(torch.softmax(flat.detach().float(), dim=-1), 1).view(-1)
        torch.nn.functional.cross_entropy(flat, sampled).backward()
        self.update_hessian()

    @torch.no_grad()
    def update_hessian(self) -> None:
        """Fold the current gradients (of the loss on sampled labels) into the Hessian estimate."""
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            gnb_hessian_update([self._state(p)["hessian"] for p in params], [p.grad for p in params],
                               beta2=group["betas"][1])
            group["hessian_step"] = group["step"]

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure_loss(closure)
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            group["step"] += 1
            states = [self._state(p) for p in params]
            sophia_update(params, [p.grad for p in params], [s["exp_avg"] for s in states],
                          [s["hessian"] for s in states], lr=group["lr"], beta1=group["betas"][0], rho=group["rho"],
                          tokens_per_step=group["tokens_per_step"], weight_decay=group["weight_decay"],
                          epsilon=group["epsilon"])
        return loss


def runtime_kwargs(ctx) -> dict:
    """The trainer-supplied keyword: the global batch in tokens (scales the Hessian estimate)."""
    return dict(tokens_per_step=ctx.tokens_per_step)
