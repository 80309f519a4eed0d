"""Fault drill: abuse a tiny train.py run the way a shared cluster does and count what survives.

    python scripts/fault_drill.py                       # 20 kills, every corruption, two writers, a full disk
    python scripts/fault_drill.py --kills 5 --output runs/drill

Each fault is injected into real train.py subprocesses (a 1-layer, 32-wide model on the embedded corpus, AdamW,
a checkpoint every 2 steps):

- kills: SIGKILL at `--kills` random moments of one run (about half of them timed to land while a checkpoint is
  being written, i.e. while `step_*.tmp` exists), restarting the same command after each; then the run is finished
  and its losses compared with an uninterrupted run: data lost = 0 means every restart resumed and the final loss
  curve is bit-identical.
- corruptions: the newest checkpoint truncated, random bytes in `.metadata`, one bit flipped in the data, the data
  file deleted; each must be detected, moved to `step_N.corrupt`, and the run must resume from the previous one.
- writers: a second run on the same run_dir while the first trains (must be refused with exit 2), the first then
  stopped with SIGTERM (must save and exit 143), and a torchrun launcher killed with SIGKILL (its 2 workers must
  exit).
- disk: checkpoint_dir on a small tmpfs (root on Linux) that holds two checkpoints but not the third: the run must
  stop with exit 2 and one line, and the newest checkpoint on it must resume elsewhere.

Prints one JSON report; `--output` keeps the run directories for inspection.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from trainer.checkpoint import latest_checkpoint

ROOT = Path(__file__).resolve().parents[1]

TINY = ["--model_dim", "32", "--n_layer", "1", "--n_head", "2", "--sequence_length", "32", "--batch_size", "4",
        "--device_batch_size", "4", "--data.val_tokens", "512", "--val_loss_every", "0", "--schedule.warmdown_ratio", "0",
        "--logging.log_every", "1", "--optimizer", "adamw", "--lr", "0.003", "--checkpoint_freq", "2"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}


def start(run_dir: Path, *args: str, launcher: tuple[str, ...] = ()) -> subprocess.Popen:
    command = [sys.executable, *launcher, str(ROOT / "train.py"), *TINY, "--run_dir", str(run_dir), *args]
    return subprocess.Popen(command, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(process: subprocess.Popen, timeout: float = 600) -> tuple[int, str]:
    out, err = process.communicate(timeout=timeout)
    return process.returncode, out + err


def run(run_dir: Path, *args: str) -> tuple[int, str]:
    return finish(start(run_dir, *args))


def losses(run_dir: Path) -> list[float]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["train_loss"] for line in lines]


def logged_steps(run_dir: Path) -> int:
    metrics = run_dir / "metrics.jsonl"
    return len(metrics.read_text().splitlines()) if metrics.exists() else 0


def saving(run_dir: Path) -> bool:
    checkpoints = run_dir / "checkpoints"
    return checkpoints.is_dir() and any(p.name.endswith(".tmp") for p in checkpoints.iterdir())


def clean_failure(code: int, output: str) -> bool:
    return "Traceback" not in output and len(re.findall(r"error: ", output)) == 1 and code == 2


def drill_kills(work: Path, kills: int, steps: int, rng: random.Random) -> dict:
    reference = work / "reference"
    args = ("--num_iterations", str(steps), "--checkpoint_freq", "5")
    code, output = run(reference, *args)
    assert code == 0, output
    run_dir = work / "killed"
    report = dict(kills=0, kills_inside_saves=0, restarts_failed=0)
    for _ in range(kills):
        if logged_steps(run_dir) >= steps - 1:
            break
        process = start(run_dir, *args)
        target_save = rng.random() < 0.5
        deadline = time.monotonic() + rng.uniform(3.0, 10.0)  # the first ~3 s are imports and setup
        while process.poll() is None and time.monotonic() < deadline:
            if target_save and saving(run_dir):
                break
            time.sleep(0.005)
        if process.poll() is not None:
            report["restarts_failed"] += process.returncode != 0
            continue
        inside = saving(run_dir)
        process.kill()
        process.communicate()
        report["kills"] += 1
        report["kills_inside_saves"] += inside
    code, output = run(run_dir, *args)
    report["final_run_exit"] = code
    report["data_lost"] = int(code != 0 or losses(run_dir) != losses(reference))
    return report


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])


def _random_metadata(path: Path) -> None:
    metadata = path.parent / ".metadata"
    data = bytearray(metadata.read_bytes())
    data[100:140] = os.urandom(40)
    metadata.write_bytes(bytes(data))


def _flip_bit(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[random.Random(0).randrange(len(data))] ^= 0x04
    path.write_bytes(bytes(data))


CORRUPTIONS = {"truncated data file": _truncate, "random bytes in .metadata": _random_metadata,
               "one bit flipped in data": _flip_bit, "data file deleted": Path.unlink}


def drill_corruptions(work: Path) -> dict:
    base = work / "corrupt_base"
    code, output = run(base, "--num_iterations", "6")
    assert code == 0, output
    report = dict(corruptions=0, detected=0, fell_back=0, data_lost=0)
    for name, corrupt in CORRUPTIONS.items():
        run_dir = work / ("corrupt_" + name.replace(" ", "_").replace(".", ""))
        shutil.copytree(base, run_dir)
        newest = latest_checkpoint(run_dir / "checkpoints")
        corrupt(newest / "__0_0.distcp")
        code, output = run(run_dir, "--num_iterations", "8")
        report["corruptions"] += 1
        report["detected"] += f"{newest} is corrupt" in output and (run_dir / "checkpoints" /
                                                                     f"{newest.name}.corrupt").is_dir()
        report["fell_back"] += code == 0 and "at step 4" in output
        report["data_lost"] += code != 0
    return report


def drill_writers(work: Path) -> dict:
    run_dir = work / "writers"
    report = dict(second_writers=1, refused=0, sigterm_saved=0, launcher_kills=1, orphaned_workers=0)
    first = start(run_dir, "--num_iterations", "100000", "--checkpoint_freq", "100000")
    try:
        while logged_steps(run_dir) < 2:
            assert first.poll() is None, finish(first)
            time.sleep(0.2)
        code, output = run(run_dir, "--num_iterations", "100000")
        report["refused"] += clean_failure(code, output) and f"pid {first.pid}" in output
        first.send_signal(signal.SIGTERM)
        code, output = finish(first, timeout=120)
        report["sigterm_saved"] += code == 143 and "checkpoint saved" in output
    finally:
        first.kill()
    torchrun_dir = work / "torchrun"
    launcher = start(torchrun_dir, "--num_iterations", "100000", "--device_batch_size", "2",
                     launcher=("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"))
    workers = []
    try:
        while logged_steps(torchrun_dir) < 2:
            assert launcher.poll() is None, finish(launcher)
            time.sleep(0.2)
        workers = children_of(launcher.pid)
        launcher.kill()
        launcher.communicate()
        deadline = time.monotonic() + 30
        while any(alive(pid) for pid in workers) and time.monotonic() < deadline:
            time.sleep(0.2)
    finally:
        launcher.kill()
        for pid in workers:
            if alive(pid):
                report["orphaned_workers"] += 1
                os.kill(pid, signal.SIGKILL)
    return report


def children_of(pid: int) -> list[int]:
    """Process ids whose parent is `pid` (Linux /proc)."""
    return [int(p) for p in os.listdir("/proc") if p.isdigit() and _parent(int(p)) == pid]


def _parent(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def alive(pid: int) -> bool:
    """Running (not gone, not a zombie)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def drill_disk(work: Path) -> dict:
    """Two tiny checkpoints are ~78 MB; a 100 MB tmpfs holds two but not the third that keep_checkpoints 2 needs
    while saving."""
    mount = work / "tmpfs"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=100m", "tmpfs", str(mount)],
                      capture_output=True).returncode != 0:
        return dict(disk_full="skipped: cannot mount a tmpfs here")
    try:
        run_dir = work / "disk"
        code, output = run(run_dir, "--num_iterations", "10", "--checkpoint_dir", str(mount / "checkpoints"))
        report = dict(disk_full_runs=1, stopped_with_one_line=int(clean_failure(code, output) and "free" in output))
        newest = latest_checkpoint(mount / "checkpoints")
        moved = work / "disk_resumed"
        shutil.copytree(run_dir, moved)
        shutil.copytree(mount / "checkpoints", moved / "checkpoints")
        code, output = run(moved, "--num_iterations", "10")
        report["resumed_from_kept_checkpoint"] = int(code == 0 and f"at step {int(newest.name[5:])}" in output)
        report["data_lost"] = int(code != 0)
        return report
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--steps", type=int, default=200, help="length of the killed run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, default=None, help="keep run directories here")
    args = parser.parse_args()
    work = args.output or Path(tempfile.mkdtemp(prefix="fault_drill_"))
    work.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    report = {}
    try:
        report["kills"] = drill_kills(work, args.kills, args.steps, random.Random(args.seed))
        report["corruptions"] = drill_corruptions(work)
        report["writers"] = drill_writers(work)
        report["disk"] = drill_disk(work)
    finally:
        report["seconds"] = round(time.monotonic() - started)
        print(json.dumps(report, indent=1))
        if args.output is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
