"""One optimizer made of several, each owning disjoint parameter groups.

Used when the matrix algorithm (e.g. SOAP, Shampoo, Sophia) has no built-in scalar algorithm: its groups and the
AdamW/Lion groups for embeddings, vectors and the LM head live in one object that LR schedulers, checkpointing
(torch.distributed.checkpoint included) and the training loop treat as a single torch.optim.Optimizer.
"""
from __future__ import annotations

from collections import defaultdict

import torch
from torch.optim import Optimizer

from optimizers.closure import closure_loss


class CompositeOptimizer(Optimizer):
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

    def __getattr__(self, name):
        # Optional hooks (train()/eval() of schedule-free, Hessian refresh of Sophia) are forwarded to the parts
        # that define them.
        if name.startswith("_") or name in ("optimizers", "state", "param_groups", "defaults"):
            raise AttributeError(name)
        targets = [getattr(opt, name) for opt in self.__dict__.get("optimizers", []) if hasattr(opt, name)]
        if not targets:
            raise AttributeError(name)
        if not all(callable(t) for t in targets):
            return targets[0]

        def call_all(*args, **kwargs):
            results = [t(*args, **kwargs) for t in targets]
            return results[0] if len(results) == 1 else results
        return call_all
