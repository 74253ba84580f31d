"""Pipeline parallelism: the model's layers cut into stages, one stage per rank, and
micro-batches flowing through them as a schedule (`parallel.schedule`) says.

    stage 0: embedding + blocks[0:2] --act--> stage 1: blocks[2:4] + final norm + head + loss
             <-------------------------grad--

A model is given as three ordered pieces, so this package needs to know nothing about it:

    first(idx) -> h            runs on stage 0 (a GPT: token + position embeddings, dropout)
    blocks[k](h) -> h          cut into consecutive runs, one per stage (`partition`)
    last(h, targets) -> loss   runs on the last stage (final norm, LM head, cross-entropy)

`Stage` is the nn.Module of what one rank runs; `PipelineExecutor` runs a schedule's
instructions on it through a table from instruction to method (``_table``), and the
activations and their gradients travel between neighbouring stages as buffer-based
point-to-point messages: a small header with the shape and dtype, then the array.

One training step, on every rank of the pipeline (the trainer's usual parts; only
forward-backward is the pipeline's):

    stage = build_stage(first, blocks, last, state.pp.rank, state.pp.size)
    pipe = PipelineExecutor(stage, state.pp, "1f1b", num_micro_batches=8, tied=[wte.weight])
    opt = AdamW(param_groups(stage), ...)        # each rank steps its own stage's weights
    loss = pipe.forward_backward(x, y)           # the global batch; the loss of all of it
    norm = pipe.clip_grad_norm_(1.0)             # the norm of the whole model's gradient
    opt.step(); opt.zero_grad()

Every rank builds the whole model from the same seed and keeps its stage, so all stages start
from the weights one process would have. The loss is the mean over the micro-batches of each
one's mean loss, which is the mean over the global batch (equal micro-batches), as one process
computes it; each micro-batch's backward starts from loss / m, so the gradients are those of
that mean.

Tied weights: a GPT's LM head is its token embedding's matrix, used by the first stage (as the
embedding) and the last (as the head). Both hold a copy. Each copy's gradient is only its
stage's part, so the schedule's ReduceTiedGrads all-reduces them between the two stages (a
group of just those two ranks, Megatron's "embedding group"): both copies then hold the sum,
the gradient one process computes, and, stepped by the same optimizer from the same state,
stay equal.
"""
from __future__ import annotations

import time
import weakref

import numpy as np

import nn
import tensorlite as tl
from tensorlite import backend
from tensorlite.tensor import Tensor

from . import grad_norm
from .comm import Group
from .schedule import (Backward, Forward, LoadMicroBatch, RecvActivation, RecvGrad,
                       ReduceTiedGrads, SendActivation, SendGrad, get_schedule, schedule_name)

# tags keep the three kinds of message apart (MPI delivers messages with one tag in order)
TAG_HEADER, TAG_ACTIVATION, TAG_GRAD = 11, 12, 13
HEADER_DTYPES = ("float16", "float32", "float64")
MAX_DIMS = 6


# ----------------------------------------------------------------------------- stages
def partition(num_blocks: int, num_stages: int) -> list:
    """Consecutive [start, end) runs of blocks, one per stage, as even as they can be (the
    first ``num_blocks % num_stages`` stages get one more, as numpy.array_split)."""
    if num_stages < 1 or num_blocks < num_stages:
        raise ValueError(f"partition: {num_blocks} blocks cannot be cut into {num_stages} "
                         "stages of at least one block each; use fewer stages (--pp) or more "
                         "layers")
    size, extra = divmod(num_blocks, num_stages)
    bounds, start = [], 0
    for s in range(num_stages):
        end = start + size + (s < extra)
        bounds.append((start, end))
        start = end
    return bounds


class Stage(nn.Module):
    """The layers one pipeline stage runs: ``first`` on stage 0, its run of ``blocks``,
    ``last`` on the last stage. ``forward(x, targets)``: stage 0 takes the inputs (token ids),
    the others the previous stage's output; the last returns the loss, the others their
    output. ``parameters()`` are this stage's weights (a weight ``first`` and ``last`` share
    appears once when one stage holds both)."""

    def __init__(self, first, blocks, last, stage: int, num_stages: int, bounds=None):
        super().__init__()
        if not 0 <= stage < num_stages:
            raise ValueError(f"Stage: stage {stage} is outside 0..{num_stages - 1}")
        bounds = partition(len(blocks), num_stages) if bounds is None else list(bounds)
        if len(bounds) != num_stages:
            raise ValueError(f"Stage: {len(bounds)} block ranges for {num_stages} stages")
        self.stage, self.num_stages = stage, num_stages
        self.block_range = bounds[stage]           # which of the model's blocks these are
        self.first = first if stage == 0 else None
        self.blocks = nn.ModuleList([blocks[k] for k in range(*self.block_range)])
        self.last = last if stage == num_stages - 1 else None

    @property
    def is_first(self) -> bool:
        return self.stage == 0

    @property
    def is_last(self) -> bool:
        return self.stage == self.num_stages - 1

    def forward(self, x, targets=None):
        if self.first is not None:
            x = self.first(x)                      # (b, T) ids -> (b, T, C)
        for block in self.blocks:
            x = block(x)                           # (b, T, C) -> (b, T, C)
        if self.last is not None:
            return self.last(x, targets)           # -> the mean loss, a scalar
        return x

    def extra_repr(self):
        lo, hi = self.block_range
        return f"stage {self.stage} of {self.num_stages}, blocks {lo}..{hi - 1}"


def build_stage(first, blocks, last, stage: int, num_stages: int, bounds=None) -> Stage:
    """Stage ``stage`` of a model given as its ordered pieces: ``first(idx) -> h`` (stage 0),
    ``blocks`` (a list of modules ``h -> h``, cut by `partition` unless ``bounds`` gives the
    [start, end) of each stage), ``last(h, targets) -> loss`` (the last stage)."""
    return Stage(first, blocks, last, stage, num_stages, bounds)


# ----------------------------------------------------------------------------- the executor
class PipelineExecutor:
    """Runs a schedule's instructions for one stage, over the pipeline group ``group`` (its
    rank is the stage, its size the number of stages).

    ``schedule``: "gpipe", "1f1b" or a schedule function; ``num_micro_batches``: m, the global
    batch is cut into m equal micro-batches; ``tied``: weights that the first and the last
    stage both hold (their gradients are summed between the two).

    After `forward_backward`: ``trace`` holds (instruction, start, end) of the step's every
    instruction (seconds from its start: bench/bench_pp.py measures the bubble from it), and
    ``peak_in_flight`` the most micro-batches whose activations this stage held at once,
    counted as the stage outputs still alive (weak references: a graph the executor forgot
    to let go of would still be counted)."""

    def __init__(self, stage: Stage, group: Group, schedule="1f1b", num_micro_batches: int = 1,
                 tied=()):
        if group.size != stage.num_stages or group.rank != stage.stage:
            raise ValueError(f"PipelineExecutor: the stage is {stage.stage} of "
                             f"{stage.num_stages}, but this rank is {group.rank} of "
                             f"{group.size} in group {group.name!r}; build the stage with "
                             "build_stage(..., group.rank, group.size)")
        if isinstance(num_micro_batches, bool) or not isinstance(num_micro_batches, int) \
                or num_micro_batches < 1:
            raise ValueError(f"PipelineExecutor: num_micro_batches must be an integer >= 1, "
                             f"got {num_micro_batches!r}")
        self.module, self.group = stage, group
        self.stage, self.num_stages = stage.stage, stage.num_stages
        self.schedule = get_schedule(schedule)
        self.num_micro_batches = num_micro_batches
        self.params = list(stage.parameters())
        self.xp = backend.xp_of(self.params[0].data) if self.params else np
        mine = {id(p) for p in self.params}
        ends = (0, self.num_stages - 1)
        if self.stage in ends and any(id(p) not in mine for p in tied):
            raise ValueError(f"PipelineExecutor: stage {self.stage} holds the first or the last "
                             "pieces but not every tied weight; pass the weights that both "
                             "`first` and `last` use")
        self.tied = [p for p in tied if id(p) in mine]
        # the ranks that hold a tied copy (first and last), when they are two
        self.tied_group = None
        if group.size > 1:                         # Split is collective: every stage calls it
            g = group.split(0 if self.stage in ends else 1, self.stage, f"{group.name}-tied")
            self.tied_group = g if self.stage in ends else None
        self._table = {
            LoadMicroBatch: self._load_micro_batch,
            RecvActivation: self._recv_activation,
            Forward: self._forward,
            SendActivation: self._send_activation,
            RecvGrad: self._recv_grad,
            Backward: self._backward,
            SendGrad: self._send_grad,
            ReduceTiedGrads: self._reduce_tied_grads,
        }
        self.trace: list = []
        self.peak_in_flight = 0

    def __repr__(self):
        return (f"PipelineExecutor({schedule_name(self.schedule)}, stage {self.stage} of "
                f"{self.num_stages}, {self.num_micro_batches} micro-batches)")

    # -- one step ------------------------------------------------------------------------------
    def forward_backward(self, inputs=None, targets=None, weights=None) -> float:
        """Run the schedule on the global batch: ``inputs`` (B, ...) are read on the first
        stage and ``targets`` (B, ...) on the last (other stages may pass None). Gradients
        accumulate into this stage's parameters' ``.grad``, as a backward does; the tied
        weights' are summed between the first and last stage. Returns the step's loss, on
        every stage: the mean over the micro-batches of each one's loss, or with ``weights``
        (one number per micro-batch, read on the last stage) their weighted sum (a
        fine-tuning weights each micro-batch by its share of the tokens that count)."""
        m = self.num_micro_batches
        if weights is not None and len(weights) != m:
            raise ValueError(f"pipeline: {len(weights)} weights for {m} micro-batches")
        self._weights = [1.0 / m] * m if weights is None else [float(w) for w in weights]
        self._inputs = self._split("inputs", inputs) if self.module.is_first else None
        self._targets = self._split("targets", targets) if self.module.is_last else None
        self._x, self._out, self._grad_out, self._grad_in = {}, {}, {}, {}
        self._sends: list = []
        self._live = weakref.WeakSet()             # outputs whose graph is still held
        self._loss = 0.0
        self.trace, self.peak_in_flight = [], 0
        t0 = time.perf_counter()
        for ins in self.schedule(self.stage, self.num_stages, m):
            start = time.perf_counter()
            self._table[type(ins)](ins.micro)
            self.trace.append((ins, start - t0, time.perf_counter() - t0))
            if self._sends:                        # let finished sends go (and MPI progress)
                self._sends = [r for r in self._sends if not r.test()]
        for r in self._sends:
            r.wait()
        left = [k for k, d in (("activations", self._x), ("outputs", self._out),
                               ("gradients", self._grad_out)) if d]
        if left:
            raise RuntimeError(f"pipeline stage {self.stage}: {schedule_name(self.schedule)} "
                               f"left {left} of micro-batches unbackwarded")
        loss = np.array([self._loss], np.float64)
        if self.num_stages > 1:                    # the loss lives on the last stage
            self.group.broadcast(loss, root=self.num_stages - 1)
        self._inputs = self._targets = self._sends = None
        return float(loss[0])

    def _split(self, what: str, batch):
        if batch is None:
            raise ValueError(f"pipeline stage {self.stage}: forward_backward needs the batch's "
                             f"{what} on this stage")
        data = batch.data if isinstance(batch, Tensor) else batch
        m, n = self.num_micro_batches, len(data)
        if n % m:
            raise ValueError(f"pipeline: a batch of {n} cannot be cut into {m} equal "
                             f"micro-batches; pick a batch size that is a multiple of {m}")
        b = n // m
        return [data[i * b:(i + 1) * b] for i in range(m)]

    # -- the instructions ------------------------------------------------------------------------
    def _load_micro_batch(self, i):
        device = self.params[0].device if self.params else None
        if self.module.is_first:
            self._x[i] = tl.tensor(self._inputs[i], device=device)
        if self.module.is_last:
            self._targets[i] = tl.tensor(self._targets[i], device=device)

    def _recv_activation(self, i):
        header = np.empty(2 + MAX_DIMS, np.int64)
        self.group.recv(header, self.stage - 1, TAG_HEADER)
        ndim, code = int(header[0]), int(header[1])
        shape = tuple(int(d) for d in header[2:2 + ndim])
        buf = self.xp.empty(shape, HEADER_DTYPES[code])
        self.group.recv(buf, self.stage - 1, TAG_ACTIVATION)
        # a leaf of this stage's graph: backward leaves the gradient to send back in .grad
        self._x[i] = Tensor(buf, requires_grad=True)

    def _forward(self, i):
        x = self._x[i]
        out = self.module(x, self._targets[i] if self.module.is_last else None)
        if self.module.is_last:
            self._loss += out.item() * self._weights[i]
        if self.module.is_first:
            del self._x[i]                         # token ids: nothing to send back
        self._out[i] = out
        self._live.add(out)
        self.peak_in_flight = max(self.peak_in_flight, len(self._live))

    def _send_activation(self, i):
        out = self._out[i].data
        if out.dtype.name not in HEADER_DTYPES or out.ndim > MAX_DIMS:
            raise ValueError(f"pipeline stage {self.stage}: cannot send an activation of dtype "
                             f"{out.dtype} and shape {out.shape} (dtypes {HEADER_DTYPES}, at "
                             f"most {MAX_DIMS} dimensions)")
        header = np.zeros(2 + MAX_DIMS, np.int64)
        header[0], header[1] = out.ndim, HEADER_DTYPES.index(out.dtype.name)
        header[2:2 + out.ndim] = out.shape
        if not out.flags.c_contiguous:
            out = self.xp.ascontiguousarray(out)
        # non-blocking: with blocking sends 1F1B deadlocks (tests/test_schedules.py)
        self._sends.append(self.group.isend(header, self.stage + 1, TAG_HEADER))
        self._sends.append(self.group.isend(out, self.stage + 1, TAG_ACTIVATION))

    def _recv_grad(self, i):
        out = self._out[i]
        buf = self.xp.empty(out.shape, out.dtype)
        self.group.recv(buf, self.stage + 1, TAG_GRAD)
        self._grad_out[i] = buf

    def _backward(self, i):
        out = self._out.pop(i)
        if self.module.is_last:
            (out * self._weights[i]).backward()    # d(the weighted sum over micro-batches)
        else:
            out.backward(self._grad_out.pop(i))
        del out
        if not self.module.is_first:
            x = self._x.pop(i)
            self._grad_in[i] = x.grad.data if x.grad is not None else self.xp.zeros_like(x.data)

    def _send_grad(self, i):
        g = self._grad_in.pop(i)
        if not g.flags.c_contiguous:
            g = self.xp.ascontiguousarray(g)
        self._sends.append(self.group.isend(g, self.stage - 1, TAG_GRAD))

    def _reduce_tied_grads(self, _):
        if self.tied_group is None:
            return                                 # one stage holds every use, or none here
        for p in self.tied:
            if p.grad is None:
                p.grad = Tensor._make(self.xp.zeros_like(p.data), False, None)
            self.tied_group.all_reduce(p.grad.data)

    # -- the rest of the step ----------------------------------------------------------------------
    def owned_parameters(self) -> list:
        """This stage's parameters without the tied copies that stage 0 also holds: over all
        stages, every weight of the model once (for norms and counts)."""
        tied = {id(p) for p in self.tied}
        return [p for p in self.params if self.stage == 0 or id(p) not in tied]

    def norm_weight(self, p) -> float:
        """The share of ``p``'s squared gradient norm this stage counts (parallel.grad_norm):
        0 for the last stage's copy of a tied weight (stage 0 counts it), else 1."""
        return 0.0 if self.stage != 0 and any(p is t for t in self.tied) else 1.0

    def clip_grad_norm_(self, max_norm: float) -> float:
        """``nn.optim.clip_grad_norm_`` over the whole model: the squared norms of every
        stage's gradients (a tied weight counted once) are summed over the pipeline group,
        and every stage scales its gradients (both tied copies alike) by the same factor.
        Returns the total norm before clipping, on every stage."""
        return grad_norm.clip_grad_norm_(self.params, max_norm, [self.group], self.norm_weight)
