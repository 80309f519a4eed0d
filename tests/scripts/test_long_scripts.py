"""The long measurement scripts (bench_optimizers, optimizer_memory) print each row as it completes and resume from
a --results file: a rerun measures only the missing rows. No timings are asserted."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))

import bench_optimizers  # noqa: E402
import optimizer_memory  # noqa: E402

from models import GPT, PRESETS, GPTConfig  # noqa: E402
from trainer.results_file import ResultsFile, ResultsFileError  # noqa: E402

MICRO = GPTConfig(vocab_size=64, n_layer=1, n_head=2, model_dim=16, sequence_length=8)


@pytest.fixture
def micro_preset(monkeypatch):
    monkeypatch.setitem(PRESETS, "micro", MICRO)
    return "micro"


def record_calls(monkeypatch, module, name: str, capsys, label_of) -> list[tuple[str, str]]:
    """Patch module.name to note (label, stdout printed so far) at each call."""
    calls, printed, original = [], [], getattr(module, name)

    def wrapped(*args, **kwargs):
        printed.append(capsys.readouterr().out)
        calls.append((label_of(*args), "".join(printed)))
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, wrapped)
    return calls


def bench_args(preset: str, results: Path, *names: str) -> list[str]:
    return ["--preset", preset, "--optimizers", *names, "--repeats", "1", "--warmup", "0", "--loop-steps", "0",
            "--threads", "1", "--markdown", "--results", str(results)]


def test_bench_prints_each_row_before_measuring_the_next(micro_preset, tmp_path, monkeypatch, capsys):
    calls = record_calls(monkeypatch, bench_optimizers, "run_case", capsys, lambda case, *_: case.label)
    assert bench_optimizers.main(bench_args(micro_preset, tmp_path / "bench.jsonl", "lion", "adamw")) == 0
    labels = [label for label, _ in calls]
    assert labels[0] == bench_optimizers.REFERENCE  # measured first: the element-wise rows are relative to it
    for index, (_, printed) in enumerate(calls[1:], start=1):
        for earlier in labels[:index]:
            assert f"| {earlier} | " in printed, f"row {earlier} not printed before measuring {labels[index]}"


def test_bench_rerun_reuses_the_rows_and_measures_only_new_cases(micro_preset, tmp_path, monkeypatch, capsys):
    results = tmp_path / "bench.jsonl"
    assert bench_optimizers.main(bench_args(micro_preset, results, "lion")) == 0
    first = capsys.readouterr().out
    assert [json.loads(line)["label"] for line in results.read_text().splitlines()] == ["lion"]
    calls = record_calls(monkeypatch, bench_optimizers, "run_case", capsys, lambda case, *_: case.label)
    assert bench_optimizers.main(bench_args(micro_preset, results, "lion", "adamw")) == 0
    assert "lion" not in [label for label, _ in calls] and len(calls) == 4  # the adamw cases only
    lion_row = next(line for line in first.splitlines() if line.startswith("| lion | "))
    second = calls[-1][1] + capsys.readouterr().out  # the wrapper has read what was printed before its calls
    assert lion_row.split("|")[:4] in [line.split("|")[:4] for line in second.splitlines()]  # same time, state
    assert len(results.read_text().splitlines()) == 5


def test_bench_refuses_a_results_file_of_another_setup(micro_preset, tmp_path, capsys):
    results = tmp_path / "bench.jsonl"
    assert bench_optimizers.main(bench_args(micro_preset, results, "lion")) == 0
    arguments = bench_args(micro_preset, results, "lion")
    arguments[arguments.index("--repeats") + 1] = "2"
    assert bench_optimizers.main(arguments) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --results: ") and "use another file" in err and err.count("\n") == 1


def memory_args(preset: str, results: Path, *names: str) -> list[str]:
    return ["--preset", preset, "--optimizers", *names, "--results", str(results)]


def test_memory_prints_each_row_before_measuring_the_next(micro_preset, tmp_path, monkeypatch, capsys):
    calls = record_calls(monkeypatch, optimizer_memory, "measure", capsys,
                         lambda model, name, options: f"{name} {options}")
    assert optimizer_memory.main(memory_args(micro_preset, tmp_path / "m.jsonl", "lion", "adamw")) == 0
    assert [label for label, _ in calls] == ["adamw {}", "lion {}"]  # AdamW first: rows are relative to it
    assert "| adamw | defaults | " in calls[1][1]


def test_memory_rerun_reuses_rows_and_the_report_is_the_same(micro_preset, tmp_path, monkeypatch, capsys):
    results, report = tmp_path / "m.jsonl", tmp_path / "m.md"
    assert optimizer_memory.main(memory_args(micro_preset, results, "adamw", "lion") + ["--output", str(report)]) == 0
    first = report.read_text()
    capsys.readouterr()
    calls = record_calls(monkeypatch, optimizer_memory, "measure", capsys,
                         lambda model, name, options: f"{name} {options}")
    assert optimizer_memory.main(memory_args(micro_preset, results, "adamw", "lion") + ["--output", str(report)]) == 0
    assert calls == [] and report.read_text() == first


def test_memory_subset_includes_an_advanced_optimizers_feature_rows(micro_preset, tmp_path, capsys):
    assert optimizer_memory.main(memory_args(micro_preset, tmp_path / "m.jsonl", "adam_adv")) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| adam_adv | ")]
    combinations = optimizer_memory.feature_combinations(optimizer_memory.ADVANCED["adam_adv"])
    assert len(rows) == len(combinations) > 1


def test_memory_unknown_optimizer_is_a_clean_error(capsys):
    assert optimizer_memory.main(["--optimizers", "adamw", "nope"]) == 2
    assert "--optimizers: unknown name(s) nope" in capsys.readouterr().err


def test_results_file_drops_a_line_cut_short_and_keeps_appending(tmp_path):
    path = tmp_path / "r.jsonl"
    store = ResultsFile(path, {"preset": "x"})
    store.add("a", {"bytes": 1})
    with open(path, "a") as f:
        f.write('{"label": "b", "setup": {"pre')  # killed mid-write
    store = ResultsFile(path, {"preset": "x"})
    assert store.get("a") == {"bytes": 1} and store.get("b") is None
    store.add("b", {"bytes": 2})
    assert ResultsFile(path, {"preset": "x"}).rows == {"a": {"bytes": 1}, "b": {"bytes": 2}}
    with pytest.raises(ResultsFileError, match="use another file"):
        ResultsFile(path, {"preset": "y"})


@pytest.mark.parametrize("precision, states, ns", [("bfloat16", torch.bfloat16, torch.bfloat16),
                                                   ("float32", torch.float32, torch.float32)])
def test_bench_precision_sets_dion_states_and_newton_schulz_dtype(precision, states, ns):
    """--precision (scripts/gpu_check.sh times the 160M steps in both): Dion's states and the orthonormal family's
    Newton-Schulz products in that dtype, the orthonormal rows' matmul limit measured in it too."""
    model = GPT(MICRO)
    template = model.param_groups()
    shapes = [tuple(p.shape) for p in template["matrix"]]
    cases = {c.label: c for c in bench_optimizers.build_cases(["dion", "muon", "dion2"], 16, shapes, precision)}
    dion = cases["dion_r1"].make(bench_optimizers.fresh_parameters(template, True, torch.device("cpu")))
    dion.step()
    assert {v.dtype for s in dion.state.values() for k, v in s.items() if k in ("momentum", "Q")} == {states}
    for label in ("muon", "dion2_r0.5"):
        assert cases[label].make(bench_optimizers.fresh_parameters(template, True, torch.device("cpu"))) \
            .orthogonalize.dtype == ns
        assert cases[label].matmul_dtype == ns
