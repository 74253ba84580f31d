"""Groups of ranks and the collectives they run: a thin layer over mpi4py.

Every operation here is MPI's buffer-based form (``Allreduce``, not the pickling
``allreduce``): MPI reads and writes the array's own memory, so all-reducing 100 MB costs
a pass over 100 MB and no serialisation. That needs C-contiguous arrays; anything else is
refused with its shape and strides (a silent contiguous copy would hide that the result
does not land in the caller's array).

GPU (CuPy) arrays go one of two ways, decided once per process (`mpi_cuda_aware`):

* CUDA-aware MPI: MPI reads and writes device memory itself. CuPy kernels run
  asynchronously on a stream, so the stream is synchronised first: otherwise MPI could
  send a gradient that a kernel is still writing.
* otherwise, staged through host memory: the array is copied to a NumPy array, MPI runs
  on that, and the result is copied back to the device when MPI is done with it (at once
  for a blocking call; at ``Request.wait()`` for a non-blocking one, so until then the
  device array still holds its old values).

Without mpi4py (or to run anything in one process) a group of size 1 is made over
`SelfComm`: the same calls, done by copying, so the rest of the project needs no MPI.

How long a rank waits on communication (bench/bench_layouts.py):

    with record_comm() as stats:          # every Group of this process, split ones too
        trainer.train_step()
    stats.seconds["all_reduce"], stats.seconds["wait"], stats.bytes["send"], stats.total_seconds

Off by default: outside ``record_comm`` each call checks one module variable and times nothing.
"""
from __future__ import annotations

import contextlib
import ctypes
import os
import sys
import time

import numpy as np

from tensorlite import backend

OPS = ("sum", "max", "min")


# ----------------------------------------------------------------------------- one process
class _DoneRequest:
    """An MPI request that completed when it was made (what SelfComm's I-calls return)."""

    def Wait(self):
        pass

    def Test(self):
        return True


class SelfComm:
    """A communicator of one rank with mpi4py's buffer-based API: every collective is a copy
    (or nothing, in place). Point-to-point calls have no partner and raise."""
    IN_PLACE = object()
    SUM, MAX, MIN = "sum", "max", "min"

    def Get_rank(self):
        return 0

    def Get_size(self):
        return 1

    def Allreduce(self, sendbuf, recvbuf, op=SUM):
        if sendbuf is not SelfComm.IN_PLACE:
            recvbuf[...] = sendbuf

    def Reduce_scatter_block(self, sendbuf, recvbuf, op=SUM):
        recvbuf[...] = sendbuf

    def Allgather(self, sendbuf, recvbuf):
        recvbuf[...] = sendbuf

    def Bcast(self, buf, root=0):
        pass

    def Iallreduce(self, sendbuf, recvbuf, op=SUM):
        self.Allreduce(sendbuf, recvbuf, op)
        return _DoneRequest()

    def Ireduce_scatter_block(self, sendbuf, recvbuf, op=SUM):
        self.Reduce_scatter_block(sendbuf, recvbuf, op)
        return _DoneRequest()

    def Iallgather(self, sendbuf, recvbuf):
        self.Allgather(sendbuf, recvbuf)
        return _DoneRequest()

    def Ibcast(self, buf, root=0):
        return _DoneRequest()

    def Barrier(self):
        pass

    def _no_peer(self, *args, **kwargs):
        raise RuntimeError("point-to-point communication in a world of one rank: there is no "
                           "other rank to send to or receive from")
    Send = Recv = Isend = Irecv = _no_peer

    def Split(self, color=0, key=0):
        return type(self)()

    def Abort(self, errorcode=1):
        os._exit(errorcode)


# ----------------------------------------------------------------------------- device buffers
class CupyStaging:
    """How device arrays meet MPI. The tests substitute a NumPy-only fake with the same
    four methods, so the staging logic is checked on a machine without a GPU."""

    def is_device(self, a) -> bool:
        return backend.is_cupy_array(a)

    def synchronize(self, a) -> None:
        import cupy
        with a.device:
            cupy.cuda.get_current_stream().synchronize()

    def to_host(self, a) -> np.ndarray:
        return a.get()                      # a synchronous device -> host copy

    def copy_from_host(self, a, host: np.ndarray) -> None:
        a.set(host)                         # host -> device, into a's own memory


_cuda_aware: bool | None = None


def mpi_cuda_aware() -> bool:
    """Whether the loaded MPI library can take device pointers. ``TENSORLITE_MPI_CUDA_AWARE``
    (0 or 1) decides if set; otherwise the library is asked: MPICH >= 4 answers
    ``MPIX_GPU_query_support(MPIX_GPU_SUPPORT_CUDA)``, Open MPI ``MPIX_Query_cuda_support()``.
    No answer means no (staging is always correct, only slower)."""
    global _cuda_aware
    if _cuda_aware is None:
        env = os.environ.get("TENSORLITE_MPI_CUDA_AWARE")
        _cuda_aware = env == "1" if env in ("0", "1") else _ask_libmpi()
    return _cuda_aware


def _ask_libmpi() -> bool:
    try:
        with open("/proc/self/maps") as f:     # the libmpi mpi4py loaded (Linux)
            libs = sorted({ln.split()[-1] for ln in f if "libmpi" in ln.rsplit("/", 1)[-1]})
    except OSError:
        return False
    for path in libs:
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        if hasattr(lib, "MPIX_GPU_query_support"):
            flag = ctypes.c_int(0)
            mpix_gpu_support_cuda = 0
            if lib.MPIX_GPU_query_support(mpix_gpu_support_cuda, ctypes.byref(flag)) == 0:
                return bool(flag.value)
        if hasattr(lib, "MPIX_Query_cuda_support"):
            return bool(lib.MPIX_Query_cuda_support())
    return False


# ----------------------------------------------------------------------------- accounting
KINDS = ("all_reduce", "reduce_scatter", "all_gather", "broadcast", "send", "recv", "barrier",
         "wait")


class CommStats:
    """The time this rank spent blocked in communication, with calls and bytes, per kind.

    - one kind per `Group` operation (``all_reduce``, ``reduce_scatter``, ``all_gather``,
      ``broadcast``, ``send``, ``recv``, ``barrier``): the wall time of the blocking call, or of
      starting the non-blocking one (``async_op=True``, which returns at once);
    - ``wait``: the time in `Request.wait` and `Request.test` of a non-blocking operation of
      any kind: what of it the caller did not hide behind its own work. What MPI moved while
      the rank computed costs nothing here; a rank that polls (``test``) while it computes
      spends that time in MPI, and it is counted.

    So ``total_seconds`` is exposed communication, waiting for a slower partner included (a
    rank that enters an all-reduce first waits there for the last). ``bytes``: the size of the
    array handed to MPI (for reduce_scatter and all_gather the whole vector, not the shard),
    counted when the operation starts; what crosses the wire depends on MPI's algorithm.
    Staging a device array through host memory is timed when it is the copy back at the end
    (inside the call, or the wait), not the copy to the host before it. ``calls`` counts
    starts, and waits and tests each time.
    """

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.seconds = dict.fromkeys(KINDS, 0.0)
        self.calls = dict.fromkeys(KINDS, 0)
        self.bytes = dict.fromkeys(KINDS, 0)
        self.total_seconds = 0.0

    def add(self, kind: str, seconds: float, nbytes: int = 0) -> None:
        self.seconds[kind] += seconds
        self.calls[kind] += 1
        self.bytes[kind] += nbytes
        self.total_seconds += seconds

    def as_dict(self) -> dict:
        return {"total_seconds": self.total_seconds, "seconds": dict(self.seconds),
                "calls": dict(self.calls), "bytes": dict(self.bytes)}

    def __repr__(self):
        busy = ", ".join(f"{k} {1e3 * v:.2f} ms" for k, v in self.seconds.items() if self.calls[k])
        return f"CommStats({1e3 * self.total_seconds:.2f} ms: {busy or 'nothing'})"


_stats: CommStats | None = None        # the recording in force (record_comm); None: off


@contextlib.contextmanager
def record_comm(stats: CommStats | None = None):
    """``with record_comm() as stats:`` every Group of this process (groups made by split()
    included) adds the time it blocks to ``stats`` (a new CommStats unless one is given, which
    then keeps adding to what it holds). Blocks nest: the innermost records, and the outer one
    is in force again after it."""
    global _stats
    prev, _stats = _stats, (CommStats() if stats is None else stats)
    try:
        yield _stats
    finally:
        _stats = prev


def comm_stats() -> CommStats | None:
    """The CommStats being recorded into now, or None (recording is off)."""
    return _stats


# ----------------------------------------------------------------------------- requests
class Request:
    """A non-blocking operation in flight. ``wait()`` completes it (and copies a staged result
    back to the device); ``test()`` asks whether it has completed, which also lets MPI make
    progress on it. The arrays it was given must not be touched until it completes."""

    def __init__(self, mpi_request, on_done=None, keep=()):
        self._req, self._on_done, self._keep = mpi_request, on_done, keep
        self.completed = False

    def _finish(self):
        self.completed = True
        if self._on_done is not None:
            self._on_done()
        self._req = self._on_done = self._keep = None   # let go of the buffers

    def wait(self) -> None:
        if not self.completed:
            stats = _stats
            t0 = time.perf_counter() if stats is not None else 0.0
            self._req.Wait()
            self._finish()
            if stats is not None:
                stats.add("wait", time.perf_counter() - t0)

    def test(self) -> bool:
        if not self.completed:
            stats = _stats
            t0 = time.perf_counter() if stats is not None else 0.0
            if self._req.Test():
                self._finish()
            if stats is not None:
                stats.add("wait", time.perf_counter() - t0)
        return self.completed


# ----------------------------------------------------------------------------- groups
class Group:
    """A set of ranks that communicate (an MPI communicator): ``.rank``, ``.size``, and
    collectives on contiguous NumPy/CuPy arrays, named as in ``torch.distributed``, each
    the MPI call of the docstring. ``async_op=True`` returns a `Request` instead of
    blocking."""

    def __init__(self, comm, name: str = "world", mpi=None, cuda_aware: bool | None = None,
                 staging=None):
        self.comm, self.name = comm, name
        self.rank, self.size = comm.Get_rank(), comm.Get_size()
        if mpi is None:
            if isinstance(comm, SelfComm):
                mpi = SelfComm
            else:
                from mpi4py import MPI as mpi
        self._mpi = mpi                       # where IN_PLACE and the ops live
        self._cuda_aware = cuda_aware
        self.staging = staging or CupyStaging()

    def __repr__(self):
        return f"Group({self.name!r}, rank={self.rank}, size={self.size})"

    @property
    def cuda_aware(self) -> bool:
        if self._cuda_aware is None:
            # one process copies device arrays itself: nothing to stage
            self._cuda_aware = isinstance(self.comm, SelfComm) or mpi_cuda_aware()
        return self._cuda_aware

    # -- buffers ------------------------------------------------------------------------
    def _buffer(self, a, what: str, read: bool = True, write: bool = True):
        """``a`` as MPI should see it -> (buffer, function to run when MPI is done, or None).
        ``read``: MPI reads a's values; ``write``: MPI writes a result into it."""
        if not hasattr(a, "flags") or not a.flags.c_contiguous:
            raise ValueError(f"{self.name}.{what}: MPI needs a C-contiguous NumPy or CuPy array, "
                             f"got {type(a).__name__} of shape {getattr(a, 'shape', '?')} and "
                             f"strides {getattr(a, 'strides', '?')}; pass a contiguous array "
                             "(np.ascontiguousarray) and copy the result back")
        st = self.staging
        if not st.is_device(a):
            return a, None
        if self.cuda_aware:
            st.synchronize(a)               # kernels still writing a must finish first
            return a, None
        host = st.to_host(a) if read else np.empty(a.shape, a.dtype)
        return host, ((lambda: st.copy_from_host(a, host)) if write else None)

    def _op(self, op: str):
        if op not in OPS:
            raise ValueError(f"{self.name}: reduction op must be one of {OPS}, got {op!r}")
        return getattr(self._mpi, op.upper())

    def _run(self, kind: str, counted, call, async_op: bool, done, keep):
        """Run a blocking MPI call, or start a non-blocking one (``call(True)``); timed as
        ``kind``, with ``counted``'s bytes, when a `record_comm` block is recording."""
        stats = _stats
        t0 = time.perf_counter() if stats is not None else 0.0
        if async_op:
            out = Request(call(True), done, keep)
        else:
            call(False)
            if done is not None:
                done()
            out = None
        if stats is not None:
            nbytes = 0 if counted is None else counted.size * counted.dtype.itemsize
            stats.add(kind, time.perf_counter() - t0, nbytes)
        return out

    @staticmethod
    def _check_sizes(what, send, recv, size):
        if send.dtype != recv.dtype or send.size != recv.size * size:
            raise ValueError(f"{what}: needs dtype-matching arrays with the large one holding "
                             f"size ({size}) x the small one; got {send.dtype} ({send.size} "
                             f"elements) and {recv.dtype} ({recv.size} elements)")

    # -- collectives ----------------------------------------------------------------------
    def all_reduce(self, array, op: str = "sum", async_op: bool = False):
        """In place: every rank's ``array`` becomes the element-wise sum (max, min) of all
        ranks' arrays. ``MPI_Allreduce(MPI_IN_PLACE, ...)`` / ``MPI_Iallreduce``."""
        buf, done = self._buffer(array, "all_reduce")
        mop, c, ip = self._op(op), self.comm, self._mpi.IN_PLACE
        return self._run("all_reduce", array,
                         lambda nb: (c.Iallreduce if nb else c.Allreduce)(ip, buf, mop),
                         async_op, done, (array, buf))

    def reduce_scatter(self, send, recv, op: str = "sum", async_op: bool = False):
        """``send`` (size * n,) is reduced element-wise over the ranks and rank r receives
        elements [r*n, (r+1)*n) of the result in ``recv`` (n,).
        ``MPI_Reduce_scatter_block`` / ``MPI_Ireduce_scatter_block``."""
        self._check_sizes(f"{self.name}.reduce_scatter", send, recv, self.size)
        sbuf, _ = self._buffer(send, "reduce_scatter", write=False)
        rbuf, done = self._buffer(recv, "reduce_scatter", read=False)
        mop, c = self._op(op), self.comm
        return self._run("reduce_scatter", send, lambda nb: (
            c.Ireduce_scatter_block if nb else c.Reduce_scatter_block)(sbuf, rbuf, mop),
            async_op, done, (send, recv, sbuf, rbuf))

    def all_gather(self, send, recv, async_op: bool = False):
        """Rank r's ``send`` (n,) lands at [r*n, (r+1)*n) of every rank's ``recv`` (size * n,).
        ``MPI_Allgather`` / ``MPI_Iallgather``."""
        self._check_sizes(f"{self.name}.all_gather", recv, send, self.size)
        sbuf, _ = self._buffer(send, "all_gather", write=False)
        rbuf, done = self._buffer(recv, "all_gather", read=False)
        c = self.comm
        return self._run("all_gather", recv,
                         lambda nb: (c.Iallgather if nb else c.Allgather)(sbuf, rbuf),
                         async_op, done, (send, recv, sbuf, rbuf))

    def broadcast(self, array, root: int = 0, async_op: bool = False):
        """In place: every rank's ``array`` becomes ``root``'s. ``MPI_Bcast`` / ``MPI_Ibcast``."""
        is_root = self.rank == root
        buf, done = self._buffer(array, "broadcast", read=is_root, write=not is_root)
        c = self.comm
        return self._run("broadcast", array,
                         lambda nb: (c.Ibcast if nb else c.Bcast)(buf, root),
                         async_op, done, (array, buf))

    def send(self, array, dest: int, tag: int = 0, async_op: bool = False):
        """``array`` to rank ``dest`` of this group. ``MPI_Send`` / ``MPI_Isend``."""
        buf, _ = self._buffer(array, "send", write=False)
        c = self.comm
        return self._run("send", array,
                         lambda nb: (c.Isend if nb else c.Send)(buf, dest=dest, tag=tag),
                         async_op, None, (array, buf))

    def recv(self, array, source: int, tag: int = 0, async_op: bool = False):
        """Into ``array``, from rank ``source`` of this group. ``MPI_Recv`` / ``MPI_Irecv``."""
        buf, done = self._buffer(array, "recv", read=False)
        c = self.comm
        return self._run("recv", array,
                         lambda nb: (c.Irecv if nb else c.Recv)(buf, source=source, tag=tag),
                         async_op, done, (array, buf))

    def isend(self, array, dest: int, tag: int = 0) -> Request:
        return self.send(array, dest, tag, async_op=True)

    def irecv(self, array, source: int, tag: int = 0) -> Request:
        return self.recv(array, source, tag, async_op=True)

    def barrier(self) -> None:
        self._run("barrier", None, lambda nb: self.comm.Barrier(), False, None, ())

    def all_reduce_scalar(self, value: float, op: str = "sum") -> float:
        """A Python number reduced over the group, through a one-element float64 array."""
        buf = np.array([value], dtype=np.float64)
        self.all_reduce(buf, op)
        return float(buf[0])

    def split(self, color: int, key: int, name: str) -> "Group":
        """Ranks with the same ``color`` form a new group, ordered by ``key``. ``MPI_Comm_split``
        (collective: every rank of this group calls it)."""
        return Group(self.comm.Split(color, key), name, self._mpi, self._cuda_aware, self.staging)

    def abort(self, code: int = 1) -> None:
        """End every rank of the job now (``MPI_Abort``). Never returns: MPICH's Abort can
        return to the caller while the launcher tears the job down, and code after it must
        not run (it would be this rank carrying on as if nothing happened)."""
        sys.stdout.flush()
        sys.stderr.flush()
        self.comm.Abort(code)
        os._exit(code)
