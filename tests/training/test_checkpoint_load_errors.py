"""A checkpoint that cannot load into the configured model is a user error: one line naming the checkpoint and the
real cause, exit status 2 (DCP's CheckpointException is a BaseException: it used to escape as a traceback)."""
from tests.training.helpers import run_train


def test_resume_into_another_model_shape_is_one_line_and_exit_2(tmp_path, capsys):
    assert run_train(tmp_path, "--num_iterations", "1", "--checkpoint_freq", "1") == 0
    capsys.readouterr()
    assert run_train(tmp_path, "--num_iterations", "2", "--n_layer", "2") == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "step_00000001: cannot load" in errors[0]
    assert "Missing key in checkpoint state_dict: model.blocks.1." in errors[0]
