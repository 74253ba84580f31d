"""The transformer's MLP as one op: Linear -> GELU (tanh) -> Linear.

The same math as three ops (``nn.reference.feed_forward_gelu`` composes it from
``Linear``, ``GELUTanh``, ``Linear``; the tests hold them equal). Why fuse: on a small model
each of those ops costs a hand-off to the thread pool and a pass over memory that has left
the cache. Here each thread takes its rows through all three steps (and back) while they
are in its cache: one hand-off forward, one backward; the weight gradients are summed over
the threads' rows in a fixed order (``cpu.map_rows``), so training stays reproducible.
"""
from __future__ import annotations

from .. import backend, cpu
from ..tensor import Function
from .nn import _rows2d, gelu_tanh_grad_into, gelu_tanh_into


class FeedForwardGELU(Function):
    """y = gelu_tanh(x W1^T + b1) W2^T + b2.

    x: (..., C); w1: (H, C), b1: (H,) or None; w2: (C_out, H), b2: (C_out,) or None.
    Saves x and w1, w2 (alive anyway), the pre-activation h and the activation a (N, H):
    the same arrays the three separate ops keep.
    """
    saved_inputs = (0, 1, 3)

    def forward(self, x, w1, b1, w2, b2):
        xp = backend.xp_of(x)
        x2 = _rows2d(x)                                        # (N, C)
        n, hdim = x2.shape[0], w1.shape[0]
        h = xp.empty((n, hdim), dtype=x.dtype)                 # pre-activation
        a = xp.empty_like(h)                                   # activation
        y = xp.empty((n, w2.shape[0]), dtype=x.dtype)

        def kernel(lo, hi):                                    # rows lo:hi, start to finish
            xp.matmul(x2[lo:hi], w1.T, out=h[lo:hi])
            if b1 is not None:
                h[lo:hi] += b1
            for p, q in cpu.row_blocks(lo, hi, hdim):          # in cache-sized pieces
                gelu_tanh_into(h[p:q], a[p:q])
            xp.matmul(a[lo:hi], w2.T, out=y[lo:hi])
            if b2 is not None:
                y[lo:hi] += b2
        cpu.for_rows(kernel, n, hdim, xp, block=cpu.rows_per_thread(n, hdim))
        self.x2, self.w1, self.w2, self.h, self.a = x2, w1, w2, h, a
        self.has_b = (b1 is not None, b2 is not None)
        self.shape = x.shape
        return y.reshape(x.shape[:-1] + (w2.shape[0],))

    def backward(self, g):
        xp = backend.xp_of(g)
        x2, w1, w2, h, a = self.x2, self.w1, self.w2, self.h, self.a
        g2 = _rows2d(g)                                        # (N, C_out)
        n, hdim = h.shape
        gx = xp.empty_like(x2) if self.needs_input_grad[0] else None

        def kernel(lo, hi):                 # partial weight gradients of rows lo:hi
            gb = g2[lo:hi]
            gw2 = gb.T @ a[lo:hi]                              # (C_out, H)
            gb2 = gb.sum(axis=0)
            gh = gb @ w2                                       # (rows, H): dL/da
            for p, q in cpu.row_blocks(0, hi - lo, hdim):      # dL/dh, in place
                gelu_tanh_grad_into(h[lo + p:lo + q], gh[p:q], gh[p:q])
            gw1 = gh.T @ x2[lo:hi]                             # (H, C)
            gb1 = gh.sum(axis=0)
            if gx is not None:
                xp.matmul(gh, w1, out=gx[lo:hi])
            return gw1, gb1, gw2, gb2
        gw1, gb1, gw2, gb2 = cpu.map_rows(kernel, n, hdim, xp, block=cpu.rows_per_thread(n, hdim))
        need = self.needs_input_grad
        return ((gx.reshape(self.shape) if gx is not None else None),
                gw1 if need[1] else None, gb1 if self.has_b[0] and need[2] else None,
                gw2 if need[3] else None, gb2 if self.has_b[1] and need[4] else None)
