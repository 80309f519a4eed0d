"""torchrun worker for tests/optimizers/test_muon.py: Muon on FSDP2-sharded DTensors and on DDP-replicated plain
tensors (split across ranks) must match single-process Muon.

Usage: torchrun --standalone --nproc_per_node=2 muon_distributed_worker.py OUTPUT.json
Every rank trains the same tiny model on the same batches three ways; rank 0 writes the largest absolute difference
of each distributed run from the single-process run.
"""
from __future__ import annotations

import copy
import json
import sys

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

from optimizers.muon import Muon

STEPS = 3


class TinyNet(nn.Module):
    """Matrices of repeated shapes (batched Newton-Schulz), uneven row counts over 2 ranks (5 and 1 rows: one rank
    holds an empty shard), a tall and a wide matrix, an embedding and a norm gain for the scalar algorithm."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(11, 6)
        self.a = nn.Linear(6, 8, bias=False)
        self.b = nn.Linear(6, 8, bias=False)
        self.c = nn.Linear(8, 5, bias=False)
        self.d = nn.Linear(5, 6, bias=False)
        self.e = nn.Linear(6, 1, bias=False)
        self.gain = nn.Parameter(torch.ones(6))

    def matrices(self) -> list[nn.Parameter]:
        return [m.weight for m in (self.a, self.b, self.c, self.d, self.e)]

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        h = torch.relu(self.a(x)) + torch.tanh(self.b(x))
        y = self.e(self.d(self.c(h)) * self.gain)
        return (y - 1.0).square().mean()


def make_optimizer(model: TinyNet, **kwargs) -> Muon:
    groups = [dict(params=model.matrices()),
              dict(params=[model.embed.weight], algorithm="adamw", lr=0.01),
              dict(params=[model.gain], algorithm="lion", lr=0.001)]
    return Muon(groups, lr=0.05, weight_decay=0.1, ns_dtype="float32", **kwargs)


def train(model: TinyNet, optimizer: Muon, batches: list[torch.Tensor], average_grads: bool = False) -> None:
    for tokens in batches:
        optimizer.zero_grad()
        model(tokens).backward()
        if average_grads:
            for p in model.parameters():
                dist.all_reduce(p.grad, op=dist.ReduceOp.AVG)
        optimizer.step()


def full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


def max_difference(model: nn.Module, reference: nn.Module) -> float:
    return max((full(p.detach()) - q.detach()).abs().max().item()
               for p, q in zip(model.parameters(), reference.parameters()))


def main() -> None:
    dist.init_process_group("gloo")
    torch.manual_seed(0)
    base = TinyNet()
    batches = [torch.randint(0, 11, (4, 3)) for _ in range(STEPS)]

    reference = copy.deepcopy(base)
    train(reference, make_optimizer(reference), batches)

    replicated = copy.deepcopy(base)
    train(replicated, make_optimizer(replicated, distributed_mesh=dist.group.WORLD), batches, average_grads=True)

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    sharded = copy.deepcopy(base)
    for module in (sharded.embed, sharded.a, sharded.b, sharded.c, sharded.d, sharded.e):
        fully_shard(module, mesh=mesh)
    fully_shard(sharded, mesh=mesh)
    optimizer = make_optimizer(sharded)
    train(sharded, optimizer, batches)
    momentum_is_sharded = all(isinstance(optimizer.state[p]["momentum"], DTensor) for p in sharded.matrices())

    result = dict(replicated=max_difference(replicated, reference), fsdp=max_difference(sharded, reference),
                  moved=max_difference(base, reference), momentum_is_sharded=momentum_is_sharded)
    if dist.get_rank() == 0:
        with open(sys.argv[1], "w") as f:
            json.dump(result, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
