"""gpt.data.loader: batch shapes, determinism, exact resume, sequential coverage."""

import json

import numpy as np
import pytest

from gpt.data.errors import DataError
from gpt.data.loader import BatchLoader
from gpt.data.shards import write_shard

N = 5000


@pytest.fixture
def shard(tmp_path):
    tokens = np.random.default_rng(0).integers(0, 1000, size=N)
    path = tmp_path / "train.bin"
    write_shard(path, tokens, vocab_size=1000)
    return path, tokens


def test_batches_are_shifted_windows_of_the_data(shard):
    path, tokens = shard
    loader = BatchLoader(path, batch_size=4, block_size=16, seed=0)
    starts = loader.starts(0)
    x, y = loader.next_batch()
    assert x.shape == y.shape == (4, 16) and x.dtype == y.dtype == np.int64
    for row, s in enumerate(starts):
        np.testing.assert_array_equal(x[row], tokens[s : s + 16])
        np.testing.assert_array_equal(y[row], tokens[s + 1 : s + 17])
    assert loader.step == 1


def test_same_seed_same_batches_other_seed_other_batches(shard):
    path, tokens = shard
    a = BatchLoader(path, 8, 32, seed=5)
    b = BatchLoader(tokens, 8, 32, seed=5)  # an in-memory array gives the same batches
    c = BatchLoader(path, 8, 32, seed=6)
    for _ in range(5):
        xa, ya = next(a)
        xb, yb = next(b)
        assert np.array_equal(xa, xb) and np.array_equal(ya, yb)
    assert not np.array_equal(a.get_batch(0)[0], c.get_batch(0)[0])
    assert not np.array_equal(a.get_batch(0)[0], a.get_batch(1)[0])


@pytest.mark.parametrize("mode", ["random", "sequential"])
def test_resume_gives_identical_next_batches(shard, mode):
    path, _ = shard
    original = BatchLoader(path, 4, 64, seed=11, mode=mode)
    for _ in range(7):
        original.next_batch()
    state = json.loads(json.dumps(original.state_dict()))  # it survives a JSON checkpoint
    expected = [original.next_batch() for _ in range(3)]
    resumed = BatchLoader(path, 4, 64, seed=0, mode=mode)
    resumed.load_state_dict(state)
    assert resumed.seed == 11 and resumed.step == 7
    for ex, ey in expected:
        x, y = resumed.next_batch()
        assert np.array_equal(x, ex) and np.array_equal(y, ey)


def test_sequential_mode_covers_every_window(shard):
    path, tokens = shard
    loader = BatchLoader(path, batch_size=3, block_size=100, mode="sequential")
    assert loader.num_windows == (N - 1) // 100 == 49
    assert loader.steps_per_epoch == 17
    seen = set()
    for step in range(loader.steps_per_epoch):
        starts = loader.starts(step)
        x, y = loader.next_batch()
        for row, start in enumerate(starts.tolist()):
            np.testing.assert_array_equal(x[row], tokens[start : start + 100])
            np.testing.assert_array_equal(y[row], tokens[start + 1 : start + 101])
            seen.add(start)
    assert seen == set(range(0, 4900, 100))  # every window, at least once
    first = BatchLoader(path, batch_size=3, block_size=100, mode="sequential").get_batch(0)[0]
    np.testing.assert_array_equal(first.ravel(), tokens[:300])  # in order, no gaps


def test_block_size_too_large_is_a_clear_error(shard):
    path, _ = shard
    with pytest.raises(DataError, match=rf"block_size=5000 is too large for .*train.bin: it has {N} tokens"):
        BatchLoader(path, 2, N)
    BatchLoader(path, 2, N - 1).next_batch()  # exactly block_size + 1 tokens is enough


def test_state_mismatch_and_bad_options(shard):
    path, _ = shard
    state = BatchLoader(path, 4, 32).state_dict()
    with pytest.raises(DataError, match="block_size=32 but this loader has block_size=64"):
        BatchLoader(path, 4, 64).load_state_dict(state)
    with pytest.raises(DataError, match="mode='shuffled'"):
        BatchLoader(path, 4, 32, mode="shuffled")
    with pytest.raises(DataError, match="batch_size=0"):
        BatchLoader(path, 0, 32)
    with pytest.raises(DataError, match="1-D integers"):
        BatchLoader(np.zeros((10, 10)), 1, 2)


# ----------------------------------------------------------------------------- data parallel
@pytest.mark.parametrize("mode", ["random", "sequential"])
@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_ranks_together_read_exactly_the_single_process_batch(shard, mode, world_size):
    path, _ = shard
    single = BatchLoader(path, 8, 32, seed=4, mode=mode)
    ranks = [BatchLoader(path, 8, 32, seed=4, mode=mode, rank=r, world_size=world_size)
             for r in range(world_size)]
    for _ in range(5):
        x, y = single.next_batch()
        parts = [loader.next_batch() for loader in ranks]
        assert all(px.shape == (8 // world_size, 32) for px, _ in parts)
        assert np.array_equal(np.concatenate([px for px, _ in parts]), x)   # rank r: rows
        assert np.array_equal(np.concatenate([py for _, py in parts]), y)   # [r*b/w, (r+1)*b/w)


def test_loader_state_resumes_under_another_number_of_ranks(shard):
    path, _ = shard
    two = [BatchLoader(path, 8, 32, seed=9, rank=r, world_size=2) for r in range(2)]
    for loader in two:
        for _ in range(3):
            loader.next_batch()
    state = json.loads(json.dumps(two[0].state_dict()))
    assert state == two[1].state_dict()                  # the same on every rank
    expected = BatchLoader(path, 8, 32, seed=9)
    expected.load_state_dict(state)                      # one process continues...
    x, _ = expected.next_batch()
    four = [BatchLoader(path, 8, 32, rank=r, world_size=4) for r in range(4)]
    for loader in four:                                  # ... or four ranks do
        loader.load_state_dict(state)
    assert np.array_equal(np.concatenate([loader.next_batch()[0] for loader in four]), x)


def test_batch_size_is_the_global_batch_and_must_split_evenly(shard):
    path, _ = shard
    with pytest.raises(DataError, match=r"batch_size=6 is the global batch and must be divisible by world_size=4"):
        BatchLoader(path, 6, 32, world_size=4)
    with pytest.raises(DataError, match=r"rank=4 must be an integer in \[0, world_size=4\)"):
        BatchLoader(path, 8, 32, rank=4, world_size=4)
    with pytest.raises(DataError, match="world_size=0 must be a positive integer"):
        BatchLoader(path, 8, 32, world_size=0)
    loader = BatchLoader(path, 8, 32, rank=1, world_size=4)
    assert loader.local_batch_size == 2 and "rank=1, world_size=4" in repr(loader)


def test_many_shards_read_as_their_concatenation(tmp_path):
    """A folder prepared under mpiexec has one shard per rank: the loader reads them as one
    stream, rows crossing from one shard into the next included (empty shards skipped)."""
    tokens = np.random.default_rng(3).integers(0, 500, size=3000, dtype=np.int64)
    cuts = [0, 700, 700, 1234, 2999, 3000]  # an empty shard, and a one-token one
    paths = []
    for k, (lo, hi) in enumerate(zip(cuts[:-1], cuts[1:])):
        paths.append(tmp_path / f"train-{k:05d}-of-00005.bin")
        write_shard(paths[-1], tokens[lo:hi], vocab_size=500)
    for mode in ("random", "sequential"):
        many = BatchLoader(paths, 16, 50, seed=2, mode=mode)
        one = BatchLoader(tokens, 16, 50, seed=2, mode=mode)
        assert many.n_tokens == 3000 and "5 shards" in repr(many)
        crossed = 0
        for step in range(40):
            (x, y), (x1, y1) = many.get_batch(step), one.get_batch(step)
            assert np.array_equal(x, x1) and np.array_equal(y, y1)
            s = many.starts(step)
            crossed += int(np.any((s[:, None] < np.array(cuts[1:-1])) & (s[:, None] + 51 > np.array(cuts[1:-1]))))
        assert crossed > 5  # the boundaries were crossed
