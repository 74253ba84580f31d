"""What the ranks of a `prepare` under mpiexec send each other, over a `parallel.comm.Group`.

The per-document tables (LSH band keys, exact-duplicate hashes, signatures of candidate
pairs, token counts) go through MPI's buffer-based calls on contiguous NumPy arrays
(``Alltoallv``, ``Allgatherv``, ``Gatherv``, ``Bcast``): MPI reads the arrays' own memory,
no pickling. Only the small summaries (a rank's clean/corpus report, the file plan, a few
document names for report.json) use mpi4py's pickling ``gather`` / ``bcast``.

Every function takes ``group=None`` or a group of one rank as "one process": the same call
then returns what it would on one rank (a copy), so `gpt.data.stream` has one code path for
any number of ranks. Rows are 2-D arrays of 8-byte integers, (n, width).
"""

from __future__ import annotations

import time

import numpy as np


def single(group) -> bool:
    return group is None or group.size == 1


def _mpi():
    from mpi4py import MPI

    return MPI


def _counts(group, n: int) -> np.ndarray:
    """(size,) int64: every rank's ``n``."""
    mine = np.array([n], dtype=np.int64)
    everyone = np.empty(group.size, dtype=np.int64)
    group.comm.Allgather(mine, everyone)
    return everyone


def _displs(counts: np.ndarray) -> np.ndarray:
    return np.r_[0, np.cumsum(counts)[:-1]].astype(np.int64)


def _rows(a: np.ndarray) -> np.ndarray:
    a = np.ascontiguousarray(a)
    if a.ndim != 2 or a.dtype.itemsize != 8 or a.dtype.kind not in "iu":
        raise ValueError(f"exchange: rows must be a 2-D array of 8-byte integers, got {a.shape} {a.dtype}")
    return a


def counts_of_all(group, n: int) -> np.ndarray:
    """(size,) int64: every rank's ``n`` (one process: ``[n]``)."""
    return np.array([n], dtype=np.int64) if single(group) else _counts(group, n)


def all_to_all_rows(group, rows: np.ndarray, dest: np.ndarray) -> np.ndarray:
    """Row ``k`` of ``rows`` goes to rank ``dest[k]``; returns the rows this rank received,
    sender by sender in rank order, each sender's in its own order. ``MPI_Alltoallv`` (after
    an ``MPI_Alltoall`` of the counts)."""
    rows = _rows(rows)
    if single(group):
        return rows.copy()
    width = rows.shape[1]
    order = np.argsort(dest, kind="stable")
    send = np.ascontiguousarray(rows[order]).view(np.int64)
    send_counts = np.bincount(dest, minlength=group.size).astype(np.int64)
    recv_counts = np.empty(group.size, dtype=np.int64)
    group.comm.Alltoall(send_counts, recv_counts)
    recv = np.empty((int(recv_counts.sum()), width), dtype=np.int64)
    MPI = _mpi()
    sc, rc = send_counts * width, recv_counts * width
    group.comm.Alltoallv([send, (sc, _displs(sc)), MPI.INT64_T], [recv, (rc, _displs(rc)), MPI.INT64_T])
    return recv.view(rows.dtype)


def all_gather_rows(group, rows: np.ndarray) -> np.ndarray:
    """Every rank's rows, concatenated in rank order, on every rank. ``MPI_Allgatherv``."""
    rows = _rows(rows)
    if single(group):
        return rows.copy()
    width = rows.shape[1]
    counts = _counts(group, len(rows)) * width
    out = np.empty((int(counts.sum()) // width, width), dtype=np.int64)
    MPI = _mpi()
    group.comm.Allgatherv([rows.view(np.int64), MPI.INT64_T], [out, (counts, _displs(counts)), MPI.INT64_T])
    return out.view(rows.dtype)


def gather_bytes(group, data: bytes, root: int = 0) -> list[bytes] | None:
    """Every rank's ``data`` on ``root`` (a list in rank order; None elsewhere). ``MPI_Gatherv``."""
    if single(group):
        return [data]
    counts = _counts(group, len(data))
    send = np.frombuffer(data, dtype=np.uint8)
    MPI = _mpi()
    if group.rank == root:
        recv = np.empty(int(counts.sum()), dtype=np.uint8)
        group.comm.Gatherv([send, MPI.BYTE], [recv, (counts, _displs(counts)), MPI.BYTE], root=root)
        bounds = np.r_[0, np.cumsum(counts)]
        return [recv[bounds[r] : bounds[r + 1]].tobytes() for r in range(group.size)]
    group.comm.Gatherv([send, MPI.BYTE], None, root=root)
    return None


def gather_rows(group, rows: np.ndarray, root: int = 0) -> np.ndarray | None:
    """Every rank's rows, concatenated in rank order, on ``root`` (None elsewhere)."""
    rows = _rows(rows)
    parts = gather_bytes(group, rows.tobytes(), root)
    if parts is None:
        return None
    return np.frombuffer(b"".join(parts), dtype=rows.dtype).reshape(-1, rows.shape[1]).copy()


def broadcast_bytes(group, data: bytes | None, root: int = 0) -> bytes:
    """``root``'s bytes on every rank. ``MPI_Bcast`` of the length, then of the bytes."""
    if single(group):
        return data
    n = np.array([len(data) if group.rank == root else 0], dtype=np.int64)
    group.comm.Bcast(n, root=root)
    buf = np.frombuffer(data, dtype=np.uint8).copy() if group.rank == root else np.empty(int(n[0]), np.uint8)
    group.comm.Bcast(buf, root=root)
    return buf.tobytes()


def broadcast_rows(group, rows: np.ndarray | None, width: int, dtype, root: int = 0) -> np.ndarray:
    """``root``'s rows (n, width) on every rank."""
    data = broadcast_bytes(group, None if rows is None else _rows(np.asarray(rows, dtype=dtype)).tobytes(), root)
    return np.frombuffer(data, dtype=dtype).reshape(-1, width).copy()


def gather_objects(group, obj, root: int = 0) -> list | None:
    """Small Python objects (reports, names) on ``root``, in rank order (pickled)."""
    if single(group):
        return [obj]
    return group.comm.gather(obj, root=root)


def broadcast_object(group, obj, root: int = 0):
    """A small Python object from ``root`` to every rank (pickled)."""
    if single(group):
        return obj
    return group.comm.bcast(obj, root=root)


def all_sum(group, value: int) -> int:
    return int(counts_of_all(group, int(value)).sum())


def idle_barrier(group, poll: float = 0.02) -> None:
    """Wait for every rank, asleep: MPICH's blocking calls spin on a core, and while rank 0
    trains the tokenizer (on every core of its machine) the others would take cores from it.
    ``MPI_Ibarrier``, tested every ``poll`` seconds."""
    if single(group):
        return
    request = group.comm.Ibarrier()
    while not request.Test():
        time.sleep(poll)
