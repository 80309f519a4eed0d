"""Local shards of DTensor parameters (FSDP2, tensor parallel) and sums over a parameter's shards.

The advanced optimizers update each parameter's local shard element-wise; the few quantities that need the whole
tensor (OrthoGrad's dot products, the cautious mask's kept fraction, Prodigy's D-adaptation sums) are local
partial sums that `ShardReducer` adds up over the mesh dimensions on which the parameter is sharded (not over
replicated dimensions, whose ranks hold the same values).
"""
from __future__ import annotations

import torch.distributed as dist
from torch import Tensor
from torch.distributed.tensor import DTensor


def local_tensor(tensor: Tensor) -> Tensor:
    """The local shard of a DTensor (a view sharing its storage), or the tensor itself."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


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
