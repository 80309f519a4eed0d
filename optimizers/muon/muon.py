"""Muon (Jordan et al. 2024, "Muon: An optimizer for hidden layers in neural networks"; Liu et al. 2025, "Muon is
Scalable for LLM Training"): SGD-momentum whose update matrix is replaced by its nearest semi-orthogonal matrix.

Matrices go through the family's orthogonalizer (Newton-Schulz by default, `orthogonalizer="polar_express"` or a
callable) and its distributed execution (`optimizers.muon.distributed`): every matrix is orthogonalized whole, on
one rank, under DDP, FSDP2, HSDP, TP and FSDP2 + TP. Groups with `algorithm` = "lion" or "adamw" (embeddings, norm
gains, LM head) run the shared element-wise updates.

Typical settings (GPT, 160M): lr 0.02 with `adjust_lr` = "spectral_norm", mu 0.95, weight decay 0.01; with
"rms_norm" the update's RMS matches AdamW's, so AdamW's LR (about 3e-3) and weight decay (0.1) carry over.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from optimizers.muon.base import MatrixOptions, OrthonormalOptimizer, apply_update


@dataclass(frozen=True)
class MuonOptions(MatrixOptions):
    lr: float = 0.02
    mu: float = 0.95
    nesterov: bool = True


@torch.no_grad()
def muon_momentum_update(grads: list[Tensor], momenta: list[Tensor], *, mu: float, nesterov: bool) -> list[Tensor]:
    """Updates the momenta in place and returns the matrices to orthogonalize.

        M <- mu M + (1 - mu) G
        U = (1 - mu) G + mu M   (nesterov)   or   U = M
    """
    torch._foreach_lerp_(momenta, grads, 1.0 - mu)
    if nesterov:
        return list(torch._foreach_lerp(grads, momenta, mu))
    return list(momenta)


class Muon(OrthonormalOptimizer):
    """Muon for 2D matrices (3D+ with flatten) with built-in Lion/AdamW for the other groups.

    Keywords (and per-group overrides): lr 0.02, mu 0.95, nesterov True, weight_decay 0.01, adjust_lr
    "spectral_norm", cautious_wd False, flatten False, betas and epsilon (scalar algorithms); constructor only:
    orthogonalizer "newton_schulz", ns_steps 5, ns_coefficients, ns_dtype, distributed_mesh.
    State: "momentum" for muon groups; "exp_avg" (and "exp_avg_sq" for AdamW) for scalar groups, all with the
    parameter's shape, dtype and placement.
    """
    options_class = MuonOptions
    algorithm = "muon"
    default_orthogonalizer = "newton_schulz"

    def _matrix_step(self, groups: list[tuple[dict, list[Tensor]]]) -> None:
        items, inputs = [], []
        for group, params in groups:
            layouts = [self.layout(p, group) for p in params]
            momenta = [layout.local_matrix(self.state_tensor(p, "momentum")) for p, layout in zip(params, layouts)]
            grads = [layout.local_matrix(p.grad) for p, layout in zip(params, layouts)]
            updates = muon_momentum_update(grads, momenta, mu=group["mu"], nesterov=group["nesterov"])
            for p, layout, update in zip(params, layouts, updates):
                items.append((group, p, layout))
                inputs.append(update.to(self.orthogonalize.working_dtype(update)))
        orthogonalized = self.whole_matrices([layout for _, _, layout in items], inputs,
                                             lambda indices, stack: self.orthogonalize(stack))
        for (group, p, layout), update in zip(items, orthogonalized):
            apply_update(layout.local_matrix(p), update, lr=group["lr"], scale=self.scale(group, layout),
                         weight_decay=group["weight_decay"], cautious_wd=group["cautious_wd"])


def runtime_kwargs(ctx) -> dict:
    """The trainer-supplied keyword of the whole family: the group that plain (DDP) matrices are split over (the
    replicate mesh, or the default group when the trainer runs distributed without meshes)."""
    if ctx.replicate_mesh is not None:
        return dict(distributed_mesh=ctx.replicate_mesh)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dict(distributed_mesh=dist.group.WORLD)
    return dict(distributed_mesh=None)
