"""Optimizer-step time of every registered optimizer against this machine's measured limits, plus the training loop.

    python scripts/bench_optimizers.py                          # d=384, 4 layers ("tiny" preset), CPU, 2 threads
    python scripts/bench_optimizers.py --preset 160m --device cuda --markdown > bench.md
    python scripts/bench_optimizers.py --optimizers dion muon --profile dion_r1
    python scripts/bench_optimizers.py --results runs/bench.jsonl   # resumable: rerun to finish what is missing

Rows are printed as each case completes. With --results FILE.jsonl each measured row is also appended to FILE; a
rerun with the same file (and the same preset, device, repeats, warm-up and threads) reuses the rows already there
and measures only the missing cases, so an interrupted run loses at most the case it was in.

1. Limits: matmul throughput at the exact product shapes each optimizer runs (batched as the optimizers batch
   them; median of --repeats; fp32, bf16 for the cases that multiply in bf16: muon_bf16 and torch.optim.Muon), and copy bandwidth (dst.copy_(src), read + write bytes) over a buffer as large as the
   benchmarked parameter set; printed once at the start and measured again right after each case's steps (the
   ratio of a case uses its own), since on a shared machine the limit drifts within minutes.
2. Step time: median of --repeats `optimizer.step()` calls after --warmup, synchronized on CUDA, gradients set once.
   Matrix optimizers (Dion, Muon, Shampoo, SOAP) get the 2D block matrices of the preset: per layer q, k, v, o
   (d x d) and the MLP (4d x d, d x 4d). Element-wise optimizers get every parameter of the model (embedding, LM head,
   block matrices, norm gains). Registered optimizers are built through the registry with the context defaults.
   - Dion (8 m n r per matrix for B Q, B^T P, P R^T, P Q^T, plus rcqr: S P, the QR of S P, two triangular solves and
     P^T P; Householder QR for a square P) and Muon (5 Newton-Schulz iterations of X X^T, A A, B X on X = the
     update with rows <= columns) report FLOP/s as a fraction of the matmul limit: the time the same products take
     as bare matmuls / step time.
   - Element-wise optimizers report bytes/s as a fraction of copy bandwidth, counting the least traffic a step needs:
     read parameters and gradients, write parameters, read and write every state tensor once.
3. The step time vs rank fraction (Dion) and selected fraction (Dion2, NorDion2), optimizer-state bytes per
   parameter (Dion: expected m n + n r per matrix), and tokens/s of train.py's loop vs a minimal loop (same model, optimizer and batches; no logging, validation or
   checkpoints), alternated --loop-repeats times in this process on the configs/default.yaml model.
4. Every target of the performance issue with PASS/SHORT and the measured ratio.

`--collectives` prints only the bytes each collective moves per step for the orthonormal family (DDP and FSDP2 at 2
and 4 gloo ranks, measured against the formula in scripts/bench_collectives.py).

`--profile NAME` prints a torch.profiler table of one step of benchmark case NAME (e.g. dion_r1, muon, lion) as
evidence of what bounds it.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import io
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from data import DistributedTokenLoader
from models import GPT, PRESETS
from optimizers.common.tensors import state_bytes
from optimizers.dion.linalg import low_rank_dim, sketch_rows
from optimizers.registry import OPTIMIZERS, OptimizerContext, ScalarPolicy, build_optimizer
from trainer.build import build_model, build_training_optimizer, data_files, micro_batch_size
from trainer.config import build_config
from trainer.distributed import init_distributed
from trainer.loop import Trainer
from trainer.results_file import ResultsFile, ResultsFileError
from trainer.runtime import synchronize

RANK_FRACTIONS = (1.0, 0.5, 0.25, 0.125)
REFERENCE = "torch.optim.AdamW(foreach)"  # element-wise step times are also given relative to this case
DION_NAMES = ("dion", "dion_async", "dion_reference")
# Orthogonalize a fraction of each matrix's rows (columns if tall); benchmarked at the same fractions as Dion's rank.
SELECTION_NAMES = ("dion2", "nordion2")
PRECONDITIONED = ("shampoo", "soap")
NS_STEPS = 5
RCQR_OVERSAMPLE = 1.25
FLOAT_BYTES = 4

# (count, m, k, n): `count` m x k @ k x n products, 2 count m k n FLOPs; timed as one batched matmul, as the
# optimizers stack same-shape matrices.
Product = tuple[int, int, int, int]


@dataclass
class Case:
    """One benchmarked optimizer: `label` names the row, `name` the registry entry (or a torch.optim reference),
    `kind` is "matrix" (FLOP-counted), "elementwise" (byte-counted) or "preconditioned" (time and memory only)."""
    label: str
    name: str
    kind: str
    make: Callable[[dict[str, list[torch.Tensor]]], torch.optim.Optimizer]
    rank_fraction: float | None = None
    products: list[Product] = field(default_factory=list)
    matmul_dtype: torch.dtype = torch.float32  # dtype of the products (the limit is measured in it)


@dataclass
class Result:
    case: Case
    seconds: float
    parameters: int
    state: int
    efficiency: float | None = None
    rate: float | None = None
    limit: float | None = None


def median_seconds(fn: Callable[[], object], device: torch.device, warmup: int, repeats: int) -> float:
    times = []
    for _ in range(warmup + repeats):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times[warmup:])


class MatmulLimit:
    """Measured seconds of bare (batched) matmuls in `dtype` (fp32 by default), cached per product shape."""

    def __init__(self, device: torch.device, warmup: int, repeats: int, dtype: torch.dtype = torch.float32):
        self.device, self.warmup, self.repeats, self.dtype = device, warmup, repeats, dtype
        self.cache: dict[Product, float] = {}

    def seconds(self, product: Product) -> float:
        if product not in self.cache:
            count, m, k, n = product
            a = torch.randn(count, m, k, device=self.device, dtype=self.dtype)
            b = torch.randn(count, k, n, device=self.device, dtype=self.dtype)
            self.cache[product] = median_seconds(lambda: torch.bmm(a, b), self.device, self.warmup, self.repeats)
        return self.cache[product]

    def total_seconds(self, products: list[Product]) -> float:
        return sum(self.seconds(p) for p in products)


def copy_bandwidth(numel: int, device: torch.device, warmup: int, repeats: int) -> float:
    """Bytes/s of dst.copy_(src) over `numel` fp32 elements, counting the read and the write."""
    src = torch.randn(numel, device=device)
    dst = torch.empty_like(src)
    return 2 * numel * FLOAT_BYTES / median_seconds(lambda: dst.copy_(src), device, warmup, repeats)


def flops(products: list[Product]) -> int:
    return sum(2 * count * m * k * n for count, m, k, n in products)


def batched(products: list[tuple[int, int, int]]) -> list[Product]:
    """Equal (m, k, n) products merged into one (count, m, k, n) entry."""
    return [(count, *shape) for shape, count in sorted(Counter(products).items())]


def dion_products(shapes: list[tuple[int, int]], rank_fraction: float) -> list[Product]:
    """Dion's matmuls per matrix in its orientation (rows m >= columns n, rank r): P = B Q, R = B^T P, the error
    feedback P R^T and the update P Q^T (2 m n r each, 8 m n r in all); then rcqr with a k-row sketch: S P (2 k m r),
    the QR of S P (about 2 k r^2, counted as a k x r x r product), P R1^-1 and P1 R2^-1 (m r^2 each), P1^T P1
    (2 m r^2). A square P (m = r) takes Householder QR instead (about 8/3 m^3 with Q formed; counted as 2 m^3, so
    the efficiency is not overstated)."""
    products = []
    for shape in shapes:
        m, n = max(shape), min(shape)
        r = low_rank_dim(m, n, rank_fraction, 1)
        k = sketch_rows(r, RCQR_OVERSAMPLE)
        products += [(m, n, r), (n, m, r), (m, r, n), (m, r, n)]
        if m > r:
            products += [(k, m, r), (k, r, r), (m, r, r // 2), (m, r, r // 2), (r, m, r)]
        else:
            products.append((m, r, r))
    return batched(products)


def newton_schulz_products(shapes: list[tuple[int, int]]) -> list[Product]:
    """Per iteration on X (a x b, a <= b): A = X X^T (2 a^2 b), A A (2 a^3), (b A + c A A) X (2 a^2 b)."""
    products = []
    for shape in shapes:
        a, b = min(shape), max(shape)
        products += [(a, b, a), (a, a, a), (a, a, b)]
    return [(count * NS_STEPS, m, k, n) for count, m, k, n in batched(products)]


def selected_shapes(shapes: list[tuple[int, int]], fraction: float, rows_only: bool) -> list[tuple[int, int]]:
    """The submatrix Dion2 (rows if m <= n, else columns) or NorDion2 (rows) orthogonalizes at `fraction`."""
    selected = []
    for m, n in shapes:
        if rows_only or m <= n:
            selected.append((max(1, math.ceil(fraction * m)), n))
        else:
            selected.append((m, max(1, math.ceil(fraction * n))))
    return selected


def dion_expected_state_bytes(shapes: list[tuple[int, int]], rank_fraction: float) -> int:
    """Momentum m x n plus Q n x r (n = the smaller side) per matrix, fp32."""
    total = 0
    for m, n in shapes:
        r = low_rank_dim(max(m, n), min(m, n), rank_fraction, 1)
        total += m * n + min(m, n) * r
    return total * FLOAT_BYTES


def context(groups: dict[str, list[torch.Tensor]], model_dim: int, state_dtype: torch.dtype = torch.float32,
            **options) -> OptimizerContext:
    """The registry's defaults for each optimizer, with `options` on top."""
    return OptimizerContext.from_groups(groups, model_dim=model_dim, tokens_per_step=8 * 1024, options=options,
                                        state_dtype=state_dtype)


def build_cases(names: list[str], model_dim: int, shapes: list[tuple[int, int]],
                precision: str = "default") -> list[Case]:
    """The benchmark rows for the selected registry names (and their torch.optim references). precision
    "float32" / "bfloat16": the states of optimizers with low-precision states (Dion) and the Newton-Schulz /
    Polar Express products of the orthonormal family in that dtype; "default": each optimizer's own defaults."""
    from optimizers.registry import option_fields

    def registry(name: str, **options):
        state_dtype = torch.float32
        if precision != "default":
            state_dtype = getattr(torch, precision) if OPTIMIZERS[name].low_precision_states else torch.float32
            if "ns_dtype" in option_fields(name):
                options.setdefault("ns_dtype", precision)
        return lambda groups: build_optimizer(name, context(groups, model_dim, state_dtype, **options))

    ns_matmul = torch.bfloat16 if precision == "bfloat16" else torch.float32

    cases = []
    for name in names:
        if name in DION_NAMES:
            for fraction in RANK_FRACTIONS:
                cases.append(Case(f"{name}_r{fraction:g}", name, "matrix", registry(name, rank_fraction=fraction),
                                  fraction, dion_products(shapes, fraction)))
        elif name in SELECTION_NAMES:
            # Polar Express has Newton-Schulz's products (5 quintic iterations) on the selected submatrix.
            for fraction in RANK_FRACTIONS:
                selected = selected_shapes(shapes, fraction, rows_only=name == "nordion2")
                cases.append(Case(f"{name}_r{fraction:g}", name, "matrix",
                                  registry(name, fraction=fraction), fraction,
                                  newton_schulz_products(selected), matmul_dtype=ns_matmul))
        elif name == "muon":
            ns = newton_schulz_products(shapes)
            # torch.optim.Muon runs Newton-Schulz in bfloat16: its limit is the bf16 matmul throughput.
            cases += [Case("muon", name, "matrix", registry(name), products=ns, matmul_dtype=ns_matmul),
                      Case("muon_bf16", name, "matrix", registry(name, ns_dtype="bfloat16"),
                           products=ns, matmul_dtype=torch.bfloat16),
                      Case("torch.optim.Muon", name, "matrix",
                           lambda groups: torch.optim.Muon(groups["matrix"], lr=0.02, momentum=0.95),
                           products=ns, matmul_dtype=torch.bfloat16)]
        elif name == "adamw":
            # The default takes torch's fused kernel on plain tensors; adamw_foreach forces the (cache-tiled)
            # foreach path that DTensors and mixed dtypes take.
            cases += [Case("adamw", name, "elementwise", registry(name)),
                      Case("adamw_foreach", name, "elementwise", registry(name, fused=False)),
                      Case(REFERENCE, name, "elementwise",
                           lambda groups: torch.optim.AdamW(_all(groups), foreach=True)),
                      Case("torch.optim.AdamW(fused)", name, "elementwise",
                           lambda groups: torch.optim.AdamW(_all(groups), fused=True))]
        elif name in PRECONDITIONED:
            cases.append(Case(name, name, "preconditioned", registry(name)))
        else:
            cases.append(Case(name, name, "elementwise" if OPTIMIZERS[name].scalar is ScalarPolicy.SAME else "matrix",
                              registry(name)))
    return sorted(cases, key=lambda case: case.label != REFERENCE)  # first: the rows printed after it use it


def _all(groups: dict[str, list[torch.Tensor]]) -> list[torch.Tensor]:
    return [p for key in ("matrix", "embedding", "lm_head", "vector") for p in groups[key]]


def fresh_parameters(template: dict[str, list[torch.Tensor]], matrices_only: bool, device: torch.device,
                     seed: int = 0) -> dict[str, list[torch.Tensor]]:
    """Leaf copies of the template parameters with a fixed random gradient each (scale 1e-3)."""
    generator = torch.Generator().manual_seed(seed)
    groups = {}
    for key, tensors in template.items():
        groups[key] = []
        if matrices_only and key != "matrix":
            continue
        for t in tensors:
            p = torch.nn.Parameter(t.detach().clone().to(device))
            p.grad = (torch.randn(t.shape, generator=generator) * 1e-3).to(device)
            groups[key].append(p)
    return groups


def run_case(case: Case, template, device, warmup: int, repeats: int) -> Result:
    """Step time of one case, then its limit measured right away (the machine may be shared: a limit taken minutes
    earlier can describe different conditions)."""
    groups = fresh_parameters(template, case.kind != "elementwise", device)
    parameters = sum(p.numel() for p in _all(groups))
    optimizer = case.make(groups)
    seconds = median_seconds(optimizer.step, device, warmup, repeats)
    result = Result(case, seconds, parameters, state_bytes(optimizer))
    del optimizer
    gc.collect()
    if case.kind == "matrix" and case.products:
        matmul_seconds = MatmulLimit(device, warmup, repeats, case.matmul_dtype).total_seconds(case.products)
        result.rate = flops(case.products) / seconds
        result.limit = flops(case.products) / matmul_seconds
        result.efficiency = matmul_seconds / seconds
    elif case.kind == "elementwise":
        moved = 3 * parameters * FLOAT_BYTES + 2 * result.state
        result.rate = moved / seconds
        result.limit = copy_bandwidth(parameters, device, warmup, repeats)
        result.efficiency = result.rate / result.limit
    return result


def profile_case(case: Case, template, device, warmup: int) -> str:
    groups = fresh_parameters(template, case.kind != "elementwise", device)
    optimizer = case.make(groups)
    for _ in range(max(warmup, 1)):
        optimizer.step()
    from torch.profiler import ProfilerActivity, profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as profiler:
        optimizer.step()
        synchronize(device)
    return profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=15)


# ---------------------------------------------------------------- training loop: train.py vs a minimal loop

def loop_config(steps: int, optimizer: str, run_dir: str):
    """configs/default.yaml with logging, validation and checkpoints reduced to the minimum train.py allows."""
    return build_config(["--optimizer", optimizer, "--num_iterations", str(steps), "--logging.log_every", str(steps),
                         "--val_loss_every", "0", "--checkpoint_freq", "0", "--run_dir", run_dir])


def train_py_tokens_per_second(steps: int, optimizer: str) -> float:
    """train.py's Trainer in this process; its metrics' `time` is the summed step time (excluding the final
    checkpoint)."""
    with tempfile.TemporaryDirectory() as run_dir:
        config = loop_config(steps, optimizer, run_dir)
        env = init_distributed(config)
        with contextlib.redirect_stderr(io.StringIO()):
            Trainer(config, env).train()
        last = json.loads((Path(run_dir) / "metrics.jsonl").read_text().splitlines()[-1])
        return last["tokens"] / last["time"]


def minimal_tokens_per_second(steps: int, optimizer: str) -> float:
    """The same model, optimizer and batches as train.py, with nothing but forward, backward, step and zero_grad."""
    with tempfile.TemporaryDirectory() as run_dir:
        config = loop_config(steps, optimizer, run_dir)
        env = init_distributed(config)
        train_files, _ = data_files(config, env)
        device_batch_size, _ = micro_batch_size(config, env)
        model = build_model(config, env.device)
        optimizer_ = build_training_optimizer(model, config, env)
        loader = DistributedTokenLoader(train_files, device_batch_size, config.model.sequence_length)
        elapsed = 0.0
        for _ in range(steps):
            start = time.perf_counter()
            inputs, targets = (t.to(env.device) for t in loader.next_batch())
            model(inputs, targets).backward()
            optimizer_.step()
            optimizer_.zero_grad(set_to_none=True)
            synchronize(env.device)
            elapsed += time.perf_counter() - start
        return steps * config.tokens_per_step / elapsed


# ---------------------------------------------------------------- report

def machine_line(device: torch.device) -> str:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = platform.processor() or "cpu"
        with contextlib.suppress(OSError):
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    load = " ".join(f"{x:.1f}" for x in os.getloadavg())
    return (f"{name}; {os.cpu_count()} cores visible, {torch.get_num_threads()} torch threads, load average {load}; "
            f"torch {torch.__version__}; {time.strftime('%Y-%m-%d %H:%M %Z')}")


class Report:
    """Headings, notes and tables, as Markdown (--markdown) or as aligned plain text, flushed line by line so a
    long run shows each row as it completes (`start_table`, `row`, `end_table`)."""

    def __init__(self, markdown: bool):
        self.markdown = markdown
        self.widths: list[int] = []

    def print(self, text: str) -> None:
        print(text, flush=True)

    def heading(self, text: str, level: int = 2) -> None:
        self.print(f"{'#' * level} {text}\n" if self.markdown else f"{text}\n{'=' * len(text)}")

    def note(self, text: str) -> None:
        self.print(text + "\n")

    def start_table(self, headers: list[str], widths: list[int] | None = None) -> None:
        """Plain-text columns are as wide as `widths` (or the headers); a longer cell widens its own line only."""
        self.widths = [max(len(h), w) for h, w in zip(headers, widths or [0] * len(headers))]
        if self.markdown:
            self.print("| " + " | ".join(headers) + " |")
            self.print("|---|" + "---:|" * (len(headers) - 1))
        else:
            self.row(headers)

    def row(self, cells: list[str]) -> None:
        if self.markdown:
            self.print("| " + " | ".join(cells) + " |")
        else:
            self.print("  ".join(str(x).ljust(w) for x, w in zip(cells, self.widths)).rstrip())

    def end_table(self) -> None:
        self.print("")

    def table(self, headers: list[str], rows: list[list[str]]) -> None:
        self.start_table(headers, [max(len(str(x)) for x in column) for column in zip(headers, *rows)])
        for row in rows:
            self.row(row)
        self.end_table()


def step_time_row(r: Result, reference: Result | None) -> list[str]:
    unit = "GFLOP/s" if r.case.kind == "matrix" else "GB/s"
    achieved = "" if r.rate is None else f"{r.rate / 1e9:.1f} {unit}"
    limit = "" if r.limit is None else f"{r.limit / 1e9:.1f} {unit}"
    efficiency = "" if r.efficiency is None else f"{r.efficiency:.0%}"
    ratio = f"{r.seconds / reference.seconds:.2f}x" if reference and r.case.kind == "elementwise" else ""
    return [r.case.label, f"{r.parameters:,}", f"{1e3 * r.seconds:.1f}", achieved, limit, efficiency, ratio]


def verdict(value: float, bar: float, higher_is_better: bool = True) -> str:
    ok = value >= bar if higher_is_better else value <= bar
    return "PASS" if ok else "SHORT"


def collective_tables(preset: str) -> str:
    """scripts/bench_collectives.py at 2 and 4 gloo ranks: one Markdown table, both world sizes."""
    lines = []
    for world in (2, 4):
        completed = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}",
             str(Path(__file__).with_name("bench_collectives.py")), "--preset", preset],
            env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True)
        if completed.returncode != 0:
            raise RuntimeError(f"bench_collectives.py at {world} ranks failed:\n{completed.stderr[-3000:]}")
        table = [line for line in completed.stdout.splitlines() if line.startswith("|")]
        lines += table if not lines else table[2:]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny", choices=sorted(PRESETS), help="GPT preset (tiny: d=384, 4 layers)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--optimizers", nargs="+", metavar="NAME", help="registry names (default: all)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--loop-steps", type=int, default=10, help="steps per training-loop measurement (0: skip)")
    parser.add_argument("--loop-repeats", type=int, default=2, help="alternations of train.py / minimal loop")
    parser.add_argument("--loop-optimizer", default="dion")
    parser.add_argument("--profile", metavar="CASE", help="print a torch.profiler table of one step of this case")
    parser.add_argument("--collectives", action="store_true",
                        help="only: bytes per collective per step of muon, normuon, dion2, nordion2 at 2 and 4 gloo "
                             "ranks vs the formula (scripts/bench_collectives.py under torchrun)")
    parser.add_argument("--precision", default="default", choices=["default", "float32", "bfloat16"],
                        help="Dion's states and the orthonormal family's Newton-Schulz products in this dtype "
                             "(default: each optimizer's own)")
    parser.add_argument("--markdown", action="store_true", help="emit Markdown tables")
    parser.add_argument("--results", type=Path, metavar="FILE.jsonl",
                        help="append each measured row here; rows already there (same settings) are reused")
    args = parser.parse_args(argv)
    names = args.optimizers or sorted(OPTIMIZERS)
    unknown = sorted(set(names) - set(OPTIMIZERS))
    if unknown or args.repeats < 1 or args.warmup < 0:
        problem = (f"--optimizers: unknown name(s) {', '.join(unknown)}; registered: {', '.join(sorted(OPTIMIZERS))}"
                   if unknown else "--repeats must be >= 1 and --warmup >= 0")
        print(f"error: {problem}", file=sys.stderr)
        return 2
    if args.collectives:
        print(collective_tables(args.preset))
        return 0
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    try:
        store = ResultsFile(args.results, dict(script="bench_optimizers", preset=args.preset, device=str(device),
                                               precision=args.precision, repeats=args.repeats,
                                               warmup=args.warmup, threads=args.threads))
    except ResultsFileError as error:
        print(f"error: --results: {error}", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    model = GPT(PRESETS[args.preset])
    template = model.param_groups()
    shapes = [tuple(p.shape) for p in template["matrix"]]
    total_parameters = sum(p.numel() for p in model.parameters())
    cases = build_cases(names, model.config.model_dim, shapes, args.precision)
    if args.profile is not None:
        chosen = [c for c in cases if c.label == args.profile]
        if not chosen:
            print(f"error: --profile: unknown case {args.profile!r}; cases: {', '.join(c.label for c in cases)}",
                  file=sys.stderr)
            return 2
        print(profile_case(chosen[0], template, device, args.warmup))
        return 0

    report = Report(args.markdown)
    matmul = MatmulLimit(device, args.warmup, args.repeats)
    bandwidth = copy_bandwidth(total_parameters, device, args.warmup, args.repeats)
    distinct = sorted(set(shapes))
    report.heading(f"Optimizer benchmark: preset {args.preset} on {device}, precision {args.precision}", 1)
    report.note(f"Machine: {machine_line(device)}")
    report.note(f"Parameter sets: matrix optimizers {len(shapes)} block matrices {distinct} "
                f"({sum(m * n for m, n in shapes):,} parameters); element-wise optimizers every parameter "
                f"({total_parameters:,}). Warm-up {args.warmup}, median of {args.repeats}.")
    report.heading("Limits at the start of this run (each case re-measures its own, below)")
    limits = [[f"copy bandwidth, {total_parameters * FLOAT_BYTES / 2 ** 20:.0f} MiB buffer (read + write)",
               f"{bandwidth / 1e9:.1f} GB/s"]]
    for m, n in sorted({(max(shape), min(shape)) for shape in shapes}):
        rate = 2 * m * n * n / matmul.seconds((1, m, n, n))
        limits.append([f"fp32 matmul {m}x{n} @ {n}x{n}", f"{rate / 1e9:.1f} GFLOP/s"])
    report.table(["limit", "value"], limits)

    report.heading("Step time")
    report.note("Efficiency: matrix rows = bare-matmul time of the same products / step time (achieved FLOP/s over "
                "the limit: the FLOP/s of those products as bare batched matmuls); element-wise rows = bytes moved / "
                "step time / copy bandwidth over a buffer of the same size. Each limit is measured right after the "
                "case's steps.")
    report.start_table(["optimizer", "parameters", "step ms (median)", "achieved", "limit", "efficiency",
                        "vs torch AdamW(foreach)"], [max(len(c.label) for c in cases), 11, 0, 14, 14, 0, 0])
    results, failed, reference = [], [], None
    for case in cases:
        stored = store.get(case.label)
        if stored is not None:
            result = Result(case, **stored)
            print(f"{case.label}: reused the row in {args.results}", file=sys.stderr, flush=True)
        else:
            try:
                result = run_case(case, template, device, args.warmup, args.repeats)
            except Exception as error:  # an optimizer that cannot run here is reported, not fatal
                failed.append(f"{case.label} not measured: {type(error).__name__}: {str(error).splitlines()[0]}")
                print(failed[-1], file=sys.stderr, flush=True)
                continue
            store.add(case.label, {f.name: getattr(result, f.name) for f in dataclasses.fields(Result)
                                   if f.name != "case"})
        results.append(result)
        reference = result if case.label == REFERENCE else reference
        report.row(step_time_row(result, reference))
    report.end_table()
    for line in failed:
        report.note(line)
    by_label = {r.case.label: r for r in results}

    curve = [(name, [by_label.get(f"{name}_r{f:g}") for f in RANK_FRACTIONS])
             for name in DION_NAMES + SELECTION_NAMES]
    curve = [(name, rows) for name, rows in curve if all(rows)]
    if curve:
        report.heading("Step time vs rank fraction (Dion) and selected fraction (Dion2, NorDion2)")
        report.table(["optimizer"] + [f"r = {f:g}" for f in RANK_FRACTIONS],
                     [[name] + [f"{1e3 * r.seconds:.1f} ms ({r.seconds / rows[0].seconds:.2f})" for r in rows]
                      for name, rows in curve])
        report.note("In parentheses: step time / step time at fraction 1; linear scaling would give "
                    + ", ".join(f"{f:g}" for f in RANK_FRACTIONS) + ".")

    report.heading("Optimizer-state memory")
    rows = []
    for r in results:
        expected = ""
        if r.case.name in DION_NAMES:
            expected = f"{dion_expected_state_bytes(shapes, r.case.rank_fraction) / r.parameters:.3f}"
        rows.append([r.case.label, f"{r.state / 2 ** 20:.1f}", f"{r.state / r.parameters:.3f}", expected])
    report.table(["optimizer", "state MiB", "bytes / parameter", "expected (Dion: m n + n r per matrix)"], rows)

    loop_ratio = None
    if args.loop_steps > 0:
        loop_label = f"training loop: {args.loop_optimizer}, {args.loop_steps} steps x {args.loop_repeats}"
        stored = store.get(loop_label)
        if stored is None:
            stored = {"trained": [], "minimal": []}
            for _ in range(args.loop_repeats):
                stored["minimal"].append(minimal_tokens_per_second(args.loop_steps, args.loop_optimizer))
                stored["trained"].append(train_py_tokens_per_second(args.loop_steps, args.loop_optimizer))
            store.add(loop_label, stored)
        trained, minimal = stored["trained"], stored["minimal"]
        loop_ratio = statistics.median(trained) / statistics.median(minimal)
        report.heading(f"Training loop (configs/default.yaml model, {args.loop_optimizer}, {args.loop_steps} steps, "
                       f"{args.loop_repeats} alternations)")
        report.table(["loop", "tokens/s (median)", "runs"],
                     [["train.py", f"{statistics.median(trained):.0f}", ", ".join(f"{x:.0f}" for x in trained)],
                      ["minimal", f"{statistics.median(minimal):.0f}", ", ".join(f"{x:.0f}" for x in minimal)]])

    targets = []

    def target(label: str, value: float, bar: float, higher_is_better: bool = True) -> None:
        targets.append([verdict(value, bar, higher_is_better), label, f"{value:.2f}",
                        f"{'>=' if higher_is_better else '<='} {bar}"])

    for name in ("dion", "dion_async"):
        for fraction, bar in ((1.0, 0.5), (0.25, 0.35)):
            r = by_label.get(f"{name}_r{fraction:g}")
            if r is not None:
                target(f"{name} rank fraction {fraction:g}: FLOP/s / matmul limit", r.efficiency, bar)
    if "muon" in by_label:
        target("muon: Newton-Schulz FLOP/s / matmul limit", by_label["muon"].efficiency, 0.5)
        torch_muon = by_label.get("torch.optim.Muon")
        if torch_muon is not None:
            for label in ("muon", "muon_bf16"):
                target(f"{label} step time / torch.optim.Muon", by_label[label].seconds / torch_muon.seconds, 0.7,
                       False)
    for r in results:
        if r.case.kind == "elementwise" and not r.case.label.startswith("torch."):
            target(f"{r.case.label}: bytes/s / copy bandwidth", r.efficiency, 0.7)
    if "adamw" in by_label and "torch.optim.AdamW(fused)" in by_label:
        target("adamw step time / torch.optim.AdamW(fused)",
               by_label["adamw"].seconds / by_label["torch.optim.AdamW(fused)"].seconds, 1.0, False)
    if loop_ratio is not None:
        target("train.py tokens/s / minimal loop", loop_ratio, 0.97)
    report.heading("Targets")
    report.table(["verdict", "target", "measured", "bar"], targets)
    report.note("Not measured by this script: the GPU MFU target (160M preset, bf16, torch.compile, >= 45%).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
