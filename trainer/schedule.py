"""The config's `schedule` as an LR scheduler: every choice is a warmup-stable-decay shape of
`optimizers.schedulers.WSDScheduler`, which scales each param group's own base LR (so the LM head's scaled LR keeps
its ratio).

    wsd:      linear warmup (warmup_ratio), constant, linear warmdown to zero (warmdown_ratio): the Dion trainer's
    cosine:   linear warmup, then cosine decay to zero over the rest of the run
    constant: linear warmup, then constant (schedule-free and Prodigy runs)
"""
from __future__ import annotations

import torch

from optimizers.schedulers import WSDScheduler
from trainer.config import TrainConfig


def build_scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig) -> WSDScheduler:
    total = config.num_iterations
    warmup = int(config.warmup_ratio * total)
    if config.schedule == "wsd":
        decay = int(config.warmdown_ratio * total)
        return WSDScheduler(optimizer, warmup, total - warmup - decay, decay)
    if config.schedule == "cosine":
        return WSDScheduler(optimizer, warmup, 0, total - warmup, decay_shape="cosine")
    return WSDScheduler(optimizer, warmup, total - warmup, 0)


def rescale_lr(scheduler: WSDScheduler, factor: float) -> None:
    """Resume with another `lr`: every group's LR times `factor` from the next update on, the schedule's shape
    and position unchanged (the checkpoint's scheduler and optimizer groups hold the saved LRs)."""
    scheduler.peak_scale *= factor
    for group, lr in zip(scheduler.optimizer.param_groups, scheduler.get_lr()):
        group["lr"] = lr
    scheduler._last_lr = [group["lr"] for group in scheduler.optimizer.param_groups]
