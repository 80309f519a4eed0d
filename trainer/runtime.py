"""Process-level behaviour: heap settings for CPU training, TF32 on CUDA, dying with the launcher, stopping on
SIGTERM, waiting for the device."""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import signal
import sys
import threading
import time

import torch
import torch.distributed as dist

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_PR_SET_PDEATHSIG = 1


def _libc():
    name = ctypes.util.find_library("c") if sys.platform.startswith("linux") else None
    return ctypes.CDLL(name, use_errno=True) if name else None


def keep_large_allocations_in_heap(limit_bytes: int = 1 << 30) -> bool:
    """On glibc, serve allocations up to `limit_bytes` from the heap and keep freed memory there.

    By default glibc maps every block over 32 MiB with mmap and unmaps it on free, so the ~200 MB logits of a
    50k-vocabulary micro-batch are page-faulted in afresh at every step: measured on the default run, 9 s of
    system time per 20 steps, 1.2 s with this setting (about 30% of the CPU time). Returns False where it does
    not apply (not Linux/glibc)."""
    try:
        libc = _libc()
        return (libc is not None and bool(libc.mallopt(_M_MMAP_THRESHOLD, limit_bytes))
                and bool(libc.mallopt(_M_TRIM_THRESHOLD, limit_bytes)))
    except (OSError, AttributeError):
        return False


def allow_tf32_matmuls(device: torch.device) -> bool:
    """On CUDA, let float32 matrix products use TF32 tensor cores (`torch.set_float32_matmul_precision("high")`):
    autocast runs the model's products in bfloat16, but what stays float32 (the optimizers' products: Dion's power
    iteration and Gram matrices, float32 Newton-Schulz; runs with `precision.autocast: float32`) would otherwise take
    the full-precision path (H100 datasheet: 67 TFLOP/s float32, 495 TF32 dense). TF32 keeps float32's range with
    a 10-bit mantissa. Elsewhere nothing changes: on CPUs "high" may let oneDNN compute float32 products in bfloat16.
    Returns whether the setting was changed."""
    if device.type != "cuda":
        return False
    torch.set_float32_matmul_precision("high")
    return True


def exit_with_launcher() -> bool:
    """Under torchrun, ask the kernel to kill this worker when its launcher dies (Linux PR_SET_PDEATHSIG), so a
    launcher killed with SIGKILL does not leave its workers training and writing on their own. SIGKILL rather
    than SIGTERM: with the launcher gone a collective save could hang, and an interrupted save loses nothing (the
    previous checkpoint stays). A plain `python train.py` is left alone (nohup must keep working). Returns whether
    the request was made."""
    if "TORCHELASTIC_RUN_ID" not in os.environ:
        return False
    try:
        libc = _libc()
        if libc is None or libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            return False
    except (OSError, AttributeError):
        return False
    if os.getppid() == 1:  # the launcher died before the request: nothing will signal us
        os.kill(os.getpid(), signal.SIGKILL)
    return True


def synchronize(device: torch.device) -> None:
    """Wait for the work queued on a CUDA device (a host sync); nothing elsewhere."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Stopped(Exception):
    """SIGTERM was honoured: the run stopped at a step boundary (after saving when there was time); exit 143."""


class StopRequest:
    """SIGTERM (what schedulers send before SIGKILL) becomes a request the loop honours at the next step boundary:
    save a checkpoint if one fits in what is left of `grace_seconds`, then stop. `due()` is collective, so every
    rank stops at the same step; the loop asks on the steps that sync anyway and every CHECK_EVERY steps between
    them (`checked_at`)."""

    CHECK_EVERY = 10  # steps between SIGTERM checks (a collective) outside the steps that sync anyway

    def __init__(self, grace_seconds: float):
        self.grace_seconds = grace_seconds
        self.received_at: float | None = None
        self._previous = signal.signal(signal.SIGTERM, self._on_signal)

    def restore(self) -> None:
        """Put back the SIGTERM handler that was installed before (the run is over)."""
        signal.signal(signal.SIGTERM, self._previous)

    def _on_signal(self, signum, frame) -> None:
        if self.received_at is None:
            self.received_at = time.monotonic()

    def due(self, device: torch.device, world_size: int) -> bool:
        flag = self.received_at is not None
        if world_size > 1:
            box = torch.tensor([float(flag)], device=device)
            dist.all_reduce(box, op=dist.ReduceOp.MAX)
            flag = bool(box.item())
            if flag and self.received_at is None:
                self.received_at = time.monotonic()
        return flag

    def seconds_left(self) -> float:
        return self.grace_seconds - (time.monotonic() - self.received_at)

    @classmethod
    def checked_at(cls, step: int, syncs: bool) -> bool:
        """Whether the loop asks `due()` after step `step`: on a step that syncs the host anyway, else every
        CHECK_EVERY steps (the question is a collective)."""
        return syncs or step % cls.CHECK_EVERY == 0

    def leaves_time_for(self, save_seconds: float | None) -> bool:
        """Whether a save that takes as long as the last one (`save_seconds`; None: none yet) fits in the grace
        left."""
        return (save_seconds or 0.0) <= self.seconds_left()

    def stopped(self, step: int, saved: bool, checkpoint_dir, checkpoint_freq: int,
                save_seconds: float | None) -> Stopped:
        """The exception that ends a run stopped after step `step`, saying whether and where it saved."""
        if saved:
            return Stopped(f"stopped by SIGTERM after step {step}: checkpoint saved in {checkpoint_dir}; rerun the "
                           f"same command to resume")
        took = f" (the last save took {save_seconds:.0f} s)" if save_seconds is not None else ""
        reason = (f"no time within checkpoint.sigterm_grace_seconds={self.grace_seconds}{took}"
                  if checkpoint_freq > 0 else "checkpoint.freq is 0")
        return Stopped(f"stopped by SIGTERM after step {step} without saving: {reason}; a rerun resumes from the "
                       f"previous checkpoint, if any")


@contextlib.contextmanager
def interrupts_deferred():
    """Ctrl-C (SIGINT) during the block is held until the block ends and then raised, so a checkpoint save is never
    cut in half by it (a half-written save would be discarded, but the time spent on it would be lost)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if received:
            raise KeyboardInterrupt
