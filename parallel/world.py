"""Starting up: the world, its data/tensor/pipeline groups, the ranks on this machine, CPU
threads per rank, and the rule that one failing rank ends them all.

    state = init_parallel(tp=1, pp=1)      # every rank calls it (mpiexec -n N python ...)
    state.world.rank, state.dp.size, ...   # Groups: rank, size, collectives (parallel.comm)

Never hang: once one rank of an MPI job dies, the others wait forever in their next
collective (measured here with MPICH: a rank that raises, or calls sys.exit(2), leaves
the rest blocked until mpiexec is killed). So `init_parallel` installs a
``sys.excepthook`` that prints ``rank N: <traceback>`` on stderr and calls ``MPI_Abort``,
which makes mpiexec end every rank at once with a non-zero status. Code that turns
exceptions into an exit status itself (a CLI printing one line, then ``sys.exit(2)``)
wraps its body in ``abort_on_error()``: ``SystemExit`` never reaches the excepthook.
"""
from __future__ import annotations

import contextlib
import os
import sys
import time
import traceback
from dataclasses import dataclass

import numpy as np

import tensorlite as tl

from .comm import Group, SelfComm, mpi_cuda_aware
from .layout import Layout

# what MPI launchers put in each rank's environment: the world size
_LAUNCHER_SIZE_VARS = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")

_world: Group | None = None
_node: Group | None = None


def _mpi():
    """mpi4py's MPI module, or None when mpi4py is not installed (one process only)."""
    try:
        from mpi4py import MPI
    except ImportError:
        for var in _LAUNCHER_SIZE_VARS:
            if int(os.environ.get(var, "1") or 1) > 1:
                raise RuntimeError(
                    f"this process was launched as one of {os.environ[var]} MPI ranks ({var}) "
                    "but mpi4py is not installed, so each rank would train alone and they "
                    "would overwrite each other's files: pip install -e '.[mpi]'") from None
        return None
    return MPI


def world_group() -> Group:
    """Every rank of the job (MPI_COMM_WORLD), or a group of one without mpi4py."""
    global _world
    if _world is None:
        MPI = _mpi()
        _world = Group(MPI.COMM_WORLD, "world") if MPI else Group(SelfComm(), "world")
    return _world


def _node_group() -> Group:
    """The ranks that share this machine's memory (MPI_COMM_TYPE_SHARED)."""
    global _node
    if _node is None:
        MPI = _mpi()
        if MPI is None:
            _node = Group(SelfComm(), "node")
        else:
            _node = Group(MPI.COMM_WORLD.Split_type(MPI.COMM_TYPE_SHARED), "node")
    return _node


def local_rank() -> int:
    """This rank's index among the ranks on its machine (pick a GPU with it)."""
    return _node_group().rank


def local_size() -> int:
    """How many ranks run on this machine."""
    return _node_group().size


def cpu_threads_per_rank() -> int:
    """CPU threads each rank should use so that the ranks on one machine do not fight for
    cores: the cores this process may run on, divided by the number of local ranks whose
    cores overlap them (all of them when mpiexec binds nothing; 1 when each rank is pinned
    to its own cores), at least 1. Collective over the machine's ranks."""
    usable = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(
        range(os.cpu_count() or 1))
    node = _node_group()
    if node.size == 1:
        return max(1, len(usable))
    width = int(node.all_reduce_scalar(max(usable) + 1, "max"))
    mine = np.zeros(width, np.uint8)
    mine[usable] = 1
    everyone = np.empty(width * node.size, np.uint8)
    node.all_gather(mine, everyone)                     # (local ranks * width,) core masks
    sharing = int(np.count_nonzero((everyone.reshape(node.size, width) & mine).any(axis=1)))
    return max(1, len(usable) // sharing)


# ----------------------------------------------------------------------------- never hang
def _report(rank: int, text: str) -> None:
    sys.stdout.flush()
    sys.stderr.write("".join(f"rank {rank}: {line}\n" for line in text.rstrip("\n").split("\n")))
    sys.stderr.flush()
    # MPI_Abort tears the job down at once; give the launcher a moment to forward the lines
    # (without it they were lost now and then on a loaded machine)
    time.sleep(0.3)


def install_abort_handler(group: Group | None = None) -> None:
    """From now on an exception that nobody catches, on any rank, prints ``rank N:
    <traceback>`` on stderr and ends every rank of the job (``MPI_Abort``)."""
    group = group or world_group()
    if group.size == 1:
        return

    def excepthook(etype, value, tb):
        if issubclass(etype, KeyboardInterrupt):
            _report(group.rank, "interrupted (KeyboardInterrupt)")
        else:
            _report(group.rank, "".join(traceback.format_exception(etype, value, tb)))
        group.abort(1)
    sys.excepthook = excepthook


@contextlib.contextmanager
def abort_on_error(group: Group | None = None):
    """Any exception, or ``sys.exit`` with a non-zero status, inside the block ends every rank
    (after printing it with the rank's number), instead of this rank alone. Exit status 0
    and a world of one rank pass through unchanged."""
    group = group or world_group()
    try:
        yield
    except SystemExit as e:
        if group.size == 1 or e.code in (None, 0):
            raise
        code = e.code if isinstance(e.code, int) else 1
        _report(group.rank, f"{e.code}" if not isinstance(e.code, int)
                else f"exited with status {code}")
        group.abort(code)
    except BaseException as e:
        if group.size == 1:
            raise
        _report(group.rank, "".join(traceback.format_exception(type(e), e, e.__traceback__)))
        group.abort(1)


# ----------------------------------------------------------------------------- init
@dataclass
class ParallelState:
    """The groups a rank belongs to (see `parallel.layout` for who is in which)."""
    world: Group
    dp: Group
    tp: Group
    pp: Group
    layout: Layout

    @property
    def is_main(self) -> bool:
        """World rank 0: the only rank that prints and writes files."""
        return self.world.rank == 0


def init_parallel(tp: int = 1, pp: int = 1, say=print) -> ParallelState:
    """Every rank calls this once, first. Makes the data-, tensor- and pipeline-parallel groups
    (Megatron's layout, `parallel.layout`), installs the abort handler (world size > 1),
    sizes tensorlite's CPU thread pool to this rank's share of the machine (unless
    TENSORLITE_NUM_THREADS is set) and, on a machine with a GPU, says once whether device
    buffers go to MPI directly or through host memory. Works without mpi4py (one rank)."""
    world = world_group()
    layout = Layout(world.size, tp, pp)
    me = layout.coords(world.rank)
    # Split is collective over the world: every rank makes the three groups in this order
    groups = {k: world.split(layout.color(k, world.rank), me[k], k) for k in ("dp", "tp", "pp")}
    install_abort_handler(world)
    if local_size() > 1 and not os.environ.get("TENSORLITE_NUM_THREADS"):
        tl.set_num_threads(cpu_threads_per_rank())
    if world.size > 1 and world.rank == 0 and tl.cuda_available():
        say("MPI is CUDA-aware: device buffers go to MPI directly" if mpi_cuda_aware() else
            "MPI is not CUDA-aware: device buffers are staged through host memory (set "
            "TENSORLITE_MPI_CUDA_AWARE=1 if it is)")
    return ParallelState(world, groups["dp"], groups["tp"], groups["pp"], layout)
