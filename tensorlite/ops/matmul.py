"""Matrix product, batched and broadcasting like ``numpy.matmul``.

Speed note: a stack of rows times one matrix, (..., K) @ (K, N), is done as a single 2-D
GEMM over all the rows (one BLAS call instead of one per batch element), and the weight
gradient of that case is one (K, rows) @ (rows, N) GEMM instead of a batched product
followed by a sum.
"""
from __future__ import annotations

from .. import backend
from ..tensor import Function, Tensor
from .elementwise import _binary
from .nn import mm


def _swap(a):
    return a.swapaxes(-1, -2)


class MatMul(Function):
    """a: (..., M, K) @ b: (..., K, N) -> (..., M, N); both at least 2-D."""
    saved_inputs = (0, 1)

    def saved_values(self):  # a's values serve b's gradient, b's serve a's
        n = self.needs_input_grad
        return tuple(i for i, need in ((0, n[1]), (1, n[0])) if need), False

    def forward(self, a, b):
        self.a, self.b = a, b
        if b.ndim == 2 and a.ndim > 2:
            # (B, T, K) @ (K, N): one GEMM on (B*T, K)
            return mm(a.reshape(-1, a.shape[-1]), b).reshape(a.shape[:-1] + (b.shape[-1],))
        if a.ndim == 2 and b.ndim == 2 or a.shape[:-2] == b.shape[:-2]:
            return mm(a, b)
        return a @ b

    def backward(self, g):
        a, b = self.a, self.b
        ga = gb = None
        if b.ndim == 2 and a.ndim > 2:
            g2 = g.reshape(-1, g.shape[-1])                        # (B*T, N)
            if self.needs_input_grad[0]:
                ga = mm(g2, b.T).reshape(a.shape)                  # (B*T, N) @ (N, K)
            if self.needs_input_grad[1]:
                gb = mm(a.reshape(-1, a.shape[-1]).T, g2)          # (K, B*T) @ (B*T, N)
            return ga, gb
        if a.shape[:-2] == b.shape[:-2]:
            ga = mm(g, _swap(b)) if self.needs_input_grad[0] else None
            gb = mm(_swap(a), g) if self.needs_input_grad[1] else None
            return ga, gb
        if self.needs_input_grad[0]:
            ga = g @ _swap(b)                                      # (.., M, N) @ (.., N, K)
        if self.needs_input_grad[1]:
            gb = _swap(a) @ g                                      # (.., K, M) @ (.., M, N)
        return ga, gb                                              # engine sums broadcast dims


def matmul(a, b) -> Tensor:
    a, b = _binary("matmul", a, b)
    if not isinstance(a, Tensor) or not isinstance(b, Tensor):
        raise TypeError("matmul: both operands must be tensors (or arrays), not scalars")
    sa, sb = a.shape, b.shape
    if a.ndim == 0 or b.ndim == 0:
        raise ValueError(f"matmul: {sa} @ {sb}: both operands need at least 1 dim "
                         "(use * for scalars)")
    ka = sa[-1]
    kb = sb[0] if b.ndim == 1 else sb[-2]
    if ka != kb:
        raise ValueError(f"matmul: {sa} @ {sb}: inner dimensions {ka} and {kb} differ")
    if a.ndim > 2 and b.ndim > 2:
        try:
            backend.xp_of(a.data).broadcast_shapes(sa[:-2], sb[:-2])
        except ValueError:
            raise ValueError(f"matmul: {sa} @ {sb}: batch dimensions {sa[:-2]} and {sb[:-2]} "
                             "do not broadcast") from None
    if a.ndim == 1 and b.ndim == 1:
        return MatMul.apply(a.reshape(1, -1), b.reshape(-1, 1)).reshape(())
    if a.ndim == 1:
        out = MatMul.apply(a.reshape(1, -1), b)
        return out.reshape(*out.shape[:-2], out.shape[-1])
    if b.ndim == 1:
        out = MatMul.apply(a, b.reshape(-1, 1))
        return out.reshape(*out.shape[:-1])
    return MatMul.apply(a, b)
