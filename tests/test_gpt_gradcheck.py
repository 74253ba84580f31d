"""Every parameter tensor of the GPT, gradient-checked, for every variant the CLI offers.

Per parameter tensor p (the others held fixed): a few directional derivatives dL/dp . u, u
random, against central differences, to rtol 1e-6. A check that moves all parameters at once
lets a 1 % error in one small tensor (a LayerNorm bias) vanish in the sum; this one does not:
the planted-error tests below prove that it flags exactly the tensor whose gradient is off.

The parameters are randomised first: at GPT-2's init (norm weights 1, biases 0) a backward
that forgot to multiply by a norm weight, say, would pass.
"""
import numpy as np
import pytest

import nn
import tensorlite as tl
from gpt.model import GPT, GPTConfig
from tensorlite.ops import nn as ops

EPS, ATOL, RTOL = 1e-6, 1e-9, 1e-6

# (positional, norm_first, tie_weights, bias, dropout): six rows in which every option value
# appears and every pair of values of two options appears at least once
VARIANTS = [
    ("learned", True, True, True, 0.1),
    ("learned", False, False, False, 0.0),
    ("sinusoidal", True, False, False, 0.1),
    ("sinusoidal", False, True, True, 0.0),
    ("rope", True, True, False, 0.0),
    ("rope", False, False, True, 0.1),
]


def variant_id(v):
    pos, nf, tied, bias, drop = v
    return "-".join([pos, "preln" if nf else "postln", "tied" if tied else "untied",
                     "bias" if bias else "nobias", f"drop{drop}"])


def tiny_gpt(positional="learned", norm_first=True, tie_weights=True, bias=True, dropout=0.0):
    """n_layer 2, d_model 8, 2 heads, block 6, vocab 11, float64, parameters randomised."""
    tl.manual_seed(0)
    m = GPT(GPTConfig(vocab_size=11, block_size=6, n_layer=2, n_head=2, d_model=8,
                      positional=positional, norm_first=norm_first, tie_weights=tie_weights,
                      bias=bias, dropout=dropout)).double()
    rng = np.random.default_rng(42)
    norm_weights = {id(mod.weight) for mod in m.modules() if isinstance(mod, nn.LayerNorm)}
    with tl.no_grad():
        for p in m.parameters():
            p.data[...] = rng.standard_normal(p.shape) * 0.3 + (1.0 if id(p) in norm_weights else 0.0)
    return m


def batch():
    rng = np.random.default_rng(3)
    idx, tgt = rng.integers(0, 11, (2, 6)), rng.integers(0, 11, (2, 6))
    tgt[1, 2] = -100  # an ignored target
    return idx, tgt


def loss_of(model):
    idx, tgt = batch()

    def loss(*params):
        tl.manual_seed(7)  # the same dropout masks in every evaluation
        return model(idx, tgt)[1]
    return loss


def check_every_parameter(model, n_directions=2, only=None):
    """Directional gradcheck of each parameter tensor on its own; returns {name: message}
    of the tensors that fail (empty: all pass)."""
    loss = loss_of(model)
    failures = {}
    for k, (name, p) in enumerate(model.named_parameters()):
        if only is not None and name not in only:
            continue
        try:
            tl.gradcheck_directional(loss, [p], eps=EPS, atol=ATOL, rtol=RTOL, seed=k,
                                     n_directions=n_directions)
        except tl.GradcheckError as e:
            failures[name] = str(e)
    return failures


@pytest.mark.parametrize("variant", VARIANTS, ids=variant_id)
def test_every_gpt_parameter_gradchecked(variant):
    m = tiny_gpt(*variant)
    names = [n for n, _ in m.named_parameters()]
    pos, nf, tied, bias, drop = variant
    assert ("lm_head.weight" in names) != tied
    assert ("wpe.weight" in names) == (pos == "learned")
    assert ("ln_f.weight" in names) == nf and ("ln_f.bias" in names) == (nf and bias)
    assert any(n.endswith(".bias") for n in names) == bias
    assert check_every_parameter(m, n_directions=3) == {}
    if drop:  # the dropout masks are really there (and fixed by the seed)
        loss = loss_of(m)
        assert loss().item() == loss().item()
        assert loss().item() != m.eval()(*batch())[1].item()


def _planted(p, factor=1.01):
    return p.register_hook(lambda g: g * factor)


@pytest.mark.parametrize("name", ["blocks.1.ln1.bias", "ln_f.bias", "wpe.weight",
                                  "blocks.0.attn.proj.weight"])
def test_gpt_gradcheck_catches_1pct_error(name):
    m = tiny_gpt(dropout=0.1)
    params = dict(m.named_parameters())
    handle = _planted(params[name])
    assert set(check_every_parameter(m)) == {name}
    handle.remove()
    assert check_every_parameter(m, only={name}) == {}


def test_gpt_gradcheck_catches_1pct_error_in_layernorm_backward(monkeypatch):
    # a bug in the op, not in one tensor: every LayerNorm bias gradient 1 % too large
    m = tiny_gpt(norm_first=True, bias=True)
    backward = ops.LayerNorm.backward

    def wrong(self, g):
        gx, gw, gb = backward(self, g)
        return gx, gw, (gb * 1.01 if gb is not None else None)
    monkeypatch.setattr(ops.LayerNorm, "backward", wrong)
    ln_biases = {n for n, _ in m.named_parameters() if n.endswith("bias") and "ln" in n}
    assert len(ln_biases) == 5
    assert set(check_every_parameter(m)) == ln_biases


@pytest.mark.parametrize("variant", [VARIANTS[1], VARIANTS[5]], ids=variant_id)
def test_every_parameter_check_is_sensitive_to_1pct(variant):
    # a 1 % error in any single tensor's gradient fails its check: the tolerances are tight
    # enough for the smallest gradient of the model (one direction suffices to show it)
    m = tiny_gpt(*variant)
    loss = loss_of(m)
    for k, (name, p) in enumerate(m.named_parameters()):
        handle = _planted(p)
        caught = not tl.gradcheck_directional(loss, [p], eps=EPS, atol=ATOL, rtol=RTOL, seed=k,
                                              n_directions=1, raise_exception=False)
        handle.remove()
        assert caught, f"a 1 % error in the gradient of {name} passes the check"
