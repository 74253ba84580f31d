"""The global gradient norm of a model spread over ranks, for clipping.

``nn.clip_grad_norm_`` on one process: total = sqrt(sum over every weight of |grad|^2). When
the model is spread over ranks, each rank holds some of the weights, whole or in pieces, and
some weights more than once:

    tensor parallel   a sharded weight: each TP rank holds a different piece (count each)
                      a replicated one (LayerNorm gains, RowParallel biases): every TP rank
                      holds it whole, with the same gradient (count it 1/tp times on each)
    pipeline          each stage holds its own blocks (count each); the tied embedding is on
                      the first and the last stage (count the last stage's copy 0 times)
    ZeRO-1            each data-parallel rank holds a slice of the averaged gradient

So every rank sums ``weight(p) * |grad p|^2`` over what it holds, with weight = the share of
that tensor it should count, and the sum over the ranks (one scalar all-reduce per group) is
the one-process sum of squares. Data-parallel replicas hold the same averaged gradient and
are not summed over (except under ZeRO, whose shards are the pieces).
"""
from __future__ import annotations

import math

from tensorlite import backend


def sum_of_squares(array, weight: float = 1.0) -> float:
    """weight * |array|^2, accumulated in float64 (float16 squares overflow at ~256)."""
    if weight == 0:
        return 0.0
    flat = array.reshape(-1).astype(backend.xp_of(array).float64, copy=False)
    return weight * float(flat @ flat)


def total_norm(local_sq: float, groups=()) -> float:
    """sqrt of ``local_sq`` summed over each group in turn (collective on each)."""
    for g in groups:
        if g is not None and g.size > 1:
            local_sq = g.all_reduce_scalar(local_sq)
    return math.sqrt(local_sq)


def clip_grad_norm_(params, max_norm: float, groups=(), weight=None) -> float:
    """``nn.clip_grad_norm_`` (L2) for a model spread over the ``groups`` (e.g. the tensor-
    and pipeline-parallel groups): every rank passes the parameters it holds and ``weight``,
    a function parameter -> the share of it this rank counts (default 1). Every gradient is
    scaled in place by max_norm / (total + 1e-6) when that is < 1, on every rank alike.
    Returns the total norm before clipping (the same on every rank)."""
    grads, local = [], 0.0
    for p in params:
        if p.grad is None:
            continue
        grads.append(p.grad.data)
        local += sum_of_squares(p.grad.data, 1.0 if weight is None else weight(p))
    total = total_norm(local, groups)
    coef = max_norm / (total + 1e-6)
    if coef < 1.0 or not math.isfinite(total):
        for g in grads:
            g *= coef
    return total


def tensor_parallel_weight(splits_by_id: dict, tp_size: int):
    """The ``weight`` for a tensor-parallel model: 1 for a sharded parameter (its id in
    ``splits_by_id``), 1 / tp for a replicated one."""
    share = 1.0 / tp_size
    return lambda p: 1.0 if id(p) in splits_by_id else share

