"""Smoke and closed-form tests of the measurement scripts: bench_optimizers (FLOP and state-byte models, a one-repeat
run on a micro preset), bench_collectives (bytes per collective equal the formula), compare_optimizers (dry run, skipping, valid train.py configs) and plot_curves (PNG from
metrics.jsonl and wandb CSV). No timings are asserted."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))

import bench_optimizers  # noqa: E402
import compare_optimizers  # noqa: E402
import plot_curves  # noqa: E402
from models import PRESETS, GPTConfig  # noqa: E402
from trainer.config import build_config  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------- bench_collectives
@pytest.mark.slow
def test_collective_bytes_of_the_orthonormal_family_equal_the_formula(tmp_path):
    import os
    import subprocess
    output = tmp_path / "collectives.json"
    completed = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         str(ROOT / "scripts/bench_collectives.py"), "--json", str(output)],
        env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-3000:]
    rows = json.loads(output.read_text())
    assert len(rows) == 9
    for row in rows:
        assert row["measured"] == row["formula"], row
    local = next(r for r in rows if r["optimizer"] == "dion2_local")
    assert set(local["collectives"]) == {"c10d.alltoall_base_"}  # only the chosen rows travel


# ---------------------------------------------------------------- bench_optimizers

def test_dion_flop_count_is_8mnr_plus_rcqr_terms():
    m, n, r = 96, 32, 8
    products = bench_optimizers.dion_products([(n, m)], rank_fraction=r / n)
    k = 128  # sketch rows: 1.25 r rounded up to a multiple of 128
    expected = 8 * m * n * r + 2 * k * m * r + 2 * k * r * r + 2 * m * r * r + 2 * r * m * r
    assert bench_optimizers.flops(products) == expected


def test_square_dion_matrix_at_full_rank_counts_householder_qr():
    products = bench_optimizers.dion_products([(32, 32)], rank_fraction=1.0)
    assert bench_optimizers.flops(products) == 8 * 32 ** 3 + 2 * 32 ** 3


def test_dion_products_of_equal_shapes_are_batched():
    single = bench_optimizers.dion_products([(96, 32)], rank_fraction=0.25)
    triple = bench_optimizers.dion_products([(96, 32)] * 3, rank_fraction=0.25)
    assert triple == [(3 * count, m, k, n) for count, m, k, n in single]


def test_newton_schulz_flop_count_is_five_iterations_of_4a2b_plus_2a3():
    a, b = 16, 48
    products = bench_optimizers.newton_schulz_products([(b, a), (a, b)])
    assert bench_optimizers.flops(products) == 2 * 5 * (4 * a * a * b + 2 * a ** 3)


def test_dion_expected_state_is_momentum_plus_q():
    assert bench_optimizers.dion_expected_state_bytes([(64, 16)], rank_fraction=0.5) == 4 * (64 * 16 + 16 * 8)


@pytest.fixture
def micro_preset(monkeypatch):
    monkeypatch.setitem(PRESETS, "micro", GPTConfig(vocab_size=64, n_layer=1, n_head=2, model_dim=16,
                                                    sequence_length=8))
    return "micro"


def table_rows(output: str, first_cell: str) -> list[list[str]]:
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in output.splitlines()
            if line.startswith(f"| {first_cell}")]


def test_bench_prints_a_verdict_for_every_target_and_exact_state_bytes(micro_preset, capsys):
    code = bench_optimizers.main(["--preset", micro_preset, "--optimizers", "adamw", "lion", "dion", "muon",
                                  "--repeats", "1", "--warmup", "0", "--loop-steps", "1", "--loop-repeats", "1",
                                  "--threads", "1", "--markdown"])
    output = capsys.readouterr().out
    assert code == 0
    verdicts = {row[1]: row[0] for row in table_rows(output, "PASS") + table_rows(output, "SHORT")}
    expected_targets = ["dion rank fraction 1: FLOP/s / matmul limit",
                        "dion rank fraction 0.25: FLOP/s / matmul limit",
                        "muon: Newton-Schulz FLOP/s / matmul limit", "muon step time / torch.optim.Muon",
                        "adamw: bytes/s / copy bandwidth", "adamw_foreach: bytes/s / copy bandwidth",
                        "adamw step time / torch.optim.AdamW(fused)",
                        "lion: bytes/s / copy bandwidth", "train.py tokens/s / minimal loop"]
    assert sorted(set(expected_targets) - set(verdicts)) == []
    memory = {row[0]: row for row in table_rows(output, "") if len(row) == 4 and row[0] != "optimizer"}
    for fraction in ("1", "0.5", "0.25", "0.125"):
        _, _, measured, expected = memory[f"dion_r{fraction}"]
        assert measured == expected
    # two moments (one for Lion) per parameter, plus a step counter per tensor on this micro model
    assert memory["adamw"][2] == memory["torch.optim.AdamW(foreach)"][2]
    assert float(memory["adamw"][2]) == pytest.approx(8.0, abs=0.05)
    assert float(memory["lion"][2]) == pytest.approx(4.0, abs=0.05)
    assert "| dion | " in output  # the rank-fraction curve


def test_bench_unknown_optimizer_is_a_clean_error(capsys):
    assert bench_optimizers.main(["--optimizers", "adamw", "nope"]) == 2
    assert "--optimizers: unknown name(s) nope" in capsys.readouterr().err


# ---------------------------------------------------------------- compare_optimizers

def test_compare_dry_run_lists_one_valid_train_command_per_run(tmp_path, capsys):
    assert compare_optimizers.main(["--dry-run", "--output", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    runs = compare_optimizers.load_runs(compare_optimizers.DEFAULT_RUNS)
    assert len(lines) == len(runs)
    for name in ("adamw", "lion", "muon", "dion_r1", "dion_r1_2", "dion_r1_4", "dion_r1_8", "dion_async_r1"):
        assert name in runs
    for name, overrides in runs.items():
        command = compare_optimizers.train_command(compare_optimizers.DEFAULT_BASE, tmp_path / name, overrides)
        config = build_config(command[2:])
        assert config.run_dir == str(tmp_path / name)
        for key, value in overrides.items():
            got = getattr(config, key)
            assert (list(got) if isinstance(got, tuple) else got) == value, (name, key)


def test_compare_skips_a_finished_run(tmp_path, capsys):
    finished = tmp_path / "adamw"
    finished.mkdir()
    (finished / "metrics.jsonl").write_text(json.dumps({"step": 100, "val_loss": 6.0}) + "\n")
    assert compare_optimizers.main(["--dry-run", "--output", str(tmp_path), "--only", "adamw", "lion"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("skip adamw")
    assert "--optimizer lion" in lines[1] and len(lines) == 2


def test_compare_unknown_run_name_is_a_clean_error(capsys):
    assert compare_optimizers.main(["--dry-run", "--only", "adamw", "nope"]) == 2
    assert "--only: unknown run(s) nope" in capsys.readouterr().err


# ---------------------------------------------------------------- plot_curves

def write_metrics(run_dir: Path, losses: list[float], seconds_per_step: float) -> None:
    run_dir.mkdir(parents=True)
    records = []
    for i, loss in enumerate(losses):
        step = 10 * i
        records.append({"step": step, "train_loss": loss + 0.1, "tokens": 64 * step, "time": step * seconds_per_step})
        records.append({"step": step, "val_loss": loss, "time": step * seconds_per_step})
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def test_plot_draws_two_pngs_and_ranks_runs_by_final_loss(tmp_path, capsys):
    write_metrics(tmp_path / "fast", [10.0, 8.0, 6.0], 0.5)
    write_metrics(tmp_path / "slow", [10.0, 9.0, 8.5], 0.2)
    prefix = tmp_path / "figures" / "curves"
    assert plot_curves.main([str(tmp_path / "fast"), str(tmp_path / "slow"), "--output", str(prefix)]) == 0
    for suffix in ("_val_vs_step.png", "_val_vs_time.png"):
        assert Path(f"{prefix}{suffix}").read_bytes()[:8] == PNG_MAGIC
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| fast") or
            line.startswith("| slow")]
    assert rows == ["| fast | 20 | 6.0000 | 6.0000 | 10 |", "| slow | 20 | 8.5000 | 8.5000 | 4 |"]


def test_plot_reads_a_wandb_chart_export(tmp_path):
    export = tmp_path / "export.csv"
    export.write_text("Step,dion - val_loss,dion - val_loss__MIN,adamw - val_loss\n"
                      "0,10.8,10.8,10.8\n50,7.5,7.5,\n100,6.9,6.9,7.4\n")
    curves = {c.name: c for c in plot_curves.read_wandb_csv(export)}
    assert curves["dion"].steps == [0, 50, 100] and curves["dion"].losses == [10.8, 7.5, 6.9]
    assert curves["adamw"].steps == [0, 100] and curves["adamw"].seconds is None
    assert plot_curves.main(["--wandb-csv", str(export), "--output", str(tmp_path / "w")]) == 0
    assert (tmp_path / "w_val_vs_step.png").read_bytes()[:8] == PNG_MAGIC
    assert not (tmp_path / "w_val_vs_time.png").exists()  # the export has no wall time


def test_plot_without_val_loss_is_a_clean_error(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text(json.dumps({"step": 1, "train_loss": 5.0}) + "\n")
    assert plot_curves.main([str(run), "--output", str(tmp_path / "x")]) == 2
    assert "no record has a val_loss" in capsys.readouterr().err
