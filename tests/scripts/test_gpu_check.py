"""scripts/gpu_check.sh in its CI size (`--device cpu --tiny`): every stage runs and the report holds its numbers."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def gpu_check(*args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "2"}
    return subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_cuda_without_a_gpu_is_one_line_and_exit_2():
    completed = gpu_check("--device", "cuda", timeout=120)
    assert completed.returncode == 2
    assert completed.stderr.strip().splitlines() == [
        "error: --device cuda: torch sees no CUDA device here; use --device cpu --tiny for the CI-sized run"]


@pytest.mark.slow  # five stages, two compiles and four training runs: 1-4 minutes on 2 cores
def test_tiny_run_on_the_cpu_reports_every_stage(tmp_path):
    completed = gpu_check("--device", "cpu", "--tiny", "--report-dir", str(tmp_path / "docs"), "--work-dir",
                          str(tmp_path / "work"), "--copy-to", str(tmp_path / "out"))
    assert completed.returncode == 0, completed.stdout[-4000:] + completed.stderr[-4000:]
    reports = list((tmp_path / "docs").glob("cpu-tiny-*.md"))
    assert len(reports) == 1
    report = reports[0].read_text()
    stages = re.findall(r"^\| (.+?) \| (ok|timed out|failed.*?|skipped.*?) \| \d+ \|$", report, re.MULTILINE)
    assert [status for _, status in stages] == ["ok"] * 5, stages
    assert re.search(r"^`\d+ skipped in ", report, re.MULTILINE)  # pytest -m cuda: collected, all skipped here
    for precision in ("float32", "bfloat16"):  # both step-time tables, with Dion, Muon and AdamW rows
        table = report.split(f"**{precision}**")[1].split("**")[0]
        for row in ("dion_r1", "dion_r0.125", "muon", "adamw"):
            assert re.search(rf"^\| {re.escape(row)} \| [\d,]+ \| [\d.]+ \|", table, re.MULTILINE), (precision, row)
    windows = re.findall(r"^\| (\d+-\d+) \| ([\d,]+) \| ([\d.]+) \| ([\d.]+%) \| ([\d.]+) \|$", report,
                         re.MULTILINE)  # MFU on a CPU: against its measured float32 matmul rate
    assert [w[0] for w in windows] == ["1-2", "3-4"] and all(float(w[1].replace(",", "")) > 0 for w in windows)
    for optimizer in ("dion", "adamw"):
        row = re.search(rf"^\| {optimizer} \| ([\d.]+) \| ([\d.]+) \|", report, re.MULTILINE)
        assert row and float(row.group(1)) < 10.8, optimizer  # below ln(50304) = 10.83: it trained
    assert {p.name for p in (tmp_path / "out").iterdir()} == {"logs.tar.gz", reports[0].name}
    with tarfile.open(tmp_path / "out" / "logs.tar.gz") as archive:
        names = archive.getnames()
    assert {"pytest_cuda.log", "bench_float32.log", "throughput_160m.log", "default_dion/metrics.jsonl"} <= set(names)
