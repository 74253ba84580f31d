"""nn layers: Module mechanics, and every layer gradient-checked w.r.t. inputs and parameters."""
import numpy as np
import pytest

import nn
import tensorlite as tl
from nn import functional as F


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


@pytest.mark.parametrize("rotary", [False, True])
def test_kv_cache_gives_same_outputs_as_full_forward(rng, rotary):
    tl.manual_seed(3)
    rope = nn.RotaryEmbedding(4, max_len=16) if rotary else None
    blocks = [nn.TransformerBlock(8, 2, rotary=rope) for _ in range(2)]
    x = tl.tensor(rng.standard_normal((2, 7, 8)).astype(np.float32))

    def run(x, caches=None):
        for i, b in enumerate(blocks):
            x = b(x, kv_cache=caches[i] if caches else None)
        return x

    full = run(x).numpy()
    caches = [nn.KVCache(16) for _ in blocks]
    with tl.no_grad():
        parts = [run(x[:, :4], caches)] + [run(x[:, t:t + 1], caches) for t in range(4, 7)]
    inc = np.concatenate([p.numpy() for p in parts], axis=1)
    np.testing.assert_allclose(inc, full, rtol=1e-5, atol=1e-6)
    assert caches[0].length == 7
    with pytest.raises(ValueError, match="exceed max_len 16"):
        run(tl.randn(2, 10, 8), caches)


def test_kv_cache_path_is_gradient_checked(rng):
    mha = nn.MultiHeadAttention(8, 2, rotary=nn.RotaryEmbedding(4, 16)).double()
    x = tl.tensor(rng.standard_normal((1, 5, 8)), requires_grad=True)

    def f(x, *params):
        cache = nn.KVCache(8)
        a = mha(x[:, :3], kv_cache=cache)
        b = mha(x[:, 3:4], kv_cache=cache)
        c = mha(x[:, 4:], kv_cache=cache)
        return tl.cat([a, b, c], dim=1)

    assert tl.gradcheck(f, [x] + list(mha.parameters()))


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


@pytest.mark.parametrize("rotary,dropout", [(False, 0.0), (True, 0.0), (False, 0.3)])
def test_packed_attention_equals_step_by_step_path(rng, rotary, dropout):
    # the fused SelfAttention op (training path) against the general path it replaces
    mha = nn.MultiHeadAttention(8, 2, dropout=dropout,
                                rotary=nn.RotaryEmbedding(4, 16) if rotary else None).double()
    x = tl.tensor(rng.standard_normal((2, 5, 8)), requires_grad=True)
    params = [x] + list(mha.parameters())

    def fused(x, *ps):
        tl.manual_seed(5)
        return mha.proj(mha._packed_attention(mha.qkv(x)))

    def general(x, *ps):
        tl.manual_seed(5)
        return mha.proj(mha._attention(x))

    outs = []
    for f in (fused, general):
        for p in params:
            p.grad = None
        y = f(x)
        y.backward(tl.tensor(np.ones(y.shape)))
        outs.append([y.numpy().copy()] + [p.grad.numpy().copy() for p in params])
    for a, b in zip(*outs):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)
    if not dropout:
        assert tl.gradcheck(fused, params)
