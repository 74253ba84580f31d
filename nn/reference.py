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


def cross_entropy(logits, targets, ignore_index=-100, reduction="mean"):
    """-log softmax(logits)[target], averaged over targets that are not ignored."""
    v = logits.shape[-1]
    logp = logits.reshape(-1, v).log_softmax(-1)
    t_shape = logits.shape[:-1]
    t = (targets.numpy() if isinstance(targets, Tensor) else np.asarray(targets)).reshape(-1)
    valid = t != ignore_index
    onehot = tl.tensor((np.where(valid, t, 0)[:, None] == np.arange(v)) & valid[:, None],
                       dtype=logits.dtype)
    nll = -(logp * onehot).sum(dim=-1)
    if reduction == "none":
        return nll.reshape(*t_shape)
    if reduction == "sum":
        return nll.sum()
    return nll.sum() / max(int(valid.sum()), 1)


def attention(q, k, v, mask=None, is_causal=False):
    """softmax(q k^T / sqrt(d) + mask) v  ("Attention Is All You Need", eq. 1)."""
    d = q.shape[-1]
    s = (q @ k.transpose(-1, -2)) * (1.0 / math.sqrt(d))
    tq, tk = q.shape[-2], k.shape[-2]
    if is_causal:
        allowed = np.tril(np.ones((tq, tk), bool), k=tk - tq)
        s = s.masked_fill(tl.tensor(~allowed), -1e30)
    if mask is not None:
        m = mask.numpy() if isinstance(mask, Tensor) else np.asarray(mask)
        s = s.masked_fill(tl.tensor(~m), -1e30) if m.dtype == bool else s + tl.tensor(m, dtype=s.dtype)
    return s.softmax(-1) @ v
