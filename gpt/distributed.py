"""How `tensorlite-gpt train` meets MPI: the launcher's ranks against the options, errors that
every rank agrees on before the first collective (so a mistake ends the job normally, one
line, no MPI_Abort), the same options on every rank, and which pipeline stage owns a weight.
One process never imports MPI."""
from __future__ import annotations

import hashlib
import json
import os
import sys
from dataclasses import asdict

import numpy as np

from .config import TrainConfig
from .model import GPT, ConfigError
from .run_folder import TrainingError


def check_world(cfg: TrainConfig, world) -> None:
    """The parallel options against the ranks the launcher started (``world``: the MPI world
    group, or None for one process). No communication."""
    p, n = cfg.parallel, (world.size if world is not None else 1)
    if p.zero and p.dp == 1:
        raise ConfigError("--zero 1 shards the optimizer state over data-parallel ranks: "
                          "it needs --dp > 1" + (" (run under mpiexec -n N with --dp N)"
                                                 if n == 1 else
                                                 f" (here --dp x --tp x --pp = {n} ranks)"))
    if p.dp * p.tp * p.pp == n:
        return
    if p.tp > 1 or p.pp > 1 or n > p.dp:
        fit = (f"; e.g. --dp {n // (p.tp * p.pp)}" if n % (p.tp * p.pp) == 0 else "")
        raise ConfigError(f"--dp {p.dp} x --tp {p.tp} x --pp {p.pp} = {p.dp * p.tp * p.pp} "
                          f"ranks, but the launcher started {n}: the product of the degrees must "
                          f"equal the number of ranks{fit}")
    if n < p.dp:
        how = "" if "mpi4py" in sys.modules else "install mpi4py (pip install -e '.[mpi]'), then "
        from .config import command_of
        raise ConfigError(f"--dp {p.dp} but the launcher started {n} process(es): {how}run "
                          f"`mpiexec -n {p.dp} tensorlite-gpt {command_of(type(cfg))} --dp "
                          f"{p.dp} ...`, or pass "
                          "--dp 1 to train in one process")


class PeerError(TrainingError):
    """Another rank met a mistake and says which; this one stops quietly."""


def agree_on_errors(world, err: Exception | None) -> None:
    """Before the ranks communicate for the first time, every rank learns whether any rank met
    a mistake (all of them usually meet the same one): the lowest such rank raises its error,
    the others PeerError, and all of them exit normally (no MPI_Abort, no rank left waiting)."""
    if world is None:
        if err is not None:
            raise err
        return
    first = np.array([world.rank if err is not None else world.size], dtype=np.int64)
    world.all_reduce(first, op="min")
    if int(first[0]) == world.size:
        return
    e = err if err is not None and world.rank == int(first[0]) else PeerError(
        f"rank {int(first[0])} stopped on a mistake")
    e.agreed = True
    raise e


def check_same_options(world, cfg: TrainConfig) -> None:
    """Every rank must run the same options (a rank started with another --lr would train a
    different model silently)."""
    if world is None:
        return
    digest = hashlib.sha256(json.dumps(asdict(cfg), sort_keys=True).encode()).digest()
    h = np.frombuffer(digest[:8], dtype=np.int64).copy()
    lo, hi = h.copy(), h.copy()
    world.all_reduce(lo, op="min")
    world.all_reduce(hi, op="max")
    if lo[0] != hi[0]:
        e = ConfigError("the ranks were started with different options: start every rank "
                        "with the same command")
        e.agreed = True
        raise e


def mpi_world():
    """The MPI world group when this process runs under a launcher with several ranks and
    mpi4py is loaded, else None (one process: no MPI is imported for it)."""
    if "mpi4py.MPI" not in sys.modules and not any(
            k in os.environ for k in ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK")):
        return None
    try:
        import parallel
        world = parallel.world_group()
    except ImportError:
        return None
    return world if world.size > 1 else None


def stage_owners(model: GPT, stages: int) -> dict:
    """Parameter name -> the pipeline stage that trains it (the first stage for the tied
    embedding, which the last stage also holds)."""
    from parallel.pipeline import partition
    bounds = partition(len(model.blocks), stages)
    owners = {}
    for name, _ in model.named_parameters():
        if name.startswith("blocks."):
            i = int(name.split(".")[1])
            owners[name] = next(s for s, (lo, hi) in enumerate(bounds) if lo <= i < hi)
        elif name.startswith(("ln_f", "lm_head")):
            owners[name] = stages - 1
        else:
            owners[name] = 0
    return owners
