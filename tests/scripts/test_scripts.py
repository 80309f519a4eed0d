"""Smoke and closed-form tests of the measurement scripts: bench_optimizers (FLOP and state-byte models, a one-repeat
run on a micro preset), bench_collectives (bytes per collective equal the formula), compare_optimizers (dry run,
skipping, valid train.py configs) and plot_curves (PNGs from metrics.jsonl and wandb CSV, unfinished runs, zoom,
default output under runs/). No timings are asserted."""
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
        assert config.logging.run_dir == str(tmp_path / name)
        wanted = dict(overrides["optimizer"])
        assert config.optimizer.name == wanted.pop("name"), name
        if "scalar" in wanted:
            assert config.optimizer.scalar.name == wanted.pop("scalar")["name"], name
        for key, value in wanted.items():
            got = config.optimizer.options[key]
            assert (list(got) if isinstance(got, tuple) else got) == value, (name, key)


def test_compare_skips_a_finished_run(tmp_path, capsys):
    finished = tmp_path / "adamw"
    finished.mkdir()
    (finished / "metrics.jsonl").write_text(json.dumps({"step": 100, "val_loss": 6.0}) + "\n")
    assert compare_optimizers.main(["--dry-run", "--output", str(tmp_path), "--only", "adamw", "lion"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("skip adamw")
    assert "--optimizer.name lion" in lines[1] and len(lines) == 2


def test_compare_unknown_run_name_is_a_clean_error(capsys):
    assert compare_optimizers.main(["--dry-run", "--only", "adamw", "nope"]) == 2
    assert "--only: unknown run(s) nope" in capsys.readouterr().err


# ---------------------------------------------------------------- plot_curves

def write_metrics(run_dir: Path, losses: list[float], seconds_per_step: float, planned: int | None = None) -> None:
    run_dir.mkdir(parents=True)
    records = []
    for i, loss in enumerate(losses):
        step = 10 * i
        records.append({"step": step, "train_loss": loss + 0.1, "lr": 0.01 * (1 - i / 10), "tokens": 64 * step,
                        "time": step * seconds_per_step})
        records.append({"step": step, "val_loss": loss, "time": step * seconds_per_step})
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    if planned is not None:
        (run_dir / "config.yaml").write_text(f"schedule:\n  num_iterations: {planned}\n")


def summary_rows(output: str, *names: str) -> list[list[str]]:
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in output.splitlines()
            if any(line.startswith(f"| {name} |") for name in names)]


def test_plot_draws_val_train_and_lr_pngs_and_ranks_runs_by_final_loss(tmp_path, capsys):
    write_metrics(tmp_path / "fast", [10.0, 8.0, 6.0], 0.5, planned=20)
    write_metrics(tmp_path / "slow", [10.0, 9.0, 8.5], 0.2, planned=20)
    prefix = tmp_path / "figures" / "curves"
    assert plot_curves.main([str(tmp_path / "fast"), str(tmp_path / "slow"), "--output", str(prefix)]) == 0
    for suffix in ("_val_vs_step.png", "_val_vs_time.png", "_train_vs_step.png", "_lr_vs_step.png"):
        assert Path(f"{prefix}{suffix}").read_bytes()[:8] == PNG_MAGIC
    assert summary_rows(capsys.readouterr().out, "fast", "slow") == [
        ["fast", "20", "20", "finished", "6.0000", "6.0000", "6.1000", "10"],
        ["slow", "20", "20", "finished", "8.5000", "8.5000", "8.6000", "4"]]


def test_plot_writes_under_runs_by_default_never_docs(tmp_path, monkeypatch):
    write_metrics(tmp_path / "run", [10.0, 8.0], 0.1)
    monkeypatch.chdir(tmp_path)
    assert plot_curves.main([str(tmp_path / "run")]) == 0
    assert (tmp_path / "runs" / "plots" / "curves_val_vs_step.png").read_bytes()[:8] == PNG_MAGIC
    assert not (tmp_path / "docs").exists()


def test_plot_marks_runs_short_of_their_plan_or_of_the_longest_run(tmp_path, capsys):
    write_metrics(tmp_path / "done", [10.0, 8.0, 7.0, 6.5], 0.1, planned=30)
    write_metrics(tmp_path / "stopped", [10.0, 8.5], 0.1, planned=30)  # killed at step 10 of 30
    write_metrics(tmp_path / "short", [10.0, 8.2, 7.5], 0.1)  # no config.yaml: 20 < the longest run's 30
    runs = [plot_curves.read_run(tmp_path / name) for name in ("done", "stopped", "short")]
    plot_curves.mark_unfinished(runs)
    assert [run.finished for run in runs] == [True, False, False]
    assert plot_curves.label(runs[1]) == "stopped (unfinished: step 10 of 30)"
    assert plot_curves.main([str(tmp_path / n) for n in ("done", "stopped", "short")] +
                            ["--output", str(tmp_path / "p")]) == 0
    status = {row[0]: row[3] for row in summary_rows(capsys.readouterr().out, "done", "stopped", "short")}
    assert status == {"done": "finished", "stopped": "unfinished", "short": "unfinished"}


def test_plot_runs_that_all_stopped_early_are_all_unfinished(tmp_path):
    for name in ("a", "b"):
        write_metrics(tmp_path / name, [10.0, 8.0, 7.0], 0.1, planned=100)  # as long as each other, 20 of 100
    runs = [plot_curves.read_run(tmp_path / name) for name in ("a", "b")]
    plot_curves.mark_unfinished(runs)
    assert [run.finished for run in runs] == [False, False]


def test_zoom_leaves_an_outlier_off_scale_and_shows_the_band_where_runs_end():
    band = {f"run{i}": [10.8, 7.5, 6.2 + 0.1 * i] for i in range(5)}  # finals 6.2 .. 6.6
    (low, high), off_scale = plot_curves.zoomed_range({**band, "lion": [10.8, 9.9, 9.8]})
    assert off_scale == ["lion"]
    assert 6.0 < low < 6.2 and 6.6 < high < 8.0  # the band fills at least a fifth of the axis
    assert plot_curves.zoomed_range(band) == ((low, high), [])  # the outlier does not move the range


def test_plot_names_the_off_scale_run_and_full_range_keeps_it(tmp_path, capsys):
    for i in range(4):
        write_metrics(tmp_path / f"run{i}", [10.8, 7.5, 6.2 + 0.1 * i], 0.1)
    write_metrics(tmp_path / "lion", [10.8, 9.9, 9.8], 0.1)
    runs = [str(p) for p in sorted(tmp_path.iterdir())]
    assert plot_curves.main(runs + ["--output", str(tmp_path / "p")]) == 0
    assert "validation loss: off the zoomed scale: lion" in capsys.readouterr().out
    assert plot_curves.main(runs + ["--output", str(tmp_path / "p"), "--full-range"]) == 0
    assert "off the zoomed scale" not in capsys.readouterr().out


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
    assert not (tmp_path / "w_train_vs_step.png").exists()  # nor training losses


def test_plot_a_run_without_validation_draws_its_training_loss(tmp_path, capsys):
    run = tmp_path / "unvalidated"
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "train_loss": 5.0 - s, "lr": 0.1}) + "\n"
                                               for s in range(3)))
    assert plot_curves.main([str(run), "--output", str(tmp_path / "x")]) == 0
    assert (tmp_path / "x_train_vs_step.png").read_bytes()[:8] == PNG_MAGIC
    assert not (tmp_path / "x_val_vs_step.png").exists()
    assert summary_rows(capsys.readouterr().out, "unvalidated") == [
        ["unvalidated", "2", "n/a", "finished", "n/a", "n/a", "3.0000", "n/a"]]


def test_plot_without_losses_is_a_clean_error(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text(json.dumps({"step": 1, "lr": 5.0}) + "\n")
    assert plot_curves.main([str(run), "--output", str(tmp_path / "x")]) == 2
    assert "no record has a val_loss or a train_loss" in capsys.readouterr().err


def test_sweep_entries_expand_to_one_run_per_value_and_seed_and_summarize_by_mean(tmp_path, capsys):
    runs = compare_optimizers.expand_sweep("adamw", {"optimizer": {"name": "adamw"},
                                                     "sweep": {"optimizer.lr": [0.001, 0.01]}, "seeds": [0, 1]})
    assert sorted(runs) == ["adamw_lr0.001_s0", "adamw_lr0.001_s1", "adamw_lr0.01_s0", "adamw_lr0.01_s1"]
    assert runs["adamw_lr0.01_s1"] == {"optimizer": {"name": "adamw", "lr": 0.01}, "seed": 1, "_group": "adamw"}
    for label, loss in (("adamw_lr0.001_s0", 6.0), ("adamw_lr0.001_s1", 6.2), ("adamw_lr0.01_s0", 5.0),
                        ("adamw_lr0.01_s1", 5.4)):
        (tmp_path / label).mkdir()
        (tmp_path / label / "metrics.jsonl").write_text(json.dumps({"step": 100, "val_loss": loss}) + "\n")
    table = compare_optimizers.summarize(runs, tmp_path)
    assert "| adamw | 0.001 | 6.1000 +- 0.1414 (n=2) |" in table
    assert table.splitlines()[-1] == "| adamw | 0.01 | 5.2000 +- 0.2828 (n=2) |"  # the best LR
