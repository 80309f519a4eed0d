"""Dion under gloo (torchrun, 2 and 4 processes): every layout equals the single-process run on the full batch.

The worker (tests/optimizers/dion_distributed_worker.py) runs DionReference, Dion and DionAsync in float64 on each
layout and reports the largest absolute difference of the parameters (and, for the synthetic layouts, of the Q
states) from single-process DionReference after 3 steps; several synthetic layouts put a NaN in one shard of one
gradient at the last step, which every rank must skip for that matrix, including a rank that holds no rows of it.
Tolerance 1e-10: the runs differ only in summation order (sharded sums, all-reduces), ~1e-15 here, while the
parameters move by ~0.1 (`moved`), so any missing or doubled reduction, wrong shard offset or wrong orientation fails.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # multi-process (torchrun) runs: the quick subset leaves them out

REPO_ROOT = Path(__file__).resolve().parents[2]
WORKER = REPO_ROOT / "tests/optimizers/dion_distributed_worker.py"
CLASSES = ("DionReference", "Dion", "DionAsync")
TOLERANCE = 1e-10


def run_worker(scenarios: str, processes: int, tmp_path: Path) -> dict:
    output = tmp_path / f"{scenarios}.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO_ROOT), HF_HUB_OFFLINE="1",
               WANDB_MODE="disabled")
    completed = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}", str(WORKER),
         scenarios, str(output)],
        env=env, capture_output=True, text=True, timeout=400)
    assert completed.returncode == 0, completed.stderr[-4000:]
    return json.loads(output.read_text())


def assert_matches_single_process(result: dict) -> None:
    assert result["moved"] > 1e-2
    for name in CLASSES:
        assert result[name] < TOLERANCE, (name, result)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> dict:
    return run_worker("two", 2, tmp_path_factory.mktemp("dion_two"))


@pytest.fixture(scope="module")
def four_ranks(tmp_path_factory) -> dict:
    return run_worker("four", 4, tmp_path_factory.mktemp("dion_four"))


@pytest.mark.parametrize("scenario", ["ddp_compressed", "ddp_full_gradient"])
def test_replicated_ddp_matches_single_process_on_full_batch(two_ranks, scenario):
    assert_matches_single_process(two_ranks[scenario])


def test_compressed_pr_sync_equals_full_gradient_sync_and_checkpoint_sync_averages_momenta(two_ranks):
    result = two_ranks["compressed_vs_full_sync"]
    assert result["params"] < TOLERANCE
    assert result["replicas_agree"]
    # Compressed sync keeps per-replica momenta; synchronize_for_checkpoint makes them equal to the momentum of
    # synchronized (single-process) training.
    assert result["momenta_differ_before_sync"]
    assert result["momenta_agree_after_sync"]
    assert result["synced_momentum"] < TOLERANCE


def assert_backward_sync_matches_in_step_sync(result: dict) -> None:
    assert_matches_single_process(result)
    for name in CLASSES:
        assert result[f"{name}_vs_in_step"] < TOLERANCE, (name, result)
        assert result[f"{name}_averaged_in_backward"] < TOLERANCE, (name, result)
        assert result[f"{name}_compressed_local"], (name, result)
        assert result[f"{name}_step_collectives_saved"] == [2], (name, result)


def test_gradient_average_started_in_backward_with_accumulation_equals_in_step_average_ddp(two_ranks):
    assert_backward_sync_matches_in_step_sync(two_ranks["backward_sync_ddp"])


def test_gradient_average_started_in_backward_after_fsdp2_reduce_scatter_equals_in_step_average_hsdp(four_ranks):
    assert_backward_sync_matches_in_step_sync(four_ranks["backward_sync_hsdp"])


@pytest.mark.parametrize("scenario", ["fsdp_model", "fsdp_either_dim"])
def test_fsdp2_outer_sharding_matches_single_process(two_ranks, scenario):
    assert_matches_single_process(two_ranks[scenario])


def test_tensor_parallel_inner_sharding_of_either_dimension_matches_single_process(two_ranks):
    assert_matches_single_process(two_ranks["tp_either_dim"])


@pytest.mark.parametrize("scenario", ["hsdp_model", "hsdp_synced_model", "hsdp_synthetic"])
def test_hsdp_replicate_times_outer_matches_single_process(four_ranks, scenario):
    assert_matches_single_process(four_ranks[scenario])


@pytest.mark.parametrize("qr_method", ["rcqr", "qr", "cqr"])
def test_fsdp2_plus_tp_outer_times_inner_matches_single_process(four_ranks, qr_method):
    assert_matches_single_process(four_ranks[f"fsdp_tp_{qr_method}"])


@pytest.mark.parametrize("scenario", ["flattened_model", "flattened_synthetic"])
def test_flattened_dp_fs_mesh_as_outer_mesh_matches_single_process(four_ranks, scenario):
    assert_matches_single_process(four_ranks[scenario])


def test_momentum_and_q_states_are_dtensors_sharded_like_the_parameter(four_ranks):
    assert four_ranks["states_are_sharded_dtensors"]
