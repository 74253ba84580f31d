"""Multi-head self-attention with a causal mask and a key/value cache for decoding."""
from __future__ import annotations

import numpy as np

from tensorlite import backend
from tensorlite.ops import nn as ops
from tensorlite.ops.elementwise import check_same_device
from tensorlite.tensor import Tensor

from .layers import Dropout, Linear
from .module import Module


class KVCache:
    """Keys and values of the positions decoded so far, for one attention layer.

    Holds the layer's own heads in (B, H, max_len, D) buffers, allocated on first use with
    the batch, heads, head size, dtype and device of the first keys (under tensor
    parallelism each rank's layer holds its share of the heads, and so does its cache).
    ``update`` writes T new positions and returns views of all cached ones, so a decoding
    step costs the same at position 10 as at position 200 apart from the attention itself.

    Inference only, as generation caches are in PyTorch: no gradient flows through the
    cache, and attention refuses one while grad mode is on (decode under ``tl.no_grad()``).
    """

    def __init__(self, max_len: int):
        if not isinstance(max_len, int) or max_len <= 0:
            raise ValueError(f"KVCache: max_len must be a positive int, got {max_len!r}")
        self.max_len = max_len
        self.length = 0
        self.k = self.v = self._kind = None

    def reset(self):
        """Forget every cached position (and the buffers: the next batch may differ)."""
        self.length, self.k, self.v, self._kind = 0, None, None, None

    def update(self, k, v):
        """k, v: backend arrays (B, H, T, D) of T new positions -> (B, H, length, D) views of
        every cached position, the new ones last."""
        b, h, t, d = k.shape
        lo = self.length
        if lo + t > self.max_len:
            raise ValueError(f"KVCache: {lo} cached + {t} new positions exceed max_len "
                             f"{self.max_len}; reset the cache or crop the context")
        kind = (b, h, d, v.shape[3], k.dtype, backend.device_of(k))
        if self.k is None:
            xp = backend.xp_of(k)
            self.k = xp.zeros((b, h, self.max_len, d), dtype=k.dtype)
            self.v = xp.zeros((b, h, self.max_len, v.shape[3]), dtype=v.dtype)
            self._kind = kind
        elif kind != self._kind:
            raise ValueError(f"KVCache: new keys (batch {b}, {h} heads, size {d}, {k.dtype}, "
                             f"{kind[5]}) do not match the cache (batch {self._kind[0]}, "
                             f"{self._kind[1]} heads, size {self._kind[2]}, {self._kind[4]}, "
                             f"{self._kind[5]}); call reset() when the batch changes")
        self.k[:, :, lo:lo + t] = k
        self.v[:, :, lo:lo + t] = v
        self.length = lo + t
        return self.k[:, :, :lo + t], self.v[:, :, :lo + t]

    def __repr__(self):
        return f"KVCache(max_len={self.max_len}, length={self.length})"


class MultiHeadAttention(Module):
    """Self-attention with n_head heads of size d_model / n_head ("Attention Is All You Need").

    x: (B, T, C) -> qkv (B, T, 3C) -> one fused attention op over the heads -> (B, T, C)
    -> proj. The op (``ops.SelfAttention``; its composed reference is
    ``nn.reference.multi_head_attention``) does the split into heads, the rotation, the
    cache, the masks, the softmax and the merge.
    ``causal``: position t sees positions <= t. ``rotary``: a RotaryEmbedding applied to q, k.
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

    def forward(self, x: Tensor, kv_cache: KVCache | None = None, attn_mask=None) -> Tensor:
        """x: (B, T, C) -> (B, T, C).

        ``kv_cache``: a KVCache (inference only); the T new positions continue after the
        cached ones and attend to them too. ``attn_mask``: bool (True = may attend) or float
        (added to the scores; a Tensor that requires grad gets its gradient), broadcastable
        to (B, n_head, T, cached + T); applied on top of the causal mask.
        """
        if x.ndim != 3 or x.shape[2] != self.d_model:
            raise ValueError(f"MultiHeadAttention: input of shape {x.shape}, expected "
                             f"(batch, time, {self.d_model})")
        b, t, _ = x.shape
        offset = kv_cache.length if kv_cache is not None else 0
        cos = sin = None
        if self.rotary is not None:
            cos, sin = self.rotary.tables(t, offset, x.dtype)          # (T, D/2)
        mask = self._mask(attn_mask, x, (b, self.n_head, t, offset + t))
        op, keep = ops.SelfAttention, {}
        if self.keep_weights:
            op, keep = _KeepingWeights, {"keep": self._keep}
        y = op.apply(
            self.qkv(x), mask, n_head=self.n_head, is_causal=self.causal,
            dropout_p=self.dropout_p if self.training else 0.0, generator=self.attn_generator,
            cos=cos, sin=sin, kv_cache=kv_cache, **keep)                 # (B, T, C)
        return self.resid_dropout(self.proj(y))

    # Set keep_weights = True (on the instance) to keep the attention probabilities of the
    # last forward in last_weights: (B, n_head, T, cached + T), rows summing to 1, before
    # dropout (gpt.inspect draws them). Off by default: nothing is kept or copied.
    keep_weights = False
    last_weights = None

    def _keep(self, p):
        object.__setattr__(self, "last_weights", p)

    # A tensor-parallel version of this layer (parallel/tensor_parallel.py) holds a share of
    # the heads and overrides these two; the forward above is the same for both.
    attn_generator = None      # dropout on the attention weights draws from the global generator

    def _mask(self, attn_mask, x: Tensor, scores_shape: tuple):
        """attn_mask as the op takes it, checked against the scores (B, H, T, cached + T)."""
        return mask_input(attn_mask, x, scores_shape)

    def extra_repr(self):
        return f"d_model={self.d_model}, n_head={self.n_head}, causal={self.causal}"


class _KeepingWeights(ops.SelfAttention):
    """ops.SelfAttention that also hands a copy of its probabilities P (B, H, T, Tk) to
    ``keep`` (MultiHeadAttention.keep_weights); the output and the backward are the op's."""

    def forward(self, qkv, mask=None, *, keep, **params):
        out = super().forward(qkv, mask, **params)
        b, t, h, _ = self.dims
        keep(self.saved[3].reshape(b, h, t, -1).copy())
        return out


def mask_input(attn_mask, x: Tensor, scores_shape: tuple):
    """attn_mask as the op takes it: None, a Tensor (so that a float mask that requires grad
    gets its gradient) or a backend array; checked against the scores' (B, H, Tq, Tk)."""
    if attn_mask is None:
        return None
    if isinstance(attn_mask, Tensor):
        check_same_device("MultiHeadAttention", x, attn_mask)
        mask = attn_mask
    else:
        mask = backend.xp_of(x.data).asarray(attn_mask)
    if mask.dtype.kind not in "bf":
        raise TypeError(f"MultiHeadAttention: attn_mask must be bool (True = may attend) or "
                        f"float (added to the scores), got {mask.dtype}")
    try:
        fits = np.broadcast_shapes(mask.shape, scores_shape) == scores_shape
    except ValueError:
        fits = False
    if not fits:
        raise ValueError(f"MultiHeadAttention: attn_mask of shape {mask.shape} does not "
                         f"broadcast to the scores (batch, heads, queries, keys) = "
                         f"{scores_shape}")
    return mask
