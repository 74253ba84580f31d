"""Fused neural-network ops: softmax family, linear, GELU, LayerNorm/RMSNorm, cross-entropy,
dropout and scaled dot-product attention.

Each op here could be composed from elementwise ops, reductions and matmuls; doing it as one
op saves intermediates (memory) and Python overhead (speed), and gives a closed-form backward.
The composed versions live in ``nn/reference.py``; the tests hold the two equal.
"""
from __future__ import annotations

import numpy as np

from .. import backend, cpu
from ..tensor import Function, Tensor
from .shape import _dim


class Softmax(Function):
    saves_output = True

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
    saves_output = True

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


# ============================================================================ helpers
def mm(a, b):
    """a @ b: on NumPy through tensorlite's thread pool (see tensorlite/cpu.py)."""
    if type(a) is np.ndarray and type(b) is np.ndarray:
        return cpu.matmul(a, b)
    return a @ b


def _rows2d(a):
    """(..., C) -> (N, C) view (or copy when not viewable)."""
    return a.reshape(-1, a.shape[-1])


# ============================================================================ linear
class Linear(Function):
    """y = x @ W^T + b with PyTorch's weight layout W: (out, in).

    x: (..., in) -> y: (..., out). One op instead of matmul + transpose + add: the weight
    gradient comes out as (out, in) directly, with no transposed copy, from one GEMM over
    all rows.
    """
    saved_inputs = (0, 1)

    def forward(self, x, w, b=None):
        self.x, self.w, self.has_b = x, w, b is not None
        y = mm(_rows2d(x), w.T)                               # (N, in) @ (in, out)
        if b is not None:
            y += b
        return y.reshape(x.shape[:-1] + (w.shape[0],))

    def backward(self, g):
        x, w = self.x, self.w
        g2 = _rows2d(g)                                       # (N, out)
        gx = mm(g2, w).reshape(x.shape) if self.needs_input_grad[0] else None   # (N, in)
        gw = mm(g2.T, _rows2d(x)) if self.needs_input_grad[1] else None         # (out, in)
        gb = g2.sum(axis=0) if self.has_b and self.needs_input_grad[2] else None
        return gx, gw, gb


# ============================================================================ activations
_GELU_C = 0.7978845608028654  # sqrt(2 / pi)
_GELU_A = 0.044715


class GELUTanh(Function):
    """GELU, tanh approximation (GPT-2): 0.5 x (1 + tanh(c (x + a x^3))).

    backward: dy/dx = 0.5 (1 + t) + 0.5 x (1 - t^2) c (1 + 3 a x^2), t = tanh(c (x + a x^3)).
    Only x is saved; the backward recomputes t block by block, in cache.
    """
    saved_inputs = (0,)

    def forward(self, x):
        xp = backend.xp_of(x)
        self.x = x
        x2 = _rows2d(x)
        out = xp.empty_like(x2)

        def kernel(lo, hi):
            xb = x2[lo:hi]
            t = xb * xb
            t *= _GELU_A
            t += 1.0
            t *= xb
            t *= _GELU_C
            xp.tanh(t, out=t)
            t += 1.0
            t *= xb
            xp.multiply(t, 0.5, out=out[lo:hi])
        cpu.for_rows(kernel, x2.shape[0], x2.shape[1], xp)
        return out.reshape(x.shape)

    def backward(self, g):
        xp = backend.xp_of(g)
        x2, g2 = _rows2d(self.x), _rows2d(g)
        gx = xp.empty_like(x2)

        def kernel(lo, hi):
            xb, gb = x2[lo:hi], g2[lo:hi]
            xsq = xb * xb
            t = xsq * _GELU_A
            t += 1.0
            t *= xb
            t *= _GELU_C
            xp.tanh(t, out=t)                       # t
            xsq *= 3 * _GELU_A
            xsq += 1.0
            xsq *= _GELU_C                          # c (1 + 3 a x^2)
            d = t * t
            xp.subtract(1.0, d, out=d)
            d *= xb
            d *= xsq                                # x (1 - t^2) c (1 + 3 a x^2)
            d += t
            d += 1.0
            d *= 0.5
            xp.multiply(d, gb, out=gx[lo:hi])
        cpu.for_rows(kernel, x2.shape[0], x2.shape[1], xp)
        return gx.reshape(self.x.shape)


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
    saved_inputs = (0,)

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
              dw = sum over rows of dy * xhat,  db = sum over rows of dy
    Saves x (alive anyway), the row means and 1/std: xhat is recomputed per block.
    """
    saved_inputs = (0, 1)

    def forward(self, x, w=None, b=None, eps=1e-5):
        xp = backend.xp_of(x)
        x2 = _rows2d(x)
        n, c = x2.shape
        out = xp.empty_like(x2)
        mu = xp.empty((n, 1), dtype=x.dtype)
        rstd = xp.empty((n, 1), dtype=x.dtype)

        inv_c = 1.0 / c

        def kernel(lo, hi):   # sums times 1/C: ndarray.mean costs a Python wrapper per call
            xb = x2[lo:hi]
            m = xb.sum(axis=1, keepdims=True)
            m *= inv_c
            xc = xp.subtract(xb, m, out=out[lo:hi])   # built in place in the output
            var = (xc * xc).sum(axis=1, keepdims=True)
            var *= inv_c
            var += eps
            r = 1.0 / xp.sqrt(var)
            xc *= r                                 # xhat
            if w is not None:
                xc *= w
            if b is not None:
                xc += b
            mu[lo:hi], rstd[lo:hi] = m, r
        cpu.for_rows(kernel, n, c, xp)
        self.x2, self.mu, self.rstd, self.w, self.has_b = x2, mu, rstd, w, b is not None
        self.shape = x.shape
        return out.reshape(x.shape)

    def backward(self, g):
        xp = backend.xp_of(g)
        x2, mu, rstd, w = self.x2, self.mu, self.rstd, self.w
        g2 = _rows2d(g)
        n, c = x2.shape
        gx = xp.empty_like(x2)
        need_x = self.needs_input_grad[0]
        inv_c = 1.0 / c

        def kernel(lo, hi):
            xhat = (x2[lo:hi] - mu[lo:hi]) * rstd[lo:hi]
            gb = g2[lo:hi]
            parts = ((gb * xhat).sum(axis=0), gb.sum(axis=0))
            if need_x:
                dxhat = gb * w if w is not None else gb.copy()
                m2 = (dxhat * xhat).sum(axis=1, keepdims=True)
                m2 *= inv_c
                m1 = dxhat.sum(axis=1, keepdims=True)
                m1 *= inv_c
                dxhat -= m1
                xhat *= m2
                dxhat -= xhat
                xp.multiply(dxhat, rstd[lo:hi], out=gx[lo:hi])
            return parts
        gw_sum, gb_sum = cpu.map_rows(kernel, n, c, xp)
        gw = gw_sum if w is not None and self.needs_input_grad[1] else None
        gbias = gb_sum if self.has_b and self.needs_input_grad[2] else None
        return (gx.reshape(self.shape) if need_x else None), gw, gbias


class RMSNorm(Function):
    """x * rstd * w with rstd = 1 / sqrt(mean(x^2) + eps) over the last dim (no centering)."""
    saved_inputs = (1,)

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
    """Softmax + negative log-likelihood from logits, fused.

    logits: (N, V), targets: (N,) int; rows whose target is ``ignore_index`` count for nothing.
    loss_i = lse_i - logits_i[t_i] with lse_i = logsumexp(logits_i)
    d loss_i / d logits_i = softmax_i - onehot(t_i) = exp(logits_i - lse_i) - onehot(t_i)
    Saves the logits (alive anyway) and lse (N,): the probabilities are never stored, the
    backward recomputes them block by block while writing the gradient.
    With label smoothing e: loss_i = (1 - e) nll_i + e (lse_i - mean_j logits_ij).
    """
    saved_inputs = (0,)

    def forward(self, logits, targets, ignore_index, reduction, label_smoothing=0.0):
        xp = backend.xp_of(logits)
        n, v = logits.shape
        lse = xp.empty(n, dtype=logits.dtype)

        def kernel(lo, hi):
            lb = logits[lo:hi]
            m = lb.max(axis=1, keepdims=True)
            e = lb - m
            xp.exp(e, out=e)
            lse[lo:hi] = (m + xp.log(e.sum(axis=1, keepdims=True)))[:, 0]
        cpu.for_rows(kernel, n, v, xp)
        valid = targets != ignore_index
        safe_t = xp.where(valid, targets, 0)
        rows = xp.arange(n)
        nll = lse - logits[rows, safe_t]
        if label_smoothing:
            smooth = lse - logits.mean(axis=1)
            nll = (1 - label_smoothing) * nll + label_smoothing * smooth
        nll = xp.where(valid, nll, 0).astype(logits.dtype, copy=False)
        count = int(valid.sum())
        self.logits, self.lse, self.t, self.valid, self.rows = logits, lse, safe_t, valid, rows
        self.reduction, self.count, self.ls = reduction, count, label_smoothing
        if reduction == "none":
            return nll
        total = nll.sum()
        if reduction == "sum":
            return total
        return total / max(count, 1) if count else total * xp.asarray(float("nan"), dtype=nll.dtype)

    def backward(self, g):
        xp = backend.xp_of(g)
        logits, lse = self.logits, self.lse
        n, v = logits.shape
        if self.reduction == "mean":
            scale = g / max(self.count, 1) * self.valid            # (N,)
        else:
            scale = g * self.valid
        scale = scale.astype(logits.dtype, copy=False)
        grad = xp.empty_like(logits)
        ls = self.ls

        def kernel(lo, hi):
            gb = grad[lo:hi]
            xp.subtract(logits[lo:hi], lse[lo:hi, None], out=gb)
            xp.exp(gb, out=gb)                                     # softmax rows
            if ls:
                gb -= ls / v
            gb *= scale[lo:hi, None]
        cpu.for_rows(kernel, n, v, xp)
        grad[self.rows, self.t] -= (1 - ls) * scale
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
def attention_forward(q, k, v, mask, is_causal, scale, dropout_p, generator):
    """The math of attention, shared by both attention ops.

    q: (G, Tq, D), k: (G, Tk, D), v: (G, Tk, Dv) with G = batch x heads
    -> out (G, Tq, Dv) and what the backward needs: P (G, Tq, Tk) and the dropout mask.
    S = q k^T * scale (+ mask); P = softmax(S) row by row; out = P v.
    On NumPy it runs over blocks of heads, each block start to finish (scores, softmax,
    mixing) while its scores are in cache, the blocks spread over the thread pool.
    """
    xp = backend.xp_of(q)
    g_, tq, _ = q.shape
    tk, dv_ = k.shape[1], v.shape[2]
    off = tk - tq
    causal = is_causal and tq > 1
    p = xp.empty((g_, tq, tk), dtype=q.dtype)
    out = xp.empty((g_, tq, dv_), dtype=q.dtype)
    dmask = None
    if dropout_p > 0.0:
        from ..random import rand_like_array
        keep = 1.0 - dropout_p
        dmask = (rand_like_array(p, generator) < keep).astype(p.dtype) * (1.0 / keep)
    p_used = xp.empty_like(p) if dmask is not None else p
    if causal:  # 0 where query i may see key j, -inf in its future: added to the scores
        future = xp.where(xp.arange(tk)[None, :] > (xp.arange(tq) + off)[:, None],
                          xp.asarray(-xp.inf, dtype=q.dtype), xp.asarray(0, dtype=q.dtype))

    def kernel(lo, hi):
        sb = p[lo:hi]
        xp.matmul(q[lo:hi], k[lo:hi].swapaxes(-1, -2), out=sb)              # scores
        sb *= scale
        if mask is not None:
            if mask.dtype == bool:
                sb[~mask[lo:hi]] = -xp.inf
            else:
                sb += mask[lo:hi]
        if causal:
            sb += future
        sb -= sb.max(axis=-1, keepdims=True)
        xp.exp(sb, out=sb)
        sb /= sb.sum(axis=-1, keepdims=True)                                 # P
        if dmask is not None:
            xp.multiply(sb, dmask[lo:hi], out=p_used[lo:hi])
        xp.matmul(p_used[lo:hi], v[lo:hi], out=out[lo:hi])                   # mixing
    cpu.for_rows(kernel, g_, tq * tk, xp)
    return out, p, p_used, dmask


def attention_backward(g, q, k, v, p, p_used, dmask, scale, need=(True, True, True)):
    """dv = P^T dout, dP = dout v^T, dS = P * (dP - rowsum(dP * P)), dq = dS k * scale,
    dk = dS^T q * scale. All (G, T, .) arrays; on NumPy by blocks of heads, as the forward."""
    xp = backend.xp_of(g)
    dq = xp.empty_like(q) if need[0] else None
    dk = xp.empty_like(k) if need[1] else None
    dv = xp.empty_like(v) if need[2] else None

    def kernel(lo, hi):
        if dv is not None:
            xp.matmul(p_used[lo:hi].swapaxes(-1, -2), g[lo:hi], out=dv[lo:hi])
        ds = xp.matmul(g[lo:hi], v[lo:hi].swapaxes(-1, -2))                # dP (b, Tq, Tk)
        if dmask is not None:
            ds *= dmask[lo:hi]
        pb = p[lo:hi]
        ds -= (ds * pb).sum(axis=-1, keepdims=True)
        ds *= pb
        ds *= scale                                                          # dS
        if dq is not None:
            xp.matmul(ds, k[lo:hi], out=dq[lo:hi])
        if dk is not None:
            xp.matmul(ds.swapaxes(-1, -2), q[lo:hi], out=dk[lo:hi])
    cpu.for_rows(kernel, g.shape[0], p.shape[1] * p.shape[2], xp)
    return dq, dk, dv


class Attention(Function):
    """Scaled dot-product attention as one op, keeping only the attention weights P.

    q: (..., Tq, D), k, v: (..., Tk, D)  ->  out: (..., Tq, D)
    ``mask``: None, a bool array (True = may attend) or a float array added to the scores;
    ``is_causal`` adds the causal mask. Dropout on P uses ``dropout_p`` and a seeded generator.
    """
    saved_inputs = (0, 1, 2)

    def forward(self, q, k, v, mask=None, is_causal=False, scale=None, dropout_p=0.0,
                generator=None):
        lead = q.shape[:-2]
        scale = 1.0 / (q.shape[-1] ** 0.5) if scale is None else scale
        q3, k3, v3 = (a.reshape((-1,) + a.shape[-2:]) for a in (q, k, v))
        if mask is not None:
            xp = backend.xp_of(q)
            mask = xp.broadcast_to(mask, lead + (q.shape[-2], k.shape[-2]))
            mask = mask.reshape((-1,) + mask.shape[-2:])
        out, p, p_used, dmask = attention_forward(q3, k3, v3, mask, is_causal, scale,
                                                  dropout_p, generator)
        self.saved = (q3, k3, v3, p, p_used, dmask, scale)
        self.shapes = (q.shape, k.shape, v.shape)
        return out.reshape(lead + out.shape[-2:])

    def backward(self, g):
        q3, k3, v3, p, p_used, dmask, scale = self.saved
        g3 = g.reshape((-1,) + g.shape[-2:])
        dq, dk, dv = attention_backward(g3, q3, k3, v3, p, p_used, dmask, scale,
                                        self.needs_input_grad)
        return tuple(d.reshape(s) if d is not None else None for d, s in zip((dq, dk, dv), self.shapes))


class SelfAttention(Function):
    """Causal multi-head self-attention straight from the packed qkv projection.

    qkv: (B, T, 3C) as produced by one Linear(C, 3C)  ->  out: (B, T, C), heads merged.
    The same math as ``Attention`` (its reference: split qkv, reshape to heads, Attention,
    merge heads), without the intermediate copies: q, k, v are gathered into one
    (3, B*H, T, D) buffer once, and the backward writes dq, dk, dv straight back into one
    (B, T, 3C) gradient. ``cos``/``sin`` (T, D/2) apply rotary positions to q and k.
    """

    def forward(self, qkv, n_head, is_causal=True, dropout_p=0.0, generator=None,
                cos=None, sin=None, cache=None):
        xp = backend.xp_of(qkv)
        b, t, c3 = qkv.shape
        c = c3 // 3
        d = c // n_head
        # (B, T, 3, H, D) -> (3, B, H, T, D), one copy; q, k, v are views of it
        heads = xp.ascontiguousarray(qkv.reshape(b, t, 3, n_head, d).transpose(2, 0, 3, 1, 4))
        heads = heads.reshape(3, b * n_head, t, d)
        if cos is not None:
            heads[:2] = rotate(heads[:2], cos, sin)
        q, k, v = heads[0], heads[1], heads[2]
        if cache is not None:
            # decoding (no gradient): ``cache`` = (k_buf, v_buf, lo), buffers (B*H, max, D);
            # write the new keys/values at lo.., attend over everything cached so far
            k_buf, v_buf, lo = cache
            k_buf[:, lo:lo + t], v_buf[:, lo:lo + t] = k, v
            k, v = k_buf[:, :lo + t], v_buf[:, :lo + t]
        scale = 1.0 / d ** 0.5
        out, p, p_used, dmask = attention_forward(q, k, v, None, is_causal, scale, dropout_p,
                                                  generator)
        self.saved = (q, k, v, p, p_used, dmask, scale, cos, sin)
        self.dims = (b, t, n_head, d)
        # (B*H, T, D) -> (B, T, H, D) -> (B, T, C)
        return out.reshape(b, n_head, t, d).transpose(0, 2, 1, 3).reshape(b, t, c)

    def backward(self, g):
        xp = backend.xp_of(g)
        q, k, v, p, p_used, dmask, scale, cos, sin = self.saved
        b, t, h, d = self.dims
        g3 = xp.ascontiguousarray(g.reshape(b, t, h, d).transpose(0, 2, 1, 3)).reshape(b * h, t, d)
        dq, dk, dv = attention_backward(g3, q, k, v, p, p_used, dmask, scale)
        dqkv = xp.empty((b, t, 3, h, d), dtype=g.dtype)
        grads = [dq, dk, dv]
        if cos is not None:  # the rotation's backward is the rotation by the opposite angle
            grads[0], grads[1] = rotate(dq, cos, -sin), rotate(dk, cos, -sin)
        for i, gi in enumerate(grads):
            dqkv[:, :, i] = gi.reshape(b, h, t, d).transpose(0, 2, 1, 3)
        return dqkv.reshape(b, t, 3 * h * d)


def rotate(x, cos, sin):
    """RoPE on the last dim of x (..., T, D): [x1 cos - x2 sin, x2 cos + x1 sin]."""
    xp = backend.xp_of(x)
    h = x.shape[-1] // 2
    x1, x2 = x[..., :h], x[..., h:]
    return xp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


# ============================================================================ rotary positions
class Rotary(Function):
    """Rotary position embedding (RoPE, Su et al. 2021), "rotate half" layout.

    x: (..., T, D); cos, sin: (T, D/2). With x = [x1, x2] (halves of the last dim):
    y = [x1 cos - x2 sin, x2 cos + x1 sin]. Its backward is the rotation by the opposite
    angle: dx = [g1 cos + g2 sin, g2 cos - g1 sin].
    """

    def forward(self, x, cos, sin):
        self.cos, self.sin = cos, sin
        return rotate(x, cos, sin)

    def backward(self, g):
        return rotate(g, self.cos, -self.sin)


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
