"""How a parameter is cut into the blocks that get their own Kronecker-factored preconditioner.

A parameter of shape S is first viewed as `view_shape` (small dimensions merged, or flattened for diagonal AdaGrad),
then cut into blocks; every block has one factor per dimension, a full (d, d) matrix or a (d,) diagonal.
Plans depend only on the shape and the options, so they are cached and identical on every rank.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from functools import lru_cache

from optimizers.shampoo.config import LargeDimMethod


@dataclass(frozen=True)
class Block:
    """slices: the block's region of the parameter viewed as `BlockPlan.view_shape`; diagonal[i]: dimension i has a
    diagonal factor instead of a full matrix."""
    slices: tuple[slice, ...]
    shape: tuple[int, ...]
    diagonal: tuple[bool, ...]


@dataclass(frozen=True)
class BlockPlan:
    view_shape: tuple[int, ...]
    blocks: tuple[Block, ...]


def merge_small_dims(shape: tuple[int, ...], max_dim: int) -> tuple[int, ...]:
    """Drop size-1 dimensions, then merge neighbours left to right while their product stays <= max_dim:
    (2, 3, 10) with max_dim 8 -> (6, 10); (1, 1) -> (1,)."""
    dims = [d for d in shape if d != 1]
    if not dims:
        return (1,)
    merged = [dims[0]]
    for dim in dims[1:]:
        if merged[-1] * dim <= max_dim:
            merged[-1] *= dim
        else:
            merged.append(dim)
    return tuple(merged)


def _chunks(size: int, max_dim: int) -> list[slice]:
    return [slice(start, min(start + max_dim, size)) for start in range(0, size, max_dim)]


@lru_cache(maxsize=None)
def plan_blocks(shape: tuple[int, ...], max_dim: int, large_dim_method: LargeDimMethod,
                merge_dims: bool) -> BlockPlan:
    """The blocks of a parameter of `shape` (a 0-d parameter is treated as shape (1,))."""
    view_shape = merge_small_dims(shape, max_dim) if merge_dims else (tuple(shape) or (1,))
    is_large = [d > max_dim for d in view_shape]
    if large_dim_method is LargeDimMethod.ADAGRAD and any(is_large):
        numel = math.prod(view_shape)
        return BlockPlan((numel,), (Block((slice(0, numel),), (numel,), (True,)),))
    if large_dim_method is LargeDimMethod.DIAGONAL:
        full = tuple(slice(0, d) for d in view_shape)
        return BlockPlan(view_shape, (Block(full, view_shape, tuple(is_large)),))
    blocks = []
    for slices in itertools.product(*(_chunks(d, max_dim) for d in view_shape)):
        block_shape = tuple(s.stop - s.start for s in slices)
        blocks.append(Block(slices, block_shape, (False,) * len(block_shape)))
    return BlockPlan(view_shape, tuple(blocks))
