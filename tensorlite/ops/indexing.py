"""Indexing: ``x[idx]``, ``where``, ``masked_fill``, ``take`` (embedding gather), ``one_hot``.

Backwards of gathers scatter-add, so repeated indices accumulate their gradients.
"""
from __future__ import annotations

import numpy as np

from .. import backend
from ..tensor import Function, Tensor
from .elementwise import _binary, check_same_device


def _index_arrays(idx, x: Tensor):
    """Turn Tensors/lists inside an index into backend arrays; report if any is advanced."""
    xp = backend.xp_of(x.data)
    items = idx if isinstance(idx, tuple) else (idx,)
    out, advanced = [], False
    for it in items:
        if isinstance(it, Tensor):
            check_same_device("getitem", x, it)
            if it.dtype.kind == "f":
                raise IndexError(f"indices must be integers or booleans, got a {it.dtype} tensor")
            if it.ndim == 0 and it.dtype.kind in "iu":
                out.append(int(it.item()))   # a 0-d integer tensor is an integer (a view)
                continue
            it = it.data.copy()   # the backward scatters by it: a later change must not count
            advanced = True
        elif isinstance(it, np.integer):
            it = int(it)
        elif isinstance(it, list):
            it = xp.asarray(it)
            advanced = True
        elif hasattr(it, "dtype") and hasattr(it, "shape") and not isinstance(it, (int, slice)):
            if getattr(it, "ndim", 0) == 0 and it.dtype.kind in "iu":
                out.append(int(it))              # a 0-d integer array is an integer too
                continue
            if getattr(it, "ndim", 0) > 0 or it.dtype.kind == "b":
                advanced = True
            it = xp.array(it)     # a copy, as for a Tensor index
        out.append(it)
    return tuple(out), advanced


class GetItem(Function):
    makes_view = True   # basic indexing (slices, integers) gives a view; advanced a copy

    def forward(self, x, idx, advanced):
        self.in_shape, self.dtype, self.idx, self.advanced = x.shape, x.dtype, idx, advanced
        out = x[idx]
        if not advanced and type(out) is not type(x):
            out = x[idx + (Ellipsis,)]   # x[0] of a vector: a 0-d view, not a NumPy scalar copy
        return out

    @staticmethod
    def unview(old_base, new, idx, advanced):
        """The base with ``new`` written where this view looks (a write through the view)."""
        return IndexPut.apply(old_base, new, idx=idx)

    def backward(self, g):
        xp = backend.xp_of(g)
        out = xp.zeros(self.in_shape, dtype=g.dtype)
        if self.advanced:
            backend.scatter_add(xp, out, self.idx, g)  # repeated indices accumulate
        else:
            out[self.idx] = g
        return out


def getitem(x: Tensor, idx) -> Tensor:
    arr_idx, advanced = _index_arrays(idx, x)
    try:
        out = GetItem.apply(x, idx=arr_idx, advanced=advanced)
    except IndexError as e:
        raise IndexError(f"index {idx!r} is invalid for a tensor of shape {x.shape}: {e}") from None
    return out


class IndexPut(Function):
    """``x[idx] = v`` out of place: a copy of x with v written at idx. What ``x[idx] = v`` on
    a tensor in a graph records (see ops/inplace.py)."""

    def forward(self, x, v, idx):
        self.idx = idx
        self.v_shape = getattr(v, "shape", ())
        out = x.copy()
        out[idx] = v
        return out

    def backward(self, g):
        gx = gv = None
        if self.needs_input_grad[0]:
            gx = g.copy()
            gx[self.idx] = 0            # what was overwritten no longer reaches the output
        if self.needs_input_grad[1]:
            gv = g[self.idx]            # the engine sums it back to v's shape
            extra = len(self.v_shape) - gv.ndim
            if extra > 0:               # v had leading 1-dims NumPy dropped on assignment
                gv = gv.reshape((1,) * extra + gv.shape)
        return gx, gv


def index_arrays(x: Tensor, idx):
    """``idx`` with its Tensors and lists turned into backend arrays, and a clear error for a
    float index."""
    return _index_arrays(idx, x)[0]


class Where(Function):
    saved_inputs = (0,)

    def forward(self, cond, a, b):
        self.cond = cond
        return backend.xp_of(cond).where(cond, a, b)

    def backward(self, g):
        xp = backend.xp_of(g)
        zero = xp.zeros((), dtype=g.dtype)
        ga = xp.where(self.cond, g, zero) if self.needs_input_grad[1] else None
        gb = xp.where(self.cond, zero, g) if self.needs_input_grad[2] else None
        return None, ga, gb


def where(cond, a, b) -> Tensor:
    """Elementwise ``a if cond else b`` (broadcasting)."""
    if not isinstance(cond, Tensor):
        cond = Tensor(cond, device=(a if isinstance(a, Tensor) else b).device)
    if cond.dtype.kind != "b":
        raise TypeError(f"where: condition must be a bool tensor, got {cond.dtype}")
    a, b = _binary("where", a, b)
    check_same_device("where", cond, a, b)
    return Where.apply(cond, a, b)


class MaskedFill(Function):
    saved_inputs = (1,)

    def forward(self, x, mask, value):
        self.mask = mask
        xp = backend.xp_of(x)
        return xp.where(mask, xp.asarray(value, dtype=x.dtype), x)

    def backward(self, g):
        xp = backend.xp_of(g)
        return xp.where(self.mask, xp.zeros((), dtype=g.dtype), g), None


def masked_fill(x: Tensor, mask, value) -> Tensor:
    """``value`` where ``mask`` is True (mask broadcasts to x's shape), x elsewhere. A tensor
    ``value`` (one element) gets its gradient: the sum of the output's where mask is True."""
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(f"masked_fill: value must be a number or a one-element tensor, "
                             f"got a tensor of shape {value.shape}")
        if value.requires_grad:
            out = where(mask, value.reshape(()).astype(x.dtype), x)
            if out.shape != x.shape:
                raise ValueError(f"masked_fill: mask of shape {tuple(mask.shape)} would grow "
                                 f"the tensor's shape {x.shape}")
            return out
        value = value.item()
    if not isinstance(mask, Tensor):
        mask = Tensor(mask, device=x.device)
    if mask.dtype.kind != "b":
        raise TypeError(f"masked_fill: mask must be a bool tensor, got {mask.dtype}")
    check_same_device("masked_fill", x, mask)
    try:
        backend.xp_of(x.data).broadcast_shapes(mask.shape, x.shape)
    except ValueError:
        raise ValueError(f"masked_fill: mask of shape {mask.shape} does not broadcast to the "
                         f"tensor's shape {x.shape}") from None
    if backend.xp_of(x.data).broadcast_shapes(mask.shape, x.shape) != x.shape:
        raise ValueError(f"masked_fill: mask of shape {mask.shape} would grow the tensor's "
                         f"shape {x.shape}")
    return MaskedFill.apply(x, mask, value=value)


class Take(Function):
    """out[...] = weight[indices[...]]: an embedding lookup along dim 0.

    weight: (V, *rest), indices: any int shape S  ->  out: (*S, *rest)
    """
    saved_inputs = (1,)

    def forward(self, weight, indices):
        self.shape, self.indices = weight.shape, indices
        return weight[indices]

    def backward(self, g):
        xp = backend.xp_of(g)
        rest = self.shape[1:]
        gw = xp.zeros(self.shape, dtype=g.dtype)
        # (N,) indices and (N, *rest) rows: repeated tokens accumulate
        backend.scatter_add(xp, gw, self.indices.reshape(-1), g.reshape((-1,) + rest))
        return gw, None


def take(weight: Tensor, indices) -> Tensor:
    if weight.ndim < 1:
        raise ValueError("take: the table must have at least one dim")
    if not isinstance(indices, Tensor):
        indices = Tensor(backend.xp_of(weight.data).asarray(indices))
    check_same_device("take", weight, indices)
    if indices.dtype.kind not in "iu":
        raise TypeError(f"take: indices must be integers, got {indices.dtype}")
    if indices.numel():
        lo, hi = int(indices.data.min()), int(indices.data.max())
        if lo < 0 or hi >= weight.shape[0]:
            bad = lo if lo < 0 else hi
            raise IndexError(f"take: index {bad} is out of range for a table of {weight.shape[0]} "
                             f"rows (valid: 0 .. {weight.shape[0] - 1})")
    return Take.apply(weight, indices)


def one_hot(indices, num_classes: int, dtype=None) -> Tensor:
    """(*S) int -> (*S, num_classes); int64 like PyTorch unless ``dtype`` is given."""
    from ..tensor import as_dtype, int64
    if not isinstance(indices, Tensor):
        indices = Tensor(indices)
    if indices.dtype.kind not in "iu":
        raise TypeError(f"one_hot: indices must be integers, got {indices.dtype}")
    xp = backend.xp_of(indices.data)
    if indices.numel() and (int(indices.data.min()) < 0 or int(indices.data.max()) >= num_classes):
        raise IndexError(f"one_hot: indices span {int(indices.data.min())} .. "
                         f"{int(indices.data.max())}, outside 0 .. {num_classes - 1}")
    dt = as_dtype(dtype) if dtype is not None else int64
    out = (indices.data[..., None] == xp.arange(num_classes)).astype(dt)
    return Tensor._make(out, False, None)
