"""Train a GPT with Dion or any registered optimizer.

    python train.py                                   # configs/default.yaml: the embedded Shakespeare corpus
    python train.py --config configs/dion_160m.yaml --optimizer dion_async --lr 0.02
    torchrun --standalone --nproc_per_node=8 train.py --config configs/dion_160m.yaml --fs_size 8

Every config key can be overridden as `--section.key value` (short aliases: --lr, --optimizer NAME, --num_iterations,
...); `python train.py --help` prints the effective config with meanings. Restarting the same command resumes from
the newest checkpoint in checkpoint.dir (default: run_dir/checkpoints).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

from data import ShardError
from trainer.config import build_config, help_text
from trainer.distributed import init_distributed
from trainer.errors import TrainingError, UserError
from trainer.loop import Trainer
from trainer.runlock import lock_run_directories
from trainer.runtime import (StopRequest, Stopped, allow_tf32_matmuls, exit_with_launcher,
                             keep_large_allocations_in_heap)


def main(argv: list[str]) -> int:
    is_main = os.environ.get("RANK", "0") == "0"
    env, trainer, locks, stop = None, None, [], None
    exit_with_launcher()
    try:
        if "-h" in argv or "--help" in argv:
            print(__doc__)
            print(help_text(argv))
            return 0
        config = build_config(argv)
        env = init_distributed(config)
        locks = lock_run_directories({"logging.run_dir": Path(config.logging.run_dir),
                                      "checkpoint.dir": config.checkpoint_dir}, env)
        if env.device.type == "cpu":
            keep_large_allocations_in_heap()
        allow_tf32_matmuls(env.device)
        if config.debug:
            torch.autograd.set_detect_anomaly(True)
        stop = StopRequest(config.checkpoint.sigterm_grace_seconds)
        trainer = Trainer(config, env, stop)
        trainer.train()
    except (UserError, ShardError, FileNotFoundError) as error:
        if is_main:
            print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if is_main:
            step, last = (trainer.state.step, trainer.checkpointer.last) if trainer is not None else (0, None)
            print(f"\ninterrupted at step {step}; last checkpoint: {last or 'none'}; rerun the same command to resume",
                  file=sys.stderr)
        return 130
    except TrainingError as error:
        if is_main:
            print(f"error: {error}", file=sys.stderr)
        return 3
    except Stopped as stopped:
        if is_main:
            print(str(stopped), file=sys.stderr)
        return 143
    finally:
        for lock in reversed(locks):  # inner directories first
            lock.release()
        if stop is not None:
            stop.restore()
        if env is not None and env.world_size > 1 and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
