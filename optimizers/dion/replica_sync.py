"""Dion's replica averages that can start during backward (as DDP's bucketed reducer does).

When Dion owns the data-parallel sync (`replicate_mesh_grad_sync`), the gradients of the scalar-algorithm parameters
(embedding, LM head, norm gains) and of the Dion matrices that are not compressed are averaged in full over the
replicas. Their average does not depend on the optimizer state, so it can start as soon as a gradient is final,
while backward is still computing the gradients of earlier layers, instead of after backward inside step(). So can
the first average of a compressed matrix whose shards no group sums (a DDP-like layout): P = (M + G) Q needs only
the final gradient and the momentum and Q of the previous step, so it is computed and averaged here too, and step()
starts from the averaged P.

`BackwardReplicaSync` does that from post-accumulate-grad hooks:
- the parameters are cut into buckets of about `bucket_bytes`, in reverse registration order (backward produces the
  last layers' gradients first), one dtype per bucket;
- a bucket's all-reduce starts when all of its gradients are final, strictly in bucket order, so every rank issues the
  same collectives in the same order whatever order the hooks fire in; a projected matrix contributes its P
  (`project(param)`) instead of its gradient;
- at the end of backward (an autograd engine callback) the buckets not started yet are started (a parameter without a
  gradient is left out), all are waited for, and the averages are written back into `.grad` (gradients) or kept in
  `projections` (P).
Only a backward announced with `arm(True)` syncs (the last micro-batch of a step: the gradients are final then); the
other micro-batches accumulate locally. The loop announces each backward through `TrainingHooks.prepare_backward`.

FSDP2 calls the post-accumulate-grad hooks of its sharded parameters once it has reduce-scattered their gradients
(on the micro-batch that syncs), so the same code averages a sharded gradient's local shard over the replicas, right
after its reduce-scatter over the shard group. A DTensor gradient whose placements differ from its parameter's (a
Partial gradient under tensor parallelism) is redistributed first and replaced by the averaged DTensor.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed import ProcessGroup
from torch.distributed.tensor import DTensor

from optimizers.common.tensors import local_gradient, local_tensor


def _queue_end_of_backward(callback) -> None:
    """Run `callback` once the current backward has finished (the engine's final callbacks, as DDP and FSDP2 use)."""
    torch.autograd.Variable._execution_engine.queue_callback(callback)


class BackwardReplicaSync:
    """Average over `group`, during the backward that `arm(True)` announced, the gradients of `params`, except for
    the parameters in `projected`, whose contribution is `project(param)` (a P = (M + G) Q)."""

    def __init__(self, params: list[Tensor], group: ProcessGroup, bucket_bytes: int,
                 projected: set[Tensor] | None = None, project: Callable[[Tensor], Tensor] | None = None):
        self._group = group
        self._world = dist.get_world_size(group)
        self._projected = projected or set()
        self._project = project
        self._buckets: list[list[Tensor]] = []
        size = 0
        for p in reversed(params):
            nbytes = p.numel() * p.element_size()
            if not self._buckets or size + nbytes > bucket_bytes or self._buckets[-1][0].dtype != p.dtype:
                self._buckets.append([])
                size = 0
            self._buckets[-1].append(p)
            size += nbytes
        self._bucket_of = {p: i for i, bucket in enumerate(self._buckets) for p in bucket}
        for p in params:
            p.register_post_accumulate_grad_hook(self._gradient_ready)
        self._armed = False
        self._projecting = True
        self._reset()
        # For the coming step (step() takes and clears them): the parameters whose .grad holds the replicas'
        # average, and the replicas' average of P = (M + G) Q of the projected ones.
        self.synced: set[Tensor] = set()
        self.projections: dict[Tensor, tuple[Tensor, int]] = {}

    def projection(self, p: Tensor) -> Tensor | None:
        """The replicas' average of P = (M + G) Q taken during backward, or None when there is none or `p.grad` was
        modified in place since (a loop that clips or rescales gradients after backward): step() computes P then.
        Every rank decides alike as long as every rank modifies its gradients alike, as clipping by the global norm
        does."""
        entry = self.projections.get(p)
        if entry is None or p.grad is None or local_tensor(p.grad)._version != entry[1]:
            return None
        return entry[0]

    def _reset(self) -> None:
        self._ready = [0] * len(self._buckets)
        self._started = 0
        self._in_flight: list[tuple[object, Tensor, list[Tensor], list[Tensor]]] = []
        self._callback_queued = False

    def arm(self, syncs: bool, project: bool = True) -> None:
        """Announce the next backward: `syncs` when its gradients are final (the last micro-batch of a step);
        `project` False leaves the projected parameters out (their P is then computed in step())."""
        self._armed = syncs
        self._projecting = project
        self._reset()
        # This backward changes the gradients: an earlier average no longer holds.
        self.synced.clear()
        self.projections.clear()

    def _gradient_ready(self, param: Tensor) -> None:
        if not self._armed:
            return
        if not self._callback_queued:
            _queue_end_of_backward(self._finish)
            self._callback_queued = True
        self._ready[self._bucket_of[param]] += 1
        while self._started < len(self._buckets) and self._ready[self._started] == len(self._buckets[self._started]):
            self._start(self._buckets[self._started])
            self._started += 1

    def _start(self, bucket: list[Tensor]) -> None:
        params = [p for p in bucket if p.grad is not None and (self._projecting or p not in self._projected)]
        payloads = [self._project(p) if p in self._projected else local_gradient(p) for p in params]
        if not params:
            return
        flat = torch.cat([t.reshape(-1) for t in payloads])
        work = dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=self._group, async_op=True)
        self._in_flight.append((work, flat, params, payloads))

    def _finish(self) -> None:
        """End of backward: start the remaining buckets, wait for all, write the averages back."""
        while self._started < len(self._buckets):
            self._start(self._buckets[self._started])
            self._started += 1
        for work, flat, params, payloads in self._in_flight:
            work.wait()
            if flat.is_cuda:  # allocated on FSDP2's reduce-scatter stream, now used on this one
                flat.record_stream(torch.cuda.current_stream(flat.device))
            flat.div_(self._world)
            for p, payload, piece in zip(params, payloads, flat.split([t.numel() for t in payloads])):
                averaged = piece.view_as(payload).to(payload.dtype)
                if p in self._projected:
                    # Kept with the gradient's version: a gradient changed in place after backward (clipping)
                    # no longer gives this P, and step() then computes P itself (`projection`).
                    self.projections[p] = (averaged, local_tensor(p.grad)._version)
                    continue
                if isinstance(p.grad, DTensor) and p.grad.placements != p.placements:
                    p.grad = DTensor.from_local(averaged, p.device_mesh, p.placements, run_check=False,
                                                shape=p.shape, stride=p.stride())
                else:
                    local_tensor(p.grad).copy_(averaged)
                self.synced.add(p)
        self._armed = False
        self._reset()
