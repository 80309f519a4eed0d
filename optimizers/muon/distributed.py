"""Distributed execution shared by Muon, NorMuon, Dion2 and NorDion2: every matrix is orthogonalized whole, on
exactly one rank, whatever the parallel layout (the orthogonal factor of a block of rows is not the block of the
orthogonal factor).

- DTensor parameters (FSDP2 `Shard(0)`, HSDP `(Replicate, Shard(0))`, TP `Shard(0 or 1)`, FSDP2 + TP): the local
  shards of same-shape matrices are stacked into a (count, m, n) DTensor and redistributed to `Shard(0)` on every
  mesh dimension, so each rank of the whole mesh (replicas included) holds whole matrices of its share; results go
  back by the inverse redistribution. On NCCL this is an all-to-all; gloo has none, so DTensor falls back to
  all-gather + chunk there. Owners go round-robin over the ranks from one shape to the next, largest matrices
  first, so the first matrix of every shape does not land on rank 0.
- plain tensors replicated over a process group (DDP): matrices are split round-robin across ranks, each rank
  orthogonalizes its own, and one all-gather per shape hands everyone all results.
- selected rows (Dion2 `selection_scope: local`): each rank of the shard group sends only its chosen slices to the
  matrix's owner with one all_to_all_single, so the traffic is proportional to `fraction`.
Reductions the update rules need across shards (slice norms, row statistics) go through `MatrixLayout.full_sums`.
"""
from __future__ import annotations

import math
from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

# compute(indices, stack): `stack` (b, m, n) holds the whole matrices number `indices` of the caller's list; returns
# their results, (b, m, n).
Compute = Callable[[list[int], Tensor], Tensor]


def local_tensor(t: Tensor) -> Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


@dataclass(frozen=True)
class MatrixLayout:
    """One parameter seen as a matrix: its global shape (m, n) (3D+ parameters flattened to m x prod(rest)) and,
    for a DTensor, its mesh and placements (which then describe the matrix view)."""
    shape: tuple[int, int]
    mesh: Any = None
    placements: tuple = ()

    @classmethod
    def of(cls, p: Tensor, flatten: bool, owner: str) -> "MatrixLayout":
        if p.ndim < 2 or (p.ndim > 2 and not flatten):
            raise ValueError(f"{owner}: the matrix algorithm needs 2D parameters (or 3D+ with flatten=True), got "
                             f"shape {tuple(p.shape)}; put it in a group with algorithm 'lion' or 'adamw'")
        shape = (p.shape[0], math.prod(p.shape[1:]))
        if not isinstance(p, DTensor):
            return cls(shape)
        for placement in p.placements:
            if not (isinstance(placement, Replicate) or (isinstance(placement, Shard) and
                                                         (p.ndim == 2 or placement.dim == 0))):
                raise ValueError(f"{owner}: a parameter of shape {tuple(p.shape)} has placements {p.placements}; "
                                 f"supported: Replicate, Shard(0), and Shard(1) of 2D matrices")
        return cls(shape, p.device_mesh, tuple(p.placements))

    @property
    def is_dtensor(self) -> bool:
        return self.mesh is not None

    def local_matrix(self, t: Tensor) -> Tensor:
        """This rank's part of t (the parameter, its gradient or a state of its shape) as a 2D view."""
        t = local_tensor(t)
        return t.flatten(1) if t.ndim > 2 else t

    def local_range(self, dim: int) -> tuple[int, int]:
        """(global offset, length) of this rank's part along matrix dimension `dim`."""
        if not self.is_dtensor:
            return 0, self.shape[dim]
        local_shape, offset = compute_local_shape_and_global_offset(self.shape, self.mesh, self.placements)
        return offset[dim], local_shape[dim]

    def sharded_dims(self) -> list[tuple[int, int]]:
        """(mesh dim, matrix dim) of every Shard placement."""
        return [(mesh_dim, p.dim) for mesh_dim, p in enumerate(self.placements) if isinstance(p, Shard)]

    def full_sums(self, local: Tensor, dim: int) -> Tensor:
        """Sums of the whole matrix over `dim` (0: column sums, 1: row sums), the full vector on every rank.
        local: this rank's (local_m, local_n) part."""
        if not self.is_dtensor:
            return local.sum(dim)
        whole = DTensor.from_local(local, self.mesh, self.placements, shape=torch.Size(self.shape),
                                   stride=(self.shape[1], 1))
        return whole.sum(dim).full_tensor()


def orthogonalization_cost(shape: tuple[int, ...]) -> int:
    """Multiply-adds of one Newton-Schulz iteration on an (m, n) matrix, up to a constant: m n min(m, n)."""
    m, n = shape[-2], shape[-1]
    return m * n * min(m, n)


def round_robin_owners(count: int, world: int, offset: int = 0) -> list[int]:
    """Owner rank of each of `count` matrices: (offset + j) mod world. Continuing `offset` from one bucket to the
    next spreads the buckets' first matrices over different ranks; with the buckets visited largest first, every
    rank's load is within one matrix of each size of the mean (tests/optimizers/test_muon.py)."""
    return [(offset + j) % world for j in range(count)]


def _stacked_placements(placements: tuple) -> list:
    return [Shard(p.dim + 1) if isinstance(p, Shard) else p for p in placements]


class WholeMatrices:
    """Applies a batched function to whole matrices, each on exactly one rank, with the communication its layout
    needs. replicate_group: the ProcessGroup over which plain (replicated, DDP) matrices are split, or None."""

    def __init__(self, replicate_group: Any):
        self.replicate_group = replicate_group

    def __call__(self, layouts: list[MatrixLayout], inputs: list[Tensor], compute: Compute) -> list[Tensor]:
        """inputs: the local 2D parts of DTensor matrices, or any 2D tensor for plain ones (Dion2 passes just the
        chosen slices), in the transport dtype. Returns this rank's 2D parts of the results, in input order.
        Owners: round-robin over the ranks, continuing from one bucket of same-shape matrices to the next, largest
        matrices first (`round_robin_owners`), so no rank gets the first matrix of every shape."""
        buckets: dict[tuple, list[int]] = defaultdict(list)
        for i, (layout, t) in enumerate(zip(layouts, inputs)):
            if layout.is_dtensor:
                kind = ("dtensor", layout.mesh, layout.placements)
            elif self.replicate_group is not None:
                kind = ("replicated",)
            else:
                kind = ("local",)
            buckets[(*kind, layout.shape if layout.is_dtensor else tuple(t.shape), t.dtype, t.device)].append(i)
        results: list[Tensor | None] = [None] * len(inputs)
        order = sorted(buckets, key=lambda key: -orthogonalization_cost(key[-3]))  # key[-3]: the shape
        offset = 0
        for key in order:
            indices = buckets[key]
            if key[0] == "dtensor":
                owners = round_robin_owners(len(indices), layouts[indices[0]].mesh.size(), offset)
                out = self._sharded(layouts[indices[0]], indices, inputs, compute, owners)
            elif key[0] == "replicated":
                owners = round_robin_owners(len(indices), dist.get_world_size(self.replicate_group), offset)
                out = self._replicated(indices, inputs, compute, owners)
            else:
                owners = []
                out = list(compute(indices, torch.stack([inputs[i] for i in indices])).unbind(0))
            offset += len(owners)
            for i, r in zip(indices, out):
                results[i] = r
        return results

    @staticmethod
    def _sharded(layout: MatrixLayout, indices: list[int], inputs: list[Tensor], compute: Compute,
                 owners: list[int]) -> list[Tensor]:
        """The stack of the bucket's matrices in slots of `per_rank` per rank (rank k of the whole mesh, row-major,
        holds slots k per_rank ... (k + 1) per_rank - 1 after the redistribution to Shard(0) everywhere): matrix j
        goes to a slot of rank owners[j], the other slots are zero padding and never computed."""
        mesh, m, n = layout.mesh, *layout.shape
        count = len(indices)
        per_rank = max(Counter(owners).values())
        padded = per_rank * mesh.size()
        slots, filled = [], defaultdict(int)
        for owner in owners:
            slots.append(owner * per_rank + filled[owner])
            filled[owner] += 1
        parts = [torch.zeros_like(inputs[indices[0]])] * padded
        for slot, i in zip(slots, indices):
            parts[slot] = inputs[i]
        shape, stride = torch.Size((padded, m, n)), (m * n, n, 1)
        spread, owned = _stacked_placements(layout.placements), [Shard(0)] * mesh.ndim
        whole = DTensor.from_local(torch.stack(parts), mesh, spread, shape=shape, stride=stride)
        whole = whole.redistribute(mesh, owned).to_local()
        position = 0  # this rank's index in the mesh, row-major: the order of Shard(0) on every mesh dimension
        for coordinate, size in zip(mesh.get_coordinate(), mesh.shape):
            position = position * size + coordinate
        mine = [i for i, owner in zip(indices, owners) if owner == position]  # in slot order
        results = torch.zeros_like(whole)
        if mine:
            results[:len(mine)] = compute(mine, whole[:len(mine)])
        back = DTensor.from_local(results, mesh, owned, shape=shape, stride=stride)
        back = back.redistribute(mesh, spread).to_local()
        return [back[slot] for slot in slots]

    def _replicated(self, indices: list[int], inputs: list[Tensor], compute: Compute,
                    owners: list[int]) -> list[Tensor]:
        """Each rank computes the matrices it owns, then one all-gather (padded to equal counts) hands every rank
        every result."""
        group = self.replicate_group
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        mine = [i for i, o in zip(indices, owners) if o == rank]
        per_rank = -(-len(indices) // world)
        template = inputs[indices[0]]
        local = template.new_zeros((per_rank, *template.shape))
        if mine:
            local[:len(mine)] = compute(mine, torch.stack([inputs[i] for i in mine]))
        gathered = local.new_empty((world * per_rank, *template.shape))
        dist.all_gather_into_tensor(gathered, local, group=group)
        positions = defaultdict(int)
        out = []
        for o in owners:
            out.append(gathered[o * per_rank + positions[o]])
            positions[o] += 1
        return out


def exchange_selected(pieces: list[Tensor], lengths: list[int], group: Any, dim: int,
                      compute: Callable[[list[int], list[Tensor]], list[Tensor]]) -> list[Tensor]:
    """Dion2 `selection_scope: local` on same-shape matrices sharded over one mesh dimension: pieces[j] holds this
    rank's chosen slices of matrix j along `dim`, padded to a common count; lengths[r] is how many of rank r's are
    real.
    Matrix j is assembled on rank j % world from the real slices of every rank (one all_to_all_single), compute
    (indices, assembled matrices) runs there, and the results travel back the same way. Returns this rank's slices
    of each result, padded like `pieces`."""
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    owners = [j % world for j in range(len(pieces))]
    counts = [owners.count(r) for r in range(world)]
    piece_shape = pieces[0].shape
    piece_numel = pieces[0].numel()
    order = sorted(range(len(pieces)), key=lambda j: owners[j])
    send = torch.cat([pieces[j].reshape(-1) for j in order])
    received = send.new_empty(world * counts[rank] * piece_numel)
    dist.all_to_all_single(received, send, output_split_sizes=[counts[rank] * piece_numel] * world,
                           input_split_sizes=[c * piece_numel for c in counts], group=group)
    received = received.view(world, counts[rank], *piece_shape)
    mine = [j for j in order if owners[j] == rank]
    assembled = [torch.cat([received[r, k].narrow(dim, 0, lengths[r]) for r in range(world)], dim=dim)
                 for k in range(len(mine))]
    computed = compute(mine, assembled) if mine else []
    send_back = received.new_zeros(world, counts[rank], *piece_shape)
    for k, result in enumerate(computed):
        for r, piece in enumerate(result.split(lengths, dim=dim)):
            send_back[r, k].narrow(dim, 0, lengths[r]).copy_(piece)
    back = send.new_empty(len(pieces) * piece_numel)
    dist.all_to_all_single(back, send_back.reshape(-1), output_split_sizes=[c * piece_numel for c in counts],
                           input_split_sizes=[counts[rank] * piece_numel] * world, group=group)
    back = back.view(len(pieces), *piece_shape)
    out: list[Tensor | None] = [None] * len(pieces)
    for position, j in enumerate(order):
        out[j] = back[position]
    return out
