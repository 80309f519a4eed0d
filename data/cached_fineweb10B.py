"""Download the GPT-2 tokens of fineweb10B (kjj0/fineweb10B-gpt2) into data/fineweb10B: `python data/cached_fineweb10B.py [N]` fetches the validation
shard and the first N training shards (~100M tokens each); then train with `--data_dir data/fineweb10B`."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from data.download import main  # noqa: E402

if __name__ == "__main__":
    main("kjj0/fineweb10B-gpt2", "fineweb", default_train=103, max_train=103, default_dir="fineweb10B")
