"""Peak memory per rank of a training step with each memory saving on and off, against a baseline with all of them
off, measured in the same run.

Each configuration runs in a fresh process group (torchrun, `--nproc` ranks of FSDP2, fs_size = nproc) that builds
the model as train.py does (meta device or not, parallelize, initialize), builds the optimizer and trains `--steps`
steps of two micro-batches of random tokens per rank (so the optimizer states exist and the gradients are
accumulated). Memory per rank:
- CPU: the resident set size (RSS), with every allocation over 64 KiB served by mmap and unmapped when freed (so
  the RSS follows the live tensors): `peak` is the process's high-water mark (getrusage ru_maxrss), `startup` the
  RSS after imports and process-group setup; `above startup` = peak - startup is what the model and the step need.
- CUDA: torch.cuda.max_memory_allocated (the caching allocator's live tensors), zero at startup.
`init` is the peak once the model and optimizer are built, before the first step; `step` the peak over the steps.

The savings: parallel.meta_init (build on the meta device, initialize shard by shard), parallel.
activation_checkpointing full / selective, model.loss_chunk_tokens (cross-entropy without the full logits),
parallel.fsdp_gradient_accumulation sharded (reduce-scatter every micro-batch), and the TP vocab-parallel
embedding / LM head, measured in a TP layout against its own TP baseline once its config key (VOCAB_PARALLEL_KEY)
exists, else reported as not available.

    python scripts/memory_report.py                         # the 160M preset and the scaled-down 1B shape, 2 ranks
    python scripts/memory_report.py --shape 160m --results runs/memory_report.jsonl   # resumable: rerun to finish
    python scripts/memory_report.py --shape 1b-scaled --rows baseline meta_init
    torchrun ... is started by the script itself; on CUDA it needs --nproc GPUs.

The 1B shape is the GPT-3 XL width (model_dim 2048, 16 heads) with 4 of its 24 blocks and sequences of 512: the
blocks' parameters, gradients, optimizer states and activations grow linearly with the block count (x6 at 24
blocks), the embedding, LM head and logits do not.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from trainer.results_file import ResultsFile, ResultsFileError

ROOT = Path(__file__).resolve().parents[1]

# The config key that turns on the TP vocab-parallel embedding / LM head (another change of issue 15). Until the
# config has it, its row reads "not available".
VOCAB_PARALLEL_KEY = "parallel.vocab_parallel"

SHAPES = {
    "160m": ["--model.preset", "160m"],
    "1b-scaled": ["--model.model_dim", "2048", "--model.n_head", "16", "--model.n_layer", "4",
                  "--model.sequence_length", "512"],
    # For the test: small enough to run in seconds, activations large against the weights.
    "tiny": ["--model.model_dim", "64", "--model.n_head", "2", "--model.n_layer", "8", "--model.sequence_length",
             "1024", "--model.vocab_size", "512"],
}
# Sequences per rank per micro-batch; two micro-batches per step.
DEVICE_BATCH = {"160m": 1, "1b-scaled": 1, "tiny": 8}
CHUNK_TOKENS = {"160m": 256, "1b-scaled": 256, "tiny": 256}
ALL_OFF = ["--parallel.meta_init", "false", "--parallel.activation_checkpointing", "none",
           "--model.loss_chunk_tokens", "0", "--parallel.fsdp_gradient_accumulation", "unsharded"]


@dataclass(frozen=True)
class Row:
    name: str
    meaning: str
    overrides: tuple[str, ...]
    tensor_parallel: bool = False  # measured with tp_size = nproc, against the TP baseline
    needs_sharding: bool = False  # nothing to save with one rank


def rows(chunk_tokens: int) -> list[Row]:
    on = [("--parallel.meta_init", "true"), ("--parallel.activation_checkpointing", "full"),
          ("--model.loss_chunk_tokens", str(chunk_tokens)), ("--parallel.fsdp_gradient_accumulation", "sharded")]
    return [
        Row("baseline", "every saving off (FSDP2)", ()),
        Row("meta_init", "parallel.meta_init true", ("--parallel.meta_init", "true"), needs_sharding=True),
        Row("ac_full", "activation_checkpointing full", ("--parallel.activation_checkpointing", "full")),
        Row("ac_selective", "activation_checkpointing selective",
            ("--parallel.activation_checkpointing", "selective")),
        Row("chunked_ce", f"loss_chunk_tokens {chunk_tokens}", ("--model.loss_chunk_tokens", str(chunk_tokens))),
        Row("sharded_accumulation", "fsdp_gradient_accumulation sharded",
            ("--parallel.fsdp_gradient_accumulation", "sharded"), needs_sharding=True),
        Row("all_on", "all of the above (AC full)", tuple(word for pair in on for word in pair)),
        Row("tp_baseline", "every saving off (TP)", (f"--{VOCAB_PARALLEL_KEY}", "false"), tensor_parallel=True),
        Row("tp_vocab_parallel", f"{VOCAB_PARALLEL_KEY} true (TP)", (f"--{VOCAB_PARALLEL_KEY}", "true"),
            tensor_parallel=True),
    ]


def vocab_parallel_available() -> bool:
    from trainer.config import build_config
    section, _, name = VOCAB_PARALLEL_KEY.partition(".")
    return name in build_config([]).to_dict().get(section, {})


def current_rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_bytes(device) -> int:
    import torch
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def worker(out: Path, steps: int, config_args: list[str]) -> None:
    """One configuration under torchrun: build, initialize and train as train.py does; rank 0 writes every rank's
    numbers to `out`."""
    import torch
    import torch.distributed as dist

    from trainer.build import (autocast_context, build_model, build_training_optimizer, builds_on_meta, check_layout,
                               distribute_model, micro_batch_size)
    from trainer.config import build_config
    from trainer.distributed import init_distributed, no_gradient_sync, unwrap
    from trainer.runtime import keep_large_allocations_in_heap
    config = build_config(config_args)
    env = init_distributed(config)
    if env.device.type == "cpu":
        # Every block over 64 KiB from mmap, returned to the kernel when freed: the RSS then follows the live tensors,
        # and its peak is theirs rather than that of a heap fragmented by freed activations (train.py keeps freed
        # blocks in the heap for speed, which made the same configuration's two ranks differ by up to 0.5 GiB).
        keep_large_allocations_in_heap(limit_bytes=64 * 1024)
        startup = current_rss_bytes()
    else:
        torch.cuda.reset_peak_memory_stats(env.device)
        startup = torch.cuda.memory_allocated(env.device)
    check_layout(config, env)
    device_batch_size, accumulation = micro_batch_size(config, env)
    started = time.perf_counter()
    model = distribute_model(build_model(config, env.device, meta=builds_on_meta(config, env)), config, env)
    optimizer = build_training_optimizer(unwrap(model), config, env)
    init_peak = peak_bytes(env.device)
    autocast = autocast_context(config, env.device)
    generator = torch.Generator().manual_seed(env.data_rank)
    sharded_accumulation = config.parallel.fsdp_gradient_accumulation == "sharded"
    for _ in range(steps):
        for micro in range(accumulation):
            tokens = torch.randint(config.model.vocab_size, (device_batch_size, config.model.sequence_length + 1),
                                   generator=generator).to(env.device)
            with no_gradient_sync(model, micro == accumulation - 1, sharded_accumulation), autocast():
                loss = model(tokens[:, :-1], tokens[:, 1:]) / accumulation
            loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    seconds = time.perf_counter() - started
    mine = dict(rank=env.rank, startup=startup, init_peak=init_peak, step_peak=peak_bytes(env.device),
                seconds=seconds, loss=loss.item() * accumulation, micro_batches=accumulation)
    gathered = [None] * env.world_size
    if env.world_size > 1:
        dist.all_gather_object(gathered, mine)
        dist.destroy_process_group()
    else:
        gathered = [mine]
    if env.rank == 0:
        out.write_text(json.dumps(gathered))


def measure(shape: str, row: Row, nproc: int, steps: int, optimizer: str) -> dict:
    """Launch one configuration; its ranks' numbers, or the reason it could not run."""
    layout = ["--tp_size", str(nproc)] if row.tensor_parallel else ["--fs_size", str(nproc)]
    args = [*SHAPES[shape], "--optimizer", optimizer, "--data.batch_size", str(2 * DEVICE_BATCH[shape] * nproc),
            "--data.device_batch_size", str(DEVICE_BATCH[shape]), "--logging.wandb", "false", *layout, *ALL_OFF,
            *row.overrides]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "HF_HUB_OFFLINE": "1",
           "WANDB_MODE": "disabled"}
    with tempfile.TemporaryDirectory() as scratch:
        out = Path(scratch) / "ranks.json"
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                   __file__, "--worker", str(out), "--steps", str(steps), "--", *args]
        result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
        if result.returncode != 0 or not out.is_file():
            errors = [line for line in result.stderr.splitlines() if "Error" in line or "error:" in line]
            return dict(error=(errors[-1] if errors else result.stderr[-300:]).strip()[:300])
        return dict(ranks=json.loads(out.read_text()))


def mib(num_bytes: float) -> str:
    return f"{num_bytes / 2**20:,.0f}"


def table(results: dict[str, dict], row_list: list[Row], device: str) -> str:
    """Markdown: per configuration, each rank's init and step peaks, and the step peak above startup against the
    baseline of its layout (max over ranks)."""
    above = "above startup" if device == "cpu" else "allocated"
    lines = [f"| configuration | setting | init peak MiB (per rank) | step peak MiB (per rank) | step peak {above}, "
             f"MiB (max rank) | vs baseline | s |", "|---|---|---|---|---|---|---|"]
    reference = {}
    for row in row_list:
        result = results.get(row.name)
        if result is None:
            continue
        if "ranks" not in result:
            lines.append(f"| {row.name} | {row.meaning} | {result.get('error', 'not measured')} | | | | |")
            continue
        ranks = result["ranks"]
        need = max(r["step_peak"] - r["startup"] for r in ranks)
        baseline = "tp_baseline" if row.tensor_parallel else "baseline"
        if row.name == baseline:
            reference[baseline] = need
        ratio = f"{need / reference[baseline]:.2f}" if baseline in reference else "n/a"
        lines.append(f"| {row.name} | {row.meaning} | {' / '.join(mib(r['init_peak']) for r in ranks)} | "
                     f"{' / '.join(mib(r['step_peak']) for r in ranks)} | {mib(need)} | {ratio} | "
                     f"{max(r['seconds'] for r in ranks):.0f} |")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", nargs="+", choices=list(SHAPES), default=["160m", "1b-scaled"])
    parser.add_argument("--rows", nargs="+", help="configurations to measure (default: all); baseline is added")
    parser.add_argument("--nproc", type=int, default=2, help="ranks (FSDP2 fs_size, or tp_size for the TP rows)")
    parser.add_argument("--steps", type=int, default=2, help="optimizer steps of two micro-batches each")
    parser.add_argument("--optimizer", default="adamw")
    parser.add_argument("--results", type=Path, metavar="FILE.jsonl", help="append each measured row here; a rerun "
                                                                          "with the same file measures only the rest")
    parser.add_argument("--json", type=Path, help="also write every result here (for tests)")
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    args, config_args = parser.parse_known_args(argv)
    if args.worker is not None:
        worker(args.worker, args.steps, [a for a in config_args if a != "--"])
        return 0
    import torch
    device = "cuda" if torch.cuda.is_available() else "cpu"
    available = vocab_parallel_available()
    load = os.getloadavg()
    print(f"device {device}, {args.nproc} ranks, {args.optimizer}, {args.steps} steps of 2 micro-batches per rank; "
          f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} at start", flush=True)
    everything = {}
    for shape in args.shape:
        row_list = [row for row in rows(CHUNK_TOKENS[shape])
                    if args.rows is None or row.name in args.rows or row.name == "baseline"
                    or row.name == "tp_baseline" and "tp_vocab_parallel" in args.rows]
        try:
            store = ResultsFile(args.results, dict(script="memory_report", shape=shape, nproc=args.nproc,
                                                   steps=args.steps, optimizer=args.optimizer, device=device))
        except ResultsFileError as error:
            print(f"error: --results: {error}", file=sys.stderr)
            return 2
        results = {}
        for row in row_list:
            if row.tensor_parallel and not available:
                results[row.name] = dict(error=f"not available: the config has no {VOCAB_PARALLEL_KEY}")
                continue
            if row.needs_sharding and args.nproc == 1:
                results[row.name] = dict(error="not applicable with one rank")
                continue
            results[row.name] = store.get(row.name) or measure(shape, row, args.nproc, args.steps, args.optimizer)
            if "ranks" in results[row.name] and store.get(row.name) is None:
                store.add(row.name, results[row.name])
            print(f"{shape} {row.name}: measured", flush=True)
        everything[shape] = results
        print(f"\n### {shape} ({' '.join(SHAPES[shape])}, device batch {DEVICE_BATCH[shape]})\n")
        print(table(results, row_list, device), flush=True)
    load = os.getloadavg()
    print(f"\nload average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} at the end")
    if args.json is not None:
        args.json.write_text(json.dumps(everything))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
