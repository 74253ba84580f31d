"""parallel: scaling training out over MPI (mpi4py, launched by ``mpiexec``).

Read in this order:

    layout.py         world rank <-> (pipeline, data, tensor) coordinates, as Megatron-LM
    comm.py           Group: rank, size, buffer-based collectives; GPU arrays; one-process stand-in
                      CommStats, record_comm: the seconds a rank waits on communication
    world.py          init_parallel, ranks on this machine, CPU threads per rank, never hang
    data_parallel.py  DataParallel: bucketed all-reduces from gradient hooks
    zero.py           ZeroAdamW: ZeRO-1, AdamW's state sharded over the data-parallel ranks
    grad_norm.py      the global gradient norm of a model spread over ranks (for clipping)
    schedule.py       pipeline schedules as data (GPipe, 1F1B): instructions, simulate, timetable
    pipeline.py       Stage, PipelineExecutor: a schedule run on one stage, activations sent p2p
    tensor_parallel.py  Megatron-LM: f/g, column/row-parallel linears, heads split, vocab-parallel
                        embedding and loss; tensor_parallel_(model, state.tp) shards a GPT in place

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

Pipeline parallelism (PP) replaces forward-backward (parallel/pipeline.py):

    stage = build_stage(first, blocks, last, state.pp.rank, state.pp.size)
    pipe = PipelineExecutor(stage, state.pp, "1f1b", num_micro_batches=m, tied=[wte.weight])
    loss = pipe.forward_backward(x, y) -> pipe.clip_grad_norm_(c) -> opt.step(); opt.zero_grad()

This package never imports ``gpt`` (the model and trainer sit above it).
"""
from .comm import CommStats, Group, Request, SelfComm, comm_stats, mpi_cuda_aware, record_comm
from .data_parallel import DataParallel, all_reduce_mean, broadcast_parameters
from .layout import Layout
from .world import (ParallelState, abort_on_error, cpu_threads_per_rank, init_parallel,
                    install_abort_handler, local_rank, local_size, world_group)
from .zero import ZeroAdamW
from . import grad_norm
from .pipeline import PipelineExecutor, Stage, build_stage, partition
from .schedule import (SCHEDULES, ScheduleError, get_schedule, gpipe, one_f_one_b,
                       predicted_bubble, simulate, timetable)
from . import tensor_parallel
from .tensor_parallel import (ColumnParallelLinear, ParallelAttention, RowParallelLinear,
                              VocabParallelEmbedding, gather_state_dict, load_dense_state_dict,
                              tensor_parallel_, vocab_parallel_cross_entropy)

__all__ = ["CommStats", "Group", "Request", "SelfComm", "comm_stats", "mpi_cuda_aware",
           "record_comm", "DataParallel", "all_reduce_mean",
           "broadcast_parameters", "Layout", "ParallelState", "abort_on_error",
           "cpu_threads_per_rank", "init_parallel", "install_abort_handler", "local_rank",
           "local_size", "world_group", "ZeroAdamW", "grad_norm", "tensor_parallel", "ColumnParallelLinear",
           "ParallelAttention", "RowParallelLinear", "VocabParallelEmbedding", "gather_state_dict",
           "load_dense_state_dict", "tensor_parallel_", "vocab_parallel_cross_entropy"]
__all__ += ["PipelineExecutor", "Stage", "build_stage", "partition", "SCHEDULES",
            "ScheduleError", "get_schedule", "gpipe", "one_f_one_b", "predicted_bubble",
            "simulate", "timetable"]
