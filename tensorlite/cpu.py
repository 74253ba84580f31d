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
the number of threads (default: the usable cores, shared among the MPI ranks on this machine:
see ``_default_threads``). A ``fork`` child (multiprocessing's default start method on Linux
before Python 3.14) makes a fresh pool on first use.
On CuPy data none of this applies: the kernel runs once on the whole array.

Importing tensorlite changes nothing process-wide. Two process-wide settings that this CPU
path needs (single-threaded BLAS, glibc's malloc reusing freed memory) are applied once, by
``configure()``: the first time tensorlite runs an op here, or earlier when the program calls
it. A setting the user made first wins (see ``configure``).
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
# a 2-D product cut by rows (``matmul``): a hand-off to the pool costs ~100 us on this
# project's 2-core VM (the worker's wake-up), so splitting pays only from ~16 MFLOP
# (measured, (m, 128) @ (128, 384..512): 48 rows 52 us on one thread vs 127 us on two;
# 128 x 512 about even; 768 rows 730 vs 447 us). Below it, no-cache generation's growing
# windows paid a hand-off per qkv product (bench/README.md, issue 14).
MIN_PARALLEL_FLOPS_ROWS = 16e6
MIN_PARALLEL_FLOPS_FEW_ROWS = 5e5

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3        # glibc's mallopt parameters
_MALLOC_SETTINGS = (                                    # (parameter, value, the user's knobs)
    (_M_MMAP_THRESHOLD, 32 * 1024 * 1024, "MALLOC_MMAP_THRESHOLD_", "glibc.malloc.mmap_threshold"),
    (_M_TRIM_THRESHOLD, 256 * 1024 * 1024, "MALLOC_TRIM_THRESHOLD_", "glibc.malloc.trim_threshold"),
)
# variables by which a user sets BLAS threads: if one is set, tensorlite leaves BLAS alone
BLAS_THREAD_VARS = ("OPENBLAS_NUM_THREADS", "GOTO_NUM_THREADS", "OMP_NUM_THREADS",
                    "MKL_NUM_THREADS", "BLIS_NUM_THREADS")
# how launchers tell a process how many ranks of its job run on its machine (checked in order)
LOCAL_RANK_VARS = ("MPI_LOCALNRANKS",             # MPICH / Intel MPI (Hydra mpiexec)
                   "OMPI_COMM_WORLD_LOCAL_SIZE",  # Open MPI's mpirun / mpiexec
                   "SLURM_STEP_TASKS_PER_NODE")   # Slurm's srun, e.g. "4" or "4(x2),3"


def _tune_malloc() -> bool:
    """Let glibc reuse freed memory for arrays up to 32 MB instead of returning it to the OS.

    By default glibc serves every allocation over 128 KB-32 MB with a fresh mmap and unmaps
    it on free, so each activation or gradient array of a training step page-faults its
    memory in again (the kernel zeroes every 4 KB page). Measured here: 10-30 % of a step
    on the small GPT. Opt out with TENSORLITE_NO_MALLOPT=1; a threshold the user set through
    glibc's own variables (MALLOC_MMAP_THRESHOLD_, MALLOC_TRIM_THRESHOLD_, GLIBC_TUNABLES) is
    left as the user set it. True if anything was set.
    """
    if os.environ.get("TENSORLITE_NO_MALLOPT") or not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes
        libc = ctypes.CDLL("libc.so.6")
        tunables = os.environ.get("GLIBC_TUNABLES", "")
        done = False
        for param, value, env, tunable in _MALLOC_SETTINGS:
            if env in os.environ or tunable in tunables:
                continue
            done |= bool(libc.mallopt(param, value))
        return done
    except (OSError, AttributeError):  # not glibc
        return False


_lock = threading.Lock()
_config_lock = threading.Lock()
_pool: ThreadPoolExecutor | None = None
_num_threads: int | None = None
_blas = None
_blas_checked = False
_local = threading.local()
_configured = False
MALLOC_TUNED = False            # what configure() did (both stay False until it has run)
BLAS_SINGLE_THREADED = False


def _reset_after_fork() -> None:
    """In a fork child: forget the pool. Only the forking thread is copied into the child, so
    the pool's workers are gone while the executor still counts them as idle; a task submitted
    to it would wait forever (as would a lock some other thread held at the fork). A new pool
    is made on first use, as PyTorch and OpenBLAS do for theirs."""
    global _lock, _config_lock, _pool, _local
    _lock = threading.Lock()
    _config_lock = threading.Lock()
    _pool = None
    _local = threading.local()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_after_fork)


def local_ranks() -> int:
    """How many ranks of this process's parallel job run on this machine, from what the
    launcher puts in the environment (``LOCAL_RANK_VARS``; 1 when not launched as a job).
    Read from the environment only: tensorlite never imports MPI."""
    for var in LOCAL_RANK_VARS:
        value = os.environ.get(var, "").strip()
        if not value:
            continue
        counts = []        # Slurm: per node, "2(x3),1" = 2, 2, 2, 1
        for item in value.split(","):
            n, _, rep = item.partition("(x")
            try:
                counts += [int(n)] * (int(rep.rstrip(")")) if rep else 1)
            except ValueError:
                counts = []
                break
        if not counts:
            continue
        node = os.environ.get("SLURM_NODEID", "")
        n = counts[int(node)] if len(counts) > 1 and node.isdigit() and int(node) < len(counts) \
            else max(counts)
        if n >= 1:
            return n
    return 1


def _usable_cores() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def _default_threads() -> int:
    """TENSORLITE_NUM_THREADS, else the usable cores (the affinity mask) shared among the ranks
    of one job on this machine: each of N local ranks takes cores // N (at least 1). When the
    launcher already pinned each rank to its own share (the mask holds at most the machine's
    cores // N, as with srun's or ``mpiexec --bind-to core``'s binding), the mask is the share."""
    env = os.environ.get("TENSORLITE_NUM_THREADS")
    if env:
        return max(1, int(env))
    cores, ranks = _usable_cores(), local_ranks()
    if ranks > 1 and cores > (os.cpu_count() or cores) // ranks:
        return max(1, cores // ranks)
    return cores


def get_num_threads() -> int:
    global _num_threads
    if _num_threads is None:
        _num_threads = _default_threads()
    return _num_threads


def set_num_threads(n: int) -> None:
    """Threads tensorlite uses for CPU work (as ``torch.set_num_threads``); wins over
    TENSORLITE_NUM_THREADS and over the default."""
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


def _blas_default_threads(lib) -> int:
    """The threads a BLAS library picks by itself: OpenBLAS takes the cores it found at load
    time, up to its build's MAX_THREADS; other libraries, the usable cores."""
    import ctypes
    cores = _usable_cores()
    if getattr(lib, "internal_api", None) != "openblas":
        return cores
    for pre, suf in (("", ""), ("scipy_", "64_"), ("scipy_", ""), ("", "64_")):
        get_procs = getattr(getattr(lib, "dynlib", None), f"{pre}openblas_get_num_procs{suf}", None)
        get_config = getattr(getattr(lib, "dynlib", None), f"{pre}openblas_get_config{suf}", None)
        if get_procs is None or get_config is None:
            continue
        get_config.restype = ctypes.c_char_p
        config = (get_config() or b"").decode(errors="replace")
        cap = [int(w.split("=")[1]) for w in config.split() if w.startswith("MAX_THREADS=")
               and w.split("=")[1].isdigit()]
        return max(1, min([int(get_procs())] + cap))
    return cores


def use_single_threaded_blas() -> bool:
    """Set the process's BLAS to one thread, for good, unless the user chose its threads.

    Restoring OpenBLAS's threads after each of our calls is not enough: after every
    multi-threaded call (a dot product in gradient clipping, a small product) its idle worker
    keeps spinning on a core for a while, and our pool's threads then share one core
    (measured: tensorlite's 2-thread products at 121-131 GFLOP/s instead of 250 right after
    a NumPy product on OpenBLAS threads). tensorlite parallelises over its own pool instead,
    as PyTorch sizes its own intra-op pool.

    Left alone: everything with TENSORLITE_KEEP_BLAS_THREADS=1 or a thread variable in the
    environment (``BLAS_THREAD_VARS``: OPENBLAS_NUM_THREADS, OMP_NUM_THREADS, ...); a library
    whose threads were already set below its own default (``threadpoolctl.threadpool_limits``,
    ``lib.set_num_threads``). True if a library is on one thread now through this call.
    """
    if os.environ.get("TENSORLITE_KEEP_BLAS_THREADS"):
        return False
    if any(os.environ.get(v) for v in BLAS_THREAD_VARS):
        return False
    done = False
    for lib in _blas_libs():
        try:
            now = lib.get_num_threads()
            if now is None or now < _blas_default_threads(lib):
                continue                          # the user's setting
            lib.set_num_threads(1)
            done = True
        except Exception:  # pragma: no cover - exotic BLAS builds: leave them be
            continue
    return done


def configure() -> dict:
    """Apply tensorlite's process-wide CPU settings now (once; later calls return the same).

    - BLAS on one thread (``use_single_threaded_blas``): tensorlite's own pool splits the work;
    - glibc's malloc keeps freed memory up to 32 MB for reuse (``_tune_malloc``).

    Runs by itself the first time tensorlite computes on NumPy data through this module;
    call it earlier to have the settings in force from a known point (e.g. before timing).
    Returns ``{"blas_single_threaded": bool, "malloc_tuned": bool}``: what was changed.
    """
    global _configured, MALLOC_TUNED, BLAS_SINGLE_THREADED
    with _config_lock:
        if not _configured:
            MALLOC_TUNED = _tune_malloc()
            BLAS_SINGLE_THREADED = use_single_threaded_blas()
            _configured = True
    return {"blas_single_threaded": BLAS_SINGLE_THREADED, "malloc_tuned": MALLOC_TUNED}


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


def matmul(a: np.ndarray, b: np.ndarray, bias: np.ndarray | None = None) -> np.ndarray:
    """``a @ b`` for 2-D or batched (same leading dims) NumPy arrays, split over threads:
    rows of ``a`` for a 2-D product, the batch for a batched one. ``bias`` (2-D only): added
    to each thread's rows right after its product, while they are in cache."""
    if not _configured:
        configure()
    n = get_num_threads()
    if a.ndim == 2:
        m = a.shape[0]
        out = np.empty((m, b.shape[-1]), dtype=np.result_type(a, b))
        flops = 2.0 * a.size * b.shape[-1]
        def rows(lo, hi):
            np.matmul(a[lo:hi], b, out=out[lo:hi])
            if bias is not None:
                out[lo:hi] += bias
        if n > 1 and m >= 2 * n and flops >= MIN_PARALLEL_FLOPS_ROWS:
            with single_threaded_blas():      # rows of a, one slice per thread
                _run_parts(rows, _split(m, n))
        elif n > 1 and m < 2 * n and flops >= MIN_PARALLEL_FLOPS_FEW_ROWS:
            # decoding (a vector times a matrix): OpenBLAS's own threads split it with less
            # overhead than our pool (measured: 547 vs 430 tokens/s on the small GPT)
            with blas_threads(n):
                rows(0, m)
        else:
            rows(0, m)
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


def rows_per_thread(n_rows: int, row_elems: int) -> int:
    """A ``block`` for ``for_rows``/``map_rows`` that gives each thread one block of rows: for
    kernels that multiply matrices (a GEMM wants its rows together) and cut their own
    elementwise work into cache-sized pieces (``row_blocks``)."""
    n = get_num_threads() if n_rows * row_elems >= MIN_PARALLEL_ELEMS else 1
    # below MIN_PARALLEL_ELEMS for_rows runs on the calling thread: then one block, not one
    # per thread run one after the other (half-size products, a kernel call more)
    return max(1, -(-n_rows // n)) * max(row_elems, 1)


def row_blocks(lo: int, hi: int, row_elems: int):
    """(a, b) pieces of rows lo..hi of ~BLOCK_ELEMS elements each."""
    step = max(1, BLOCK_ELEMS // max(row_elems, 1))
    return [(a, min(a + step, hi)) for a in range(lo, hi, step)]


def matmul_pair(a1, b1, a2, b2, sum_a2: bool = False):
    """``(a1 @ b1, a2 @ b2, a2.sum(axis=1) if sum_a2 else None)`` for 2-D NumPy arrays: the
    two products side by side, one per thread with single-threaded BLAS, when there are two
    threads and both are large enough to pay for the hand-off (a Linear's input and weight
    gradients: equal FLOPs; the sum is its bias gradient). One hand-off instead of two, and
    each GEMM whole instead of cut into thinner slices. Otherwise one after the other."""
    if not _configured:
        configure()
    f1 = 2.0 * a1.size * b1.shape[-1]
    f2 = 2.0 * a2.size * b2.shape[-1]
    if get_num_threads() < 2 or min(f1, f2) < MIN_PARALLEL_FLOPS:
        return matmul(a1, b1), matmul(a2, b2), (a2.sum(axis=1) if sum_a2 else None)
    out = [np.empty((a1.shape[0], b1.shape[1]), np.result_type(a1, b1)),
           np.empty((a2.shape[0], b2.shape[1]), np.result_type(a2, b2)), None]

    def part(i, _):
        if i == 0:
            np.matmul(a1, b1, out=out[0])
        else:
            np.matmul(a2, b2, out=out[1])
            if sum_a2:
                out[2] = a2.sum(axis=1)
    with single_threaded_blas():
        _run_parts(part, [(0, 1), (1, 2)])
    return out[0], out[1], out[2]


def for_rows(kernel, n_rows: int, row_elems: int, xp=np, block: int | None = None) -> None:
    """Call ``kernel(lo, hi)`` over blocks of rows covering ``0 .. n_rows``, in parallel.

    The kernel reads and writes only rows lo:hi of its arrays (views), so blocks are
    independent. Blocks hold ~BLOCK_ELEMS elements, so a block's temporaries stay in cache.
    On CuPy (``xp`` not numpy) the kernel runs once over all rows.
    """
    if xp is not np:
        kernel(0, n_rows)
        return
    if not _configured:
        configure()
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


def map_rows(kernel, n_rows: int, row_elems: int, xp=np, block: int | None = None):
    """Like ``for_rows`` for kernels that also return partial sums (e.g. a LayerNorm weight
    gradient summed over rows): ``kernel(lo, hi)`` returns a tuple of arrays; the tuples of
    all blocks are added up in block order (so the result does not depend on which thread
    finished first: training stays bit-for-bit reproducible) and returned as a list."""
    if n_rows == 0:
        return [p.copy() for p in kernel(0, 0)]   # sums over no rows: zeros of the right shape
    parts = {}

    def k(lo, hi):
        parts[lo] = kernel(lo, hi)   # distinct keys: no lock needed for dict item writes
    for_rows(k, n_rows, row_elems, xp, block)
    blocks = [parts[lo] for lo in sorted(parts)]
    totals = [p.copy() for p in blocks[0]]
    for blk in blocks[1:]:
        for t, p in zip(totals, blk):
            t += p
    return totals
