"""Tensor parallelism (Megatron-LM, Shoeybi et al. 2019): every layer's weights cut across the
ranks of a tensor-parallel group, so each rank holds 1/tp of the model and does 1/tp of its
matrix products, at the price of all-reduces inside every block.

The two conjugate operators that make sharded layers exact (the paper's f and g):

    f  copy_to_tp      forward: identity         backward: all-reduce (sum)
    g  reduce_from_tp  forward: all-reduce (sum) backward: identity

A region between an f and a g holds per-rank partial work; outside it every rank holds the
same (replicated) activations. Two linears make a region with no communication in between:

    x (B,T,C) -f-> ColumnParallelLinear -> act -> RowParallelLinear -g-> + b2 -> (B,T,C)
                   W1's rows of this rank    (elementwise:    W2's columns of this rank:
                   -> (B,T,F/tp)              no other rank)   (B,T,C) partial sums

f's backward sums what each rank's branch contributes to dL/dx; g's forward sums the
partial products. Attention is the same pattern with heads as the cut: a rank's heads need
only their own q, k, v columns. So a transformer block costs exactly one all-reduce forward
and one backward for attention, and one each for the MLP (tests/mpi/tp_layers.py counts).

The vocabulary is cut too: each rank holds vocab/tp rows of the token embedding (which the
tied LM head reuses), a lookup outside the rank's rows gives zeros, and a g sums the ranks'
rows; the loss is computed from the rank's logit columns without ever gathering (B, T, V):
the row max and the sums of exponentials (and the target's logit, which one rank owns) are
all-reduced. A vocabulary the degree does not divide is padded with zero rows whose logits
are masked out of the loss (-inf: they count for nothing in the max or the sum).

Dropout (Megatron's model-parallel RNG tracker): on replicated activations (after the
embedding, after each g) every TP rank must drop the same units, or the copies drift apart:
tensorlite's global generator, seeded with the same seed on every rank of a TP group. Inside
a region (attention weights of one rank's heads) each rank draws its own masks from the
region generator, seeded from (seed, tp rank). `manual_seed(seed, group)` seeds both. With
dropout 0 a TP model computes what the dense model computes, whatever the degree (float64
to 1e-10, float32 to 1e-5: tests/test_parallel_tp.py).

    model = GPT(cfg)                                   # the dense model, on every rank
    tensor_parallel_(model, state.tp)                  # now this rank's shards, in place
    manual_seed(seed, state.tp)                        # dropout, as above
    logits, loss = model(x, y); loss.backward()        # the same x, y on every TP rank;
                                                       # logits: this rank's (B, T, V/tp)
    clip_grad_norm_(model, 1.0, state.tp)              # the norm of the whole model
    opt.step()                                         # AdamW per rank on its shards
    logits, _ = model(x)                               # no targets: all (B, T, V) (sampling)
    full = gather_state_dict(model, state.tp)          # the dense state_dict, and
    opt_full = gather_optimizer_state_dict(opt, model, state.tp)   # AdamW's: checkpoints
    load_dense_state_dict(model, full, state.tp)       # and back, under any degree (and
    load_dense_optimizer_state_dict(opt, model, opt_full, state.tp)  # the optimizer's)

This module never imports ``gpt``: it finds a GPT's parts by type and attribute name.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

import nn
import tensorlite as tl
from nn import functional as F
from nn.attention import mask_input
from tensorlite import backend
from tensorlite.tensor import Function, Tensor

from . import grad_norm
from .comm import Group
from .data_parallel import broadcast_parameters


# ============================================================================ f, g and gather
class CopyToTensorParallel(Function):
    """f: x (replicated) enters a tensor-parallel region. Forward: identity. Backward: the
    gradient is the sum over ranks of what each rank's branch of the region contributes."""

    def forward(self, x, group):
        self.group = group
        return x

    def backward(self, g):
        out = g.copy()                     # C-contiguous, and never the caller's array
        self.group.all_reduce(out)
        return out


class ReduceFromTensorParallel(Function):
    """g: per-rank partial sums leave a region as their sum (replicated). Forward:
    all-reduce. Backward: identity (every rank's partial sum counts once in the total)."""

    def forward(self, x, group):
        out = x.copy()                     # all-reduced in place: x may still be in use
        group.all_reduce(out)
        return out

    def backward(self, g):
        return g


class GatherFromTensorParallel(Function):
    """(..., n) per rank -> (..., tp * n): the ranks' columns side by side, rank order
    (for the full logits when sampling). Backward: each rank keeps its own columns."""

    def forward(self, x, group):
        xp = backend.xp_of(x)
        self.group, self.n = group, x.shape[-1]
        parts = xp.empty((group.size,) + x.shape, dtype=x.dtype)         # (tp, ..., n)
        group.all_gather(xp.ascontiguousarray(x).reshape(-1), parts.reshape(-1))
        return xp.moveaxis(parts, 0, -2).reshape(x.shape[:-1] + (group.size * self.n,))

    def backward(self, g):
        r, n = self.group.rank, self.n
        return backend.xp_of(g).ascontiguousarray(g[..., r * n:(r + 1) * n])


def copy_to_tp(x: Tensor, group: Group) -> Tensor:
    """f (identity forward, all-reduce backward)."""
    return x if group.size == 1 else CopyToTensorParallel.apply(x, group=group)


def reduce_from_tp(x: Tensor, group: Group) -> Tensor:
    """g (all-reduce forward, identity backward)."""
    return x if group.size == 1 else ReduceFromTensorParallel.apply(x, group=group)


def gather_from_tp(x: Tensor, group: Group) -> Tensor:
    """The last dim's shards of every rank, concatenated in rank order."""
    return x if group.size == 1 else GatherFromTensorParallel.apply(x, group=group)


# ============================================================================ how a tensor is cut
@dataclass(frozen=True)
class Split:
    """How a dense tensor is cut over the ranks of a TP group: dim ``dim``, of dense size
    ``size``, is ``chunks`` equal blocks (3 for a packed qkv: q, k, v), and each block is cut
    into ``tp`` equal runs; rank r holds run r of every block. With one block, a size the
    degree does not divide is padded with zeros up to the next multiple (the vocabulary).

        qkv weight (3C, C), chunks=3, tp=2:   rows [q0 q1 | k0 k1 | v0 v1] -> rank 0: [q0 k0 v0]
    """
    dim: int
    size: int
    chunks: int = 1

    def local_size(self, tp: int) -> int:
        if self.chunks == 1:
            return -(-self.size // tp)                           # ceil: the padded share
        if self.size % (self.chunks * tp):
            raise ValueError(f"Split: {self.chunks} blocks of {self.size // self.chunks} "
                             f"cannot be cut into {tp} equal parts")
        return self.size // tp

    def start(self, rank: int, tp: int) -> int:
        """The dense index of a rank's first element (single block only: the vocabulary)."""
        return rank * self.local_size(tp)

    def take(self, full, rank: int, tp: int):
        """The dense array -> rank's part (a new C-contiguous array, zero-padded)."""
        xp = backend.xp_of(full)
        a = xp.moveaxis(full, self.dim, 0)                       # (size, ...)
        per = self.local_size(tp) // self.chunks
        padded = per * self.chunks * tp
        if padded != self.size:
            a = xp.concatenate([a, xp.zeros((padded - self.size,) + a.shape[1:], a.dtype)])
        a = a.reshape((self.chunks, tp, per) + a.shape[1:])[:, rank]   # (chunks, per, ...)
        a = a.reshape((self.chunks * per,) + a.shape[2:])
        return xp.ascontiguousarray(xp.moveaxis(a, 0, self.dim))

    def join(self, parts):
        """(tp, *local shape): every rank's part -> the dense array (padding dropped)."""
        xp = backend.xp_of(parts)
        tp = parts.shape[0]
        a = xp.moveaxis(parts, self.dim + 1, 1)                  # (tp, chunks * per, ...)
        per = a.shape[1] // self.chunks
        a = a.reshape((tp, self.chunks, per) + a.shape[2:]).swapaxes(0, 1)
        a = a.reshape((self.chunks * tp * per,) + a.shape[3:])[:self.size]
        return xp.ascontiguousarray(xp.moveaxis(a, 0, self.dim))

    def gather(self, local, group: Group):
        """Every rank's part (collective) -> the dense array, on every rank."""
        xp = backend.xp_of(local)
        parts = xp.empty((group.size,) + local.shape, dtype=local.dtype)
        group.all_gather(xp.ascontiguousarray(local).reshape(-1), parts.reshape(-1))
        return self.join(parts)


def _param(array) -> nn.Parameter:
    return nn.Parameter(Tensor._make(array, False, None))


# ============================================================================ parallel linears
class ColumnParallelLinear(nn.Module):
    """Linear with its output features cut: rank r holds rows of W (out/tp, in) and of b.

    x (..., in), replicated -> f -> (..., out/tp): the rank's columns of x W^T + b, no
    communication forward. ``chunks``: the output features are that many blocks each cut
    separately (3 for a packed qkv, so that a rank's q, k and v belong to the same heads).
    ``pad``: an output size the degree does not divide is padded with zero rows (the LM head).
    """

    def __init__(self, in_features: int, out_features: int, group: Group, bias: bool = True,
                 chunks: int = 1, pad: bool = False, dtype=None):
        """Draws the dense nn.Linear's initialisation (the same on every rank under the same
        seed) and keeps this rank's part: the same model as the dense one, whatever tp."""
        super().__init__()
        self._shard(nn.Linear(in_features, out_features, bias=bias, dtype=dtype), group,
                    chunks, pad)

    @classmethod
    def from_dense(cls, linear: nn.Linear, group: Group, chunks: int = 1,
                   pad: bool = False) -> "ColumnParallelLinear":
        """This rank's part of ``linear`` (copied: ``linear`` can be dropped)."""
        m = cls.__new__(cls)
        nn.Module.__init__(m)
        m._shard(linear, group, chunks, pad)
        return m

    def _shard(self, linear, group, chunks, pad):
        out = linear.out_features
        if out % (chunks * group.size) and not (pad and chunks == 1):
            raise ValueError(f"ColumnParallelLinear: {out} output features "
                             f"({chunks} block(s)) cannot be cut into {group.size} equal parts")
        self.in_features, self.out_features, self.group = linear.in_features, out, group
        split = Split(0, out, chunks)
        self.tp_shards = {"weight": split}          # what gather_state_dict needs to undo it
        self.weight = _param(split.take(linear.weight.data, group.rank, group.size))
        if linear.bias is not None:
            self.tp_shards["bias"] = split
            self.bias = _param(split.take(linear.bias.data, group.rank, group.size))
        else:
            self.bias = None

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(copy_to_tp(x, self.group), self.weight, self.bias)   # (..., out/tp)

    def extra_repr(self):
        return (f"{self.in_features}, {self.out_features} (this rank: "
                f"{self.weight.shape[0]}), bias={self.bias is not None}, tp={self.group.size}")


class RowParallelLinear(nn.Module):
    """Linear with its input features cut: rank r holds columns of W (out, in/tp); b is whole.

    x (..., in/tp), the rank's features (a column-parallel output) -> x W_r^T, a partial sum
    -> g -> (..., out), replicated -> + b once (after the sum: adding it on every rank
    before would count it tp times).
    """

    def __init__(self, in_features: int, out_features: int, group: Group, bias: bool = True,
                 dtype=None):
        super().__init__()
        self._shard(nn.Linear(in_features, out_features, bias=bias, dtype=dtype), group)

    @classmethod
    def from_dense(cls, linear: nn.Linear, group: Group) -> "RowParallelLinear":
        m = cls.__new__(cls)
        nn.Module.__init__(m)
        m._shard(linear, group)
        return m

    def _shard(self, linear, group):
        if linear.in_features % group.size:
            raise ValueError(f"RowParallelLinear: {linear.in_features} input features cannot "
                             f"be cut into {group.size} equal parts")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.group = group
        split = Split(1, linear.in_features)
        self.tp_shards = {"weight": split}
        self.weight = _param(split.take(linear.weight.data, group.rank, group.size))
        # the bias is replicated: a contiguous copy that this layer owns
        self.bias = None if linear.bias is None else _param(linear.bias.data.copy())

    def forward(self, x: Tensor) -> Tensor:
        y = reduce_from_tp(F.linear(x, self.weight), self.group)          # (..., out)
        return y if self.bias is None else y + self.bias

    def extra_repr(self):
        return (f"{self.in_features} (this rank: {self.weight.shape[1]}), {self.out_features}, "
                f"bias={self.bias is not None}, tp={self.group.size}")


# ============================================================================ dropout seeds
_region_generator = tl.Generator(0)


def region_generator() -> tl.Generator:
    """The generator of dropout inside tensor-parallel regions (a rank's attention heads)."""
    return _region_generator


def manual_seed(seed: int, group: Group) -> None:
    """Seed dropout on every rank of a TP group, with the same ``seed`` on each: tensorlite's
    global generator gets ``seed`` (replicated activations: every rank drops the same
    units), the region generator a seed drawn from (seed, tp rank) (each rank's heads their
    own masks). Call it where one process would call ``tl.manual_seed``."""
    tl.manual_seed(seed)
    _region_generator.manual_seed(
        int(np.random.SeedSequence([seed, 0x7e5, group.rank]).generate_state(1)[0]))


# ============================================================================ attention
class ParallelAttention(nn.MultiHeadAttention):
    """nn.MultiHeadAttention with its heads cut across the ranks: rank r holds heads
    [r H/tp, (r+1) H/tp).

    The packed projection's output is (3, H, D) per token (q, k, v; heads; head size), so a
    rank's heads are three runs of qkv's rows: a ColumnParallelLinear with chunks=3. The
    fused attention op runs on those H/tp heads alone (a head needs no other head), and the
    output projection's input features are (H, D): a RowParallelLinear over the same heads.

        x (B,T,C) -f-> qkv (B,T,3C/tp) -> SelfAttention on H/tp heads -> (B,T,C/tp)
                  -> proj -g-> (B,T,C)

    A KV cache holds the rank's heads only (nn.KVCache sizes itself from the first keys).
    Dropout on the attention weights is inside the region: the region generator. The forward
    is nn.MultiHeadAttention's; only the mask (cut to this rank's heads) and the generator
    differ.
    """
    attn_generator = _region_generator

    def __init__(self, d_model: int, n_head: int, group: Group, bias: bool = True,
                 dropout: float = 0.0, causal: bool = True, rotary=None):
        nn.Module.__init__(self)        # the layers come from the dense one, cut
        self._shard(nn.MultiHeadAttention(d_model, n_head, bias, dropout, causal, rotary), group)

    @classmethod
    def from_dense(cls, attn: nn.MultiHeadAttention, group: Group) -> "ParallelAttention":
        m = cls.__new__(cls)
        nn.Module.__init__(m)
        m._shard(attn, group)
        return m

    def _shard(self, attn, group):
        if attn.n_head % group.size:
            raise ValueError(f"ParallelAttention: {attn.n_head} heads cannot be cut into "
                             f"{group.size} equal parts; pick n_head divisible by the degree")
        self.group, self.d_model, self.head_dim = group, attn.d_model, attn.head_dim
        self.n_head_total, self.n_head = attn.n_head, attn.n_head // group.size
        self.causal, self.dropout_p = attn.causal, attn.dropout_p
        self.qkv = ColumnParallelLinear.from_dense(attn.qkv, group, chunks=3)
        self.proj = RowParallelLinear.from_dense(attn.proj, group)
        self.resid_dropout = attn.resid_dropout         # after g: replicated, global generator
        self.rotary = attn.rotary                        # the model's shared tables

    def _mask(self, attn_mask, x: Tensor, scores_shape: tuple):
        """A mask over all H heads (checked against the dense scores' shape) -> this rank's
        H/tp heads (one broadcast over heads stays as it is)."""
        b, _, t, tk = scores_shape
        mask = mask_input(attn_mask, x, (b, self.n_head_total, t, tk))
        if mask is None:
            return None
        if isinstance(mask, Tensor) and mask.requires_grad:
            # each rank would get the gradient of its own heads only: a learned bias would
            # need its own all-reduce, which nothing here does yet
            raise NotImplementedError("ParallelAttention: a learned attention bias (a float "
                                      "mask that requires grad) is not supported under "
                                      "tensor parallelism")
        if mask.ndim == 4 and mask.shape[1] == self.n_head_total > 1:
            lo = self.group.rank * self.n_head
            mask = mask[:, lo:lo + self.n_head]
        return mask

    def extra_repr(self):
        return (f"d_model={self.d_model}, n_head={self.n_head_total} (this rank: "
                f"{self.n_head}), causal={self.causal}, tp={self.group.size}")


def parallel_mlp_(mlp: nn.FeedForward, group: Group) -> nn.FeedForward:
    """nn.FeedForward becomes Megatron's parallel MLP in place: fc column-parallel (f, then
    d_ff/tp hidden units per rank; the activation is elementwise, so it needs no other rank's
    units), proj row-parallel (g). Its forward stays FeedForward's own; its dropout comes
    after g (replicated: the global generator)."""
    if not isinstance(mlp.fc, nn.Linear) or not isinstance(mlp.proj, nn.Linear):
        raise TypeError(f"parallel_mlp_: expected an nn.FeedForward with nn.Linear layers, got "
                        f"{type(mlp.fc).__name__} and {type(mlp.proj).__name__} (already "
                        "tensor-parallel?)")
    _swap(mlp, "fc", ColumnParallelLinear.from_dense(mlp.fc, group))
    _swap(mlp, "proj", RowParallelLinear.from_dense(mlp.proj, group))
    return mlp


def _swap(parent: nn.Module, name: str, new: nn.Module) -> None:
    """``setattr(parent, name, new)`` keeping the child's place among its siblings: the order
    of named_parameters() is the optimizer's numbering of its state (and so a checkpoint's),
    which must stay the dense model's."""
    order = list(parent._modules)
    setattr(parent, name, new)
    for k in order:
        parent._modules.move_to_end(k)


# ============================================================================ the vocabulary
class VocabParallelEmbedding(nn.Module):
    """nn.Embedding with its rows cut: rank r holds ids [r Vp/tp, (r+1) Vp/tp), Vp the
    vocabulary padded up to a multiple of tp with zero rows (never looked up).

    ids (B, T) -> each rank looks up the ids in its range, zeros elsewhere -> g -> (B, T, C):
    the sum has exactly one non-zero term per token. The gradient reaches only the rank's
    own rows (g's backward is the identity; the zeros pass no gradient).
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, group: Group, dtype=None):
        super().__init__()
        self._shard(nn.Embedding(num_embeddings, embedding_dim, dtype=dtype), group)

    @classmethod
    def from_dense(cls, emb: nn.Embedding, group: Group) -> "VocabParallelEmbedding":
        m = cls.__new__(cls)
        nn.Module.__init__(m)
        m._shard(emb, group)
        return m

    def _shard(self, emb, group):
        self.num_embeddings, self.embedding_dim, self.group = (emb.num_embeddings,
                                                               emb.embedding_dim, group)
        split = Split(0, emb.num_embeddings)
        self.tp_shards = {"weight": split}
        self.vocab_start = split.start(group.rank, group.size)
        self.weight = _param(split.take(emb.weight.data, group.rank, group.size))

    def forward(self, ids) -> Tensor:
        if not isinstance(ids, Tensor):
            ids = tl.tensor(backend.xp_of(self.weight.data).asarray(ids))
        a = ids.data
        if a.size and (int(a.min()) < 0 or int(a.max()) >= self.num_embeddings):
            bad = int(a.min()) if int(a.min()) < 0 else int(a.max())
            raise IndexError(f"VocabParallelEmbedding: id {bad} is out of range for a "
                             f"vocabulary of {self.num_embeddings}")
        xp = backend.xp_of(a)
        lo, hi = self.vocab_start, self.vocab_start + self.weight.shape[0]
        mine = (a >= lo) & (a < hi)                                           # (B, T)
        rows = tl.take(self.weight, Tensor._make(xp.where(mine, a - lo, 0), False, None))
        keep = Tensor._make(mine[..., None].astype(self.weight.dtype), False, None)
        return reduce_from_tp(rows * keep, self.group)                        # (B, T, C)

    def extra_repr(self):
        return (f"{self.num_embeddings}, {self.embedding_dim} (this rank: ids "
                f"{self.vocab_start} .. {self.vocab_start + self.weight.shape[0] - 1}), "
                f"tp={self.group.size}")


class VocabParallelCrossEntropy(Function):
    """Cross-entropy from logits cut over the vocabulary, never gathering them.

    logits (N, Vl): rank r's columns [r Vl, (r+1) Vl) of the (padded) vocabulary, of which
    the first ``n_valid`` are real tokens; targets (N,) ids over the whole vocabulary.
        m_i   = max over every rank's real columns           all-reduce (max)
        s_i   = sum over every rank of sum_j exp(l_ij - m_i)  } one all-reduce (sum) of a
        z_i   = the target's logit, from the rank that owns it } (2, N) buffer
        loss_i = m_i + log s_i - z_i                         (rows whose target is ignore_index: 0)
    backward (no communication): d loss_i / d l_ij = exp(l_ij - lse_i) - [j is the target],
    on the rank's real columns; padded columns get 0 (they were -inf: out of the softmax).
    """
    saved_inputs = (0,)

    def forward(self, logits, targets, group, vocab_start, n_valid, ignore_index):
        xp = backend.xp_of(logits)
        n = logits.shape[0]
        real = logits[:, :n_valid]                                            # (N, n_valid)
        m = real.max(axis=1) if n_valid else xp.full(n, -xp.inf, logits.dtype)
        m = xp.ascontiguousarray(m)
        group.all_reduce(m, "max")                                            # (N,)
        valid = targets != ignore_index
        local_t = targets - vocab_start
        mine = valid & (local_t >= 0) & (local_t < n_valid)                   # the owner's rows
        rows = xp.arange(n)
        sums = xp.zeros((2, n), dtype=logits.dtype)
        sums[0] = xp.exp(real - m[:, None]).sum(axis=1)
        sums[1, mine] = real[rows[mine], local_t[mine]]
        group.all_reduce(sums)
        lse = m + xp.log(sums[0])
        nll = xp.where(valid, lse - sums[1], 0).astype(logits.dtype, copy=False)
        count = int(valid.sum())
        self.logits, self.lse, self.n_valid, self.valid = logits, lse, n_valid, valid
        self.hit_rows, self.hit_cols, self.count = rows[mine], local_t[mine], count
        total = nll.sum()
        return total / count if count else total * xp.asarray(float("nan"), dtype=nll.dtype)

    def backward(self, g):
        xp = backend.xp_of(g)
        logits, nv = self.logits, self.n_valid
        scale = (g / max(self.count, 1) * self.valid).astype(logits.dtype, copy=False)  # (N,)
        grad = xp.zeros_like(logits)
        grad[:, :nv] = xp.exp(logits[:, :nv] - self.lse[:, None]) * scale[:, None]
        grad[self.hit_rows, self.hit_cols] -= scale[self.hit_rows]
        return grad, None


def vocab_parallel_cross_entropy(logits: Tensor, targets, group: Group, vocab_size: int,
                                 ignore_index: int = -100) -> Tensor:
    """The mean cross-entropy (over targets that are not ``ignore_index``) of logits cut over
    the vocabulary: logits (..., Vl), rank r's columns [r Vl, (r+1) Vl) of the vocabulary of
    ``vocab_size`` padded to tp * Vl; targets (...) ids in [0, vocab_size). Equals
    F.cross_entropy of the gathered logits (padding left out), on every rank."""
    if not isinstance(targets, Tensor):
        targets = Tensor(backend.xp_of(logits.data).asarray(targets))
    if targets.dtype.kind not in "iu":
        raise TypeError(f"vocab_parallel_cross_entropy: targets must be integer ids, got "
                        f"{targets.dtype}")
    if logits.shape[:-1] != targets.shape:
        raise ValueError(f"vocab_parallel_cross_entropy: logits of shape {logits.shape} need "
                         f"targets of shape {logits.shape[:-1]}, got {targets.shape}")
    vl = logits.shape[-1]
    if vl * group.size < vocab_size or (vl - 1) * group.size >= vocab_size:
        raise ValueError(f"vocab_parallel_cross_entropy: {vl} columns per rank x {group.size} "
                         f"ranks is not the vocabulary of {vocab_size} padded to the degree")
    t = targets.data.reshape(-1)
    real = t[t != ignore_index]
    if real.size and (int(real.min()) < 0 or int(real.max()) >= vocab_size):
        bad = int(real.min()) if int(real.min()) < 0 else int(real.max())
        raise IndexError(f"vocab_parallel_cross_entropy: target {bad} is out of range for "
                         f"{vocab_size} classes (or ignore_index={ignore_index})")
    start = group.rank * vl
    n_valid = max(0, min(vl, vocab_size - start))
    return VocabParallelCrossEntropy.apply(
        logits.reshape(-1, vl), Tensor._make(t, False, None), group=group, vocab_start=start,
        n_valid=n_valid, ignore_index=ignore_index)


class VocabParallelHead:
    """A GPT's ``logits_and_loss`` (final hidden states -> logits, loss), vocab-parallel.

    The head is the embedding's own shard (tied; the same Parameter, so tied stays tied) or
    the untied lm_head's (a padded ColumnParallelLinear). x (B, T, C) -f-> logits (B, T, Vl)
    for this rank's vocabulary -> with targets: (those local logits, the vocab-parallel loss);
    without (sampling): the full logits (B, T, V), gathered from every rank, padding dropped.
    """

    def __init__(self, model, group: Group):
        self.model, self.group = model, group

    def __call__(self, x: Tensor, targets=None):
        m, group = self.model, self.group
        if m.lm_head is None:
            logits = F.linear(copy_to_tp(x, group), m.wte.weight)             # (B, T, Vl)
        else:
            logits = m.lm_head(x)                                             # f inside
        v = m.wte.num_embeddings
        if targets is None:
            return gather_from_tp(logits, group)[..., :v], None               # (B, T, V)
        return logits, vocab_parallel_cross_entropy(logits, targets, group, v)

    def __repr__(self):
        return f"VocabParallelHead(tp={self.group.size})"


# ============================================================================ a whole model
def tensor_parallel_(model: nn.Module, group: Group) -> nn.Module:
    """Turn a dense model into this rank's tensor-parallel part, in place (collective: every
    rank of ``group`` calls it with the same architecture). Returns ``model``.

    First every rank's dense weights become TP rank 0's (a broadcast, as DataParallel does),
    so that the shards are cut from one model even if the ranks initialised differently.
    Then, by type: every nn.MultiHeadAttention becomes a ParallelAttention, every
    nn.FeedForward a parallel MLP (its two linears swapped). A GPT-shaped model (an
    nn.Embedding ``wte``, ``lm_head`` None (tied) or an nn.Linear, and a
    ``logits_and_loss(x, targets)`` method) also gets a VocabParallelEmbedding, a vocab-
    parallel head and the vocab-parallel loss. Parameter names stay the dense ones, so
    ``gather_state_dict`` gives a state_dict the dense model loads.
    """
    if group.size == 1:
        return model
    broadcast_parameters(model, group)
    attns, mlps = [], []                 # found first, swapped after: no change mid-walk
    for _, m in model.named_modules():
        for child_name, child in m.named_children():
            if isinstance(child, nn.MultiHeadAttention) and not isinstance(child, ParallelAttention):
                attns.append((m, child_name, child))
            elif isinstance(child, nn.FeedForward):
                mlps.append(child)
    for parent, child_name, attn in attns:
        _swap(parent, child_name, ParallelAttention.from_dense(attn, group))
    for mlp in mlps:
        parallel_mlp_(mlp, group)
    wte = getattr(model, "wte", None)
    if isinstance(wte, nn.Embedding):
        if not callable(getattr(model, "logits_and_loss", None)):
            raise TypeError(f"tensor_parallel_: {type(model).__name__} has a token embedding "
                            "'wte' but no logits_and_loss(x, targets) method for the "
                            "vocab-parallel head and loss to replace")
        _swap(model, "wte", VocabParallelEmbedding.from_dense(wte, group))
        head = getattr(model, "lm_head", None)
        if head is not None:
            _swap(model, "lm_head", ColumnParallelLinear.from_dense(head, group, pad=True))
        model.logits_and_loss = VocabParallelHead(model, group)   # shadows the dense method
    return model


def sharded_parameters(model: nn.Module) -> "OrderedDict[str, Split]":
    """name -> Split of every parameter that is cut over the TP ranks (the others are
    replicated: every rank holds the whole tensor, with the same value and gradient)."""
    out = OrderedDict()
    for prefix, m in model.named_modules():
        for pname, split in getattr(m, "tp_shards", {}).items():
            out[f"{prefix}.{pname}" if prefix else pname] = split
    return out


def _splits_by_id(model):
    names = sharded_parameters(model)
    return {id(p): names[n] for n, p in model.named_parameters() if n in names}


def gather_state_dict(model: nn.Module, group: Group) -> "OrderedDict[str, Tensor]":
    """The dense model's state_dict from a TP model (collective): every sharded tensor
    gathered and re-assembled (q, k, v blocks back in place, vocabulary padding dropped), the
    replicated ones as they are. Every rank gets it; rank 0 saves it (nn.checkpoint)."""
    splits = sharded_parameters(model)
    return OrderedDict((k, Tensor._make(splits[k].gather(t.data, group), False, None)
                        if k in splits else t) for k, t in model.state_dict().items())


def load_dense_state_dict(model: nn.Module, state, group: Group, strict: bool = True):
    """Load a dense state_dict (a checkpoint of the dense model, or ``gather_state_dict``'s)
    into a TP model: each rank copies its part. Returns (missing, unexpected) keys."""
    splits = sharded_parameters(model)
    local = OrderedDict()
    for k, v in state.items():
        a = v.data if isinstance(v, Tensor) else v
        local[k] = splits[k].take(a, group.rank, group.size) if k in splits else a
    return model.load_state_dict(local, strict=strict)


def gather_grads(model: nn.Module, group: Group) -> "OrderedDict[str, object]":
    """name -> the dense gradient array (None where there is none), gathered like
    ``gather_state_dict`` (collective; for tests and diagnostics)."""
    splits = sharded_parameters(model)
    out = OrderedDict()
    for k, p in model.named_parameters():
        g = None if p.grad is None else p.grad.data
        if k in splits:
            g = splits[k].gather(g if g is not None else backend.xp_of(p.data).zeros_like(
                p.data), group)
        out[k] = g
    return out


def gather_optimizer_state_dict(optimizer, model: nn.Module, group: Group) -> dict:
    """``optimizer.state_dict()`` (SGD, Adam, AdamW) with the state of every sharded
    parameter gathered to its dense shape: the state the dense model's optimizer would hold,
    for a checkpoint that any degree (or one process) resumes (collective)."""
    splits = _splits_by_id(model)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    sd = optimizer.state_dict()
    state = {}
    for i, st in sd["state"].items():
        p = params[int(i)]
        split = splits.get(id(p))
        state[i] = {k: (split.gather(v, group) if split is not None and hasattr(v, "shape")
                        and tuple(v.shape) == p.shape else v) for k, v in st.items()}
    return {"state": state, "param_groups": sd["param_groups"]}


def load_dense_optimizer_state_dict(optimizer, model: nn.Module, state_dict: dict,
                                    group: Group) -> None:
    """The inverse of ``gather_optimizer_state_dict``: a dense optimizer state (same
    parameter groups) into the optimizer of a TP model, each rank taking its part."""
    splits = _splits_by_id(model)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    state = {}
    for i, st in state_dict["state"].items():
        p = params[int(i)]
        split = splits.get(id(p))
        state[i] = {k: (split.take(v, group.rank, group.size) if split is not None and
                        hasattr(v, "shape") and v.ndim == p.ndim else v) for k, v in st.items()}
    optimizer.load_state_dict({"state": state, "param_groups": state_dict["param_groups"]})


def clip_grad_norm_(model: nn.Module, max_norm: float, group: Group) -> float:
    """nn.optim.clip_grad_norm_ for a TP model: the 2-norm of the whole (dense) model's
    gradient, from each rank's shards (their squares summed over the ranks: one all-reduce)
    and the replicated gradients (counted once: each rank counts 1/tp of them). Scales every
    gradient in place by max_norm / (norm + 1e-6) when that is < 1; returns the norm."""
    return grad_norm.clip_grad_norm_(model.parameters(), max_norm, [group],
                                     norm_weight(model, group))


def norm_weight(model: nn.Module, group: Group):
    """parameter -> the share of its squared gradient norm this TP rank counts (see
    parallel.grad_norm): 1 for a shard, 1 / tp for a replicated tensor."""
    return grad_norm.tensor_parallel_weight(_splits_by_id(model), group.size)
