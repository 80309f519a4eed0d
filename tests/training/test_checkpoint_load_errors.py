"""A checkpoint that cannot load into the model is a user error naming the checkpoint and the real cause (DCP's
CheckpointException is a BaseException: it used to escape as a traceback). train.py refuses such a resume earlier,
from the config recorded in the checkpoint (tests/training/test_faults.py); scripts that load weights into a model
they build themselves (generate.py, export_checkpoint.py) meet this path."""
import pytest

from tests.training.helpers import run_train
from trainer.build import build_model
from trainer.checkpoint import latest_checkpoint, load_model_weights
from trainer.config import build_config
from trainer.errors import CheckpointError


def test_loading_into_another_model_shape_names_the_checkpoint_and_the_missing_key(tmp_path, capsys):
    assert run_train(tmp_path, "--num_iterations", "1", "--checkpoint_freq", "1") == 0
    checkpoint = latest_checkpoint(tmp_path / "checkpoints")
    deeper = build_model(build_config(["--config", str(tmp_path / "config.yaml"), "--n_layer", "2"]))
    with pytest.raises(CheckpointError) as error:
        load_model_weights(checkpoint, deeper)
    message = str(error.value)
    assert "\n" not in message and f"{checkpoint}: cannot load" in message
    assert "Missing key in checkpoint state_dict: model.blocks.1." in message
