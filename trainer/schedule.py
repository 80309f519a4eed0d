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
    warmup = int(schedule.warmup_ratio * total)
    if schedule.name == "wsd":
        decay = int(schedule.warmdown_ratio * total)
        return WSDScheduler(optimizer, warmup, total - warmup - decay, decay)
    if schedule.name == "cosine":
        return WSDScheduler(optimizer, warmup, 0, total - warmup, decay_shape="cosine")
    return WSDScheduler(optimizer, warmup, total - warmup, 0)
