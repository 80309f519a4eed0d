"""Loss and learning-rate curves, one line per run, from train.py run directories or wandb CSV exports.

    python scripts/plot_curves.py runs/compare/*                           # -> runs/plots/curves_*.png
    python scripts/plot_curves.py runs/compare/* --output docs/figures/compare_small
    python scripts/plot_curves.py --wandb-csv export.csv --output runs/plots/dion_160m --title "160M, FineWeb"

Writes, under the --output prefix (default runs/plots/curves; figures under docs/ change only when --output names
them): `_val_vs_step.png` and `_val_vs_time.png` (validation loss; vs time when some source has wall time),
`_train_vs_step.png` (training loss) and `_lr_vs_step.png` (learning rate) when the runs logged them. Prints a
Markdown table comparing the runs (steps done and planned, final and best validation loss, final training loss,
time), best first.

A run is marked unfinished (in the legend with its last step, a cross at its end, and in the table) when it has
fewer steps than its config.yaml's schedule.num_iterations, or, without a config, than the longest run. The loss
axes zoom on where the runs end: from the lowest loss to a little above the band of final losses, leaving out a run
that ends far above the others (named in the legend as off scale); --full-range shows everything, --ylim sets it.

A run directory (or a metrics.jsonl path) is named after its directory. A wandb CSV export is either a chart export
(a `Step` column and one `<run> - val_loss` column per run; the `__MIN`/`__MAX` columns are ignored) or a
run-history export (`_step` and `val_loss` columns, named after the file); wall time comes from a `time` column
(train.py's logged training time) or `_runtime`.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib
import yaml

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


DEFAULT_OUTPUT = Path("runs/plots/curves")
OFF_SCALE_SPREADS = 3  # a run whose final loss is this many spreads above the median is left off the zoomed axis


@dataclass
class Curve:
    """One run: validation losses at increasing steps (`seconds`: their wall time, None where the source has none),
    training losses and learning rates at their steps, the last step logged and the planned number of steps
    (schedule.num_iterations; None when unknown)."""
    name: str
    steps: list[int]
    losses: list[float]
    seconds: list[float] | None
    train_steps: list[int] = field(default_factory=list)
    train_losses: list[float] = field(default_factory=list)
    lrs: list[float] = field(default_factory=list)
    last_step: int = 0
    planned_steps: int | None = None
    finished: bool = True

    def __post_init__(self):
        self.last_step = max([self.last_step, *self.steps, *self.train_steps])


def planned_steps(run_dir: Path) -> int | None:
    """schedule.num_iterations of the run's config.yaml, None without one."""
    config = run_dir / "config.yaml"
    if not config.is_file():
        return None
    steps = (yaml.safe_load(config.read_text()) or {}).get("schedule", {}).get("num_iterations")
    return int(steps) if steps is not None else None


def read_run(path: Path) -> Curve:
    """A train.py run: validation losses, training losses and learning rates from run_dir/metrics.jsonl, the planned
    steps from run_dir/config.yaml."""
    metrics = path / "metrics.jsonl" if path.is_dir() else path
    if not metrics.is_file():
        raise FileNotFoundError(f"no metrics.jsonl at {metrics}")
    records = sorted((json.loads(line) for line in metrics.read_text().splitlines() if line.strip()),
                     key=lambda r: r["step"])
    validated = [r for r in records if "val_loss" in r]
    trained = [r for r in records if "train_loss" in r]
    if not validated and not trained:
        raise ValueError(f"{metrics}: no record has a val_loss or a train_loss")
    return Curve(metrics.parent.name, [r["step"] for r in validated], [r["val_loss"] for r in validated],
                 [r["time"] for r in validated] if all("time" in r for r in validated) else None,
                 train_steps=[r["step"] for r in trained], train_losses=[r["train_loss"] for r in trained],
                 lrs=[r.get("lr", math.nan) for r in trained], planned_steps=planned_steps(metrics.parent))


def mark_unfinished(curves: list[Curve]) -> None:
    """A run is unfinished when it stopped before its planned steps, or (plan unknown) before the longest run."""
    longest = max(curve.last_step for curve in curves)
    for curve in curves:
        curve.finished = curve.last_step >= (curve.planned_steps if curve.planned_steps is not None else longest)


def tail_value(values: list[float]) -> float:
    """Where a curve ends: the median of its last tenth (at least one point), robust to a noisy last step."""
    return statistics.median(values[-max(1, len(values) // 10):])


def zoomed_range(series: dict[str, list[float]]) -> tuple[tuple[float, float] | None, list[str]]:
    """A y range showing where the runs end, and the runs left off it. A run is off scale when it ends more than
    OFF_SCALE_SPREADS x (median final - best final) above the median final. The range runs from the lowest value of
    the other runs to their highest final plus twice the band between the two (so the approach to the band stays
    visible), no higher than their highest value."""
    finals = {name: tail_value(values) for name, values in series.items() if values}
    if not finals:
        return None, []
    median = statistics.median(finals.values())
    spread = max(median - min(finals.values()), 0.01 * abs(median), 1e-6)
    off_scale = [name for name, final in finals.items() if final > median + OFF_SCALE_SPREADS * spread]
    kept = [name for name in finals if name not in off_scale]
    low = min(min(series[name]) for name in kept)
    top = max(finals[name] for name in kept)
    band = max(top - low, 0.01 * abs(top), 1e-6)
    high = max(min(top + 2 * band, max(max(series[name]) for name in kept)), top + 0.1 * band)
    pad = 0.03 * (high - low)
    return (low - pad, high + pad), off_scale


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


def label(curve: Curve) -> str:
    if curve.finished:
        return curve.name
    return f"{curve.name} (unfinished: step {curve.last_step} of {curve.planned_steps or 'the longest run'})"


def plot(curves: list[Curve], series: dict[str, tuple[list, list[float]]], path: Path, xlabel: str, ylabel: str,
         title: str, ylim: tuple[float, float] | None, off_scale: list[str] = ()) -> None:
    """One line per run (`series`: run name -> (xs, ys)); distinct saturated colors (tab10), then line styles."""
    figure, axes = plt.subplots(figsize=(8, 5), dpi=120)
    colors = plt.get_cmap("tab10").colors
    for index, curve in enumerate(curves):
        if curve.name not in series or not series[curve.name][0]:
            continue
        xs, ys = series[curve.name]
        name = label(curve) + (f" (off scale: ends at {ys[-1]:.2f})" if curve.name in off_scale else "")
        line, = axes.plot(xs, ys, marker="." if len(xs) <= 50 else None, linewidth=1.3, label=name,
                          color=colors[index % 10], linestyle=("-", "--", "-.", ":")[index // 10 % 4])
        if not curve.finished:
            axes.plot(xs[-1:], ys[-1:], marker="x", markersize=9, color=line.get_color())
    if ylim is not None:
        axes.set_ylim(*ylim)
    axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
    axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=7, ncol=2)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    plt.close(figure)


def summary_table(curves: list[Curve]) -> str:
    """Markdown, best first: by final validation loss, then (runs without validation) by final training loss."""
    def key(curve: Curve):
        return (not curve.losses, curve.losses[-1] if curve.losses else tail_value(curve.train_losses))

    def number(values: list[float], reduce) -> str:
        return f"{reduce(values):.4f}" if values else "n/a"

    lines = ["| run | steps | planned | status | final val loss | best val loss | final train loss | "
             "training time (s) |", "|---|---:|---:|---|---:|---:|---:|---:|"]
    for curve in sorted(curves, key=key):
        seconds = f"{curve.seconds[-1]:.0f}" if curve.seconds else "n/a"
        planned = curve.planned_steps if curve.planned_steps is not None else "n/a"
        lines.append(f"| {curve.name} | {curve.last_step} | {planned} | "
                     f"{'finished' if curve.finished else 'unfinished'} | {number(curve.losses, lambda v: v[-1])} | "
                     f"{number(curve.losses, min)} | {number(curve.train_losses, tail_value)} | {seconds} |")
    return "\n".join(lines)


def draw_all(curves: list[Curve], output: Path, title: str, ylim, full_range: bool) -> list[Path]:
    """Every figure the sources allow; returns the files written."""
    written = []

    def loss_figure(suffix: str, series: dict[str, tuple[list, list[float]]], xlabel: str, ylabel: str) -> None:
        if not any(xs for xs, _ in series.values()):
            return
        limits, off_scale = ylim, []
        if ylim is None and not full_range:
            limits, off_scale = zoomed_range({name: ys for name, (_, ys) in series.items()})
            if off_scale:
                print(f"{ylabel}: off the zoomed scale: {', '.join(off_scale)} (--full-range shows them)")
        path = Path(f"{output}{suffix}")
        plot(curves, series, path, xlabel, ylabel, title, limits, off_scale)
        written.append(path)

    loss_figure("_val_vs_step.png", {c.name: (c.steps, c.losses) for c in curves}, "step", "validation loss")
    timed = {c.name: (c.seconds, c.losses) for c in curves if c.seconds is not None}
    if timed:
        loss_figure("_val_vs_time.png", timed, "training wall time (s)", "validation loss")
    else:
        print("no source has wall time: no _val_vs_time.png", file=sys.stderr)
    loss_figure("_train_vs_step.png", {c.name: (c.train_steps, c.train_losses) for c in curves}, "step",
                "training loss")
    lrs = {c.name: (c.train_steps, c.lrs) for c in curves if any(math.isfinite(x) for x in c.lrs)}
    if lrs:
        path = Path(f"{output}_lr_vs_step.png")
        plot(curves, lrs, path, "step", "learning rate", title, None)
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="*", type=Path, help="run directories (or metrics.jsonl files)")
    parser.add_argument("--wandb-csv", nargs="+", type=Path, default=[], help="wandb CSV exports")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT,
                        help=f"PNG path prefix (default {DEFAULT_OUTPUT})")
    parser.add_argument("--title", default="")
    parser.add_argument("--ylim", nargs=2, type=float, metavar=("LOW", "HIGH"), help="loss-axis range")
    parser.add_argument("--full-range", action="store_true", help="do not zoom the loss axes")
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
    mark_unfinished(curves)
    outputs = draw_all(curves, args.output, args.title, args.ylim, args.full_range)
    print(summary_table(curves))
    print("\nwrote " + ", ".join(map(str, outputs)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
