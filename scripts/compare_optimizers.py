"""Run a set of optimizer configs on the same model, data and token budget, one train.py subprocess per run.

    python scripts/compare_optimizers.py                                  # configs/compare/small.yaml, every run
    python scripts/compare_optimizers.py --only adamw muon dion_r1 --dry-run
    python scripts/plot_curves.py runs/compare/*                             # -> runs/plots/curves_*.png
    python scripts/compare_optimizers.py --base configs/dion_160m.yaml --runs configs/compare/160m_runs.yaml \
        --output runs/compare_160m --launcher "torchrun --standalone --nproc_per_node=8"     # GPUs, FineWeb 10B

`--base` is a train.py config (model, data, schedule, budget); `--runs` is a YAML mapping from a run name to the
config sections that differ from the base (e.g. `dion_r1_4: {optimizer: {name: dion, rank_fraction: 0.25}}`). Each run writes
`<output>/<name>/metrics.jsonl`. A run whose metrics already reach the base's `num_iterations` is skipped, so the
command can be restarted after an interruption (an unfinished run starts over unless it has checkpoints, in which
case train.py resumes it).
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import yaml

from trainer.config import build_config

ROOT = Path(__file__).resolve().parents[1]

DEFAULT_BASE = ROOT / "configs" / "compare" / "small.yaml"
DEFAULT_RUNS = ROOT / "configs" / "compare" / "small_runs.yaml"


def load_runs(path: Path) -> dict[str, dict]:
    """The run table: name -> overrides; every value must be a mapping of train.py keys. An entry may carry
    `sweep: {dotted.key: [values]}` and `seeds: [..]`: it then stands for one run per combination, named
    `<name>_<key><value>_s<seed>` (see expand_sweep)."""
    if not path.is_file():
        raise FileNotFoundError(f"--runs: no such file {path}")
    runs = yaml.safe_load(path.read_text()) or {}
    if not isinstance(runs, dict):
        raise ValueError(f"--runs: {path} must be a mapping from run name to config overrides")
    expanded = {}
    for name, overrides in runs.items():
        if not isinstance(overrides, dict):
            raise ValueError(f"--runs: run {name!r} in {path} must map to a mapping of config keys, got {overrides!r}")
        expanded.update(expand_sweep(name, overrides))
    return expanded


def expand_sweep(name: str, overrides: dict) -> dict[str, dict]:
    """`name` alone, or one run per (swept value, seed): `{optimizer: {name: adamw}, sweep: {optimizer.lr: [1e-3,
    3e-3]}, seeds: [0, 1]}` gives adamw_lr0.001_s0, adamw_lr0.001_s1, adamw_lr0.003_s0, ... Each run's overrides
    record its group (`name`) under the private key `_group`."""
    overrides = dict(overrides)
    sweep, seeds = overrides.pop("sweep", None), overrides.pop("seeds", None)
    if sweep is None and seeds is None:
        return {name: overrides}
    if sweep is not None and (not isinstance(sweep, dict) or len(sweep) != 1):
        raise ValueError(f"--runs: {name}: sweep must map one dotted key to a list of values, got {sweep!r}")
    key, values = next(iter(sweep.items())) if sweep else (None, [None])
    out = {}
    for value in values:
        for seed in seeds if seeds is not None else [None]:
            run = _with_dotted(overrides, key, value) if key else dict(overrides)
            label = name + (f"_{key.rsplit('.', 1)[-1]}{value:g}" if key else "")
            if seed is not None:
                run["seed"], label = seed, f"{label}_s{seed}"
            run["_group"] = name
            out[label] = run
    return out


def _with_dotted(overrides: dict, dotted: str, value) -> dict:
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in overrides.items()}
    node = out
    *parents, leaf = dotted.split(".")
    for part in parents:
        node = node.setdefault(part, {})
    node[leaf] = value
    return out


def final_val_loss(run_dir: Path) -> float | None:
    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file():
        return None
    losses = [json.loads(line).get("val_loss") for line in metrics.read_text().splitlines() if line.strip()]
    losses = [x for x in losses if x is not None]
    return losses[-1] if losses else None


def summarize(runs: dict[str, dict], output: Path) -> str:
    """Markdown: per group and learning rate, the final validation loss over seeds (mean +- sample std, n), then
    each group at its best learning rate (lowest mean), best first."""
    import statistics
    cells: dict[tuple[str, float], list[float]] = {}
    for label, overrides in runs.items():
        group = overrides.get("_group", label)
        lr = (overrides.get("optimizer") or {}).get("lr", float("nan"))
        loss = final_val_loss(output / label)
        if loss is not None:
            cells.setdefault((group, lr), []).append(loss)

    def cell(losses: list[float]) -> str:
        spread = statistics.stdev(losses) if len(losses) > 1 else 0.0
        return f"{statistics.mean(losses):.4f} +- {spread:.4f} (n={len(losses)})"

    lines = ["| run | lr | final val loss (mean +- std over seeds) |", "|---|---|---|"]
    lines += [f"| {group} | {lr:g} | {cell(losses)} |" for (group, lr), losses in cells.items()]
    best: dict[str, tuple[float, list[float]]] = {}
    for (group, lr), losses in cells.items():
        if group not in best or statistics.mean(losses) < statistics.mean(best[group][1]):
            best[group] = (lr, losses)
    lines += ["", "| run | best lr | final val loss (mean +- std over seeds) |", "|---|---|---|"]
    ranked = sorted(best.items(), key=lambda item: statistics.mean(item[1][1]))
    lines += [f"| {group} | {lr:g} | {cell(losses)} |" for group, (lr, losses) in ranked]
    return "\n".join(lines)


def override_arguments(overrides: dict, prefix: str = "") -> list[str]:
    """`--section.key value` pairs (nested mappings become dotted keys); values as one-line YAML (train.py parses
    command-line values as YAML)."""
    arguments = []
    for key, value in overrides.items():
        if isinstance(value, dict):
            arguments += override_arguments(value, f"{prefix}{key}.")
            continue
        text = value if isinstance(value, str) else yaml.safe_dump(value, default_flow_style=True, width=10 ** 6)
        arguments += [f"--{prefix}{key}", text.strip().removesuffix("...").strip()]
    return arguments


def train_command(base: Path, run_dir: Path, overrides: dict, launcher: str | None = None) -> list[str]:
    """`python train.py ...`, or `<launcher> train.py ...` (e.g. "torchrun --standalone --nproc_per_node=8")."""
    prefix = shlex.split(launcher) if launcher else [sys.executable]
    return [*prefix, str(ROOT / "train.py"), "--config", str(base), *override_arguments(overrides),
            "--run_dir", str(run_dir)]


def finished_steps(run_dir: Path) -> int:
    """The last step recorded in run_dir/metrics.jsonl (0 when there is none)."""
    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file():
        return 0
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines() if line.strip()]
    return max(steps, default=0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", type=Path, default=DEFAULT_BASE, help="train.py config shared by every run")
    parser.add_argument("--runs", type=Path, default=DEFAULT_RUNS, help="YAML: run name -> config overrides")
    parser.add_argument("--output", type=Path, default=Path("runs/compare"), help="one run_dir per run under here")
    parser.add_argument("--only", nargs="+", metavar="NAME", help="run only these names of the run table")
    parser.add_argument("--launcher", help="command that starts train.py instead of python (e.g. torchrun ...)")
    parser.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS for every run")
    parser.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    parser.add_argument("--summary", action="store_true", help="print the table of final validation losses of the "
                                                               "runs found under --output, run nothing")
    args = parser.parse_args(argv)
    try:
        runs = load_runs(args.runs)
        if not args.base.is_file():
            raise FileNotFoundError(f"--base: no such file {args.base}")
        groups = {overrides.get("_group", name) for name, overrides in runs.items()}
        unknown = sorted(set(args.only or []) - set(runs) - groups)
        if unknown:
            raise ValueError(f"--only: unknown run(s) {', '.join(unknown)}; allowed: {', '.join(runs)}")
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.summary:
        print(summarize(runs, args.output))
        return 0
    total_steps = build_config(["--config", str(args.base)]).schedule.num_iterations
    selected = [name for name, overrides in runs.items()
                if args.only is None or name in args.only or overrides.get("_group") in args.only]
    env = dict(os.environ, WANDB_MODE=os.environ.get("WANDB_MODE", "disabled"))
    if args.threads is not None:
        env["OMP_NUM_THREADS"] = str(args.threads)
    failed = []
    for name in selected:
        run_dir = args.output / name
        overrides = {k: v for k, v in runs[name].items() if k != "_group"}
        steps_to_run = (overrides.get("schedule") or {}).get("num_iterations", total_steps)
        command = train_command(args.base, run_dir, overrides, args.launcher)
        if finished_steps(run_dir) >= steps_to_run:
            print(f"skip {name}: {run_dir} already reached step {steps_to_run}")
            continue
        shown = shlex.join(command if args.launcher else ["python", *command[1:]])
        print(shown if args.dry_run else f"run {name}: {shown}", flush=True)
        if args.dry_run:
            continue
        started = time.perf_counter()
        result = subprocess.run(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                text=True)
        if result.returncode != 0:
            failed.append(name)
            last = result.stderr.strip().splitlines()[-1:] or ["(no output)"]
            print(f"failed {name} (exit {result.returncode}): {last[0]}", flush=True)
        else:
            print(f"done {name} in {time.perf_counter() - started:.0f} s", flush=True)
    if failed:
        print(f"error: {len(failed)} run(s) failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
