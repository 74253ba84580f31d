"""CPU execution: tensorlite's own thread pool, with single-threaded BLAS inside it.

Why not let OpenBLAS thread each matrix product itself? Two measurements on this project's
2-core machine (see bench/README.md):

- a batch of small products (attention's per-head q @ k^T) calls BLAS once per matrix, and
  each call forks and joins OpenBLAS's threads: when another process holds a core, those
  joins wait for time slices and the batch runs at 0.1-0.5 GFLOP/s instead of 100+;
- NumPy's elementwise ufuncs use one core only, and a fused op that makes eight passes over
  a 4 MB array goes to DRAM eight times.

So on NumPy data, tensorlite splits work itself: a product's rows (or its batch) are cut
into one slice per thread, each thread calling single-threaded BLAS on its slice (NumPy
releases the GIL inside BLAS and ufuncs); row-wise fused kernels (GELU, LayerNorm, softmax,
cross-entropy) run over blocks of rows small enough that a block's temporaries stay in the
L2 cache, and large enough that NumPy's per-call overhead (microseconds per ufunc) stays
small: 32K, 64K, 128K and 256K elements per block gave 29.3k, 32.7k, 33.5k and 33-35k
tokens/s on the tiny GPT (2 cores; 512K and 1M were no better). ``set_num_threads(n)`` sets
the number of threads (default: the usable cores). A ``fork`` child (multiprocessing's
default start method on Linux before Python 3.14) makes a fresh pool on first use.
On CuPy data none of this applies: the kernel runs once on the whole array.
"""
from __future__ import annotations

import contextlib
import os
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np

try:
    from threadpoolctl import ThreadpoolController
except ImportError:  # pragma: no cover - threadpoolctl is a dependency; stay usable without it
    ThreadpoolController = None

BLOCK_ELEMS = 128 * 1024         # elements per block: ~512 KB of float32, within L2
MIN_PARALLEL_ELEMS = 64 * 1024   # below this, threads cost more than they save
MIN_PARALLEL_FLOPS = 4e6
MIN_PARALLEL_FLOPS_FEW_ROWS = 5e5

def _tune_malloc() -> bool:
    """Let glibc reuse freed memory for arrays up to 32 MB instead of returning it to the OS.

    By default glibc serves every allocation over 128 KB-32 MB with a fresh mmap and unmaps
    it on free, so each activation or gradient array of a training step page-faults its
    memory in again (the kernel zeroes every 4 KB page). Measured here: 10-30 % of a step
    on the small GPT. Opt out with TENSORLITE_NO_MALLOPT=1.
    """
    if os.environ.get("TENSORLITE_NO_MALLOPT") or not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        ok = libc.mallopt(m_mmap_threshold, 32 * 1024 * 1024)
        ok &= libc.mallopt(m_trim_threshold, 256 * 1024 * 1024)
        return bool(ok)
    except (OSError, AttributeError):  # not glibc
        return False


MALLOC_TUNED = _tune_malloc()

_lock = threading.Lock()
_pool: ThreadPoolExecutor | None = None
_num_threads: int | None = None
_blas = None
_blas_checked = False
_local = threading.local()


def _reset_after_fork() -> None:
    """In a fork child: forget the pool. Only the forking thread is copied into the child, so
    the pool's workers are gone while the executor still counts them as idle; a task submitted
    to it would wait forever (as would a lock some other thread held at the fork). A new pool
    is made on first use, as PyTorch and OpenBLAS do for theirs."""
    global _lock, _pool, _local
    _lock = threading.Lock()
    _pool = None
    _local = threading.local()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_after_fork)


def _default_threads() -> int:
    env = os.environ.get("TENSORLITE_NUM_THREADS")
    if env:
        return max(1, int(env))
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def get_num_threads() -> int:
    global _num_threads
    if _num_threads is None:
        _num_threads = _default_threads()
    return _num_threads


def set_num_threads(n: int) -> None:
    """Threads tensorlite uses for CPU work (as ``torch.set_num_threads``)."""
    global _num_threads, _pool
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"set_num_threads: need an int >= 1, got {n!r}")
    with _lock:
        _num_threads = n
        if _pool is not None:
            _pool.shutdown(wait=False)
            _pool = None


def _get_pool() -> ThreadPoolExecutor:
    global _pool
    with _lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=max(1, get_num_threads() - 1),
                                       thread_name_prefix="tensorlite")
        return _pool


def _blas_libs() -> list:
    """threadpoolctl's handles on the BLAS libraries loaded in this process (cached)."""
    global _blas, _blas_checked
    if not _blas_checked:
        _blas_checked = True
        _blas = []
        if ThreadpoolController is not None:
            try:
                _blas = list(ThreadpoolController().select(user_api="blas").lib_controllers)
            except Exception:  # pragma: no cover - exotic BLAS builds
                _blas = []
    return _blas


@contextlib.contextmanager
def blas_threads(n: int):
    """BLAS on ``n`` threads inside the block, back to what it was after. Only the outermost
    block on a thread sets anything: nested blocks (a kernel inside a pool part) are free."""
    depth = getattr(_local, "depth", 0)
    libs = _blas_libs() if depth == 0 else []
    before = [lib.get_num_threads() for lib in libs]
    for lib, b in zip(libs, before):
        if b != n:
            lib.set_num_threads(n)
    _local.depth = depth + 1
    try:
        yield
    finally:
        _local.depth = depth
        for lib, b in zip(libs, before):
            if b != n:
                lib.set_num_threads(b)


def single_threaded_blas():
    return blas_threads(1)


def use_single_threaded_blas() -> bool:
    """Set the process's BLAS to one thread, for good (unless TENSORLITE_KEEP_BLAS_THREADS=1).

    Restoring OpenBLAS's threads after each of our calls is not enough: after every
    multi-threaded call (a dot product in gradient clipping, a small product) its idle worker
    keeps spinning on a core for a while, and our pool's threads then share one core
    (measured: tensorlite's 2-thread products at 121-131 GFLOP/s instead of 250 right after
    a NumPy product on OpenBLAS threads). tensorlite parallelises over its own pool instead,
    as PyTorch sizes its own intra-op pool.
    """
    if os.environ.get("TENSORLITE_KEEP_BLAS_THREADS"):
        return False
    libs = _blas_libs()
    for lib in libs:
        lib.set_num_threads(1)
    return bool(libs)


def _run_parts(fn, parts) -> None:
    """fn(lo, hi) for each (lo, hi): the last part on this thread, the rest on the pool."""
    if len(parts) == 1:
        fn(*parts[0])
        return
    futures = [_get_pool().submit(fn, lo, hi) for lo, hi in parts[:-1]]
    fn(*parts[-1])
    for f in futures:
        f.result()


def _split(n: int, k: int):
    k = max(1, min(k, n))
    bounds = [n * i // k for i in range(k + 1)]
    return [(bounds[i], bounds[i + 1]) for i in range(k) if bounds[i + 1] > bounds[i]]


def matmul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``a @ b`` for 2-D or batched (same leading dims) NumPy arrays, split over threads:
    rows of ``a`` for a 2-D product, the batch for a batched one."""
    n = get_num_threads()
    if a.ndim == 2:
        m = a.shape[0]
        out = np.empty((m, b.shape[-1]), dtype=np.result_type(a, b))
        flops = 2.0 * a.size * b.shape[-1]
        if n > 1 and m >= 2 * n and flops >= MIN_PARALLEL_FLOPS:
            with single_threaded_blas():      # rows of a, one slice per thread
                _run_parts(lambda lo, hi: np.matmul(a[lo:hi], b, out=out[lo:hi]), _split(m, n))
        elif n > 1 and m < 2 * n and flops >= MIN_PARALLEL_FLOPS_FEW_ROWS:
            # decoding (a vector times a matrix): OpenBLAS's own threads split it with less
            # overhead than our pool (measured: 547 vs 430 tokens/s on the small GPT)
            with blas_threads(n):
                np.matmul(a, b, out=out)
        else:
            np.matmul(a, b, out=out)
        return out
    lead = a.shape[:-2]
    if b.shape[:-2] != lead:
        return np.matmul(a, b)  # broadcasting batches: NumPy's own loop
    a3 = a.reshape((-1,) + a.shape[-2:])
    b3 = b.reshape((-1,) + b.shape[-2:])
    out = np.empty((a3.shape[0], a.shape[-2], b.shape[-1]), dtype=np.result_type(a, b))
    flops = 2.0 * a.size * b.shape[-1]
    if n == 1 or a3.shape[0] < 2 or flops < MIN_PARALLEL_FLOPS:
        np.matmul(a3, b3, out=out)
    else:
        with single_threaded_blas():
            _run_parts(lambda lo, hi: np.matmul(a3[lo:hi], b3[lo:hi], out=out[lo:hi]),
                       _split(a3.shape[0], n))
    return out.reshape(lead + out.shape[-2:])


def for_rows(kernel, n_rows: int, row_elems: int, xp=np, block: int | None = None) -> None:
    """Call ``kernel(lo, hi)`` over blocks of rows covering ``0 .. n_rows``, in parallel.

    The kernel reads and writes only rows lo:hi of its arrays (views), so blocks are
    independent. Blocks hold ~BLOCK_ELEMS elements, so a block's temporaries stay in cache.
    On CuPy (``xp`` not numpy) the kernel runs once over all rows.
    """
    if xp is not np:
        kernel(0, n_rows)
        return
    rows_per_block = max(1, (block or BLOCK_ELEMS) // max(row_elems, 1))
    total = n_rows * row_elems
    n = get_num_threads()

    def run(lo, hi):
        for a in range(lo, hi, rows_per_block):
            kernel(a, min(a + rows_per_block, hi))
    if total < MIN_PARALLEL_ELEMS or n == 1 or n_rows < 2:
        run(0, n_rows)
    else:
        with single_threaded_blas():  # kernels may call BLAS (attention): one thread each
            _run_parts(run, _split(n_rows, n))


def map_rows(kernel, n_rows: int, row_elems: int, xp=np):
    """Like ``for_rows`` for kernels that also return partial sums (e.g. a LayerNorm weight
    gradient summed over rows): ``kernel(lo, hi)`` returns a tuple of arrays; the tuples of
    all blocks are added up in block order (so the result does not depend on which thread
    finished first: training stays bit-for-bit reproducible) and returned as a list."""
    if n_rows == 0:
        return [p.copy() for p in kernel(0, 0)]   # sums over no rows: zeros of the right shape
    parts = {}

    def k(lo, hi):
        parts[lo] = kernel(lo, hi)   # distinct keys: no lock needed for dict item writes
    for_rows(k, n_rows, row_elems, xp)
    blocks = [parts[lo] for lo in sorted(parts)]
    totals = [p.copy() for p in blocks[0]]
    for blk in blocks[1:]:
        for t, p in zip(totals, blk):
            t += p
    return totals


BLAS_SINGLE_THREADED = use_single_threaded_blas()
