"""scripts/test_torch_versions.py without installing anything: the requirements it installs next to a given torch
(every test dependency, never the torch pin) and the summary it reads off a real pytest run."""
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))

import test_torch_versions  # noqa: E402


def test_requirements_keep_every_test_dependency_and_drop_only_the_torch_pin():
    lines = test_torch_versions.requirement_lines(ROOT / "requirements-test.txt")
    kept = test_torch_versions.without_torch(lines)
    assert "torch==2.13.0" in lines  # reached through `-r requirements.txt`
    assert [line for line in lines if line not in kept] == ["torch==2.13.0"]
    assert {"pytest", "pytest-timeout", "numpy", "pytorch_optimizer==4.1.0", "lion-pytorch==0.2.5"} <= set(kept)
    assert test_torch_versions.without_torch(["torch>=2.11", "torch", "torch[opt]==2.1", "torchvision"]) == [
        "torchvision"]


def test_summary_counts_and_exit_code_come_from_the_pytest_run(tmp_path):
    suite = tmp_path / "test_sample.py"
    suite.write_text("import pytest\n\n"
                     "def test_a():\n    pass\n\n"
                     "def test_b():\n    pass\n\n"
                     "def test_c():\n    assert False\n\n"
                     "@pytest.mark.skip\ndef test_d():\n    pass\n")
    returncode, outcome = test_torch_versions.test(Path(sys.executable), tmp_path / "run.log", [str(suite)])
    assert returncode == 1
    assert outcome.startswith("2 passed, 1 failed, 1 skipped in ")
    assert "test_c" in (tmp_path / "run.log").read_text()


def test_counts_include_errors_and_deselected_tests():
    closing = "1 failed, 5 passed, 2 skipped, 3 deselected, 4 warnings, 2 errors in 12.34s (0:00:12)"
    assert test_torch_versions.pytest_counts(f"...\n{closing}\n") == (
        "5 passed, 1 failed, 2 skipped, 3 deselected, 2 error")
    assert test_torch_versions.pytest_counts("Traceback ...\n") == "no pytest summary (see the log)"
