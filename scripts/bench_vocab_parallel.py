"""Per-rank peak memory and step time of tensor parallelism with and without the vocab-parallel head (CPU, gloo).

    python scripts/bench_vocab_parallel.py [--repeats 3] [--steps 6] [--model_dim 256] [--tokens 1024]

Launches `torchrun --nproc_per_node=2` once per (repeat, mode), alternating `parallel.vocab_parallel` false / true
so that both see the same machine load, and prints the medians and their ratio (vocab-parallel / replicated head)
with the load average. Each run builds the GPT (50304-token vocabulary, 2 blocks, sequence 256), applies the GPT's
TP plan over 2 ranks and trains `--steps` steps of forward, backward and AdamW on one (tokens / 256, 256) batch of
random ids. Reported per rank (rank 0; the ranks are symmetric):
- peak RSS (resource.getrusage, MiB): the process's high-water mark, which includes the Python runtime and torch
  (measured before the model is built and printed as `base`);
- saved: the bytes of the tensors one forward keeps for backward (distinct storages, local shards), which holds
  the (tokens, vocab) float32 logits and log-softmax when the head is replicated;
- step: median wall time of a training step after the first.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def worker(args) -> None:
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor

    from models.gpt import GPT, GPTConfig, apply_tensor_parallel
    from optimizers.adamw import AdamW

    dist.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    torch.manual_seed(0)
    base = peak_rss_mib()
    config = GPTConfig(vocab_size=50304, n_layer=2, n_head=4, model_dim=args.model_dim, sequence_length=256)
    model = GPT(config)
    apply_tensor_parallel(model, mesh, vocab_parallel=args.vocab_parallel)
    optimizer = AdamW(model.parameters(), lr=1e-3)
    batch = args.tokens // config.sequence_length
    inputs = torch.randint(0, config.vocab_size, (batch, config.sequence_length))
    targets = torch.randint(0, config.vocab_size, (batch, config.sequence_length))
    storages: dict[int, int] = {}

    def pack(tensor):
        local = tensor.to_local() if isinstance(tensor, DTensor) else tensor
        try:
            storages[local.untyped_storage().data_ptr()] = local.untyped_storage().nbytes()
        except RuntimeError:  # a wrapper without a storage of its own (an in-flight collective's output)
            storages[id(local)] = local.numel() * local.element_size()
        return tensor
    times = []
    for step in range(args.steps):
        start = time.perf_counter()
        if step == 0:
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
                loss = model(inputs, targets)
        else:
            loss = model(inputs, targets)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        dist.barrier()
        times.append(time.perf_counter() - start)
    if dist.get_rank() == 0:
        print(json.dumps({"base_mib": base, "peak_mib": peak_rss_mib(), "saved_mib": sum(storages.values()) / 2**20,
                          "step_s": statistics.median(times[1:]), "loss": loss.item()}), flush=True)
    dist.destroy_process_group()


def launch(args, vocab_parallel: bool) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", __file__,
               "--worker", "--vocab_parallel", str(vocab_parallel).lower(), "--steps", str(args.steps),
               "--model_dim", str(args.model_dim), "--tokens", str(args.tokens)]
    completed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=1200)
    if completed.returncode != 0:
        sys.exit(f"worker failed:\n{completed.stderr[-3000:]}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--model_dim", type=int, default=256)
    parser.add_argument("--tokens", type=int, default=1024, help="tokens per step (a multiple of 256)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--vocab_parallel", default="true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        args.vocab_parallel = args.vocab_parallel == "true"
        return worker(args)
    runs: dict[bool, list[dict]] = {False: [], True: []}
    load_before = os.getloadavg()
    for _ in range(args.repeats):
        for vocab_parallel in (False, True):
            runs[vocab_parallel].append(launch(args, vocab_parallel))
    load = " ".join(f"{x:.1f}" for x in (*load_before, *os.getloadavg()))
    median = {mode: {key: statistics.median(run[key] for run in results) for key in results[0]}
              for mode, results in runs.items()}
    print(f"TP 2 (gloo, CPU), vocab 50304, d {args.model_dim}, 2 blocks, {args.tokens} tokens/step, "
          f"{args.repeats} runs each, medians; load average before / after: {load}")
    print(f"{'head':<12} {'base MiB':>9} {'peak RSS MiB':>13} {'saved MiB':>10} {'step s':>8} {'loss':>8}")
    for mode, name in ((False, "replicated"), (True, "vocab-par.")):
        m = median[mode]
        print(f"{name:<12} {m['base_mib']:>9.0f} {m['peak_mib']:>13.0f} {m['saved_mib']:>10.1f} {m['step_s']:>8.3f} "
              f"{m['loss']:>8.4f}")
    on, off = median[True], median[False]
    print(f"ratio vocab-parallel / replicated: peak RSS above base "
          f"{(on['peak_mib'] - on['base_mib']) / (off['peak_mib'] - off['base_mib']):.2f}, saved for backward "
          f"{on['saved_mib'] / off['saved_mib']:.2f}, step time {on['step_s'] / off['step_s']:.2f}")


if __name__ == "__main__":
    main()
