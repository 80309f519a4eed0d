"""Sharded checkpoints with torch.distributed.checkpoint (DCP), verified on load.

A checkpoint is the directory `step_%08d` holding the model and optimizer state (fully-qualified names, so a
checkpoint saved under one parallel layout loads under another when the tensors allow it), the LR scheduler, the
data loader position, the step, the wandb run id, the world size, each rank's RNG state, and `manifest.json`: the
size and SHA-256 of every file DCP wrote, the config the run was started with and its data-parallel size.

Writing: the state is refused if any weight or optimizer tensor is non-finite (every rank checks its shards and the
ranks agree), and if the disk lacks room for it; it is written into `step_%08d.tmp`, hashed, and renamed once every
rank has finished, so a run killed mid-save leaves the previous checkpoint intact. Only then are older checkpoints
pruned, each renamed to `.deleting` before it is removed, so a kill while pruning never leaves a half-deleted
directory that looks like a checkpoint.

Resuming: rank 0 picks the checkpoint and broadcasts it, so every rank loads the same one. It takes the newest
complete directory (`.metadata` and manifest present) whose files match the manifest; one that does not is moved
aside to `step_%08d.corrupt` (never deleted) with one line saying why, and the next older one is tried. Leftovers
(`.tmp`, `.deleting`) are removed; stray `step_*` directories without a manifest are reported and never counted.
"""
from __future__ import annotations

import hashlib
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

from trainer.config import TrainConfig
from trainer.distributed import Distributed, broadcast_from_main
from trainer.errors import CheckpointError, TrainingError
from trainer.runtime import interrupts_deferred

MANIFEST = "manifest.json"
_STEP_DIR = re.compile(r"^step_(\d{8})$")
_LEFTOVER = re.compile(r"^step_\d{8}\.(tmp|deleting)$")
_HASH_CHUNK = 1 << 22

# Config keys (dotted, as in config.yaml; "section.*" = the whole section) that may differ between a checkpoint and
# the run resuming it; any other difference is refused before loading, because the checkpoint's tensors, optimizer
# state or data position would contradict it. The learning rates, weight decay and schedule keys take effect from
# the resumed step on (trainer/schedule.py resume_schedule; README, "Checkpoints and resume").
RESUMABLE_KEYS = frozenset({
    "schedule.*", "optimizer.lr", "optimizer.weight_decay", "optimizer.scalar.lr", "grad_clip", "logging.*",
    "checkpoint.*", "data.dir", "data.val_tokens", "seed", "compile", "debug", "parallel.dp_size", "parallel.fs_size",
    "parallel.tp_size", "parallel.vocab_parallel", "parallel.activation_checkpointing", "parallel.meta_init",
    "parallel.fsdp_gradient_accumulation", "precision.autocast", "precision.param_dtype", "precision.reduce_dtype",
})


def checkpoint_step(path: Path) -> int:
    return int(_STEP_DIR.match(path.name).group(1))


def complete_checkpoints(checkpoint_dir: Path) -> list[Path]:
    """Checkpoint directories with DCP's `.metadata` and a manifest, oldest first. Not verified."""
    if not checkpoint_dir.is_dir():
        return []
    complete = [p for p in checkpoint_dir.iterdir()
                if _STEP_DIR.match(p.name) and (p / ".metadata").is_file() and (p / MANIFEST).is_file()]
    return sorted(complete, key=checkpoint_step)


def latest_checkpoint(checkpoint_dir: Path) -> Path | None:
    """The complete checkpoint with the highest step, or None (temporary and stray directories are ignored)."""
    complete = complete_checkpoints(checkpoint_dir)
    return complete[-1] if complete else None


def _rng_key(rank: int) -> str:
    return f"rng_state_rank{rank}"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _describe(path: Path) -> dict[str, Any]:
    return {"bytes": path.stat().st_size, "sha256": _sha256(path)}


def _remove(path: Path) -> None:
    """Rename, then delete: a kill in between leaves a `.deleting` directory, never a partial checkpoint."""
    doomed = path.with_name(path.name + ".deleting")
    shutil.rmtree(doomed, ignore_errors=True)
    path.rename(doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def _local_tensors(state: Any, prefix: str = ""):
    """(name, local tensor) pairs of a nested state dict; DTensors contribute their local shard."""
    from torch.distributed.tensor import DTensor
    if isinstance(state, dict):
        for key, value in state.items():
            yield from _local_tensors(value, f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(state, (list, tuple)):
        for index, value in enumerate(state):
            yield from _local_tensors(value, f"{prefix}.{index}")
    elif isinstance(state, DTensor):
        yield prefix, state.to_local()
    elif isinstance(state, torch.Tensor):
        yield prefix, state


def _global_bytes(state: Any) -> int:
    """Bytes the state occupies once saved: DTensors at their global size, plain tensors once (DCP writes a
    replicated tensor from one rank only, so summing over ranks would overestimate by the replica count)."""
    if isinstance(state, dict):
        return sum(_global_bytes(value) for value in state.values())
    if isinstance(state, (list, tuple)):
        return sum(_global_bytes(value) for value in state)
    if isinstance(state, torch.Tensor):  # DTensor included: numel() is the global element count
        return state.numel() * state.element_size()
    return 0


def non_finite_tensors(state: dict[str, Any]) -> list[str]:
    """Names of floating-point tensors (local shards) holding a NaN or an infinity."""
    return [name for name, tensor in _local_tensors(state)
            if tensor.is_floating_point() and tensor.numel() and not bool(torch.isfinite(tensor).all())]


def _sum_over_ranks(value: int, env: Distributed) -> int:
    if env.world_size == 1:
        return value
    box = torch.tensor([value], dtype=torch.int64, device=env.device)  # NCCL reduces device tensors only
    dist.all_reduce(box, op=dist.ReduceOp.SUM)
    return int(box.item())


def _gather(value: Any, env: Distributed) -> list[Any]:
    if env.world_size == 1:
        return [value]
    out = [None] * env.world_size
    dist.all_gather_object(out, value)
    return out


def _human(num_bytes: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if num_bytes < 1024:
            return f"{num_bytes:.0f} {unit}"
        num_bytes /= 1024
    return f"{num_bytes:.1f} TiB"


def save_checkpoint(checkpoint_dir: Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
                    trainer_state: dict[str, Any], env: Distributed, keep: int, config: dict[str, Any]) -> Path:
    """Collective: every rank calls it. `trainer_state` holds JSON-serializable values identical on all ranks;
    `config` is the run's config as a dict, recorded in the manifest to check a later resume against.

    Raises TrainingError when a weight or optimizer state is non-finite (nothing written), CheckpointError when
    the checkpoint cannot be written (the previous ones are kept)."""
    final = checkpoint_dir / f"step_{step:08d}"
    tmp = checkpoint_dir / f"step_{step:08d}.tmp"
    model_state, optimizer_state = get_state_dict(model, optimizer)
    bad = non_finite_tensors({"model": model_state, "optimizer": optimizer_state})
    if _sum_over_ranks(len(bad), env):
        healthy = latest_checkpoint(checkpoint_dir)
        named = ", ".join(bad[:3]) + (" ..." if len(bad) > 3 else "") if bad else "on another rank"
        raise TrainingError(f"non-finite weights or optimizer state at step {step} ({named}); checkpoint not "
                            f"written, the newest healthy one is {healthy or 'none'}. Restart with a lower lr "
                            f"to resume from it")
    needed = _global_bytes({"model": model_state, "optimizer": optimizer_state})
    problem = None
    if env.is_main:
        try:
            checkpoint_dir.mkdir(parents=True, exist_ok=True)
            if tmp.exists():
                shutil.rmtree(tmp)  # left over by a run killed while saving
            free = shutil.disk_usage(checkpoint_dir).free
            if free < needed:
                problem = (f"checkpoint of step {step} not saved: {checkpoint_dir} has {_human(free)} free, it needs "
                           f"about {_human(needed)}")
        except OSError as error:
            problem = f"checkpoint of step {step} not saved: {checkpoint_dir}: {error.strerror or error}"
    _raise_if(broadcast_from_main(problem, env), checkpoint_dir)
    state = {"model": model_state, "optimizer": optimizer_state,
             "trainer": json.dumps({**trainer_state, "world_size": env.world_size}),
             _rng_key(env.rank): torch.get_rng_state()}
    try:
        with warnings.catch_warnings():  # single-process saves are intended
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.save(state, checkpoint_id=str(tmp))
        # Each rank hashes the files it wrote (DCP names them __<rank>_<n>.distcp); rank 0 also `.metadata`.
        mine = {p.name: _describe(p) for p in tmp.glob(f"__{env.rank}_*")}
        if env.is_main:
            mine[".metadata"] = _describe(tmp / ".metadata")
        error_text = None
    except Exception as error:  # DCP wraps per-rank OSErrors (ENOSPC, EROFS) in CheckpointException
        mine, error_text = {}, f"{type(error).__name__}: {str(error).splitlines()[0][:200] if str(error) else ''}"
    gathered = _gather((mine, error_text), env)
    errors = [text for _, text in gathered if text]
    problem = None
    if env.is_main:
        if errors:
            free = shutil.disk_usage(checkpoint_dir).free
            problem = (f"checkpoint of step {step} could not be written to {checkpoint_dir} ({errors[0]}); "
                       f"{_human(free)} free, about {_human(needed)} needed")
        else:
            try:
                files = {name: info for part, _ in gathered for name, info in part.items()}
                manifest = {"step": step, "files": files, "config": config,
                            "data_world_size": env.data_world_size, "world_size": env.world_size}
                (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
                if final.exists():
                    _remove(final)
                tmp.rename(final)
            except OSError as error:
                problem = f"checkpoint of step {step} could not be finished in {checkpoint_dir} ({error})"
        if problem is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            older = [p for p in complete_checkpoints(checkpoint_dir) if p != final]
            for stale in older[:max(0, len(older) - (keep - 1))]:
                _remove(stale)
    _raise_if(broadcast_from_main(problem, env), checkpoint_dir)
    return final


def _raise_if(problem: str | None, checkpoint_dir: Path) -> None:
    if problem is not None:
        kept = latest_checkpoint(checkpoint_dir)
        raise CheckpointError(f"{problem}; the previous checkpoint ({kept or 'none'}) is kept; stopping")


def verify_checkpoint(path: Path) -> str | None:
    """None when every file the manifest lists has its recorded size and SHA-256, else the first problem."""
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        files = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        return f"unreadable {MANIFEST} ({type(error).__name__})"
    if ".metadata" not in files:
        return f"{MANIFEST} lists no .metadata"
    for name, info in sorted(files.items()):
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        size = file.stat().st_size
        if size != info["bytes"]:
            return f"{name} has {size} bytes, {info['bytes']} were written"
        if _sha256(file) != info["sha256"]:
            return f"{name} does not match its checksum"
    return None


def _flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, name + "."))
        else:
            out[name] = value
    return out


def config_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """'key (saved -> current)' for each key that differs and may not change on resume."""
    saved, current = _flatten(saved), _flatten(json.loads(json.dumps(current)))  # tuples -> lists, as saved
    out = []
    for key in sorted(set(saved) | set(current)):
        if key in RESUMABLE_KEYS or f"{key.split('.')[0]}.*" in RESUMABLE_KEYS:
            continue
        before, after = saved.get(key, "unset"), current.get(key, "unset")
        if before != after:
            out.append(f"{key} ({before!r} -> {after!r})")
    return out


def _check_compatible(path: Path, config: dict[str, Any], env: Distributed) -> str | None:
    manifest = json.loads((path / MANIFEST).read_text())
    differences = config_differences(manifest.get("config", {}), config)
    saved_ranks = manifest.get("data_world_size")
    if saved_ranks is not None and saved_ranks != env.data_world_size:
        differences.append(f"data-parallel ranks ({saved_ranks} -> {env.data_world_size})")
    if not differences:
        return None
    allowed = ", ".join(sorted(RESUMABLE_KEYS))
    return (f"checkpoint {path} cannot resume this config, which differs in {', '.join(differences)}; only these "
            f"may change on resume: {allowed}. Resume with the saved values or start a new run_dir")


def _set_aside(path: Path) -> Path:
    aside = path.with_name(path.name + ".corrupt")
    index = 1
    while aside.exists():
        aside = path.with_name(f"{path.name}.corrupt{index}")
        index += 1
    path.rename(aside)
    return aside


def choose_resume_checkpoint(checkpoint_dir: Path, config: dict[str, Any], env: Distributed) -> Path | None:
    """Collective. Rank 0 cleans leftovers, verifies the newest complete checkpoints until one passes (moving each
    failing one aside with a line on stdout), checks it against `config`, and broadcasts the result: the path
    every rank resumes from, or None for a fresh start. Raises CheckpointError (on every rank) when checkpoints
    exist but none is usable, or when the usable one was saved with an incompatible config."""
    choice, problem = None, None
    if env.is_main:
        choice, problem = _choose(checkpoint_dir, config, env)
    choice, problem = broadcast_from_main((choice, problem), env)
    if problem is not None:
        raise CheckpointError(problem)
    return None if choice is None else Path(choice)


def _choose(checkpoint_dir: Path, config: dict[str, Any], env: Distributed) -> tuple[str | None, str | None]:
    if not checkpoint_dir.is_dir():
        return None, None
    for leftover in checkpoint_dir.iterdir():
        if _LEFTOVER.match(leftover.name):
            shutil.rmtree(leftover, ignore_errors=True)
    complete = complete_checkpoints(checkpoint_dir)
    for stray in sorted(p for p in checkpoint_dir.iterdir() if _STEP_DIR.match(p.name) and p not in complete):
        print(f"warning: {stray} is not a complete checkpoint (no .metadata or {MANIFEST}); ignored")
    rejected = 0
    for candidate in reversed(complete):
        reason = verify_checkpoint(candidate)
        if reason is None:
            return str(candidate), _check_compatible(candidate, config, env)
        aside = _set_aside(candidate)
        rejected += 1
        print(f"warning: checkpoint {candidate} is corrupt ({reason}); moved to {aside.name}")
    if rejected:
        return None, (f"no usable checkpoint in {checkpoint_dir}: all {rejected} failed verification and were "
                      f"moved to *.corrupt; restore one, or rerun to start from step 0")
    return None, None


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


class Checkpointer:
    """The run's checkpoints: saved every checkpoint.freq steps and after the last one (freq 0: never) into the
    config's checkpoint directory, checkpoint.keep of them kept; the newest one's name is remembered (`last`: the
    one resumed from, then each one saved) for the line printed on Ctrl-C."""

    def __init__(self, config: TrainConfig, env: Distributed):
        self.directory, self.freq, self.keep = config.checkpoint_dir, config.checkpoint.freq, config.checkpoint.keep
        self.config, self.env = config.to_dict(), env
        self.last: str | None = None

    def due(self, step: int, last: bool) -> bool:
        """Whether a checkpoint is saved after step `step` (counted from 1); `last`: the run's final step."""
        return self.freq > 0 and (step % self.freq == 0 or last)

    def resume_point(self) -> Path | None:
        """Collective: the checkpoint to resume from, None for a fresh start (choose_resume_checkpoint)."""
        path = choose_resume_checkpoint(self.directory, self.config, self.env)
        self.last = path.name if path is not None else None
        return path

    def load(self, path: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        return load_checkpoint(path, model, optimizer, self.env)

    def save(self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
             trainer_state: dict[str, Any]) -> Path:
        """Collective (save_checkpoint). Ctrl-C during the save takes effect once it is complete."""
        with interrupts_deferred():
            saved = save_checkpoint(self.directory, step, model, optimizer, trainer_state, self.env, self.keep,
                                    self.config)
            self.last = saved.name
        return saved


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

