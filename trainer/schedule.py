"""Learning-rate schedules as multipliers of each group's base LR (so the LM head's scaled LR keeps its ratio)."""
from __future__ import annotations

import math

import torch

from trainer.config import TrainConfig


def lr_multiplier(step: int, config: TrainConfig) -> float:
    """Multiplier for the update made at `step` (0-based).
    wsd: linear warmup over warmup_ratio, constant, then linear warmdown to zero over the last warmdown_ratio of
    num_iterations (the Dion trainer's schedule). cosine: warmup then cosine decay to zero. constant: warmup then 1."""
    total = config.num_iterations
    warmup = int(config.warmup_ratio * total)
    if step < warmup:
        return (step + 1) / warmup
    if config.schedule == "constant":
        return 1.0
    if config.schedule == "cosine":
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    warmdown = int(config.warmdown_ratio * total)
    if warmdown == 0 or step < total - warmdown:
        return 1.0
    return max(0.0, (total - step) / warmdown)


def build_scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_multiplier(step, config))
