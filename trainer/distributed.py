"""Process group, device mesh and model parallelization.

Mesh: (dp, fs, tp) with names ("dp", "fs", "tp"). dp = data-parallel replicas, fs = FSDP shards, tp = tensor
parallel. Data-parallel rank/size for the data loader come from the dp x fs sub-mesh (TP ranks read the same data).

`parallelize` applies, in this fixed order: the model package's tensor-parallel plan (tp > 1), activation
checkpointing (optional), torch.compile per block (optional, fullgraph), then FSDP2 `fully_shard` per block and at
the root (fs > 1, or HSDP with dp > 1), or DDP when nothing is sharded. Which axis the gradient sync covers depends on
`replicate_mesh_grad_sync`: when the optimizer syncs the replicas itself (Dion's compressed P/R sync), the dp axis
is left out of FSDP/DDP; otherwise FSDP/DDP sync full gradients over dp. A model built on the meta device
(trainer/build.py, sharded layouts) goes through the same steps and gets its storage and values afterwards.
"""
from __future__ import annotations

import contextlib
import datetime
import functools
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from trainer.config import TrainConfig
from trainer.errors import ConfigError, LayoutError


@dataclass
class Distributed:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    dp: int
    fs: int
    tp: int
    mesh: Any = None  # DeviceMesh (dp, fs, tp) when world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def data_rank(self) -> int:
        """Rank within the dp x fs sub-mesh: which slice of each global batch this process reads."""
        if self.mesh is None:
            return 0
        return self.mesh["dp"].get_local_rank() * self.fs + self.mesh["fs"].get_local_rank()

    @property
    def data_world_size(self) -> int:
        return self.dp * self.fs

    def submesh(self, name: str):
        size = {"dp": self.dp, "fs": self.fs, "tp": self.tp}[name]
        return self.mesh[name] if self.mesh is not None and size > 1 else None

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()


def mesh_sizes(config: TrainConfig, world_size: int) -> tuple[int, int, int]:
    """(dp, fs, tp): unspecified sizes are 1; all unspecified means DDP over every rank."""
    sizes = config.parallel
    if sizes.dp_size is None and sizes.fs_size is None and sizes.tp_size is None:
        return world_size, 1, 1
    dp, fs, tp = (sizes.dp_size or 1), (sizes.fs_size or 1), (sizes.tp_size or 1)
    if dp * fs * tp != world_size:
        raise ConfigError(f"parallel: dp_size x fs_size x tp_size = {dp} x {fs} x {tp} = {dp * fs * tp} must equal the "
                          f"number of processes ({world_size})")
    return dp, fs, tp


def init_distributed(config: TrainConfig) -> Distributed:
    """Initialize torch.distributed when launched by torchrun (gloo on CPU, nccl on CUDA) and build the mesh."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dp, fs, tp = mesh_sizes(config, world_size)
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    mesh = None
    if world_size > 1:
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                    timeout=datetime.timedelta(minutes=10))
        from torch.distributed.device_mesh import init_device_mesh
        mesh = init_device_mesh(device.type, (dp, fs, tp), mesh_dim_names=("dp", "fs", "tp"))
    return Distributed(rank, world_size, local_rank, device, dp, fs, tp, mesh)


def _fsdp_placement(param: nn.Parameter):
    """FSDP shards the matrix dimension that TP does not (so Dion sees rows sharded by one mesh and columns by the
    other); plain parameters shard rows."""
    from torch.distributed.tensor import DTensor, Shard
    if isinstance(param, DTensor) and param.ndim == 2:
        tp_dims = {p.dim for p in param.placements if isinstance(p, Shard)}
        if 0 in tp_dims:
            return Shard(1)
    return Shard(0)


def apply_activation_checkpointing(model: nn.Module, mode: str) -> None:
    """Recompute block activations in backward: every block ("full") or every second one ("selective", trading half
    the memory saving for half the recompute). The block's forward runs under torch.utils.checkpoint, so parameter
    names (and checkpoints) are the same with and without it."""
    if mode == "none":
        return
    from torch.utils.checkpoint import checkpoint
    for index, block in enumerate(model.blocks):
        if mode == "full" or index % 2 == 0:
            block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)


def compile_blocks(model: nn.Module, **compile_options: Any) -> None:
    """torch.compile each block's forward with fullgraph=True: a graph break (a print, an `.item()`, an unsupported
    call) fails at the first forward instead of silently splitting the block into several graphs with eager Python
    between them, a host round trip per break per block per step on a GPU.

    The forward function is compiled, not the module (`block.compile()`): with activation checkpointing the
    forward is torch.utils.checkpoint around the block's own forward, and Module.compile then compiles nothing
    (no frame counted by dynamo; with fullgraph it raises "found no compiled frames"). Compiling the forward
    traces the checkpointed region into the graph. `compile_options` (e.g. a faster `backend`) are for tests."""
    for block in model.blocks:
        block.forward = torch.compile(block.forward, fullgraph=True, **compile_options)


def parallelize(model: nn.Module, config: TrainConfig, env: Distributed, optimizer_syncs_replicas: bool) -> nn.Module:
    """Apply the model's TP plan, activation checkpointing, compile and FSDP2/DDP as described in the module
    docstring. Returns the module to train."""
    if env.tp > 1:
        from models import model_package
        apply_tensor_parallel = model_package(config.model_name).apply_tensor_parallel
        if apply_tensor_parallel is None:
            raise LayoutError(f"parallel.tp_size: model {config.model_name!r} has no tensor-parallel plan")
        try:
            apply_tensor_parallel(model, env.mesh["tp"], vocab_parallel=config.parallel.vocab_parallel)
        except ValueError as error:
            raise LayoutError(str(error)) from None
    apply_activation_checkpointing(model, config.parallel.activation_checkpointing)
    if config.compile:
        compile_blocks(model)
    if env.world_size == 1:
        return model
    replicate_by_wrapper = env.dp > 1 and not optimizer_syncs_replicas
    if env.fs > 1 or env.tp > 1 and replicate_by_wrapper:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
        if env.fs > 1:
            fsdp_mesh = env.mesh["dp", "fs"] if replicate_by_wrapper else env.mesh["fs"]
        else:  # TP with wrapper-synced replicas: shard over dp (same math as replicas, ZeRO-3 memory)
            fsdp_mesh = env.mesh["dp"]
        policy = MixedPrecisionPolicy(param_dtype=getattr(torch, config.precision.param_dtype),
                                      reduce_dtype=getattr(torch, config.precision.reduce_dtype))
        for block in model.blocks:
            fully_shard(block, mesh=fsdp_mesh, mp_policy=policy, shard_placement_fn=_fsdp_placement)
        fully_shard(model, mesh=fsdp_mesh, mp_policy=policy, shard_placement_fn=_fsdp_placement)
        return model
    if replicate_by_wrapper and env.tp == 1:
        from torch.nn.parallel import DistributedDataParallel
        return DistributedDataParallel(model, process_group=env.mesh["dp"].get_group(),
                                       device_ids=[env.local_rank] if env.device.type == "cuda" else None)
    return model


def no_gradient_sync(model: nn.Module, sync: bool, sharded_accumulation: bool = True):
    """Context for one micro-batch: skip the gradient all-reduce/reduce-scatter unless `sync` (the last one).

    FSDP2 with `sharded_accumulation` (parallel.fsdp_gradient_accumulation: sharded) reduce-scatters every
    micro-batch and sums the gradient shards, so no rank keeps a full gradient between micro-batches; under HSDP the
    all-reduce over the replicas still waits for the last one. Without it FSDP2 keeps each block's full gradient
    from one micro-batch to the next and reduce-scatters once (fewer collectives, full gradient memory)."""
    from torch.nn.parallel import DistributedDataParallel
    if isinstance(model, DistributedDataParallel):
        return contextlib.nullcontext() if sync else model.no_sync()
    from torch.distributed.fsdp import FSDPModule
    if isinstance(model, FSDPModule):
        if sharded_accumulation:
            model.set_requires_gradient_sync(True)
            model.set_requires_all_reduce(sync)
        else:
            model.set_requires_gradient_sync(sync)
    return contextlib.nullcontext()


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") and isinstance(model.module, nn.Module) else model


def broadcast_from_main(value: Any, env: Distributed) -> Any:
    """rank 0's value on every rank (picklable objects)."""
    if env.world_size == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_reduce_mean(value: torch.Tensor, env: Distributed) -> torch.Tensor:
    """Mean over the data-parallel ranks (TP ranks hold the same value)."""
    if env.world_size > 1:
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        value /= env.world_size
    return value


def clip_grad_norm_(parameters, max_norm: float = 0.0, replicate_group=None) -> torch.Tensor:
    """The global L2 norm of the parameters' gradients (a float32 scalar tensor on their device; DTensor norms are
    reduced over their meshes); with `max_norm` > 0 every gradient is then multiplied in place by
    clamp(max_norm / (norm + 1e-6), max=1), so the norm is at most `max_norm` (0 measures only).

    replicate_group: the data-parallel replicas whose gradients are still un-averaged because the optimizer syncs
    them itself (Dion's compressed P/R sync): the norm is then the one of their mean, as in synchronized training, at
    the price of one all-reduce of a copy of the gradients (in one flat buffer per dtype); the gradients themselves
    stay per-replica for the optimizer. No host sync: the caller decides when to read the norm."""
    from torch.distributed.tensor import DTensor
    grads = [p.grad for p in parameters if p.grad is not None]
    measured = _replica_mean(grads, replicate_group) if replicate_group is not None and grads else grads
    squares = []
    for grad in measured:
        norm = torch.linalg.vector_norm(grad.float())
        squares.append((norm.full_tensor() if isinstance(norm, DTensor) else norm) ** 2)
    total = torch.stack(squares).sum().sqrt() if squares else torch.zeros(())
    if max_norm > 0:
        clip = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        for grad in grads:
            grad.mul_(clip.to(grad.device))
    return total


def _replica_mean(grads: list[torch.Tensor], group) -> list[torch.Tensor]:
    """Copies of `grads` averaged over `group` (the gradients themselves are left for the optimizer)."""
    from torch.distributed.tensor import DTensor
    locals_ = [g.to_local() if isinstance(g, DTensor) else g for g in grads]
    averaged = list(locals_)
    for dtype in dict.fromkeys(g.dtype for g in locals_):
        indices = [i for i, g in enumerate(locals_) if g.dtype == dtype]
        flat = torch.cat([locals_[i].reshape(-1) for i in indices])
        dist.all_reduce(flat, group=group)
        flat /= dist.get_world_size(group)
        for i, piece in zip(indices, flat.split([locals_[i].numel() for i in indices])):
            averaged[i] = piece.view_as(locals_[i])
    return [DTensor.from_local(local, g.device_mesh, g.placements, run_check=False, shape=g.shape, stride=g.stride())
            if isinstance(g, DTensor) else local for g, local in zip(grads, averaged)]
