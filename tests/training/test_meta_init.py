"""Meta-device construction (parallel.meta_init): a model built on the meta device, parallelized, then given its
slices by `initialize_sharded` starts from exactly the weights, RoPE tables and RNG state of the full-model build,
in every sharded layout, and trains the same loss curve bit for bit (gloo on CPU).

The first test is single-process and cheap (the initial values against the CPU build, RNG state included); the
others run this file as a torchrun worker that builds the model both ways in one process group and compares the
local shards, and train.py with meta_init on and off.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from tests.training.helpers import ROOT, TINY, read_metrics, torchrun

# Two blocks, two heads per TP rank. FSDP2 gets a vocabulary that 2 ranks split unevenly (it pads the last shard);
# TP one that it divides (the vocab-parallel head requires it).
SHAPE = ["--model_dim", "32", "--n_head", "4", "--n_layer", "2", "--sequence_length", "16"]
ODD_VOCAB = ["--model.vocab_size", "301"]
EVEN_VOCAB = ["--model.vocab_size", "302"]
LAYOUTS = {
    "fsdp": (2, ["--fs_size", "2", *ODD_VOCAB]),
    "hsdp_2x2": (4, ["--dp_size", "2", "--fs_size", "2", *ODD_VOCAB]),
    "tp": (2, ["--tp_size", "2", *EVEN_VOCAB]),
    "fsdp_tp": (4, ["--fs_size", "2", "--tp_size", "2", *EVEN_VOCAB]),
}


def test_initial_values_equal_the_cpu_build_and_leave_the_generator_where_it_does():
    from trainer.build import build_model
    from trainer.config import build_config
    config = build_config([*TINY, *SHAPE, *ODD_VOCAB, "--seed", "7"])
    direct = build_model(config)
    after_direct = torch.get_rng_state()
    meta = build_model(config, meta=True)
    assert all(p.is_meta for p in meta.parameters())
    torch.manual_seed(7)
    values = dict(meta.initial_values())
    assert torch.equal(torch.get_rng_state(), after_direct)
    named = dict(direct.named_parameters())
    assert values.keys() == named.keys()
    differing = [name for name, value in values.items() if not torch.equal(value, named[name].detach())]
    assert not differing


def _worker(mesh_args: list[str], out: str) -> None:
    """torchrun entry: build the model directly and on meta in one process group, parallelize both, compare the
    local shards of every parameter and the buffers bit for bit; rank 0 writes the verdict."""
    from torch.distributed.tensor import DTensor

    from trainer.build import build_model, builds_on_meta, initialize_sharded, optimizer_syncs_replicas
    from trainer.config import build_config
    from trainer.distributed import init_distributed, parallelize
    config = build_config([*TINY, *SHAPE, "--optimizer", "adamw", *mesh_args])
    env = init_distributed(config)
    syncs = optimizer_syncs_replicas(config, env)
    direct = parallelize(build_model(config, env.device), config, env, syncs)
    after_direct = torch.get_rng_state()
    torch.manual_seed(12345)  # initialize_sharded must seed itself
    meta = parallelize(build_model(config, env.device, meta=True), config, env, syncs)
    initialize_sharded(meta, config, env.device)
    local = lambda t: t.to_local() if isinstance(t, DTensor) else t  # noqa: E731
    expected = dict(direct.named_parameters())
    got = dict(meta.named_parameters())
    report = {
        "builds_on_meta": builds_on_meta(config, env),
        "sharded": sorted(name for name, p in got.items() if isinstance(p, DTensor)),
        "differing": sorted(name for name, p in got.items() if not torch.equal(local(p), local(expected[name]))),
        "shapes_differ": sorted(name for name, p in got.items() if local(p).shape != local(expected[name]).shape),
        "buffers_differ": sorted(name for name, b in meta.named_buffers()
                                 if not torch.equal(b, dict(direct.named_buffers())[name])),
        "rng_differs": not torch.equal(torch.get_rng_state(), after_direct),
        "names_differ": sorted(set(got) ^ set(expected)),
    }
    gathered = [None] * env.world_size
    torch.distributed.all_gather_object(gathered, report)
    if env.is_main:
        with open(out, "w") as file:
            json.dump(gathered, file)
    torch.distributed.destroy_process_group()


def _run_worker(nproc: int, mesh_args: list[str], out) -> list[dict]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", __file__,
               str(out), *mesh_args]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.slow
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_every_shard_starts_as_in_the_full_model_build(layout, tmp_path):
    nproc, mesh_args = LAYOUTS[layout]
    reports = _run_worker(nproc, mesh_args, tmp_path / "report.json")
    for rank, report in enumerate(reports):
        assert report["builds_on_meta"]
        assert len(report["sharded"]) >= 6, (rank, report)  # the layout really shards (DTensor parameters)
        for key in ("differing", "shapes_differ", "buffers_differ", "names_differ"):
            assert not report[key], (rank, key, report[key])
        assert not report["rng_differs"], rank


@pytest.mark.slow
def test_fsdp_training_is_bit_identical_with_and_without_meta_init(tmp_path):
    """Dion draws its initial Q from the global generator after the model is built, so this also checks the
    generator's state."""
    args = [*TINY, *SHAPE, "--num_iterations", "4", "--batch_size", "8", "--device_batch_size", "2", "--fs_size", "2",
            "--optimizer", "dion", "--lr", "0.02", "--optimizer.qr_method", "qr", "--rank_fraction", "0.5"]
    curves = {}
    for meta in ("true", "false"):
        result = torchrun(2, *args, "--parallel.meta_init", meta, "--run_dir", str(tmp_path / meta))
        assert result.returncode == 0, result.stderr[-3000:]
        curves[meta] = [r["train_loss"] for r in read_metrics(tmp_path / meta) if "train_loss" in r]
    assert len(curves["true"]) == 4 and curves["true"] == curves["false"]


if __name__ == "__main__":
    _worker(sys.argv[2:], sys.argv[1])
    # The report is written: leave without the interpreter's teardown, where torch 2.11's gloo threads once aborted
    # a finished rank ("terminate called without an active exception", 1 of 3 runs).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
