"""Multi-head self-attention with a causal mask and a key/value cache for decoding."""
from __future__ import annotations

import tensorlite as tl
from tensorlite import backend
from tensorlite.ops import nn as ops
from tensorlite.tensor import Tensor

from . import functional as F
from .layers import Dropout, Linear
from .module import Module


class KVCache:
    """Keys and values of the positions seen so far, for one attention layer.

    Preallocated to ``max_len`` positions: appending T new positions writes T slots and
    returns views of all cached ones, so a decoding step costs the same at position 10 as at
    position 200 apart from the attention itself. Gradients flow through the cache to the
    tensors that were appended (so the cached path can be gradient-checked).
    """

    def __init__(self, max_len: int):
        self.max_len = max_len
        self.length = 0
        self._k = self._v = None
        self._parts = []  # (k, v, lo, hi) of appended tensors that require grad

    def reset(self):
        self.length, self._k, self._v, self._parts = 0, None, None, []

    def _claim(self, b: int, h: int, t: int, d: int, dv: int, like) -> int:
        """Check that T new positions fit (allocating the buffers on first use), advance the
        length and return where the new positions start."""
        lo = self.length
        if lo + t > self.max_len:
            raise ValueError(f"KVCache: {lo} cached + {t} new positions exceed max_len "
                             f"{self.max_len}; reset the cache or crop the context")
        if self._k is None:
            xp = backend.xp_of(like)
            self._k = xp.zeros((b, h, self.max_len, d), dtype=like.dtype)
            self._v = xp.zeros((b, h, self.max_len, dv), dtype=like.dtype)
        elif self._k.shape != (b, h, self.max_len, d) or self._v.shape[3] != dv:
            raise ValueError(f"KVCache: new keys (batch {b}, {h} heads, size {d}) do not match "
                             f"the cache {self._k.shape}; call reset() when the batch changes")
        self.length = lo + t
        return lo

    def reserve(self, b: int, h: int, t: int, d: int, like):
        """For the packed decoding path: the buffers as (B*H, max_len, D) views and the
        position where T new entries go; advances the length."""
        lo = self._claim(b, h, t, d, d, like)
        return (self._k.reshape(b * h, self.max_len, d), self._v.reshape(b * h, self.max_len, d), lo)

    def update(self, k: Tensor, v: Tensor):
        """k, v: (B, H, T, D) for the new positions -> all cached (B, H, length, D)."""
        b, h, t, d = k.shape
        lo = self._claim(b, h, t, d, v.shape[-1], k.data)
        hi = lo + t
        ks = [p[0] for p in self._parts] + [k]
        vs = [p[1] for p in self._parts] + [v]
        ranges = [(p[2], p[3]) for p in self._parts] + [(lo, hi)]
        k_all = ops.CacheAppend.apply(*ks, buf=self._k, lo=lo, ranges=ranges)
        v_all = ops.CacheAppend.apply(*vs, buf=self._v, lo=lo, ranges=ranges)
        if (k.requires_grad or v.requires_grad) and tl.is_grad_enabled():
            self._parts.append((k, v, lo, hi))
        return k_all, v_all


class MultiHeadAttention(Module):
    """Self-attention with n_head heads of size d_model / n_head ("Attention Is All You Need").

    x: (B, T, C) -> qkv (B, T, 3C) -> q, k, v (B, H, T, D) -> attention -> (B, T, C) -> proj.
    ``causal``: position t sees positions <= t. ``rotary``: a RotaryEmbedding applied to q, k.
    ``kv_cache``: a KVCache; new positions continue after the cached ones.
    """

    def __init__(self, d_model: int, n_head: int, bias: bool = True, dropout: float = 0.0,
                 causal: bool = True, rotary=None):
        super().__init__()
        if d_model % n_head:
            raise ValueError(f"MultiHeadAttention: d_model {d_model} is not divisible by "
                             f"n_head {n_head}")
        self.d_model, self.n_head, self.head_dim = d_model, n_head, d_model // n_head
        self.causal, self.dropout_p = causal, dropout
        self.qkv = Linear(d_model, 3 * d_model, bias=bias)
        self.proj = Linear(d_model, d_model, bias=bias)
        self.resid_dropout = Dropout(dropout)
        self.rotary = rotary

    def _heads(self, t: Tensor, b: int, n: int) -> Tensor:
        # (B, T, C) -> (B, H, T, D)
        return t.reshape(b, n, self.n_head, self.head_dim).transpose(1, 2)

    def forward(self, x: Tensor, kv_cache: KVCache | None = None, attn_mask=None) -> Tensor:
        b, t, c = x.shape
        if c != self.d_model:
            raise ValueError(f"MultiHeadAttention: input has {c} features, expected {self.d_model}")
        if attn_mask is None and (kv_cache is None or not tl.is_grad_enabled()):
            # the fast path for training and for decoding: one fused op from the packed
            # projection (the cache path is inference-only; with gradients it goes below)
            y = self._packed_attention(self.qkv(x), kv_cache)
            return self.resid_dropout(self.proj(y))
        return self.resid_dropout(self.proj(self._attention(x, kv_cache, attn_mask)))

    def _packed_attention(self, qkv: Tensor, kv_cache: KVCache | None = None) -> Tensor:
        """(B, T, 3C) -> (B, T, C) with ops.SelfAttention (reference: ``_attention``)."""
        b, t, _ = qkv.shape
        offset = kv_cache.length if kv_cache is not None else 0
        cos = sin = None
        if self.rotary is not None:
            cos, sin = self.rotary.tables(t, offset, qkv.dtype)
        cache = None
        if kv_cache is not None:
            cache = kv_cache.reserve(b, self.n_head, t, self.head_dim, qkv.data)
        return ops.SelfAttention.apply(
            qkv, n_head=self.n_head, is_causal=self.causal,
            dropout_p=self.dropout_p if self.training else 0.0, cos=cos, sin=sin, cache=cache)

    def _attention(self, x: Tensor, kv_cache=None, attn_mask=None) -> Tensor:
        """The general path, step by step: split q, k, v, rotate, cache, attend, merge."""
        b, t, c = x.shape
        q, k, v = self.qkv(x).split(self.d_model, dim=-1)          # 3 x (B, T, C)
        q, k, v = self._heads(q, b, t), self._heads(k, b, t), self._heads(v, b, t)
        offset = kv_cache.length if kv_cache is not None else 0
        if self.rotary is not None:
            q, k = self.rotary(q, offset), self.rotary(k, offset)
        if kv_cache is not None:
            k, v = kv_cache.update(k, v)                            # (B, H, offset + T, D)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, is_causal=self.causal,
            dropout_p=self.dropout_p if self.training else 0.0)     # (B, H, T, D)
        return y.transpose(1, 2).reshape(b, t, c)

    def extra_repr(self):
        return f"d_model={self.d_model}, n_head={self.n_head}, causal={self.causal}"
