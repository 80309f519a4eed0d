"""Memory and traffic per rank of a layout at any world size, simulated in this process before any GPU is rented.

`simulate(config, world_size, rank)` runs the trainer's own build path for one rank of `world_size`: a process group
of torch's fake backend (every collective returns at once, nothing is sent), the (dp, fs, tp) mesh of
`init_distributed`, `check_layout`, the model on the meta device, `parallelize` (TP plan, activation
checkpointing, FSDP2 / DDP), `build_training_optimizer`, then one micro-batch's forward and backward and one
`optimizer.step()`, all under FakeTensorMode: every tensor has its shape, dtype and placement but no storage, so a
70B model at 1024 ranks costs seconds and no memory. What it reports per rank:
- parameters, gradients and each optimizer state (by its key: Dion's `Q` and `momentum`, Muon's `momentum`,
  AdamW's `exp_avg` / `exp_avg_sq`, ...): the bytes of this rank's local tensors (DTensor `to_local()`), exact;
- activations: what one micro-batch's forward leaves for its backward (torch's MemTracker, category Activation),
  with activation checkpointing off (`none`) and on every block (`full`);
- peak: MemTracker's (FSDPMemTracker's under FSDP2) peak over that forward and backward, with the configured
  checkpointing, and over the first step (which creates the optimizer states). Where the tracker cannot size the
  step's tensors (Dion2's data-dependent row selections) the step runs untracked and the peak is a lower bound
  (`peak_covers_step` false: the step's transients are missing);
- traffic: bytes per rank of every collective of the step by phase, group and kind (trainer.collectives), beside
  the formulas for the replica sync: 4 sum (m + n) r / shards for Dion's compressed matrices, 4 m n / shards for
  full gradients.

What the simulation cannot see, and how it is handled:
- values: a data-dependent branch (`bool(t)`, `t.item()`: Dion's "Cholesky succeeded" flag, a step counter) reads
  True, 1 or 1.0 (`_DataDependentDefaults`): the happy path; Dion2's data-dependent selections get unbacked sizes
  from a ShapeEnv. DTensor computes some shard offsets with tensors (`compute_local_shape_and_global_offset`);
  those read 1 too, so where a rank's slice starts inside a matrix may be wrong here, not its size or what it
  sends (the Muon family's owner slot comes from the mesh coordinate for that reason).
- the device: tensors are fake CPU tensors; the compute dtype is the one the run would autocast to on a GPU
  (`precision.autocast: auto` is bfloat16 there). torch.compile is off (`compile: true` would only lower the
  activations); memory is counted by tensor storage, without the CUDA caching allocator's fragmentation or NCCL
  and CUDA context buffers (plan for a few GiB more).
- rank roles: the ranks of a (dp, fs, tp) mesh differ only in their position; `ranks` picks which to simulate (the
  first and last show uneven shards and owner splits).
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
from dataclasses import dataclass, field
from unittest import mock

import torch
import torch.distributed as dist
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from optimizers.common.hooks import training_hooks
from optimizers.dion.linalg import low_rank_dim
from trainer.build import (build_model, build_training_optimizer, check_layout, micro_batch_size,
                           optimizer_syncs_replicas)
from trainer.collectives import CollectiveLedger, mesh_group_names
from trainer.config import TrainConfig
from trainer.distributed import (Distributed, apply_activation_checkpointing, init_distributed, mesh_sizes,
                                 parallelize, unwrap)
from trainer.errors import ConfigError, LayoutError

GPU = "cuda"  # the device type whose autocast dtype the simulated step computes in
# Dion's Q is (columns of its orientation, r): split over the shard group of the matrix's columns only, by design
# (optimizers/dion/distributed.py), so a Q of a full-rank square matrix has the parameter's shape and may be whole.
COLUMN_SIDE_STATES = frozenset({"Q"})
GIB = 2 ** 30


@dataclass
class RankEstimate:
    """One simulated rank. Sizes in bytes (`parameters_total`, `state_totals`: of the global tensors, all ranks'
    shards together, to set against this rank's); `traffic` and `calls` are keyed "phase/group/kind" (group: replicas =
    dp, shards = fs, tp, world); `whole` names the tensors this rank holds whole although the layout shards every
    parameter (parameters, gradients, parameter-shaped optimizer states)."""
    rank: int
    world_size: int
    dp: int
    fs: int
    tp: int
    optimizer: str
    micro_batch: int
    accumulation: int
    parameters: int
    gradients: int
    states: dict[str, int]
    activations: dict[str, int]
    peak: int
    traffic: dict[str, int]
    calls: dict[str, int]
    formula: dict[str, float]
    parameters_total: int
    state_totals: dict[str, int]
    whole: list[str] = field(default_factory=list)
    peak_covers_step: bool = True  # False: the tracker could not follow the step; `peak` is then a lower bound

    @property
    def optimizer_states(self) -> int:
        return sum(self.states.values())

    def replica_traffic(self) -> int:
        """Bytes this rank exchanges with its data-parallel replicas in one step (every phase and kind)."""
        return sum(v for key, v in self.traffic.items() if key.split("/")[1] == "replicas")


class _DataDependentDefaults(TorchDispatchMode):
    """Reads of a fake tensor's value (`bool(t)`, `t.item()`) give True, 1 or 1.0: the branch a healthy step takes
    (Dion's Cholesky-succeeded flag, a step count)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            dtype = args[0].dtype
            return True if dtype == torch.bool else 1.0 if dtype.is_floating_point else 1
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def fake_process_group(world_size: int, rank: int):
    """torch.distributed initialized with the fake backend as `rank` of `world_size`, destroyed on exit; inside,
    `init_distributed` reads the same rank and world size."""
    from torch.testing._internal.distributed.fake_pg import FakeStore
    if dist.is_initialized():
        raise RuntimeError("estimate: a process group is already initialized in this process")
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world_size)
    try:
        with mock.patch.dict(os.environ, {"WORLD_SIZE": str(world_size), "RANK": str(rank), "LOCAL_RANK": "0"}):
            yield
    finally:
        dist.destroy_process_group()


def local_bytes(t: torch.Tensor) -> int:
    t = t.to_local() if hasattr(t, "to_local") else t
    return t.numel() * t.element_size()


def _local_numel(t: torch.Tensor) -> int:
    return (t.to_local() if hasattr(t, "to_local") else t).numel()


def whole_tensors(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """Names of the parameters, gradients and parameter-shaped optimizer states that this rank holds whole (local
    numel = global numel). Meaningful where the layout shards every parameter (fs or tp > 1)."""
    out = []
    for name, p in unwrap(model).named_parameters():
        if p.numel() > 1 and _local_numel(p) == p.numel():
            out.append(name)
        if p.grad is not None and p.numel() > 1 and _local_numel(p.grad) == p.grad.numel():
            out.append(f"{name}.grad")
        for key, value in optimizer.state.get(p, {}).items():
            if key not in COLUMN_SIDE_STATES and isinstance(value, torch.Tensor) and value.shape == p.shape and \
                    p.numel() > 1 and _local_numel(value) == value.numel():
                out.append(f"{name} state {key}")
    return out


def state_bytes(optimizer: torch.optim.Optimizer, local: bool = True) -> dict[str, int]:
    """Bytes of this rank's optimizer states by state key (scalars such as step counts included); with `local`
    false, of the global tensors they are shards of."""
    out: dict[str, int] = {}
    for state in optimizer.state.values():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                size = local_bytes(value) if local else value.numel() * value.element_size()
                out[key] = out.get(key, 0) + size
    return dict(sorted(out.items()))


def replica_sync_formula(config: TrainConfig, env: Distributed, shapes: dict[str, list[tuple[int, ...]]],
                         syncs_replicas: bool) -> dict[str, float]:
    """Bytes per rank and step the replicas exchange, by formula: `full gradients` = 4 sum numel / shards (DDP /
    HSDP, and everything Dion does not compress); with Dion's own sync, `compressed` = 4 sum (m + n) r / shards
    over its compressed matrices ((m + n) r < m n) plus 4 numel / shards of the rest. shards = fs x tp, the ranks
    each parameter is split over. Zero without replicas."""
    if env.dp == 1:
        return {}
    shards = env.fs * env.tp
    numel = sum(torch.Size(s).numel() for group in shapes.values() for s in group)
    out = {"full gradients": 4 * numel / shards}
    if syncs_replicas:
        rank_fraction = config.optimizer.options.get("rank_fraction", 1.0)
        multiple = config.optimizer.options.get("rank_multiple_of", 1)
        compressed = 0
        rest = numel
        for m, n in shapes["matrix"]:
            r = low_rank_dim(m, n, rank_fraction, multiple)
            if (m + n) * r < m * n:
                compressed += (m + n) * r
                rest -= m * n
        out["compressed"] = 4 * (compressed + rest) / shards
    return out


@contextlib.contextmanager
def _checkpointing(model: nn.Module, mode: str):
    """The model's blocks with activation checkpointing `mode` (trainer.distributed's), restored on exit."""
    blocks = unwrap(model).blocks
    saved = [block.__dict__.pop("forward", None) for block in blocks]
    apply_activation_checkpointing(unwrap(model), mode)
    try:
        yield
    finally:
        for block, forward in zip(blocks, saved):
            block.__dict__.pop("forward", None)
            if forward is not None:
                block.forward = forward


def _tracker(model: nn.Module, optimizer: torch.optim.Optimizer):
    from torch.distributed.fsdp import FSDPModule
    if isinstance(model, FSDPModule):
        from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker
        tracker = FSDPMemTracker(model, optimizer)
    else:
        from torch.distributed._tools.mem_tracker import MemTracker
        tracker = MemTracker()
        tracker.track_external(model, optimizer)
    return tracker


def _snapshot(tracker, kind: str) -> dict[str, int]:
    totals: dict[str, int] = {}
    for per_device in tracker.get_tracker_snapshot(kind).values():
        for key, value in per_device.items():
            totals[str(getattr(key, "value", key))] = totals.get(str(getattr(key, "value", key)), 0) + value
    return totals


def simulate(config: TrainConfig, world_size: int, rank: int = 0, memory: bool = True) -> RankEstimate:
    """One step of rank `rank` of `world_size` under the fake backend and fake tensors (module docstring), in a
    fresh Python process: DTensor caches its sharding decisions by mesh shape, so a second simulation in the same
    process would reuse the first one's meshes (and their process groups, gone with its process group).
    memory: also run torch's memory tracker (the peak, and two more forwards for the activations with
    checkpointing off and on); several times slower. Without it `peak` is 0 and `activations` empty; the sizes of
    parameters, gradients, states and the traffic are measured either way."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor
    dp, fs, tp = mesh_sizes(config, world_size)
    layout = Distributed(rank, world_size, 0, torch.device("cpu"), dp, fs, tp)
    if dp > 1 and fs == tp == 1 and not optimizer_syncs_replicas(config, layout):
        raise LayoutError("estimate: DDP layouts (dp only, the wrapper averaging full gradients) are not simulated: "
                          "DDP's C++ reducer needs real storage. Each rank holds the whole model and optimizer "
                          "(scripts/optimizer_memory.py) and all-reduces 4 bytes per parameter per step "
                          "(scripts/bench_comm.py); simulate fs_size > 1 instead")
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(simulate_here, config, world_size, rank, memory).result()


def simulate_here(config: TrainConfig, world_size: int, rank: int = 0, memory: bool = True) -> RankEstimate:
    """`simulate` in this process: once per process (see `simulate`)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import GuardOnDataDependentSymNode, ShapeEnv
    config = dataclasses.replace(config, compile=False)
    with fake_process_group(world_size, rank):
        env = init_distributed(config)
        check_layout(config, env)
        micro_batch, accumulation = micro_batch_size(config, env)
        syncs_replicas = optimizer_syncs_replicas(config, env)
        autocast_dtype = config.precision.autocast_dtype(GPU)
        autocast = (lambda: torch.autocast("cpu", dtype=autocast_dtype)) if autocast_dtype is not None \
            else contextlib.nullcontext
        model = parallelize(build_model(config, meta=True), config, env, syncs_replicas)  # as train.py, sharded
        with FakeTensorMode(allow_non_fake_inputs=True, shape_env=ShapeEnv()):
            model.to_empty(device="cpu")  # fake storage
            shapes = {key: [tuple(p.shape) for p in params] for key, params in unwrap(model).param_groups().items()}
            optimizer = build_training_optimizer(unwrap(model), config, env)
            tokens = torch.zeros((micro_batch, config.model.sequence_length), dtype=torch.long)
            activations = {}
            for mode in ("none", "full") if memory else ():
                with _checkpointing(model, mode), _tracker(model, optimizer) as tracker, autocast():
                    loss = model(tokens, tokens)
                    activations[mode] = _snapshot(tracker, "current").get("Activation", 0)
                del loss
            hooks = training_hooks(optimizer)
            ledger = CollectiveLedger(mesh_group_names(env))
            tracker = _tracker(model, optimizer) if memory else contextlib.nullcontext()
            with tracker, ledger, _DataDependentDefaults():
                with autocast():
                    loss = model(tokens, tokens)
                hooks.prepare_backward(last_micro_batch=True)
                ledger.phase = "backward"
                loss.backward()
            parameters = sum(local_bytes(p) for p in model.parameters())
            gradients = sum(local_bytes(p.grad) for p in model.parameters() if p.grad is not None)
            peaks = [_snapshot(tracker, "peak").get("Total", 0)] if memory else [0]
            ledger.phase = "step"
            step_tracker = _tracker(model, optimizer) if memory else contextlib.nullcontext()
            peak_covers_step = memory
            try:
                with step_tracker, ledger, _DataDependentDefaults():
                    optimizer.step()
                if memory:
                    peaks.append(_snapshot(step_tracker, "peak").get("Total", 0))
            except GuardOnDataDependentSymNode:  # the tracker cannot size a tensor whose size is data-dependent
                for key in [key for key in ledger.bytes if key.startswith("step/")]:  # (Dion2's chosen rows)
                    del ledger.bytes[key], ledger.calls[key]
                with ledger, _DataDependentDefaults():
                    optimizer.step()
                peak_covers_step = False
            whole = whole_tensors(model, optimizer) if env.fs * env.tp > 1 else []
            states, state_totals = state_bytes(optimizer), state_bytes(optimizer, local=False)
            if memory and not peak_covers_step:  # a lower bound: what the step leaves, without its transients
                peaks.append(parameters + gradients + sum(states.values()))
            peak = max(peaks)
            parameters_total = sum(p.numel() * p.element_size() for p in model.parameters())
    return RankEstimate(rank=rank, world_size=world_size, dp=env.dp, fs=env.fs, tp=env.tp,
                        optimizer=config.optimizer.name, micro_batch=micro_batch, accumulation=accumulation,
                        parameters=parameters, gradients=gradients, states=states, activations=activations,
                        peak=peak, peak_covers_step=peak_covers_step, traffic=dict(ledger.bytes),
                        calls=dict(ledger.calls),
                        formula=replica_sync_formula(config, env, shapes, syncs_replicas),
                        parameters_total=parameters_total, state_totals=state_totals, whole=whole)


def estimate_config(argv: list[str], world_size: int, dp: int | None = None, fs: int | None = None,
                    tp: int | None = None) -> TrainConfig:
    """The training config of `argv` (train.py's command line: --config FILE and --section.key overrides) with the
    mesh sizes given here and no data directory (the estimate reads no data, so a config naming shards that are not
    downloaded here still works). A batch size the world cannot split (the file's, not one on the command line)
    becomes data.device_batch_size (default 1) sequences per data-parallel rank per step."""
    from trainer.config import build_config
    sizes = {"dp_size": dp, "fs_size": fs, "tp_size": tp}
    argv = [*argv, "--data.dir", "null", *(item for key, size in sizes.items() if size is not None
                                           for item in (f"--parallel.{key}", str(size)))]
    config = build_config(argv)
    dp_size, fs_size, tp_size = mesh_sizes(config, world_size)
    layout = Distributed(0, world_size, 0, torch.device("cpu"), dp_size, fs_size, tp_size)
    try:
        micro_batch_size(config, layout)
    except ConfigError:
        if any(a in ("--data.batch_size", "--batch_size") for a in argv):
            raise
        per_rank = config.data.device_batch_size or 1
        config = build_config([*argv, "--data.batch_size", str(per_rank * dp_size * fs_size)])
    return config


def describe(estimate: RankEstimate) -> str:
    """A readable block for one simulated rank."""
    e = estimate
    lines = [f"rank {e.rank} of {e.world_size} (dp {e.dp} x fs {e.fs} x tp {e.tp}), optimizer {e.optimizer}, "
             f"{e.micro_batch} sequence(s) per micro-batch, {e.accumulation} micro-batch(es) per step",
             f"  parameters        {e.parameters / GIB:9.3f} GiB", f"  gradients         {e.gradients / GIB:9.3f} GiB"]
    lines += [f"  state {key:<11} {value / GIB:9.3f} GiB" for key, value in e.states.items() if value >= 2 ** 20]
    for mode, value in e.activations.items():
        lines.append(f"  activations ({mode:<4}) {value / GIB:7.3f} GiB per micro-batch (activation checkpointing "
                     f"{mode})")
    if e.peak:
        bound = "" if e.peak_covers_step else ", at least: the step was not tracked"
        lines.append(f"  peak              {e.peak / GIB:9.3f} GiB (one micro-batch, configured checkpointing{bound})")
    lines.append("  collectives per step (bytes per rank):")
    lines += [f"    {key:<34} {e.calls[key]:5d} calls {value / GIB:9.3f} GiB" for key, value in e.traffic.items()]
    for name, value in e.formula.items():
        lines.append(f"  formula, replica sync with {name}: {value / GIB:.3f} GiB (measured, every replicas "
                     f"collective: {e.replica_traffic() / GIB:.3f} GiB)")
    if e.whole:
        lines.append(f"  HELD WHOLE on this rank although the layout shards parameters: {', '.join(e.whole)}")
    return "\n".join(lines)


# The table of docs/scaling.md: (preset, world, (dp, fs, tp), optimizers, extra train.py options).
SCALING_TABLE: list[tuple[str, int, tuple[int, int, int], tuple[str, ...], tuple[str, ...]]] = [
    ("1b", 8, (1, 8, 1), ("dion", "muon", "adamw"), ()),
    ("7b", 64, (8, 8, 1), ("dion", "dion_async", "muon", "dion2", "adamw"), ()),
    ("7b", 64, (8, 8, 1), ("dion",), ("--precision.param_dtype", "bfloat16")),
    ("7b", 256, (8, 16, 2), ("dion", "muon", "adamw"), ()),
    ("70b", 512, (8, 32, 2), ("dion", "adamw"), ("--precision.param_dtype", "bfloat16")),
    ("70b", 1024, (8, 64, 2), ("dion",), ("--precision.param_dtype", "bfloat16")),
]


def table_rows() -> list[tuple[str, int, tuple[int, int, int], str, tuple[str, ...]]]:
    """SCALING_TABLE one row per optimizer: (preset, world, layout, optimizer, extra options)."""
    return [(preset, world, layout, optimizer, extra) for preset, world, layout, optimizers, extra in SCALING_TABLE
            for optimizer in optimizers]


# Dion's compression in every row of the table: a rank fraction of 1/4 (docs/scaling.md).
TABLE_RANK_FRACTION = 0.25


def table_config(preset: str, world: int, layout: tuple[int, int, int], optimizer: str,
                 extra: tuple[str, ...]) -> TrainConfig:
    """The config of one row of SCALING_TABLE: the preset, the optimizer (with TABLE_RANK_FRACTION where it has a
    rank fraction), the layout and the row's extra options."""
    from optimizers.registry import option_fields
    argv = ["--model.preset", preset, "--optimizer", optimizer, *extra]
    if "rank_fraction" in option_fields(optimizer):
        argv += ["--optimizer.rank_fraction", str(TABLE_RANK_FRACTION)]
    return estimate_config(argv, world, *layout)


def table_row(preset: str, layout: tuple[int, int, int], extra: tuple[str, ...], estimate: RankEstimate) -> str:
    e = estimate
    gib = lambda value: f"{value / GIB:.2f}"  # noqa: E731
    states = ", ".join(f"{key} {gib(v)}" for key, v in e.states.items() if v >= 2 ** 20)
    shards = sum(v for key, v in e.traffic.items() if key.split("/")[1] == "shards")
    tp_traffic = sum(v for key, v in e.traffic.items() if key.split("/")[1] == "tp")
    formula = " / ".join(f"{name} {gib(v)}" for name, v in e.formula.items()) or "-"
    precision = "bf16 params" if "bfloat16" in extra else "fp32 params"
    return (f"| {preset} | {e.world_size} | {' x '.join(map(str, layout))} | {e.optimizer} | {precision} | "
            f"{gib(e.parameters)} | {gib(e.gradients)} | {states} | {gib(e.activations.get('none', 0))} / "
            f"{gib(e.activations.get('full', 0))} | {'' if e.peak_covers_step else '>= '}{gib(e.peak)} | "
            f"{gib(e.replica_traffic())} | {formula} | "
            f"{gib(shards)} | {gib(tp_traffic)} |")


TABLE_HEADER = ("| shape | world | dp x fs x tp | optimizer | FSDP gathers | params | grads | optimizer states | "
                "activations per micro-batch, AC none / full | peak | replicas traffic | formula, replica sync | "
                "shards traffic | tp traffic |\n"
                "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
