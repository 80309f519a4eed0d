"""Token shard format of the cached FineWeb sets (modded-nanoGPT layout), reader and writer in one place.

A shard is a 256 x int32 little-endian header -- magic 20240520, version 1, token count, the rest zero -- followed
by `token count` uint16 GPT-2 token ids.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

MAGIC = 20240520
VERSION = 1
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
TOKEN_DTYPE = np.dtype("<u2")


class ShardError(ValueError):
    """Shards that cannot serve the run: not in the expected format, too short for a batch, token ids beyond the
    vocabulary; the message names the file (or the key, e.g. val_tokens)."""


def write_shard(path: str | os.PathLike, tokens: np.ndarray) -> None:
    """Write `tokens` (any integer array with values < 2**16) as a shard, atomically (temp file + rename)."""
    tokens = np.asarray(tokens)
    if tokens.size and (tokens.min() < 0 or tokens.max() >= 2 ** 16):
        raise ValueError(f"{path}: token ids must lie in [0, 65535] to fit the uint16 shard format")
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[0], header[1], header[2] = MAGIC, VERSION, tokens.size
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(header.tobytes())
        f.write(tokens.astype(TOKEN_DTYPE).tobytes())
    os.replace(tmp, path)


def read_header(path: str | os.PathLike) -> int:
    """Validate the header and the file size; return the token count."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: shard file not found")
    size = path.stat().st_size
    if size < HEADER_BYTES:
        raise ShardError(f"{path}: file is {size} bytes, shorter than the {HEADER_BYTES}-byte shard header")
    header = np.fromfile(path, dtype="<i4", count=HEADER_INTS)
    if header[0] != MAGIC:
        raise ShardError(f"{path}: bad magic number {header[0]} (expected {MAGIC}); not a token shard")
    if header[1] != VERSION:
        raise ShardError(f"{path}: unsupported shard version {header[1]} (expected {VERSION})")
    num_tokens = int(header[2])
    expected = HEADER_BYTES + num_tokens * TOKEN_DTYPE.itemsize
    if size != expected:
        raise ShardError(f"{path}: header says {num_tokens} tokens ({expected} bytes) but the file has {size} bytes")
    return num_tokens


def read_shard(path: str | os.PathLike) -> np.ndarray:
    """Memory-map the tokens of a validated shard (uint16, read-only)."""
    num_tokens = read_header(path)
    return np.memmap(path, dtype=TOKEN_DTYPE, mode="r", offset=HEADER_BYTES, shape=(num_tokens,))
