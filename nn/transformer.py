"""The transformer block: attention and a feed-forward network, each inside a residual.

post-LN ("Attention Is All You Need"):  x = LN(x + Sublayer(x))
pre-LN  (GPT-2):                        x = x + Sublayer(LN(x))
"""
from __future__ import annotations

from . import functional as F
from .attention import MultiHeadAttention
from .layers import Dropout, LayerNorm, Linear, RMSNorm
from .module import Module

_ACTIVATIONS = {
    "gelu": lambda x: F.gelu(x, "none"),
    "gelu_tanh": lambda x: F.gelu(x, "tanh"),
    "relu": F.relu,
    "silu": F.silu,
}


class FeedForward(Module):
    """Position-wise MLP: Linear(d, d_ff) -> activation -> Linear(d_ff, d) -> dropout."""

    def __init__(self, d_model: int, d_ff: int | None = None, dropout: float = 0.0,
                 bias: bool = True, activation: str = "gelu_tanh"):
        super().__init__()
        if activation not in _ACTIVATIONS:
            raise ValueError(f"FeedForward: unknown activation {activation!r}; "
                             f"choose from {sorted(_ACTIVATIONS)}")
        d_ff = d_ff or 4 * d_model
        self.activation = activation
        self.fc = Linear(d_model, d_ff, bias=bias)
        self.proj = Linear(d_ff, d_model, bias=bias)
        self.dropout = Dropout(dropout)

    def forward(self, x):
        if self._fused(x):       # the same math as one op (F.feed_forward_gelu)
            fc, proj = self.fc, self.proj
            return self.dropout(F.feed_forward_gelu(x, fc.weight, fc.bias, proj.weight, proj.bias))
        return self.dropout(self.proj(_ACTIVATIONS[self.activation](self.fc(x))))

    def _fused(self, x) -> bool:
        """The plain GELU-tanh MLP: two nn.Linear layers (not tensor-parallel ones) whose
        forwards nobody wraps (gpt.inspect taps fc's), float32/float64."""
        return (self.activation == "gelu_tanh" and type(self.fc) is Linear
                and type(self.proj) is Linear and "forward" not in self.fc.__dict__
                and "forward" not in self.proj.__dict__ and x.dtype.itemsize >= 4)


class TransformerBlock(Module):
    """One transformer layer. ``norm_first=True`` is pre-LN (GPT-2), False is post-LN."""

    def __init__(self, d_model: int, n_head: int, d_ff: int | None = None, dropout: float = 0.0,
                 bias: bool = True, norm_first: bool = True, causal: bool = True,
                 activation: str = "gelu_tanh", norm: str = "layernorm", rotary=None):
        super().__init__()
        if norm not in ("layernorm", "rmsnorm"):
            raise ValueError(f"TransformerBlock: norm must be 'layernorm' or 'rmsnorm', got {norm!r}")
        make_norm = (lambda: LayerNorm(d_model, bias=bias)) if norm == "layernorm" \
            else (lambda: RMSNorm(d_model))
        self.norm_first = norm_first
        self.ln1 = make_norm()
        self.attn = MultiHeadAttention(d_model, n_head, bias=bias, dropout=dropout,
                                       causal=causal, rotary=rotary)
        self.ln2 = make_norm()
        self.mlp = FeedForward(d_model, d_ff, dropout=dropout, bias=bias, activation=activation)

    def forward(self, x, kv_cache=None, attn_mask=None):
        """x: (B, T, C) -> (B, T, C); ``kv_cache`` and ``attn_mask`` go to the attention (see
        MultiHeadAttention.forward: the cache is for inference only)."""
        if self.norm_first:
            x = x + self.attn(self.ln1(x), kv_cache=kv_cache, attn_mask=attn_mask)
            return x + self.mlp(self.ln2(x))
        x = self.ln1(x + self.attn(x, kv_cache=kv_cache, attn_mask=attn_mask))
        return self.ln2(x + self.mlp(x))

    def extra_repr(self):
        return f"norm_first={self.norm_first}"
