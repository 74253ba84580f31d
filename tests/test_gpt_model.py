"""The GPT model: shapes, loss, initialisation, gradients, and generation with the KV cache."""
import math

import numpy as np
import pytest

import tensorlite as tl
from gpt.model import GPT, ConfigError, GPTConfig, preset, sample_next


def tiny(**kw):
    cfg = dict(vocab_size=11, block_size=12, n_layer=2, n_head=2, d_model=8)
    cfg.update(kw)
    return GPT(GPTConfig(**cfg))


def test_presets():
    t = preset("tiny", vocab_size=256)
    assert (t.n_layer, t.n_head, t.d_model, t.block_size) == (4, 4, 128, 128)
    s = preset("small", vocab_size=4096)
    assert (s.n_layer, s.n_head, s.d_model, s.block_size) == (6, 6, 384, 256)
    with pytest.raises(ConfigError, match="unknown preset 'huge'"):
        preset("huge")
    with pytest.raises(ConfigError, match="d_model 10 is not divisible by n_head 4"):
        GPTConfig(d_model=10, n_head=4)
    with pytest.raises(ConfigError, match="positional must be one of"):
        GPTConfig(positional="alibi")


@pytest.mark.parametrize("positional", ["learned", "sinusoidal", "rope"])
@pytest.mark.parametrize("norm_first", [True, False])
def test_forward_shapes_and_initial_loss(rng, positional, norm_first):
    tl.manual_seed(0)
    m = tiny(positional=positional, norm_first=norm_first, vocab_size=50, d_model=16)
    idx = rng.integers(0, 50, (3, 7))
    tgt = rng.integers(0, 50, (3, 7))
    logits, loss = m(idx, tgt)
    assert logits.shape == (3, 7, 50) and logits.dtype == tl.float32
    # small init -> near-uniform predictions -> loss close to log(V)
    assert abs(loss.item() - math.log(50)) < 0.3
    assert m(idx)[1] is None


def test_tied_weights_and_parameter_count():
    m = tiny()
    names = [n for n, _ in m.named_parameters()]
    assert "lm_head.weight" not in " ".join(names)
    c = m.config
    per_block = (2 * c.d_model                          # ln1
                 + 3 * c.d_model * c.d_model + 3 * c.d_model  # qkv
                 + c.d_model * c.d_model + c.d_model          # attn proj
                 + 2 * c.d_model                              # ln2
                 + 4 * c.d_model * c.d_model + 4 * c.d_model  # fc
                 + 4 * c.d_model * c.d_model + c.d_model)     # mlp proj
    expect = c.vocab_size * c.d_model + c.block_size * c.d_model + c.n_layer * per_block + 2 * c.d_model
    assert m.num_parameters() == expect
    assert m.num_parameters(non_embedding=True) == expect - c.block_size * c.d_model
    assert m.flops_per_token() == 6 * (expect - c.block_size * c.d_model) + 12 * 2 * 12 * 8
    untied = tiny(tie_weights=False)
    assert untied.num_parameters() == expect + c.vocab_size * c.d_model


def test_gpt2_initialisation_scales_residual_projections():
    tl.manual_seed(0)
    m = GPT(GPTConfig(vocab_size=64, block_size=16, n_layer=8, n_head=4, d_model=64))
    std_proj = m.blocks[0].mlp.proj.weight.numpy().std()
    std_fc = m.blocks[0].mlp.fc.weight.numpy().std()
    assert abs(std_fc - 0.02) < 0.002
    assert abs(std_proj - 0.02 / math.sqrt(16)) < 0.001
    assert np.all(m.blocks[0].ln1.weight.numpy() == 1) and np.all(m.blocks[0].attn.qkv.bias.numpy() == 0)


def test_every_parameter_receives_a_gradient(rng):
    # (the gradients' values are checked per parameter tensor in test_gpt_gradcheck.py)
    tl.manual_seed(1)
    m = tiny(dropout=0.1).double()
    idx, tgt = rng.integers(0, 11, (2, 5)), rng.integers(0, 11, (2, 5))
    m(idx, tgt)[1].backward()
    # the tied embedding receives a gradient from both of its uses
    assert all(p.grad is not None and np.abs(p.grad.numpy()).sum() > 0 for p in m.parameters())


@pytest.mark.parametrize("positional", ["learned", "rope", "sinusoidal"])
def test_cached_generation_equals_recomputation(rng, positional):
    tl.manual_seed(2)
    m = tiny(positional=positional, vocab_size=31, d_model=16)
    prompt = rng.integers(0, 31, (2, 4))
    # 20 new tokens run past block_size (12): the window slides and both paths crop the same way
    for kw in (dict(temperature=0), dict(temperature=1.0, top_k=5, seed=3),
               dict(temperature=0.7, top_p=0.8, seed=4)):
        a = m.generate(prompt, 20, use_cache=True, **kw)
        b = m.generate(prompt, 20, use_cache=False, **kw)
        np.testing.assert_array_equal(a, b)
        assert a.shape == (2, 24)
        np.testing.assert_array_equal(a[:, :4], prompt)


@pytest.mark.parametrize("positional", ["learned", "rope", "sinusoidal"])
@pytest.mark.parametrize("norm_first", [True, False])
def test_cached_logits_equal_full_forward(rng, positional, norm_first):
    # a prompt of 5 then one token at a time through the KV caches: the logits at every
    # position equal one forward over all 9 (float64 rounding), and so do the greedy tokens
    tl.manual_seed(3)
    m = tiny(vocab_size=17, positional=positional, norm_first=norm_first).double().eval()
    idx = rng.integers(0, 17, (2, 9))
    full = m(idx)[0].numpy()
    caches = m.new_kv_caches()
    with tl.no_grad():
        steps = [m(idx[:, :5], kv_caches=caches)[0].numpy()]
        steps += [m(idx[:, t:t + 1], kv_caches=caches)[0].numpy() for t in range(5, 9)]
    cached = np.concatenate(steps, 1)
    np.testing.assert_allclose(cached, full, rtol=1e-12, atol=1e-13)
    np.testing.assert_array_equal(cached.argmax(-1), full.argmax(-1))
    assert [c.length for c in caches] == [9, 9]
    # greedy generation: the cached and the recomputing paths pick the same tokens
    a = m.generate(idx[:, :3], 9, temperature=0, use_cache=True)
    np.testing.assert_array_equal(a, m.generate(idx[:, :3], 9, temperature=0, use_cache=False))


def test_kv_caches_are_inference_only(rng):
    m = tiny()
    idx = rng.integers(0, 11, (1, 4))
    caches = m.new_kv_caches()
    with pytest.raises(RuntimeError, match=r"KVCache is for inference only.*tl\.no_grad\(\)"):
        m(idx, kv_caches=caches)
    assert caches[0].length == 0
    with pytest.raises(ValueError, match="1 KV caches for 2 blocks"):
        m(idx, kv_caches=caches[:1])
    with tl.no_grad():
        assert m(idx, kv_caches=caches)[0].shape == (1, 4, 11)
        with pytest.raises(ValueError, match="13 positions exceed block_size 12"):
            m(np.zeros((1, 9), np.int64), kv_caches=caches)


def test_sampling_rules():
    rng = np.random.default_rng(0)
    logits = np.log(np.array([[0.5, 0.3, 0.15, 0.05]]))
    assert sample_next(logits, 0, None, None, rng)[0] == 0
    draws = [sample_next(logits, 1.0, 2, None, rng)[0] for _ in range(300)]
    assert set(draws) == {0, 1}                       # top-k = 2 keeps the two likeliest
    assert abs(np.mean(np.array(draws) == 0) - 0.5 / 0.8) < 0.08
    draws = [sample_next(logits, 1.0, None, 0.75, rng)[0] for _ in range(300)]
    assert set(draws) == {0, 1}                       # 0.5 + 0.3 reaches 0.75
    draws = [sample_next(logits, 1.0, None, 0.5, rng)[0] for _ in range(50)]
    assert set(draws) == {0}
    m = tiny()
    with pytest.raises(ValueError, match="temperature must be >= 0"):
        m.generate([[1]], 2, temperature=-1)
    with pytest.raises(ValueError, match="top_p must be in"):
        m.generate([[1]], 2, top_p=1.5)


def test_input_errors():
    m = tiny()
    with pytest.raises(ValueError, match="13 positions exceed block_size 12"):
        m(np.zeros((1, 13), dtype=np.int64))
    with pytest.raises(ValueError, match=r"idx must be \(batch, time\)"):
        m(np.zeros(5, dtype=np.int64))
    with pytest.raises(IndexError, match="index 11 is out of range for a table of 11 rows"):
        m(np.full((1, 3), 11))
