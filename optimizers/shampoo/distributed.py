"""Splitting root-inverse work across the ranks of a process group.

Every rank holds the same factor matrices (gradients are synced before the step), so the list of matrices to invert
is identical everywhere. Each matrix gets one owner rank (greedy balance of the O(n^3) cost, deterministic); owners
compute their share and one all_gather hands every result to every rank, so all ranks end with identical state.
"""
from __future__ import annotations

import heapq
from typing import Callable

import torch
import torch.distributed as dist
from torch import Tensor


def assign_owners(sizes: list[int], world_size: int) -> list[int]:
    """Owner rank of each (n, n) job: largest first, each to the least-loaded rank (ties: lowest index), with
    cost n^3. Depends only on its arguments, so every rank computes the same assignment. A heap of (load, rank):
    O(jobs log world) rather than a scan of every rank per job, which at 1024 ranks and the tens of thousands of
    factor blocks of a 70B model took seconds of Python per step."""
    loads = [(0, rank) for rank in range(world_size)]  # already a heap
    owners = [0] * len(sizes)
    for job in sorted(range(len(sizes)), key=lambda j: (-sizes[j], j)):
        load, owner = heapq.heappop(loads)
        owners[job] = owner
        heapq.heappush(loads, (load + sizes[job] ** 3, owner))
    return owners


def compute_shared(matrices: list[Tensor], compute: Callable[[int], Tensor], group) -> list[Tensor]:
    """[compute(i) for each square matrix i], each computed on one rank of `group` (None: this process alone).
    Results have the shape, dtype and device of their matrix."""
    if group is None or dist.get_world_size(group) == 1:
        return [compute(i) for i in range(len(matrices))]
    if not matrices:
        return []
    world_size, rank = dist.get_world_size(group), dist.get_rank(group)
    sizes = [m.shape[0] for m in matrices]
    owners = assign_owners(sizes, world_size)
    dtype, device = matrices[0].dtype, matrices[0].device
    per_rank_numel = [0] * world_size
    for n, owner in zip(sizes, owners):
        per_rank_numel[owner] += n * n
    buffer_numel = max(per_rank_numel)
    local = torch.zeros(buffer_numel, dtype=dtype, device=device)
    offset = 0
    for i, owner in enumerate(owners):
        if owner == rank:
            local[offset:offset + sizes[i] ** 2] = compute(i).reshape(-1).to(dtype)
            offset += sizes[i] ** 2
    gathered = [torch.empty_like(local) for _ in range(world_size)]
    dist.all_gather(gathered, local, group=group)
    offsets = [0] * world_size
    results = []
    for i, owner in enumerate(owners):
        n = sizes[i]
        flat = gathered[owner][offsets[owner]:offsets[owner] + n * n]
        offsets[owner] += n * n
        results.append(flat.reshape(n, n).to(device=matrices[i].device, dtype=matrices[i].dtype, copy=True))
    return results
