"""trainer/estimate.py: the 7B preset built by the trainer's own path and stepped once under the fake process group
and fake tensors, at world 64 (dp 8 x fs 8) and 256 (dp 8 x fs 16 x tp 2), for Dion, DionAsync, Muon, Dion2 and
AdamW. Each rank must hold 1 / (fs x tp) of every parameter, gradient and parameter-shaped state (the layouts of
docs/architecture.md: FSDP2 over fs, TP over tp, replicas whole copies of a shard), Dion's Q 1 / (shards of the
matrix's column side), nothing whole; Dion's replica traffic must be its compressed formula. The memory tracker is
off here (`memory=False`: it multiplies the time); the script's own test runs it."""
from __future__ import annotations

import pytest
import torch

from optimizers.dion.linalg import low_rank_dim
from trainer.estimate import estimate_config, simulate, whole_tensors

OPTIMIZERS = ["dion", "dion_async", "muon", "dion2", "adamw"]
RANK_FRACTION = 0.25
# Relative slack of "local = total / shards": FSDP2 pads dim 0 to a multiple of fs, and norm gains stay whole on
# the TP ranks (1e-4 of the 7B model).
SLACK = 0.01
# The TP plan by name (models/gpt/parallelize.py): which dimension of each block matrix TP shards; FSDP2 then
# shards the other one (trainer/distributed.py `_fsdp_placement`), or dim 0 without TP.
TP_DIM = {"attn.q": 0, "attn.k": 0, "attn.v": 0, "mlp.fc": 0, "attn.o": 1, "mlp.proj": 1}
PARAMETER_SHAPED = {"momentum", "exp_avg", "exp_avg_sq"}


def seven_b(optimizer: str, dp: int, fs: int, tp: int):
    return estimate_config(["--model.preset", "7b", "--optimizer", optimizer, "--optimizer.rank_fraction",
                            str(RANK_FRACTION)] if optimizer.startswith("dion") and optimizer != "dion2" else
                           ["--model.preset", "7b", "--optimizer", optimizer], dp * fs * tp, dp, fs, tp)


def expected_q_bytes(fs: int, tp: int) -> float:
    """4 sum over the 7B block matrices X (m x n) of columns x r / (ranks sharding X's column side), where Dion's
    columns are X's dim 1 when m >= n (and dim 0 when X is transposed, m < n)."""
    d, total = 4096, 0.0
    shapes = {"attn.q": (d, d), "attn.k": (d, d), "attn.v": (d, d), "attn.o": (d, d), "mlp.fc": (4 * d, d),
              "mlp.proj": (d, 4 * d)}
    for name, (m, n) in shapes.items():
        column_dim = 0 if m < n else 1
        fsdp_dim = 1 - TP_DIM[name] if tp > 1 else 0
        shards = (fs if fsdp_dim == column_dim else 1) * (tp if tp > 1 and TP_DIM[name] == column_dim else 1)
        total += (m, n)[column_dim] * low_rank_dim(m, n, RANK_FRACTION, 1) / shards
    return 4 * 32 * total


def check_rank(estimate, fs: int, tp: int) -> None:
    shards = fs * tp
    assert estimate.whole == [], f"held whole on every rank: {estimate.whole}"
    assert estimate.parameters == pytest.approx(estimate.parameters_total / shards, rel=SLACK)
    assert estimate.gradients == pytest.approx(estimate.parameters_total / shards, rel=SLACK)
    assert estimate.states, "the step created no optimizer state"
    for key, local in estimate.states.items():
        if key in PARAMETER_SHAPED:
            assert local == pytest.approx(estimate.state_totals[key] / shards, rel=SLACK), key
    if "Q" in estimate.states:
        assert estimate.states["Q"] == pytest.approx(expected_q_bytes(fs, tp), rel=SLACK)


def check_replica_traffic(estimate) -> None:
    if estimate.optimizer in ("dion", "dion_async"):
        # Dion averages P and R of its compressed matrices itself; dion_async pads P to its owner batches.
        assert estimate.replica_traffic() == pytest.approx(estimate.formula["compressed"], rel=0.15)
        assert estimate.replica_traffic() < 0.5 * estimate.formula["full gradients"]
    else:
        assert estimate.replica_traffic() >= estimate.formula["full gradients"] * (1 - SLACK)


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_seven_b_world_64_dp8_fs8_one_fake_step_holds_its_share(optimizer):
    estimate = simulate(seven_b(optimizer, 8, 8, 1), 64, rank=63, memory=False)
    check_rank(estimate, fs=8, tp=1)
    check_replica_traffic(estimate)


@pytest.mark.slow  # 15-40 s each on 2 busy cores
@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_seven_b_world_256_dp8_fs16_tp2_one_fake_step_holds_its_share(optimizer):
    estimate = simulate(seven_b(optimizer, 8, 16, 2), 256, rank=0, memory=False)
    check_rank(estimate, fs=16, tp=2)
    check_replica_traffic(estimate)
    assert any(key.split("/")[1] == "tp" for key in estimate.traffic), "no collective over the TP group"


def test_whole_tensors_names_a_parameter_left_unsharded():
    """The check the tests above rely on: a replicated DTensor parameter among sharded ones is named, with its
    gradient and its parameter-shaped state (Dion's column-side Q is exempt)."""
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor
    from torch.distributed.device_mesh import init_device_mesh
    from trainer.estimate import fake_process_group
    with fake_process_group(4, 0):
        mesh = init_device_mesh("cpu", (4,))
        model = torch.nn.Module()
        model.sharded = torch.nn.Parameter(distribute_tensor(torch.zeros(8, 4), mesh, [Shard(0)]))
        model.whole = torch.nn.Parameter(distribute_tensor(torch.zeros(8, 4), mesh, [Replicate()]))
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        optimizer = torch.optim.SGD(model.parameters())
        optimizer.state[model.whole] = {"momentum": torch.zeros_like(model.whole), "Q": torch.zeros_like(model.whole)}
        optimizer.state[model.sharded] = {"momentum": torch.zeros_like(model.sharded)}
        assert whole_tensors(model, optimizer) == ["whole", "whole.grad", "whole state momentum"]
