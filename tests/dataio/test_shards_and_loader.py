import numpy as np
import pytest
import torch

from data import DistributedTokenLoader, ShardError, find_shards, read_header, read_shard, validation_batches, write_shard
from data.corpus import ensure_embedded_corpus, markdown_to_text
from data.shards import HEADER_BYTES, MAGIC


def make_shards(directory, sizes, split="train", seed=0):
    rng = np.random.default_rng(seed)
    paths = []
    for index, size in enumerate(sizes):
        path = directory / f"fineweb_{split}_{index:06d}.bin"
        write_shard(path, rng.integers(0, 50257, size))
        paths.append(path)
    return paths


def test_shard_round_trip_preserves_tokens_and_header(tmp_path):
    tokens = np.array([0, 1, 50256, 65535, 42], dtype=np.int64)
    write_shard(tmp_path / "a.bin", tokens)
    assert read_header(tmp_path / "a.bin") == 5
    np.testing.assert_array_equal(read_shard(tmp_path / "a.bin"), tokens)
    header = np.fromfile(tmp_path / "a.bin", dtype="<i4", count=3)
    assert header.tolist() == [MAGIC, 1, 5]
    assert (tmp_path / "a.bin").stat().st_size == HEADER_BYTES + 2 * 5


def test_write_rejects_ids_that_do_not_fit_uint16(tmp_path):
    with pytest.raises(ValueError, match="65535"):
        write_shard(tmp_path / "a.bin", np.array([70000]))


@pytest.mark.parametrize("corrupt, message", [
    (lambda raw: np.concatenate([[1234], raw[1:]]), "bad magic number 1234"),
    (lambda raw: np.concatenate([raw[:1], [7], raw[2:]]), "unsupported shard version 7"),
    (lambda raw: np.concatenate([raw[:2], [999], raw[3:]]), "header says 999 tokens"),
])
def test_corrupt_header_fails_naming_the_file(tmp_path, corrupt, message):
    path = tmp_path / "fineweb_train_000001.bin"
    write_shard(path, np.arange(100))
    raw = np.fromfile(path, dtype="<i4")
    corrupt(raw).astype("<i4").tofile(path)
    with pytest.raises(ShardError, match=message) as error:
        read_shard(path)
    assert "fineweb_train_000001.bin" in str(error.value)


def test_truncated_file_fails_naming_the_file(tmp_path):
    path = tmp_path / "s.bin"
    write_shard(path, np.arange(100))
    path.write_bytes(path.read_bytes()[:HEADER_BYTES + 50])
    with pytest.raises(ShardError, match=r"s.bin: header says 100 tokens"):
        read_header(path)
    (tmp_path / "tiny.bin").write_bytes(b"abc")
    with pytest.raises(ShardError, match="tiny.bin.*shorter than"):
        read_header(tmp_path / "tiny.bin")


def test_find_shards_matches_every_download_scripts_names(tmp_path):
    for name in ("fineweb_train_000001.bin", "finewebedu_train_000001.bin", "fineweb_val_000000.bin",
                 "finewebedu_val_000000.bin", "shakespeare_train_000000.bin", "notes.txt"):
        write_shard(tmp_path / name, np.arange(10)) if name.endswith(".bin") else (tmp_path / name).write_text("x")
    assert [p.name for p in find_shards(tmp_path, "train")] == [
        "fineweb_train_000001.bin", "finewebedu_train_000001.bin", "shakespeare_train_000000.bin"]
    assert len(find_shards(tmp_path, "val")) == 2
    with pytest.raises(FileNotFoundError, match="no train shards"):
        find_shards(tmp_path.parent, "train")


def test_ranks_read_disjoint_slices_that_tile_the_global_batch(tmp_path):
    files = make_shards(tmp_path, [1000, 700])
    batch, seq = 2, 8
    single = DistributedTokenLoader(files, 2 * batch, seq, rank=0, world_size=1)
    ranks = [DistributedTokenLoader(files, batch, seq, rank=r, world_size=2) for r in range(2)]
    for _ in range(150):  # crosses shard boundaries and wraps around
        x, y = single.next_batch()
        parts = [loader.next_batch() for loader in ranks]
        torch.testing.assert_close(torch.cat([p[0] for p in parts]), x, rtol=0, atol=0)
        torch.testing.assert_close(torch.cat([p[1] for p in parts]), y, rtol=0, atol=0)
        torch.testing.assert_close(x[:, 1:], y[:, :-1], rtol=0, atol=0)
    assert single.epoch >= 1


@pytest.mark.parametrize("order", ["sequential", "reference"])
def test_one_shard_feeds_1024_ranks_each_its_own_slice(tmp_path, order):
    """Fewer shards than ranks is fine: the ranks share each shard, rank r reading the r-th slice of every global
    batch (a shard only needs one global batch of tokens, checked when the loader starts). The reference order
    moves a high rank to the next shard up to one batch early (the module docstring), so it is read once here."""
    batch, seq, world = 1, 4, 1024
    step = world * batch * seq
    (path,) = make_shards(tmp_path, [2 * step + 1])
    tokens = torch.from_numpy(read_shard(path).astype(np.int64))
    for rank in (0, 1, 511, 1023):
        loader = DistributedTokenLoader([path], batch, seq, rank=rank, world_size=world, order=order)
        for read in range(2 if order == "sequential" else 1):
            start = read * step + rank * seq
            inputs, targets = loader.next_batch()
            assert inputs.flatten().tolist() == tokens[start:start + seq].tolist()
            assert targets.flatten().tolist() == tokens[start + 1:start + seq + 1].tolist()


def test_loader_resume_continues_exactly(tmp_path):
    files = make_shards(tmp_path, [500, 400, 300])
    straight = DistributedTokenLoader(files, 3, 10, rank=1, world_size=2)
    expected = [straight.next_batch()[0] for _ in range(30)]
    first = DistributedTokenLoader(files, 3, 10, rank=1, world_size=2)
    got = [first.next_batch()[0] for _ in range(13)]
    resumed = DistributedTokenLoader(files, 3, 10, rank=1, world_size=2)
    resumed.load_state_dict(first.state_dict())
    got += [resumed.next_batch()[0] for _ in range(17)]
    for a, b in zip(expected, got):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_resume_at_other_data_parallel_size_fails_clearly(tmp_path):
    files = make_shards(tmp_path, [500])
    state = DistributedTokenLoader(files, 2, 10, rank=0, world_size=2).state_dict()
    with pytest.raises(ValueError, match="saved with 2 data-parallel ranks but this run has 4"):
        DistributedTokenLoader(files, 2, 10, rank=0, world_size=4).load_state_dict(state)


def test_shard_smaller_than_a_global_batch_is_rejected(tmp_path):
    files = make_shards(tmp_path, [50])
    with pytest.raises(ValueError, match="fineweb_train_000000.bin: shard has 50 tokens"):
        DistributedTokenLoader(files, 4, 16)


def test_validation_reads_the_same_fixed_tokens_each_time(tmp_path):
    files = make_shards(tmp_path, [400], split="val")
    first = [x for x, _ in validation_batches(files, 2, 10, val_tokens=100)]
    second = [x for x, _ in validation_batches(files, 2, 10, val_tokens=100)]
    assert len(first) == 5
    for a, b in zip(first, second):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    with pytest.raises(ValueError, match="val_tokens"):
        list(validation_batches(files, 2, 10, val_tokens=10))


def test_embedded_corpus_builds_offline_with_disjoint_train_and_val(tmp_path):
    directory = ensure_embedded_corpus(tmp_path)
    train, val = find_shards(directory, "train"), find_shards(directory, "val")
    train_tokens = sum(read_header(p) for p in train)
    val_tokens = sum(read_header(p) for p in val)
    assert train_tokens > 1_000_000 and val_tokens > 50_000
    assert read_shard(val[0])[0] == 50256  # documents start with end-of-text
    assert ensure_embedded_corpus(tmp_path) == directory  # cached: second call reuses the shards


def test_markdown_markup_is_stripped():
    text = markdown_to_text("# Hamlet\n\n**HAMLET**  \n_Enter Ghost_\nTo be, or not to be  \n")
    assert text == "Hamlet\n\nHAMLET\nEnter Ghost\nTo be, or not to be\n"


def test_failed_download_says_how_much_it_would_fetch_and_leaves_no_empty_directory(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parents[2]
    target = tmp_path / "fineweb10B"
    result = subprocess.run([sys.executable, "data/cached_fineweb10B.py", "--local_dir", str(target)], cwd=root,
                            capture_output=True, text=True, timeout=900, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode != 0
    assert "fetching 104 (~20.8 GB; pass a number of training shards to fetch fewer)" in result.stdout
    assert "error: could not download fineweb_val_000000.bin" in result.stderr and "Traceback" not in result.stderr
    assert not target.exists()


def test_val_tokens_beyond_the_validation_split_is_refused_instead_of_wrapping(tmp_path):
    from data.loader import check_data
    train = make_shards(tmp_path, [4096], "train")
    val = make_shards(tmp_path, [1000], "val", seed=1)  # 999 targets: 3 batches of 2 x 128 tokens
    check_data(train, val, batch_size=2, sequence_length=128, world_size=1, num_batches=1, vocab_size=50304,
               val_tokens=768)
    with pytest.raises(ShardError, match=r"data.val_tokens: 1024 is more than the validation split holds in whole "
                                         r"batches \(768 tokens\)"):
        check_data(train, val, batch_size=2, sequence_length=128, world_size=1, num_batches=1, vocab_size=50304,
                   val_tokens=1024)


@pytest.mark.parametrize("order", ["sequential", "reference"])
def test_run_with_accumulation_checks_every_shard_its_micro_batches_reach(tmp_path, order, capsys):
    # 10 steps x 2 micro-batches of 4 x 32 tokens read 2,560 tokens: past the first shard (1,500) into the second,
    # whose token id 60000 >= vocab_size must stop the run before it starts (counting steps, not micro-batches,
    # scanned the first shard only and crashed at step 6 inside the embedding).
    from tests.training.helpers import run_train
    data = tmp_path / "data"
    data.mkdir()
    make_shards(data, [1500], "train")
    write_shard(data / "fineweb_train_000001.bin", np.full(3000, 60000))
    make_shards(data, [2000], "val", seed=1)
    code = run_train(tmp_path / "run", "--data.dir", str(data), "--batch_size", "8", "--num_iterations", "10",
                     "--data.order", order)
    assert code == 2
    err = capsys.readouterr().err
    assert "fineweb_train_000001.bin: token id 60000 at position 0 is >= vocab_size" in err
