"""Fused neural-network ops: numerically stable softmax family.

Each op here could be composed from elementwise ops and reductions; doing it as one op
saves the intermediates (memory) and the Python overhead (speed). The composed versions
live in the tests, which hold the two equal.
"""
from __future__ import annotations

from .. import backend
from ..tensor import Function, Tensor
from .shape import _dim


class Softmax(Function):
    def forward(self, x, axis):
        xp = backend.xp_of(x)
        e = xp.exp(x - x.max(axis=axis, keepdims=True))   # shift: exp never overflows
        e /= e.sum(axis=axis, keepdims=True)
        self.out, self.axis = e, axis
        return e

    def backward(self, g):
        y = self.out
        return y * (g - (g * y).sum(axis=self.axis, keepdims=True))


class LogSoftmax(Function):
    def forward(self, x, axis):
        xp = backend.xp_of(x)
        shifted = x - x.max(axis=axis, keepdims=True)
        out = shifted - xp.log(xp.exp(shifted).sum(axis=axis, keepdims=True))
        self.out, self.axis = out, axis
        return out

    def backward(self, g):
        xp = backend.xp_of(g)
        return g - xp.exp(self.out) * g.sum(axis=self.axis, keepdims=True)


class LogSumExp(Function):
    def forward(self, x, axis, keepdim):
        xp = backend.xp_of(x)
        m = x.max(axis=axis, keepdims=True)
        e = xp.exp(x - m)
        s = e.sum(axis=axis, keepdims=True)
        self.p = e / s                     # softmax: the gradient of logsumexp
        self.axis, self.keepdim = axis, keepdim
        out = m + xp.log(s)
        return out if keepdim else out.squeeze(axis)

    def backward(self, g):
        xp = backend.xp_of(g)
        if not self.keepdim:
            g = xp.expand_dims(g, self.axis)
        return g * self.p


def _float(x: Tensor, op: str):
    if x.dtype.kind != "f":
        raise TypeError(f"{op}: needs a float tensor, got {x.dtype}; use .float() first")


def softmax(x: Tensor, dim: int = -1) -> Tensor:
    _float(x, "softmax")
    return Softmax.apply(x, axis=_dim(dim, x.ndim, "softmax"))


def log_softmax(x: Tensor, dim: int = -1) -> Tensor:
    _float(x, "log_softmax")
    return LogSoftmax.apply(x, axis=_dim(dim, x.ndim, "log_softmax"))


def logsumexp(x: Tensor, dim: int = -1, keepdim: bool = False) -> Tensor:
    _float(x, "logsumexp")
    return LogSumExp.apply(x, axis=_dim(dim, x.ndim, "logsumexp"), keepdim=keepdim)
