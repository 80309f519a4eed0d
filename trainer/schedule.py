"""The config's `schedule` section as an LR scheduler: every choice is a warmup-stable-decay shape of
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
    schedule = config.schedule
    total = schedule.num_iterations
    warmup = round(schedule.warmup_ratio * total)  # round, as the reference (0.3 x 300 is 89.99...)
    if schedule.name == "wsd":
        decay = round(schedule.warmdown_ratio * total)
        return WSDScheduler(optimizer, warmup, total - warmup - decay, decay)
    if schedule.name == "cosine":
        return WSDScheduler(optimizer, warmup, 0, total - warmup, decay_shape="cosine")
    return WSDScheduler(optimizer, warmup, total - warmup, 0)


# What a resume takes from the config rather than from the checkpoint (docs: README "Resume"): the learning rates
# (each group's base LR as the config builds it) and weight decay, and the schedule's shape and length. Everything
# else (optimizer states, step count, data position, RNG, the other optimizer options) continues from the checkpoint.
RESUMABLE_GROUP_KEYS = ("initial_lr", "weight_decay")


def configured_hyperparameters(optimizer: torch.optim.Optimizer) -> list[dict]:
    """The config's values of RESUMABLE_GROUP_KEYS per param group, taken before a checkpoint is loaded."""
    return [{key: group[key] for key in RESUMABLE_GROUP_KEYS if key in group} for group in optimizer.param_groups]


def resume_schedule(optimizer: torch.optim.Optimizer, scheduler: WSDScheduler, configured: list[dict],
                    step: int) -> None:
    """After loading a checkpoint taken at `step`: put back the configured base LRs and weight decays, and place the
    schedule built from the current config at `step` (so extending num_iterations or changing lr or the schedule
    takes effect; with an unchanged config the LRs are the ones the checkpoint would have restored)."""
    for group, values in zip(optimizer.param_groups, configured):
        group.update(values)
    scheduler.base_lrs = [group["initial_lr"] for group in optimizer.param_groups]
    scheduler.last_epoch = step
    for group, lr in zip(optimizer.param_groups, scheduler.get_lr()):
        group["lr"] = lr
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
