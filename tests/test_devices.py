"""Every layer on every device: gradcheck (float64) on the device, the fused op against its
composed reference (nn/reference.py), and the device's values and gradients against the
CPU's from the same inputs (float64: to rounding; float32: to float32 summation-order noise).

``device`` is "cpu" always and "cuda" when CuPy and a GPU are usable; without them the cuda
half is skipped with the reason (tests/conftest.py skips items marked ``gpu``). The cuda
half is written against the CPU: each check builds the same layer from the same seed on the
CPU and on the device (tensorlite draws random numbers on the host, so the weights are the
same), moves the same input arrays with ``tl.tensor(..., device=)`` / ``Module.to(device)``,
and compares. On the CPU the device-vs-CPU comparison is the CPU against itself (it must be
exactly equal: the ops are deterministic); the gradchecks and reference checks are the
substance there.
"""
import math

import numpy as np
import pytest

import nn
import tensorlite as tl
from gpt.model import GPT, GPTConfig
from nn import functional as F
from nn import reference as R
from tensorlite import backend
from tensorlite.ops import nn as ops

DEVICES = [pytest.param("cpu", id="cpu"),
           pytest.param("cuda", id="cuda", marks=pytest.mark.gpu)]


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


def _devstr(device):
    return "cpu" if device == "cpu" else "cuda:0"


# float64: the device and the CPU may sum in other orders (cuBLAS vs OpenBLAS), ~1e-15
# relative per operation; float32: ~1e-7 per operation, amplified by the few layers here.
TOL = {tl.float64: dict(rtol=1e-9, atol=1e-11), tl.float32: dict(rtol=2e-4, atol=2e-5)}
REF_TOL = dict(rtol=1e-8, atol=1e-10)     # fused vs composed, float64 on the CPU


def _np(t):
    return np.array(backend.to_numpy(t.data if isinstance(t, tl.Tensor) else t))


def _close(got, want, dtype, what=""):
    np.testing.assert_allclose(_np(got), _np(want), err_msg=what, **TOL[dtype])


def _inputs(arrays, device, dtype):
    """Float arrays -> tensors of ``dtype`` that require grad; int arrays -> id tensors."""
    # copies: tl.tensor shares a NumPy array's memory, and gradcheck perturbs in place
    return [tl.tensor(a.copy(), dtype=dtype, device=device, requires_grad=True)
            if a.dtype.kind == "f" else tl.tensor(a.copy(), device=device) for a in arrays]


def _run(make, arrays, device, dtype, which="fn"):
    """Build the layer on ``device`` (seed 0), apply ``which`` ("fn" or "ref") to the inputs,
    backward a fixed random weighting of the output -> (output, [input grads, param grads])."""
    tl.manual_seed(0)
    built = make(device, dtype)
    xs = _inputs(arrays, device, dtype)
    out = built[which](*xs)
    assert out.device == _devstr(device), f"output on {out.device}, expected {device}"
    assert out.dtype == dtype, f"{dtype} in, {out.dtype} out"
    w = np.random.default_rng(1).standard_normal(out.shape)
    out.backward(tl.tensor(w, dtype=out.dtype, device=out.device))
    leaves = [t for t in xs + list(built.get("params", [])) if t.requires_grad]
    return _np(out), [_np(t.grad) if t.grad is not None else None for t in leaves]


def check_layer(make, arrays, device, ref=True, gradcheck=True, dtypes=(tl.float64, tl.float32),
                directional=False):
    """``make(device, dtype)`` -> {"fn": f(*inputs), "ref": composed f (CPU), "params": [...]}.

    1. on the device, each dtype: values and gradients equal the CPU's from the same inputs;
    2. on the CPU, float64: the fused fn equals its composed reference (values, gradients);
    3. on the device, float64: gradcheck of fn w.r.t. the float inputs and the parameters.
    """
    for dt in dtypes:
        oc, gc = _run(make, arrays, "cpu", dt)
        od, gd = _run(make, arrays, device, dt)
        _close(od, oc, dt, f"{device} output vs cpu ({dt})")
        assert len(gd) == len(gc)
        for i, (a, b) in enumerate(zip(gd, gc)):
            assert (a is None) == (b is None)
            if a is not None:
                _close(a, b, dt, f"{device} grad {i} vs cpu ({dt})")
    if ref:
        oc, gc = _run(make, arrays, "cpu", tl.float64)
        orf, grf = _run(make, arrays, "cpu", tl.float64, "ref")
        np.testing.assert_allclose(oc, orf, err_msg="fused vs reference", **REF_TOL)
        for i, (a, b) in enumerate(zip(gc, grf)):
            np.testing.assert_allclose(a, b, err_msg=f"fused vs reference grad {i}", **REF_TOL)
    if gradcheck:
        tl.manual_seed(0)
        built = make(device, tl.float64)
        xs = _inputs(arrays, device, tl.float64)
        params = [p for p in built.get("params", []) if p.requires_grad]
        n = len(xs)
        check = tl.gradcheck_directional if directional else tl.gradcheck
        assert check(lambda *a: built["fn"](*a[:n]), xs + params)


def _rng(seed=0):
    return np.random.default_rng(seed)


# ---------------------------------------------------------------------------------- layers
def test_linear(device):
    def make(dev, dt):
        m = nn.Linear(5, 4).to(dev, dt)
        return {"fn": m, "ref": lambda x: R.linear(x, m.weight, m.bias),
                "params": list(m.parameters())}
    check_layer(make, [_rng().standard_normal((2, 3, 5))], device)


def test_layer_norm(device):
    def make(dev, dt):
        m = nn.LayerNorm(6).to(dev, dt)
        with tl.no_grad():     # non-trivial gain and shift
            m.weight.copy_(tl.tensor(_rng(2).standard_normal(6) + 1, dtype=dt))
            m.bias.copy_(tl.tensor(_rng(3).standard_normal(6), dtype=dt))
        return {"fn": m, "ref": lambda x: R.layer_norm(x, m.weight, m.bias),
                "params": list(m.parameters())}
    check_layer(make, [_rng().standard_normal((3, 4, 6)) * 2 + 0.5], device)


@pytest.mark.parametrize("approximate", ["tanh", "none"])
def test_gelu(device, approximate):
    ref = R.gelu_tanh if approximate == "tanh" else R.gelu

    def make(dev, dt):
        return {"fn": lambda x: F.gelu(x, approximate), "ref": ref}
    x = np.concatenate([_rng().standard_normal(30) * 3, [-8.0, -4.0, 0.0, 4.0, 8.0]])
    check_layer(make, [x.reshape(5, 7)], device)


def test_log_sigmoid(device):
    def make(dev, dt):
        return {"fn": lambda x: x.log_sigmoid(),
                "ref": lambda x: -((-x).exp() + 1.0).log()}   # fine for |x| < 30
    check_layer(make, [_rng().standard_normal((4, 5)) * 4], device)
    # no overflow or log(0) at the extremes, on the device
    x = tl.tensor([-1000.0, -50.0, 0.0, 50.0, 1000.0], dtype=tl.float64, device=device,
                  requires_grad=True)
    y = x.log_sigmoid()
    y.sum().backward()
    np.testing.assert_allclose(_np(y), [-1000.0, -50.0, -math.log(2), -math.exp(-50), 0.0],
                               rtol=1e-12, atol=0)
    np.testing.assert_allclose(_np(x.grad), [1.0, 1.0, 0.5, math.exp(-50), 0.0], rtol=1e-12,
                               atol=0)


@pytest.mark.parametrize("ignore_index", [-100, 2])
def test_cross_entropy_ignore_index(device, ignore_index):
    t = np.array([0, 3, -100, 1, 2, 4, 2, 0])
    if ignore_index != -100:
        t[2] = 1

    def make(dev, dt):
        tt = tl.tensor(t, device=dev)
        return {"fn": lambda x: F.cross_entropy(x, tt, ignore_index=ignore_index),
                "ref": lambda x: R.cross_entropy(x, t, ignore_index=ignore_index)}
    check_layer(make, [_rng().standard_normal((8, 5)) * 2], device)


def test_embedding(device):
    ids = _rng().integers(0, 10, (3, 30))          # 90 ids > 64: the sorted-sum scatter path
    ids[0, :5] = 7                                 # repeated ids accumulate

    def make(dev, dt):
        m = nn.Embedding(10, 4).to(dev, dt)
        onehot = np.eye(10)[ids]
        return {"fn": lambda i: m(i), "ref": lambda i: tl.tensor(onehot, dtype=dt) @ m.weight,
                "params": list(m.parameters())}
    check_layer(make, [ids], device)


def test_rope(device):
    def make(dev, dt):
        rope = nn.RotaryEmbedding(8, max_len=16, dtype=dt).to(dev)
        return {"fn": lambda x: rope(x, offset=3),
                "ref": lambda x: R.rotary(x, *R.rotary_tables(5, 8, offset=3))}
    check_layer(make, [_rng().standard_normal((2, 3, 5, 8))], device)


# ------------------------------------------------------------------------------- attention
def _mask(b, t, tk=None):
    """A bool mask (B, 1, T, Tk), True = may attend; the diagonal always allowed."""
    tk = tk or t
    m = _rng(5).random((b, 1, t, tk)) < 0.7
    m[..., np.arange(t), np.arange(t) + tk - t] = True
    return m


@pytest.mark.parametrize("rotary", [False, True], ids=["learned", "rope"])
def test_multi_head_attention_causal_with_mask(device, rotary):
    b, t, c, h = 2, 5, 8, 2
    mask = _mask(b, t)

    def make(dev, dt):
        rope = nn.RotaryEmbedding(c // h, max_len=16, dtype=dt) if rotary else None
        m = nn.MultiHeadAttention(c, h, rotary=rope).to(dev, dt)
        dmask = tl.tensor(mask, device=dev)
        return {"fn": lambda x: m(x, attn_mask=dmask),
                "ref": lambda x: R.multi_head_attention(m, x, attn_mask=mask),
                "params": list(m.parameters())}
    check_layer(make, [_rng().standard_normal((b, t, c))], device, directional=True)


def test_packed_self_attention_op(device):
    """ops.SelfAttention (the packed-qkv op) with rotary tables, causal, and a float mask."""
    b, t, h, d = 2, 4, 2, 4
    cos, sin = R.rotary_tables(t, d)
    fmask = _rng(7).standard_normal((b, 1, t, t))

    def make(dev, dt):
        cs = [tl.tensor(a, dtype=dt, device=dev).data for a in (cos, sin)]
        mk = tl.tensor(fmask, dtype=dt, device=dev).data
        return {"fn": lambda qkv: ops.SelfAttention.apply(qkv, mk, n_head=h, is_causal=True,
                                                          cos=cs[0], sin=cs[1]),
                "ref": lambda qkv: R.self_attention(qkv, h, True, cos, sin,
                                                    mask=tl.tensor(fmask, dtype=dt))}
    check_layer(make, [_rng().standard_normal((b, t, 3 * h * d))], device)


def test_scaled_dot_product_attention(device):
    """The unpacked fused op: q, k, v (B, H, T, D), causal with more keys than queries
    (cached decoding), plus a bool mask."""
    mask = _mask(2, 3, 5)

    def make(dev, dt):
        dm = tl.tensor(mask, device=dev)
        return {"fn": lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=dm,
                                                                     is_causal=True),
                "ref": lambda q, k, v: R.attention(q, k, v, mask=mask, is_causal=True)}
    r = _rng()
    check_layer(make, [r.standard_normal((2, 2, 3, 4)), r.standard_normal((2, 2, 5, 4)),
                       r.standard_normal((2, 2, 5, 4))], device)


# -------------------------------------------------------------------------------- KV cache
CFG = dict(vocab_size=40, block_size=16, n_layer=2, n_head=2, d_model=16)


@pytest.mark.parametrize("positional", ["learned", "rope"])
def test_kv_cache_equals_uncached(device, positional):
    """Cached decoding gives the uncached logits and tokens, on the device, and the device's
    tokens are the CPU's (float64, so greedy ties cannot flip on rounding)."""
    def model_on(dev):
        tl.manual_seed(0)
        return GPT(GPTConfig(**CFG, positional=positional)).to(dev, tl.float64).eval()

    m = model_on(device)
    ids = _rng().integers(0, CFG["vocab_size"], (2, 9))
    with tl.no_grad():
        full, _ = m(ids)                                    # (B, 9, V)
        caches = m.new_kv_caches()
        first, _ = m(ids[:, :5], kv_caches=caches)
        steps = [first] + [m(ids[:, i:i + 1], kv_caches=caches)[0] for i in range(5, 9)]
    inc = np.concatenate([_np(s) for s in steps], axis=1)
    np.testing.assert_allclose(inc, _np(full), rtol=1e-10, atol=1e-12)
    prompt = ids[:, :3]
    cached = m.generate(prompt, 10, temperature=0, use_cache=True)
    uncached = m.generate(prompt, 10, temperature=0, use_cache=False)
    np.testing.assert_array_equal(cached, uncached)
    np.testing.assert_array_equal(cached, model_on("cpu").generate(prompt, 10, temperature=0))
    with tl.no_grad():
        np.testing.assert_allclose(_np(full), _np(model_on("cpu")(ids)[0]), **TOL[tl.float64])


# ------------------------------------------------------------------------------ optimizers
@pytest.mark.parametrize("dtype", [tl.float64, tl.float32], ids=["f64", "f32"])
def test_adamw_step(device, dtype):
    """Three AdamW steps (two groups, decay on one) give the CPU's weights and moments."""
    r = _rng()
    shapes = [(4, 3), (3,), (2, 2, 2)]
    ws = [r.standard_normal(s) for s in shapes]
    gs = [[r.standard_normal(s) for s in shapes] for _ in range(3)]

    def run(dev):
        ps = [nn.Parameter(tl.tensor(w.copy(), dtype=dtype, device=dev)) for w in ws]
        opt = nn.AdamW([{"params": ps[:2], "weight_decay": 0.1},
                        {"params": ps[2:], "weight_decay": 0.0}], lr=0.01)
        for step in gs:
            for p, g in zip(ps, step):
                p.grad = tl.tensor(g.copy(), dtype=dtype, device=dev)
            opt.step()
        state = [opt.state[p] for p in ps]
        for p, s in zip(ps, state):
            assert p.dtype == dtype and s["exp_avg"].dtype == dtype
            assert backend.device_of(s["exp_avg_sq"]) == _devstr(dev)
        return [_np(p) for p in ps] + [_np(s["exp_avg"]) for s in state] + \
            [_np(s["exp_avg_sq"]) for s in state]

    for a, b in zip(run(device), run("cpu")):
        _close(a, b, dtype)
    # and the update is Adam's: one step by hand (float64, first step: m/sqrt(v) = sign(g))
    if dtype == tl.float64:
        p = nn.Parameter(tl.tensor(ws[0].copy(), dtype=dtype, device=device))
        p.grad = tl.tensor(gs[0][0].copy(), dtype=dtype, device=device)
        nn.AdamW([p], lr=0.01, weight_decay=0.1, eps=0.0).step()
        want = ws[0] * (1 - 0.01 * 0.1) - 0.01 * np.sign(gs[0][0])
        np.testing.assert_allclose(_np(p), want, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("norm_type", [2.0, math.inf, 1.5])
def test_clip_grad_norm(device, norm_type):
    r = _rng()
    grads = [r.standard_normal(s) * 3 for s in [(5, 4), (7,), (2, 3)]]

    def run(dev):
        ps = [nn.Parameter(tl.zeros(*g.shape, dtype=tl.float64, device=dev)) for g in grads]
        for p, g in zip(ps, grads):
            p.grad = tl.tensor(g.copy(), device=dev)     # clipping scales it in place
        total = nn.clip_grad_norm_(ps, 1.0, norm_type=norm_type)
        return total, [_np(p.grad) for p in ps]

    total, clipped = run(device)
    flat = np.concatenate([g.ravel() for g in grads])
    want = np.abs(flat).max() if norm_type == math.inf else \
        (np.abs(flat) ** norm_type).sum() ** (1 / norm_type)
    assert total == pytest.approx(want, rel=1e-12)
    for c, g in zip(clipped, grads):
        np.testing.assert_allclose(c, g * (1.0 / (want + 1e-6)), rtol=1e-12)
    total_cpu, clipped_cpu = run("cpu")
    assert total == pytest.approx(total_cpu, rel=1e-12)
    for a, b in zip(clipped, clipped_cpu):
        _close(a, b, tl.float64)
    # a non-finite gradient is named, on the device too
    p = nn.Parameter(tl.zeros(3, dtype=tl.float64, device=device))
    p.grad = tl.tensor([1.0, np.inf, 0.0], dtype=tl.float64, device=device)
    with pytest.raises(RuntimeError, match="non-finite"):
        nn.clip_grad_norm_([p], 1.0, error_if_nonfinite=True)


# -------------------------------------------------------------------------------- dropout
@pytest.mark.parametrize("p", [0.1, 0.5])
def test_dropout_statistics(device, p):
    """Inverted dropout on the device: a fraction p of zeros (within 6 standard errors of a
    binomial over 2e5 draws: 6 * sqrt(p(1-p)/n) <= 0.0068), the rest scaled by 1/(1-p) exactly,
    the mean kept, and the backward zeroing the same elements. The identity in eval mode."""
    n = 200_000
    x = tl.ones(n, dtype=tl.float32, device=device, requires_grad=True)
    y = F.dropout(x, p)
    assert y.device == _devstr(device) and y.dtype == tl.float32
    v = _np(y)
    zero = v == 0
    assert abs(zero.mean() - p) < 6 * math.sqrt(p * (1 - p) / n)
    np.testing.assert_array_equal(v[~zero], np.float32(1.0 / (1.0 - p)))
    assert abs(v.mean() - 1.0) < 6 * math.sqrt(p / (1 - p) / n)
    y.sum().backward()
    np.testing.assert_array_equal(_np(x.grad), v)          # d(sum)/dx = the scaled mask
    drop = nn.Dropout(p).to(device).eval()
    assert drop(x) is x
    # two draws differ (a fresh mask each call)
    assert (_np(F.dropout(x, p)) != v).any()


# ------------------------------------------------------------------------------ a tiny GPT
@pytest.mark.parametrize("dtype", [tl.float64, tl.float32], ids=["f64", "f32"])
def test_gpt_forward_backward_adamw_step(device, dtype):
    """The whole model: loss, every gradient, and the weights after one AdamW step (and the
    loss after it) on the device equal the CPU's."""
    ids = _rng().integers(0, CFG["vocab_size"], (2, 9))

    def run(dev):
        tl.manual_seed(0)
        m = GPT(GPTConfig(**CFG)).to(dev, dtype)
        # eps 1e-4, not 1e-8: Adam's first step is lr * g / (|g| + eps), a sign function of
        # g at eps -> 0, so a gradient at rounding-noise level could flip it by 2 lr between
        # devices; with eps 1e-4 the step moves at most lr / eps = 100x a gradient's difference
        opt = nn.AdamW(m.parameters(), lr=1e-2, eps=1e-4)
        x, y = tl.tensor(ids[:, :-1], device=dev), tl.tensor(ids[:, 1:], device=dev)
        logits, loss = m(x, y)
        assert logits.dtype == dtype and logits.device == _devstr(dev)
        loss.backward()
        grads = {n: _np(p.grad) for n, p in m.named_parameters()}
        opt.step()
        after = m(x, y)[1].item()
        return loss.item(), grads, {n: _np(p) for n, p in m.named_parameters()}, after

    ld, gd, wd, ad = run(device)
    lc, gc, wc, ac = run("cpu")
    tol = TOL[dtype]
    assert ld == pytest.approx(lc, rel=tol["rtol"]) and ad == pytest.approx(ac, rel=tol["rtol"])
    assert ad < ld                                          # the step helped
    for n in gc:
        _close(gd[n], gc[n], dtype, f"grad {n}")
        _close(wd[n], wc[n], dtype, f"weight {n}")


def test_gpt_gradcheck_on_device(device):
    """The loss of a tiny GPT (rope, so both attention paths' rotations are in it) against
    central differences along random directions of all the parameters, on the device."""
    tl.manual_seed(0)
    m = GPT(GPTConfig(**CFG, positional="rope")).to(device, tl.float64)
    ids = _rng().integers(0, CFG["vocab_size"], (2, 7))
    x, y = tl.tensor(ids[:, :-1], device=device), tl.tensor(ids[:, 1:], device=device)
    assert tl.gradcheck_directional(lambda *ps: m(x, y)[1], list(m.parameters()),
                                    n_directions=3)


def test_cuda_request_without_gpu_is_a_clear_error():
    """Without a GPU, asking for one names the reason (the skip reason above, too)."""
    if tl.cuda_available():
        pytest.skip("a GPU is available here")
    with pytest.raises(RuntimeError, match="use device='cpu'"):
        tl.zeros(2, device="cuda")
    assert tl.cuda_unavailable_reason()
