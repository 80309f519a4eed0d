"""Dion, synchronous and batched (`--optimizer dion`): the fast implementation of arXiv 2504.05295, Algorithm 1.

Matrices with the same shape, sharding, dtypes and options are stacked and updated together, so every matmul is one
batched call (torch.bmm / baddbmm) and every collective moves a whole stack:

    B = M + G                          stacked into one (b, m, n) buffer, which later holds the update P Q^T
    P = orth(B Q)                      one bmm; summed over the column shards, averaged over the replicas (compressed)
    R = B^T P                          one bmm; summed over the row shards, averaged over the replicas (compressed)
    Q <- ColumnNormalize(R)            column norms all-reduced over the column shards
    M <- B - (1 - mu) P R^T            one baddbmm, in place
    X <- X (1 - lr wd) - lr sqrt(m/n) P Q^T

The communication pattern of each sharding case is the one of optimizers/dion/distributed.py: no rank ever gathers a
sharded matrix, only the low-rank P, R and r x r Gram matrices travel, and the replicas average only this rank's share
of a P or R that its shard group holds in common (`sum_then_average`). `optimizers.dion.reference.DionReference` is
the one-matrix-at-a-time twin; `optimizers.dion.overlapped.DionAsync` divides the orthonormalization among ranks and
overlaps batches.
"""
from __future__ import annotations

import torch
from torch import Tensor

from optimizers.dion.core import DionBase, MatrixTask, orthonormalize
from optimizers.dion.distributed import (Collectives, all_gather_batch, all_reduce, all_reduce_mean, group_size,
                                         reduce_scatter_batch, run_blocking, sum_then_average)
from optimizers.dion.linalg import column_normalize, column_sq_norms, update_scale


class Dion(DionBase):
    """Dion (arXiv 2504.05295, Algorithm 1) on same-shape batches, synchronous. Constructor, options and state:
    see `optimizers.dion.core.DionBase`."""

    # Matrices per batch: large enough to fill the device with one bmm, small enough to bound the (b, m, n) buffer.
    batch_size = 16
    # Orthonormalize each batch once per group of ranks that hold the same P, each rank taking a share (DionAsync).
    divide_orthonormalization = False

    def _update_matrices(self, tasks: list[MatrixTask]) -> None:
        for batch in self._batches(tasks):
            run_blocking(self._batch_update(batch))

    def _owner_group(self, task: MatrixTask):
        """The group whose ranks all hold the same P after its reduction (the column shards, else the replicas of a
        compressed sync): with divide_orthonormalization they reduce-scatter P instead of all-reducing it."""
        if not self.divide_orthonormalization:
            return None
        if task.layout.column_group is not None:
            return task.layout.column_group
        return self._replicate_group if task.compressed else None

    def _batches(self, tasks: list[MatrixTask]) -> list[list[MatrixTask]]:
        """Tasks grouped by batch key (in first-seen order, identical on every rank), cut into batches of
        `batch_size` rounded up to a multiple of the owner group's size."""
        groups: dict[tuple, list[MatrixTask]] = {}
        for task in tasks:
            groups.setdefault(task.batch_key(), []).append(task)
        batches = []
        for same in groups.values():
            owners = group_size(self._owner_group(same[0]))
            size = owners * -(-self.batch_size // owners)
            batches.extend(same[i:i + size] for i in range(0, len(same), size))
        return batches

    def _orthonormalized(self, P: Tensor, tasks: list[MatrixTask]) -> Collectives:
        """orth(P) for a stack of partial P = B Q (summed over the column shards and averaged over the replicas of a
        compressed sync first). Returns (P in P's dtype, (b,) bool valid), as `orthonormalize`."""
        head = tasks[0]
        layout = head.layout
        replicas = self._replicate_group if head.compressed else None
        owners = self._owner_group(head)
        if owners is None:
            yield from sum_then_average(P, layout.column_group, replicas)
            orthonormal, valid = yield from orthonormalize(P, head.qr_method, layout, head.sketch_seed,
                                                           self._rcqr_oversample)
            return orthonormal.to(P.dtype), valid
        # Reduce-scatter + all-gather moves as much as an all-reduce, and each rank orthonormalizes only its share.
        count, world = len(tasks), group_size(owners)
        padded = world * -(-count // world)
        if padded > count:
            P = torch.cat([P, P.new_zeros((padded - count, *P.shape[1:]))])
        mine = yield from reduce_scatter_batch(P, owners)
        for group in (layout.column_group, replicas):
            if group is not None and group is not owners:
                yield all_reduce(mine, group)
        if replicas is not None:
            mine.div_(group_size(replicas))
        mine, valid = yield from orthonormalize(mine, head.qr_method, layout, head.sketch_seed, self._rcqr_oversample)
        orthonormal, valid = yield from all_gather_batch(mine.to(P.dtype), valid.to(torch.uint8), group=owners)
        return orthonormal[:count], valid[:count].bool()

    def _batch_update(self, tasks: list[MatrixTask]) -> Collectives:
        """Algorithm 1 for a stack of matrices with one batch key, in place on their params, momenta and Qs."""
        head = tasks[0]
        layout = head.layout
        momenta = [task.momentum for task in tasks]
        grads = [task.grad for task in tasks]
        if head.average_gradient:
            stacked = torch.stack(grads)
            yield from all_reduce_mean(stacked, self._replicate_group)
            grads = stacked.unbind(0)
        B = torch.empty((len(tasks), *head.momentum.shape), dtype=head.momentum.dtype, device=head.momentum.device)
        for i, (momentum, grad) in enumerate(zip(momenta, grads)):
            torch.add(momentum, grad, out=B[i])
        A = B.mT if layout.transposed else B
        Q_old = torch.stack([task.Q for task in tasks])
        Q = Q_old.to(B.dtype)
        replicas = self._replicate_group if head.compressed else None
        for _ in range(self._power_iters):
            P, valid = yield from self._orthonormalized(torch.bmm(A, Q), tasks)
            R = torch.bmm(A.mT, P)
            yield from sum_then_average(R, layout.row_group, replicas)
            Q = R
        valid = valid[:, None, None]
        P = torch.where(valid, P, 0.0)

        sq_norms = column_sq_norms(R)
        yield all_reduce(sq_norms, layout.column_group)
        Q_new = torch.where(valid, column_normalize(R, sq_norms, head.epsilon), Q_old)
        torch._foreach_copy_([task.Q for task in tasks], list(Q_new.unbind(0)))

        if layout.transposed:
            B.baddbmm_(R, P.mT, alpha=-(1.0 - head.mu))
        else:
            B.baddbmm_(P, R.mT, alpha=-(1.0 - head.mu))
        for i, momentum in enumerate(momenta):
            torch.where(valid[i], B[i], momentum, out=momentum)

        Q_new = Q_new.to(B.dtype)
        if layout.transposed:
            torch.bmm(Q_new, P.mT, out=B)
        else:
            torch.bmm(P, Q_new.mT, out=B)
        params = [task.param for task in tasks]
        if head.weight_decay != 0.0:
            torch._foreach_mul_(params, 1.0 - head.lr * head.weight_decay)
        torch._foreach_add_(params, list(B.unbind(0)), alpha=-head.lr * update_scale(*layout.shape))
