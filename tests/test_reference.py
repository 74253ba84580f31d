"""The composed references themselves, against the papers' formulas written in plain NumPy
(test_nn_functional.py then holds each fused op equal to its reference)."""
import math

import numpy as np

import tensorlite as tl
from nn import reference as R


def test_normal_cdf_and_gelu_are_exact():
    xs = np.linspace(-8, 8, 161)
    exact = np.array([0.5 * (1 + math.erf(v / math.sqrt(2))) for v in xs])
    np.testing.assert_allclose(R.normal_cdf(tl.tensor(xs)).numpy(), exact, rtol=0, atol=5e-15)
    np.testing.assert_allclose(R.gelu(tl.tensor(xs)).numpy(), xs * exact, rtol=0, atol=5e-14)
    # its gradient is the quadrature of the normal density's: Phi(x) + x phi(x)
    x = tl.tensor(xs, requires_grad=True)
    R.gelu(x).sum().backward()
    pdf = np.exp(-xs ** 2 / 2) / math.sqrt(2 * math.pi)
    np.testing.assert_allclose(x.grad.numpy(), exact + xs * pdf, rtol=0, atol=5e-14)


def test_dropout_keeps_with_probability_1_minus_p_and_rescales():
    x = tl.tensor(np.ones((200, 50)))
    y = R.dropout(x, 0.25, generator=tl.Generator(0)).numpy()
    assert set(np.unique(y)) == {0.0, 1 / 0.75}
    assert 0.23 < (y == 0).mean() < 0.27


def test_rotary_tables_and_rotation_follow_the_paper(rng):
    cos, sin = R.rotary_tables(3, 4, offset=2, base=100.0)
    ang = np.array([[p * 100.0 ** (-2 * i / 4) for i in range(2)] for p in (2, 3, 4)])
    np.testing.assert_allclose(cos, np.cos(ang))
    np.testing.assert_allclose(sin, np.sin(ang))
    x = rng.standard_normal((2, 3, 4))
    y = R.rotary(tl.tensor(x), cos, sin).numpy()
    # channel pair (i, i + D/2) rotated by angle[t, i]: [x1 cos - x2 sin, x2 cos + x1 sin]
    x1, x2 = x[..., :2], x[..., 2:]
    np.testing.assert_allclose(y, np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1),
                               rtol=1e-13, atol=1e-14)
    # relative positions: <R_m q, R_n k> depends on n - m only
    q, k = rng.standard_normal(4), rng.standard_normal(4)

    def dot(m, n):
        rot = lambda v, p: R.rotary(tl.tensor(v[None]), *R.rotary_tables(1, 4, p)).numpy()[0]  # noqa
        return rot(q, m) @ rot(k, n)
    assert math.isclose(dot(0, 3), dot(5, 8), rel_tol=1e-12)


def test_self_attention_is_per_head_softmax_attention(rng):
    b, t, h, d = 2, 4, 2, 3
    qkv = rng.standard_normal((b, t, 3 * h * d))
    out = R.self_attention(tl.tensor(qkv), h).numpy()
    q, k, v = np.split(qkv, 3, axis=-1)
    expect = np.empty((b, t, h * d))
    for bi in range(b):
        for hi in range(h):
            cols = slice(hi * d, (hi + 1) * d)
            s = q[bi, :, cols] @ k[bi, :, cols].T / math.sqrt(d)
            s[np.triu_indices(t, 1)] = -np.inf
            p = np.exp(s - s.max(-1, keepdims=True))
            expect[bi, :, cols] = (p / p.sum(-1, keepdims=True)) @ v[bi, :, cols]
    np.testing.assert_allclose(out, expect, rtol=1e-12, atol=1e-14)
