"""Muon: equality with torch.optim.Muon, Newton-Schulz properties, scalar algorithms, registry builder, and FSDP2 /
DDP runs under gloo equal to the single-process run (state-dict round trips: test_second_gen.py)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from optimizers.muon import AdjustLR, Muon, lr_scale, newton_schulz
from optimizers.registry import OPTIMIZERS, OptimizerContext, ScalarPolicy, build_optimizer

REPO_ROOT = Path(__file__).resolve().parents[2]
SHAPES = [(32, 16), (16, 32), (32, 16), (24, 24)]


def _twin_params(shapes, seed=0):
    torch.manual_seed(seed)
    base = [torch.randn(s) for s in shapes]
    return [p.clone().requires_grad_() for p in base], [p.clone().requires_grad_() for p in base]


def _run_pair(mine, ours_opt, ref, ref_opt, steps, seed=1):
    torch.manual_seed(seed)
    for _ in range(steps):
        for a, b in zip(mine, ref):
            g = torch.randn_like(a)
            a.grad, b.grad = g.clone(), g.clone()
        ours_opt.step()
        ref_opt.step()


def _max_difference(xs, ys):
    return max((x.detach() - y.detach()).abs().max().item() for x, y in zip(xs, ys))


def test_matches_torch_muon_with_rms_norm_adjustment_in_bfloat16():
    # torch.optim.Muon runs Newton-Schulz in bfloat16 on every device; ours batches same-shape matrices (bmm), so
    # bfloat16 rounding may differ in the last bit: tolerance 1e-6 on parameters of size ~1 after 5 steps.
    mine, ref = _twin_params(SHAPES)
    ours = Muon(mine, lr=0.02, mu=0.95, weight_decay=0.1, adjust_lr="rms_norm", ns_dtype="bfloat16")
    theirs = torch.optim.Muon(ref, lr=0.02, momentum=0.95, weight_decay=0.1, adjust_lr_fn="match_rms_adamw")
    _run_pair(mine, ours, ref, theirs, steps=5)
    assert _max_difference(mine, ref) < 1e-6


@pytest.mark.parametrize("nesterov", [True, False])
def test_spectral_norm_matches_torch_original_on_tall_matrices(nesterov):
    # For fan_out >= fan_in, sqrt(fan_out / fan_in) equals torch's "original" sqrt(max(1, fan_out / fan_in)).
    shapes = [(32, 16), (64, 16), (32, 16)]
    mine, ref = _twin_params(shapes)
    ours = Muon(mine, lr=0.05, weight_decay=0.01, nesterov=nesterov, adjust_lr="spectral_norm", ns_dtype="bfloat16")
    theirs = torch.optim.Muon(ref, lr=0.05, weight_decay=0.01, nesterov=nesterov)
    _run_pair(mine, ours, ref, theirs, steps=4)
    assert _max_difference(mine, ref) < 1e-6


def test_lr_scale_closed_form():
    assert lr_scale(AdjustLR.SPECTRAL_NORM, torch.Size([3072, 768])) == pytest.approx(2.0)
    assert lr_scale(AdjustLR.SPECTRAL_NORM, torch.Size([768, 3072])) == pytest.approx(0.5)
    assert lr_scale(AdjustLR.RMS_NORM, torch.Size([768, 3072])) == pytest.approx(0.2 * 3072 ** 0.5)
    assert lr_scale(AdjustLR.NONE, torch.Size([768, 3072])) == 1.0


def test_single_step_closed_form_without_nesterov():
    # First step, nesterov off: M = (1 - mu) G, W1 = W0 (1 - lr wd) - lr sqrt(fan_out/fan_in) NS(M); NS is scale
    # invariant, so NS(M) = NS(G). Tolerance 1e-6 (float32, same arithmetic).
    torch.manual_seed(0)
    w0, g = torch.randn(48, 16), torch.randn(48, 16)
    w = w0.clone().requires_grad_()
    w.grad = g.clone()
    Muon([w], lr=0.1, mu=0.9, weight_decay=0.2, nesterov=False, ns_dtype="float32").step()
    expected = w0 * (1 - 0.1 * 0.2) - 0.1 * (48 / 16) ** 0.5 * newton_schulz(g[None])[0]
    assert torch.allclose(w.detach(), expected, atol=1e-6)


def test_newton_schulz_batched_equals_one_matrix_at_a_time():
    torch.manual_seed(0)
    stack = torch.randn(5, 40, 24)
    batched = newton_schulz(stack)
    single = torch.cat([newton_schulz(m[None]) for m in stack])
    assert torch.allclose(batched, single, atol=1e-6)


def reference_newton_schulz(g: torch.Tensor, coefficients, epsilon: float = 1e-7) -> torch.Tensor:
    """microsoft/dion's zeropower_via_newtonschulz5 (dion/muon.py at 0a059a4), in g's dtype: scale by
    1 / (||G||_F + eps) on the wide orientation, then one quintic per (a, b, c)."""
    x = g.mT if g.size(-2) > g.size(-1) else g
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + epsilon)
    for a, b, c in coefficients:
        gram = x @ x.mT
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.mT if g.size(-2) > g.size(-1) else x


@pytest.mark.parametrize("shape", [(48, 16), (16, 48)])
def test_per_iteration_coefficients_are_the_references_newton_schulz(shape):
    # In float64 the reference's iteration and ours agree to 1e-8 (its input scale is 1 / (||G|| + 1e-7), ours
    # 1 / max(||G||, 1e-7): a relative 1e-7 / ||G||, observed 1.5e-9); the schedule in another order, or the constant
    # triple, is off by > 1e-2: the polynomials differ.
    from optimizers.muon.orthogonalize import REFERENCE_NS_COEFFICIENTS
    torch.manual_seed(0)
    g = torch.randn(2, *shape, dtype=torch.float64)
    expected = reference_newton_schulz(g, REFERENCE_NS_COEFFICIENTS)
    ours = newton_schulz(g, 5, REFERENCE_NS_COEFFICIENTS, dtype=torch.float64)
    assert (ours - expected).abs().max() < 1e-8
    assert (newton_schulz(g, 5, REFERENCE_NS_COEFFICIENTS[::-1], dtype=torch.float64) - expected).abs().max() > 1e-2
    assert (newton_schulz(g, 5, dtype=torch.float64) - expected).abs().max() > 1e-2


def test_muon_step_with_the_reference_coefficients():
    # One step (nesterov off, so U = (1 - mu) G and NS(U) = NS(G)): W1 = W0 (1 - lr wd) - lr sqrt(m/n) NS_ref(G).
    from optimizers.muon.orthogonalize import REFERENCE_NS_COEFFICIENTS
    torch.manual_seed(0)
    w0, g = torch.randn(48, 16), torch.randn(48, 16)
    w = w0.clone().requires_grad_()
    w.grad = g.clone()
    Muon([w], lr=0.1, mu=0.9, weight_decay=0.2, nesterov=False, ns_dtype="float32",
         ns_coefficients=[list(t) for t in REFERENCE_NS_COEFFICIENTS]).step()
    expected = w0 * (1 - 0.1 * 0.2) - 0.1 * 3 ** 0.5 * reference_newton_schulz(g.double(), REFERENCE_NS_COEFFICIENTS)
    assert torch.allclose(w.detach(), expected.float(), atol=1e-5)


@pytest.mark.parametrize("coefficients, steps", [((3.4, -4.7), 5), (((3.4, -4.7, 2.0),) * 2, 5),
                                                 (((3.4, -4.7, 2.0), (3.4, -4.7)), 2)])
def test_bad_ns_coefficients_name_the_key(coefficients, steps):
    with pytest.raises(ValueError, match=r"Muon: ns_coefficients must be three numbers \(a, b, c\) or ns_steps"):
        Muon([torch.nn.Parameter(torch.zeros(4, 4))], ns_coefficients=coefficients, ns_steps=steps)


@pytest.mark.parametrize("shape", [(64, 32), (32, 64)])
def test_newton_schulz_singular_values_near_one(shape):
    # The tuned quintic leaves singular values in roughly [0.7, 1.2] after 5 steps (not exactly 1, by design).
    torch.manual_seed(0)
    out = newton_schulz(torch.randn(1, *shape))[0]
    singular_values = torch.linalg.svdvals(out)
    assert out.shape == shape
    assert singular_values.min() > 0.6 and singular_values.max() < 1.25


def test_scalar_groups_match_torch_adamw_and_lion_pytorch():
    # The built-in scalar algorithms are the shared update functions: AdamW equals torch.optim.AdamW (atol 1e-6),
    # Lion equals lion-pytorch (atol 1e-6: lerp vs mul/add momentum differ in the last bit).
    from lion_pytorch import Lion as ReferenceLion
    (vector, embedding), (ref_vector, ref_embedding) = _twin_params([(16,), (10, 8)])
    ours = Muon([dict(params=[vector], algorithm="lion", lr=3e-3, weight_decay=0.1),
                 dict(params=[embedding], algorithm="adamw", lr=1e-2, weight_decay=0.05)],
                betas=(0.9, 0.95), epsilon=1e-8)
    adamw = torch.optim.AdamW([ref_embedding], lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.05)
    lion = ReferenceLion([ref_vector], lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1)

    class Both:
        def step(self):
            adamw.step()
            lion.step()

    _run_pair([vector, embedding], ours, [ref_vector, ref_embedding], Both(), steps=5)
    assert _max_difference([vector, embedding], [ref_vector, ref_embedding]) < 1e-6


def test_bfloat16_parameters_keep_bfloat16_state_and_track_float32():
    # Same start and gradients in bf16 and fp32: after 3 steps (total movement ~0.1) the bf16 weights (size ~0.1,
    # bf16 spacing ~5e-4) stay within atol 2e-3 of the fp32 run.
    torch.manual_seed(0)
    w16 = (0.1 * torch.randn(32, 16)).bfloat16().requires_grad_()
    w32 = w16.detach().float().requires_grad_()
    opt32, opt16 = Muon([w32], lr=0.02), Muon([w16], lr=0.02)
    for _ in range(3):
        g = torch.randn(32, 16)
        w32.grad, w16.grad = g.clone(), g.bfloat16()
        opt32.step()
        opt16.step()
    assert opt16.state[w16]["momentum"].dtype == torch.bfloat16
    assert torch.allclose(w16.detach().float(), w32.detach(), atol=2e-3)


def test_rejects_bad_options_with_clear_errors():
    matrix, vector = torch.zeros(4, 4, requires_grad=True), torch.zeros(4, requires_grad=True)
    with pytest.raises(ValueError, match="adjust_lr=.* is invalid; allowed: spectral_norm, rms_norm, none"):
        Muon([matrix], adjust_lr="spectral")
    with pytest.raises(ValueError, match="algorithm=.* is invalid; allowed: muon, lion, adamw"):
        Muon([dict(params=[vector], algorithm="sgd")])
    with pytest.raises(ValueError, match="needs 2D parameters"):
        Muon([vector])
    with pytest.raises(ValueError, match="ns_dtype"):
        Muon([matrix], ns_dtype="float16")


def test_build_puts_matrices_on_muon_and_the_rest_on_the_scalar_algorithm():
    torch.manual_seed(0)
    matrices = [torch.randn(12, 8, requires_grad=True) for _ in range(2)]
    embedding, head = torch.randn(20, 8, requires_grad=True), torch.zeros(20, 8, requires_grad=True)
    gain = torch.ones(8, requires_grad=True)
    ctx = OptimizerContext(matrix_params=matrices, embedding_params=[embedding], lm_head_params=[head],
                           vector_params=[gain], model_dim=8, scalar="adamw",
                           options=dict(lr=0.02, adjust_lr="rms_norm"))
    optimizer = build_optimizer("muon", ctx)
    algorithms = [(g["algorithm"], len(g["params"])) for g in optimizer.param_groups]
    assert algorithms == [("muon", 2), ("adamw", 1), ("adamw", 1), ("adamw", 1)]
    assert optimizer.param_groups[0]["adjust_lr"] == "rms_norm"
    assert not OPTIMIZERS["muon"].syncs_replicate_grads and OPTIMIZERS["muon"].scalar is ScalarPolicy.BUILTIN
    with pytest.raises(ValueError, match="not an option of optimizer 'muon'"):
        build_optimizer("muon", OptimizerContext(matrix_params=matrices, model_dim=8, options=dict(momentum=0.9)))


def test_lowers_a_least_squares_loss():
    torch.manual_seed(0)
    target, inputs = torch.randn(16, 8), torch.randn(64, 8)
    weight = torch.zeros(16, 8, requires_grad=True)
    optimizer = Muon([weight], lr=0.1, weight_decay=0.0)

    def loss():
        return (inputs @ (weight - target).T).square().mean()

    start = loss().item()
    for _ in range(30):
        optimizer.zero_grad()
        loss().backward()
        optimizer.step()
    assert loss().item() < 0.15 * start


def test_fsdp2_and_ddp_runs_match_single_process(tmp_path):
    # 2 gloo ranks: FSDP2-sharded DTensors (uneven and empty shards) and replicated plain tensors split across
    # ranks must reproduce single-process Muon (float32 Newton-Schulz): atol 1e-5 (FSDP averages gradients with
    # a reduce-scatter, the DDP run here all-reduces them). Orthogonalizing shards separately is off by ~0.1.
    output = tmp_path / "result.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO_ROOT), HF_HUB_OFFLINE="1",
               WANDB_MODE="disabled")
    completed = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         str(REPO_ROOT / "tests/optimizers/muon_distributed_worker.py"), str(output)],
        env=env, capture_output=True, text=True, timeout=240)
    assert completed.returncode == 0, completed.stderr[-4000:]
    result = json.loads(output.read_text())
    assert result["moved"] > 1e-2
    assert result["fsdp"] < 1e-5
    assert result["replicated"] < 1e-5
    assert result["momentum_is_sharded"]


# The 7B preset's block matrices (models/gpt PRESETS["7b"]): q, k, v, o, MLP in, MLP out of 32 blocks.
SEVEN_B_MATRICES = [(4096, 4096)] * 4 * 32 + [(16384, 4096)] * 32 + [(4096, 16384)] * 32


def _orthogonalization_loads(world: int, ranks: list[int], mesh_shape: tuple[int, ...] | None) -> dict[int, int]:
    """Newton-Schulz cost (m n min(m, n)) of the matrices `WholeMatrices` hands each of `ranks` at world size
    `world`: DTensor shards on a (dp, fs) mesh when mesh_shape is given (HSDP, `(Replicate, Shard(0))`), else
    plain tensors split over the replicas (DDP). Fake process group and fake tensors: nothing is computed."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard
    import torch.distributed as dist
    from optimizers.muon.distributed import MatrixLayout, WholeMatrices, orthogonalization_cost
    from trainer.estimate import fake_process_group
    loads = {}
    for rank in ranks:
        with fake_process_group(world, rank):
            mesh = init_device_mesh("cpu", mesh_shape) if mesh_shape is not None else None
            computed = []

            def compute(indices, stack):
                computed.extend(indices)
                return torch.zeros_like(stack)

            with FakeTensorMode(allow_non_fake_inputs=True):
                if mesh is None:
                    layouts = [MatrixLayout(shape) for shape in SEVEN_B_MATRICES]
                    inputs = [torch.zeros(shape) for shape in SEVEN_B_MATRICES]
                    WholeMatrices(dist.group.WORLD)(layouts, inputs, compute)
                else:
                    layouts = [MatrixLayout(shape, mesh, (Replicate(), Shard(0))) for shape in SEVEN_B_MATRICES]
                    inputs = [torch.zeros(m // mesh_shape[1], n) for m, n in SEVEN_B_MATRICES]
                    WholeMatrices(None)(layouts, inputs, compute)
            loads[rank] = sum(orthogonalization_cost(SEVEN_B_MATRICES[i]) for i in computed)
    return loads


@pytest.mark.parametrize("world, ranks, mesh_shape", [(8, list(range(8)), None), (64, [0, 31, 32, 63], None),
                                                      (64, [0, 31, 32, 63], (8, 8)),
                                                      (256, [0, 63, 64, 255], (8, 32))])
def test_orthogonalization_owners_balance_the_load_at_scale(world, ranks, mesh_shape):
    """Every rank orthogonalizes at most max(the largest matrix, the mean load): owners go round-robin across the
    shape buckets, largest first. Assigning each bucket from rank 0 gave rank 0 the first MLP matrix of both MLP
    shapes (7B at 64 ranks: 10 units of a square matrix against a mean of 6; at 256: 9 against a bound of 4)."""
    from optimizers.muon.distributed import orthogonalization_cost
    costs = [orthogonalization_cost(shape) for shape in SEVEN_B_MATRICES]
    bound = max(max(costs), sum(costs) / world)
    loads = _orthogonalization_loads(world, ranks, mesh_shape)
    assert max(loads.values()) <= bound, {rank: load / costs[0] for rank, load in loads.items()}
    if len(ranks) == world:
        assert sum(loads.values()) == sum(costs)  # every matrix exactly once
