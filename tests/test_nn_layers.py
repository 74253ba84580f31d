"""nn layers: Module mechanics, and every layer gradient-checked w.r.t. inputs and parameters."""
import numpy as np
import pytest

import nn
import tensorlite as tl
from nn import functional as F
from nn import reference as R


def params_check(module, x_shape, rng, fn=None, directional=False, int_input=None):
    """gradcheck ``module`` in float64 w.r.t. its input (if float) and all its parameters."""
    module.double()
    params = list(module.parameters())
    if int_input is not None:
        inputs = params
        call = lambda *ps: (fn or module)(int_input)  # noqa: E731
    else:
        x = tl.tensor(np.asarray(rng.standard_normal(x_shape)), requires_grad=True)
        inputs = [x] + params
        call = lambda x, *ps: (fn or module)(x)  # noqa: E731
    check = tl.gradcheck_directional if directional else tl.gradcheck
    assert check(call, inputs)


# ----------------------------------------------------------------------------- Module
class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(5, 4)
        self.blocks = nn.ModuleList([nn.Linear(4, 4), nn.Linear(4, 4)])
        self.head = nn.Linear(4, 5, bias=False)
        self.head.weight = self.emb.weight  # tied
        self.register_buffer("steps", tl.zeros(1))

    def forward(self, ids):
        h = self.emb(ids)
        for b in self.blocks:
            h = b(h).tanh()
        return self.head(h)


def test_module_registration_and_tied_weights():
    m = Tiny()
    names = [n for n, _ in m.named_parameters()]
    assert names == ["emb.weight", "blocks.0.weight", "blocks.0.bias", "blocks.1.weight",
                     "blocks.1.bias"]
    assert m.num_parameters() == 5 * 4 + 2 * (16 + 4)
    assert list(m.state_dict()) == ["steps"] + names  # own tensors first, as PyTorch
    assert len(m.blocks) == 2 and m.blocks[-1] is m.blocks[1]


def test_state_dict_round_trip_and_errors():
    a, b = Tiny(), Tiny()
    ids = tl.tensor([[0, 3, 4]])
    assert not np.allclose(a(ids).numpy(), b(ids).numpy())
    b.load_state_dict(a.state_dict())
    np.testing.assert_array_equal(a(ids).numpy(), b(ids).numpy())
    sd = a.state_dict()
    sd.pop("blocks.1.bias")
    sd["extra.weight"] = tl.zeros(2)
    with pytest.raises(KeyError, match=r"missing keys \['blocks.1.bias'\]; unexpected keys \['extra.weight'\]"):
        b.load_state_dict(sd)
    missing, unexpected = b.load_state_dict(sd, strict=False)
    assert missing == ["blocks.1.bias"] and unexpected == ["extra.weight"]
    bad = a.state_dict()
    bad["emb.weight"] = tl.zeros(6, 4)
    with pytest.raises(ValueError, match=r"'emb.weight' has shape \(6, 4\) in the checkpoint but \(5, 4\) in the model"):
        b.load_state_dict(bad)


def test_train_eval_to_zero_grad():
    m = nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.5), nn.Linear(4, 2))
    assert m.training and m[1].training
    m.eval()
    assert not m[1].training
    x = tl.randn(2, 3)
    np.testing.assert_array_equal(m(x).numpy(), m(x).numpy())  # dropout off in eval
    w = m[0].weight
    m.double()
    assert m[0].weight is w and w.dtype == tl.float64
    m(x.double()).sum().backward()
    assert w.grad is not None
    m.zero_grad()
    assert w.grad is None
    with pytest.raises(RuntimeError, match="super\\(\\).__init__\\(\\)"):
        class Bad(nn.Module):
            def __init__(self):
                self.x = 1
        Bad()


# ----------------------------------------------------------------------------- layers
def test_linear_layer(rng):
    params_check(nn.Linear(4, 3), (2, 5, 4), rng)
    params_check(nn.Linear(4, 3, bias=False), (3, 4), rng)
    with pytest.raises(ValueError, match=r"input of shape \(2, 5\) has 5 features but the weight \(3, 4\) expects 4"):
        nn.Linear(4, 3)(tl.randn(2, 5))


def test_embedding_layer(rng):
    ids = tl.tensor([[0, 2, 2], [4, 1, 0]])
    emb = nn.Embedding(5, 3)
    params_check(emb, None, rng, int_input=ids)
    assert emb(ids).shape == (2, 3, 3)


@pytest.mark.parametrize("layer", [nn.LayerNorm(6), nn.RMSNorm(6), nn.LayerNorm(6, bias=False),
                                   nn.LayerNorm(6, elementwise_affine=False),
                                   nn.RMSNorm(6, elementwise_affine=False),
                                   nn.GELU(), nn.GELU("tanh"), nn.ReLU(), nn.SiLU()],
                         ids=["layernorm", "rmsnorm", "layernorm-nobias", "layernorm-noaffine",
                              "rmsnorm-noweight", "gelu", "gelu-tanh", "relu", "silu"])
def test_elementwise_layers(rng, layer):
    params_check(layer, (2, 3, 6), rng)


def test_rmsnorm_without_weight_has_no_parameters(rng):
    norm = nn.RMSNorm(6, elementwise_affine=False)
    assert list(norm.parameters()) == [] and norm.weight is None
    params_check(norm, (4, 6), rng)


@pytest.mark.parametrize("own_generator", [True, False])
def test_dropout_module_with_fixed_mask_is_gradient_checked(rng, own_generator):
    # the module itself (not F.dropout): its mask comes from its generator, or from the global
    # one; re-seeding it before each evaluation makes every evaluation drop the same elements
    drop = nn.Dropout(0.3, generator=tl.Generator(2) if own_generator else None)

    def f(x):
        if own_generator:
            drop.generator.manual_seed(2)
        else:
            tl.manual_seed(2)
        return drop(x)
    x = tl.tensor(rng.standard_normal((5, 6)), requires_grad=True)
    y = f(x).numpy()
    np.testing.assert_array_equal(y, f(x).numpy())
    assert 0 < (y == 0).sum() < y.size                    # some dropped, not all
    assert tl.gradcheck(f, [x])
    drop.eval()
    assert drop(x) is x


def test_norm_layers_have_paper_statistics(rng):
    x = tl.tensor(rng.standard_normal((4, 8)) * 5 + 3)
    y = nn.LayerNorm(8)(x).numpy()
    np.testing.assert_allclose(y.mean(-1), 0, atol=1e-5)
    z = nn.RMSNorm(8, eps=0)(x).numpy()
    np.testing.assert_allclose(np.sqrt((z ** 2).mean(-1)), 1, rtol=1e-5)


def test_positional_encodings(rng):
    pe = nn.SinusoidalPositionalEncoding(6, max_len=16)
    v = pe(4, offset=2).numpy()
    pos, i = 3, 1  # row 1 is position 3
    np.testing.assert_allclose(v[1, 2 * i], np.sin(pos / 10000 ** (2 * i / 6)), rtol=1e-6)
    np.testing.assert_allclose(v[1, 2 * i + 1], np.cos(pos / 10000 ** (2 * i / 6)), rtol=1e-6)
    learned = nn.LearnedPositionalEmbedding(16, 6).double()
    assert tl.gradcheck(lambda w: learned(5, 3) * 2.0, [learned.weight])
    with pytest.raises(ValueError, match="positions 14 .. 17 exceed max_len 16"):
        pe(4, offset=14)


@pytest.mark.parametrize("rotary", [False, True])
def test_multihead_attention(rng, rotary):
    rope = nn.RotaryEmbedding(4, max_len=16) if rotary else None
    mha = nn.MultiHeadAttention(8, 2, rotary=rope)
    params_check(mha, (2, 5, 8), rng)
    with pytest.raises(ValueError, match="d_model 10 is not divisible by n_head 3"):
        nn.MultiHeadAttention(10, 3)


def test_mha_attn_mask(rng):
    mha = nn.MultiHeadAttention(8, 2, causal=False).double()
    mask = np.ones((4, 4), bool)
    mask[:, 3] = False
    params_check(mha, (1, 4, 8), rng, fn=lambda x: mha(x, attn_mask=tl.tensor(mask)))


@pytest.mark.parametrize("causal,rotary", [(False, False), (True, True)])
def test_mha_additive_float_mask_is_gradient_checked(rng, causal, rotary):
    mha = nn.MultiHeadAttention(8, 2, causal=causal,
                                rotary=nn.RotaryEmbedding(4, 8) if rotary else None).double()
    bias = rng.standard_normal((1, 2, 4, 4))   # one additive bias per head and (query, key)
    bias[0, 1, 2, 0] = -np.inf
    x = tl.tensor(rng.standard_normal((2, 4, 8)))
    assert not np.allclose(mha(x).numpy(), mha(x, attn_mask=bias).numpy())
    params_check(mha, (2, 4, 8), rng, fn=lambda x: mha(x, attn_mask=bias))


def rope64(max_len=16):
    return nn.RotaryEmbedding(4, max_len=max_len, dtype=tl.float64)


@pytest.mark.parametrize("rotary", [False, True])
def test_kv_cache_gives_same_outputs_as_full_forward(rng, rotary):
    # a prompt of 4 positions, then one at a time, through two blocks: every position's
    # output equals the one forward over all 7, to float64 rounding
    tl.manual_seed(3)
    rope = rope64() if rotary else None
    blocks = [nn.TransformerBlock(8, 2, rotary=rope).double() for _ in range(2)]
    x = tl.tensor(rng.standard_normal((2, 7, 8)))

    def run(x, caches=None):
        for i, b in enumerate(blocks):
            x = b(x, kv_cache=caches[i] if caches else None)
        return x

    full = run(x).numpy()
    caches = [nn.KVCache(16) for _ in blocks]
    with tl.no_grad():
        parts = [run(x[:, :4], caches)] + [run(x[:, t:t + 1], caches) for t in range(4, 7)]
        inc = np.concatenate([p.numpy() for p in parts], axis=1)
        np.testing.assert_allclose(inc, full, rtol=1e-12, atol=1e-14)
        assert [c.length for c in caches] == [7, 7]
        with pytest.raises(ValueError, match="exceed max_len 16"):
            run(tl.randn(2, 10, 8, dtype=tl.float64), caches)
        assert caches[0].length == 7                      # a refused update writes nothing
        with pytest.raises(ValueError, match=r"new keys \(batch 1, 2 heads.*call reset\(\)"):
            run(x[:1, :1], caches)
        for c in caches:
            c.reset()
        np.testing.assert_allclose(run(x[:1, :3], caches).numpy(), run(x[:1, :3]).numpy(),
                                   rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("kind", ["bool", "float"])
def test_kv_cache_with_attn_mask_equals_full_forward(rng, kind):
    # a mask over the whole sequence on top of the causal one; each cached chunk passes its
    # rows (its queries) and the columns of every key so far
    mha = nn.MultiHeadAttention(8, 2, rotary=rope64()).double()
    x = tl.tensor(rng.standard_normal((2, 6, 8)))
    if kind == "bool":
        mask = rng.standard_normal((2, 1, 6, 6)) > -0.3   # per batch element
        mask[..., 0] = True                              # every query sees something
    else:
        mask = rng.standard_normal((1, 2, 6, 6))          # per head
        mask[0, 1, 4, 2] = -np.inf
    full = mha(x, attn_mask=mask).numpy()
    cache = nn.KVCache(6)
    with tl.no_grad():
        parts = [mha(x[:, lo:hi], kv_cache=cache, attn_mask=mask[..., lo:hi, :hi]).numpy()
                 for lo, hi in ((0, 3), (3, 4), (4, 6))]
    np.testing.assert_allclose(np.concatenate(parts, axis=1), full, rtol=1e-12, atol=1e-14)
    assert not np.allclose(full, mha(x).numpy())         # the mask is not silently dropped
    # the usual mistake: a mask for the new positions only, without the cached keys
    cache = nn.KVCache(6)
    with tl.no_grad():
        mha(x[:, :3], kv_cache=cache)
        with pytest.raises(ValueError, match=r"attn_mask of shape \(3, 3\) does not broadcast "
                                             r"to the scores .* = \(2, 2, 3, 6\)"):
            mha(x[:, 3:], kv_cache=cache, attn_mask=np.ones((3, 3), bool))


def test_kv_cache_is_inference_only():
    # no gradient flows through the cache (as in PyTorch generation): with grad mode on,
    # attention refuses it and the cache stays untouched
    mha = nn.MultiHeadAttention(8, 2)
    x = tl.randn(1, 3, 8)
    cache = nn.KVCache(8)
    with pytest.raises(RuntimeError, match=r"KVCache is for inference only.*tl\.no_grad\(\)"):
        mha(x, kv_cache=cache)
    assert cache.length == 0 and cache.k is None
    with tl.no_grad():
        y = mha(x, kv_cache=cache)
    assert not y.requires_grad and cache.length == 3 and cache.k.shape == (1, 2, 8, 4)
    with pytest.raises(ValueError, match="max_len must be a positive int, got 0"):
        nn.KVCache(0)


def test_feedforward_and_blocks(rng):
    params_check(nn.FeedForward(6, 12), (2, 3, 6), rng)
    params_check(nn.FeedForward(6, 12, activation="silu", bias=False), (2, 3, 6), rng)
    params_check(nn.TransformerBlock(8, 2, norm_first=True), (2, 4, 8), rng)
    params_check(nn.TransformerBlock(8, 2, norm_first=False), (2, 4, 8), rng)
    params_check(nn.TransformerBlock(8, 2, norm="rmsnorm", activation="gelu",
                                     rotary=nn.RotaryEmbedding(4, 8)), (1, 4, 8), rng)


@pytest.mark.parametrize("norm_first", [True, False])
def test_block_dropout_is_seeded_and_gradient_checked(rng, norm_first):
    # element by element, every parameter: dropout on the attention weights, after the
    # attention projection and after the MLP, the same masks in every evaluation
    blk = nn.TransformerBlock(8, 2, d_ff=8, dropout=0.2, norm_first=norm_first).double()
    with tl.no_grad():  # norm weights away from 1 and biases away from 0
        for p in blk.parameters():
            p.data[...] += rng.standard_normal(p.shape) * 0.3
    x = tl.tensor(rng.standard_normal((1, 4, 8)), requires_grad=True)

    def f(x, *ps):
        tl.manual_seed(123)  # the same dropout masks on every evaluation
        return blk(x)
    np.testing.assert_array_equal(f(x).numpy(), f(x).numpy())
    assert tl.gradcheck(f, [x] + list(blk.parameters()))
    blk.eval()
    y = blk(x).numpy()
    np.testing.assert_array_equal(y, blk(x).numpy())
    blk.train()
    assert not np.allclose(y, f(x).numpy())              # the masks do drop something


def test_post_ln_and_pre_ln_follow_their_formulas(rng):
    x = tl.tensor(rng.standard_normal((2, 4, 8)).astype(np.float32))
    post = nn.TransformerBlock(8, 2, norm_first=False)
    h = post.ln1(x + post.attn(x))
    np.testing.assert_allclose(post(x).numpy(), post.ln2(h + post.mlp(h)).numpy(), rtol=1e-6)
    pre = nn.TransformerBlock(8, 2, norm_first=True)
    h = x + pre.attn(pre.ln1(x))
    np.testing.assert_allclose(pre(x).numpy(), (h + pre.mlp(pre.ln2(h))).numpy(), rtol=1e-6)


def _values_and_grads(f, inputs):
    for p in inputs:
        p.grad = None
    y = f()
    y.backward(tl.tensor(np.random.default_rng(5).standard_normal(y.shape)))
    return [y.numpy().copy()] + [p.grad.numpy().copy() for p in inputs]


def _mask(rng, kind, shape=(2, 5)):
    b, t = shape
    if kind == "bool":
        m = rng.standard_normal((b, 1, t, t)) > -0.3      # per batch element
        m[..., 0] = True                                 # every query sees something
        return m
    if kind == "float":
        m = rng.standard_normal((1, 2, t, t))             # per head
        m[0, 1, 3, 1] = -np.inf
        return tl.tensor(m)
    if kind == "learned":                                # a learned bias, shared by the heads
        return tl.tensor(rng.standard_normal((t, t)), requires_grad=True)
    return None


@pytest.mark.parametrize("causal,rotary,mask,dropout", [
    (True, False, None, 0.0), (True, True, None, 0.0), (False, False, "bool", 0.0),
    (True, True, "float", 0.0), (False, True, "learned", 0.0), (True, False, "learned", 0.3),
    (True, True, "bool", 0.3), (False, False, None, 0.3)])
def test_mha_equals_composed_reference(rng, causal, rotary, mask, dropout):
    # the one attention path (packed qkv -> ops.SelfAttention -> proj) against the step by
    # step reference (split, heads, rotate, attend, merge), values and gradients (the learned
    # bias's too), the dropout masks fixed by the seed; then gradient-checked
    mha = nn.MultiHeadAttention(8, 2, dropout=dropout, causal=causal,
                                rotary=rope64() if rotary else None).double()
    x = tl.tensor(rng.standard_normal((2, 5, 8)), requires_grad=True)
    m = _mask(rng, mask)
    inputs = [x] + list(mha.parameters()) + ([m] if mask == "learned" else [])

    def fused(*_):
        tl.manual_seed(5)
        return mha(x, attn_mask=m)

    def ref(*_):
        tl.manual_seed(5)
        return R.multi_head_attention(mha, x, attn_mask=m)

    for a, b in zip(_values_and_grads(fused, inputs), _values_and_grads(ref, inputs)):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)
    if mask or dropout:
        assert not np.allclose(fused().numpy(), mha.eval()(x).numpy())
        mha.train()
    assert tl.gradcheck(fused, inputs)
