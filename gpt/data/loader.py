"""Batches of (input, target) token blocks from a shard, reproducible and resumable.

Last stage of the data pipeline. A batch is ``(x, y)``, two int64 arrays of shape
(batch_size, block_size) where ``y[:, t] == x[:, t + 1]`` in the token stream: the model
predicts every next token of every row.

Modes
-----
* ``"random"`` (training): each row starts at a uniformly random offset. The offsets of
  step ``s`` come from ``np.random.default_rng([seed, s])``, a generator seeded by the
  step itself, so batch ``s`` is a pure function of (data, seed, s). Resuming therefore
  only needs the step counter: `state_dict` is a tiny JSON-able dict, and a run resumed
  from it sees exactly the batches it would have seen (no generator state to pickle).
* ``"sequential"`` (evaluation): the stream is cut into non-overlapping windows of
  ``block_size + 1`` tokens (consecutive windows share their boundary token), taken in
  order, ``batch_size`` per step, wrapping around at the end; `steps_per_epoch` steps
  see every window at least once.

Several shards (a preparation under mpiexec writes one per rank) are one stream, their
concatenation in order; a row that crosses from one into the next is read from both.
The shard is memory-mapped afresh for each batch and released right after, so the
process never keeps a growing set of touched pages mapped (the NumPy memmap "leak"
seen when one map is held through a long run); opening a map is a system call, cheap
next to a forward pass. An in-memory array can be passed instead of a path.

Data parallelism: ``batch_size`` is the *global* batch. With ``world_size`` ranks, rank
``r`` reads rows ``[r*b/w, (r+1)*b/w)`` of the batch one process would read at the same
step (the row offsets are computed for the whole batch, then sliced), so the ranks
together see exactly the single-process batches, and the state (step, seed, global
batch size) is the same on every rank: a run can resume under another number of ranks.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from gpt.data.errors import DataError
from gpt.data.shards import HEADER_SIZE, read_header

MODES = ("random", "sequential")
STATE_VERSION = 1


class BatchLoader:
    """Yields ``(x, y)`` int64 arrays of shape (batch_size, block_size), forever.

    Args:
        source: a shard path (see `gpt.data.shards`), a list of shard paths (read as one
            stream, in order: a folder prepared under mpiexec has one shard per rank,
            `gpt.data.prepare.load_prepared` lists them), or a 1-D integer array of token ids.
        batch_size: rows per batch.
        block_size: tokens per row (the model's context length).
        seed: the random-mode seed (ignored by sequential mode, kept in the state).
        mode: ``"random"`` or ``"sequential"``.
        rank, world_size: this rank's slice of each batch under data parallelism:
            ``batch_size`` is the global batch and must be divisible by ``world_size``;
            each batch has ``batch_size // world_size`` rows.
    """

    def __init__(
        self,
        source: str | os.PathLike | np.ndarray,
        batch_size: int,
        block_size: int,
        seed: int = 0,
        mode: str = "random",
        rank: int = 0,
        world_size: int = 1,
    ):
        for name, value in (("batch_size", batch_size), ("block_size", block_size), ("world_size", world_size)):
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
                raise DataError(f"{name}={value!r} must be a positive integer")
        if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or seed < 0:
            raise DataError(f"seed={seed!r} must be a non-negative integer")
        if mode not in MODES:
            raise DataError(f"mode={mode!r} is not a loader mode: use one of {MODES}")
        if not isinstance(rank, (int, np.integer)) or isinstance(rank, bool) or not 0 <= rank < world_size:
            raise DataError(f"rank={rank!r} must be an integer in [0, world_size={world_size})")
        if batch_size % world_size:
            raise DataError(
                f"batch_size={batch_size} is the global batch and must be divisible by world_size={world_size} "
                f"(each rank reads batch_size / world_size rows); use a multiple of {world_size}"
            )
        self.batch_size, self.block_size, self.seed, self.mode = int(batch_size), int(block_size), int(seed), mode
        self.rank, self.world_size = int(rank), int(world_size)
        self.local_batch_size = self.batch_size // self.world_size
        self.step = 0

        # the stream is the concatenation of the parts: (shard path or array, dtype, tokens)
        if isinstance(source, (str, os.PathLike)) or (isinstance(source, (list, tuple)) and source
                                                      and all(isinstance(p, (str, os.PathLike)) for p in source)):
            paths = [source] if isinstance(source, (str, os.PathLike)) else list(source)
            headers = [read_header(p) for p in paths]
            self._parts = [(Path(p), h.dtype, h.count) for p, h in zip(paths, headers) if h.count]
            self.name = str(paths[0]) if len(paths) == 1 else f"{len(paths)} shards ({paths[0]}, ...)"
        else:
            array = np.asarray(source)
            if array.ndim != 1 or array.dtype.kind not in "iu":
                raise DataError(f"token array must be 1-D integers, got shape {array.shape} dtype {array.dtype}")
            self._parts = [(array, array.dtype, len(array))]
            self.name = "token array"
        counts = np.array([n for _, _, n in self._parts], dtype=np.int64)
        self._starts = np.r_[0, np.cumsum(counts)].astype(np.int64)  # part k holds [starts[k], starts[k+1])
        self.n_tokens = int(self._starts[-1])
        if self.n_tokens < self.block_size + 1:
            raise DataError(
                f"block_size={self.block_size} is too large for {self.name}: it has {self.n_tokens} tokens and "
                f"one row needs block_size + 1 = {self.block_size + 1}; use a smaller block_size or more data"
            )

    # ------------------------------------------------------------------ geometry

    @property
    def num_windows(self) -> int:
        """Sequential mode: the number of non-overlapping windows in the stream."""
        return (self.n_tokens - 1) // self.block_size

    @property
    def steps_per_epoch(self) -> int:
        """Sequential mode: steps that see every window at least once."""
        return -(-self.num_windows // self.batch_size)

    def starts(self, step: int) -> np.ndarray:
        """Row start offsets of the whole (global) batch ``step``, (batch_size,) int64."""
        if self.mode == "random":
            rng = np.random.default_rng([self.seed, int(step)])
            return rng.integers(0, self.n_tokens - self.block_size, size=self.batch_size, dtype=np.int64)
        windows = (int(step) * self.batch_size + np.arange(self.batch_size, dtype=np.int64)) % self.num_windows
        return windows * self.block_size

    # ------------------------------------------------------------------ batches

    def tokens(self) -> np.ndarray:
        """The whole token stream: a read-only memory map of the shard (or the array), or the
        concatenation of several shards (read into memory)."""
        if len(self._parts) == 1:
            return self._open(0)
        return np.concatenate([self._open(k) for k in range(len(self._parts))])

    def token_parts(self) -> list[np.ndarray]:
        """The token stream as its shards, each a read-only memory map (or the array): nothing
        read into memory (the unigram baseline counts them chunk by chunk)."""
        return [self._open(k) for k in range(len(self._parts))]

    def _open(self, k: int) -> np.ndarray:
        source, dtype, count = self._parts[k]
        if isinstance(source, np.ndarray):
            return source
        return np.memmap(source, dtype=dtype, mode="r", offset=HEADER_SIZE, shape=(count,))

    def get_batch(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        """This rank's rows of batch number ``step`` (does not move the loader's position)."""
        b = self.local_batch_size
        starts = self.starts(step)[self.rank * b : (self.rank + 1) * b]  # this rank's slice
        maps: dict[int, np.ndarray] = {}  # the parts this batch reads, mapped once each
        width = self.block_size + 1
        rows = np.empty((b, width), dtype=np.int64)  # (local batch, block + 1)
        for r, s in enumerate(starts.tolist()):
            # a row may run from one shard into the next: copy it piece by piece
            k, done = int(np.searchsorted(self._starts, s, side="right")) - 1, 0
            while done < width:
                if k not in maps:
                    maps[k] = self._open(k)
                lo = s + done - int(self._starts[k])
                take = min(width - done, self._parts[k][2] - lo)
                rows[r, done : done + take] = maps[k][lo : lo + take]  # contiguous read from the map
                done += take
                k += 1
        del maps  # unmap
        return rows[:, :-1], rows[:, 1:]

    def next_batch(self) -> tuple[np.ndarray, np.ndarray]:
        batch = self.get_batch(self.step)
        self.step += 1
        return batch

    def __iter__(self) -> "BatchLoader":
        return self

    def __next__(self) -> tuple[np.ndarray, np.ndarray]:
        return self.next_batch()

    # ------------------------------------------------------------------ resume

    def state_dict(self) -> dict:
        """A small JSON-able dict: enough to resume at exactly the next batch."""
        return {
            "version": STATE_VERSION,
            "mode": self.mode,
            "seed": self.seed,
            "step": self.step,
            "batch_size": self.batch_size,
            "block_size": self.block_size,
            "n_tokens": self.n_tokens,
        }

    def load_state_dict(self, state: dict) -> None:
        """Resume from `state_dict`. The seed and step are taken from the state; the batch
        geometry and the data must match, or the resumed batches would differ. The number
        of ranks may differ: the state holds the global batch, not a rank's slice."""
        if state.get("version") != STATE_VERSION:
            raise DataError(f"loader state version {state.get('version')!r} is not {STATE_VERSION}")
        for key in ("mode", "batch_size", "block_size", "n_tokens"):
            if state.get(key) != getattr(self, key):
                raise DataError(
                    f"loader state has {key}={state.get(key)!r} but this loader has {key}={getattr(self, key)!r}: "
                    f"build the loader with the same data and options to resume"
                )
        self.seed = int(state["seed"])
        self.step = int(state["step"])

    def __repr__(self) -> str:
        return (
            f"BatchLoader({self.name!r}, batch_size={self.batch_size}, block_size={self.block_size}, "
            f"seed={self.seed}, mode={self.mode!r}, step={self.step}, n_tokens={self.n_tokens}"
            + (f", rank={self.rank}, world_size={self.world_size})" if self.world_size > 1 else ")")
        )
