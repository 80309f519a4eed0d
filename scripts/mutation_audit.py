"""Hand-written mutation audit: apply one deliberate one-line bug at a time, run the tests meant to catch it, and
report which bugs the suite catches (docs/testing.md records the results).

    python scripts/mutation_audit.py                 # every mutation
    python scripts/mutation_audit.py model cqr       # the mutations whose id contains one of these words

Each mutation names a file, an exact snippet that must occur once, its replacement, and the tests to run. The file
is restored after each run (also on Ctrl-C). A mutation is "caught" when the tests fail.
"""
from __future__ import annotations

import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Mutation:
    id: str
    path: str
    old: str
    new: str
    tests: tuple[str, ...]


MODEL = "tests/models/test_gpt.py"
SCALAR_MIXED = "tests/optimizers/test_scalar_mixed_precision.py"
SU = "optimizers/common/scalar_updates.py"
PARALLEL = "tests/training/test_parallel_params.py"
VOCAB_PARALLEL = "tests/models/test_vocab_parallel.py"
VALIDATION = "tests/dataio/test_validation_ranks.py"
DION_DISTRIBUTED = "tests/optimizers/test_dion_distributed.py"
BACKWARD_SYNC_DDP = (f"{DION_DISTRIBUTED}::test_replica_averages_started_in_backward_with_accumulation_equal_in_step_"
                     "averages_ddp")
RESUME_RNG = "tests/training/test_resume_rng.py"
MUTATIONS = [
    Mutation("model-non-causal", "models/gpt/model.py", "is_causal=True", "is_causal=False", (MODEL,)),
    Mutation("model-rope-on-v", "models/gpt/model.py",
             "v = self.v(x).view(batch, seq_len, -1, self.head_dim)",
             "v = self.rotary(self.v(x).view(batch, seq_len, -1, self.head_dim))", (MODEL,)),
    Mutation("model-no-qk-norm", "models/gpt/model.py", "self.rotary(self.q_norm(q))", "self.rotary(q)", (MODEL,)),
    Mutation("model-rope-sign", "models/gpt/model.py", "x2 * cos - x1 * sin", "x2 * cos + x1 * sin", (MODEL,)),
    Mutation("model-rope-absolute", "models/gpt/model.py", "cos, sin = self.cos[:, :seq_len]",
             "cos, sin = self.cos[:, 1:seq_len + 1]", (MODEL,)),
    Mutation("model-relu-not-squared", "models/gpt/model.py", "F.relu(self.fc(x)).square()", "F.relu(self.fc(x))",
             (MODEL,)),
    Mutation("model-post-norm", "models/gpt/model.py", "x = x + self.attn(self.attn_norm(x))",
             "x = self.attn_norm(x + self.attn(x))", (MODEL,)),
    Mutation("model-head-not-zero", "models/gpt/model.py", "zeroed = {self.lm_head} | ", "zeroed = ", (MODEL,)),
    Mutation("model-no-final-norm", "models/gpt/model.py", "self.output(self.final_norm(x), targets)",
             "self.output(x, targets)", (MODEL,)),
    # bf16-state (mixed dtype) path of the scalar updates
    Mutation("scalar-adamw-mixed-beta1-as-beta2", SU, "m32.lerp_(g32, 1.0 - beta1)", "m32.lerp_(g32, 1.0 - beta2)",
             (SCALAR_MIXED,)),
    Mutation("scalar-adamw-mixed-beta2-as-beta1", SU, "v32.mul_(beta2).addcmul_(g32, g32, value=1.0 - beta2)",
             "v32.mul_(beta1).addcmul_(g32, g32, value=1.0 - beta1)", (SCALAR_MIXED,)),
    Mutation("scalar-adamw-mixed-no-bias-correction2", SU,
             "update = m32 / (v32.sqrt() / bias_correction2_sqrt + epsilon)",
             "update = m32 / (v32.sqrt() + epsilon)", (SCALAR_MIXED,)),
    Mutation("scalar-adamw-mixed-no-bias-correction1", SU, "p32.add_(update, alpha=-step_size)",
             "p32.add_(update, alpha=-lr)", (SCALAR_MIXED,)),
    Mutation("scalar-adamw-mixed-no-weight-decay", SU,
             "p32.mul_(1.0 - lr * weight_decay)\n        p32.add_(update, alpha=-step_size)",
             "p32.add_(update, alpha=-step_size)", (SCALAR_MIXED,)),
    Mutation("scalar-adamw-mixed-variance-not-stored", SU, "        v.copy_(v32)", "        pass", (SCALAR_MIXED,)),
    Mutation("scalar-lion-mixed-beta2-in-update", SU, "update = m32.lerp(g32, 1.0 - beta1).sign_()",
             "update = m32.lerp(g32, 1.0 - beta2).sign_()", (SCALAR_MIXED,)),
    Mutation("scalar-lion-mixed-beta1-in-momentum", SU, "m.copy_(m32.lerp_(g32, 1.0 - beta2))",
             "m.copy_(m32.lerp_(g32, 1.0 - beta1))", (SCALAR_MIXED,)),
    # checkpoint: RNG-drawing optimizers
    Mutation("checkpoint-rng-not-restored", "trainer/checkpoint.py", "        torch.set_rng_state(state[rng_key])",
             "        pass", (RESUME_RNG,)),
    Mutation("checkpoint-dion-step-not-restored", "optimizers/dion/core.py",
             "        self._checked_state.clear()\n",
             "        self._checked_state.clear()\n"
             "        for group in self.param_groups:\n            group['step'] = 0\n",
             (RESUME_RNG + "::test_resume_is_bit_exact_with_random_draws[dion_rcqr]",)),
    Mutation("rcqr-sketch-seed-truncated", "optimizers/dion/linalg.py",
             "generator.manual_seed((seed ^ (seed >> 32)) & 0xFFFFFFFF)", "generator.manual_seed(seed)",
             ("tests/optimizers/test_cholesky_qr.py",
              RESUME_RNG + "::test_resume_is_bit_exact_with_random_draws[dion_rcqr]")),
    # validation with several ranks
    Mutation("validation-every-rank-reads-rank-0", "trainer/loop.py",
             "config.data.val_tokens, env.data_rank, env.data_world_size",
             "config.data.val_tokens, 0, env.data_world_size",
             (PARALLEL + "::test_every_parameter_matches_single_process[ddp-adamw]",)),
    Mutation("validation-loader-ignores-rank", "data/loader.py",
             "    loader = DistributedTokenLoader(files, batch_size, sequence_length, rank, world_size, order=order)",
             "    loader = DistributedTokenLoader(files, batch_size, sequence_length, 0, world_size, order=order)",
             (VALIDATION,)),
    Mutation("validation-sum-not-mean-over-ranks", "trainer/distributed.py", "        value /= env.world_size\n",
             "", (PARALLEL + "::test_every_parameter_matches_single_process[ddp-adamw]",)),
    # grad_norm
    Mutation("grad-norm-not-squared", "trainer/distributed.py",
             "squares.append((norm.full_tensor() if isinstance(norm, DTensor) else norm) ** 2)",
             "squares.append(norm.full_tensor() if isinstance(norm, DTensor) else norm)",
             ("tests/training/test_grad_norm.py",)),
    Mutation("grad-norm-local-shard-only", "trainer/distributed.py",
             "(norm.full_tensor() if isinstance(norm, DTensor) else norm) ** 2",
             "(norm.to_local() if isinstance(norm, DTensor) else norm) ** 2",
             (PARALLEL + "::test_every_parameter_matches_single_process[fsdp-dion]",)),
    # training end to end: a backward pass that reaches only the LM head
    Mutation("model-backward-stops-at-head", "models/gpt/model.py", "logits = self.lm_head(hidden).float()",
             "logits = self.lm_head(hidden.detach()).float()",
             ("tests/training/test_every_optimizer.py::test_optimizer_lowers_the_loss_in_train_py[adamw]",
              "tests/training/test_every_optimizer.py::test_optimizer_lowers_the_loss_in_train_py[dion]")),
    # every gradient in every layout
    Mutation("tp-plan-missing-q-norm", "models/gpt/parallelize.py",
             '            "attn.q_norm": SequenceParallel(sequence_dim=2, use_local_output=True),\n', "",
             (PARALLEL + "::test_every_parameter_matches_single_process[tp-adamw]",)),
    Mutation("vocab-parallel-sum-exp-not-reduced", "models/gpt/parallelize.py",
             "        dist.all_reduce(sum_exp, group=group)\n", "", (VOCAB_PARALLEL,)),
    Mutation("vocab-parallel-target-on-every-rank", "models/gpt/parallelize.py",
             "owned.to(grad.dtype)", "torch.ones_like(owned, dtype=grad.dtype)", (VOCAB_PARALLEL,)),
    Mutation("dion-scalar-partial-gradient-read-locally", "optimizers/dion/core.py",
             "grads = [local_gradient(p) for p in params]", "grads = [local_tensor(p.grad) for p in params]",
             (PARALLEL + "::test_every_parameter_matches_single_process[tp-dion]",)),
    Mutation("advanced-partial-gradient-read-locally", "optimizers/advanced/base.py",
             "grad = local_gradient(param).float()", "grad = local_tensor(param.grad).float()",
             (PARALLEL + "::test_every_parameter_matches_single_process[tp-adam_adv]",)),
    Mutation("data-rank-uses-dp-for-fs", "trainer/distributed.py", 'get_local_rank() * self.fs + self.mesh["fs"]',
             'get_local_rank() * self.dp + self.mesh["fs"]',
             (PARALLEL + "::test_every_parameter_matches_single_process[hsdp_2x1-dion]",)),
    Mutation("data-rank-ignores-dp", "trainer/distributed.py", 'get_local_rank() * self.fs + self.mesh["fs"]',
             'get_local_rank() * 0 + self.mesh["fs"]',
             (PARALLEL + "::test_every_parameter_matches_single_process[hsdp_2x2-dion]",)),
    # Cholesky QR
    Mutation("cqr-single-pass", "optimizers/dion/core.py",
             "        if ok:\n            # CholeskyQR2",
             "        if ok:\n            return solve_right_upper(P, R), valid\n            # CholeskyQR2",
             ("tests/optimizers/test_cholesky_qr.py",)),
    Mutation("cqr2-without-near-identity-check", "optimizers/dion/core.py",
             "            usable &= gram_near_identity(G1)\n",
             "", ("tests/optimizers/test_cholesky_qr.py",)),
    Mutation("cqr-no-householder-fallback", "optimizers/dion/core.py",
             "return householder_orthonormalize(full)[:, start:start + length]", "return full[:, start:start + length]",
             ("tests/optimizers/test_cholesky_qr.py",)),
    Mutation("optax-reference-cqr-single-pass", "optimizers/experimental/dion_reference_optax.py",
             "Q, usable = cholesky_qr2(P)", "Q, usable = cholesky_qr(P)",
             ("tests/optimizers/experimental/test_cholesky_qr_optax.py",)),
    Mutation("optax-optimized-cqr-single-pass", "optimizers/experimental/dion_optax.py",
             "cholesky_qr2, column_normalize,", "cholesky_qr as cholesky_qr2, column_normalize,",
             ("tests/optimizers/experimental/test_cholesky_qr_optax.py",)),
    # Dion's initial Q
    Mutation("dion-initial-q-seed-shifted", "optimizers/dion/core.py", "seed=self._index[p]", "seed=self._index[p] + 1",
             ("tests/optimizers/test_dion.py::test_initial_q_is_seeded_gaussian_in_the_short_orientation",)),
    Mutation("dion-initial-q-uniform", "optimizers/dion/linalg.py", "return torch.randn((rows, rank), generator",
             "return torch.rand((rows, rank), generator",
             ("tests/optimizers/test_dion.py::test_initial_q_is_seeded_gaussian_in_the_short_orientation",)),
    # Dion's replica sync (issue 15): divided over the shard group, started during backward
    Mutation("dion-divided-sync-tail-slice", "optimizers/dion/distributed.py",
             "tensor.copy_(flat[:numel].view_as(tensor))", "tensor.copy_(flat[flat.numel() - numel:].view_as(tensor))",
             (f"{DION_DISTRIBUTED}::test_hsdp_replicate_times_outer_matches_single_process[hsdp_synthetic]",)),
    Mutation("dion-divided-sync-undivided", "optimizers/dion/distributed.py",
             "    if group is None or replicas is None:\n        yield all_reduce(tensor, group)",
             "    if True:\n        yield all_reduce(tensor, group)",
             ("tests/scripts/test_bench_comm.py::test_dion_hsdp_matrix_bytes_per_rank_within_ten_percent_of_m_plus_n_r"
              "_over_fs",)),
    Mutation("dion-backward-sync-sum-not-mean", "optimizers/dion/replica_sync.py", "flat.div_(self._world)", "pass",
             (BACKWARD_SYNC_DDP,)),
    Mutation("dion-step-averages-again", "optimizers/dion/core.py", "            if p not in averaged:",
             "            if True:", (BACKWARD_SYNC_DDP,)),
    Mutation("dion-first-projection-without-gradient", "optimizers/dion/core.py",
             "B = torch.add(momentum, local_gradient(p)).to(momentum.dtype)", "B = momentum.clone()",
             (BACKWARD_SYNC_DDP,)),
    Mutation("loop-announces-first-micro-batch-as-last", "trainer/loop.py",
             "self.hooks.prepare_backward(last_micro_batch=last, rescaled_after=self.config.grad_clip > 0)",
             "self.hooks.prepare_backward(last_micro_batch=micro == 0, rescaled_after=self.config.grad_clip > 0)",
             ("tests/training/test_backward_announcement.py",)),
]


def run(mutation: Mutation, timeout: int) -> tuple[str, float]:
    path = ROOT / mutation.path
    original = path.read_text()
    if original.count(mutation.old) != 1:
        return f"ERROR: snippet occurs {original.count(mutation.old)} times", 0.0
    started = time.perf_counter()
    try:
        path.write_text(original.replace(mutation.old, mutation.new))
        result = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider",
                                 *mutation.tests], cwd=ROOT, capture_output=True, text=True, timeout=timeout)
        verdict = "caught" if result.returncode != 0 else "MISSED"
    except subprocess.TimeoutExpired:
        verdict = "caught (timeout)"
    finally:
        path.write_text(original)
    return verdict, time.perf_counter() - started


def main(words: list[str]) -> int:
    selected = [m for m in MUTATIONS if not words or any(w in m.id for w in words)]
    baseline = sorted({test for m in selected for test in m.tests})
    if subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *baseline], cwd=ROOT,
                      capture_output=True).returncode != 0:
        print(f"the unmutated tests fail: {' '.join(baseline)}")
        return 2
    missed = 0
    for mutation in selected:
        verdict, seconds = run(mutation, timeout=900)
        missed += not verdict.startswith("caught")
        print(f"{mutation.id:40s} {verdict:18s} {seconds:6.1f}s  {' '.join(mutation.tests)}", flush=True)
    print(f"{len(selected) - missed} of {len(selected)} caught")  # MISSED and ERROR count as not caught
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
