"""Parallel layouts from the mesh config (gloo on CPU): every layout trains the same loss curve as one process on
the same global batch, resumes exactly from its own checkpoints, and checkpoints move between layouts.

Tolerance: the layouts sum the same per-example gradients in different orders (all-reduce, reduce-scatter,
row/column-sharded matmuls), so losses agree to float32 round-off: rtol 1e-5 over 3 steps for AdamW. Dion runs
with qr_method "qr" (deterministic, no random sketch) and agrees to rtol 1e-4: its orthogonalization amplifies
round-off slightly; so does NorDion2's (global selection, Polar Express in float32).
"""
import shutil
import socket
import subprocess
import sys

import pytest

from optimizers.registry import OPTIMIZERS as REGISTRY
from tests.training.helpers import ROOT, TINY, read_metrics, run_train, torchrun, train_losses
from tests.training.test_every_optimizer import LEARNING_RATES
from tests.training.test_every_optimizer import OPTIONS as EVERY_OPTIONS

pytestmark = pytest.mark.slow  # multi-process (torchrun) runs: the quick subset leaves them out

LAYOUTS = {
    "ddp": (2, []),
    "fsdp": (2, ["--fs_size", "2"]),
    "hsdp": (4, ["--dp_size", "2", "--fs_size", "2"]),
    "tp": (2, ["--tp_size", "2"]),
    "fsdp_tp": (4, ["--fs_size", "2", "--tp_size", "2"]),
}
STEPS = ["--num_iterations", "3", "--batch_size", "8", "--device_batch_size", "2"]
OPTIMIZERS = {
    "adamw": (["--optimizer", "adamw", "--lr", "0.01"], 1e-5),
    "dion": (["--optimizer", "dion", "--lr", "0.02", "--optimizer.qr_method", "qr", "--rank_fraction", "0.5"], 1e-4),
    "nordion2": (["--optimizer", "nordion2", "--lr", "0.02"], 1e-4),
}


def launch(nproc: int, run_dir, *args: str) -> list[float]:
    result = torchrun(nproc, *TINY, "--run_dir", str(run_dir), *args)
    assert result.returncode == 0, result.stderr[-3000:]
    return train_losses(run_dir)


# Loss curves of the (layout, optimizer) pairs that test_parallel_params.py does not compare parameter by parameter
# (it covers Dion in every layout here and AdamW in all but HSDP 2 x 2, with a stronger check).
CURVE_CASES = [("hsdp", "adamw")] + [(layout, "nordion2") for layout in LAYOUTS]


@pytest.fixture(scope="module")
def single_process(tmp_path_factory):
    """Reference curves: one process, the whole global batch (4 micro-batches of 2)."""
    curves = {}
    for name in dict.fromkeys(optimizer for _, optimizer in CURVE_CASES):
        args, _ = OPTIMIZERS[name]
        run_dir = tmp_path_factory.mktemp(f"single_{name}")
        assert run_train(run_dir, *STEPS, *args) == 0
        curves[name] = train_losses(run_dir)
    return curves


@pytest.mark.parametrize("layout, optimizer", CURVE_CASES, ids=[f"{opt}-{layout}" for layout, opt in CURVE_CASES])
def test_layout_matches_single_process(layout, optimizer, single_process, tmp_path):
    nproc, mesh_args = LAYOUTS[layout]
    args, rtol = OPTIMIZERS[optimizer]
    losses = launch(nproc, tmp_path, *STEPS, *args, *mesh_args)
    assert losses == pytest.approx(single_process[optimizer], rel=rtol)


@pytest.mark.parametrize("layout, optimizer", [("fsdp_tp", "adamw"), ("hsdp", "dion"), ("fsdp", "adamw"), ("ddp", "dion"),
                                               ("tp", "dion"), ("fsdp_tp", "nordion2")])
def test_layout_resumes_exactly_from_its_own_checkpoint(layout, optimizer, tmp_path):
    nproc, mesh_args = LAYOUTS[layout]
    args = [*OPTIMIZERS[optimizer][0], *mesh_args, *STEPS[2:], "--num_iterations", "4", "--checkpoint_freq", "2"]
    straight = launch(nproc, tmp_path / "straight", *args)
    shutil.copytree(tmp_path / "straight", tmp_path / "resumed")
    shutil.rmtree(tmp_path / "resumed" / "checkpoints" / "step_00000004")
    assert launch(nproc, tmp_path / "resumed", *args) == straight


def test_dion_compressed_sync_matches_full_gradient_sync(tmp_path):
    args = [*STEPS, *OPTIMIZERS["dion"][0], "--dp_size", "2"]
    compressed = launch(2, tmp_path / "compressed", *args, "--parallel.replicate_mesh_grad_sync", "true")
    full = launch(2, tmp_path / "full", *args, "--parallel.replicate_mesh_grad_sync", "false")
    assert compressed == pytest.approx(full, rel=1e-4)


def test_fsdp_checkpoint_resumes_under_ddp(tmp_path):
    args = [*OPTIMIZERS["adamw"][0], *STEPS[2:], "--num_iterations", "4", "--checkpoint_freq", "2"]
    straight = launch(2, tmp_path / "straight", *args)
    launch(2, tmp_path / "moved", *args, "--fs_size", "2")
    shutil.rmtree(tmp_path / "moved" / "checkpoints" / "step_00000004")
    (tmp_path / "moved" / "metrics.jsonl").write_text(
        "".join(line + "\n" for line in (tmp_path / "moved" / "metrics.jsonl").read_text().splitlines()[:2]))
    assert launch(2, tmp_path / "moved", *args) == pytest.approx(straight, rel=1e-5)  # DDP: no mesh keys


def test_vocab_parallel_checkpoint_resumes_with_the_replicated_head(tmp_path):
    """DCP saves the vocab-sharded embedding, LM head and their optimizer states by name, so a run may switch
    parallel.vocab_parallel on resume (like tp_size)."""
    args = [*OPTIMIZERS["adamw"][0], *STEPS[2:], "--num_iterations", "4", "--checkpoint_freq", "2", "--tp_size", "2"]
    straight = launch(2, tmp_path / "straight", *args)
    shutil.copytree(tmp_path / "straight", tmp_path / "switched")
    shutil.rmtree(tmp_path / "switched" / "checkpoints" / "step_00000004")
    switched = launch(2, tmp_path / "switched", *args, "--parallel.vocab_parallel", "false")
    assert switched == pytest.approx(straight, rel=1e-5)


@pytest.mark.parametrize("mesh_args, words", [
    (["--dp_size", "3"], ["dp_size x fs_size x tp_size", "= 3", "(2)"]),
    (["--tp_size", "2", "--n_head", "3", "--model_dim", "48"], ["tp_size", "n_head"]),
    (["--tp_size", "2", "--optimizer", "soap"], ["tp_size", "soap", "tensor parallelism"]),
    (["--tp_size", "2", "--model.vocab_size", "50305"], ["tp_size", "vocab_size", "vocab_parallel"]),
])
def test_bad_mesh_fails_with_one_clear_line(mesh_args, words, tmp_path):
    result = torchrun(2, *TINY, "--run_dir", str(tmp_path), *mesh_args)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr[-2000:]
    for word in words:
        assert word in errors[0]
    assert "Traceback (most recent call last):\n  File \"" + str(ROOT / "train.py") not in result.stderr


# AdamW, Dion, Muon and adam_adv are compared parameter by parameter under TP (test_parallel_params.py), NorDion2
# (and Dion3, the same algorithm under microsoft/dion's name) by its loss curve above.
@pytest.mark.parametrize("name", sorted(name for name, spec in REGISTRY.items() if spec.supports_tensor_parallel
                                        and name not in ("adamw", "dion", "muon", "adam_adv", "nordion2", "dion3")))
def test_every_tensor_parallel_optimizer_matches_single_process_with_the_vocab_parallel_head(name, tmp_path):
    """TP shards the embedding and LM head on the vocabulary by default, so every optimizer that accepts TP must take
    those shards. A 3-step loss curve: it fails for an optimizer that refuses or mis-updates the sharded tables from
    their first step (the embedding and LM head move at step 1), not for layout-dependent statistics that act
    later (a Prodigy D estimate summed over one shard only passed it); every parameter is compared for AdamW, Dion,
    Muon and adam_adv in test_parallel_params.py."""
    args = [*STEPS, "--optimizer", name, "--lr", str(LEARNING_RATES.get(name, 0.01)), *EVERY_OPTIONS.get(name, [])]
    assert run_train(tmp_path / "single", *args) == 0
    losses = launch(2, tmp_path / "tp", *args, "--tp_size", "2")
    assert losses == pytest.approx(train_losses(tmp_path / "single"), rel=1e-4)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_on_localhost_train(tmp_path):
    endpoint = f"127.0.0.1:{_free_port()}"
    launcher = ["--nnodes", "2", "--rdzv_backend", "c10d", "--rdzv_endpoint", endpoint, "--rdzv_id", "test"]
    args = [*TINY, *STEPS, *OPTIMIZERS["adamw"][0], "--fs_size", "2", "--run_dir", str(tmp_path)]
    import os
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", *launcher, f"--node_rank={rank}",
                               "--nproc_per_node=1", str(ROOT / "train.py"), *args],
                              cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for rank in range(2)]
    outputs = [node.communicate(timeout=900) for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outputs[0][1][-2000:] + outputs[1][1][-2000:]
    losses = [r["train_loss"] for r in read_metrics(tmp_path) if "train_loss" in r]
    assert len(losses) == 3 and losses[-1] < losses[0]
