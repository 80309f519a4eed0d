"""SOAP (Vyas et al. 2024, "SOAP: Improving and Stabilizing Shampoo using Adam"): Adam run in the eigenbasis of
Shampoo's Kronecker-factored preconditioner.

For a weight W (dims d_1..d_k; 2D: L = G G^T and R = G^T G) the optimizer keeps one EMA factor per dimension,
GG_i <- lerp(GG_i, contraction of G with itself over all dims but i, 1 - shampoo_beta), and an orthonormal basis
Q_i of its eigenvectors. Adam's second moment lives in the rotated space; the first moment in the original one:

    G' = G x_1 Q_1 ... x_k Q_k             (project: rotate every dimension by Q_i^T)
    m <- lerp(m, G, 1 - beta1);   v <- lerp(v, G'^2, 1 - beta2)
    W <- W - lr sqrt(1 - beta2^t) / (1 - beta1^t) * unproject(project(m) / (sqrt(v) + eps))
    W <- W (1 - lr wd)

Q_i starts as the exact eigenbasis (eigh) and every `precondition_frequency` steps is refreshed with one step of
power iteration plus QR, reordering v to follow the eigenvalue order. Dimensions larger than
`max_precondition_dim` (and 1D tensors unless `precondition_1d`) are not rotated (identity basis).
`merge_dims` first merges consecutive small dimensions while their product stays <= max_precondition_dim.
The first step only initializes the preconditioner (no parameter change), as in the authors' code.

Preconditioner statistics and rotations run in float32 whatever the parameter dtype. Parameters must be plain
tensors (replicated under DDP): a shard's statistics are not those of the whole matrix.

Typical settings (the paper, 124M-360M LMs): lr 3e-3, betas (0.95, 0.95), weight decay 0.01,
precondition_frequency 10; scalars via AdamW.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.distributed.tensor import DTensor
from torch.optim import Optimizer

from optimizers.common.closure import closure_loss
from optimizers.common.param_groups import CheckedParamGroups


def merged_shape(shape: torch.Size, max_dim: int) -> list[int]:
    """Merge consecutive dimensions while their product stays <= max_dim; a larger dimension stays alone.
    (4, 3, 16, 16) with max_dim 50 -> [12, 16, 16]."""
    merged, current = [], 1
    for size in shape:
        if current * size <= max_dim:
            current *= size
        else:
            if current > 1:
                merged.append(current)
            current = size
    if current > 1 or not merged:
        merged.append(current)
    return merged


def project(x: Tensor, bases: list[Tensor | None], back: bool = False) -> Tensor:
    """Rotate every dimension of x into the eigenbases (x x_i Q_i, i.e. Q_i^T applied along dimension i), or back
    with Q_i. Contracting dimension 0 each time moves the new axis last, so after k steps the order is restored."""
    for basis in bases:
        if basis is None:
            x = x.movedim(0, -1)
        else:
            x = torch.tensordot(x, basis, dims=([0], [1 if back else 0]))
    return x


@torch.no_grad()
def update_factors(factors: list[Tensor | None], grad: Tensor, shampoo_beta: float) -> None:
    """GG_i <- shampoo_beta GG_i + (1 - shampoo_beta) G_(i) G_(i)^T, G_(i) the mode-i unfolding of G."""
    for i, factor in enumerate(factors):
        if factor is None:
            continue
        other = [d for d in range(grad.dim()) if d != i]
        factor.lerp_(torch.tensordot(grad, grad, dims=(other, other)), 1.0 - shampoo_beta)


def eigenbases(factors: list[Tensor | None]) -> list[Tensor | None]:
    """Eigenvectors of each factor, columns ordered by decreasing eigenvalue."""
    bases = []
    for factor in factors:
        if factor is None:
            bases.append(None)
            continue
        _, vectors = torch.linalg.eigh(factor + 1e-30 * torch.eye(factor.size(0), device=factor.device,
                                                                   dtype=factor.dtype))
        bases.append(vectors.flip(1))
    return bases


def refresh_bases(factors: list[Tensor | None], bases: list[Tensor | None],
                  exp_avg_sq: Tensor) -> tuple[list[Tensor | None], Tensor]:
    """One power-iteration step with QR per factor: columns of GG_i Q_i sorted by the estimated eigenvalues
    diag(Q_i^T GG_i Q_i), then orthonormalized. The rotated second moment is permuted to the new column order.
    exp_avg_sq must have the (merged) shape of the factors; returns the new bases and the permuted moment."""
    new_bases = []
    for i, (factor, basis) in enumerate(zip(factors, bases)):
        if factor is None:
            new_bases.append(None)
            continue
        product = factor @ basis
        order = torch.argsort((basis * product).sum(dim=0), descending=True)
        exp_avg_sq = exp_avg_sq.index_select(i, order)
        new_bases.append(torch.linalg.qr(product.index_select(1, order)).Q)
    return new_bases, exp_avg_sq


class SOAP(CheckedParamGroups, Optimizer):
    """SOAP. Group key "step" (the first step only initializes the preconditioner). State per parameter:
    "exp_avg" (parameter shape), "exp_avg_sq" (parameter shape, rotated coordinates), "factors" and "bases" (one
    float32 matrix or None per (merged) dimension).

    shampoo_beta: EMA of the factors (None: beta2).
    """

    def __init__(self, params, lr: float = 3e-3, betas: tuple[float, float] = (0.95, 0.95),
                 shampoo_beta: float | None = None, eps: float = 1e-8, weight_decay: float = 0.01,
                 precondition_frequency: int = 10, max_precondition_dim: int = 10000, merge_dims: bool = False,
                 precondition_1d: bool = False, correct_bias: bool = True):
        if lr < 0.0:
            raise ValueError(f"SOAP: lr must be >= 0, got {lr}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"SOAP: betas must lie in [0, 1), got {betas}")
        if shampoo_beta is not None and not 0.0 <= shampoo_beta < 1.0:
            raise ValueError(f"SOAP: shampoo_beta must lie in [0, 1) or be None, got {shampoo_beta}")
        if precondition_frequency < 1:
            raise ValueError(f"SOAP: precondition_frequency must be >= 1, got {precondition_frequency}")
        if max_precondition_dim < 1:
            raise ValueError(f"SOAP: max_precondition_dim must be >= 1, got {max_precondition_dim}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), shampoo_beta=shampoo_beta, eps=eps,
                                      weight_decay=weight_decay, precondition_frequency=precondition_frequency,
                                      max_precondition_dim=max_precondition_dim, merge_dims=merge_dims,
                                      precondition_1d=precondition_1d, correct_bias=correct_bias, step=0))
        for group in self.param_groups:
            for p in group["params"]:
                if isinstance(p, DTensor):
                    raise ValueError(f"SOAP: parameter of shape {tuple(p.shape)} is a sharded DTensor; SOAP needs "
                                     f"whole matrices (use DDP / replicated parameters)")

    @staticmethod
    def _working_shape(p: Tensor, group: dict) -> list[int]:
        if group["merge_dims"] and p.dim() > 1:
            return merged_shape(p.shape, group["max_precondition_dim"])
        return list(p.shape)

    def _init_state(self, p: Tensor, grad: Tensor, group: dict) -> None:
        state = self.state[p]
        shape = self._working_shape(p, group)
        precondition = p.dim() > 1 or group["precondition_1d"]
        state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        state["factors"] = [torch.zeros(size, size, device=p.device, dtype=torch.float32)
                            if precondition and size <= group["max_precondition_dim"] else None for size in shape]
        update_factors(state["factors"], grad.reshape(shape), self._shampoo_beta(group))
        state["bases"] = eigenbases(state["factors"])

    @staticmethod
    def _shampoo_beta(group: dict) -> float:
        return group["shampoo_beta"] if group["shampoo_beta"] is not None else group["betas"][1]

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure_loss(closure)
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            group["step"] += 1
            if group["step"] == 1:
                for p in params:
                    self._init_state(p, p.grad.float(), group)
                continue
            beta1, beta2 = group["betas"]
            step = group["step"] - 1  # Adam steps taken, the first call having only initialized the bases.
            step_size = group["lr"]
            if group["correct_bias"]:
                step_size *= math.sqrt(1.0 - beta2 ** step) / (1.0 - beta1 ** step)
            for p in params:
                state = self.state[p]
                if not state:
                    self._init_state(p, p.grad.float(), group)
                self._update(p, state, group, step, step_size)
        return loss

    def _update(self, p: Tensor, state: dict, group: dict, step: int, step_size: float) -> None:
        beta1, beta2 = group["betas"]
        shape = self._working_shape(p, group)
        grad = p.grad.float().reshape(shape)
        bases = state["bases"]
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        exp_avg.lerp_(p.grad, 1.0 - beta1)
        rotated_grad = project(grad, bases)
        exp_avg_sq.lerp_(rotated_grad.square().reshape(p.shape).to(exp_avg_sq.dtype), 1.0 - beta2)
        denominator = exp_avg_sq.float().reshape(shape).sqrt().add_(group["eps"])
        direction = project(project(exp_avg.float().reshape(shape), bases) / denominator, bases, back=True)
        p.add_(direction.reshape(p.shape).to(p.dtype), alpha=-step_size)
        if group["weight_decay"] != 0.0:
            p.mul_(1.0 - group["lr"] * group["weight_decay"])
        update_factors(state["factors"], grad, self._shampoo_beta(group))
        if step % group["precondition_frequency"] == 0:
            state["bases"], permuted = refresh_bases(state["factors"], bases, exp_avg_sq.float().reshape(shape))
            exp_avg_sq.copy_(permuted.reshape(p.shape))
