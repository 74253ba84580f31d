"""Positional information: sinusoidal (Vaswani et al. 2017), learned (GPT-2), rotary (RoPE)."""
from __future__ import annotations

import numpy as np

import tensorlite as tl
from tensorlite.ops import nn as ops
from tensorlite.tensor import Tensor

from .module import Module, Parameter


def _check_range(name, offset, t, max_len):
    if offset < 0 or offset + t > max_len:
        raise ValueError(f"{name}: positions {offset} .. {offset + t - 1} exceed max_len {max_len}; "
                         "use a shorter sequence or a larger max_len/block_size")


class SinusoidalPositionalEncoding(Module):
    """PE[pos, 2i] = sin(pos / 10000^(2i/d)), PE[pos, 2i+1] = cos(pos / 10000^(2i/d)).
    ``pe(T, offset)`` -> (T, d) to add to the token embeddings. No parameters."""

    def __init__(self, d_model: int, max_len: int = 4096, base: float = 10000.0, dtype=None):
        super().__init__()
        self.d_model, self.max_len = d_model, max_len
        pos = np.arange(max_len)[:, None]
        div = base ** (np.arange(0, d_model, 2) / d_model)
        pe = np.zeros((max_len, d_model))
        pe[:, 0::2] = np.sin(pos / div)
        pe[:, 1::2] = np.cos(pos / div[: d_model // 2])
        self.register_buffer("pe", tl.tensor(pe, dtype=dtype or tl.get_default_dtype()),
                             persistent=False)

    def forward(self, t: int, offset: int = 0) -> Tensor:
        _check_range("SinusoidalPositionalEncoding", offset, t, self.max_len)
        return Tensor._make(self.pe.data[offset:offset + t], False, None)


class LearnedPositionalEmbedding(Module):
    """A learned vector per position (GPT-2's wpe). ``pe(T, offset)`` -> (T, d)."""

    def __init__(self, max_len: int, d_model: int, dtype=None):
        super().__init__()
        self.max_len = max_len
        self.weight = Parameter(tl.randn(max_len, d_model, dtype=dtype) * 0.02)

    def forward(self, t: int, offset: int = 0) -> Tensor:
        _check_range("LearnedPositionalEmbedding", offset, t, self.max_len)
        return self.weight[offset:offset + t]


class RotaryEmbedding(Module):
    """Rotates query/key channel pairs by position-dependent angles theta_i = pos * base^(-2i/D),
    so q.k depends on relative position. ``rope(x, offset)`` for x: (B, H, T, D), D even."""

    def __init__(self, head_dim: int, max_len: int = 4096, base: float = 10000.0, dtype=None):
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"RotaryEmbedding: head_dim must be even, got {head_dim}")
        self.head_dim, self.max_len = head_dim, max_len
        inv_freq = base ** (-np.arange(0, head_dim, 2) / head_dim)      # (D/2,)
        ang = np.arange(max_len)[:, None] * inv_freq[None, :]           # (max_len, D/2)
        dt = dtype or tl.get_default_dtype()
        self.register_buffer("cos", tl.tensor(np.cos(ang), dtype=dt), persistent=False)
        self.register_buffer("sin", tl.tensor(np.sin(ang), dtype=dt), persistent=False)

    def tables(self, t: int, offset: int, dtype):
        """cos, sin arrays (T, D/2) for positions offset .. offset + T - 1."""
        _check_range("RotaryEmbedding", offset, t, self.max_len)
        return (self.cos.data[offset:offset + t].astype(dtype, copy=False),
                self.sin.data[offset:offset + t].astype(dtype, copy=False))

    def forward(self, x: Tensor, offset: int = 0) -> Tensor:
        if x.shape[-1] != self.head_dim:
            raise ValueError(f"RotaryEmbedding: last dim {x.shape[-1]} != head_dim {self.head_dim}")
        cos, sin = self.tables(x.shape[-2], offset, x.dtype)
        return ops.Rotary.apply(x, cos=cos, sin=sin)
