"""Reductions: sum, mean, max, min, var (``dim=`` an int, a tuple or None; ``keepdim=``)."""
from __future__ import annotations

import builtins

from .. import backend
from ..tensor import Function, Tensor


def normalize_dims(dim, ndim: int, op: str):
    """None -> all axes; int or tuple -> a sorted tuple of non-negative axes (checked)."""
    if dim is None:
        return tuple(range(ndim))
    dims = (dim,) if isinstance(dim, int) else tuple(dim)
    out = []
    n = builtins.max(ndim, 1)
    for d in dims:
        if not isinstance(d, int):
            raise TypeError(f"{op}: dim must be an int or a tuple of ints, got {dim!r}")
        if not -n <= d < n:
            raise IndexError(f"{op}: dim {d} is out of range for a tensor with {ndim} dims "
                             f"(valid: {-n} .. {n - 1})")
        out.append(d % ndim if ndim else 0)
    if len(set(out)) != len(out):
        raise ValueError(f"{op}: dim {dim!r} repeats an axis")
    return tuple(sorted(out)) if ndim else ()


def _expand_back(g, in_shape, axes, keepdim):
    """Broadcast a reduced gradient back over the reduced axes: (kept shape) -> in_shape."""
    xp = backend.xp_of(g)
    if not keepdim and axes:
        g = xp.expand_dims(g, axes)
    return xp.broadcast_to(g, in_shape)


class Sum(Function):
    def forward(self, x, axes, keepdim):
        self.in_shape, self.axes, self.keepdim = x.shape, axes, keepdim
        return x.sum(axis=axes, keepdims=keepdim)

    def backward(self, g):
        return _expand_back(g, self.in_shape, self.axes, self.keepdim)


class Mean(Function):
    def forward(self, x, axes, keepdim):
        self.in_shape, self.axes, self.keepdim = x.shape, axes, keepdim
        n = 1
        for a in axes:
            n *= x.shape[a]
        self.n = n
        return x.mean(axis=axes, keepdims=keepdim)

    def backward(self, g):
        return _expand_back(g / self.n, self.in_shape, self.axes, self.keepdim)


class MaxMin(Function):
    """max or min over axes; the gradient is split evenly between tied extremes."""

    def forward(self, x, axes, keepdim, is_max):
        xp = backend.xp_of(x)
        if x.size == 0:
            raise ValueError(f"{'max' if is_max else 'min'}: reduction over an empty tensor "
                             f"of shape {x.shape}")
        out = (xp.max if is_max else xp.min)(x, axis=axes, keepdims=True)
        self.mask = x == out
        self.axes, self.keepdim, self.in_shape = axes, keepdim, x.shape
        return out if keepdim else out.reshape([n for i, n in enumerate(x.shape) if i not in axes])

    def backward(self, g):
        xp = backend.xp_of(g)
        if not self.keepdim and self.axes:
            g = xp.expand_dims(g, self.axes)
        count = self.mask.sum(axis=self.axes, keepdims=True)
        return self.mask * (g / count)


class Var(Function):
    def forward(self, x, axes, keepdim, correction):
        n = 1
        for a in axes:
            n *= x.shape[a]
        if n - correction <= 0:
            raise ValueError(f"var: {n} elements with correction={correction} leaves "
                             f"{n - correction} degrees of freedom; use correction=0 or more data")
        mean = x.mean(axis=axes, keepdims=True)
        self.centered = x - mean
        self.denom = n - correction
        self.axes, self.keepdim = axes, keepdim
        return (self.centered * self.centered).sum(axis=axes, keepdims=keepdim) / self.denom

    def backward(self, g):
        xp = backend.xp_of(g)
        if not self.keepdim and self.axes:
            g = xp.expand_dims(g, self.axes)
        return g * (2.0 / self.denom) * self.centered


def sum(x: Tensor, dim=None, keepdim=False) -> Tensor:
    return Sum.apply(x, axes=normalize_dims(dim, x.ndim, "sum"), keepdim=keepdim)


def mean(x: Tensor, dim=None, keepdim=False) -> Tensor:
    if x.dtype.kind != "f":
        raise TypeError(f"mean: needs a float tensor, got {x.dtype}; use .float() first")
    axes = normalize_dims(dim, x.ndim, "mean")
    if builtins.any(x.shape[a] == 0 for a in axes):
        raise ValueError(f"mean: reduction over an empty dimension of shape {x.shape}")
    return Mean.apply(x, axes=axes, keepdim=keepdim)


def max(x: Tensor, dim=None, keepdim=False) -> Tensor:
    return MaxMin.apply(x, axes=normalize_dims(dim, x.ndim, "max"), keepdim=keepdim, is_max=True)


def min(x: Tensor, dim=None, keepdim=False) -> Tensor:
    return MaxMin.apply(x, axes=normalize_dims(dim, x.ndim, "min"), keepdim=keepdim, is_max=False)


def var(x: Tensor, dim=None, keepdim=False, correction=1, unbiased=None) -> Tensor:
    """Variance with Bessel's ``correction`` (1 = unbiased, as PyTorch; ``unbiased=False`` = 0)."""
    if unbiased is not None:
        correction = 1 if unbiased else 0
    if x.dtype.kind != "f":
        raise TypeError(f"var: needs a float tensor, got {x.dtype}; use .float() first")
    return Var.apply(x, axes=normalize_dims(dim, x.ndim, "var"), keepdim=keepdim,
                     correction=correction)


def _arg(x: Tensor, dim, keepdim, fn: str) -> Tensor:
    xp = backend.xp_of(x.data)
    if dim is None:
        return Tensor._make(xp.asarray(getattr(xp, fn)(x.data)), False, None)
    (axis,) = normalize_dims(dim, x.ndim, fn)
    out = getattr(xp, fn)(x.data, axis=axis)
    if keepdim:
        out = xp.expand_dims(out, axis)
    return Tensor._make(out, False, None)


def argmax(x, dim=None, keepdim=False):
    return _arg(x, dim, keepdim, "argmax")


def argmin(x, dim=None, keepdim=False):
    return _arg(x, dim, keepdim, "argmin")


def any(x, dim=None):
    axes = None if dim is None else normalize_dims(dim, x.ndim, "any")
    return Tensor._make(backend.xp_of(x.data).asarray(x.data.any(axis=axes)), False, None)


def all(x, dim=None):
    axes = None if dim is None else normalize_dims(dim, x.ndim, "all")
    return Tensor._make(backend.xp_of(x.data).asarray(x.data.all(axis=axes)), False, None)
