"""Step time of DionReference, Dion, DionAsync (and Muon) on a set of GPT-like matrix shapes, single process.

    python scripts/bench_dion.py                       # defaults: d_model 512 block shapes, rank fractions 1, 0.5, 0.25
    python scripts/bench_dion.py --model-dim 1024 --layers 2 --rank-fractions 1 0.25 --device cuda --dtype bfloat16

For each rank fraction, every optimizer takes `--warmup` steps and then `--repeats` timed steps on fresh random
gradients; the table shows the median step time, and the matmul efficiency: the 8 m n r flops of Dion's four
m x n x r products (B Q, B^T P, the error feedback P R^T, the update P Q^T) per matrix, divided by the step time and
by the device's measured square-matmul throughput (the same dtype, `--model-dim`-sized matrices). Muon is listed with
its 5 Newton-Schulz iterations and has no rank (its efficiency column is left empty).
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from optimizers.dion.batched import Dion
from optimizers.dion.core import DionMixedPrecisionConfig
from optimizers.dion.linalg import low_rank_dim
from optimizers.dion.overlapped import DionAsync
from optimizers.dion.reference import DionReference
from optimizers.muon import Muon
from trainer.runtime import synchronize


def block_shapes(model_dim: int, layers: int) -> list[tuple[int, int]]:
    """The matrices of `layers` transformer blocks: q, k, v, o (d x d), MLP up and down (4d x d, d x 4d)."""
    d = model_dim
    return [(d, d)] * 4 * layers + [(4 * d, d)] * layers + [(d, 4 * d)] * layers


def matmul_flops_per_second(size: int, dtype: torch.dtype, device: torch.device, repeats: int) -> float:
    a = torch.randn(size, size, dtype=dtype, device=device)
    b = torch.randn(size, size, dtype=dtype, device=device)
    times = []
    for _ in range(repeats + 2):
        synchronize(device)
        start = time.perf_counter()
        torch.mm(a, b)
        synchronize(device)
        times.append(time.perf_counter() - start)
    return 2 * size ** 3 / statistics.median(times[2:])


def step_times(make_optimizer, shapes, dtype, device, warmup: int, repeats: int) -> list[float]:
    generator = torch.Generator(device=device).manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=generator, dtype=dtype, device=device)) for s in shapes]
    optimizer = make_optimizer(params)
    times = []
    for _ in range(warmup + repeats):
        for p in params:
            p.grad = torch.randn(p.shape, generator=generator, dtype=dtype, device=device)
        synchronize(device)
        start = time.perf_counter()
        optimizer.step()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return times[warmup:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dim", type=int, default=512)
    parser.add_argument("--layers", type=int, default=1)
    parser.add_argument("--rank-fractions", type=float, nargs="+", default=[1.0, 0.5, 0.25])
    parser.add_argument("--qr-method", default="rcqr", choices=["qr", "cqr", "rcqr"])
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                        help="parameter dtype; bfloat16 also keeps Dion's momentum and Q in bfloat16")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    shapes = block_shapes(args.model_dim, args.layers)
    peak = matmul_flops_per_second(args.model_dim, dtype, device, args.repeats)
    mixed = DionMixedPrecisionConfig(torch.bfloat16, torch.bfloat16, torch.float32) if dtype == torch.bfloat16 else None
    load = " ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"device {device} ({torch.get_num_threads()} threads, load average {load}), dtype {args.dtype}, "
          f"torch {torch.__version__}, qr_method {args.qr_method}")
    print(f"shapes: {len(shapes)} matrices {sorted(set(shapes))}; {args.model_dim}^2 matmul: {peak / 1e9:.1f} GFLOP/s")
    print()
    print("| optimizer | rank fraction | step ms (median) | min ms | matmul efficiency |")
    print("|---|---|---|---|---|")
    for rank_fraction in args.rank_fractions:
        flops = sum(8 * m * n * low_rank_dim(m, n, rank_fraction, 1) for m, n in shapes)
        for cls in (DionReference, Dion, DionAsync):
            times = step_times(lambda ps: cls(ps, rank_fraction=rank_fraction, qr_method=args.qr_method,
                                              mixed_precision_config=mixed),
                               shapes, dtype, device, args.warmup, args.repeats)
            median = statistics.median(times)
            print(f"| {cls.__name__} | {rank_fraction} | {1e3 * median:.1f} | {1e3 * min(times):.1f} | "
                  f"{flops / median / peak:.0%} |")
    times = step_times(lambda ps: Muon(ps), shapes, dtype, device, args.warmup, args.repeats)
    print(f"| Muon | - | {1e3 * statistics.median(times):.1f} | {1e3 * min(times):.1f} | |")


if __name__ == "__main__":
    main()
