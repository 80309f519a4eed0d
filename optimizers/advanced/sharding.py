"""Local shards of DTensor parameters (FSDP2, tensor parallel) and sums over a parameter's shards.

The advanced optimizers update each parameter's local shard element-wise; the few quantities that need the whole
tensor (OrthoGrad's dot products, the cautious mask's kept fraction, Prodigy's D-adaptation sums) are local
partial sums that `ShardReducer` adds up over the mesh dimensions on which the parameter is sharded (not over
replicated dimensions, whose ranks hold the same values).

State that describes one rank's shard only (factored moments, Prodigy's sliced `s` and `p0`) is kept in
`per_shard_state` buffers: for a DTensor parameter a 1-D DTensor sharded over the same mesh dimensions, of the same
length on every rank (the largest any rank needs; each rank uses a prefix), so that torch.distributed.checkpoint
saves and restores every rank's part instead of treating the tensor as replicated.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.tensor import DTensor, Replicate, Shard


def local_tensor(tensor: Tensor) -> Tensor:
    """The local shard of a DTensor (a view sharing its storage), or the tensor itself."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def local_gradient(param: Tensor) -> Tensor:
    """The local shard of param.grad laid out like the parameter. A replicated DTensor parameter used on sharded
    activations (the QK-norm gains under tensor parallelism) gets a Partial gradient, whose local tensor is only
    this rank's share of the sum: redistributing to the parameter's placements adds the shares up."""
    grad = param.grad
    if isinstance(grad, DTensor) and grad.placements != param.placements:
        grad = grad.redistribute(param.device_mesh, param.placements)
    return local_tensor(grad)


def shard_groups(param: Tensor) -> tuple:
    """Process groups of the mesh dimensions over which `param` is sharded (empty for a plain tensor)."""
    if not isinstance(param, DTensor):
        return ()
    mesh = param.device_mesh
    return tuple(mesh.get_group(dim) for dim, placement in enumerate(param.placements) if placement.is_shard())


class ShardReducer:
    """Callable summing a tensor of partial sums in place over the given process groups."""

    def __init__(self, groups: tuple):
        self.groups = groups

    def __call__(self, partial_sums: Tensor) -> Tensor:
        for group in self.groups:
            dist.all_reduce(partial_sums, op=dist.ReduceOp.SUM, group=group)
        return partial_sums


def per_shard_state(param: Tensor, lengths: list[int], dtypes: list[torch.dtype]) -> list[Tensor]:
    """Zero 1-D buffers for this rank's shard of `param`, one per requested length, each at least that long (see the
    module doc). For a DTensor parameter the lengths are agreed on with one all-reduce over its shard groups, so all
    ranks must call this for the same parameters in the same order (as they step them)."""
    device = local_tensor(param).device
    groups = shard_groups(param)
    if groups:
        agreed = torch.tensor(lengths, dtype=torch.int64, device=device)
        for group in groups:
            dist.all_reduce(agreed, op=dist.ReduceOp.MAX, group=group)
        lengths = agreed.tolist()
    buffers = [torch.zeros(length, dtype=dtype, device=device) for length, dtype in zip(lengths, dtypes)]
    if not isinstance(param, DTensor):
        return buffers
    placements = [Shard(0) if placement.is_shard() else Replicate() for placement in param.placements]
    return [DTensor.from_local(buffer, param.device_mesh, placements, run_check=False) for buffer in buffers]


def write_prefix(state: dict, key: str, value: Tensor) -> None:
    """Store the flat `value` at the start of the per-shard buffer state[key]. A buffer whose dtype was changed (a
    container casting state to the parameter's dtype on load) is rebuilt with the value's dtype."""
    buffer = state[key]
    local = local_tensor(buffer)
    if local.dtype != value.dtype:
        rebuilt = torch.zeros(local.shape, dtype=value.dtype, device=local.device)
        rebuilt[:value.numel()] = value.reshape(-1)
        state[key] = (DTensor.from_local(rebuilt, buffer.device_mesh, buffer.placements, run_check=False)
                      if isinstance(buffer, DTensor) else rebuilt)
        return
    local[:value.numel()] = value.reshape(-1)


def read_prefix(state: dict, key: str, length: int) -> Tensor:
    """The first `length` entries of the per-shard buffer state[key] (a view of the local buffer)."""
    return local_tensor(state[key])[:length]
