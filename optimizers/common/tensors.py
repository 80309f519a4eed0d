"""Tensor helpers shared by every optimizer that accepts DTensor (FSDP2 / TP) parameters."""
from __future__ import annotations

import torch
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


def tensor_bytes(value) -> int:
    """Bytes of every tensor in a (possibly nested) state value; a DTensor counts its local shard."""
    if isinstance(value, Tensor):
        local = local_tensor(value)
        return local.numel() * local.element_size()
    if isinstance(value, dict):
        return sum(tensor_bytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(tensor_bytes(v) for v in value)
    return 0


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of the tensors in `optimizer.state` on this rank (packed and factored states at their real size)."""
    return sum(tensor_bytes(state) for state in optimizer.state.values())
