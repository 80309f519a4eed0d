"""Download the GPT-2 tokens of finewebedu10B (kjj0/finewebedu10B-gpt2) into data/finewebedu10B: `python data/cached_finewebedu10B.py [N]` fetches the validation
shard and the first N training shards (~100M tokens each); then train with `--data_dir data/finewebedu10B`."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from data.download import main  # noqa: E402

if __name__ == "__main__":
    main("kjj0/finewebedu10B-gpt2", "finewebedu", default_train=99, max_train=99, default_dir="finewebedu10B")
