"""One optimizer made of several, each owning disjoint parameter groups.

Used when the matrix algorithm (e.g. SOAP, Shampoo, Sophia) has no built-in scalar algorithm: its groups and the
AdamW/Lion groups for embeddings, vectors and the LM head live in one object that LR schedulers, checkpointing
(torch.distributed.checkpoint included) and the training loop treat as a single torch.optim.Optimizer.
"""
from __future__ import annotations

from collections import defaultdict

import torch
from torch.optim import Optimizer

from optimizers.common.closure import closure_loss
from optimizers.common.hooks import TrainingHooks, training_hooks


class CompositeOptimizer(Optimizer, TrainingHooks):
    """`param_groups` is the concatenation of the parts' groups (the same dict objects, so schedulers that edit
    group["lr"] reach the parts) and all parts share one `state` dict (their parameters are disjoint), so the
    standard state_dict format applies unchanged."""

    def __init__(self, optimizers: list[Optimizer]):
        if not optimizers:
            raise ValueError("CompositeOptimizer needs at least one optimizer")
        self.optimizers = list(optimizers)
        seen: set[int] = set()
        for opt in self.optimizers:
            for group in opt.param_groups:
                for p in group["params"]:
                    if id(p) in seen:
                        raise ValueError("CompositeOptimizer: a parameter appears in two optimizers")
                    seen.add(id(p))
        # The base initializer sets up hooks and bookkeeping; its single group is then replaced by the parts' groups.
        super().__init__([p for opt in self.optimizers for g in opt.param_groups for p in g["params"]], {})
        self._share_state()

    def _share_state(self) -> None:
        state = defaultdict(dict)
        for opt in self.optimizers:
            state.update(opt.state)
        self.state = state
        self.param_groups = [g for opt in self.optimizers for g in opt.param_groups]
        for opt in self.optimizers:
            opt.state = state

    def __repr__(self) -> str:
        return "CompositeOptimizer(" + ", ".join(type(o).__name__ for o in self.optimizers) + ")"

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure_loss(closure)
        for opt in self.optimizers:
            opt.step()
        return loss

    def load_state_dict(self, state_dict) -> None:
        super().load_state_dict(state_dict)
        # The base class rebuilt self.param_groups and self.state: hand the new objects back to the parts.
        start = 0
        for opt in self.optimizers:
            count = len(opt.param_groups)
            opt.param_groups = self.param_groups[start:start + count]
            start += count
            opt.state = self.state

    # Training hooks: each is forwarded to the parts (a part without hooks has the no-op defaults).
    def train(self) -> None:
        for opt in self.optimizers:
            training_hooks(opt).train()

    def eval(self) -> None:
        for opt in self.optimizers:
            training_hooks(opt).eval()

    def synchronize_for_checkpoint(self) -> None:
        for opt in self.optimizers:
            training_hooks(opt).synchronize_for_checkpoint()

    def prepare_backward(self, last_micro_batch: bool, rescaled_after: bool = False) -> None:
        for opt in self.optimizers:
            training_hooks(opt).prepare_backward(last_micro_batch, rescaled_after)

    def hessian_update_due(self) -> bool:
        return any(training_hooks(opt).hessian_update_due() for opt in self.optimizers)

    def hessian_pass(self, logits_fn) -> None:
        for opt in self.optimizers:
            if training_hooks(opt).has_hessian_pass:
                training_hooks(opt).hessian_pass(logits_fn)

    @property
    def has_hessian_pass(self) -> bool:
        return any(training_hooks(opt).has_hessian_pass for opt in self.optimizers)

    @property
    def supports_fused_backward(self) -> bool:
        return all(training_hooks(opt).supports_fused_backward for opt in self.optimizers)

    def register_fused_backward_hooks(self) -> None:
        for opt in self.optimizers:
            training_hooks(opt).register_fused_backward_hooks()
