"""Run the test suite under several torch releases, each in its own virtual environment, and summarize each run.

    python scripts/test_torch_versions.py                          # torch 2.11.0 (the GPU machine's) and the newest
    python scripts/test_torch_versions.py 2.11.0 2.13.0 --venv-dir ~/venvs
    python scripts/test_torch_versions.py 2.11.0 -- -m "not slow"   # arguments after -- go to pytest
    PIP_CONFIG_FILE=/dev/null python scripts/test_torch_versions.py latest   # past a pip constraint that caps torch

CI tests one pinned CPU build (.ci/run); this script answers the other question: does the suite pass under the torch
a GPU machine has, and under the newest release? For each version (`latest` asks pip for the newest on the index):

1. `<venv-dir>/torch-<version>` is created unless it exists; torch is installed there unless it already has exactly
   that version (so a rerun reuses the several-GB CUDA build).
2. requirements-test.txt (with requirements.txt) is installed without its torch pin and with torch constrained to the
   version, so no test dependency can replace it; then the project itself (`pip install --no-deps -e .`).
3. The suite runs as .ci/run runs it (HF_HUB_OFFLINE=1, WANDB_MODE=disabled, --timeout=900), with no pytest cache,
   from the repository root; the output goes to `<venv-dir>/torch-<version>.log`.

One line per version is printed and appended to the results file: torch and device, pytest's counts, wall time and
the load average (1-minute, sampled every 10 s during the run), since on a shared machine wall time means little
without it. Exit code 0 when every version passed, 1 otherwise. pip is called with the caller's environment, so
PIP_* variables (a mirror, a cache, PIP_CONFIG_FILE) apply to every install.
"""
import argparse
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_VERSIONS = ("2.11.0", "latest")
DEFAULT_VENV_DIR = Path.home() / ".cache" / "dion-gpt" / "torch-venvs"  # outside the repository: GBs per version
TEST_ENV = {"HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
COUNT_WORDS = ("passed", "failed", "skipped", "error", "xfailed", "xpassed", "deselected")


def newest_torch(python: str) -> str:
    """The newest torch release on the index pip is configured for (`pip index versions` ignores constraints)."""
    result = subprocess.run([python, "-m", "pip", "index", "versions", "torch"], capture_output=True, text=True)
    match = re.search(r"^torch \(([^)]+)\)", result.stdout, re.MULTILINE)
    if match is None:
        sys.exit(f"could not ask pip for the newest torch: {result.stdout}{result.stderr}".strip())
    return match.group(1)


def requirement_lines(path: Path) -> list[str]:
    """The requirement lines of `path` with `-r` includes expanded and comments dropped."""
    lines = []
    for raw in path.read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if line.startswith("-r"):
            lines += requirement_lines(path.parent / line[2:].strip())
        elif line:
            lines.append(line)
    return lines


def without_torch(lines: list[str]) -> list[str]:
    """Drop the torch requirement itself (`torch`, `torch==2.13.0`, ...), keeping torch-named packages of others."""
    return [line for line in lines if re.split(r"[\s<>=!~\[;]", line, 1)[0].lower() != "torch"]


def run(command: list, **kwargs) -> None:
    print("+", " ".join(str(part) for part in command), flush=True)
    subprocess.run(command, check=True, **kwargs)


def installed_torch(python: Path) -> str | None:
    """torch.__version__ in the venv of `python` without its local tag (+cu130, +cpu), None when absent."""
    result = subprocess.run([str(python), "-c", "import torch; print(torch.__version__)"], capture_output=True,
                            text=True)
    return result.stdout.strip().split("+")[0] if result.returncode == 0 else None


def prepare(version: str, venv: Path, base_python: str) -> Path:
    """Create or reuse the venv for `version` and install torch, the test requirements and the project into it."""
    python = venv / "bin" / "python"
    if not python.exists():
        run([base_python, "-m", "venv", str(venv)])
    pip = [str(python), "-m", "pip", "install", "-q"]
    if installed_torch(python) == version:
        print(f"reusing {venv}: torch {version} already installed", flush=True)
    else:
        run([*pip, f"torch=={version}"])
    with tempfile.TemporaryDirectory() as scratch:
        requirements, constraints = Path(scratch) / "requirements.txt", Path(scratch) / "constraints.txt"
        requirements.write_text("\n".join(without_torch(requirement_lines(ROOT / "requirements-test.txt"))) + "\n")
        constraints.write_text(f"torch=={version}\n")
        run([*pip, "-r", str(requirements), "-c", str(constraints)])
    run([*pip, "--no-deps", "-e", str(ROOT)])
    if installed_torch(python) != version:
        sys.exit(f"{venv}: torch is {installed_torch(python)} after the installs, not {version}")
    return python


def describe(python: Path) -> str:
    """torch's full version and the device it sees, as the summary line shows them."""
    code = ("import platform, torch; cuda = torch.cuda.is_available(); "
            "print(torch.__version__, torch.cuda.get_device_name(0) if cuda else 'cpu', "
            "'python', platform.python_version())")
    return subprocess.run([str(python), "-c", code], capture_output=True, text=True, check=True).stdout.strip()


class LoadSampler:
    """The 1-minute load average sampled every `interval` seconds while a run lasts (start and end included)."""

    def __init__(self, interval: float = 10.0):
        self.interval, self.samples, self._stop = interval, [os.getloadavg()[0]], threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self):
        while not self._stop.wait(self.interval):
            self.samples.append(os.getloadavg()[0])

    def stop(self) -> str:
        self._stop.set()
        self._thread.join()
        self.samples.append(os.getloadavg()[0])
        mean = sum(self.samples) / len(self.samples)
        return f"load {mean:.1f} mean ({min(self.samples):.1f}-{max(self.samples):.1f})"


def pytest_counts(log: str) -> str:
    """pytest's closing counts as "310 passed, 3 failed, 2 skipped[, ...]", or a note when it never closed."""
    closing = [line for line in log.splitlines()
               if re.search(r"\b(passed|failed|errors?|no tests ran)\b.* in [\d.]+s", line)]
    if not closing:
        return "no pytest summary (see the log)"
    counts = {"passed": 0, "failed": 0, "skipped": 0}
    for count, word in re.findall(r"(\d+) (\w+)", closing[-1]):
        if word in COUNT_WORDS or word == "errors":
            counts[word.rstrip("s") if word == "errors" else word] = int(count)
    return ", ".join(f"{count} {word}" for word, count in counts.items())


def test(python: Path, log_path: Path, pytest_args: list[str]) -> tuple[int, str]:
    """Run the suite with `python`, streaming pytest's output to the console and to `log_path`."""
    env = {**os.environ, **TEST_ENV, "VIRTUAL_ENV": str(python.parent.parent),
           "PATH": f"{python.parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    command = [str(python), "-m", "pytest", "-q", "-p", "no:cacheprovider", "--timeout=900", *pytest_args]
    print("+", " ".join(command), f"> {log_path}", flush=True)
    load, start = LoadSampler(), time.monotonic()
    with open(log_path, "w", buffering=1) as log:  # line-buffered: `tail -f` the log
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                   text=True)
        for line in process.stdout:
            sys.stdout.write(line)
            log.write(line)
        returncode = process.wait()
    wall = time.monotonic() - start
    return returncode, f"{pytest_counts(log_path.read_text())} in {wall:.0f} s wall, {load.stop()}, exit {returncode}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("versions", nargs="*", default=list(DEFAULT_VERSIONS),
                        help="torch releases (e.g. 2.11.0) or 'latest'; default: %(default)s")
    parser.add_argument("--venv-dir", type=Path, default=Path(os.environ.get("TORCH_VENV_DIR", DEFAULT_VENV_DIR)),
                        help="where the venvs live, one per version (default: $TORCH_VENV_DIR or %(default)s)")
    parser.add_argument("--python", default=sys.executable, help="interpreter the venvs are made from")
    parser.add_argument("--results", type=Path, help="file the summary lines are appended to "
                        "(default: <venv-dir>/results.txt)")
    argv = sys.argv[1:] if argv is None else argv
    split = argv.index("--") if "--" in argv else len(argv)
    args, pytest_args = parser.parse_args(argv[:split]), argv[split + 1:]
    args.venv_dir.mkdir(parents=True, exist_ok=True)
    results = args.results or args.venv_dir / "results.txt"
    versions = [newest_torch(args.python) if version == "latest" else version for version in args.versions]
    summaries, failed = [], False
    for version in versions:
        venv = args.venv_dir / f"torch-{version}"
        stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        try:
            python = prepare(version, venv, args.python)
        except subprocess.CalledProcessError as error:
            failed = True
            summary = f"{stamp} torch {version}: install failed ({' '.join(map(str, error.cmd))})"
        else:
            returncode, outcome = test(python, args.venv_dir / f"torch-{version}.log", pytest_args)
            failed |= returncode != 0
            summary = f"{stamp} torch {describe(python)}: {outcome}; pytest args: {' '.join(pytest_args) or '(none)'}"
        summaries.append(summary)
        with open(results, "a") as file:
            file.write(summary + "\n")
    print("\n".join(["", f"summary (also appended to {results}):", *summaries]))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
