"""torchrun worker for tests/optimizers/test_dion_distributed.py: distributed Dion runs against the single-process run
on the full batch.

Usage: torchrun --standalone --nproc_per_node=N dion_distributed_worker.py {two,four} OUTPUT.json
Every rank runs the same scenarios; rank 0 writes, per scenario and optimizer class, the largest absolute difference
of the distributed parameters (gathered) from the single-process `DionReference` run, plus a few boolean checks.
Everything runs in float64, so that summation order (sharded sums, all-reduces) stays far below the tolerances even
where P is ill-conditioned (rank fraction 1).

Two kinds of scenarios:
- synthetic: a few matrices (tall, wide, square, repeated shapes, uneven shards) laid out with `distribute_tensor` (or
  plain tensors), with the gradient of replica d drawn from a seed that depends on (step, d, matrix). The
  single-process run gets the mean over replicas. This covers every mesh layout with exact control of the inputs.
- model: a tiny MLP wrapped with FSDP2 `fully_shard`, each rank training on its part of the batch; the
  single-process run trains on the whole batch.
"""
from __future__ import annotations

import copy
import json
import sys

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
from torch.utils._python_dispatch import TorchDispatchMode

from optimizers.dion.batched import Dion
from optimizers.dion.overlapped import DionAsync
from optimizers.dion.reference import DionReference

CLASSES = (DionReference, Dion, DionAsync)
STEPS = 3
# Repeated shapes fill batches (and pad DionAsync's shares); 10, 14 and 5 rows split unevenly over 4 ranks, and the
# 5 x 4 matrix leaves one rank without rows of P. The 13 x 9 and 9 x 13 matrices (rank 5 at rank_fraction 0.5, so
# compressed) give a P or R of 45 or 65 elements summed over the shards, which the divided replica sync pads to an
# even split over 2 shards (7 / 6 rows or 5 / 4 columns per shard, depending on the layout).
SHAPES = [(12, 8), (8, 12), (12, 8), (10, 10), (6, 14), (12, 8), (14, 6), (13, 9), (9, 13), (13, 9), (5, 4)]
NAN_MATRIX = len(SHAPES) - 1
# The NaN goes into the last step, so that a rank that took it for a valid matrix still holds the damage at the end.
LAST_STEP = STEPS - 1
OPTIONS = dict(lr=0.05, weight_decay=0.1, mu=0.9)


def full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


def max_difference(xs, ys) -> float:
    """Largest |x - y| over the tensors and over all ranks (replicated DTensors hold each rank's own copy); NaN
    counts as infinite."""
    worst = torch.stack([(full(x.detach()) - full(y.detach())).abs().max() for x, y in zip(xs, ys)])
    worst = worst.nan_to_num(nan=torch.inf).max()
    dist.all_reduce(worst, op=dist.ReduceOp.MAX)
    return worst.item()


def initial_weights() -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return [torch.randn(shape, generator=generator, dtype=torch.float64) for shape in SHAPES]


def replica_gradient(step: int, replica: int, index: int, nan_step: int | None = None) -> torch.Tensor:
    """Gradient of matrix `index` on replica `replica`; at nan_step, NaN in row 0 of NAN_MATRIX (on one shard)."""
    generator = torch.Generator().manual_seed(1000 * step + 100 * replica + index)
    grad = torch.randn(SHAPES[index], generator=generator, dtype=torch.float64)
    if step == nan_step and index == NAN_MATRIX:
        grad[0, 0] = torch.nan
    return grad


def run_synthetic(cls, layout, replicas: int, replica: int, steps: int = STEPS, sync_grads_first: bool = False,
                  nan_step: int | None = None, **options):
    """Train the SHAPES matrices for `steps` steps. layout(index, tensor) -> the distributed parameter (or the plain
    tensor); the gradient of this rank is replica_gradient(step, replica, ., nan_step) laid out the same way. With
    sync_grads_first the gradients are averaged over the replicas here (the optimizer must not sync them)."""
    params = [nn.Parameter(layout(i, w)) for i, w in enumerate(initial_weights())]
    optimizer = cls(params, **OPTIONS, **options)
    for step in range(steps):
        for i, p in enumerate(params):
            if sync_grads_first:
                grad = torch.stack([replica_gradient(step, d, i, nan_step) for d in range(replicas)]).mean(0)
            else:
                grad = replica_gradient(step, replica, i, nan_step)
            p.grad = layout(i, grad)
        optimizer.step()
    return params, optimizer


def single_process(replicas: int, steps: int = STEPS, **options):
    """The reference: DionReference on whole matrices with the replica-averaged gradients."""
    return run_synthetic(DionReference, lambda i, t: t.clone(), replicas, 0, steps=steps, sync_grads_first=True,
                         **options)


def params_and_qs(params, optimizer) -> list[torch.Tensor]:
    return list(params) + [optimizer.state[p]["Q"] for p in params]


class TinyMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(6, 16, bias=False)
        self.gate = nn.Linear(6, 16, bias=False)
        self.down = nn.Linear(16, 6, bias=False)
        self.out = nn.Linear(6, 3, bias=False)
        self.gain = nn.Parameter(torch.ones(6))

    def matrices(self) -> list[nn.Parameter]:
        return [self.up.weight, self.gate.weight, self.down.weight, self.out.weight]

    def forward(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.up(x)) * torch.tanh(self.gate(x))
        return (self.out(self.down(h) * self.gain) - target).square().mean()


def model_batches():
    generator = torch.Generator().manual_seed(7)
    return [(torch.randn(16, 6, generator=generator, dtype=torch.float64),
             torch.randn(16, 3, generator=generator, dtype=torch.float64)) for _ in range(STEPS)]


def train_model(model: TinyMLP, cls, parts: int, part: int, micro_batches: int = 1, announce: bool = False,
                after_backward=None, step_collectives: list | None = None, **options) -> TinyMLP:
    """STEPS steps on batch rows [part, part + 1) of `parts` equal slices (the whole batch when parts == 1), in
    `micro_batches` accumulated micro-batches as the training loop runs them: an FSDP2 model syncs on the last one
    only, and with `announce` the optimizer is told before each backward whether it is the last (prepare_backward).
    after_backward(optimizer) runs between the last backward and step(); step_collectives, when given, receives
    the number of collectives each step() issues."""
    groups = [dict(params=model.matrices()), dict(params=[model.gain], algorithm="lion", lr=0.01)]
    optimizer = cls(groups, **OPTIONS, **options)
    for x, target in model_batches():
        rows = x.shape[0] // parts
        x, target = x[part * rows:(part + 1) * rows], target[part * rows:(part + 1) * rows]
        optimizer.zero_grad()
        for micro, (x_part, target_part) in enumerate(zip(x.chunk(micro_batches), target.chunk(micro_batches))):
            last = micro == micro_batches - 1
            if isinstance(model, FSDPModule):
                model.set_requires_gradient_sync(last)
            if announce:
                optimizer.prepare_backward(last_micro_batch=last)
            (model(x_part, target_part) / micro_batches).backward()
        if after_backward is not None:
            after_backward(optimizer)
        with CollectiveCalls() as calls:
            optimizer.step()
        if step_collectives is not None:
            step_collectives.append(calls.count)
    return model


class CollectiveCalls(TorchDispatchMode):
    """The number of c10d collectives dispatched while active."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if str(func.overloadpacket).startswith(("c10d.", "_c10d_functional.")):
            self.count += 1
        return func(*args, **(kwargs or {}))


def model_scenario(shard, parts: int, part: int, **options) -> dict[str, float]:
    """FSDP2-wrapped TinyMLP (shard(model) applies fully_shard) against the single-process run on the full batch.
    options may include train_model's micro_batches and announce."""
    torch.manual_seed(0)
    base = TinyMLP().double()
    reference = train_model(copy.deepcopy(base), DionReference, 1, 0, rank_fraction=0.5)
    result = {}
    for cls in CLASSES:
        model = copy.deepcopy(base)
        shard(model)
        train_model(model, cls, parts, part, rank_fraction=0.5, **options)
        result[cls.__name__] = max_difference(model.parameters(), reference.parameters())
    result["moved"] = max_difference(base.parameters(), reference.parameters())
    return result


def backward_sync_scenario(shard, parts: int, part: int, replicate_group, **options) -> dict:
    """Two accumulated micro-batches per step with the replicas' full-gradient average started during the last
    backward (`prepare_backward`), against the same run that leaves it to step() and against the single-process run
    on the whole batch. Also: after the first step's backward, the fully averaged gradients (the Lion gain; the 3 x 6
    head, not compressed at rank 2) equal the whole batch's gradient, the compressed matrices' gradients stay local,
    and step() issues exactly two collectives fewer (the scalar and the full-gradient averages), so nothing is
    averaged twice."""
    torch.manual_seed(0)
    base = TinyMLP().double()
    reference = train_model(copy.deepcopy(base), DionReference, 1, 0, rank_fraction=0.5)
    whole = copy.deepcopy(base)
    x, target = model_batches()[0]
    whole(x, target).backward()
    result = {"moved": max_difference(base.parameters(), reference.parameters())}
    for cls in CLASSES:
        runs, calls = {}, {}
        checks = {}

        def after_backward(optimizer):
            if checks:
                return
            model = runs_model
            checks["averaged"] = max_difference([model.gain.grad, model.out.weight.grad],
                                                [whole.gain.grad, whole.out.weight.grad])
            checks["compressed_local"] = not replicas_agree([model.up.weight.grad], replicate_group)
        for announce in (False, True):
            runs_model = copy.deepcopy(base)
            shard(runs_model)
            calls[announce] = []
            train_model(runs_model, cls, parts, part, micro_batches=2, announce=announce,
                        after_backward=after_backward if announce else None, step_collectives=calls[announce],
                        rank_fraction=0.5, **options)
            runs[announce] = runs_model
        result[cls.__name__] = max_difference(runs[True].parameters(), reference.parameters())
        result[f"{cls.__name__}_vs_in_step"] = max_difference(runs[True].parameters(), runs[False].parameters())
        result[f"{cls.__name__}_averaged_in_backward"] = checks["averaged"]
        result[f"{cls.__name__}_compressed_local"] = checks["compressed_local"]
        result[f"{cls.__name__}_step_collectives_saved"] = sorted({a - b for a, b in zip(calls[False], calls[True])})
    return result


def fully_shard_layers(mesh):
    def shard(model: TinyMLP) -> None:
        for layer in (model.up, model.gate, model.down, model.out):
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
    return shard


MESH_OPTIONS = ("replicate_mesh", "outer_shard_mesh", "inner_shard_mesh", "replicate_mesh_grad_sync")


def synthetic_scenario(layout, replicas: int, replica: int, **options) -> dict[str, float]:
    """Parameters and Q states (gathered) of each class against the single-process run."""
    reference = params_and_qs(*single_process(replicas, **{k: v for k, v in options.items()
                                                           if k not in MESH_OPTIONS}))
    result = {}
    for cls in CLASSES:
        result[cls.__name__] = max_difference(params_and_qs(*run_synthetic(cls, layout, replicas, replica, **options)),
                                              reference)
    result["moved"] = max_difference([nn.Parameter(w) for w in initial_weights()], reference)
    return result


def replicas_agree(tensors: list[torch.Tensor], group) -> bool:
    """Every rank of `group` holds the same values."""
    same = True
    for t in tensors:
        t = full(t.detach()).contiguous()
        gathered = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
        dist.all_gather(gathered, t, group=group)
        same &= all(torch.equal(gathered[0], g) for g in gathered)
    return same


def two_ranks() -> dict:
    rank = dist.get_rank()
    mesh = init_device_mesh("cpu", (2,), mesh_dim_names=("x",))
    world = dist.group.WORLD
    plain = lambda i, t: t.clone()
    results = {}
    # DDP-style replicas (plain tensors), the optimizer syncs: rank fraction 0.25 -> compressed P/R for the 12 x 8
    # and larger matrices; rank fraction 1 -> full-gradient all-reduce everywhere.
    results["ddp_compressed"] = synthetic_scenario(plain, 2, rank, rank_fraction=0.25, replicate_mesh=world)
    results["ddp_full_gradient"] = synthetic_scenario(plain, 2, rank, rank_fraction=1.0, replicate_mesh=mesh,
                                                      qr_method="cqr", cqr_warmup_steps=1)
    # Gradient accumulation with the full-gradient average started in backward: plain (DDP-like) parameters.
    results["backward_sync_ddp"] = backward_sync_scenario(lambda model: None, 2, rank, world, replicate_mesh=world)
    # Compressed P/R sync vs full-gradient sync (gradients averaged before the step, replicate_mesh_grad_sync off).
    compressed, compressed_opt = run_synthetic(Dion, plain, 2, rank, rank_fraction=0.25, replicate_mesh=world)
    synced, _ = run_synthetic(Dion, plain, 2, rank, rank_fraction=0.25, replicate_mesh=world,
                              replicate_mesh_grad_sync=False, sync_grads_first=True)
    momenta = [compressed_opt.state[p]["momentum"] for p in compressed]
    momenta_differ = not replicas_agree(momenta[:1], world)
    compressed_opt.synchronize_for_checkpoint()
    _, reference_opt = single_process(2, rank_fraction=0.25)
    results["compressed_vs_full_sync"] = dict(
        params=max_difference(compressed, synced), replicas_agree=replicas_agree(compressed, world),
        momenta_differ_before_sync=momenta_differ, momenta_agree_after_sync=replicas_agree(momenta, world),
        synced_momentum=max_difference(momenta, [reference_opt.state[p]["momentum"]
                                                 for p in reference_opt.param_groups[0]["params"]]))
    # FSDP2 (outer) on a real model, uneven rows (6 and 3 rows over 2 ranks).
    results["fsdp_model"] = model_scenario(fully_shard_layers(mesh), 2, rank, outer_shard_mesh=mesh)
    # Outer sharding of either dimension, and TP (inner) sharding of either dimension.
    outer = lambda i, t: distribute_tensor(t, mesh, [Shard(i % 2)])
    results["fsdp_either_dim"] = synthetic_scenario(outer, 1, 0, outer_shard_mesh=mesh, qr_method="qr",
                                                    nan_step=LAST_STEP)
    results["tp_either_dim"] = synthetic_scenario(outer, 1, 0, inner_shard_mesh=mesh)
    return results


def four_ranks() -> dict:
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "fs"))
    replica, shard = mesh.get_coordinate()
    results = {}
    # HSDP: FSDP2 over fs, Dion syncs the dp replicas (compressed where it pays); each rank trains on a quarter.
    results["hsdp_model"] = model_scenario(fully_shard_layers(mesh["fs"]), 4, 2 * replica + shard,
                                           outer_shard_mesh=mesh["fs"], replicate_mesh=mesh["dp"])
    # The same with FSDP2 sharding over fs: its post-accumulate-grad hooks fire on the sharded parameters after the
    # reduce-scatter of the last micro-batch.
    results["backward_sync_hsdp"] = backward_sync_scenario(fully_shard_layers(mesh["fs"]), 4, 2 * replica + shard,
                                                           mesh["dp"].get_group(), outer_shard_mesh=mesh["fs"],
                                                           replicate_mesh=mesh["dp"])
    # HSDP with FSDP2 syncing the replicas itself (2-D mesh, Replicate on dp): the optimizer must not sync again.
    results["hsdp_synced_model"] = model_scenario(fully_shard_layers(mesh), 4, 2 * replica + shard,
                                                  outer_shard_mesh=mesh["fs"], replicate_mesh=mesh["dp"],
                                                  replicate_mesh_grad_sync=False)
    # Replicate x outer on synthetic matrices, both dimensions sharded, compressed and full-gradient syncs mixed.
    outer = lambda i, t: distribute_tensor(t, mesh["fs"], [Shard(i % 2)])
    results["hsdp_synthetic"] = synthetic_scenario(outer, 2, replica, rank_fraction=0.5, outer_shard_mesh=mesh["fs"],
                                                   replicate_mesh=mesh["dp"], nan_step=LAST_STEP)
    # FSDP2 + TP: outer shards one dimension, inner the other, both orientations.
    grid = init_device_mesh("cpu", (2, 2), mesh_dim_names=("fs", "tp"))
    two_d = lambda i, t: distribute_tensor(t, grid, [Shard(i % 2), Shard(1 - i % 2)])
    for method in ("rcqr", "qr", "cqr"):
        results[f"fsdp_tp_{method}"] = synthetic_scenario(two_d, 1, 0, outer_shard_mesh=grid["fs"],
                                                          inner_shard_mesh=grid["tp"], qr_method=method,
                                                          cqr_warmup_steps=1, nan_step=LAST_STEP)
    # A flattened (dp, fs) mesh as the outer mesh: FSDP2 over all 4 ranks (uneven shards: 10 and 14 rows of the
    # synthetic matrices, the model's 6- and 3-row weights leave a rank empty).
    flat = mesh["dp", "fs"]._flatten()
    results["flattened_model"] = model_scenario(fully_shard_layers(flat), 4, dist.get_rank(), outer_shard_mesh=flat)
    flat_layout = lambda i, t: distribute_tensor(t, flat, [Shard(0)])
    results["flattened_synthetic"] = synthetic_scenario(flat_layout, 1, 0, outer_shard_mesh=flat, nan_step=LAST_STEP)
    # States are DTensors sharded like their parameter (momentum) and like the Q side (Q).
    params, optimizer = run_synthetic(Dion, two_d, 1, 0, steps=1, outer_shard_mesh=grid["fs"],
                                      inner_shard_mesh=grid["tp"])
    states = [optimizer.state[p] for p in params]
    results["states_are_sharded_dtensors"] = all(
        isinstance(s["momentum"], DTensor) and s["momentum"].placements == p.placements
        and isinstance(s["Q"], DTensor) and any(isinstance(pl, Shard) for pl in s["Q"].placements)
        and not all(isinstance(pl, Replicate) for pl in s["Q"].placements) for s, p in zip(states, params))
    return results


def main() -> None:
    dist.init_process_group("gloo")
    results = {"two": two_ranks, "four": four_ranks}[sys.argv[1]]()
    if dist.get_rank() == 0:
        with open(sys.argv[2], "w") as f:
            json.dump(results, f, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
