"""torchrun worker (2 gloo ranks) for test_advanced_distributed.py; writes a JSON result to argv[1] on rank 0 and
checkpoints under the directory argv[2].

1. DTensor parameters sharded by rows (Shard(0), uneven, one shard empty), by columns (Shard(1), as tensor
   parallelism does) and replicated, stepped by every advanced optimizer with the features that need whole-tensor
   sums (OrthoGrad, the cautious mask, Prodigy's D-adaptation) next to the same optimizer on plain full tensors:
   max |difference|.
2. An FSDP2 (fully_shard) model trained with the fused backward pass next to the single-process normal step on the
   same batches: max |difference| of the parameters.
3. Factored states on sharded parameters (each rank factors its shard): the parameters stay finite and move.
4. torch.distributed.checkpoint save and load (get_state_dict / set_state_dict, as trainer/checkpoint.py) of an
   FSDP2 model with uneven shards and factored / Prodigy per-shard state, with the fused backward pass: resumed
   training equals uninterrupted training.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

from optimizers.advanced import Adam_Adv, Adopt_Adv, Lion_Adv, Prodigy_Adv, Prodigy_Lion_Adv, Simplified_AdEMAMix

# slice_p = 1: with slice_p > 1 each shard samples its own every-slice_p-th entries, a different (equally valid)
# subsample than the full tensor's.
CASES = {
    Adam_Adv: dict(lr=1e-2, orthogonal_gradient=True, cautious_mask=True, use_AdEMAMix=True),
    Adopt_Adv: dict(lr=1e-2, orthogonal_gradient=True, grams=True, use_atan2=True),
    Prodigy_Adv: dict(d0=1e-2, orthogonal_gradient=True, cautious_mask=True, slice_p=1),
    Simplified_AdEMAMix: dict(lr=1e-3, orthogonal_gradient=True),
    Lion_Adv: dict(lr=1e-2, orthogonal_gradient=True, cautious_mask=True),
    Prodigy_Lion_Adv: dict(d0=1e-2, orthogonal_gradient=True, cautious_mask=True, slice_p=1),
}
# (1, 4) by rows leaves rank 1 an empty shard.
LAYOUTS = [((9, 6), [Shard(0)]), ((6, 10), [Shard(1)]), ((7,), [Shard(0)]), ((4, 5), [Replicate()]),
           ((1, 4), [Shard(0)])]


def full_values(seed: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=generator) for shape, _ in LAYOUTS]


def sharded_versus_plain(mesh, cls, options) -> tuple[float, float]:
    """(max |sharded - plain|, max |plain - start|) after 4 steps."""
    # Quadratic gradients (pull toward a target), so that Prodigy's d really adapts.
    targets = full_values(1)
    plain = [nn.Parameter(v) for v in full_values(0)]
    sharded = [nn.Parameter(distribute_tensor(v, mesh, placements))
               for v, (_, placements) in zip(full_values(0), LAYOUTS)]
    plain_optimizer, sharded_optimizer = cls(plain, **options), cls(sharded, **options)
    for _ in range(4):
        for p, q, target, (_, placements) in zip(plain, sharded, targets, LAYOUTS):
            grad = p.detach() - target
            p.grad = grad.clone()
            q.grad = distribute_tensor(q.full_tensor().detach() - target, mesh, placements)
        plain_optimizer.step()
        sharded_optimizer.step()
    difference = max((p.detach() - q.full_tensor().detach()).abs().max().item() for p, q in zip(plain, sharded))
    moved = max((p.detach() - v).abs().max().item() for p, v in zip(plain, full_values(0)))
    return difference, moved


def mlp(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(10, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 3))


def fsdp_fused_versus_single_process(mesh, cls, options) -> float:
    reference, model = mlp(0), mlp(0)
    for layer in (model[0], model[2], model[4]):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    reference_optimizer, optimizer = cls(reference.parameters(), **options), cls(model.parameters(), **options)
    optimizer.register_fused_backward_hooks()
    assert all(isinstance(p, DTensor) for p in model.parameters())
    for step in range(3):
        generator = torch.Generator().manual_seed(step)
        inputs, targets = torch.randn(8, 10, generator=generator), torch.randn(8, 3, generator=generator)
        for net, opt in ((reference, reference_optimizer), (model, optimizer)):
            nn.functional.mse_loss(net(inputs), targets).backward()
            opt.step()
            opt.zero_grad()
    return max((p.detach() - q.full_tensor().detach()).abs().max().item()
               for p, q in zip(reference.parameters(), model.parameters()))


def factored_on_shards(mesh) -> bool:
    ok = True
    for cls, options in CASES.items():
        sharded = [nn.Parameter(distribute_tensor(v, mesh, placements))
                   for v, (_, placements) in zip(full_values(0), LAYOUTS)]
        optimizer = cls(sharded, factored=True, **options)
        for _ in range(3):
            for q, (_, placements) in zip(sharded, LAYOUTS):
                q.grad = distribute_tensor(q.full_tensor().detach() * 0.5 + 0.1, mesh, placements)
            optimizer.step()
        moved = any((q.full_tensor() - v).abs().max() > 1e-4 for q, v in zip(sharded, full_values(0)))
        ok = ok and moved and all(torch.isfinite(q.full_tensor()).all() for q in sharded)
    return bool(ok)


CHECKPOINT_CASES = {
    Adam_Adv: dict(lr=1e-2, factored=True, use_AdEMAMix=True, cautious_mask=True),
    Prodigy_Adv: dict(d0=1e-2, factored=True, slice_p=3),
    Prodigy_Lion_Adv: dict(d0=1e-2, factored=True, orthogonal_gradient=True),
}


def uneven_fsdp_model(mesh, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(10, 7), nn.Tanh(), nn.Linear(7, 3))  # 7 and 3 rows: uneven shards
    for layer in (model[0], model[2]):
        fully_shard(layer, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def train_steps(model, optimizer, steps: range) -> None:
    for step in steps:
        generator = torch.Generator().manual_seed(step)
        inputs, targets = torch.randn(8, 10, generator=generator), torch.randn(8, 3, generator=generator)
        nn.functional.mse_loss(model(inputs), targets).backward()
        optimizer.step()
        optimizer.zero_grad()


def checkpoint_resume_difference(mesh, cls, options, directory: Path) -> float:
    model = uneven_fsdp_model(mesh, 0)
    optimizer = cls(model.parameters(), **options)
    optimizer.register_fused_backward_hooks()
    train_steps(model, optimizer, range(3))
    model_state, optimizer_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=str(directory))
    train_steps(model, optimizer, range(3, 5))

    resumed_model = uneven_fsdp_model(mesh, 1)  # different start: everything must come from the checkpoint
    resumed = cls(resumed_model.parameters(), **options)
    resumed.register_fused_backward_hooks()
    model_state, optimizer_state = get_state_dict(resumed_model, resumed)
    state = {"model": model_state, "optimizer": optimizer_state}
    dcp.load(state, checkpoint_id=str(directory))
    set_state_dict(resumed_model, resumed, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    train_steps(resumed_model, resumed, range(3, 5))
    return max((p.full_tensor() - q.full_tensor()).abs().max().item()
               for p, q in zip(model.parameters(), resumed_model.parameters()))


def main() -> None:
    dist.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    result = {
        "sharded": {cls.__name__: sharded_versus_plain(mesh, cls, options) for cls, options in CASES.items()},
        "fsdp_fused": {cls.__name__: fsdp_fused_versus_single_process(mesh, cls, CASES[cls])
                       for cls in (Adam_Adv, Prodigy_Adv, Lion_Adv)},
        "factored_on_shards": factored_on_shards(mesh),
        "checkpoint_resume": {cls.__name__: checkpoint_resume_difference(mesh, cls, options,
                                                                         Path(sys.argv[2]) / cls.__name__)
                              for cls, options in CHECKPOINT_CASES.items()},
    }
    if dist.get_rank() == 0:
        with open(sys.argv[1], "w") as handle:
            json.dump(result, handle)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
