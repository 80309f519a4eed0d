"""One writer per run directory: an exclusive lock held for the run's lifetime.

The lock is `flock` on `<dir>/.lock`, taken by rank 0 for run_dir and checkpoint_dir, with the holder's host, pid
and start time written into the file so a refused run can name it. The kernel drops the lock when its process
dies, however it dies, so a lock file left by a killed run is stale by construction: the next run takes it over
(and says so). Released on exit by deleting the file while still holding it; a run that opened the old file before
the deletion notices that the path no longer names its file and tries again.
"""
from __future__ import annotations

import datetime
import fcntl
import json
import os
import socket
from pathlib import Path

from trainer.distributed import Distributed, broadcast_from_main
from trainer.errors import ConfigError

LOCK_NAME = ".lock"


class RunLock:
    """An acquired lock on one directory; `release()` frees it (also freed when the process exits)."""

    def __init__(self, directory: Path, key: str):
        self.path = directory / LOCK_NAME
        self.key = key
        self.file = None
        self.replaced: str | None = None  # holder recorded in a stale lock file that was taken over
        self.created = False  # the run made the directory: released empty, it is removed again

    def acquire(self) -> None:
        """Take the lock or raise ConfigError naming the holder."""
        directory = self.path.parent
        if directory.exists() and not directory.is_dir():
            raise ConfigError(f"{self.key}: {directory} is a file, not a directory")
        self.created = not directory.exists()
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise ConfigError(f"{self.key}: cannot create {directory} ({error.strerror or error})") from None
        while True:
            try:
                file = open(self.path, "a+")
            except OSError as error:
                raise ConfigError(f"{self.key}: {directory} is not writable ({error.strerror or error})") from None
            try:
                fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _holder(file)
                file.close()
                raise ConfigError(f"{self.key}: {directory} is in use by another run ({holder}); stop it or "
                                  f"choose another {self.key}") from None
            try:
                same = os.fstat(file.fileno()).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            file.close()  # the holder released (deleted) the file between our open and our lock: retry
        previous = _holder(file)
        if previous != "holder unknown":
            self.replaced = previous
        started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
        try:  # also the writability check: a read-only or full disk fails here, before any work
            file.seek(0)
            file.truncate()
            file.write(json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "started": started}))
            file.flush()
            os.fsync(file.fileno())
        except OSError as error:
            file.close()
            raise ConfigError(f"{self.key}: cannot write to {directory} ({error.strerror or error})") from None
        self.file = file

    def release(self) -> None:
        if self.file is None:
            return
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass
        self.file.close()
        self.file = None
        if self.created:  # a run stopped by bad input before any work leaves no empty directory behind
            try:
                self.path.parent.rmdir()
            except OSError:
                pass  # not empty: the run wrote something there


def _holder(file) -> str:
    file.seek(0)
    try:
        info = json.loads(file.read())
        return f"pid {info['pid']} on {info['host']}, started {info['started']}"
    except (ValueError, KeyError, TypeError):
        return "holder unknown"


def lock_run_directories(directories: dict[str, Path], env: Distributed) -> list[RunLock]:
    """Collective. Rank 0 locks each directory (keyed by its config key; the same directory once); every rank
    raises the same ConfigError when one is held by another run. Returns rank 0's locks (empty elsewhere)."""
    locks, problem = [], None
    if env.is_main:
        seen = set()
        try:
            for key, directory in directories.items():
                resolved = directory.resolve()
                if resolved in seen:
                    continue
                seen.add(resolved)
                lock = RunLock(directory, key)
                lock.acquire()
                locks.append(lock)
                if lock.replaced:
                    print(f"note: {key}: took over the stale lock of a run that is gone ({lock.replaced})")
        except ConfigError as error:
            for lock in locks:
                lock.release()
            locks, problem = [], str(error)
    problem = broadcast_from_main(problem, env)
    if problem is not None:
        raise ConfigError(problem)
    return locks
