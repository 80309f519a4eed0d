"""Validation loss vs step and vs wall time, one line per run, from train.py run directories or wandb CSV exports.

    python scripts/plot_curves.py runs/compare/* --output docs/figures/compare_small
    python scripts/plot_curves.py --wandb-csv export.csv --output docs/figures/dion_160m --title "160M, FineWeb"

Writes `<output>_val_vs_step.png` and `<output>_val_vs_time.png` (when some source has wall time) and prints a
Markdown table of the final and best validation loss of each run. A run directory (or a metrics.jsonl path) is
named after its directory. A wandb CSV export is either a chart export (a `Step` column and one `<run> - val_loss`
column per run; the `__MIN`/`__MAX` columns are ignored) or a run-history export (`_step` and `val_loss` columns,
named after the file); wall time comes from a `time` column (train.py's logged training time) or `_runtime`.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


@dataclass
class Curve:
    """Validation losses of one run at increasing steps; `seconds` is None where the source has no wall time."""
    name: str
    steps: list[int]
    losses: list[float]
    seconds: list[float] | None


def read_run(path: Path) -> Curve:
    """A train.py run: the records of run_dir/metrics.jsonl that carry a val_loss."""
    metrics = path / "metrics.jsonl" if path.is_dir() else path
    if not metrics.is_file():
        raise FileNotFoundError(f"no metrics.jsonl at {metrics}")
    records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    validated = sorted((r for r in records if "val_loss" in r), key=lambda r: r["step"])
    if not validated:
        raise ValueError(f"{metrics}: no record has a val_loss (was val_loss_every 0?)")
    return Curve(metrics.parent.name, [r["step"] for r in validated], [r["val_loss"] for r in validated],
                 [r["time"] for r in validated])


def _number(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def read_wandb_csv(path: Path) -> list[Curve]:
    """Curves of a wandb chart export (`<run> - val_loss` columns) or run-history export (`val_loss` column)."""
    if not path.is_file():
        raise FileNotFoundError(f"--wandb-csv: no such file {path}")
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    columns = list(rows[0]) if rows else []
    step_column = next((c for c in ("Step", "_step", "step") if c in columns), None)
    if step_column is None:
        raise ValueError(f"{path}: no step column (Step, _step or step); columns: {', '.join(columns)}")
    time_column = next((c for c in ("time", "_runtime") if c in columns), None)
    loss_columns = {c.removesuffix(" - val_loss"): c for c in columns if c.endswith(" - val_loss")}
    if "val_loss" in columns:
        loss_columns[path.stem] = "val_loss"
    if not loss_columns:
        raise ValueError(f"{path}: no val_loss column; columns: {', '.join(columns)}")
    curves = []
    for name, column in loss_columns.items():
        points = [(int(float(row[step_column])), _number(row[column]),
                   _number(row[time_column]) if time_column else None) for row in rows]
        points = [p for p in points if p[1] is not None]
        seconds = [p[2] for p in points] if time_column and all(p[2] is not None for p in points) else None
        curves.append(Curve(name, [p[0] for p in points], [p[1] for p in points], seconds))
    return curves


def plot(curves: list[Curve], x: str, path: Path, title: str, ylim: tuple[float, float] | None) -> None:
    figure, axes = plt.subplots(figsize=(8, 5), dpi=120)
    colors = plt.get_cmap("tab20").colors
    for index, curve in enumerate(curves):
        xs = curve.steps if x == "step" else curve.seconds
        if xs is not None:
            axes.plot(xs, curve.losses, marker=".", linewidth=1.3, label=curve.name, color=colors[index % 20],
                      linestyle=("-", "--", ":")[index // 20 % 3])
    if ylim is not None:
        axes.set_ylim(*ylim)
    axes.set_xlabel("step" if x == "step" else "training wall time (s)")
    axes.set_ylabel("validation loss")
    axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=7, ncol=2)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    plt.close(figure)


def summary_table(curves: list[Curve]) -> str:
    lines = ["| run | steps | final val loss | best val loss | training time (s) |", "|---|---:|---:|---:|---:|"]
    for curve in sorted(curves, key=lambda c: c.losses[-1]):
        seconds = f"{curve.seconds[-1]:.0f}" if curve.seconds else "n/a"
        lines.append(f"| {curve.name} | {curve.steps[-1]} | {curve.losses[-1]:.4f} | {min(curve.losses):.4f} | "
                     f"{seconds} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="*", type=Path, help="run directories (or metrics.jsonl files)")
    parser.add_argument("--wandb-csv", nargs="+", type=Path, default=[], help="wandb CSV exports")
    parser.add_argument("--output", type=Path, required=True, help="PNG path prefix")
    parser.add_argument("--title", default="validation loss")
    parser.add_argument("--ylim", nargs=2, type=float, metavar=("LOW", "HIGH"), help="y-axis range (zoom in)")
    args = parser.parse_args(argv)
    try:
        if not args.runs and not args.wandb_csv:
            raise ValueError("give run directories and/or --wandb-csv files")
        has_metrics = [(path.is_file() and path.suffix == ".jsonl") or (path / "metrics.jsonl").is_file()
                       for path in args.runs]
        curves = [read_run(path) for path, ok in zip(args.runs, has_metrics) if ok]
        missing = [str(path) for path, ok in zip(args.runs, has_metrics) if not ok]
        if missing:
            print(f"skipped (no metrics.jsonl): {', '.join(missing)}", file=sys.stderr)
        for path in args.wandb_csv:
            curves += read_wandb_csv(path)
        if not curves:
            raise ValueError("none of the given runs has a metrics.jsonl")
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    outputs = [Path(f"{args.output}_val_vs_step.png")]
    plot(curves, "step", outputs[0], args.title, args.ylim)
    if any(curve.seconds is not None for curve in curves):
        outputs.append(Path(f"{args.output}_val_vs_time.png"))
        plot(curves, "time", outputs[1], args.title, args.ylim)
    else:
        print("no source has wall time: no _val_vs_time.png", file=sys.stderr)
    print(summary_table(curves))
    print("\nwrote " + ", ".join(map(str, outputs)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
