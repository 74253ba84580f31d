"""parallel: scaling training out over MPI (mpi4py, launched by ``mpiexec``).

Read in this order:

    layout.py         world rank <-> (pipeline, data, tensor) coordinates, as Megatron-LM
    comm.py           Group: rank, size, buffer-based collectives; GPU arrays; one-process stand-in
    world.py          init_parallel, ranks on this machine, CPU threads per rank, never hang
    data_parallel.py  DataParallel: bucketed all-reduces from gradient hooks
    zero.py           ZeroAdamW: ZeRO-1, AdamW's state sharded over the data-parallel ranks

One training step with data parallelism (DP) or ZeRO-1, on every rank:

    state = init_parallel()
    loader = BatchLoader(..., batch_size=GLOBAL, rank=state.dp.rank, world_size=state.dp.size)
    DP:    dp = DataParallel(model, state.dp); opt = AdamW(...)
           forward_backward (micro-steps but the last in dp.no_sync()) -> dp.finish()
           -> clip_grad_norm_(model.parameters(), c) -> opt.step(); opt.zero_grad()
    ZeRO:  opt = ZeroAdamW(groups, state.dp, ...)
           forward_backward (no communication) -> opt.reduce_gradients()
           -> opt.clip_grad_norm_(c) -> opt.step(); opt.zero_grad()
    the logged loss: all_reduce_mean(loss, state.dp)

This package never imports ``gpt`` (the model and trainer sit above it).
"""
from .comm import Group, Request, SelfComm, mpi_cuda_aware
from .data_parallel import DataParallel, all_reduce_mean, broadcast_parameters
from .layout import Layout
from .world import (ParallelState, abort_on_error, cpu_threads_per_rank, init_parallel,
                    install_abort_handler, local_rank, local_size, world_group)
from .zero import ZeroAdamW

__all__ = ["Group", "Request", "SelfComm", "mpi_cuda_aware", "DataParallel", "all_reduce_mean",
           "broadcast_parameters", "Layout", "ParallelState", "abort_on_error",
           "cpu_threads_per_rank", "init_parallel", "install_abort_handler", "local_rank",
           "local_size", "world_group", "ZeroAdamW"]
