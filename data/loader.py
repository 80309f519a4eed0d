"""Distributed streaming loader over token shards.

Every data-parallel rank reads its own contiguous slice of each global batch: with `world_size` ranks, a step
consumes `world_size x batch_size x sequence_length` tokens of the current shard starting at `position`, rank r
taking the r-th slice (plus one token for the shifted targets). Shards are read in name order and cycled. The
position (shard index, offset, epoch) is the loader's state_dict, stored in checkpoints.

Two orders (`data.order`), equal on one rank and until the first shard boundary on several:
- sequential: all ranks move to the next shard together, when the current one has no whole global batch left.
- reference: microsoft/dion's `DistributedDataLoader` (models/gpt_utils.py at 0a059a4). Each rank keeps its own
  position and moves on when *its* position plus one global batch would pass the shard's end, so rank r leaves a
  shard after max(1, (tokens - 1 - r x local) // global batch) reads: higher ranks move up to one batch earlier,
  and from the first boundary on the ranks read batches of different global steps, as the reference's ranks do.
  The state is the number of batches read (the same on every rank); each rank recomputes its own position from it.
"""
from __future__ import annotations

import glob
import os
from pathlib import Path

import numpy as np
import torch

from data.shards import ShardError, read_header, read_shard

ORDERS = ("sequential", "reference")
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
                 world_size: int = 1, pin_memory: bool = False, order: str = "sequential"):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside [0, {world_size})")
        if order not in ORDERS:
            raise ValueError(f"data.order: {order!r} is not one of {', '.join(ORDERS)}")
        self.pin_memory, self.order = pin_memory, order
        self.files = list(files)
        self.batch_size, self.sequence_length = batch_size, sequence_length
        self.rank, self.world_size = rank, world_size
        self.step_tokens = world_size * batch_size * sequence_length
        self.lengths = [read_header(f) for f in self.files]
        for f, num_tokens in zip(self.files, self.lengths):
            if num_tokens < self.step_tokens + 1:
                raise ShardError(f"{f}: shard has {num_tokens} tokens, fewer than one global batch needs "
                                 f"({self.step_tokens + 1} = ranks x batch x sequence_length + 1); lower "
                                 f"device_batch_size or sequence_length")
        self.batches = 0  # next_batch calls so far (the reference order's state)
        self._seek(0)
        self._tokens: np.ndarray | None = None

    @property
    def local_tokens(self) -> int:
        return self.batch_size * self.sequence_length

    def reads_per_shard(self, length: int) -> int:
        """Batches this rank reads from a shard of `length` tokens before moving on (reference order)."""
        return max(1, (length - 1 - self.rank * self.local_tokens) // self.step_tokens)

    def _seek(self, batches: int) -> None:
        """Shard, offset and epoch after `batches` reads from the start (reference order: this rank's own)."""
        self.shard_index, self.epoch = 0, 0
        if self.order == "reference":
            while batches >= self.reads_per_shard(self.lengths[self.shard_index]):
                batches -= self.reads_per_shard(self.lengths[self.shard_index])
                self.shard_index += 1
                if self.shard_index == len(self.files):
                    self.shard_index, self.epoch = 0, self.epoch + 1
            self.position = self.rank * self.local_tokens + batches * self.step_tokens
        else:
            self.position = 0

    def _shard(self) -> np.ndarray:
        if self._tokens is None:
            self._tokens = read_shard(self.files[self.shard_index])
        return self._tokens

    def _next_shard(self, position: int) -> None:
        self.shard_index += 1
        if self.shard_index == len(self.files):
            self.shard_index, self.epoch = 0, self.epoch + 1
        self.position, self._tokens = position, None

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        local = self.local_tokens
        if self.order == "reference":  # read at this rank's position, then move on if one more batch would not fit
            start = self.position
        else:  # move on first if the global batch does not fit; rank r reads the r-th slice
            if self.position + self.step_tokens + 1 > self.lengths[self.shard_index]:
                self._next_shard(0)
            start = self.position + self.rank * local
        chunk = torch.from_numpy(self._shard()[start:start + local + 1].astype(np.int64))
        if self.pin_memory:  # one pinned buffer; inputs and targets are views of it
            chunk = chunk.pin_memory()
        self.position += self.step_tokens
        self.batches += 1
        if self.order == "reference" and self.position + self.step_tokens + 1 > self.lengths[self.shard_index]:
            self._next_shard(self.rank * local)
        inputs = chunk[:-1].view(self.batch_size, self.sequence_length)
        targets = chunk[1:].view(self.batch_size, self.sequence_length)
        return inputs, targets

    def state_dict(self) -> dict:
        state = dict(shard_index=self.shard_index, position=self.position, epoch=self.epoch,
                     world_size=self.world_size, batch_size=self.batch_size, sequence_length=self.sequence_length,
                     files=[f.name for f in self.files], order=self.order, batches=self.batches)
        if self.order == "reference":  # the per-rank position is derived from `batches` on load
            del state["shard_index"], state["position"], state["epoch"]
        return state

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
        saved_order = state.get("order", "sequential")
        if saved_order != self.order:
            raise ShardError(f"checkpoint: the data loader was saved with data.order={saved_order}, this run uses "
                             f"{self.order}; resume with the same data.order")
        self.batches = state.get("batches", 0)
        if self.order == "reference":
            self._seek(self.batches)
        else:
            self.shard_index, self.position, self.epoch = state["shard_index"], state["position"], state["epoch"]
        self._tokens = None


def _validation_plan(files: list[Path], batch_size: int, sequence_length: int, val_tokens: int, rank: int,
                     world_size: int, order: str = "sequential") -> tuple[DistributedTokenLoader, int]:
    loader = DistributedTokenLoader(files, batch_size, sequence_length, rank, world_size, order=order)
    steps = val_tokens // loader.step_tokens
    if steps == 0:
        raise ShardError(f"data.val_tokens: {val_tokens} is less than one validation batch "
                         f"({loader.step_tokens} tokens = ranks x device_batch_size x sequence_length)")
    available = sum((length - 1) // loader.step_tokens for length in loader.lengths)
    if steps > available:  # the loader would wrap around and count the same tokens twice
        raise ShardError(f"data.val_tokens: {val_tokens} is more than the validation split holds in whole batches "
                         f"({available * loader.step_tokens} tokens); use at most that")
    return loader, steps


def validation_batches(files: list[Path], batch_size: int, sequence_length: int, val_tokens: int, rank: int = 0,
                       world_size: int = 1, order: str = "sequential"):
    """The same fixed `val_tokens` (rounded down to whole global batches) from the start of the val shards on
    every call, in `order` (the reference's validation loader reads its shards as its training loader does)."""
    loader, steps = _validation_plan(files, batch_size, sequence_length, val_tokens, rank, world_size, order)
    for _ in range(steps):
        yield loader.next_batch()


def shards_read_by(files: list[Path], batch_size: int, sequence_length: int, world_size: int,
                   num_batches: int, order: str = "sequential") -> list[Path]:
    """The training shards a run of `num_batches` batches per rank (optimizer steps x micro-batches per step) reads (from the start, so a resumed run's too): the loader
    moves to the next shard when the current one has no full global batch left, and cycles. In reference order the
    last rank, which leaves each shard first, reaches furthest."""
    loader = DistributedTokenLoader(files, batch_size, sequence_length, world_size - 1, world_size, order=order)
    needed, out = num_batches, []
    for f, length in zip(files, loader.lengths):
        if needed <= 0:
            break
        out.append(f)
        needed -= loader.reads_per_shard(length) if order == "reference" else (length - 1) // loader.step_tokens
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
               world_size: int, num_batches: int, vocab_size: int, val_tokens: int, order: str = "sequential") -> None:
    """Everything about the shards that would otherwise fail mid-run, checked before training: each shard holds
    one global batch, val_tokens covers one validation batch (when `val_files` is given: validation is on), and
    every shard the run reads (num_batches micro-batches per rank) has only token ids below vocab_size. Raises
    ShardError naming file or key."""
    DistributedTokenLoader(train_files, batch_size, sequence_length, 0, world_size, order=order)
    scanned = shards_read_by(train_files, batch_size, sequence_length, world_size, num_batches, order)
    if val_files is not None:
        _validation_plan(val_files, batch_size, sequence_length, val_tokens, 0, world_size)
        scanned += val_files
    for path in scanned:
        check_token_ids(path, vocab_size)
