"""Cache tiling for chains of element-wise foreach kernels on CPU.

An element-wise optimizer step written as foreach kernels (AdamW: lerp_, mul_, addcmul_, sqrt, add_, addcdiv_)
passes over every parameter once per kernel, so on a CPU a step over a model larger than the caches streams the
parameters, gradients and states through DRAM five to ten times, where one read and one write would do. Running
the same chain of kernels on one tile at a time (a slice of every tensor small enough to stay in the L2/L3 caches
between kernels) leaves only the first read and the last write to DRAM: the update becomes bandwidth-bound at the
minimum traffic. The arithmetic of each element is unchanged (the same kernels with the same scalars), so a tiled
step equals an untiled one up to the last-bit differences between a kernel's vectorized loop and its scalar tail,
which untiled steps already show when the thread count changes.

`tiled(count)` wraps a function whose first `count` arguments are parallel lists of tensors and whose work is
purely element-wise (no reduction over a tensor, no shape-dependent logic): on CPU it calls the function once per
tile with lists of flat views; elsewhere (CUDA, where a kernel launch per tile would cost more than it saves;
DTensors; non-contiguous tensors) it calls the function once, unchanged.
"""
from __future__ import annotations

import functools
from typing import Callable, Iterator, Sequence

import torch
from torch import Tensor

# Elements of each tensor in one tile: 256 Ki elements = 1 MiB of float32 per tensor, so the 3 to 6 tensors of a
# tile fit in the L2 + L3 caches of one core. Measured on the 2-core CI machine (AMD EPYC, 1 MiB L2 per core, 32 MiB
# L3) with Lion on 45.7M parameters: 16 Ki elements per tile 0.29, 64 Ki 0.64, 256 Ki 1.00, 1 Mi 0.80 of the copy
# bandwidth, untiled 0.32 (tiles of 16 Ki lose to per-call overhead, tiles of 1 Mi start to spill).
TILE_ELEMENTS = 1 << 18


def _plain_cpu_contiguous(t: Tensor) -> bool:
    return (type(t) is Tensor or type(t) is torch.nn.Parameter) and t.device.type == "cpu" and t.is_contiguous()


def tileable(lists: Sequence[Sequence[Tensor]], tile_elements: int = TILE_ELEMENTS) -> bool:
    """True when tiling `lists` pays and is valid: plain contiguous CPU tensors, the i-th tensors of every list of
    equal size, and more elements in all than one tile."""
    first = lists[0]
    if not first or any(len(tensors) != len(first) for tensors in lists):
        return False
    total = 0
    for i, t in enumerate(first):
        numel = t.numel()
        total += numel
        for tensors in lists:
            if not _plain_cpu_contiguous(tensors[i]) or tensors[i].numel() != numel:
                return False
    return total > tile_elements


def cache_tiles(lists: Sequence[Sequence[Tensor]], tile_elements: int = TILE_ELEMENTS
                ) -> Iterator[tuple[list[Tensor], ...]]:
    """Parallel lists of flat views covering every element of `lists` once, about `tile_elements` elements per
    list in each yielded group: large tensors are cut into several tiles, small ones share a tile."""
    group: tuple[list[Tensor], ...] = tuple([] for _ in lists)
    size = 0
    for i in range(len(lists[0])):
        flats = [tensors[i].view(-1) for tensors in lists]
        numel = flats[0].numel()
        start = 0
        while start < numel:
            length = min(numel - start, tile_elements - size)
            for pieces, flat in zip(group, flats):
                pieces.append(flat[start:start + length])
            start += length
            size += length
            if size >= tile_elements:
                yield group
                group = tuple([] for _ in lists)
                size = 0
    if size:
        yield group


def tiled(count: int) -> Callable[[Callable], Callable]:
    """Decorator: run an element-wise foreach function tile by tile on CPU (see the module docstring). The first
    `count` positional arguments are the parallel tensor lists (an optional one may be None and stays None);
    everything else is passed through unchanged."""
    def decorate(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            lists = args[:count]
            present = [i for i, tensors in enumerate(lists) if tensors is not None]
            if not tileable([lists[i] for i in present], TILE_ELEMENTS):
                return fn(*args, **kwargs)
            rest = args[count:]
            for tile in cache_tiles([lists[i] for i in present], TILE_ELEMENTS):
                pieces = iter(tile)
                fn(*[next(pieces) if tensors is not None else None for tensors in lists], *rest, **kwargs)
            return None
        wrapper.untiled = fn
        return wrapper
    return decorate
