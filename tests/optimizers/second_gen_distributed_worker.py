"""torchrun worker for tests/optimizers/test_second_gen_distributed.py: Muon, NorMuon, Dion2 and NorDion2 (global
selection) under DDP, FSDP2, TP, HSDP and FSDP2 + TP must give the single-process result, with every matrix
orthogonalized by exactly one rank per step; Dion2's local selection must send only the chosen rows.

Usage: torchrun --standalone --nproc_per_node=N second_gen_distributed_worker.py OUTPUT.json LAYOUT [LAYOUT ...]
LAYOUT: ddp, fsdp, tp (N = 2), hsdp, fsdp_tp (N = 4), local_scope (N = 2).
Every rank builds the same float64 matrices and gradients; the parameters are then placed as the layout says
(gradients placed the same way), so the comparison sees the optimizer only. Rank 0 writes the results.
"""
from __future__ import annotations

import json
import math
import sys

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

from optimizers.muon import Dion2, Muon, NorDion2, NorMuon

STEPS = 6
# Tall, wide, a duplicate shape, uneven splits over 2 and 4 ranks, and a 3-row matrix (empty shards on 4 ranks).
SHAPES = [(8, 6), (6, 8), (8, 6), (5, 7), (7, 5), (3, 8)]
ALGORITHMS = {"muon": (Muon, dict(mu=0.9)), "normuon": (NorMuon, dict(nesterov=True)),
              "dion2": (Dion2, dict(fraction=0.5)), "nordion2": (NorDion2, dict(fraction=0.5))}
MESHES = {"fsdp": ((2,), ("fs",)), "tp": ((2,), ("tp",)), "hsdp": ((2, 2), ("dp", "fs")),
          "fsdp_tp": ((2, 2), ("fs", "tp")), "local_scope": ((2,), ("fs",))}


def placements(layout: str, index: int) -> list:
    """Matrix placements of each layout; TP alternates column-parallel (Shard(0)) and row-parallel (Shard(1))."""
    return {"fsdp": [Shard(0)], "local_scope": [Shard(0)], "tp": [Shard(index % 2)],
            "hsdp": [Replicate(), Shard(0)], "fsdp_tp": [Shard(0), Shard(index % 2)]}[layout]


class CountingPolar:
    """Exact polar factor by SVD that counts the matrices this rank orthogonalizes."""

    def __init__(self):
        self.count = 0

    def __call__(self, matrices: torch.Tensor, epsilon: float) -> torch.Tensor:
        self.count += matrices.shape[0]
        u, _, vh = torch.linalg.svd(matrices, full_matrices=False)
        return u @ vh


def full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


def run(name: str, layout: str, orthogonalizer, **extra) -> list[torch.Tensor]:
    cls, options = ALGORITHMS[name]
    *start, vector = initial()
    grads = [[torch.randn(s, dtype=torch.float64) for s in SHAPES] + [torch.randn(6, dtype=torch.float64)]
             for _ in range(STEPS)]
    mesh = None
    if layout in MESHES:
        mesh = init_device_mesh("cpu", MESHES[layout][0], mesh_dim_names=MESHES[layout][1])
        matrix_placements = [placements(layout, i) for i in range(len(SHAPES))]
        vector_placements = [Replicate()] * mesh.ndim
        params = [nn.Parameter(distribute_tensor(x, mesh, pl)) for x, pl in zip(start, matrix_placements)]
        params.append(nn.Parameter(distribute_tensor(vector, mesh, vector_placements)))
        place = [lambda g, pl=pl: distribute_tensor(g, mesh, pl) for pl in matrix_placements + [vector_placements]]
    else:
        params = [nn.Parameter(x.clone()) for x in start + [vector]]
        place = [torch.clone] * len(params)
        if layout == "ddp":
            extra["distributed_mesh"] = dist.group.WORLD
    optimizer = cls([dict(params=params[:-1]), dict(params=params[-1:], algorithm="adamw", lr=0.01)],
                    lr=0.05, weight_decay=0.1, orthogonalizer=orthogonalizer, **options, **extra)
    for step_grads in grads:
        for p, g, put in zip(params, step_grads, place):
            p.grad = put(g)
        optimizer.step()
    return [full(p.detach()) for p in params]


def initial() -> list[torch.Tensor]:
    torch.manual_seed(0)
    return [torch.randn(s, dtype=torch.float64) for s in SHAPES] + [torch.randn(6, dtype=torch.float64)]


def relative_difference(xs: list[torch.Tensor], ys: list[torch.Tensor]) -> float:
    return max(((x - y).abs().max() / y.abs().max()).item() for x, y in zip(xs, ys))


def local_scope() -> dict:
    """Dion2, selection_scope local, FSDP2 over 2 ranks, one step from zero momentum without weight decay: each
    shard moves exactly ceil(fraction x its rows) rows, and the all_to_all_single traffic is the chosen rows only
    (padded to the larger shard's count), both ways."""
    sent = []
    original = dist.all_to_all_single

    def counting(output, input, *args, **kwargs):
        sent.append(input.numel() * input.element_size())
        return original(output, input, *args, **kwargs)

    dist.all_to_all_single = counting
    mesh = init_device_mesh("cpu", (2,), mesh_dim_names=("fs",))
    fraction, shape = 0.25, (16, 24)
    torch.manual_seed(0)
    start = [torch.randn(shape, dtype=torch.float64) for _ in range(3)]
    params = [nn.Parameter(distribute_tensor(x, mesh, [Shard(0)])) for x in start]
    for p in params:
        p.grad = distribute_tensor(torch.randn(shape, dtype=torch.float64), mesh, [Shard(0)])
    Dion2(params, lr=0.05, weight_decay=0.0, fraction=fraction, selection_scope="local",
          orthogonalizer=CountingPolar()).step()
    dist.all_to_all_single = original
    rows_per_shard = shape[0] // 2
    chosen = math.ceil(fraction * rows_per_shard)
    moved = [int(((p.to_local() - distribute_tensor(x, mesh, [Shard(0)]).to_local()).abs().sum(1) > 0).sum())
             for p, x in zip(params, start)]
    total = torch.tensor([sum(sent)])
    dist.all_reduce(total)
    # Over both ranks: each sends its chosen rows of the 3 matrices (8-byte entries), and gets them back as results.
    expected = 2 * 2 * 3 * chosen * shape[1] * 8
    whole = 2 * 2 * 3 * rows_per_shard * shape[1] * 8
    return dict(moved=moved, chosen=chosen, bytes=int(total), expected_bytes=expected, whole_matrix_bytes=whole)


def reference_local(x: torch.Tensor, grads: list[torch.Tensor], fraction: float, decay: float, normalized: bool,
                    lr: float, weight_decay: float, world: int) -> torch.Tensor:
    """Local selection written out on the whole matrix: each of the `world` row blocks (torch.chunk) chooses its own
    top ceil(fraction x rows) rows by L1 norm; their union is orthogonalized (exact polar factor) as one matrix."""
    m, v = torch.zeros_like(x), torch.zeros(x.shape[0], 1, dtype=x.dtype)
    chunk = -(-x.shape[0] // world)
    for g in grads:
        m = m + g
        rows = []
        for start in range(0, x.shape[0], chunk):
            block = m[start:start + chunk].abs().sum(1)
            rows += (start + block.topk(math.ceil(fraction * len(block))).indices.sort().values).tolist()
        u, _, vh = torch.linalg.svd(m[rows], full_matrices=False)
        o = u @ vh
        m[rows] = decay * m[rows]
        if normalized:
            v[rows] = 0.95 * v[rows] + 0.05 * (o ** 2).mean(1, keepdim=True)
            o_normalized = o / (v[rows].sqrt() + 1e-8)
            o = o_normalized * (o.norm() / o_normalized.norm())
        x = x * (1 - lr * weight_decay)
        x[rows] -= lr * math.sqrt(x.shape[0] / x.shape[1]) * o
    return x


def local_scope_matches_reference() -> float:
    """Dion2 and NorDion2 with selection_scope local on FSDP2(2), uneven and empty shards, 4 steps, against
    `reference_local`: the largest relative difference."""
    mesh = init_device_mesh("cpu", (2,), mesh_dim_names=("fs",))
    shapes = [(5, 8), (3, 8), (1, 8), (5, 8)]
    torch.manual_seed(1)
    start = [torch.randn(s, dtype=torch.float64) for s in shapes]
    grads = [[torch.randn(s, dtype=torch.float64) for s in shapes] for _ in range(4)]
    worst = 0.0
    for cls, decay_key, normalized in ((Dion2, "ef_decay", False), (NorDion2, "mu", True)):
        params = [nn.Parameter(distribute_tensor(x, mesh, [Shard(0)])) for x in start]
        optimizer = cls(params, lr=0.05, weight_decay=0.1, fraction=0.5, selection_scope="local",
                        orthogonalizer=CountingPolar(), **{decay_key: 0.9})
        for step_grads in grads:
            for p, g in zip(params, step_grads):
                p.grad = distribute_tensor(g, mesh, [Shard(0)])
            optimizer.step()
        expected = [reference_local(x, [gs[i] for gs in grads], 0.5, 0.9, normalized, 0.05, 0.1, 2)
                    for i, x in enumerate(start)]
        worst = max(worst, relative_difference([p.full_tensor() for p in params], expected))
    return worst


def main() -> None:
    dist.init_process_group("gloo")
    output, layouts = sys.argv[1], sys.argv[2:]
    result = {}
    for layout in layouts:
        if layout == "local_scope":
            result[layout] = dict(local_scope(), reference_difference=local_scope_matches_reference())
            continue
        for name in ALGORITHMS:
            single = run(name, "single", CountingPolar())
            counter = CountingPolar()
            distributed = run(name, layout, counter)
            count = torch.tensor([counter.count])
            dist.all_reduce(count)
            result[f"{name}/{layout}"] = dict(difference=relative_difference(distributed, single),
                                              moved=relative_difference(single, initial()),
                                              orthogonalized=int(count), expected=STEPS * len(SHAPES))
    if dist.get_rank() == 0:
        with open(output, "w") as f:
            json.dump(result, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
