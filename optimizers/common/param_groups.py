"""Param groups that refuse keys their optimizer does not read.

torch.optim keeps any key a param group carries, so a typo, or another library's key (microsoft/dion's
`split_sizes`, an Adam `beta1` given to an optimizer that takes `betas`), would be ignored without a word. Every
registered optimizer inherits `CheckedParamGroups` before `torch.optim.Optimizer`: a group may carry `params`, the
optimizer's defaults (its constructor keywords) and nothing else.
"""
from __future__ import annotations


class CheckedParamGroups:
    def add_param_group(self, param_group: dict) -> None:
        allowed = {"params", *self.defaults}
        unknown = sorted(set(param_group) - allowed)
        if unknown:
            raise ValueError(f"{type(self).__name__}: unknown param-group key(s) {', '.join(map(repr, unknown))}; "
                             f"a group takes: {', '.join(sorted(allowed))}")
        super().add_param_group(param_group)
