"""Download the GPT-2 tokens of fineweb100B (kjj0/fineweb100B-gpt2) into data/fineweb100B: `python data/cached_fineweb100B.py [N]` fetches the validation
shard and the first N training shards (~100M tokens each); then train with `--data_dir data/fineweb100B`."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from data.download import main  # noqa: E402

if __name__ == "__main__":
    main("kjj0/fineweb100B-gpt2", "fineweb", default_train=1030, max_train=1030, default_dir="fineweb100B")
