"""Sharded checkpoints with torch.distributed.checkpoint (DCP).

A checkpoint is the directory `step_%08d` holding the model and optimizer state (fully-qualified names, so a
checkpoint saved under one parallel layout loads under another when the tensors allow it), the LR scheduler, the
data loader position, the step, the wandb run id, the world size, and each rank's RNG state. It is written into
`step_%08d.tmp` and renamed once every rank has finished, so a run killed mid-save leaves the previous checkpoint
intact and loadable; the newest complete directory is what a restart resumes from.
"""
from __future__ import annotations

import json
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from trainer.distributed import Distributed
from trainer.errors import CheckpointError

_STEP_DIR = re.compile(r"^step_(\d{8})$")


def latest_checkpoint(checkpoint_dir: Path) -> Path | None:
    """The complete checkpoint with the highest step, or None (temporary directories are ignored)."""
    if not checkpoint_dir.is_dir():
        return None
    complete = [p for p in checkpoint_dir.iterdir() if _STEP_DIR.match(p.name) and (p / ".metadata").exists()]
    return max(complete, key=lambda p: int(_STEP_DIR.match(p.name).group(1)), default=None)


def _rng_key(rank: int) -> str:
    return f"rng_state_rank{rank}"


def save_checkpoint(checkpoint_dir: Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
                    trainer_state: dict[str, Any], env: Distributed, keep: int) -> Path:
    """Collective: every rank calls it. `trainer_state` holds JSON-serializable values identical on all ranks."""
    final = checkpoint_dir / f"step_{step:08d}"
    tmp = checkpoint_dir / f"step_{step:08d}.tmp"
    if env.is_main:
        checkpoint_dir.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # left over by a run killed while saving
    env.barrier()
    model_state, optimizer_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optimizer_state,
             "trainer": json.dumps({**trainer_state, "world_size": env.world_size}),
             _rng_key(env.rank): torch.get_rng_state()}
    with warnings.catch_warnings():  # single-process saves are intended
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.save(state, checkpoint_id=str(tmp))
    env.barrier()
    if env.is_main:
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        older = sorted((p for p in checkpoint_dir.iterdir() if _STEP_DIR.match(p.name) and p != final),
                       key=lambda p: p.name)
        for stale in older[:max(0, len(older) - (keep - 1))]:
            shutil.rmtree(stale, ignore_errors=True)
    env.barrier()
    return final


def load_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                    env: Distributed) -> dict[str, Any]:
    """Load into the (already parallelized) model and optimizer; returns the trainer state. RNG states are
    restored when the world size matches (with another layout the per-rank streams cannot correspond)."""
    model_state, optimizer_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optimizer_state, "trainer": ""}
    metadata = dcp.FileSystemReader(str(path)).read_metadata()
    saved_keys = set(metadata.state_dict_metadata)
    rng_key = _rng_key(env.rank)
    restore_rng = rng_key in saved_keys
    if restore_rng:
        state[rng_key] = torch.get_rng_state()
    _load(state, path, "this model/optimizer/layout")
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    trainer_state = json.loads(state["trainer"])
    if restore_rng and trainer_state.get("world_size") == env.world_size:
        torch.set_rng_state(state[rng_key])
    if dist.is_initialized():
        dist.barrier()
    return trainer_state


def find_checkpoint(path: Path) -> Path:
    """`path` itself when it is a complete checkpoint (a step_NNNNNNNN directory with DCP metadata), else the newest
    complete checkpoint inside it; CheckpointError when there is none."""
    if (path / ".metadata").is_file():
        return path
    found = latest_checkpoint(path)
    if found is None:
        raise CheckpointError(f"{path}: no complete checkpoint (a step_NNNNNNNN directory with .metadata); was "
                              f"checkpoint.freq 0, or did the run stop before its first checkpoint?")
    return found


def load_model_weights(path: Path, model: nn.Module) -> None:
    """The model weights of checkpoint `path` into a plain single-process `model` (no process group needed).
    The checkpoint may come from any layout (DDP, FSDP2, TP, HSDP): DCP stores each parameter once under its
    fully-qualified name and reassembles the shards into the full tensors of `model`."""
    state = {"model": model.state_dict()}
    _load(state, path, "this model")
    model.load_state_dict(state["model"])


def _load(state: dict[str, Any], path: Path, into: str) -> None:
    """dcp.load in place (single-process loads are intended); a failure is a CheckpointError naming `path`."""
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(state, checkpoint_id=str(path))
    except (Exception, CheckpointException) as error:  # CheckpointException (per-rank errors) is a BaseException
        if isinstance(error, CheckpointException) and error.failures:
            error = next(iter(error.failures.values()))[0]  # the first rank's own error says what is wrong
        raise CheckpointError(f"checkpoint {path}: cannot load into {into} "
                              f"({type(error).__name__}: {str(error).splitlines()[0][:300]})") from None
