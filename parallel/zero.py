"""ZeRO stage 1 (Rajbhandari et al., 2020): the optimizer state is sharded over the
data-parallel ranks. Every rank still holds the whole model and computes gradients for its
whole slice of the batch, but AdamW's two moments (2x the parameters: the largest part of
training memory after activations) live 1/N on each rank.

One step on N ranks, P parameters (padded to a multiple of N; each rank owns S = P/N):

    flat (P,)     <- every .grad, flattened in parameter-group order (zeros where None)
    reduce-scatter: rank r receives elements [r*S, (r+1)*S) of the sum over ranks,
                    / N -> grad_shard (S,)          (MPI_Reduce_scatter_block)
    clipping:     the global norm from every rank's sum of grad_shard**2 (one all-reduce)
    AdamW:        master (S,) = rank r's slice of the flattened parameters (read from
                  them each step), updated with its exp_avg (S,) and exp_avg_sq (S,)
    all-gather:   every rank's master (S,) -> flat (P,) -> back into each parameter
                  (MPI_Allgather)

The AdamW arithmetic is nn.optim's own: the shard is cut at parameter-group boundaries
into pieces, each a flat Parameter (a view of ``master``, its gradient a view of
``grad_shard``) in an inner AdamW group with that group's hyperparameters, so weight decay
applies per element exactly as in the unsharded optimizer (decayed matrices, undecayed
biases and gains). Same communication volume as data parallel's all-reduce (a
reduce-scatter plus an all-gather is how large all-reduces are done anyway).

Differences from AdamW that a user can see: all parameters step together (one step
count), and a parameter with no gradient on any rank is updated with a zero gradient
(its moments decay, weight decay applies) where AdamW would skip it.
"""
from __future__ import annotations

import math

from nn.module import Parameter
from nn.optim import AdamW
from tensorlite import backend
from tensorlite.tensor import Tensor

from . import grad_norm
from .comm import Group
from .data_parallel import broadcast_parameters

_HYPER = ("lr", "betas", "eps", "weight_decay")
_MOMENTS = ("exp_avg", "exp_avg_sq")


class ZeroAdamW:
    """AdamW with its state sharded over ``group`` (ZeRO-1). Same arguments as ``nn.AdamW``
    plus the data-parallel group; broadcasts rank 0's parameters when built.

        opt = ZeroAdamW(param_groups(model, 0.1), state.dp, lr=2e-3, betas=(0.9, 0.95))
        forward/backward (every micro-step: no communication)
        opt.reduce_gradients()              # the reduction: reduce-scatter
        norm = opt.clip_grad_norm_(1.0)     # the global norm, clipping the shard
        opt.step(); opt.zero_grad()         # AdamW on the shard, all-gather the parameters

    ``param_groups`` are the user's groups (an LR schedule sets ``lr`` there, as usual).
    ``state_dict()`` / ``load_state_dict()`` use the unsharded AdamW's format (collective:
    every rank calls them), so a checkpoint moves between ZeRO, plain AdamW and any number
    of ranks; ``unsharded()`` is an ``nn.AdamW`` holding the full state, for nn.checkpoint.
    """

    def __init__(self, params, group: Group, lr=1e-3, betas=(0.9, 0.999), eps=1e-8,
                 weight_decay=0.01):
        self.group = group
        # An AdamW that never steps: it validates the groups and hyperparameters, holds the
        # user's param_groups, and reads/writes the unsharded state_dict format.
        self._full = AdamW(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
        self._params = [p for g in self.param_groups for p in g["params"]]
        first = self._params[0]
        for p in self._params:
            if p.dtype != first.dtype or p.device != first.device:
                raise TypeError(f"ZeroAdamW: all parameters must share one dtype and device "
                                f"(one flat buffer); got {first.dtype} on {first.device} and "
                                f"{p.dtype} on {p.device} (shape {p.shape})")
        broadcast_parameters(self._params, group)
        xp, dtype = backend.xp_of(first.data), first.dtype
        self._offsets, n = [], 0
        for p in self._params:
            self._offsets.append(n)
            n += p.numel()
        self.numel = n
        self.shard = -(-n // group.size)                    # S = ceil(P / N)
        self.lo = group.rank * self.shard                   # this rank owns [lo, lo + S)
        self._flat = xp.zeros(self.shard * group.size, dtype)   # grads in, parameters out
        self._grad_shard = xp.zeros(self.shard, dtype)
        self._master = xp.zeros(self.shard, dtype)
        self._inner, self._piece_group = self._make_inner()
        self._steps = 0
        self._reduced = False

    @property
    def param_groups(self) -> list:
        return self._full.param_groups

    def _make_inner(self):
        """Cut [lo, lo + S) at the parameter-group boundaries: one flat Parameter per piece,
        in an AdamW group with that group's hyperparameters. None when the shard is all
        padding (more ranks than elements)."""
        groups, owner, start = [], [], 0
        for gi, g in enumerate(self.param_groups):
            end = start + sum(p.numel() for p in g["params"])
            a, b = max(start, self.lo), min(end, self.lo + self.shard)
            if a < b:
                piece = Parameter(self._master[a - self.lo:b - self.lo])     # views, no copy
                piece.grad = Tensor(self._grad_shard[a - self.lo:b - self.lo])
                groups.append({"params": [piece], **{k: g[k] for k in _HYPER}})
                owner.append(gi)
            start = end
        return (AdamW(groups) if groups else None), owner

    def _pieces(self):
        """(piece Parameter, its start in the flat layout) for each piece of this shard."""
        if self._inner is None:
            return []
        starts, start = [], 0
        for g in self.param_groups:
            starts.append(start)
            start += sum(p.numel() for p in g["params"])
        out = []
        for ig, gi in zip(self._inner.param_groups, self._piece_group):
            a = max(starts[gi], self.lo)
            out.append((ig["params"][0], a))
        return out

    # -- the step -----------------------------------------------------------------------------
    def reduce_gradients(self) -> None:
        """Average the gradients over the group, keeping this rank's shard of the average
        (``MPI_Reduce_scatter_block``). The model's ``.grad`` stay the local gradients."""
        flat = self._flat
        for p, o in zip(self._params, self._offsets):
            if p.grad is None:
                flat[o:o + p.numel()] = 0
            else:
                flat[o:o + p.numel()] = p.grad.data.reshape(-1)
        flat[self.numel:] = 0                                  # the padding
        self.group.reduce_scatter(flat, self._grad_shard)
        self._grad_shard /= self.group.size
        self._reduced = True

    def clip_grad_norm_(self, max_norm: float, error_if_nonfinite: bool = False,
                        groups=(), weight=None) -> float:
        """``nn.clip_grad_norm_`` (L2) on the sharded gradient: the global norm is the square
        root of the sum over ranks of each shard's sum of squares; returns it (before
        clipping). Reduces the gradients first if `reduce_gradients` was not called.

        When each data-parallel replica is itself spread over ranks (tensor or pipeline
        parallel), ``groups`` are those groups and ``weight`` (parameter -> share, as in
        parallel.grad_norm) says how much of each parameter this rank counts."""
        if not self._reduced:
            self.reduce_gradients()
        xp, s = backend.xp_of(self._grad_shard), self._grad_shard
        if weight is None:
            local = grad_norm.sum_of_squares(s)
        else:
            w = self._shard_weights(weight)
            local = float(xp.vdot(s.astype(xp.float64) * w, s.astype(xp.float64)))
        total = grad_norm.total_norm(self.group.all_reduce_scalar(local), groups)
        if not math.isfinite(total) and error_if_nonfinite:
            raise RuntimeError(f"ZeroAdamW.clip_grad_norm_: the total norm of the gradients is "
                               f"{total}, so it cannot be clipped; lower the learning rate or "
                               "find the inf/nan")
        coef = max_norm / (total + 1e-6)
        if coef < 1.0 or not math.isfinite(total):
            s *= coef
        return total

    def _shard_weights(self, weight):
        """(S,) float64: each element of this rank's shard weighted as its parameter."""
        if getattr(self, "_weights_for", None) is not weight:
            xp = backend.xp_of(self._master)
            w = xp.zeros(self.shard, xp.float64)
            for p, o in zip(self._params, self._offsets):
                a, b = max(o, self.lo), min(o + p.numel(), self.lo + self.shard)
                if a < b:
                    w[a - self.lo:b - self.lo] = weight(p)
            self._weights, self._weights_for = w, weight
        return self._weights

    def step(self) -> None:
        """AdamW on this rank's shard, then every rank's updated shard into every rank's
        parameters. Reduces the gradients first if `reduce_gradients` was not called."""
        if not self._reduced:
            self.reduce_gradients()
        # The parameters are the truth (a checkpoint loaded into the model after this
        # optimizer was built just works): read this rank's slice of them.
        for p, o in zip(self._params, self._offsets):
            a, b = max(o, self.lo), min(o + p.numel(), self.lo + self.shard)
            if a < b:
                self._master[a - self.lo:b - self.lo] = p.data.reshape(-1)[a - o:b - o]
        if self._inner is not None:
            for ig, gi in zip(self._inner.param_groups, self._piece_group):
                ig.update({k: self.param_groups[gi][k] for k in _HYPER})
            self._inner.step()
        self._steps += 1
        self.group.all_gather(self._master, self._flat)
        for p, o in zip(self._params, self._offsets):
            p.data[...] = self._flat[o:o + p.numel()].reshape(p.shape)
        self._reduced = False

    def zero_grad(self, set_to_none: bool = True) -> None:
        self._full.zero_grad(set_to_none)

    # -- state ---------------------------------------------------------------------------------
    def state_nbytes(self) -> int:
        """Bytes of optimizer state (the two moments) held by this rank."""
        if self._inner is None:
            return 0
        return sum(v.nbytes for st in self._inner.state.values() for k, v in st.items()
                   if k in _MOMENTS)

    def _gather_moment(self, name: str):
        """The whole moment ``name`` as one flat (P_padded,) array on every rank."""
        xp = backend.xp_of(self._master)
        shard = xp.zeros(self.shard, self._master.dtype)
        for piece, a in self._pieces():
            shard[a - self.lo:a - self.lo + piece.numel()] = self._inner.state[piece][name]
        full = xp.empty(self.shard * self.group.size, shard.dtype)
        self.group.all_gather(shard, full)
        return full

    def state_dict(self) -> dict:
        """The unsharded AdamW's state_dict (fresh arrays, gathered from every rank).
        Collective: every rank calls it and gets the same dict; each holds the whole
        state meanwhile (a rank-0-only gather is the next step for large models)."""
        state = {}
        if self._steps:
            full = {name: self._gather_moment(name) for name in _MOMENTS}
            for p, o in zip(self._params, self._offsets):
                state[p] = {"step": self._steps, **{
                    name: full[name][o:o + p.numel()].reshape(p.shape) for name in _MOMENTS}}
        self._full.state = state
        try:
            return self._full.state_dict()
        finally:
            self._full.state = {}

    def load_state_dict(self, state_dict: dict) -> None:
        """Load an unsharded AdamW state_dict (from AdamW, from ZeroAdamW on any number of
        ranks): hyperparameters into ``param_groups``, this rank's shard of the moments."""
        self._full.load_state_dict(state_dict)           # checks groups, shapes; copies arrays
        loaded, self._full.state = self._full.state, {}
        steps = {st.get("step") for st in loaded.values()}
        if loaded and (len(loaded) != len(self._params) or len(steps) != 1):
            raise ValueError(f"ZeroAdamW.load_state_dict: the state has {len(loaded)} of "
                             f"{len(self._params)} parameters with step counts {sorted(steps)}; "
                             "ZeroAdamW steps all parameters together, so it needs state for "
                             "every parameter at one step count")
        self._steps = steps.pop() if loaded else 0
        if self._inner is None:
            return
        self._inner.state = {}
        if not loaded:
            return
        xp = backend.xp_of(self._master)
        for name in _MOMENTS:
            full = xp.zeros(self.shard * self.group.size, self._master.dtype)
            for p, o in zip(self._params, self._offsets):
                full[o:o + p.numel()] = loaded[p][name].reshape(-1)
            for piece, a in self._pieces():
                st = self._inner.state.setdefault(piece, {"step": self._steps})
                st[name] = full[a:a + piece.numel()].copy()

    def unsharded(self) -> AdamW:
        """An ``nn.AdamW`` over the same parameters holding the whole state (collective), to
        save with ``nn.save_checkpoint(..., optimizer=opt.unsharded())`` on rank 0."""
        full = AdamW([dict(g) for g in self.param_groups])
        full.load_state_dict(self.state_dict())
        return full
