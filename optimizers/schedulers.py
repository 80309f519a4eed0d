"""Learning-rate schedules that work on any optimizer of the collection (CompositeOptimizer included).

WSD (warmup-stable-decay, Hu et al. 2024 "MiniCPM"; the modded-nanoGPT/Dion trainer's "warmdown"): linear warmup,
a long constant phase, then a short decay whose shape is linear, cosine or 1 - sqrt.

Per-group LRs: the schedule is a multiplier applied to each group's initial LR, so ratios fixed at build time (the
LM head's 1/sqrt(d) under Lion, a separate scalar LR) survive. `peak_lr` rescales all groups together: it is the
peak of the first group (the matrix group in every builder of this project, built with the config's `lr`), and
every other group peaks at peak_lr * its initial LR / the first group's initial LR.
"""
from __future__ import annotations

import math
from enum import Enum

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler


class DecayShape(str, Enum):
    LINEAR = "linear"
    COSINE = "cosine"
    SQRT = "sqrt"


def wsd_multiplier(step: int, warmup_steps: int, stable_steps: int, decay_steps: int,
                   decay_shape: DecayShape = DecayShape.LINEAR, min_lr_ratio: float = 0.0) -> float:
    """LR multiplier for the update made at `step` (0-based).

        warmup  (step < W):            (step + 1) / W
        stable  (W <= step < W + S):   1
        decay   (progress p = (step - W - S) / D in [0, 1]):  r + (1 - r) f(p),  r = min_lr_ratio,
                linear f = 1 - p;  cosine f = (1 + cos(pi p)) / 2;  sqrt f = 1 - sqrt(p)
        after the decay:               r

    With linear decay the last step runs at (1 / D) of the peak (the LR would reach r one step later), as in the
    Dion trainer's warmdown.
    """
    decay_shape = DecayShape(decay_shape)  # also accepts the plain string a JSON/YAML state round trip leaves
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if step < warmup_steps + stable_steps:
        return 1.0
    if decay_steps == 0:
        return min_lr_ratio
    progress = min(1.0, (step - warmup_steps - stable_steps) / decay_steps)
    if decay_shape is DecayShape.LINEAR:
        remaining = 1.0 - progress
    elif decay_shape is DecayShape.COSINE:
        remaining = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:
        remaining = 1.0 - math.sqrt(progress)
    return min_lr_ratio + (1.0 - min_lr_ratio) * remaining


class WSDScheduler(LRScheduler):
    """Warmup-stable-decay schedule; group LR = initial LR x peak scale x wsd_multiplier(step).

    warmup_steps, stable_steps, decay_steps: phase lengths in optimizer steps (any may be 0).
    peak_lr: peak LR of the first param group (None: each group's initial LR is its peak).
    decay_shape: "linear", "cosine" or "sqrt". min_lr_ratio: final LR as a fraction of the peak, in [0, 1].
    """

    def __init__(self, optimizer: Optimizer, warmup_steps: int, stable_steps: int, decay_steps: int,
                 peak_lr: float | None = None, decay_shape: str = "linear", min_lr_ratio: float = 0.0,
                 last_epoch: int = -1):
        for key, value in (("warmup_steps", warmup_steps), ("stable_steps", stable_steps),
                           ("decay_steps", decay_steps)):
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"WSDScheduler: {key} must be an integer >= 0, got {value!r}")
        try:
            self.decay_shape = DecayShape(decay_shape)
        except ValueError:
            allowed = ", ".join(shape.value for shape in DecayShape)
            raise ValueError(f"WSDScheduler: decay_shape must be one of {allowed}, got {decay_shape!r}") from None
        if not 0.0 <= min_lr_ratio <= 1.0:
            raise ValueError(f"WSDScheduler: min_lr_ratio must lie in [0, 1], got {min_lr_ratio}")
        first_lr = optimizer.param_groups[0].get("initial_lr", optimizer.param_groups[0]["lr"])
        if peak_lr is not None and (peak_lr <= 0.0 or first_lr <= 0.0):
            raise ValueError(f"WSDScheduler: peak_lr and the first group's initial lr must be > 0, got peak_lr "
                             f"{peak_lr} and lr {first_lr}")
        self.warmup_steps, self.stable_steps, self.decay_steps = warmup_steps, stable_steps, decay_steps
        self.min_lr_ratio = min_lr_ratio
        self.peak_scale = 1.0 if peak_lr is None else peak_lr / first_lr
        super().__init__(optimizer, last_epoch)

    def multiplier(self, step: int) -> float:
        return self.peak_scale * wsd_multiplier(step, self.warmup_steps, self.stable_steps, self.decay_steps,
                                                self.decay_shape, self.min_lr_ratio)

    def get_lr(self) -> list[float]:
        scale = self.multiplier(self.last_epoch)
        return [base_lr * scale for base_lr in self.base_lrs]
