"""Bytes per collective per training step, by kind and by group, for the trainer's data-parallel layouts and
optimizers, beside the formula; and the share of Dion's own replica sync issued before backward ends.

    python scripts/bench_comm.py                     # launches itself under torchrun at 2 and 4 gloo ranks
    python scripts/bench_comm.py --ranks 4 --json rows.json --detail
    torchrun --standalone --nproc_per_node=4 scripts/bench_comm.py --worker rows.json   # what the launcher runs

Each case builds the model, parallelizes it and builds the optimizer as train.py does (trainer.build: build_model,
distribute_model, build_training_optimizer), then runs two steps of one micro-batch on random tokens, announcing the
backward to the optimizer as the loop does (`prepare_backward`); the first step creates the optimizer state, the second
is counted: every c10d collective seen by a TorchDispatchMode (eager torch.distributed calls, DDP's reducer, FSDP2,
DTensor's functional collectives), with the phase that issued it (forward, backward, step) and its process group, named
after the trainer's mesh: replicas (dp), shards (fs), or world.

Bytes are each collective's payload per rank, averaged over the ranks: the tensor an all-reduce reduces, the input
of a reduce-scatter (the whole tensor being summed) and of an all-gather (this rank's piece); float32 throughout.
Formulas, per rank (N: parameter count; fs: shard group size, 1 without FSDP; N_fs: N with each parameter's dim 0
padded to a multiple of fs, as FSDP2 shards it; a Dion matrix m x n has rank r = rank_fraction min(m, n) and is
compressed when (m + n) r < m n):
- replicas, backward, synced by the wrapper: DDP all-reduces every gradient, 4 N; HSDP (FSDP2 on the 2-D mesh)
  all-reduces each rank's reduce-scattered shard, 4 N_fs / fs.
- replicas, backward, synced by Dion itself: the full gradients (scalar-algorithm parameters, uncompressed matrices),
  local shards, 4 sum(numel) / fs, from post-accumulate-grad hooks (plus the first P without shards, below).
- replicas, step, Dion's compressed matrices: P and R, each rank averaging 1/fs of what its shard group sums,
  4 sum (m + n) r / fs (issue 15's acceptance: measured within 10%). Without shards (fs = 1) Dion and
  dion_reference compute and average the first P = (M + G) Q during backward: 4 sum max(m, n) r moves to the
  backward column, 4 sum min(m, n) r (R) stays in step. dion_async divides the orthonormalization: a P
  that no shard group sums (rows sharded or unsharded) is reduce-scattered over the replicas and all-gathered back,
  4 sum b' (m / fs) r (1 + 1 / dp) per batch of b matrices padded to b' (a multiple of dp), where Dion all-reduces
  4 b (m / fs) r; a P summed over the shard group is reduce-scattered there and each rank averages b' / fs matrices.
- replicas, step, Muon: the all-gather of the orthogonalized matrices, 4 sum ceil(c / dp) m n over the c matrices
  of each shape.
- shards, backward: FSDP2's gradient reduce-scatter, 4 N_fs. Forward and backward parameter all-gathers (4 N_fs / fs
  per gather) and Dion's own shard-group sums (P, R, Gram and sketch matrices, column norms) are measured only.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

import torch
import torch.distributed as dist

from optimizers.common.hooks import training_hooks
from optimizers.dion.linalg import low_rank_dim
from trainer.build import build_model, build_training_optimizer, builds_on_meta, check_layout, distribute_model
from trainer.collectives import CollectiveLedger, mesh_group_names
from trainer.config import build_config
from trainer.distributed import init_distributed, unwrap

FLOAT_BYTES = 4
MB = 2 ** 20
PHASES = ("forward", "backward", "step")
# name -> (optimizer, rank_fraction or None, {ranks: (dp, fs)}, Dion syncs the replicas itself)
CASES = {
    "adamw ddp": ("adamw", None, {2: (2, 1), 4: (4, 1)}, False),
    "adamw fsdp": ("adamw", None, {2: (1, 2), 4: (1, 4)}, False),
    "adamw hsdp": ("adamw", None, {4: (2, 2)}, False),
    "dion r1 own sync": ("dion", 1.0, {2: (2, 1), 4: (2, 2)}, True),
    "dion r1 wrapper sync": ("dion", 1.0, {2: (2, 1), 4: (2, 2)}, False),
    "dion r1/4 own sync": ("dion", 0.25, {2: (2, 1), 4: (2, 2)}, True),
    "dion r1/4 wrapper sync": ("dion", 0.25, {2: (2, 1), 4: (2, 2)}, False),
    "dion_reference r1/4 own sync": ("dion_reference", 0.25, {4: (2, 2)}, True),
    "dion_async r1/4 own sync": ("dion_async", 0.25, {2: (2, 1), 4: (2, 2)}, True),
    "muon ddp": ("muon", None, {2: (2, 1), 4: (4, 1)}, False),
}


def case_config(name: str, ranks: int, model_args: list[str]):
    optimizer, rank_fraction, layouts, own_sync = CASES[name]
    dp, fs = layouts[ranks]
    argv = [*model_args, "--optimizer", optimizer, "--parallel.dp_size", str(dp), "--parallel.fs_size", str(fs),
            "--parallel.tp_size", "1", "--parallel.replicate_mesh_grad_sync", str(own_sync).lower(),
            "--logging.wandb", "false"]
    if rank_fraction is not None:
        argv += ["--rank_fraction", str(rank_fraction)]
    return build_config(argv)


def _padded(shape: tuple[int, ...], parts: int) -> int:
    rows = -(-shape[0] // parts) * parts
    rest = 1
    for size in shape[1:]:
        rest *= size
    return rows * rest


def formulas(name: str, config, groups: dict[str, list[tuple[int, ...]]], dp: int, fs: int) -> dict[str, float]:
    """Bytes per rank of the collectives the module docstring gives a formula for, keyed like the ledger
    ("phase/group" or "phase/group/kind"); "step/replicas" of a Dion case is its compressed matrices' P and R."""
    optimizer, rank_fraction, _, own_sync = CASES[name]
    shapes = [s for shapes in groups.values() for s in shapes]
    numel = sum(torch.Size(s).numel() for s in shapes)
    padded = sum(_padded(s, fs) for s in shapes)
    out: dict[str, float] = {}
    if fs > 1:
        out["backward/shards/reduce_scatter"] = FLOAT_BYTES * padded
    dion = optimizer.startswith("dion")
    if dp > 1 and not (dion and own_sync):
        out["backward/replicas"] = FLOAT_BYTES * (padded / fs if fs > 1 else numel)
    if optimizer == "muon" and dp > 1:
        counts: dict[tuple[int, ...], int] = defaultdict(int)
        for shape in groups["matrix"]:
            counts[tuple(shape)] += 1
        out["step/replicas"] = FLOAT_BYTES * sum(-(-c // dp) * m * n for (m, n), c in counts.items())
    if dion and own_sync and dp > 1:
        full = [s for key, shapes_of in groups.items() if key != "matrix" for s in shapes_of]
        compressed: dict[tuple[int, int], int] = defaultdict(int)
        for m, n in groups["matrix"]:
            r = low_rank_dim(m, n, rank_fraction, 1)
            if (m + n) * r < m * n:
                compressed[(m, n)] += 1
            else:
                full.append((m, n))
        early = 0.0  # first P of compressed matrices that no shard group sums: averaged during backward
        pr = 0.0
        for (m, n), count in compressed.items():
            r = low_rank_dim(m, n, rank_fraction, 1)
            if optimizer != "dion_async" and fs == 1:
                early += count * max(m, n) * r
                pr += count * min(m, n) * r
                continue
            if optimizer != "dion_async":
                pr += count * (m + n) * r / fs
                continue
            # Dion's orientation: P has max(m, n) rows; FSDP shards X's dim 0 (m), which is P's columns when m < n:
            # then the shards own P (they sum it), else the replicas do.
            rows, columns = max(m, n), min(m, n)
            shards_own = fs > 1 and m < n
            owners = fs if shards_own else dp
            batch = owners * -(-8 // owners)  # DionAsync.batch_size rounded to a multiple of the owners
            padded_count = sum(owners * -(-min(batch, count - i) // owners) for i in range(0, count, batch))
            if not shards_own:  # reduce-scatter + all-gather of P over the replicas; R summed over the shards first
                pr += padded_count * rows * r / fs * (1 + 1 / dp) + count * columns * r / fs
            else:  # P summed over the shards and divided there (each rank averages padded_count / fs matrices)
                pr += padded_count / fs * rows * r + count * columns * r / fs
        out["backward/replicas"] = FLOAT_BYTES * (sum(torch.Size(s).numel() for s in full) / fs + early)
        out["step/replicas"] = FLOAT_BYTES * pr
    return out


def measure(name: str, ranks: int, model_args: list[str]) -> dict:
    config = case_config(name, ranks, model_args)
    env = init_distributed(config)
    check_layout(config, env)
    group_names = mesh_group_names(env)
    model = build_model(config, env.device, meta=builds_on_meta(config, env))
    groups = {key: [tuple(p.shape) for p in params] for key, params in model.param_groups().items()}
    model = distribute_model(model, config, env)
    optimizer = build_training_optimizer(unwrap(model), config, env)
    hooks = training_hooks(optimizer)
    generator = torch.Generator().manual_seed(1 + env.rank)
    shape = (2, config.model.sequence_length)
    ledger = CollectiveLedger(group_names)
    for counted in (False, True):
        inputs = torch.randint(config.model.vocab_size, shape, generator=generator)
        targets = torch.randint(config.model.vocab_size, shape, generator=generator)
        ledger.calls.clear()
        ledger.bytes.clear()
        with ledger:
            ledger.phase = "forward"
            loss = model(inputs, targets)
            hooks.prepare_backward(last_micro_batch=True)
            ledger.phase = "backward"
            loss.backward()
            ledger.phase = "step"
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    everyone = [None] * env.world_size
    dist.all_gather_object(everyone, (dict(ledger.calls), dict(ledger.bytes)))
    keys = sorted({key for calls, _ in everyone for key in calls})
    measured = {key: dict(calls=sum(c.get(key, 0) for c, _ in everyone) / env.world_size,
                          bytes=sum(b.get(key, 0) for _, b in everyone) / env.world_size) for key in keys}
    return dict(case=name, ranks=ranks, dp=env.dp, fs=env.fs, measured=measured,
                formula=formulas(name, config, groups, env.dp, env.fs), own_sync=CASES[name][3])


def totals(row: dict, prefix: str) -> float:
    return sum(v["bytes"] for key, v in row["measured"].items() if key.startswith(prefix))


def own_sync_share_in_backward(row: dict) -> float | None:
    """Bytes of Dion's own replica sync issued during backward over those issued in backward and step."""
    if not row["own_sync"] or row["dp"] == 1:
        return None
    before, after = totals(row, "backward/replicas/"), totals(row, "step/replicas/")
    return before / (before + after) if before + after else None


def table(rows: list[dict], detail: bool) -> str:
    lines = ["| case | ranks | dp x fs | backward, replicas: MB measured / formula | step, replicas: MB measured / "
             "formula | backward, shards, reduce-scatter: MB measured / formula | other collectives, MB | own "
             "replica sync issued in backward |", "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        formula = row["formula"]
        cells = []
        for prefix in ("backward/replicas", "step/replicas", "backward/shards/reduce_scatter"):
            measured = totals(row, prefix)
            expected = formula.get(prefix)
            cells.append(f"{measured / MB:.3f} / {expected / MB:.3f}" if expected is not None
                         else (f"{measured / MB:.3f} / -" if measured else "-"))
        other = sum(v["bytes"] for key, v in row["measured"].items()
                    if not key.startswith(("backward/replicas/", "step/replicas/", "backward/shards/reduce_scatter")))
        share = own_sync_share_in_backward(row)
        lines.append(f"| {row['case']} | {row['ranks']} | {row['dp']} x {row['fs']} | {' | '.join(cells)} | "
                     f"{other / MB:.3f} | {'-' if share is None else f'{100 * share:.0f}%'} |")
    if detail:
        lines += ["", "| case | ranks | phase/group/kind | calls | MB per rank |", "|---|---|---|---|---|"]
        for row in rows:
            for key, value in row["measured"].items():
                lines.append(f"| {row['case']} | {row['ranks']} | {key} | {value['calls']:g} | "
                             f"{value['bytes'] / MB:.4f} |")
    return "\n".join(lines)


def worker(output: Path, cases: list[str], model_args: list[str]) -> None:
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    ranks = dist.get_world_size()
    rows = [measure(name, ranks, model_args) for name in cases if ranks in CASES[name][2]]
    if dist.get_rank() == 0:
        output.write_text(json.dumps(rows))
    dist.destroy_process_group()


def launch(ranks: int, cases: list[str], model_args: list[str]) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        output = Path(tmp) / "rows.json"
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}",
                   str(Path(__file__).resolve()), "--worker", str(output), "--cases", *cases, "--", *model_args]
        completed = subprocess.run(command, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                                   text=True)
        if completed.returncode != 0:
            raise RuntimeError(f"bench_comm at {ranks} ranks failed:\n{completed.stderr[-4000:]}")
        return json.loads(output.read_text())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", type=int, nargs="+", default=[2, 4], choices=[2, 4])
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES), metavar="CASE")
    parser.add_argument("--json", type=Path, help="write the measured rows here")
    parser.add_argument("--detail", action="store_true", help="also print every (phase, group, kind)")
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("model_args", nargs="*", default=["--model_dim", "256", "--n_layer", "2", "--n_head", "4",
                                                          "--sequence_length", "64"],
                        help="train.py options for the model after `--` (default: --model_dim 256 --n_layer 2 "
                             "--n_head 4 --sequence_length 64)")
    args = parser.parse_args(argv)
    if args.worker is not None:
        worker(args.worker, args.cases, args.model_args)
        return 0
    rows = [row for ranks in args.ranks for row in launch(ranks, args.cases, args.model_args)]
    print(table(rows, args.detail))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
