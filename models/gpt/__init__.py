"""The GPT of the Dion paper's experiments: the model (`model.py`) and its tensor-parallel plan (`parallelize.py`)."""
from models.gpt.model import GPT, GPT2_VOCAB_SIZE, PRESETS, GPTConfig, padded_vocab_size
from models.gpt.parallelize import apply_tensor_parallel

Config = GPTConfig
Model = GPT

__all__ = ["Config", "GPT", "GPT2_VOCAB_SIZE", "GPTConfig", "Model", "PRESETS", "apply_tensor_parallel",
           "padded_vocab_size"]
