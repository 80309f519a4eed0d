"""NorMuon (Li et al. 2025, "NorMuon: Making Muon more efficient and scalable", arXiv 2510.05491): Muon whose
orthogonalized update is normalized per row (neuron) by an Adam-like second moment of its own entries, then
rescaled to the Frobenius norm it had, so the row scales become uniform without changing the step size.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from optimizers.muon.base import MatrixOptions, OrthonormalOptimizer, apply_update
from optimizers.muon.distributed import MatrixLayout

# Added to sqrt(v) before dividing, as in the paper.
NORMALIZATION_EPSILON = 1e-8


@dataclass(frozen=True)
class NorMuonOptions(MatrixOptions):
    mu: float = 0.95
    muon_beta2: float = 0.95
    nesterov: bool = False


@torch.no_grad()
def normuon_momentum_update(grad: Tensor, momentum: Tensor, *, mu: float, nesterov: bool) -> Tensor:
    """Updates the momentum in place and returns the matrix to orthogonalize (NorMuon, Algorithm 1):

        M <- mu M + G
        U = G + mu M   (nesterov)   or   U = M
    """
    momentum.mul_(mu).add_(grad.to(momentum.dtype))
    return grad + mu * momentum if nesterov else momentum


@torch.no_grad()
def normalize_rows(update: Tensor, layout: MatrixLayout, variance: Tensor, *, beta2: float,
                   rows: Tensor | None = None) -> Tensor:
    """NorMuon's normalization of an orthogonalized update O (m x n, this rank's part `update`):

        v_i <- beta2 v_i + (1 - beta2) mean_j O_ij^2           (only rows in `rows`, a bool (m, 1) mask, if given)
        O_ij <- O_ij / (sqrt(v_i) + 1e-8), then O <- O ||O_before||_F / ||O||_F

    variance: v, the full (m, 1) state on every rank, updated in place. The row sums of O^2 are the only reduction
    across shards; both Frobenius norms follow from them and v. Returns the local part of the normalized O, in the
    dtype of v."""
    dtype = variance.dtype
    local = update.to(dtype)
    row_mean_squares = (layout.full_sums(local.square(), dim=1) / layout.shape[1]).unsqueeze(1)
    updated = variance.lerp(row_mean_squares, 1.0 - beta2)
    variance.copy_(updated if rows is None else torch.where(rows, updated, variance))
    denominator = variance.sqrt() + NORMALIZATION_EPSILON
    before = row_mean_squares.sum().sqrt()
    after = (row_mean_squares / denominator.square()).sum().sqrt()
    start, length = layout.local_range(0)
    local_denominator = denominator.narrow(0, start, length)
    return local / local_denominator * (before / after.clamp(min=torch.finfo(dtype).tiny))


class NorMuon(OrthonormalOptimizer):
    """NorMuon for 2D matrices (3D+ with flatten) with built-in Lion/AdamW for the other groups.

    Keywords (and per-group overrides): lr 0.01, mu 0.95, muon_beta2 0.95, nesterov False, weight_decay 0.01,
    adjust_lr "spectral_norm", cautious_wd False, flatten False, betas and epsilon (scalar algorithms);
    constructor only: orthogonalizer "polar_express", ns_steps 5, ns_coefficients, ns_dtype, distributed_mesh.
    State: "momentum" (the parameter's shape and placement) and "variance" (m x 1, float32, the full vector on
    every rank) for normuon groups; "exp_avg" (and "exp_avg_sq") for scalar groups.
    """
    options_class = NorMuonOptions
    algorithm = "normuon"

    def _matrix_step(self, groups: list[tuple[dict, list[Tensor]]]) -> None:
        items, inputs = [], []
        for group, params in groups:
            for p in params:
                layout = self.layout(p, group)
                update = normuon_momentum_update(layout.local_matrix(p.grad),
                                                 layout.local_matrix(self.state_tensor(p, "momentum")),
                                                 mu=group["mu"], nesterov=group["nesterov"])
                items.append((group, p, layout))
                inputs.append(update.to(self.orthogonalize.working_dtype(update)))
        orthogonalized = self.whole_matrices([layout for _, _, layout in items], inputs,
                                             lambda indices, stack: self.orthogonalize(stack))
        for (group, p, layout), update in zip(items, orthogonalized):
            variance = self.row_state(p, layout, "variance")
            normalized = normalize_rows(update, layout, variance, beta2=group["muon_beta2"])
            apply_update(layout.local_matrix(p), normalized, lr=group["lr"], scale=self.scale(group, layout),
                         weight_decay=group["weight_decay"], cautious_wd=group["cautious_wd"])
