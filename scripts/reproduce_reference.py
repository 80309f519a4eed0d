"""Run microsoft/dion's own train.py and ours side by side on the CPU and compare their losses step by step.

    python scripts/reproduce_reference.py --reference ~/src/dion              # dion and muon, 1 process and 2 ranks
    python scripts/reproduce_reference.py --reference ~/src/dion --optimizers muon --ranks 1 --steps 20

Needs this project installed (`pip install -e .`). --reference is a checkout of https://github.com/microsoft/dion
(the harness was written against 0a059a4). It is copied to a scratch directory and patched there for the CPU only
(`CPU_PATCHES`: device, backend, autocast device, no CUDA calls); nothing of it is imported into this project or
written outside --out. Both runs get:

- the same config: the reference's configs/<optimizer>_160m.yaml for its train.py, our
  configs/reference/<optimizer>_160m.yaml for ours, both at the same small shape (`SHAPE`, every other key as in the
  files), torch.compile off, validation on every step;
- the same initial weights: ours, built by our `build_model` from the config's seed, copied into the reference's
  GPT after its `init_weights` (`NAME_MAP`), and for Dion the same initial Q (our `initial_q`, seeded by the
  parameter's index, replacing the reference's draw);
- the same tokens: the embedded Shakespeare corpus, re-cut into small shards (--shard_tokens) so that the run
  crosses several shard boundaries, under the reference's shard names; ours reads them with `data.order: reference`.

The reference logs through wandb: a stand-in `wandb` module records its `wandb.log` calls. Compared per step:
validation loss (both all-reduce the mean over ranks) and, in one process, the training loss (the reference logs
rank 0's last micro-batch; with one process and one micro-batch per step that is the step's loss). Prints the
largest differences and writes them, with both curves, to --out/summary.json. The band to expect is in
docs/reproduction.md.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import torch
import yaml

from data.corpus import ensure_embedded_corpus
from data.loader import find_shards
from data.shards import read_shard, write_shard
from trainer.build import build_model
from trainer.config import build_config

ROOT = Path(__file__).resolve().parents[1]

# The small shape both runs train at (every other key is the config file's).
SHAPE = dict(model_dim=64, n_layer=2, n_head=2, sequence_length=128, device_batch_size=4, val_tokens=2048)

# Config keys both runs change on the CPU, beyond SHAPE: torch's fused AdamW kernel, which the reference's Dion runs
# its embedding and LM head with, takes no bfloat16 moments beside float32 parameters on the CPU ("expected scalar
# type Float but found BFloat16"), so the reference's mixed_precision (bf16 momentum, Q, variances) is off, in ours
# too (precision.optimizer_states and optimizer_variances float32).
CPU_CONFIG_CHANGES = dict(mixed_precision=False)
OUR_CPU_CONFIG_CHANGES = ["--precision.optimizer_states", "float32", "--precision.optimizer_variances", "float32"]

# Textual CPU patches of the reference: (file, text, replacement, how many occurrences at least). Each must match.
CPU_PATCHES = [
    ("train.py", 'assert torch.cuda.is_available(), "CUDA must be available"', "pass  # CPU run", 1),
    ("train.py", 'dist.init_process_group(backend="nccl")', 'dist.init_process_group(backend="gloo")', 1),
    ("train.py", 'device = f"cuda:{local_rank}"\n        torch.cuda.set_device(device)', 'device = "cpu"', 1),
    ("train.py", 'device_type="cuda",\n            mesh_shape', 'device_type="cpu",\n            mesh_shape', 1),
    ("train.py", 'model.to_empty(device="cuda")', 'model.to_empty(device="cpu")', 1),
    ("train.py", "DDP(model, device_ids=[local_rank], output_device=local_rank)", "DDP(model)", 1),
    ("train.py", 'torch.amp.autocast(device_type="cuda", dtype=torch.bfloat16)',
     'torch.amp.autocast(device_type="cpu", dtype=torch.bfloat16, enabled=AUTOCAST)', 1),
    ("train.py", "torch.cuda.synchronize()", "None  # CPU: nothing to synchronize", 1),
    ("train.py", "torch.cuda.max_memory_allocated()", "0", 1),
    ("models/gpt_utils.py", "x.cuda(), y.cuda()", "x, y", 1),
]

# Our GPT's parameter names -> the reference's (models/gpt_model.py), {i} the block index.
NAME_MAP = {
    "embed.weight": "transformer.wte.weight",
    "blocks.{i}.attn.q.weight": "transformer.h.{i}.attn.c_q.weight",
    "blocks.{i}.attn.k.weight": "transformer.h.{i}.attn.c_k.weight",
    "blocks.{i}.attn.v.weight": "transformer.h.{i}.attn.c_v.weight",
    "blocks.{i}.attn.o.weight": "transformer.h.{i}.attn.c_proj.weight",
    "blocks.{i}.mlp.fc.weight": "transformer.h.{i}.mlp.c_fc.weight",
    "blocks.{i}.mlp.proj.weight": "transformer.h.{i}.mlp.c_proj.weight",
    "lm_head.weight": "lm_head.weight",
}

# Runs inside the patched reference copy (its directory first on sys.path): the wandb stand-in, our weights after
# its init_weights, our initial Q after its Dion state init. Then the reference's main().
LAUNCHER = '''
import builtins, json, os, sys, types
import torch

builtins.AUTOCAST = os.environ["HARNESS_AUTOCAST"] == "bfloat16"
records = os.environ["HARNESS_RECORDS"]
run = types.SimpleNamespace(id="harness")
wandb = types.ModuleType("wandb")
wandb.run = run
wandb.login = lambda *args, **kwargs: True
wandb.init = lambda *args, **kwargs: run
def log(record, *args, **kwargs):
    with open(records, "a") as f:
        f.write(json.dumps({k: float(v) for k, v in record.items()}) + "\\n")
wandb.log = log
sys.modules["wandb"] = wandb

import models.gpt_model as gpt_model
if not os.path.abspath(gpt_model.__file__).startswith(os.path.abspath(os.path.dirname(__file__))):
    raise SystemExit(f"harness: models.gpt_model resolved to {gpt_model.__file__}, not the reference copy")
initial = torch.load(os.environ["HARNESS_WEIGHTS"])
reference_init = gpt_model.GPT.init_weights
def init_weights(self):
    reference_init(self)  # also sets the rotary frequencies
    params = dict(self.named_parameters())
    if set(params) != set(initial):
        raise SystemExit(f"harness: parameter names differ: {sorted(set(params) ^ set(initial))}")
    with torch.no_grad():
        for name, value in initial.items():
            params[name].copy_(value)
gpt_model.GPT.init_weights = init_weights

import dion.dion as dion_module
from optimizers.dion.linalg import initial_q  # ours: `pip install -e .` (our checkout on PYTHONPATH would shadow
                                              # the reference's `models` namespace package)
reference_q = dion_module.Dion._init_opt_state_dion
def init_opt_state_dion(self, param, state, *args, **kwargs):
    reference_q(self, param, state, *args, **kwargs)
    index = [id(p) for group in self.param_groups for p in group["params"]].index(id(param))
    rows, rank = state["Q"].shape
    state["Q"] = initial_q(rows, rank, seed=index, device=param.device).to(state["Q"].dtype)
dion_module.Dion._init_opt_state_dion = init_opt_state_dion

sys.argv = ["train.py", *sys.argv[1:]]
import train
train.main()
'''


# --mirror_bf16_rounding: our train.py, run with our Muon rounding in bfloat16 where the reference's CPU path does. The
# three points are the same maths, in another order: Newton-Schulz as separate products and sums (ours fuses them
# with baddbmm, as the reference's Triton kernels do on the GPU), the momentum without dampening (ours lerps: the
# same direction, scaled by 1 - mu, which Newton-Schulz normalizes away), and lr x update taken in bfloat16 (ours in
# float32). With them, one Muon step equals the reference's bit for bit; the rest of the pipeline is unpatched.
MIRROR_LAUNCHER = '''
import sys
import torch
import optimizers.muon.base as base
import optimizers.muon.muon as muon
import optimizers.muon.orthogonalize as orthogonalize


def unfused_quintic(x, coefficients):
    transposed = x.size(-2) > x.size(-1)
    if transposed:
        x = x.mT
    for a, b, c in coefficients:
        gram = x @ x.mT
        poly = b * gram + c * (gram @ gram)
        x = a * x + poly @ x
    return x.mT if transposed else x


def undamped_momentum(grads, momenta, *, mu, nesterov):
    torch._foreach_mul_(momenta, mu)
    torch._foreach_add_(momenta, grads)
    if not nesterov:
        return list(momenta)
    update = torch._foreach_mul(momenta, mu)
    torch._foreach_add_(update, grads)
    return list(update)


def update_in_its_dtype(param, update, *, lr, scale, weight_decay, cautious_wd):
    if cautious_wd:
        raise SystemExit("harness: --mirror_bf16_rounding does not cover cautious_wd")
    if weight_decay != 0.0:
        param.mul_(1.0 - lr * weight_decay)
    param.sub_(update * (lr * scale))


orthogonalize._quintic_iterations = unfused_quintic
muon.muon_momentum_update = undamped_momentum
muon.apply_update = update_in_its_dtype
import train
sys.exit(train.main(sys.argv[1:]))
'''


def reference_names(n_layer: int) -> dict[str, str]:
    names = {}
    for ours, theirs in NAME_MAP.items():
        for i in range(n_layer) if "{i}" in ours else [None]:
            names[ours.format(i=i)] = theirs.format(i=i)
    return names


def patch_reference(source: Path, target: Path) -> list[str]:
    """Copy the reference checkout to `target` and apply CPU_PATCHES; returns the applied patches as lines."""
    shutil.copytree(source, target, ignore=shutil.ignore_patterns(".git", "__pycache__", "wandb", "data"))
    applied = []
    for relative, text, replacement, at_least in CPU_PATCHES:
        path = target / relative
        content = path.read_text()
        count = content.count(text)
        if count < at_least:
            raise SystemExit(f"error: --reference {source}: {relative} has no {text!r} (the harness was written "
                             f"against microsoft/dion 0a059a4; this checkout differs there)")
        path.write_text(content.replace(text, replacement))
        applied.append(f"{relative}: {text!r} -> {replacement!r} ({count}x)")
    return applied


def cut_shards(out: Path, shard_tokens: int) -> None:
    """The embedded corpus as fineweb_{train,val}_*.bin shards of `shard_tokens` tokens (the reference's names)."""
    corpus = ensure_embedded_corpus()
    train = np.concatenate([read_shard(path) for path in find_shards(corpus, "train")])
    out.mkdir(parents=True)
    for index, start in enumerate(range(0, len(train), shard_tokens)):
        write_shard(out / f"fineweb_train_{index:06d}.bin", train[start:start + shard_tokens])
    write_shard(out / "fineweb_val_000000.bin", np.concatenate([read_shard(p) for p in find_shards(corpus, "val")]))


def our_overrides(data_dir: Path, batch_size: int, steps: int, autocast: str) -> list[str]:
    return ["--data.dir", str(data_dir), "--model.model_dim", str(SHAPE["model_dim"]),
            "--model.n_layer", str(SHAPE["n_layer"]), "--model.n_head", str(SHAPE["n_head"]),
            "--model.sequence_length", str(SHAPE["sequence_length"]), "--data.batch_size", str(batch_size),
            "--data.device_batch_size", str(SHAPE["device_batch_size"]), "--data.val_tokens", str(SHAPE["val_tokens"]),
            "--schedule.num_iterations", str(steps), "--logging.val_loss_every", "1", "--logging.log_every", "1",
            "--logging.wandb", "false", "--compile", "false", "--checkpoint.freq", "0",
            "--precision.autocast", autocast, *OUR_CPU_CONFIG_CHANGES]


def reference_config(reference: Path, optimizer: str, data_dir: Path, batch_size: int, steps: int) -> dict:
    config = yaml.safe_load((reference / "configs" / f"{optimizer}_160m.yaml").read_text())
    config.update({key: value for key, value in SHAPE.items()}, batch_size=batch_size, num_iterations=steps,
                  val_loss_every=1, data_dir=str(data_dir), no_compile=True, no_triton=True, no_wandb=False,
                  debug=False, checkpoint_freq=0, wandb_project_name="harness", **CPU_CONFIG_CHANGES)
    return config


def torchrun(ranks: int, script: Path, args: list[str], cwd: Path, env: dict, log: Path) -> None:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}",
               str(script), *args]
    with open(log, "w") as f:
        done = subprocess.run(command, cwd=cwd, env=env, stdout=f, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        tail = "".join(log.read_text().splitlines(keepends=True)[-30:])
        raise SystemExit(f"error: {' '.join(command)} failed (exit {done.returncode}); log {log}:\n{tail}")


def compare(ours: list[dict], theirs: list[dict], train_loss: bool) -> dict:
    """Per-step losses of both runs and their largest absolute differences (validation at steps 0..N, training at
    steps 1..N; the reference numbers its training record by the step before the update)."""
    our_val = {r["step"]: r["val_loss"] for r in ours if "val_loss" in r}
    their_val = {int(r["step"]): r["val/loss"] for r in theirs if "val/loss" in r}
    if sorted(our_val) != sorted(their_val):
        raise SystemExit(f"error: validation steps differ: ours {sorted(our_val)}, reference {sorted(their_val)}")
    result = dict(val_steps=len(our_val), val_ours=[our_val[s] for s in sorted(our_val)],
                  val_reference=[their_val[s] for s in sorted(our_val)])
    diffs = [abs(our_val[s] - their_val[s]) for s in sorted(our_val)]
    result.update(val_max_diff=max(diffs), val_step0_diff=diffs[0], val_last_diff=diffs[-1])
    if train_loss:
        our_train = {r["step"]: r["train_loss"] for r in ours if "train_loss" in r}
        their_train = {int(r["step"]) + 1: r["train/loss"] for r in theirs if "train/loss" in r}
        steps = sorted(our_train)
        if steps != sorted(their_train):
            raise SystemExit(f"error: training steps differ: ours {steps}, reference {sorted(their_train)}")
        diffs = [abs(our_train[s] - their_train[s]) for s in steps]
        result.update(train_ours=[our_train[s] for s in steps], train_reference=[their_train[s] for s in steps],
                      train_max_diff=max(diffs), train_first_diff=diffs[0], train_last_diff=diffs[-1])
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reference", type=Path, required=True, help="a checkout of microsoft/dion")
    parser.add_argument("--optimizers", nargs="+", default=["dion", "muon"],
                        help="reference configs to run (dion, muon, dion2, normuon)")
    parser.add_argument("--ranks", nargs="+", type=int, default=[1, 2], help="process counts (gloo)")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--accumulation", type=int, default=1, help="micro-batches per step per rank")
    parser.add_argument("--autocast", choices=["float32", "bfloat16"], default="float32",
                        help="float32: both without autocast (the tight comparison); bfloat16: the reference's "
                             "autocast, on the CPU (slow there: bf16 matmuls are emulated)")
    parser.add_argument("--mirror_bf16_rounding", action="store_true",
                        help="diagnostic: our Muon rounds in bfloat16 where the reference's CPU path does "
                             "(MIRROR_LAUNCHER); shows that the remaining difference is that rounding")
    parser.add_argument("--shard_tokens", type=int, default=50_000, help="tokens per training shard")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "reproduction")
    args = parser.parse_args(argv)
    if not (args.reference / "train.py").is_file() or not (args.reference / "dion" / "dion.py").is_file():
        print(f"error: --reference {args.reference}: not a microsoft/dion checkout (no train.py, dion/dion.py)",
              file=sys.stderr)
        return 2
    if args.out.exists():
        shutil.rmtree(args.out)
    args.out.mkdir(parents=True)
    reference = args.out / "reference"
    applied = patch_reference(args.reference, reference)
    (reference / "harness_launcher.py").write_text(textwrap.dedent(LAUNCHER))
    data_dir = args.out / "data"
    cut_shards(data_dir, args.shard_tokens)
    env = {**os.environ, "TORCHDYNAMO_DISABLE": "1", "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled",
           "HF_HUB_OFFLINE": "1", "HARNESS_AUTOCAST": args.autocast}
    summary = dict(reference=str(args.reference), patches=applied, shape=SHAPE, config_changes=CPU_CONFIG_CHANGES,
                   steps=args.steps, accumulation=args.accumulation, autocast=args.autocast,
                   mirror_bf16_rounding=args.mirror_bf16_rounding, shard_tokens=args.shard_tokens, runs=[])
    for optimizer in args.optimizers:
        for ranks in args.ranks:
            name = f"{optimizer}_{ranks}"
            run_dir = args.out / name
            run_dir.mkdir()
            batch_size = SHAPE["device_batch_size"] * ranks * args.accumulation
            overrides = our_overrides(data_dir, batch_size, args.steps, args.autocast)
            config = build_config(["--config", str(ROOT / "configs" / "reference" / f"{optimizer}_160m.yaml"),
                                   *overrides, "--logging.run_dir", str(run_dir / "ours")])
            names = reference_names(config.model.n_layer)
            weights = {names[key]: value for key, value in build_model(config).state_dict().items()}
            torch.save(weights, run_dir / "weights.pt")
            (run_dir / "reference.yaml").write_text(yaml.safe_dump(
                reference_config(args.reference, optimizer, data_dir, batch_size, args.steps)))
            run_env = {**env, "HARNESS_WEIGHTS": str(run_dir / "weights.pt"),
                       "HARNESS_RECORDS": str(run_dir / "reference.jsonl"), "PYTHONPATH": str(reference)}
            print(f"{name}: reference train.py ...", flush=True)
            torchrun(ranks, reference / "harness_launcher.py", ["--config", str(run_dir / "reference.yaml")],
                     reference, run_env, run_dir / "reference.log")
            print(f"{name}: our train.py ...", flush=True)
            ours_script = ROOT / "train.py"
            if args.mirror_bf16_rounding:
                ours_script = args.out / "mirror_launcher.py"
                ours_script.write_text(textwrap.dedent(MIRROR_LAUNCHER))
            torchrun(ranks, ours_script, ["--config", str(ROOT / "configs" / "reference" / f"{optimizer}_160m.yaml"),
                                                *overrides, "--logging.run_dir", str(run_dir / "ours")],
                     ROOT, {**env, "PYTHONPATH": str(ROOT)}, run_dir / "ours.log")
            ours = [json.loads(line) for line in (run_dir / "ours" / "metrics.jsonl").read_text().splitlines()]
            theirs = [json.loads(line) for line in (run_dir / "reference.jsonl").read_text().splitlines()]
            result = dict(optimizer=optimizer, ranks=ranks, batch_size=batch_size,
                          **compare(ours, theirs, train_loss=ranks == 1 and args.accumulation == 1))
            summary["runs"].append(result)
            line = (f"{name}: val loss {result['val_ours'][0]:.4f} -> {result['val_ours'][-1]:.4f}; max |ours - "
                    f"reference| val {result['val_max_diff']:.2e} (step 0: {result['val_step0_diff']:.1e})")
            if "train_max_diff" in result:
                line += f", train {result['train_max_diff']:.2e}"
            print(line, flush=True)
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(f"summary: {args.out / 'summary.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
