from models.gpt import GPT, GPTConfig, PRESETS, padded_vocab_size

__all__ = ["GPT", "GPTConfig", "PRESETS", "padded_vocab_size"]
