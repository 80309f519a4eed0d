"""parallel.fsdp_gradient_accumulation: with two micro-batches per rank, both modes train every parameter as one
process does on the same global batch, under HSDP dp 2 x fs 2 with AdamW (FSDP2 reduce-scatters over fs and
all-reduces over dp). `sharded` reduce-scatters every micro-batch and must still all-reduce the summed shards over
the replicas once (set_requires_all_reduce on the last micro-batch only); a replica sync skipped or counted twice
moves the parameters by O(1) of their movement. Parameters are compared as in test_parallel_params (6 steps, so
every weight has moved)."""
from __future__ import annotations

import pytest

from tests.training.helpers import run_train, torchrun
from tests.training.test_parallel_params import (EMBEDDING_TOLERANCE, TOLERANCE, final_parameters, initial_parameters,
                                                 relative_differences)

pytestmark = pytest.mark.slow  # multi-process (torchrun) runs

STEPS = ["--num_iterations", "6", "--batch_size", "8", "--device_batch_size", "1", "--n_layer", "2",
         "--optimizer", "adamw", "--lr", "0.01", "--checkpoint_freq", "6"]


@pytest.fixture(scope="module")
def single_process(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("single")
    assert run_train(run_dir, *STEPS) == 0
    return final_parameters(run_dir)


@pytest.mark.parametrize("mode", ["sharded", "unsharded"])
def test_hsdp_accumulation_mode_trains_every_parameter_as_one_process(mode, single_process, tmp_path):
    from tests.training.helpers import TINY
    result = torchrun(4, *TINY, "--run_dir", str(tmp_path), *STEPS, "--dp_size", "2", "--fs_size", "2",
                      "--parallel.replicate_mesh_grad_sync", "false", "--parallel.fsdp_gradient_accumulation", mode)
    assert result.returncode == 0, result.stderr[-3000:]
    differences = relative_differences(final_parameters(tmp_path), single_process, initial_parameters(*STEPS))
    too_far = {name: difference for name, difference in differences.items()
               if difference >= (EMBEDDING_TOLERANCE if name == "embed.weight" else TOLERANCE)}
    assert not too_far, differences
