"""Dion, reference implementation: one matrix at a time, each collective waited for at once, closest to the paper.

Ahn et al. 2025, "Dion: Distributed Orthonormalized Updates" (arXiv 2504.05295), Algorithm 1 with error feedback.
For a matrix X (m x n, m >= n; Dion works on X^T when m < n), momentum M, gradient G and Q (n x r):

    B = M + G                          (momentum dtype)
    P = orth(B Q)                      (m x r, orthonormal columns; QR in float32, float64 for float64 inputs)
    R = B^T P                          (n x r)
    M <- B - (1 - mu) P R^T            (error feedback: what the rank-r step did not use stays in M)
    Q <- ColumnNormalize(R)            (R_j / (||R_j|| + eps))
    X <- X (1 - lr wd) - lr sqrt(m/n) P Q^T

power_iters > 1 repeats P = orth(B Q), Q = R before the last three lines. Sharded and replicated matrices follow the
pattern of optimizers/dion/distributed.py; `optimizers.dion.Dion` and `optimizers.dion.overlapped.DionAsync` are the
fast twins, tested against this class step by step.
"""
from __future__ import annotations

import torch
from torch.distributed import ProcessGroup

from optimizers.dion.core import DionBase, MatrixTask, orthonormalize
from optimizers.dion.distributed import Collectives, all_reduce, all_reduce_mean, run_blocking, sum_then_average
from optimizers.dion.linalg import column_normalize, column_sq_norms, update_scale


def dion_reference_update(task: MatrixTask, replicate_group: ProcessGroup | None, power_iters: int,
                          oversample: float) -> Collectives:
    """Algorithm 1 for one matrix, in place on task.param, task.momentum and task.Q (local shards).

    replicate_group: the replicas whose gradients this update averages (None: gradients are already in sync).
    A zero or non-finite B leaves M and Q unchanged and makes the low-rank term zero (weight decay still applies)."""
    layout = task.layout
    G = task.grad
    if task.average_gradient:
        G = G.clone()
        yield from all_reduce_mean(G, replicate_group)
    compressed_group = replicate_group if task.compressed else None
    B = torch.add(task.momentum, G).to(task.momentum.dtype)
    A = B.T if layout.transposed else B
    Q = task.Q.to(B.dtype)
    for iteration in range(power_iters):
        if iteration == 0 and task.projection is not None:  # A Q averaged over the replicas during backward
            P = task.projection
        else:
            P = A @ Q
            yield from sum_then_average(P, layout.column_group, compressed_group)
        P, valid = yield from orthonormalize(P[None], task.qr_method, layout, task.sketch_seed, oversample)
        P, valid = P[0].to(B.dtype), valid[0]
        R = A.T @ P
        yield from sum_then_average(R, layout.row_group, compressed_group)
        Q = R
    P = torch.where(valid, P, 0.0)

    sq_norms = column_sq_norms(R)
    yield all_reduce(sq_norms, layout.column_group)
    Q_new = torch.where(valid, column_normalize(R, sq_norms, task.epsilon), task.Q)
    task.Q.copy_(Q_new)

    feedback = P @ R.T
    M_new = B - (1.0 - task.mu) * (feedback.T if layout.transposed else feedback)
    task.momentum.copy_(torch.where(valid, M_new, task.momentum))

    update = P @ Q_new.to(B.dtype).T
    task.param.mul_(1.0 - task.lr * task.weight_decay)
    task.param.add_(update.T if layout.transposed else update, alpha=-task.lr * update_scale(*layout.shape))


class DionReference(DionBase):
    """Dion (arXiv 2504.05295, Algorithm 1), unbatched: every matrix runs `dion_reference_update` on its own. Same
    constructor, options, state and distributed support as `Dion`; see `optimizers.dion.core.DionBase`."""

    def _update_matrices(self, tasks: list[MatrixTask]) -> None:
        for task in tasks:
            run_blocking(dion_reference_update(task, self._replicate_group, self._power_iters, self._rcqr_oversample))
