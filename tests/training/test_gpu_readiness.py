"""What train.py sets up for a GPU, checked on a machine without one: TF32 float32 matmuls on CUDA only."""
from __future__ import annotations

import torch

import train
from trainer.distributed import Distributed


def test_train_turns_on_tf32_matmuls_on_cuda_and_leaves_cpu_alone(monkeypatch, tmp_path, full_float32_matmuls):
    """main() on the CPU (the real device check) and with a CUDA device in place of the real one (no GPU here):
    the Trainer sees "high" (TF32) only on CUDA."""
    seen = {}

    class RecordingTrainer:
        def __init__(self, config, env, stop):
            seen[env.device.type] = torch.get_float32_matmul_precision()

        def train(self):
            pass

    monkeypatch.setattr(train, "Trainer", RecordingTrainer)
    assert train.main(["--run_dir", str(tmp_path / "cpu")]) == 0
    assert torch.get_float32_matmul_precision() == "highest"
    cuda = Distributed(rank=0, world_size=1, local_rank=0, device=torch.device("cuda", 0), dp=1, fs=1, tp=1)
    monkeypatch.setattr(train, "init_distributed", lambda config: cuda)
    assert train.main(["--run_dir", str(tmp_path / "cuda")]) == 0
    assert seen == {"cpu": "highest", "cuda": "high"}
    assert torch.backends.cuda.matmul.allow_tf32  # what "high" means for CUDA's float32 products
