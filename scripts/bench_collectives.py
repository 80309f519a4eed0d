"""Bytes moved by each collective in one optimizer step of the orthonormal family, measured against the formula.

    torchrun --standalone --nproc_per_node=2 scripts/bench_collectives.py [--preset tiny] [--json OUT]
    python scripts/bench_optimizers.py --collectives     # runs this at 2 and 4 gloo ranks and prints both tables

The block matrices of the preset are placed as DDP replicas (plain tensors split over the ranks) or FSDP2 shards
(DTensor Shard(0)); one step is taken to create the state, the next is counted: every c10d collective (eager
`torch.distributed` calls and DTensor's functional collectives) seen by a TorchDispatchMode, with the bytes of its
input, summed over ranks. The formula (float32 everywhere on CPU; W ranks, per shape c matrices of m x n, p =
ceil(c / W) per rank, chunk = ceil(m / W) rows per shard, k = ceil(fraction x chunk)):
- DDP: all-gather of the results, W p m n; Dion2 and NorDion2 gather only the chosen k x n (or m x k) slices.
- FSDP2, whole matrices (Muon; NorMuon; Dion2 and NorDion2 with selection_scope global): the owner redistribution
  and its inverse. gloo has no all-to-all, so DTensor falls back to all-gather + chunk: W (W p) chunk n out and
  W p m n back (an all-to-all, as on NCCL, would send (W p) m n out). Plus the vectors the rules reduce across
  shards, per matrix: NorMuon's row sums of O^2 (all-gather of W chunk), Dion2's slice norms (rows: W chunk;
  columns: all-reduce of W n), NorDion2 both row vectors.
- FSDP2, Dion2 selection_scope local: all_to_all_single of the chosen rows out and back, 2 W c k n.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from collections import defaultdict
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Shard, distribute_tensor
from torch.utils._python_dispatch import TorchDispatchMode

from models import GPT, PRESETS
from optimizers.muon import Dion2, Muon, NorDion2, NorMuon

FLOAT_BYTES = 4
FRACTION = 0.25
CASES = {"muon": (Muon, {}), "normuon": (NorMuon, {}), "dion2": (Dion2, dict(fraction=FRACTION)),
         "dion2_local": (Dion2, dict(fraction=FRACTION, selection_scope="local")),
         "nordion2": (NorDion2, dict(fraction=FRACTION))}
# The argument holding the input tensor of each collective (eager c10d ops write into their first argument).
INPUT_ARGUMENT = {"c10d._allgather_base_": 1, "c10d.alltoall_base_": 1, "c10d.allreduce_": 0,
                  "_c10d_functional.all_gather_into_tensor": 0, "_c10d_functional.all_reduce": 0,
                  "_c10d_functional.reduce_scatter_tensor": 0, "_c10d_functional.all_to_all_single": 0}


class CollectiveBytes(TorchDispatchMode):
    """Calls and input bytes of every c10d collective dispatched while active."""

    def __init__(self):
        super().__init__()
        self.calls: dict[str, int] = defaultdict(int)
        self.bytes: dict[str, int] = defaultdict(int)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket)
        if name in INPUT_ARGUMENT:
            tensor = args[INPUT_ARGUMENT[name]]
            tensor = tensor[0] if isinstance(tensor, (list, tuple)) else tensor
            self.calls[name] += 1
            self.bytes[name] += tensor.numel() * tensor.element_size()
        return func(*args, **(kwargs or {}))


def matrix_shapes(preset: str) -> list[tuple[int, int]]:
    with torch.device("meta"):
        model = GPT(PRESETS[preset])
    return [tuple(p.shape) for p in model.blocks.parameters() if p.ndim == 2]


def formula(name: str, layout: str, shapes: list[tuple[int, int]], world: int) -> int:
    counts: dict[tuple[int, int], int] = defaultdict(int)
    for shape in shapes:
        counts[shape] += 1
    total = 0
    for (m, n), count in counts.items():
        per_rank, chunk = -(-count // world), -(-m // world)
        if layout == "ddp":
            if name in ("dion2", "nordion2"):  # only the chosen slices: rows (NorDion2, or m <= n) or columns
                rows = name == "nordion2" or m <= n
                m, n = (math.ceil(FRACTION * m), n) if rows else (m, math.ceil(FRACTION * n))
            total += world * per_rank * m * n
        elif name == "dion2_local":
            total += 2 * world * count * math.ceil(FRACTION * chunk) * n
        else:
            total += world * (world * per_rank) * chunk * n + world * per_rank * m * n
            row_vector, column_vector = world * chunk, world * n
            vectors = {"muon": 0, "normuon": row_vector, "nordion2": 2 * row_vector,
                       "dion2": row_vector if m <= n else column_vector}[name]
            total += count * vectors
    return total * FLOAT_BYTES


def measure(name: str, layout: str, shapes: list[tuple[int, int]]) -> dict[str, tuple[int, int]]:
    cls, options = CASES[name]
    torch.manual_seed(0)
    full = [torch.randn(shape) for shape in shapes]
    if layout == "ddp":
        params = [torch.nn.Parameter(x) for x in full]
        options = dict(options, distributed_mesh=dist.group.WORLD)
        place = torch.clone
    else:
        mesh = init_device_mesh("cpu", (dist.get_world_size(),))
        params = [torch.nn.Parameter(distribute_tensor(x, mesh, [Shard(0)])) for x in full]

        def place(g):
            return distribute_tensor(g, mesh, [Shard(0)])
    for p in params:
        p.grad = place(torch.randn(p.shape) * 1e-3)
    optimizer = cls(params, **options)
    optimizer.step()
    with CollectiveBytes() as counter:
        optimizer.step()
    totals = {}
    for op in sorted(counter.calls):
        reduced = torch.tensor([counter.calls[op], counter.bytes[op]])
        dist.all_reduce(reduced)
        totals[op] = (int(reduced[0]) // dist.get_world_size(), int(reduced[1]))
    return totals


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    parser.add_argument("--json", help="write the rows to this file (rank 0)")
    args = parser.parse_args(argv)
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    world = dist.get_world_size()
    shapes = matrix_shapes(args.preset)
    rows = []
    for layout in ("ddp", "fsdp"):
        for name in CASES:
            if layout == "ddp" and name == "dion2_local":
                continue
            totals = measure(name, layout, shapes)
            measured = sum(b for _, b in totals.values())
            rows.append(dict(optimizer=name, layout=layout, ranks=world, measured=measured,
                             formula=formula(name, layout, shapes, world),
                             collectives={op: dict(calls=c, bytes=b) for op, (c, b) in totals.items()}))
    if dist.get_rank() == 0:
        print("| optimizer | layout | ranks | collective: calls per step, MB (all ranks) | total MB | formula MB |")
        print("|---|---|---|---|---|---|")
        for row in rows:
            ops = "; ".join(f"{op.split('.')[-1]}: {v['calls']}, {v['bytes'] / 2 ** 20:.2f}"
                            for op, v in row["collectives"].items())
            print(f"| {row['optimizer']} | {row['layout']} | {row['ranks']} | {ops} | "
                  f"{row['measured'] / 2 ** 20:.2f} | {row['formula'] / 2 ** 20:.2f} |")
        if args.json:
            Path(args.json).write_text(json.dumps(rows))
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
