"""Distributed streaming loader over token shards.

Every data-parallel rank reads its own contiguous slice of each global batch: with `world_size` ranks, a step
consumes `world_size x batch_size x sequence_length` tokens of the current shard starting at `position`, rank r
taking the r-th slice (plus one token for the shifted targets). Shards are read in name order and cycled. The
position (shard index, offset, epoch) is the loader's state_dict, stored in checkpoints.
"""
from __future__ import annotations

import glob
import os
from pathlib import Path

import numpy as np
import torch

from data.shards import ShardError, read_header, read_shard

TRAIN_GLOB = "*_train_*.bin"
VAL_GLOB = "*_val_*.bin"


def find_shards(data_dir: str | os.PathLike, split: str) -> list[Path]:
    """Shards of one split in a directory: matches the names written by every download script
    (fineweb_train_000001.bin, finewebedu_train_000001.bin, ...) and by scripts/tokenize_text.py."""
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise FileNotFoundError(f"data_dir: {data_dir} is not a directory (download shards with "
                                f"data/cached_fineweb10B.py, or leave data_dir empty for the embedded corpus)")
    files = sorted(Path(p) for p in glob.glob(str(data_dir / (TRAIN_GLOB if split == "train" else VAL_GLOB))))
    if not files:
        raise FileNotFoundError(f"data_dir: no {split} shards matching {TRAIN_GLOB if split == 'train' else VAL_GLOB}"
                                f" in {data_dir}")
    return files


class DistributedTokenLoader:
    """Yields (inputs, targets) int64 tensors of shape (batch_size, sequence_length) for one rank, on the CPU.

    pin_memory: return page-locked (pinned) tensors, so that `.to("cuda", non_blocking=True)` is an asynchronous
    copy that overlaps with the GPU's work instead of a synchronous one through a staging buffer. Needs CUDA;
    train.py turns it on when it trains on a GPU."""

    def __init__(self, files: list[Path], batch_size: int, sequence_length: int, rank: int = 0,
                 world_size: int = 1, pin_memory: bool = False):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside [0, {world_size})")
        self.pin_memory = pin_memory
        self.files = list(files)
        self.batch_size, self.sequence_length = batch_size, sequence_length
        self.rank, self.world_size = rank, world_size
        self.step_tokens = world_size * batch_size * sequence_length
        for f in self.files:
            num_tokens = read_header(f)
            if num_tokens < self.step_tokens + 1:
                raise ShardError(f"{f}: shard has {num_tokens} tokens, fewer than one global batch needs "
                                 f"({self.step_tokens + 1} = ranks x batch x sequence_length + 1); lower "
                                 f"device_batch_size or sequence_length")
        self.shard_index, self.position, self.epoch = 0, 0, 0
        self._tokens: np.ndarray | None = None

    def _shard(self) -> np.ndarray:
        if self._tokens is None:
            self._tokens = read_shard(self.files[self.shard_index])
        return self._tokens

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.position + self.step_tokens + 1 > len(self._shard()):
            self.shard_index += 1
            if self.shard_index == len(self.files):
                self.shard_index, self.epoch = 0, self.epoch + 1
            self.position, self._tokens = 0, None
        local = self.batch_size * self.sequence_length
        start = self.position + self.rank * local
        chunk = torch.from_numpy(self._shard()[start:start + local + 1].astype(np.int64))
        if self.pin_memory:  # one pinned buffer; inputs and targets are views of it
            chunk = chunk.pin_memory()
        self.position += self.step_tokens
        inputs = chunk[:-1].view(self.batch_size, self.sequence_length)
        targets = chunk[1:].view(self.batch_size, self.sequence_length)
        return inputs, targets

    def state_dict(self) -> dict:
        return dict(shard_index=self.shard_index, position=self.position, epoch=self.epoch,
                    world_size=self.world_size, batch_size=self.batch_size, sequence_length=self.sequence_length,
                    files=[f.name for f in self.files])

    def load_state_dict(self, state: dict) -> None:
        if state["world_size"] != self.world_size:
            raise ShardError(f"checkpoint: the data loader was saved with {state['world_size']} data-parallel ranks "
                             f"but this run has {self.world_size}; resuming would re-read or skip data. Resume "
                             f"with the same data-parallel size (dp_size x fs_size) or start a new run")
        for key in ("batch_size", "sequence_length"):
            if state[key] != getattr(self, key):
                raise ShardError(f"checkpoint: the data loader was saved with {key}={state[key]}, this run uses "
                                 f"{getattr(self, key)}; resume with the same {key}")
        if state["files"] != [f.name for f in self.files]:
            raise ShardError("checkpoint: the training shards differ from those the checkpoint was saved with")
        self.shard_index, self.position, self.epoch = state["shard_index"], state["position"], state["epoch"]
        self._tokens = None


def _validation_plan(files: list[Path], batch_size: int, sequence_length: int, val_tokens: int, rank: int,
                     world_size: int) -> tuple[DistributedTokenLoader, int]:
    loader = DistributedTokenLoader(files, batch_size, sequence_length, rank, world_size)
    steps = val_tokens // loader.step_tokens
    if steps == 0:
        raise ShardError(f"data.val_tokens: {val_tokens} is less than one validation batch "
                         f"({loader.step_tokens} tokens = ranks x device_batch_size x sequence_length)")
    available = sum((read_header(f) - 1) // loader.step_tokens for f in files)
    if steps > available:  # the loader would wrap around and count the same tokens twice
        raise ShardError(f"data.val_tokens: {val_tokens} is more than the validation split holds in whole batches "
                         f"({available * loader.step_tokens} tokens); use at most that")
    return loader, steps


def validation_batches(files: list[Path], batch_size: int, sequence_length: int, val_tokens: int, rank: int = 0,
                       world_size: int = 1):
    """The same fixed `val_tokens` (rounded down to whole global batches) from the start of the val shards on
    every call."""
    loader, steps = _validation_plan(files, batch_size, sequence_length, val_tokens, rank, world_size)
    for _ in range(steps):
        yield loader.next_batch()


def shards_read_by(files: list[Path], batch_size: int, sequence_length: int, world_size: int,
                   num_steps: int) -> list[Path]:
    """The training shards a run of `num_steps` steps reads (from step 0, so a resumed run's too): the loader
    moves to the next shard when the current one has no full global batch left, and cycles."""
    step_tokens = world_size * batch_size * sequence_length
    needed, out = num_steps, []
    for f in files:
        if needed <= 0:
            break
        out.append(f)
        needed -= (read_header(f) - 1) // step_tokens
    return out


def check_token_ids(path: Path, vocab_size: int) -> None:
    """ShardError naming the file and the first position of a token id >= vocab_size (a full scan: 0.02 s for a
    100M-token shard in the page cache on this project's CPU machine, plus the read from disk when it is not)."""
    tokens = read_shard(path)
    if tokens.size == 0 or int(tokens.max()) < vocab_size:
        return
    position = int(np.flatnonzero(tokens >= vocab_size)[0])
    raise ShardError(f"{path}: token id {int(tokens[position])} at position {position} is >= vocab_size "
                     f"{vocab_size}; the shard was written for another tokenizer, or raise vocab_size")


def check_data(train_files: list[Path], val_files: list[Path] | None, *, batch_size: int, sequence_length: int,
               world_size: int, num_steps: int, vocab_size: int, val_tokens: int) -> None:
    """Everything about the shards that would otherwise fail mid-run, checked before training: each shard holds
    one global batch, val_tokens covers one validation batch (when `val_files` is given: validation is on), and
    every shard the run reads has only token ids below vocab_size. Raises ShardError naming file or key."""
    DistributedTokenLoader(train_files, batch_size, sequence_length, 0, world_size)
    scanned = shards_read_by(train_files, batch_size, sequence_length, world_size, num_steps)
    if val_files is not None:
        _validation_plan(val_files, batch_size, sequence_length, val_tokens, 0, world_size)
        scanned += val_files
    for path in scanned:
        check_token_ids(path, vocab_size)
