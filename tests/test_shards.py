"""gpt.data.shards: the token shard format, atomic writes, the document split."""

import os
import struct

import numpy as np
import pytest

from gpt.data import shards
from gpt.data.errors import DataError, DataFileNotFoundError
from gpt.data.shards import (
    HEADER_SIZE,
    MAGIC,
    ShardWriter,
    atomic_write_bytes,
    read_header,
    read_shard,
    split_documents,
    write_shard,
)


def test_round_trip_uint16(tmp_path):
    tokens = np.random.default_rng(0).integers(0, 4096, size=10_000)
    header = write_shard(tmp_path / "t.bin", tokens, vocab_size=4096)
    assert header.dtype == np.dtype("<u2") and header.count == 10_000 and header.vocab_size == 4096
    assert (tmp_path / "t.bin").stat().st_size == HEADER_SIZE + 2 * 10_000
    data = read_shard(tmp_path / "t.bin")
    assert isinstance(data, np.memmap) and data.dtype == np.uint16
    np.testing.assert_array_equal(data, tokens)
    assert (tmp_path / "t.bin").read_bytes()[:8] == MAGIC


def test_round_trip_uint32_for_large_vocab(tmp_path):
    tokens = np.array([0, 65535, 65536, 99_999], dtype=np.int64)
    header = write_shard(tmp_path / "t.bin", tokens, vocab_size=100_000)
    assert header.dtype == np.dtype("<u4")
    np.testing.assert_array_equal(read_shard(tmp_path / "t.bin"), tokens)
    assert shards.dtype_for_vocab(65536) == np.uint16 and shards.dtype_for_vocab(65537) == np.uint32


def test_streaming_writer_and_empty_shard(tmp_path):
    with ShardWriter(tmp_path / "s.bin", vocab_size=10) as w:
        w.write([1, 2, 3])
        w.write(np.array([], dtype=np.int64))
        w.write(np.array([9], dtype=np.uint8))
    np.testing.assert_array_equal(read_shard(tmp_path / "s.bin"), [1, 2, 3, 9])
    write_shard(tmp_path / "empty.bin", [], vocab_size=10)
    assert len(read_shard(tmp_path / "empty.bin")) == 0


def test_out_of_range_ids_are_refused(tmp_path):
    with pytest.raises(DataError, match=r"token id 10 out of range \[0, 10\)"):
        write_shard(tmp_path / "t.bin", [1, 10], vocab_size=10)
    with pytest.raises(DataError, match="token id -1"):
        write_shard(tmp_path / "t.bin", [-1, 3], vocab_size=10)
    assert not (tmp_path / "t.bin").exists()


@pytest.fixture
def shard(tmp_path):
    path = tmp_path / "t.bin"
    write_shard(path, np.arange(100), vocab_size=256)
    return path


def patch(path, offset, data):
    raw = bytearray(path.read_bytes())
    raw[offset : offset + len(data)] = data
    path.write_bytes(bytes(raw))


def test_wrong_magic(shard):
    patch(shard, 0, b"NOTTOKEN")
    with pytest.raises(DataError, match=r"t\.bin is not a tensorlite token shard: magic bytes b'NOTTOKEN'"):
        read_shard(shard)


def test_wrong_version(shard):
    patch(shard, 8, struct.pack("<I", 7))
    with pytest.raises(DataError, match=r"t\.bin has shard format version 7, this tensorlite reads version 1"):
        read_shard(shard)


def test_unknown_dtype_code(shard):
    patch(shard, 12, struct.pack("<I", 3))
    with pytest.raises(DataError, match="unknown dtype code 3"):
        read_header(shard)


def test_truncated_and_extended_files(shard):
    raw = shard.read_bytes()
    shard.write_bytes(raw[:-7])
    with pytest.raises(DataError, match=r"truncated or corrupt: its header says 100 tokens of uint16 \(200 bytes\) but the file has 193"):
        read_shard(shard)
    shard.write_bytes(raw + b"\0\0")
    with pytest.raises(DataError, match="has 202 bytes after the header"):
        read_shard(shard)
    shard.write_bytes(raw[:10])
    with pytest.raises(DataError, match="fewer than the 64-byte header"):
        read_shard(shard)


def test_missing_file(tmp_path):
    with pytest.raises(DataFileNotFoundError, match="nope.bin does not exist"):
        read_shard(tmp_path / "nope.bin")


def test_failed_write_leaves_no_partial_file_and_keeps_the_old_one(tmp_path):
    path = tmp_path / "t.bin"
    write_shard(path, [1, 2, 3], vocab_size=10)
    before = path.read_bytes()
    with pytest.raises(RuntimeError, match="disk on fire"):
        with ShardWriter(path, vocab_size=10) as w:
            w.write(np.arange(10))
            raise RuntimeError("disk on fire")
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.bin"]  # no temp file left behind


def test_atomic_write_bytes_cleans_up_when_rename_fails(tmp_path, monkeypatch):
    target = tmp_path / "f.json"

    def broken_replace(src, dst):
        raise OSError("rename failed")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="rename failed"):
        atomic_write_bytes(target, b"{}")
    assert list(tmp_path.iterdir()) == []


def test_split_documents_is_deterministic_disjoint_and_complete():
    train, val = split_documents(100, 0.1, seed=3)
    assert len(val) == 10 and len(train) == 90
    assert sorted(np.concatenate([train, val]).tolist()) == list(range(100))
    t2, v2 = split_documents(100, 0.1, seed=3)
    assert np.array_equal(val, v2) and np.array_equal(train, t2)
    assert not np.array_equal(split_documents(100, 0.1, seed=4)[1], val)
    assert [len(x) for x in split_documents(3, 0.01, 0)] == [2, 1]  # at least one val document
    assert [len(x) for x in split_documents(5, 0.0, 0)] == [5, 0]
    assert [len(x) for x in split_documents(1, 0.5, 0)] == [1, 0]
    with pytest.raises(DataError, match="val_fraction=1.0"):
        split_documents(10, 1.0, 0)
