"""Counting the collectives a step issues: calls and payload bytes per (phase, process group, kind), seen by a
TorchDispatchMode. Used by scripts/bench_comm.py (real gloo ranks) and trainer/estimate.py (one simulated rank of
the fake backend).

Every c10d collective reaches the dispatcher as a `c10d.*` op (eager torch.distributed calls, DDP's reducer, FSDP2)
or a `_c10d_functional.*` op (DTensor's redistributions). Bytes are the payload per rank: the tensor an all-reduce
reduces, the input of a reduce-scatter (the whole tensor being summed) and of an all-gather (this rank's piece).
"""
from __future__ import annotations

from collections import defaultdict

import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode

# The argument holding each collective's payload (eager c10d ops write into their first argument).
PAYLOAD_ARGUMENT = {"c10d.allreduce_": 0, "c10d._allgather_base_": 1, "c10d._reduce_scatter_base_": 1,
                    "c10d.allgather_": 1, "c10d.reduce_scatter_": 1, "c10d.allgather_into_tensor_coalesced_": 1,
                    "c10d.reduce_scatter_tensor_coalesced_": 1, "c10d.alltoall_base_": 1, "c10d.broadcast_": 0,
                    "_c10d_functional.all_reduce": 0, "_c10d_functional.all_gather_into_tensor": 0,
                    "_c10d_functional.reduce_scatter_tensor": 0, "_c10d_functional.all_to_all_single": 0}
KIND = {"allreduce": "all_reduce", "all_reduce": "all_reduce", "allgather": "all_gather",
        "all_gather": "all_gather", "reduce_scatter": "reduce_scatter", "alltoall": "all_to_all",
        "all_to_all": "all_to_all", "broadcast": "broadcast"}
# The trainer's mesh axes by the names the reports give their groups.
AXIS_LABELS = (("dp", "replicas"), ("fs", "shards"), ("tp", "tp"))


def _kind(op: str) -> str:
    name = op.split(".")[-1].lstrip("_")
    return next(kind for prefix, kind in KIND.items() if name.startswith(prefix))


def _nbytes(value) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    return sum(_nbytes(v) for v in value)


def _group_ranks(args) -> tuple[int, ...] | None:
    """The ranks of the process group among a c10d op's arguments (a boxed ProcessGroup, or a functional
    collective's group name)."""
    for arg in args:
        if isinstance(arg, torch.ScriptObject):
            return tuple(dist.get_process_group_ranks(dist.ProcessGroup.unbox(arg)))
    from torch.distributed.distributed_c10d import _resolve_process_group
    return tuple(dist.get_process_group_ranks(_resolve_process_group(args[-1])))


def mesh_group_names(env) -> dict[tuple[int, ...], str]:
    """ranks of each process group of the trainer's mesh (trainer.distributed.Distributed) -> its label (replicas,
    shards, tp); any other group is reported as "world"."""
    names: dict[tuple[int, ...], str] = {}
    for axis, label in AXIS_LABELS:
        mesh = env.submesh(axis)
        if mesh is not None:
            names.setdefault(tuple(dist.get_process_group_ranks(mesh.get_group())), label)
    return names


class CollectiveLedger(TorchDispatchMode):
    """Calls and payload bytes of every c10d collective dispatched while active, by "phase/group/kind"."""

    def __init__(self, group_names: dict[tuple[int, ...], str]):
        super().__init__()
        self.group_names = group_names
        self.phase = "forward"
        self.calls: dict[str, int] = defaultdict(int)
        self.bytes: dict[str, int] = defaultdict(int)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        op = str(func.overloadpacket)
        if op in PAYLOAD_ARGUMENT:
            group = self.group_names.get(_group_ranks(args), "world")
            key = f"{self.phase}/{group}/{_kind(op)}"
            self.calls[key] += 1
            self.bytes[key] += _nbytes(args[PAYLOAD_ARGUMENT[op]])
        return func(*args, **(kwargs or {}))
