"""Tensor helpers shared by every optimizer that accepts DTensor (FSDP2 / TP) parameters."""
from __future__ import annotations

from torch import Tensor
from torch.distributed.tensor import DTensor


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
