"""Optimizer moments stored densely or SMMF-factored (Park & Lee 2024, "SMMF: Square-Matricized Momentum
Factorization for Memory-Efficient Optimization").

Factored storage of a moment M with N entries:
- M is viewed as a near-square (rows, cols) matrix (`effective_shape`);
- its magnitude |M| is kept as a rank-1 non-negative factorization, a row vector and a column vector (float32);
- a signed moment (the first moment) also keeps its signs as 1 bit per entry, packed 8 to a byte (uint8).
So a signed moment costs 4 (rows + cols) + rows * ceil(cols / 8) bytes, about N / 8, and an unsigned one
4 (rows + cols) bytes. Each step reconstructs M, updates it at full size, and factorizes it again.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import torch
from torch import Tensor

from optimizers.advanced.sharding import local_tensor, per_shard_state, read_prefix, write_prefix

_BIT_WEIGHTS = (1, 2, 4, 8, 16, 32, 64, 128)


@lru_cache(maxsize=None)
def effective_shape(numel: int) -> tuple[int, int]:
    """(rows, cols) with rows * cols = numel, rows >= cols, and cols the largest divisor <= sqrt(numel); (0, 0) for
    an empty tensor (an FSDP shard can be empty)."""
    if numel < 0:
        raise ValueError(f"effective_shape: numel must be >= 0, got {numel}")
    if numel == 0:
        return 0, 0
    for cols in range(math.isqrt(numel), 0, -1):
        if numel % cols == 0:
            return numel // cols, cols
    raise AssertionError("unreachable: 1 divides every integer")


def pack_signs(negative: Tensor) -> Tensor:
    """(rows, cols) bool -> (rows, ceil(cols / 8)) uint8; bit j of byte k holds column 8 k + j."""
    rows, cols = negative.shape
    packed_cols = -(-cols // 8)
    padded = torch.zeros(rows, packed_cols * 8, dtype=torch.uint8, device=negative.device)
    padded[:, :cols] = negative
    weights = torch.tensor(_BIT_WEIGHTS, dtype=torch.uint8, device=negative.device)
    return padded.view(rows, packed_cols, 8).mul_(weights).sum(dim=-1, dtype=torch.uint8)


def unpack_signs(packed: Tensor, cols: int) -> Tensor:
    """Inverse of `pack_signs`: (rows, ceil(cols / 8)) uint8 -> (rows, cols) bool."""
    weights = torch.tensor(_BIT_WEIGHTS, dtype=torch.uint8, device=packed.device)
    bits = packed.unsqueeze(-1).bitwise_and(weights).ne(0)
    return bits.view(packed.shape[0], packed.shape[1] * 8)[:, :cols]


# Rank-1 non-negative factorization (the closed form of SMMF / Adafactor): with r = M 1 (row sums) and
# c = M^T 1 (column sums),  M ~= r c^T / (1^T M 1).  It is exact when M is rank 1. The row factor is stored
# normalized, r / (1^T M 1), so reconstruction is a plain outer product.
def factorize_rank1(magnitude: Tensor) -> tuple[Tensor, Tensor]:
    """magnitude: (rows, cols) float32 >= 0 -> (row factor (rows,), column factor (cols,))."""
    row_sums = magnitude.sum(dim=1)
    return row_sums.div_(row_sums.sum().clamp(min=1e-30)), magnitude.sum(dim=0)


def reconstruct_rank1(row: Tensor, col: Tensor) -> Tensor:
    return torch.outer(row, col)


@dataclass(frozen=True)
class Moment:
    """One moment of an optimizer (e.g. "exp_avg"), stored in `state` densely (same shape and dtype as the
    parameter, a DTensor for a DTensor parameter) or factored: float32 vectors `<name>_row` and `<name>_col` and,
    when signed, the packed signs `<name>_sign` (uint8, flattened (rows, ceil(cols / 8))), all describing the local
    shard in `per_shard_state` buffers.

    `load` returns a float32 working tensor shaped like the local shard, `store` writes it back. For a dense
    float32 moment the working tensor is the state itself, so updating it in place already stores it."""
    name: str
    signed: bool
    factored: bool

    def init(self, state: dict, param: Tensor, local: Tensor) -> None:
        if not self.factored:
            state[self.name] = torch.zeros_like(param, memory_format=torch.preserve_format)
            return
        rows, cols = effective_shape(local.numel())
        keys, lengths = [f"{self.name}_row", f"{self.name}_col"], [rows, cols]
        if self.signed:
            keys.append(f"{self.name}_sign")
            lengths.append(rows * -(-cols // 8))
        dtypes = [torch.float32, torch.float32, torch.uint8][:len(keys)]
        state.update(zip(keys, per_shard_state(param, lengths, dtypes)))

    def load(self, state: dict, local_shape: torch.Size) -> Tensor:
        if not self.factored:
            dense = local_tensor(state[self.name])
            return dense if dense.dtype == torch.float32 else dense.float()
        rows, cols = effective_shape(math.prod(local_shape))
        # A container that casts floating state to the parameter's dtype on load (CompositeOptimizer does, through
        # torch's Optimizer.load_state_dict) hands back factors in that dtype and signs as floats: byte values are
        # exact in every floating dtype, so the conversions below are lossless for the signs.
        row = read_prefix(state, f"{self.name}_row", rows).float()
        col = read_prefix(state, f"{self.name}_col", cols).float()
        working = reconstruct_rank1(row, col)
        if self.signed:
            packed = read_prefix(state, f"{self.name}_sign", rows * -(-cols // 8)).to(torch.uint8)
            negative = unpack_signs(packed.view(rows, -(-cols // 8)), cols)
            working = torch.where(negative, working.neg(), working)
        return working.view(local_shape)

    def store(self, state: dict, working: Tensor) -> None:
        if not self.factored:
            dense = local_tensor(state[self.name])
            if dense is not working:
                dense.copy_(working)
            return
        matrix = working.reshape(effective_shape(working.numel()))
        if self.signed:
            write_prefix(state, f"{self.name}_sign", pack_signs(matrix < 0))
            matrix = matrix.abs()
        row, col = factorize_rank1(matrix)
        write_prefix(state, f"{self.name}_row", row)
        write_prefix(state, f"{self.name}_col", col)
