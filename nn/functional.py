"""nn.functional: the stateless forms of the layers (PyTorch's names and signatures).

The heavy ones are single fused ops from ``tensorlite.ops.nn``; their composed references
(the same math from primitive tensor ops) are in ``nn/reference.py``.
"""
from __future__ import annotations

import tensorlite as tl
from tensorlite import backend
from tensorlite.ops import nn as ops
from tensorlite.ops.mlp import FeedForwardGELU
from tensorlite.ops.elementwise import check_same_device
from tensorlite.tensor import Tensor

softmax = tl.softmax
log_softmax = tl.log_softmax


def _need_float(name, x):
    if not isinstance(x, Tensor):
        raise TypeError(f"{name}: expected a Tensor, got {type(x).__name__}")
    if x.dtype.kind != "f":
        raise TypeError(f"{name}: needs a float tensor, got {x.dtype}")


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """x: (..., in) @ weight: (out, in)^T + bias: (out,) -> (..., out)."""
    _need_float("linear", x)
    if x.shape[-1:] != weight.shape[1:]:
        raise ValueError(f"linear: input of shape {x.shape} has {x.shape[-1] if x.ndim else 0} "
                         f"features but the weight {weight.shape} expects {weight.shape[1]}")
    check_same_device("linear", x, weight, bias)
    if x.dtype != weight.dtype:
        raise TypeError(f"linear: input dtype {x.dtype} differs from weight dtype {weight.dtype}; "
                        f"cast one with .to()")
    if bias is None:
        return ops.Linear.apply(x, weight)
    return ops.Linear.apply(x, weight, bias)


def feed_forward_gelu(x: Tensor, w1: Tensor, b1, w2: Tensor, b2) -> Tensor:
    """gelu_tanh(x w1^T + b1) w2^T + b2 as one op (tensorlite/ops/mlp.py): the MLP of a
    GPT-2 block. x: (..., C), w1: (H, C), w2: (C_out, H); biases (H,), (C_out,) or None."""
    _need_float("feed_forward_gelu", x)
    if x.shape[-1:] != w1.shape[1:] or w2.shape[1:] != w1.shape[:1]:
        raise ValueError(f"feed_forward_gelu: input {x.shape}, w1 {w1.shape} and w2 {w2.shape} "
                         f"do not chain (need (..., C), (H, C), (C_out, H))")
    check_same_device("feed_forward_gelu", x, w1, b1, w2, b2)
    return FeedForwardGELU.apply(x, w1, b1, w2, b2)


def relu(x: Tensor) -> Tensor:
    return x.relu()


def silu(x: Tensor) -> Tensor:
    """x * sigmoid(x) (a.k.a. swish)."""
    return x * x.sigmoid()


def _in_float32(fn, x: Tensor, *params):
    """float16 inputs are computed in float32 and cast back (x^3 and sums of squares overflow
    float16 at |x| ~ 40-256), as PyTorch does; the casts are part of the graph."""
    out = fn(x.float(), *[p.float() if p is not None else None for p in params])
    return out.half()


def gelu(x: Tensor, approximate: str = "none") -> Tensor:
    """GELU: ``approximate="tanh"`` is GPT-2's formula, ``"none"`` the exact x * Phi(x)."""
    _need_float("gelu", x)
    if x.dtype == tl.float16:
        return _in_float32(lambda x: gelu(x, approximate), x)
    if approximate == "tanh":
        return ops.GELUTanh.apply(x)
    if approximate == "none":
        return ops.GELUExact.apply(x)
    raise ValueError(f"gelu: approximate must be 'none' or 'tanh', got {approximate!r}")


def dropout(x: Tensor, p: float = 0.5, training: bool = True, generator=None) -> Tensor:
    """Inverted dropout; the identity when not training or p == 0."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"dropout: p must be in [0, 1], got {p}")
    if not training or p == 0.0:
        return x
    if p == 1.0:
        return x * 0.0
    return ops.Dropout.apply(x, p=p, generator=generator)


def layer_norm(x: Tensor, normalized_shape, weight=None, bias=None, eps: float = 1e-5) -> Tensor:
    """LayerNorm over the last dim (Ba et al. 2016), closed-form backward."""
    _need_float("layer_norm", x)
    ns = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
    if len(ns) != 1 or x.shape[-1:] != ns:
        raise ValueError(f"layer_norm: normalized_shape {ns} must be the last dim of the input "
                         f"{x.shape} (only last-dim normalisation is supported)")
    if weight is None and bias is not None:
        raise ValueError("layer_norm: a bias without a weight is not supported")
    if x.dtype == tl.float16:
        return _in_float32(lambda x, w, b: layer_norm(x, ns, w, b, eps), x, weight, bias)
    args = [x] + ([weight] if weight is not None else []) + ([bias] if bias is not None else [])
    return ops.LayerNorm.apply(*args, eps=eps)


def rms_norm(x: Tensor, normalized_shape, weight=None, eps: float = 1e-6) -> Tensor:
    """RMSNorm (Zhang & Sennrich 2019): x / rms(x) * weight, over the last dim."""
    _need_float("rms_norm", x)
    ns = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
    if len(ns) != 1 or x.shape[-1:] != ns:
        raise ValueError(f"rms_norm: normalized_shape {ns} must be the last dim of the input {x.shape}")
    if x.dtype == tl.float16:
        return _in_float32(lambda x, w: rms_norm(x, ns, w, eps), x, weight)
    if weight is None:
        return ops.RMSNorm.apply(x, eps=eps)
    return ops.RMSNorm.apply(x, weight, eps=eps)


def cross_entropy(logits: Tensor, targets, ignore_index: int = -100, reduction: str = "mean",
                  label_smoothing: float = 0.0) -> Tensor:
    """Cross-entropy from unnormalised logits, fused with the softmax.

    logits: (N, V) or (..., V); targets: (N,) or (...) integer class ids.
    reduction: "mean" over non-ignored targets, "sum", or "none" (shape of targets).
    """
    _need_float("cross_entropy", logits)
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"cross_entropy: reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    if not isinstance(targets, Tensor):
        targets = Tensor(backend.xp_of(logits.data).asarray(targets))
    check_same_device("cross_entropy", logits, targets)
    if targets.dtype.kind not in "iu":
        raise TypeError(f"cross_entropy: targets must be integer class ids, got {targets.dtype}")
    if logits.shape[:-1] != targets.shape:
        raise ValueError(f"cross_entropy: logits of shape {logits.shape} need targets of shape "
                         f"{logits.shape[:-1]}, got {targets.shape}")
    v = logits.shape[-1]
    t = targets.data.reshape(-1)
    if t.size:
        valid = t[t != ignore_index]
        if valid.size and (int(valid.min()) < 0 or int(valid.max()) >= v):
            bad = int(valid.min()) if int(valid.min()) < 0 else int(valid.max())
            raise IndexError(f"cross_entropy: target {bad} is out of range for {v} classes "
                             f"(valid: 0 .. {v - 1}, or ignore_index={ignore_index})")
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"cross_entropy: label_smoothing must be in [0, 1), got {label_smoothing}")
    flat = logits.reshape(-1, v) if logits.ndim != 2 else logits
    out = ops.CrossEntropy.apply(flat, Tensor._make(t, False, None), ignore_index=ignore_index,
                                 reduction=reduction, label_smoothing=label_smoothing)
    if reduction == "none":
        return out.reshape(*targets.shape)
    return out


def _attention_with_learned_bias(q, k, v, bias, dropout_p, is_causal, scale, generator):
    """Attention whose additive float mask requires grad (a learned bias, as in T5 or ALiBi
    variants): the same math as the fused op, composed of differentiable ops so the bias
    receives its gradient, dL/dbias = dL/dscores summed over the broadcast dims. (Dropout
    draws its mask from ``generator`` as ``dropout`` does, not as the fused op.)"""
    import math

    import numpy as np
    tq, tk = q.shape[-2], k.shape[-2]
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = (q @ k.transpose(-1, -2)) * scale + bias.to(q.dtype)          # (..., Tq, Tk)
    if is_causal:   # query i is the i-th of the last Tq positions
        blocked = ~np.tril(np.ones((tq, tk), bool), k=tk - tq)
        s = s.masked_fill(tl.tensor(blocked, device=q.device), float("-inf"))
    p = s.softmax(-1)
    if dropout_p:
        p = dropout(p, dropout_p, generator=generator)
    return p @ v


def scaled_dot_product_attention(q: Tensor, k: Tensor, v: Tensor, attn_mask=None,
                                 dropout_p: float = 0.0, is_causal: bool = False, scale=None,
                                 generator=None) -> Tensor:
    """softmax(q k^T / sqrt(D) + mask) v, as one fused op.

    q: (..., Tq, D), k: (..., Tk, D), v: (..., Tk, Dv) -> (..., Tq, Dv).
    attn_mask: bool (True = may attend) or float (added to the scores), broadcastable to
    (..., Tq, Tk). is_causal: query i (the i-th of the last Tq positions) sees keys <= it.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        _need_float(f"scaled_dot_product_attention: {name}", t)
    check_same_device("scaled_dot_product_attention", q, k, v)
    if q.shape[-1] != k.shape[-1] or k.shape[-2] != v.shape[-2] or min(q.ndim, k.ndim, v.ndim) < 2:
        raise ValueError(f"scaled_dot_product_attention: q {q.shape}, k {k.shape}, v {v.shape} "
                         "do not fit (need q (..., Tq, D), k (..., Tk, D), v (..., Tk, Dv))")
    leads = (q.shape[:-2], k.shape[:-2], v.shape[:-2])
    if not leads[0] == leads[1] == leads[2]:
        # batch/head dims broadcast (e.g. one key/value head shared by many query heads);
        # expand is differentiable, the engine sums the gradients back
        try:
            lead = tuple(backend.xp_of(q.data).broadcast_shapes(*leads))
        except ValueError:
            raise ValueError(f"scaled_dot_product_attention: the batch dims of q {q.shape}, "
                             f"k {k.shape} and v {v.shape} do not broadcast") from None
        q, k, v = (t.expand(*lead, *t.shape[-2:]) for t in (q, k, v))
    if is_causal and q.shape[-2] > k.shape[-2]:
        raise ValueError(f"scaled_dot_product_attention: is_causal with more queries "
                         f"({q.shape[-2]}) than keys ({k.shape[-2]})")
    if (isinstance(attn_mask, Tensor) and attn_mask.requires_grad and tl.is_grad_enabled()
            and attn_mask.dtype.kind == "f"):
        return _attention_with_learned_bias(q, k, v, attn_mask, dropout_p, is_causal, scale,
                                            generator)
    mask = None
    if attn_mask is not None:
        mask = attn_mask.data if isinstance(attn_mask, Tensor) else \
            backend.xp_of(q.data).asarray(attn_mask)
        if mask.dtype.kind == "f":
            mask = mask.astype(q.dtype, copy=False)
    return ops.Attention.apply(q, k, v, mask=mask, is_causal=is_causal, scale=scale,
                               dropout_p=dropout_p if dropout_p else 0.0, generator=generator)
