"""Token shards: a flat array of token ids on disk, behind a small header.

Fifth stage of the data pipeline. The loader memory-maps a shard, so training on a
corpus larger than RAM costs no more memory than the batches, and many processes (MPI
ranks) share one copy through the page cache.

File format (version 1, all integers little-endian)::

    offset  size  field
         0     8  magic        b"TLTOKENS"
         8     4  version      uint32, = 1
        12     4  dtype code   uint32: 2 = uint16, 4 = uint32 (the item size in bytes)
        16     8  token count  uint64
        24     8  vocab size   uint64 (0 = unknown)
        32    32  reserved     zeros
        64     -  body         token count x item size bytes, the raw array

uint16 halves the disk and page-cache footprint and is used whenever the vocabulary fits
(vocab_size <= 65536); uint32 otherwise. The 64-byte header keeps the body aligned.

Writes are atomic: the shard is written to a temporary name in the same folder, flushed
and fsync'ed, then renamed over the final name (and the folder fsync'ed), so a crash or
a full disk never leaves a half-written file under the final name. The same protocol is
used for every file the pipeline writes (`atomic_write_bytes`).

Train/validation split: by *document*, not by token offset, so no document straddles
the two sets; `split_documents` picks the validation documents from a seed. In the
stream, every document is followed by the tokenizer's end-of-sequence id.
"""

from __future__ import annotations

import os
import secrets
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from nn.checkpoint import fsync_path

from gpt.data.errors import DataError, DataFileNotFoundError

MAGIC = b"TLTOKENS"
FORMAT_VERSION = 1
HEADER_SIZE = 64
_HEADER = struct.Struct("<8sIIQQ")  # magic, version, dtype code, count, vocab size (32 bytes)
_DTYPES = {2: np.dtype("<u2"), 4: np.dtype("<u4")}


# ----------------------------------------------------------------------------- atomic files


def _fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable (the same helper the checkpoints use)."""
    fsync_path(str(folder))


def _open_temp(path: Path) -> tuple[int, str]:
    """Create a fresh temporary file next to ``path``. Unlike ``tempfile.mkstemp`` (mode
    0600) it honours the umask, so the renamed file has ordinary permissions."""
    for _ in range(100):
        tmp = path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666), str(tmp)
        except FileExistsError:
            continue
    raise FileExistsError(f"could not create a temporary file next to {path}")


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temp file in the same folder, fsync, rename)."""
    path = Path(path)
    fd, tmp = _open_temp(path)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(path.parent)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


# ----------------------------------------------------------------------------- writing


def dtype_for_vocab(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (vocab_size <= 65536), else uint32."""
    if vocab_size <= 0:
        raise DataError(f"vocab_size={vocab_size} must be positive")
    if vocab_size <= 1 << 16:
        return _DTYPES[2]
    if vocab_size <= 1 << 32:
        return _DTYPES[4]
    raise DataError(f"vocab_size={vocab_size} does not fit in uint32 token ids")


@dataclass(frozen=True)
class ShardHeader:
    path: str
    version: int
    dtype: np.dtype
    count: int
    vocab_size: int

    @property
    def nbytes(self) -> int:
        return HEADER_SIZE + self.count * self.dtype.itemsize


def _pack_header(dtype: np.dtype, count: int, vocab_size: int) -> bytes:
    head = _HEADER.pack(MAGIC, FORMAT_VERSION, dtype.itemsize, count, vocab_size)
    return head + b"\0" * (HEADER_SIZE - len(head))


class ShardWriter:
    """Stream token ids into a shard; the file appears under its name only on `close`.

    Use as a context manager: an exception inside the block deletes the temporary file
    and leaves any previous shard of that name untouched.

        with ShardWriter("train.bin", vocab_size=4096) as w:
            for ids in documents:
                w.write(ids)
    """

    def __init__(self, path: str | os.PathLike, vocab_size: int):
        self.path = Path(path)
        self.vocab_size = int(vocab_size)
        self.dtype = dtype_for_vocab(self.vocab_size)
        self.count = 0
        fd, self._tmp = _open_temp(self.path)
        self._file = os.fdopen(fd, "wb")
        self._file.write(_pack_header(self.dtype, 0, self.vocab_size))

    def write(self, ids) -> None:
        """Append token ids (any int sequence or array); each must be in [0, vocab_size)."""
        arr = np.asarray(ids)
        if arr.size == 0:
            return
        if arr.ndim != 1 or arr.dtype.kind not in "iu":
            raise DataError(f"token ids must be a 1-D integer sequence, got shape {arr.shape} dtype {arr.dtype}")
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 0 or hi >= self.vocab_size:
            bad = lo if lo < 0 else hi
            raise DataError(f"token id {bad} out of range [0, {self.vocab_size}) while writing {self.path}")
        self._file.write(arr.astype(self.dtype, copy=False).tobytes())
        self.count += arr.size

    def close(self) -> ShardHeader:
        """Finish the header, fsync, and rename into place."""
        try:
            self._file.seek(0)
            self._file.write(_pack_header(self.dtype, self.count, self.vocab_size))
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            os.replace(self._tmp, self.path)
        except BaseException:
            self.abort()
            raise
        _fsync_dir(self.path.parent)
        return ShardHeader(str(self.path), FORMAT_VERSION, self.dtype, self.count, self.vocab_size)

    def abort(self) -> None:
        """Drop the temporary file (the final name is never touched)."""
        if not self._file.closed:
            self._file.close()
        try:
            os.unlink(self._tmp)
        except FileNotFoundError:
            pass

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def write_shard(path: str | os.PathLike, tokens, vocab_size: int) -> ShardHeader:
    """Write a whole array of token ids as one shard (atomically)."""
    with ShardWriter(path, vocab_size) as writer:
        writer.write(np.asarray(tokens).ravel())
    return read_header(path)


# ----------------------------------------------------------------------------- reading


def read_header(path: str | os.PathLike) -> ShardHeader:
    """Parse and validate the header, and check the file size matches it."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(HEADER_SIZE)
    except FileNotFoundError:
        raise DataFileNotFoundError(f"token shard {path} does not exist: run `tensorlite-gpt prepare` first") from None
    if len(raw) < HEADER_SIZE:
        raise DataError(
            f"{path} is not a tensorlite token shard: it has {len(raw)} bytes, fewer than the {HEADER_SIZE}-byte header"
        )
    magic, version, code, count, vocab_size = _HEADER.unpack_from(raw)
    if magic != MAGIC:
        raise DataError(f"{path} is not a tensorlite token shard: magic bytes {magic!r}, expected {MAGIC!r}")
    if version != FORMAT_VERSION:
        raise DataError(
            f"{path} has shard format version {version}, this tensorlite reads version {FORMAT_VERSION}: "
            f"re-run `tensorlite-gpt prepare` to rewrite it"
        )
    if code not in _DTYPES:
        raise DataError(f"{path} has unknown dtype code {code} in its header (expected one of {sorted(_DTYPES)})")
    header = ShardHeader(str(path), version, _DTYPES[code], count, vocab_size)
    if size != header.nbytes:
        body = size - HEADER_SIZE
        raise DataError(
            f"{path} is truncated or corrupt: its header says {count} tokens of {header.dtype.name} "
            f"({count * header.dtype.itemsize} bytes) but the file has {body} bytes after the header; "
            f"re-run `tensorlite-gpt prepare`"
        )
    return header


def read_shard(path: str | os.PathLike) -> np.ndarray:
    """The shard's tokens as a read-only 1-D memory map (uint16 or uint32, little-endian).

    Nothing is read until it is indexed; drop the reference to unmap it."""
    header = read_header(path)
    if header.count == 0:  # mmap cannot map zero bytes
        return np.empty(0, dtype=header.dtype)
    return np.memmap(path, dtype=header.dtype, mode="r", offset=HEADER_SIZE, shape=(header.count,))


# ----------------------------------------------------------------------------- split


def split_documents(n_documents: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic train/validation split of document indices.

    Returns (train, val), each a sorted int64 array (corpus order is kept inside each
    split). With ``val_fraction > 0`` and at least two documents, validation gets at
    least one document and train keeps at least one.
    """
    if not (isinstance(val_fraction, (int, float)) and 0.0 <= val_fraction < 1.0):
        raise DataError(f"val_fraction={val_fraction!r} must be in [0, 1)")
    if n_documents < 0:
        raise DataError(f"n_documents={n_documents} must be >= 0")
    n_val = int(round(n_documents * val_fraction))
    if val_fraction > 0 and n_documents >= 2:
        n_val = min(max(n_val, 1), n_documents - 1)
    elif n_documents < 2:
        n_val = 0
    order = np.random.default_rng(seed).permutation(n_documents)
    val = np.sort(order[:n_val]).astype(np.int64)
    train = np.sort(order[n_val:]).astype(np.int64)
    return train, val
