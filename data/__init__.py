"""Token shards (FineWeb format), the embedded Shakespeare corpus and the distributed streaming loader."""
from data.loader import DistributedTokenLoader, check_data, find_shards, validation_batches
from data.shards import ShardError, read_header, read_shard, write_shard

__all__ = ["DistributedTokenLoader", "ShardError", "check_data", "find_shards", "read_header", "read_shard", "validation_batches",
           "write_shard"]
