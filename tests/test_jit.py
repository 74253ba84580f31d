"""The opt-in numba kernels (tensorlite/jit.py) against the NumPy code they replace.

Skipped without numba (``pip install 'tensorlite[jit]'``); CI installs it."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import tensorlite as tl
from tensorlite import jit

ROOT = Path(__file__).resolve().parents[1]
needs_numba = pytest.mark.skipif(not jit.available(), reason="numba is not installed "
                                 "(pip install 'tensorlite[jit]')")


@pytest.fixture
def jit_on():
    before = jit._enabled
    jit.enable(True)
    yield
    jit._enabled = before


def _both(fn):
    """fn() with the kernels off, then on."""
    before = jit._enabled
    try:
        jit._enabled = False
        a = fn()
        jit.enable(True)
        b = fn()
    finally:
        jit._enabled = before
    return a, b


def _layer_norm_run(dtype, shape, affine):
    rng = np.random.default_rng(0)
    x = tl.tensor(rng.standard_normal(shape) * 3 + 1, dtype=dtype, requires_grad=True)
    c = shape[-1]
    ln = tl.tensor(rng.standard_normal(c), dtype=dtype, requires_grad=True) if affine else None
    lb = tl.tensor(rng.standard_normal(c), dtype=dtype, requires_grad=True) if affine else None
    from nn import functional as F
    y = F.layer_norm(x, (c,), ln, lb)
    g = tl.tensor(rng.standard_normal(shape), dtype=dtype)
    y.backward(g)
    grads = [t.grad.numpy().copy() for t in (x, ln, lb) if t is not None]
    return [y.detach().numpy().copy()] + grads


@needs_numba
@pytest.mark.parametrize("dtype,tol", [(tl.float64, 1e-12), (tl.float32, 2e-5)])
@pytest.mark.parametrize("shape", [(5, 7), (3, 300, 128), (2100, 64)])   # one block, many, 2 threads
@pytest.mark.parametrize("affine", [True, False])
def test_layer_norm_kernels_equal_numpy(dtype, tol, shape, affine):
    ref, got = _both(lambda: _layer_norm_run(dtype, shape, affine))
    for r, g in zip(ref, got):
        np.testing.assert_allclose(g, r, rtol=tol, atol=tol * np.abs(r).max())


@needs_numba
def test_layer_norm_gradcheck_with_the_kernels(jit_on):
    from nn import functional as F
    rng = np.random.default_rng(1)
    x = tl.tensor(rng.standard_normal((4, 9)), dtype=tl.float64, requires_grad=True)
    w = tl.tensor(rng.standard_normal(9), dtype=tl.float64, requires_grad=True)
    b = tl.tensor(rng.standard_normal(9), dtype=tl.float64, requires_grad=True)
    assert tl.gradcheck(lambda x, w, b: F.layer_norm(x, (9,), w, b), (x, w, b), atol=1e-8, rtol=1e-7)


def _attention_run(dtype, causal, t_q, t_k):
    from nn import functional as F
    rng = np.random.default_rng(2)
    q = tl.tensor(rng.standard_normal((2, 3, t_q, 8)), dtype=dtype, requires_grad=True)
    k = tl.tensor(rng.standard_normal((2, 3, t_k, 8)), dtype=dtype, requires_grad=True)
    v = tl.tensor(rng.standard_normal((2, 3, t_k, 8)), dtype=dtype, requires_grad=True)
    out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    out.backward(tl.tensor(rng.standard_normal(out.shape), dtype=dtype))
    return [out.detach().numpy().copy()] + [t.grad.numpy().copy() for t in (q, k, v)]


@needs_numba
@pytest.mark.parametrize("dtype,tol", [(tl.float64, 1e-12), (tl.float32, 2e-5)])
@pytest.mark.parametrize("causal,t_q,t_k", [(True, 16, 16), (False, 16, 16), (False, 1, 9),
                                            (True, 5, 5)])
def test_attention_softmax_backward_kernel_equals_numpy(dtype, tol, causal, t_q, t_k):
    ref, got = _both(lambda: _attention_run(dtype, causal, t_q, t_k))
    for r, g in zip(ref, got):
        np.testing.assert_allclose(g, r, rtol=tol, atol=tol * np.abs(r).max())


@needs_numba
def test_gpt_training_steps_match_with_and_without_the_kernels():
    from gpt.model import GPT, GPTConfig
    from nn.optim import AdamW

    def steps():
        tl.manual_seed(0)
        m = GPT(GPTConfig(vocab_size=65, n_layer=2, n_head=4, d_model=64, block_size=32))
        m.to(tl.float64)
        opt = AdamW(m.parameters(), lr=1e-3)
        rng = np.random.default_rng(0)
        losses = []
        for _ in range(3):
            x = tl.tensor(rng.integers(0, 65, (4, 32)))
            y = tl.tensor(rng.integers(0, 65, (4, 32)))
            _, loss = m(x, y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        return losses, [p.detach().numpy().copy() for p in m.parameters()]
    (l0, p0), (l1, p1) = _both(steps)
    np.testing.assert_allclose(l1, l0, rtol=1e-12)
    for a, b in zip(p0, p1):
        np.testing.assert_allclose(b, a, rtol=1e-10, atol=1e-12)


def _jit_state_in_a_subprocess(env_value, hide_numba=False):
    code = ("import sys\n"
            + ("sys.modules['numba'] = None\n" if hide_numba else "")
            + "import tensorlite as tl\n"
              "on = tl.jit.is_enabled()\n"
              "print(on, 'numba' in sys.modules and sys.modules['numba'] is not None)\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("TENSORLITE_JIT", None)
    if env_value is not None:
        env["TENSORLITE_JIT"] = env_value
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    return (out.stdout.strip() + " " + out.stderr.strip()).strip()


def test_off_by_default_and_numba_not_imported():
    out = _jit_state_in_a_subprocess(None)
    assert out.startswith("False False")


@needs_numba
def test_opt_in_by_environment():
    for on in ("1", "true", "YES", " on "):
        assert _jit_state_in_a_subprocess(on).startswith("True")
    for off in ("0", "off", "false", ""):
        assert _jit_state_in_a_subprocess(off) == "False False"     # and nothing said
    out = _jit_state_in_a_subprocess("garbage")
    assert out.startswith("False") and "TENSORLITE_JIT='garbage' is neither on" in out


@needs_numba
def test_kernels_compile_uncached_where_numba_cannot_cache(monkeypatch, capsys):
    built = []
    real = jit._build

    def build(cache):
        built.append(cache)
        if cache:
            raise RuntimeError("cannot cache function 'layernorm_forward': no locator available")
        return real(cache)
    monkeypatch.setattr(jit, "_build", build)
    monkeypatch.setattr(jit, "_kernels", None)
    k = jit.kernels()
    assert built == [True, False] and hasattr(k, "layernorm_forward")
    assert "set NUMBA_CACHE_DIR" in capsys.readouterr().err


def test_opt_in_without_numba_warns_and_stays_on_numpy(monkeypatch):
    out = _jit_state_in_a_subprocess("1", hide_numba=True)
    assert out.startswith("False") and "numba is not installed" in out
    monkeypatch.setattr(jit, "available", lambda: False)
    with pytest.raises(RuntimeError, match=r"numba is not installed; install it with pip install "
                                           r"'tensorlite\[jit\]'"):
        jit.enable()


@needs_numba
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("size", [7, 300_000])          # one call, and blocks over the threads
def test_adamw_kernel_is_bit_identical_to_numpy(dtype, size):
    from nn.optim import AdamW

    def run():
        rng = np.random.default_rng(5)
        p = tl.tensor(rng.standard_normal(size).astype(dtype), requires_grad=True)
        opt = AdamW([p], lr=3e-3, weight_decay=0.1)
        for _ in range(3):
            p.grad = tl.tensor(rng.standard_normal(size).astype(dtype))
            opt.step()
        return p.detach().numpy().copy(), opt.state_dict()
    (p0, _), (p1, _) = _both(run)
    np.testing.assert_array_equal(p1, p0)


@needs_numba
@pytest.mark.parametrize("dtype,tol", [(np.float64, 1e-13), (np.float32, 1e-6)])
def test_gelu_kernels_equal_numpy(dtype, tol):
    from tensorlite.ops.nn import gelu_tanh_grad_into, gelu_tanh_into
    x = np.random.default_rng(6).standard_normal(10_000).astype(dtype) * 3
    g = np.random.default_rng(7).standard_normal(10_000).astype(dtype)

    def run():
        y, d = np.empty_like(x), np.empty_like(x)
        gelu_tanh_into(x, y)
        gelu_tanh_grad_into(x, g, d)
        return y, d
    (y0, d0), (y1, d1) = _both(run)
    np.testing.assert_allclose(y1, y0, rtol=tol, atol=tol)
    np.testing.assert_allclose(d1, d0, rtol=tol, atol=tol)
