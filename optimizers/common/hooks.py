"""The calls a training loop makes on an optimizer besides step(), zero_grad() and state_dict().

An optimizer that needs any of them inherits `TrainingHooks` and overrides what it uses; the loop calls every hook
on every optimizer through `training_hooks(optimizer)`, which gives optimizers without them the no-op defaults.
Capabilities are declared here, never probed with getattr.

    train() / eval()              before training steps / before evaluation and checkpoints (Schedule-Free moves
                                  the parameters between its two iterates)
    synchronize_for_checkpoint()  make the data-parallel replicas' states identical before saving (Dion's
                                  compressed replica sync)
    prepare_backward(last, rescaled_after)
                                  before each backward of a training step: whether it is the step's last
                                  micro-batch, whose gradients are final (Dion, when it syncs the replicas itself,
                                  starts their full-gradient average during that backward), and whether the loop
                                  rescales the gradients after it (clipping: averages stay valid, nothing else
                                  computed from them does)
    hessian_update_due()          True when the next step wants an extra Hessian pass (Sophia); asked before step()
    hessian_pass(logits_fn)       run that pass (has_hessian_pass): logits_fn() is the model's forward on the
                                  current batch; the loop clears gradients before and after
    supports_fused_backward       whether register_fused_backward_hooks() exists (the advanced family updates each
                                  parameter inside its post-accumulate-grad hook)
"""
from __future__ import annotations

from typing import Callable

from torch import Tensor


class TrainingHooks:
    supports_fused_backward: bool = False
    has_hessian_pass: bool = False

    def train(self) -> None:
        """Parameters at the point where gradients are taken (default: nothing to do)."""

    def eval(self) -> None:
        """Parameters at the point to evaluate and checkpoint (default: nothing to do)."""

    def synchronize_for_checkpoint(self) -> None:
        """Make the replicas' optimizer states identical before a checkpoint (default: already identical)."""

    def prepare_backward(self, last_micro_batch: bool, rescaled_after: bool = False) -> None:
        """Called before each backward of a training step (default: nothing to do)."""

    def hessian_update_due(self) -> bool:
        return False

    def hessian_pass(self, logits_fn: Callable[[], Tensor]) -> None:
        raise NotImplementedError(f"{type(self).__name__} has no Hessian pass")

    def register_fused_backward_hooks(self) -> None:
        raise NotImplementedError(f"{type(self).__name__} has no fused backward pass")


_DEFAULT = TrainingHooks()


def training_hooks(optimizer) -> TrainingHooks:
    """The optimizer itself when it declares hooks, else the no-op defaults."""
    return optimizer if isinstance(optimizer, TrainingHooks) else _DEFAULT
