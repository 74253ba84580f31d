"""Fused neural-network ops: softmax family, linear, GELU, LayerNorm/RMSNorm, cross-entropy,
dropout and scaled dot-product attention.

Each op here could be composed from elementwise ops, reductions and matmuls; doing it as one
op saves intermediates (memory) and Python overhead (speed), and gives a closed-form backward.
The composed versions live in ``nn/reference.py``; the tests hold the two equal.
"""
from __future__ import annotations

import numpy as np

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


# ============================================================================ linear
class Linear(Function):
    """y = x @ W^T + b with PyTorch's weight layout W: (out, in).

    x: (..., in) -> y: (..., out). One op instead of matmul + transpose + add: the weight
    gradient comes out as (out, in) directly, with no transposed copy, from one GEMM over
    all rows.
    """

    def forward(self, x, w, b=None):
        self.x, self.w, self.has_b = x, w, b is not None
        x2 = x.reshape(-1, x.shape[-1])                       # (N, in)
        y = x2 @ w.T                                          # (N, out)
        if b is not None:
            y += b
        return y.reshape(x.shape[:-1] + (w.shape[0],))

    def backward(self, g):
        x, w = self.x, self.w
        g2 = g.reshape(-1, g.shape[-1])                       # (N, out)
        gx = (g2 @ w).reshape(x.shape) if self.needs_input_grad[0] else None   # (N, in)
        gw = g2.T @ x.reshape(-1, x.shape[-1]) if self.needs_input_grad[1] else None  # (out, in)
        gb = g2.sum(axis=0) if self.has_b and self.needs_input_grad[2] else None
        return gx, gw, gb


# ============================================================================ activations
_GELU_C = 0.7978845608028654  # sqrt(2 / pi)


class GELUTanh(Function):
    """GELU, tanh approximation (GPT-2): 0.5 x (1 + tanh(c (x + 0.044715 x^3)))."""

    def forward(self, x):
        xp = backend.xp_of(x)
        t = xp.tanh(_GELU_C * (x + 0.044715 * x * x * x))
        self.x, self.t = x, t
        return 0.5 * x * (1.0 + t)

    def backward(self, g):
        x, t = self.x, self.t
        dinner = _GELU_C * (1.0 + 3 * 0.044715 * x * x)
        return g * (0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * dinner)


def erf(x):
    """The error function on either backend (SciPy/CuPy's when present, else math.erf)."""
    xp = backend.xp_of(x)
    if xp is not np:  # pragma: no cover - GPU only
        import cupyx.scipy.special
        return cupyx.scipy.special.erf(x)
    try:
        from scipy.special import erf as _erf
        return _erf(x).astype(x.dtype, copy=False)
    except ImportError:
        import math
        return np.vectorize(math.erf, otypes=[x.dtype])(x)


class GELUExact(Function):
    """GELU, exact: x * Phi(x) = 0.5 x (1 + erf(x / sqrt 2))."""

    def forward(self, x):
        self.x = x
        self.cdf = 0.5 * (1.0 + erf(x * 0.7071067811865476))
        return x * self.cdf

    def backward(self, g):
        xp = backend.xp_of(g)
        pdf = xp.exp(-0.5 * self.x * self.x) * 0.3989422804014327  # 1 / sqrt(2 pi)
        return g * (self.cdf + self.x * pdf)


# ============================================================================ normalisation
class LayerNorm(Function):
    """Normalise over the last dim, then scale and shift; closed-form backward.

    x: (..., C); weight, bias: (C,)
    forward:  xhat = (x - mean) * rstd,  y = xhat * w + b
    backward: dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat)),  dxhat = dy * w
    """

    def forward(self, x, w=None, b=None, eps=1e-5):
        xp = backend.xp_of(x)
        mu = x.mean(axis=-1, keepdims=True)
        xc = x - mu
        var = (xc * xc).mean(axis=-1, keepdims=True)
        rstd = 1.0 / xp.sqrt(var + eps)
        xhat = xc
        xhat *= rstd                              # reuse xc's buffer
        self.xhat, self.rstd, self.w, self.has_b = xhat, rstd, w, b is not None
        y = xhat * w if w is not None else xhat.copy()
        if b is not None:
            y += b
        return y

    def backward(self, g):
        xhat, rstd, w = self.xhat, self.rstd, self.w
        lead = tuple(range(g.ndim - 1))
        gw = (g * xhat).sum(axis=lead) if w is not None and self.needs_input_grad[1] else None
        gb = g.sum(axis=lead) if self.has_b and self.needs_input_grad[2] else None
        gx = None
        if self.needs_input_grad[0]:
            dxhat = g * w if w is not None else g
            gx = dxhat - dxhat.mean(axis=-1, keepdims=True)
            gx -= xhat * (dxhat * xhat).mean(axis=-1, keepdims=True)
            gx *= rstd
        return gx, gw, gb


class RMSNorm(Function):
    """x * rstd * w with rstd = 1 / sqrt(mean(x^2) + eps) over the last dim (no centering)."""

    def forward(self, x, w=None, eps=1e-6):
        xp = backend.xp_of(x)
        rstd = 1.0 / xp.sqrt((x * x).mean(axis=-1, keepdims=True) + eps)
        xhat = x * rstd
        self.xhat, self.rstd, self.w = xhat, rstd, w
        return xhat * w if w is not None else xhat

    def backward(self, g):
        xhat, rstd, w = self.xhat, self.rstd, self.w
        lead = tuple(range(g.ndim - 1))
        gw = (g * xhat).sum(axis=lead) if w is not None and self.needs_input_grad[1] else None
        gx = None
        if self.needs_input_grad[0]:
            dxhat = g * w if w is not None else g
            gx = (dxhat - xhat * (dxhat * xhat).mean(axis=-1, keepdims=True)) * rstd
        return gx, gw


# ============================================================================ loss
class CrossEntropy(Function):
    """Softmax + negative log-likelihood from logits, fused: only the probabilities are kept.

    logits: (N, V), targets: (N,) int; rows whose target is ``ignore_index`` count for nothing.
    loss_i = logsumexp(logits_i) - logits_i[t_i];  d loss_i / d logits_i = softmax_i - onehot(t_i)
    """

    def forward(self, logits, targets, ignore_index, reduction, label_smoothing=0.0):
        xp = backend.xp_of(logits)
        n, v = logits.shape
        m = logits.max(axis=1, keepdims=True)
        p = logits - m
        xp.exp(p, out=p)
        s = p.sum(axis=1, keepdims=True)
        p /= s                                                 # softmax, in its own buffer
        valid = targets != ignore_index
        safe_t = xp.where(valid, targets, 0)
        rows = xp.arange(n)
        lse = (m + xp.log(s))[:, 0]                            # (N,)
        nll = lse - logits[rows, safe_t]
        if label_smoothing:
            smooth = lse - logits.mean(axis=1)
            nll = (1 - label_smoothing) * nll + label_smoothing * smooth
        nll = xp.where(valid, nll, 0).astype(logits.dtype, copy=False)
        count = int(valid.sum())
        self.p, self.t, self.valid, self.rows = p, safe_t, valid, rows
        self.reduction, self.count, self.ls = reduction, count, label_smoothing
        if reduction == "none":
            return nll
        total = nll.sum()
        if reduction == "sum":
            return total
        return total / max(count, 1) if count else total * xp.asarray(float("nan"), dtype=nll.dtype)

    def backward(self, g):
        xp = backend.xp_of(g)
        if self.reduction == "none":
            scale = (g * self.valid)[:, None]                  # (N, 1)
        elif self.reduction == "sum":
            scale = (g * self.valid)[:, None]
        else:
            scale = (g / max(self.count, 1) * self.valid)[:, None]
        scale = scale.astype(self.p.dtype, copy=False)
        grad = self.p * scale
        grad[self.rows, self.t] -= (1 - self.ls) * scale[:, 0]
        if self.ls:
            grad -= self.ls / self.p.shape[1] * scale
        return grad, None


# ============================================================================ dropout
class Dropout(Function):
    """Zero each element with probability p, scale the rest by 1 / (1 - p) (inverted dropout)."""

    def forward(self, x, p, generator=None):
        from ..random import rand_like_array
        keep = 1.0 - p
        self.mask = (rand_like_array(x, generator) < keep).astype(x.dtype) * (1.0 / keep)
        return x * self.mask

    def backward(self, g):
        return g * self.mask


# ============================================================================ attention
def causal_mask(xp, tq: int, tk: int):
    """(Tq, Tk) bool, True where query i may attend key j. Queries are the last Tq of the Tk
    positions (so with a KV cache, a new token sees every cached one and itself)."""
    return xp.tril(xp.ones((tq, tk), dtype=bool), k=tk - tq)


class Attention(Function):
    """Scaled dot-product attention as one op, keeping only the attention weights P.

    q: (B, H, Tq, D), k, v: (B, H, Tk, D)  ->  out: (B, H, Tq, D)
    S = q k^T / sqrt(D) (+ mask), P = softmax(S), out = P v
    backward: dv = P^T dout, dP = dout v^T, dS = P * (dP - rowsum(dP * P)),
              dq = dS k / sqrt(D), dk = dS^T q / sqrt(D)
    ``mask``: None, a bool array (True = may attend) or a float array added to the scores;
    ``is_causal`` adds the causal mask. Dropout on P uses ``dropout_p`` and a seeded generator.
    """

    def forward(self, q, k, v, mask=None, is_causal=False, scale=None, dropout_p=0.0,
                generator=None):
        xp = backend.xp_of(q)
        tq, tk = q.shape[-2], k.shape[-2]
        scale = 1.0 / (q.shape[-1] ** 0.5) if scale is None else scale
        s = q @ k.swapaxes(-1, -2)                                 # (B, H, Tq, Tk)
        s *= scale
        neg = xp.asarray(-xp.inf, dtype=s.dtype)
        if is_causal and tq > 1:  # a single query is the newest position: it sees every key
            s = xp.where(causal_mask(xp, tq, tk), s, neg)
        if mask is not None:
            s = xp.where(mask, s, neg) if mask.dtype == bool else s + mask
        s -= s.max(axis=-1, keepdims=True)
        xp.exp(s, out=s)
        s /= s.sum(axis=-1, keepdims=True)                         # P, in the scores' buffer
        p = s
        self.dmask = None
        if dropout_p > 0.0:
            from ..random import rand_like_array
            keep = 1.0 - dropout_p
            self.dmask = (rand_like_array(p, generator) < keep).astype(p.dtype) * (1.0 / keep)
            p_used = p * self.dmask
        else:
            p_used = p
        self.q, self.k, self.v, self.p, self.p_used, self.scale = q, k, v, p, p_used, scale
        return p_used @ v

    def backward(self, g):
        q, k, v, p, scale = self.q, self.k, self.v, self.p, self.scale
        dv = self.p_used.swapaxes(-1, -2) @ g if self.needs_input_grad[2] else None  # (B,H,Tk,D)
        dp = g @ v.swapaxes(-1, -2)                                # (B, H, Tq, Tk)
        if self.dmask is not None:
            dp *= self.dmask
        ds = dp
        ds -= (dp * p).sum(axis=-1, keepdims=True)
        ds *= p
        ds *= scale
        dq = ds @ k if self.needs_input_grad[0] else None          # (B, H, Tq, D)
        dk = ds.swapaxes(-1, -2) @ q if self.needs_input_grad[1] else None  # (B, H, Tk, D)
        return dq, dk, dv


# ============================================================================ rotary positions
class Rotary(Function):
    """Rotary position embedding (RoPE, Su et al. 2021), "rotate half" layout.

    x: (..., T, D); cos, sin: (T, D/2). With x = [x1, x2] (halves of the last dim):
    y = [x1 cos - x2 sin, x2 cos + x1 sin]. Its backward is the rotation by the opposite
    angle: dx = [g1 cos + g2 sin, g2 cos - g1 sin].
    """

    def forward(self, x, cos, sin):
        xp = backend.xp_of(x)
        h = x.shape[-1] // 2
        x1, x2 = x[..., :h], x[..., h:]
        self.cos, self.sin = cos, sin
        return xp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)

    def backward(self, g):
        xp = backend.xp_of(g)
        h = g.shape[-1] // 2
        g1, g2 = g[..., :h], g[..., h:]
        cos, sin = self.cos, self.sin
        return xp.concatenate([g1 * cos + g2 * sin, g2 * cos - g1 * sin], axis=-1), None, None


# ============================================================================ KV cache append
class CacheAppend(Function):
    """Write new keys (or values) into a preallocated cache and return every cached position.

    parts: the tensors appended so far that require grad, then the new one, each (B, H, t, D);
    buf: (B, H, max_len, D); the new part goes to buf[:, :, lo:lo+t]; ``ranges`` holds each
    part's (start, end) in the cache. Returns a view buf[:, :, :lo+t] (positions before ``lo``
    are never rewritten, so earlier views stay valid). Backward hands each part its slice.
    """

    def forward(self, *parts, buf, lo, ranges):
        new = parts[-1]
        buf[:, :, lo:lo + new.shape[2]] = new
        self.ranges = ranges
        return buf[:, :, :lo + new.shape[2]]

    def backward(self, g):
        return tuple(g[:, :, a:b] for a, b in self.ranges)
