"""The `closure` argument of torch.optim.Optimizer.step, handled in one place for every optimizer."""
from __future__ import annotations

from typing import Callable

import torch


def closure_loss(closure: Callable[[], torch.Tensor] | None) -> torch.Tensor | None:
    """Re-evaluate the model with gradients enabled (step() itself runs under no_grad) and return its loss; None
    without a closure."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()
