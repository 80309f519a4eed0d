"""One process under torchrun for tests/gpu/test_cuda.py; prints one JSON line as its last output.

    torchrun --standalone --nproc_per_node=1 tests/gpu/gpu_worker.py nccl
    torchrun --standalone --nproc_per_node=1 tests/gpu/gpu_worker.py fsdp_compile dion

NCCL on CUDA; without a GPU it runs on the CPU with gloo (how it was written and calibrated).
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from models.gpt.model import GPT  # noqa: E402
from optimizers.registry import OptimizerContext, build_optimizer, get_spec  # noqa: E402
from trainer.config import build_config  # noqa: E402
from trainer.distributed import compile_blocks  # noqa: E402

STEPS = 6


def start() -> torch.device:
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl")
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    return device


def nccl(device: torch.device) -> dict:
    """The collectives train.py relies on, over a process group and a (dp, fs, tp) mesh of one rank."""
    from torch.distributed.device_mesh import init_device_mesh
    mesh = init_device_mesh(device.type, (1, 1, 1), mesh_dim_names=("dp", "fs", "tp"))
    value = torch.full((), 3.0, device=device)
    dist.all_reduce(value, group=mesh["dp"].get_group())
    box = ["ok" if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    dist.barrier()
    return dict(backend=dist.get_backend(), world_size=dist.get_world_size(), all_reduce=value.item(),
                mesh=list(mesh.shape), broadcast=box[0])


def fsdp_compile(device: torch.device, optimizer_name: str) -> dict:
    """STEPS training steps of a small GPT, eager and unsharded against compiled blocks under FSDP2 (a one-rank
    mesh; the optimizer gets it as its shard mesh where it supports sharding), bf16 autocast in both."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor
    mesh = init_device_mesh(device.type, (1,), mesh_dim_names=("fs",))
    config = build_config(["--model_dim", "128", "--n_layer", "2", "--n_head", "2", "--sequence_length", "128",
                           "--optimizer", optimizer_name])
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 64, (STEPS, 4, 129), generator=generator)  # 64 of the 50,304 ids: learnable at once

    def full(tensor: torch.Tensor) -> torch.Tensor:
        return (tensor.full_tensor() if isinstance(tensor, DTensor) else tensor).detach().float().cpu().clone()

    def train(compiled: bool):
        torch.manual_seed(0)
        model = GPT(config.model).to(device)
        shard_mesh = None
        if compiled:
            compile_blocks(model)
            for block in model.blocks:
                fully_shard(block, mesh=mesh)
            fully_shard(model, mesh=mesh)
            shard_mesh = mesh if get_spec(optimizer_name).supports_sharding else None
        start = {name: full(p) for name, p in model.named_parameters()}
        optimizer = build_optimizer(optimizer_name, OptimizerContext.from_groups(
            model.param_groups(), model_dim=config.model.model_dim, options=dict(config.optimizer.options),
            tokens_per_step=4 * 128, outer_shard_mesh=shard_mesh))
        losses = []
        for batch in tokens.to(device):
            with torch.autocast(device.type, dtype=torch.bfloat16):
                loss = model(batch[:, :-1], batch[:, 1:])
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
        return losses, start, {name: full(p) for name, p in model.named_parameters()}

    eager_losses, start, eager = train(compiled=False)
    compiled_losses, _, compiled = train(compiled=True)
    # Per parameter: |compiled - eager| / |eager movement| in the Frobenius norm (a max over entries would count
    # AdamW's first steps, sign-like, flipping on gradients near zero).
    gaps = {name: ((compiled[name] - eager[name]).norm() / (eager[name] - start[name]).norm()).item()
            for name in eager}
    worst = max(gaps, key=gaps.get)
    return dict(steps=STEPS, eager_losses=eager_losses, compiled_losses=compiled_losses, worst_parameter=worst,
                largest_gap=gaps[worst], median_gap=sorted(gaps.values())[len(gaps) // 2])


def main(argv: list[str]) -> None:
    device = start()
    try:
        result = nccl(device) if argv[0] == "nccl" else fsdp_compile(device, argv[1])
    finally:
        dist.destroy_process_group()
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
