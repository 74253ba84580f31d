"""nn.functional: each fused op equals its composed reference (values and gradients) and is
gradient-checked in float64."""
import numpy as np
import pytest

import nn
import tensorlite as tl
from nn import functional as F
from nn import reference as R


def t64(rng, *shape, scale=1.0):
    return tl.tensor(np.asarray(rng.standard_normal(shape) * scale), requires_grad=True)


def grads_of(fn, inputs):
    for t in inputs:
        t.grad = None
    out = fn(*inputs)
    w = np.random.default_rng(5).standard_normal(out.shape)
    out.backward(tl.tensor(w, dtype=out.dtype))
    return out.numpy().copy(), [t.grad.numpy().copy() for t in inputs]


def assert_fused_equals_reference(fused, ref, inputs, rtol=1e-10, atol=1e-12):
    of, gf = grads_of(fused, inputs)
    orf, gr = grads_of(ref, inputs)
    np.testing.assert_allclose(of, orf, rtol=rtol, atol=atol)
    for a, b in zip(gf, gr):
        np.testing.assert_allclose(a, b, rtol=rtol, atol=atol)


def test_linear(rng):
    x, w, b = t64(rng, 2, 3, 4), t64(rng, 5, 4), t64(rng, 5)
    assert_fused_equals_reference(F.linear, R.linear, [x, w, b])
    assert tl.gradcheck(F.linear, [x, w, b])
    assert tl.gradcheck(lambda x, w: F.linear(x, w), [t64(rng, 3, 4), w])


def test_gelu_tanh_and_exact(rng):
    x = t64(rng, 3, 7, scale=2.0)
    assert_fused_equals_reference(lambda x: F.gelu(x, "tanh"), R.gelu_tanh, [x])
    assert tl.gradcheck(lambda x: F.gelu(x, "tanh"), [x])
    assert tl.gradcheck(lambda x: F.gelu(x), [x])
    # exact GELU is x * Phi(x); compare with the normal CDF by math.erf
    import math
    ref = np.array([v * 0.5 * (1 + math.erf(v / math.sqrt(2))) for v in x.numpy().ravel()])
    np.testing.assert_allclose(F.gelu(x).numpy().ravel(), ref, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("bias", [True, False])
def test_feed_forward_gelu_matches_reference_and_gradchecks(rng, bias):
    x, w1, w2 = t64(rng, 2, 3, 4), t64(rng, 8, 4), t64(rng, 5, 8)
    b1, b2 = (t64(rng, 8), t64(rng, 5)) if bias else (None, None)
    ins = [x, w1, w2] + ([b1, b2] if bias else [])

    def fused(x, w1, w2, b1=None, b2=None):
        return F.feed_forward_gelu(x, w1, b1, w2, b2)

    def ref(x, w1, w2, b1=None, b2=None):
        return R.feed_forward_gelu(x, w1, b1, w2, b2)
    assert_fused_equals_reference(fused, ref, ins, rtol=1e-12, atol=1e-13)
    assert tl.gradcheck(fused, ins, atol=1e-8, rtol=1e-6)


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_feed_forward_gelu_large_matches_reference_on_threads(rng, threads):
    # big enough for the threaded path: rows split per thread, GELU in cache-sized pieces,
    # weight gradients summed over the threads' rows
    from tensorlite import cpu
    before = cpu.get_num_threads()
    cpu.set_num_threads(threads)
    try:
        ins = [t64(rng, 3, 700, 64), t64(rng, 256, 64, scale=0.2), t64(rng, 256),
               t64(rng, 48, 256, scale=0.1), t64(rng, 48)]
        assert_fused_equals_reference(F.feed_forward_gelu, R.feed_forward_gelu, ins,
                                      rtol=1e-10, atol=1e-11)
    finally:
        cpu.set_num_threads(before)


def test_feed_forward_module_fuses_only_the_plain_case(rng):
    ff = nn.FeedForward(6, 12)
    x = tl.tensor(rng.standard_normal((2, 3, 6)).astype(np.float32), requires_grad=True)
    assert ff(x).grad_fn.name == "FeedForwardGELU"
    y = ff.proj(F.gelu(ff.fc(x), "tanh"))
    np.testing.assert_allclose(ff(x).numpy(), y.numpy(), rtol=1e-6, atol=1e-7)
    seen = []
    object.__setattr__(ff.fc, "forward", lambda x: seen.append(1) or F.linear(x, ff.fc.weight,
                                                                               ff.fc.bias))
    assert ff(x).grad_fn.name == "Linear" and seen       # a wrapped fc is called
    assert nn.FeedForward(6, 12, activation="relu")(x).grad_fn.name == "Linear"


def test_silu_relu(rng):
    x = t64(rng, 4, 5)
    np.testing.assert_allclose(F.silu(x).numpy(), x.numpy() / (1 + np.exp(-x.numpy())))
    assert tl.gradcheck(F.silu, [x])
    assert tl.gradcheck(F.relu, [x])


@pytest.mark.parametrize("affine", [True, False])
def test_layer_norm(rng, affine):
    x = t64(rng, 2, 3, 6, scale=3.0)
    w, b = (t64(rng, 6), t64(rng, 6)) if affine else (None, None)
    ins = [x, w, b] if affine else [x]
    fused = (lambda x, w, b: F.layer_norm(x, 6, w, b)) if affine else (lambda x: F.layer_norm(x, 6))
    ref = (lambda x, w, b: R.layer_norm(x, w, b)) if affine else (lambda x: R.layer_norm(x))
    assert_fused_equals_reference(fused, ref, ins, rtol=1e-9, atol=1e-11)
    assert tl.gradcheck(fused, ins)
    y = F.layer_norm(x, 6).numpy()
    np.testing.assert_allclose(y.mean(-1), 0, atol=1e-12)
    np.testing.assert_allclose(y.var(-1), 1, rtol=1e-4)


def test_rms_norm(rng):
    x, w = t64(rng, 3, 8), t64(rng, 8)
    assert_fused_equals_reference(lambda x, w: F.rms_norm(x, 8, w), lambda x, w: R.rms_norm(x, w),
                                  [x, w])
    assert tl.gradcheck(lambda x, w: F.rms_norm(x, 8, w), [x, w])


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_cross_entropy(rng, reduction):
    logits = t64(rng, 2, 5, 7, scale=3.0)
    targets = tl.tensor(rng.integers(0, 7, (2, 5)))
    targets.data[0, 1] = -100                       # ignored
    fused = lambda z: F.cross_entropy(z, targets, reduction=reduction)  # noqa: E731
    ref = lambda z: R.cross_entropy(z, targets, reduction=reduction)    # noqa: E731
    assert_fused_equals_reference(fused, ref, [logits])
    assert tl.gradcheck(fused, [logits])
    if reduction == "none":
        assert fused(logits).shape == (2, 5) and fused(logits).numpy()[0, 1] == 0


def test_cross_entropy_float32_matches_float64_reference(rng):
    z = rng.standard_normal((64, 50)) * 4
    t = rng.integers(0, 50, 64)
    f32 = F.cross_entropy(tl.tensor(z.astype(np.float32)), t)
    assert f32.dtype == tl.float32
    ref = (np.log(np.exp(z).sum(1)) - z[np.arange(64), t]).mean()
    assert abs(f32.item() - ref) < 1e-5


def test_cross_entropy_label_smoothing(rng):
    z = t64(rng, 4, 6)
    t = rng.integers(0, 6, 4)
    ls = 0.1
    out = F.cross_entropy(z, t, label_smoothing=ls)
    logp = z.numpy() - np.log(np.exp(z.numpy()).sum(1, keepdims=True))
    ref = -((1 - ls) * logp[np.arange(4), t] + ls * logp.mean(1)).mean()
    assert out.item() == pytest.approx(ref, rel=1e-12)
    assert tl.gradcheck(lambda z: F.cross_entropy(z, t, label_smoothing=ls), [z])
    t[2] = -100  # an ignored target counts for nothing, smoothed or not
    for reduction in ("mean", "sum", "none"):
        assert_fused_equals_reference(
            lambda z: F.cross_entropy(z, t, reduction=reduction, label_smoothing=ls),
            lambda z: R.cross_entropy(z, t, reduction=reduction, label_smoothing=ls), [z])


def test_cross_entropy_errors(rng):
    z = tl.randn(3, 4)
    with pytest.raises(IndexError, match="target 9 is out of range for 4 classes"):
        F.cross_entropy(z, [0, 9, 1])
    with pytest.raises(ValueError, match=r"logits of shape \(3, 4\) need targets of shape \(3,\), got \(2,\)"):
        F.cross_entropy(z, [0, 1])
    with pytest.raises(TypeError, match="integer class ids"):
        F.cross_entropy(z, tl.tensor([0.0, 1.0, 2.0]))


@pytest.mark.parametrize("causal", [False, True])
def test_attention_matches_reference(rng, causal):
    q, k, v = t64(rng, 2, 3, 5, 4), t64(rng, 2, 3, 5, 4), t64(rng, 2, 3, 5, 4)
    fused = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=causal)  # noqa
    ref = lambda q, k, v: R.attention(q, k, v, is_causal=causal)  # noqa
    assert_fused_equals_reference(fused, ref, [q, k, v])
    assert tl.gradcheck(fused, [q, k, v])


def test_attention_masks_and_cross_lengths(rng):
    q, k, v = t64(rng, 2, 2, 3, 4), t64(rng, 2, 2, 6, 4), t64(rng, 2, 2, 6, 5)
    mask = rng.standard_normal((3, 6)) > -0.5
    mask[:, 0] = True  # every query sees something
    fused = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=tl.tensor(mask))  # noqa
    assert_fused_equals_reference(fused, lambda q, k, v: R.attention(q, k, v, mask=mask), [q, k, v])
    assert tl.gradcheck(fused, [q, k, v])
    # causal with fewer queries than keys: the queries are the last positions
    causal = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True)  # noqa
    assert_fused_equals_reference(causal, lambda q, k, v: R.attention(q, k, v, is_causal=True),
                                  [q, k, v])
    additive = rng.standard_normal((3, 6))
    fused_add = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=additive)  # noqa
    assert_fused_equals_reference(fused_add, lambda q, k, v: R.attention(q, k, v, mask=additive),
                                  [q, k, v])


def test_attention_causality(rng):
    # changing a future key/value must not change earlier outputs
    q, k, v = (tl.tensor(rng.standard_normal((1, 1, 6, 4))) for _ in range(3))
    out1 = F.scaled_dot_product_attention(q, k, v, is_causal=True).numpy()
    k.data[..., 4:, :] += 5
    v.data[..., 4:, :] -= 3
    out2 = F.scaled_dot_product_attention(q, k, v, is_causal=True).numpy()
    np.testing.assert_allclose(out1[..., :4, :], out2[..., :4, :], rtol=1e-6)
    assert not np.allclose(out1[..., 4:, :], out2[..., 4:, :])


def test_attention_dropout_seeded(rng):
    q, k, v = t64(rng, 1, 2, 4, 3), t64(rng, 1, 2, 4, 3), t64(rng, 1, 2, 4, 3)

    def f(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=0.3,
                                              generator=tl.Generator(11))
    a, b = f(q, k, v).numpy(), f(q, k, v).numpy()
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, F.scaled_dot_product_attention(q, k, v, is_causal=True).numpy())
    assert tl.gradcheck(f, [q, k, v])


def test_dropout(rng):
    x = t64(rng, 200, 50)
    y = F.dropout(x, 0.25, training=True, generator=tl.Generator(3))
    zero_frac = (y.numpy() == 0).mean()
    assert 0.22 < zero_frac < 0.28
    kept = y.numpy() != 0
    np.testing.assert_allclose(y.numpy()[kept], x.numpy()[kept] / 0.75)
    assert F.dropout(x, 0.25, training=False) is x
    assert tl.gradcheck(lambda x: F.dropout(x, 0.5, generator=tl.Generator(1)), [t64(rng, 3, 4)])
    with pytest.raises(ValueError, match="p must be in"):
        nn.Dropout(1.5)


def test_rotary_matches_reference_and_preserves_norm(rng):
    rope = nn.RotaryEmbedding(8, max_len=32).double()
    x = t64(rng, 2, 3, 5, 8)
    y = rope(x, offset=4)
    np.testing.assert_allclose(np.linalg.norm(y.numpy(), axis=-1), np.linalg.norm(x.numpy(), axis=-1))
    # composed: x * cos + rotate_half(x) * sin
    h = 4
    cos = np.concatenate([rope.cos.numpy()[4:9]] * 2, -1)
    sin = np.concatenate([rope.sin.numpy()[4:9]] * 2, -1)
    xn = x.numpy()
    rot = np.concatenate([-xn[..., h:], xn[..., :h]], -1)
    np.testing.assert_allclose(y.numpy(), xn * cos + rot * sin, rtol=1e-12, atol=1e-12)
    assert tl.gradcheck(lambda x: rope(x, 4), [x])
    # relative: <R(p) q, R(p+d) k> depends on d only
    q, k = rng.standard_normal(8), rng.standard_normal(8)
    def dot(p, d):
        a = rope(tl.tensor(q.reshape(1, 1, 1, 8)), p).numpy().ravel()
        b = rope(tl.tensor(k.reshape(1, 1, 1, 8)), p + d).numpy().ravel()
        return a @ b
    assert dot(0, 3) == pytest.approx(dot(7, 3), rel=1e-6)  # tables built in float32


def test_attention_broadcasts_batch_dims(rng):
    # one key/value head shared by four query heads (multi-query attention)
    q, k, v = t64(rng, 2, 4, 3, 5), t64(rng, 2, 1, 3, 5), t64(rng, 2, 1, 3, 5)
    fused = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True)  # noqa
    out = fused(q, k, v)
    assert out.shape == (2, 4, 3, 5)
    ref = R.attention(q, k.expand(2, 4, 3, 5), v.expand(2, 4, 3, 5), is_causal=True)
    np.testing.assert_allclose(out.numpy(), ref.numpy(), rtol=1e-12)
    assert tl.gradcheck(fused, [q, k, v])
    with pytest.raises(ValueError, match="do not broadcast"):
        F.scaled_dot_product_attention(t64(rng, 2, 4, 3, 5), t64(rng, 3, 1, 3, 5), t64(rng, 3, 1, 3, 5))


def test_norms_on_zero_rows(rng):
    x = tl.tensor(np.zeros((0, 5)), requires_grad=True)
    w = tl.tensor(np.ones(5), requires_grad=True)
    F.layer_norm(x, 5, w).sum().backward()
    assert x.grad.shape == (0, 5) and np.all(w.grad.numpy() == 0)


def test_float16_norms_and_gelu_compute_in_float32():
    x = tl.tensor(np.array([[1000., 1300., 700., 1000.]], np.float16), requires_grad=True)
    ref = np.array([0, 1.414, -1.414, 0])
    y = F.layer_norm(x, 4)
    assert y.dtype == tl.float16
    np.testing.assert_allclose(y.numpy()[0].astype(np.float64), ref, atol=2e-3)
    z = F.rms_norm(x, 4).numpy()[0].astype(np.float64)
    np.testing.assert_allclose(z, [0.978, 1.271, 0.685, 0.978], atol=3e-3)
    g = tl.tensor(np.array([-300., -256., 255., 300.], np.float16), requires_grad=True)
    F.gelu(g, "tanh").sum().backward()
    np.testing.assert_allclose(g.grad.numpy().astype(np.float64), [0, 0, 1, 1], atol=1e-3)
    assert g.grad.dtype == tl.float16


# ----------------------------------------------------------------------------- issue 9: the
# fused ops that had no composed reference (exact GELU, dropout, RoPE, packed attention), and
# gradchecks of paths that were only compared by value (additive float masks, RMSNorm without
# a weight)
def test_gelu_exact_matches_reference(rng):
    x = t64(rng, 3, 7, scale=3.0)
    assert_fused_equals_reference(F.gelu, R.gelu, [x], rtol=1e-12, atol=1e-13)
    assert_fused_equals_reference(nn.GELU(), R.gelu, [t64(rng, 2, 5)], rtol=1e-12, atol=1e-13)


def test_dropout_matches_reference(rng):
    x = t64(rng, 4, 9)
    fused = lambda x: F.dropout(x, 0.3, generator=tl.Generator(8))  # noqa: E731
    ref = lambda x: R.dropout(x, 0.3, generator=tl.Generator(8))    # noqa: E731
    assert_fused_equals_reference(fused, ref, [x])
    assert 0 < (fused(x).numpy() == 0).mean() < 1        # the mask drops some, not all
    # the module with its own generator draws the same mask as the op with that seed
    drop = nn.Dropout(0.3, generator=tl.Generator(8))
    assert_fused_equals_reference(drop, ref, [x])


def test_rotary_matches_reference(rng):
    rope = nn.RotaryEmbedding(8, max_len=32, dtype=tl.float64)
    cos, sin = R.rotary_tables(5, 8, offset=4)
    np.testing.assert_allclose(rope.tables(5, 4, np.float64), (cos, sin), rtol=0, atol=1e-15)
    x = t64(rng, 2, 3, 5, 8)
    assert_fused_equals_reference(lambda x: rope(x, 4), lambda x: R.rotary(x, cos, sin), [x])
    # the reference is a rotation: it keeps the norm of every (position, head) vector
    y = R.rotary(x, cos, sin).numpy()
    np.testing.assert_allclose(np.linalg.norm(y, axis=-1), np.linalg.norm(x.numpy(), axis=-1))


def test_attention_dropout_matches_reference(rng):
    q, k, v = t64(rng, 2, 2, 4, 3), t64(rng, 2, 2, 4, 3), t64(rng, 2, 2, 4, 3)
    fused = lambda q, k, v: F.scaled_dot_product_attention(  # noqa: E731
        q, k, v, is_causal=True, dropout_p=0.3, generator=tl.Generator(11))
    ref = lambda q, k, v: R.attention(q, k, v, is_causal=True, dropout_p=0.3,  # noqa: E731
                                      generator=tl.Generator(11))
    assert_fused_equals_reference(fused, ref, [q, k, v])


def _scores_mask(rng, kind, b=2, h=2, t=5):
    if kind == "bool":
        m = rng.standard_normal((b, 1, t, t)) > -0.3       # per batch element
        m[..., 0] = True                                   # every query sees something
        return m
    if kind == "float":
        m = rng.standard_normal((h, t, t))                 # per head
        m[1, 3, 1] = -np.inf
        return m
    if kind == "learned":                                  # a learned bias (B, 1, T, T)
        return t64(rng, b, 1, t, t)
    return None


@pytest.mark.parametrize("rotary,dropout,causal,mask", [
    (False, 0.0, True, None), (True, 0.0, True, None), (True, 0.25, True, None),
    (False, 0.0, False, None), (False, 0.0, False, "bool"), (True, 0.0, True, "float"),
    (True, 0.0, False, "learned"), (False, 0.25, True, "learned"), (True, 0.25, False, "bool")])
def test_packed_self_attention_matches_reference(rng, rotary, dropout, causal, mask):
    from tensorlite.ops import nn as ops
    qkv = t64(rng, 2, 5, 24)                                  # (B, T, 3C), C = 8, 2 heads
    cos, sin = R.rotary_tables(5, 4) if rotary else (None, None)
    m = _scores_mask(rng, mask)
    inputs = [qkv] + ([m] if mask == "learned" else [])

    def fused(qkv, *_):
        return ops.SelfAttention.apply(qkv, m, n_head=2, is_causal=causal, dropout_p=dropout,
                                       generator=tl.Generator(4), cos=cos, sin=sin)

    def ref(qkv, *_):
        return R.self_attention(qkv, 2, is_causal=causal, cos=cos, sin=sin, dropout_p=dropout,
                                generator=tl.Generator(4), mask=m)
    assert_fused_equals_reference(fused, ref, inputs)
    assert tl.gradcheck(fused, inputs)
    if mask is not None:   # the mask is not silently dropped
        plain = ops.SelfAttention.apply(qkv, n_head=2, is_causal=causal, dropout_p=dropout,
                                        generator=tl.Generator(4), cos=cos, sin=sin)
        assert not np.allclose(plain.numpy(), fused(qkv).numpy())


@pytest.mark.parametrize("rotary", [False, True])
def test_packed_self_attention_with_kv_cache_equals_one_pass(rng, rotary):
    # positions fed in chunks of 3, 1, 2 through a KVCache give, at every position, what one
    # pass over all 6 gives (float64 rounding), rotary tables continuing at the cached length
    from tensorlite.ops import nn as ops
    qkv = rng.standard_normal((2, 6, 24))
    mask = rng.standard_normal((2, 6, 6))                       # additive, per head
    cos, sin = R.rotary_tables(6, 4) if rotary else (None, None)

    def run(lo, hi, cache=None):
        return ops.SelfAttention.apply(
            tl.tensor(qkv[:, lo:hi]), mask[..., lo:hi, :hi], n_head=2, kv_cache=cache,
            cos=cos[lo:hi] if rotary else None, sin=sin[lo:hi] if rotary else None).numpy()
    cache = nn.KVCache(6)
    with tl.no_grad():
        full = run(0, 6)
        parts = [run(lo, hi, cache) for lo, hi in ((0, 3), (3, 4), (4, 6))]
    np.testing.assert_allclose(np.concatenate(parts, axis=1), full, rtol=1e-12, atol=1e-14)
    assert cache.length == 6 and cache.k.shape == (2, 2, 6, 4)
    with pytest.raises(RuntimeError, match="KVCache is for inference only"):
        ops.SelfAttention.apply(tl.tensor(qkv[:, :1]), n_head=2, kv_cache=nn.KVCache(6))


def test_packed_self_attention_on_a_share_of_the_heads(rng):
    # tensor parallelism gives each rank some of the heads: the op on the q, k, v columns of
    # heads 1 and 2 (of 4) computes exactly those heads' columns of the full output, and a
    # cache then holds those two heads only
    from tensorlite.ops import nn as ops
    b, t, h, d = 2, 5, 4, 3
    qkv = rng.standard_normal((b, t, 3, h, d))
    full = ops.SelfAttention.apply(tl.tensor(qkv.reshape(b, t, -1)), n_head=h).numpy()
    share = ops.SelfAttention.apply(tl.tensor(qkv[:, :, :, 1:3].reshape(b, t, -1)),
                                    n_head=2).numpy()
    np.testing.assert_allclose(share, full.reshape(b, t, h, d)[:, :, 1:3].reshape(b, t, -1),
                               rtol=1e-14, atol=1e-15)
    cache = nn.KVCache(8)
    with tl.no_grad():
        ops.SelfAttention.apply(tl.tensor(qkv[:, :, :, 1:3].reshape(b, t, -1)), n_head=2,
                                kv_cache=cache)
    assert cache.k.shape == (b, 2, 8, d)


@pytest.mark.parametrize("causal", [False, True])
def test_attention_additive_float_mask_gradchecked(rng, causal):
    q, k, v = t64(rng, 2, 2, 4, 3), t64(rng, 2, 2, 4, 3), t64(rng, 2, 2, 4, 5)
    # a bias per (query, key), a -inf that blocks one pair, and a per-batch (B, 1, Tq, Tk) one
    bias = rng.standard_normal((4, 4))
    bias[1, 0] = -np.inf
    per_batch = rng.standard_normal((2, 1, 4, 4))
    for mask in (bias, tl.tensor(bias), per_batch):
        fused = lambda q, k, v: F.scaled_dot_product_attention(  # noqa: E731
            q, k, v, attn_mask=mask, is_causal=causal)
        ref = lambda q, k, v: R.attention(q, k, v, mask=mask, is_causal=causal)  # noqa: E731
        assert_fused_equals_reference(fused, ref, [q, k, v])
        assert tl.gradcheck(fused, [q, k, v])
    # the mask does change the result (it is not silently dropped)
    plain = F.scaled_dot_product_attention(q, k, v, is_causal=causal).numpy()
    assert not np.allclose(plain, F.scaled_dot_product_attention(
        q, k, v, attn_mask=bias, is_causal=causal).numpy())


def test_rms_norm_without_weight(rng):
    x = t64(rng, 2, 3, 8, scale=2.0)
    assert_fused_equals_reference(lambda x: F.rms_norm(x, 8), lambda x: R.rms_norm(x), [x],
                                  rtol=1e-9, atol=1e-11)
    assert tl.gradcheck(lambda x: F.rms_norm(x, 8), [x])


def test_attention_float_mask_that_requires_grad_gets_its_gradient(rng):
    q, k, v = t64(rng, 1, 2, 3, 4), t64(rng, 1, 2, 3, 4), t64(rng, 1, 2, 3, 4)
    bias = t64(rng, 3, 3)
    assert tl.gradcheck(lambda q, k, v, b: F.scaled_dot_product_attention(q, k, v, attn_mask=b),
                        [q, k, v, bias])


@pytest.mark.parametrize("causal", [False, True])
def test_learned_attention_bias_matches_the_fused_op_and_gradchecks(rng, causal):
    q, k, v = t64(rng, 2, 2, 4, 3), t64(rng, 2, 2, 4, 3), t64(rng, 2, 2, 4, 3)
    bias = t64(rng, 2, 1, 4, 4)                      # broadcast over heads
    learned = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, is_causal=causal)
    with tl.no_grad():
        fused = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, is_causal=causal)
    np.testing.assert_allclose(learned.numpy(), fused.numpy(), rtol=1e-12, atol=1e-13)
    assert tl.gradcheck(lambda b: F.scaled_dot_product_attention(q, k, v, attn_mask=b,
                                                                 is_causal=causal), [bias])
