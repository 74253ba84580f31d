"""Composed references for the fused ops: the same math written with primitive tensor ops,
the way the papers write it. Slower and hungrier, but obviously right; the tests hold each
fused op equal to its reference (values and gradients).
"""
from __future__ import annotations

import math

import numpy as np

import tensorlite as tl
from tensorlite.tensor import Tensor


def linear(x, w, b=None):
    y = x @ w.T
    return y + b if b is not None else y


def gelu_tanh(x):
    return 0.5 * x * (1.0 + (math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)).tanh())


def feed_forward_gelu(x, w1, b1, w2, b2):
    """The transformer's MLP: Linear -> GELU (tanh) -> Linear (ops.FeedForwardGELU fused)."""
    return linear(gelu_tanh(linear(x, w1, b1)), w2, b2)


def layer_norm(x, w=None, b=None, eps=1e-5):
    mu = x.mean(dim=-1, keepdim=True)
    var = ((x - mu) ** 2).mean(dim=-1, keepdim=True)
    y = (x - mu) / (var + eps).sqrt()
    if w is not None:
        y = y * w
    if b is not None:
        y = y + b
    return y


def rms_norm(x, w=None, eps=1e-6):
    y = x / ((x * x).mean(dim=-1, keepdim=True) + eps).sqrt()
    return y * w if w is not None else y


def cross_entropy(logits, targets, ignore_index=-100, reduction="mean", label_smoothing=0.0):
    """-log softmax(logits)[target], averaged over targets that are not ignored; with label
    smoothing e the target distribution is (1 - e) onehot + e / V."""
    v = logits.shape[-1]
    logp = logits.reshape(-1, v).log_softmax(-1)
    t_shape = logits.shape[:-1]
    t = (targets.numpy() if isinstance(targets, Tensor) else np.asarray(targets)).reshape(-1)
    valid = t != ignore_index
    onehot = tl.tensor((np.where(valid, t, 0)[:, None] == np.arange(v)) & valid[:, None],
                       dtype=logits.dtype)
    nll = -(logp * onehot).sum(dim=-1)
    if label_smoothing:
        smooth = -logp.mean(dim=-1) * tl.tensor(valid, dtype=logits.dtype)
        nll = nll * (1.0 - label_smoothing) + smooth * label_smoothing
    if reduction == "none":
        return nll.reshape(*t_shape)
    if reduction == "sum":
        return nll.sum()
    return nll.sum() / max(int(valid.sum()), 1)


def attention(q, k, v, mask=None, is_causal=False, dropout_p=0.0, generator=None):
    """dropout(softmax(q k^T / sqrt(d) + mask)) v  ("Attention Is All You Need", eq. 1; the
    dropout on the attention weights draws its mask as the fused op does)."""
    d = q.shape[-1]
    s = (q @ k.transpose(-1, -2)) * (1.0 / math.sqrt(d))
    tq, tk = q.shape[-2], k.shape[-2]
    if is_causal:
        allowed = np.tril(np.ones((tq, tk), bool), k=tk - tq)
        s = s.masked_fill(tl.tensor(~allowed), -1e30)
    if isinstance(mask, Tensor) and mask.dtype.kind == "f":
        s = s + mask.to(s.dtype)            # a Tensor: a learned bias gets its gradient
    elif mask is not None:
        m = mask.numpy() if isinstance(mask, Tensor) else np.asarray(mask)
        s = s.masked_fill(tl.tensor(~m), -1e30) if m.dtype == bool else s + tl.tensor(m, dtype=s.dtype)
    p = s.softmax(-1)
    if dropout_p:
        p = dropout(p, dropout_p, generator)
    return p @ v


# Gauss-Legendre nodes and weights on [0, 1]: 32 points integrate exp(-(s x)^2 / 2) over s
# to double precision for |x| <= 9 (the test measures it against math.erf)
_GL_S, _GL_W = np.polynomial.legendre.leggauss(32)
_GL_S, _GL_W = (_GL_S + 1.0) / 2.0, _GL_W / 2.0


def normal_cdf(x):
    """Phi(x) = 1/2 + integral_0^x phi(t) dt = 1/2 + x * integral_0^1 phi(s x) ds, the integral
    by Gauss-Legendre quadrature (tensorlite has no erf op; the quadrature is built from
    multiplies, exp and a sum, so its gradient is the quadrature of phi's derivative)."""
    s = tl.tensor(_GL_S, dtype=x.dtype, device=x.device)
    w = tl.tensor(_GL_W / math.sqrt(2.0 * math.pi), dtype=x.dtype, device=x.device)
    xs = x.unsqueeze(-1) * s                                  # (..., 32)
    return 0.5 + x * ((xs * xs * -0.5).exp() * w).sum(dim=-1)


def gelu(x):
    """Exact GELU (Hendrycks & Gimpel 2016): x * Phi(x)."""
    return x * normal_cdf(x)


def dropout(x, p, generator=None):
    """Inverted dropout: keep each element with probability 1 - p (uniform draw < 1 - p, in
    the order the fused op draws them) and scale the kept ones by 1 / (1 - p)."""
    keep = 1.0 - p
    u = tl.rand(*x.shape, dtype=x.dtype, device=x.device, generator=generator)
    return x * (u < keep).astype(x.dtype) / keep


def rotary_tables(t, head_dim, offset=0, base=10000.0):
    """cos, sin (T, D/2) of the angles (offset + pos) * base^(-2i/D), i < D/2, in float64."""
    inv_freq = base ** (-np.arange(0, head_dim, 2) / head_dim)
    ang = np.arange(offset, offset + t)[:, None] * inv_freq[None, :]
    return np.cos(ang), np.sin(ang)


def rotary(x, cos, sin):
    """RoPE (Su et al. 2021, eq. 14-15) as a rotation matrix per position: y_t = R_t x_t, R_t
    rotating channel pair (i, i + D/2) (the "rotate half" pairing) by angle theta_t,i.
    x: (..., T, D); cos, sin: (T, D/2) arrays."""
    cos, sin = tl.backend.to_numpy(cos), tl.backend.to_numpy(sin)
    t, h = cos.shape
    r = np.zeros((t, 2 * h, 2 * h))
    i = np.arange(h)
    r[:, i, i] = cos
    r[:, i, i + h] = -sin
    r[:, i + h, i] = sin
    r[:, i + h, i + h] = cos
    rt = tl.tensor(r.transpose(0, 2, 1), dtype=x.dtype, device=x.device)  # (T, D, D): R_t^T
    return (x.unsqueeze(-2) @ rt).squeeze(-2)                         # x_t^T R_t^T = (R_t x_t)^T


def self_attention(qkv, n_head, is_causal=True, cos=None, sin=None, dropout_p=0.0,
                   generator=None, mask=None):
    """The packed op step by step: (B, T, 3C) -> split q, k, v -> heads (B, H, T, D) ->
    rotate q, k (when cos/sin are given) -> attention (``mask`` as ``attention``'s) -> merge
    heads -> (B, T, C)."""
    b, t, c3 = qkv.shape
    c = c3 // 3
    d = c // n_head
    q, k, v = (z.reshape(b, t, n_head, d).transpose(1, 2) for z in qkv.split(c, dim=-1))
    if cos is not None:
        q, k = rotary(q, cos, sin), rotary(k, cos, sin)
    y = attention(q, k, v, mask=mask, is_causal=is_causal, dropout_p=dropout_p,
                  generator=generator)
    return y.transpose(1, 2).reshape(b, t, c)


def multi_head_attention(mha, x, attn_mask=None):
    """nn.MultiHeadAttention with its own weights, composed and without a cache: qkv
    projection -> split, heads, rotate (RoPE base 10000), attend -> merge -> output projection
    -> dropout (in training mode; both dropouts draw from the default generator, in the order
    the module draws them)."""
    cos = sin = None
    if mha.rotary is not None:
        cos, sin = rotary_tables(x.shape[1], mha.head_dim)
    p = mha.dropout_p if mha.training else 0.0
    y = self_attention(linear(x, mha.qkv.weight, mha.qkv.bias), mha.n_head,
                       is_causal=mha.causal, cos=cos, sin=sin, dropout_p=p, mask=attn_mask)
    y = linear(y, mha.proj.weight, mha.proj.bias)
    return dropout(y, p) if p else y
