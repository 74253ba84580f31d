"""Every op: forward against NumPy, output shape and dtype, and a float64 gradcheck."""
import numpy as np
import pytest

import tensorlite as tl


def _inputs(rng, shapes, positive=False, low=None):
    out = []
    for s in shapes:
        a = np.asarray(rng.standard_normal(s))
        if positive:
            a = np.abs(a) + 0.5
        out.append(a)
    return out


def check_op(rng, tl_fn, np_fn, shapes, positive=False, atol=1e-5, rtol=1e-4):
    """Forward equals the NumPy reference (float64 and float32), gradient checks in float64."""
    arrays = _inputs(rng, shapes, positive)
    ts = [tl.tensor(a, requires_grad=True) for a in arrays]
    out = tl_fn(*ts)
    ref = np.asarray(np_fn(*arrays))
    assert out.shape == ref.shape, (out.shape, ref.shape)
    assert out.dtype == tl.float64
    np.testing.assert_allclose(out.numpy(), ref, rtol=1e-12, atol=1e-12)
    # float32 in, float32 out: no silent upcast
    out32 = tl_fn(*[tl.tensor(a.astype(np.float32)) for a in arrays])
    assert out32.dtype == tl.float32, f"float32 inputs gave {out32.dtype}"
    np.testing.assert_allclose(out32.numpy(), ref, rtol=1e-4, atol=1e-4)
    assert tl.gradcheck(tl_fn, ts, atol=atol, rtol=rtol)


BINARY_SHAPES = [((3, 4), (3, 4)), ((3, 4), (4,)), ((2, 1, 4), (3, 1)), ((1,), (2, 3)),
                 ((), (2, 3)), ((2, 3), ())]


@pytest.mark.parametrize("shapes", BINARY_SHAPES)
@pytest.mark.parametrize("name,tl_fn,np_fn,pos", [
    ("add", lambda a, b: a + b, np.add, False),
    ("sub", lambda a, b: a - b, np.subtract, False),
    ("mul", lambda a, b: a * b, np.multiply, False),
    ("div", lambda a, b: a / b, np.divide, True),
    ("pow", lambda a, b: a ** b, np.power, True),
])
def test_binary_broadcast(rng, shapes, name, tl_fn, np_fn, pos):
    check_op(rng, tl_fn, np_fn, shapes, positive=pos)


@pytest.mark.parametrize("name,tl_fn,np_fn,pos", [
    ("neg", lambda x: -x, np.negative, False),
    ("exp", lambda x: x.exp(), np.exp, False),
    ("log", lambda x: x.log(), np.log, True),
    ("sqrt", lambda x: x.sqrt(), np.sqrt, True),
    ("tanh", lambda x: x.tanh(), np.tanh, False),
    ("sigmoid", lambda x: x.sigmoid(), lambda x: 1 / (1 + np.exp(-x)), False),
    ("log_sigmoid", lambda x: x.log_sigmoid(), lambda x: -np.logaddexp(0, -x), False),
    ("relu", lambda x: x.relu(), lambda x: np.maximum(x, 0), False),
    ("abs", lambda x: x.abs(), np.abs, False),
    ("clip", lambda x: x.clip(-0.5, 0.7), lambda x: np.clip(x, -0.5, 0.7), False),
    ("clip_min", lambda x: tl.clamp(x, min=0.1), lambda x: np.clip(x, 0.1, None), False),
    ("pow_scalar", lambda x: x ** 3, lambda x: x ** 3, False),
    ("pow_half", lambda x: x ** 0.5, np.sqrt, True),
    ("rsub", lambda x: 2.0 - x, lambda x: 2.0 - x, False),
    ("rdiv", lambda x: 2.0 / x, lambda x: 2.0 / x, True),
    ("rpow", lambda x: 2.0 ** x, lambda x: 2.0 ** x, False),
    ("square", lambda x: x * x, np.square, False),
])
@pytest.mark.parametrize("shape", [(3, 4), (5,), (), (1, 3, 1)])
def test_unary(rng, name, tl_fn, np_fn, pos, shape):
    check_op(rng, tl_fn, np_fn, [shape], positive=pos)


RED_CASES = [((3, 4, 5), None, False), ((3, 4, 5), 1, False), ((3, 4, 5), -1, True),
             ((3, 4, 5), (0, 2), False), ((3, 4, 5), (0, 2), True), ((6,), 0, False),
             ((1, 4), 0, False)]


@pytest.mark.parametrize("shape,dim,keepdim", RED_CASES)
@pytest.mark.parametrize("name", ["sum", "mean", "max", "min", "var"])
def test_reductions(rng, shape, dim, keepdim, name):
    np_name = {"max": "amax", "min": "amin"}.get(name, name)
    kwargs = {"ddof": 1} if name == "var" else {}
    if name == "var" and (dim is None and False):
        pass

    def np_fn(x):
        return getattr(np, np_name)(x, axis=dim, keepdims=keepdim, **kwargs)

    def tl_fn(x):
        return getattr(x, name)(dim=dim, keepdim=keepdim)

    if name == "var" and np.prod([shape[d] for d in ((dim,) if isinstance(dim, int) else
                                                     (dim or range(len(shape))))]) < 2:
        pytest.skip("var over one element has no degrees of freedom")
    check_op(rng, tl_fn, np_fn, [shape])


def test_var_biased_and_std(rng):
    check_op(rng, lambda x: x.var(dim=1, unbiased=False), lambda x: x.var(axis=1), [(3, 5)])
    check_op(rng, lambda x: x.std(dim=0), lambda x: x.std(axis=0, ddof=1), [(4, 3)])


def test_max_ties_split_gradient():
    x = tl.tensor([1.0, 3.0, 3.0, 2.0], dtype=tl.float64, requires_grad=True)
    x.max().backward()
    np.testing.assert_array_equal(x.grad.numpy(), [0, 0.5, 0.5, 0])


@pytest.mark.parametrize("sa,sb", [((3, 4), (4, 5)), ((2, 3, 4), (4, 5)), ((2, 3, 4), (2, 4, 5)),
                                   ((4,), (4, 5)), ((3, 4), (4,)), ((4,), (4,)),
                                   ((2, 1, 3, 4), (5, 4, 2)), ((3, 4), (2, 4, 5)),
                                   ((1, 1), (1, 1))])
def test_matmul(rng, sa, sb):
    check_op(rng, lambda a, b: a @ b, np.matmul, [sa, sb])


@pytest.mark.parametrize("fn,np_fn,shape", [
    (lambda x: x.reshape(4, 6), lambda x: x.reshape(4, 6), (2, 3, 4)),
    (lambda x: x.view(-1), lambda x: x.reshape(-1), (2, 3, 4)),
    (lambda x: x.reshape(()), lambda x: x.reshape(()), (1, 1)),
    (lambda x: x.transpose(0, 2), lambda x: x.transpose(2, 1, 0), (2, 3, 4)),
    (lambda x: x.permute(1, 2, 0), lambda x: x.transpose(1, 2, 0), (2, 3, 4)),
    (lambda x: x.T, lambda x: x.T, (3, 5)),
    (lambda x: x.squeeze(), lambda x: x.squeeze(), (1, 3, 1, 2)),
    (lambda x: x.squeeze(2), lambda x: x.squeeze(2), (1, 3, 1, 2)),
    (lambda x: x.unsqueeze(1), lambda x: x[:, None], (3, 2)),
    (lambda x: x.unsqueeze(-1), lambda x: x[..., None], (3, 2)),
    (lambda x: x.expand(4, 3, 2), lambda x: np.broadcast_to(x, (4, 3, 2)), (3, 1)),
    (lambda x: x.expand(-1, 5), lambda x: np.broadcast_to(x, (3, 5)), (3, 1)),
    (lambda x: x.flatten(1), lambda x: x.reshape(2, -1), (2, 3, 4)),
])
def test_shape_ops(rng, fn, np_fn, shape):
    check_op(rng, fn, np_fn, [shape])


@pytest.mark.parametrize("idx", [
    1, -1, slice(1, 3), (slice(None), 2), (None, 1), (Ellipsis, 0), (0, Ellipsis, None),
    (slice(None, None, 2), slice(1, None)), np.array([0, 2, 2, 1]), (np.array([0, 0, 1]), 1),
    (slice(None), np.array([[1, 1], [0, 2]])), np.array([True, False, True]),
])
def test_getitem(rng, idx):
    check_op(rng, lambda x: x[idx], lambda x: x[idx], [(3, 3, 2)])


def test_getitem_tensor_index_repeated_accumulates():
    x = tl.tensor(np.arange(4.0), requires_grad=True)
    x[tl.tensor([1, 1, 3, 1])].sum().backward()
    np.testing.assert_array_equal(x.grad.numpy(), [0, 3, 0, 1])


def test_take_embedding_scatter_adds(rng):
    w = rng.standard_normal((5, 3))
    idx = np.array([[0, 4, 4], [2, 0, 4]])
    check_op(rng, lambda t: tl.take(t, idx), lambda a: a[idx], [(5, 3)])
    wt = tl.tensor(w, requires_grad=True)
    wt.take(tl.tensor(idx)).sum().backward()
    np.testing.assert_array_equal(wt.grad.numpy()[:, 0], [2, 0, 1, 0, 3])


def test_cat_stack_split(rng):
    check_op(rng, lambda a, b: tl.cat([a, b], dim=1), lambda a, b: np.concatenate([a, b], 1),
             [(2, 3), (2, 5)])
    check_op(rng, lambda a, b: tl.cat([a, b]), lambda a, b: np.concatenate([a, b]),
             [(1, 3), (4, 3)])
    check_op(rng, lambda a, b: tl.stack([a, b], dim=-1), lambda a, b: np.stack([a, b], -1),
             [(2, 3), (2, 3)])
    check_op(rng, lambda a: tl.split(a, 2, dim=1)[1] * 2, lambda a: a[:, 2:4] * 2, [(3, 5)])
    check_op(rng, lambda a: tl.split(a, [1, 4], dim=1)[1], lambda a: a[:, 1:], [(3, 5)])
    # all pieces used: the gradient of every piece lands in its own slot
    x = tl.tensor(rng.standard_normal((3, 6)), requires_grad=True)
    a, b, c = x.chunk(3, dim=1)
    (a * 1 + b * 2 + c * 3).sum().backward()
    np.testing.assert_array_equal(x.grad.numpy()[0], [1, 1, 2, 2, 3, 3])


def test_where_masked_fill(rng):
    cond = rng.standard_normal((3, 4)) > 0
    check_op(rng, lambda a, b: tl.where(tl.tensor(cond), a, b), lambda a, b: np.where(cond, a, b),
             [(3, 4), (4,)])
    mask = np.triu(np.ones((4, 4), bool), 1)
    check_op(rng, lambda a: a.masked_fill(tl.tensor(mask), -3.0),
             lambda a: np.where(mask, -3.0, a), [(2, 4, 4)])


@pytest.mark.parametrize("dim", [-1, 0, 1])
def test_softmax_family(rng, dim):
    check_op(rng, lambda x: x.softmax(dim), lambda x: np.exp(x) / np.exp(x).sum(dim, keepdims=True),
             [(3, 4, 5)])
    check_op(rng, lambda x: x.log_softmax(dim),
             lambda x: x - np.log(np.exp(x).sum(dim, keepdims=True)), [(3, 4, 5)])
    check_op(rng, lambda x: x.logsumexp(dim), lambda x: np.log(np.exp(x).sum(dim)), [(3, 4, 5)])
    check_op(rng, lambda x: tl.logsumexp(x, dim, keepdim=True),
             lambda x: np.log(np.exp(x).sum(dim, keepdims=True)), [(3, 4, 5)])


def test_softmax_is_stable_for_huge_logits():
    x = tl.tensor([[1000.0, 0.0, -1000.0]])
    np.testing.assert_allclose(x.softmax(-1).numpy(), [[1, 0, 0]], atol=1e-7)
    assert np.isfinite(x.log_softmax(-1).numpy()).all()
    np.testing.assert_allclose(x.logsumexp(-1).numpy(), [1000.0])


def test_comparisons_have_no_grad():
    a = tl.tensor([1.0, 2.0, 3.0], requires_grad=True)
    for r in (a == 2.0, a != 2.0, a < 2.0, a <= 2.0, a > 2.0, a >= 2.0):
        assert r.dtype == tl.bool_ and not r.requires_grad
    np.testing.assert_array_equal((a > 1.5).numpy(), [False, True, True])
    np.testing.assert_array_equal(((a > 1.5) & (a < 2.5)).numpy(), [False, True, False])


def test_one_hot():
    oh = tl.one_hot(tl.tensor([[0, 2], [1, 1]]), 3)
    assert oh.shape == (2, 2, 3) and oh.dtype == tl.int64
    np.testing.assert_array_equal(oh.numpy()[0], [[1, 0, 0], [0, 0, 1]])
    assert tl.one_hot(tl.tensor([1]), 2, dtype=tl.float32).dtype == tl.float32


def test_composite_graph_reuses_nodes(rng):
    # a diamond: x feeds two branches that meet again; gradients from both paths add up
    def f(x, w):
        h = (x @ w).tanh()
        return (h * h.sigmoid() + h.exp() / (1 + h * h)).mean(dim=0)
    check_op(rng, f, lambda x, w: (lambda h: (h / (1 + np.exp(-h)) + np.exp(h) / (1 + h * h))
                                    .mean(0))(np.tanh(x @ w)), [(4, 3), (3, 2)])


def test_empty_and_size_one_dims(rng):
    x = tl.tensor(np.zeros((0, 3)), requires_grad=True)
    y = x.sum(dim=0)
    assert y.shape == (3,)
    y.sum().backward()
    assert x.grad.shape == (0, 3)
    check_op(rng, lambda a: (a * 2).sum(dim=1), lambda a: (a * 2).sum(1), [(1, 1)])


def test_scatter_add_fast_path_equals_add_at(rng):
    from tensorlite import backend
    idx = rng.integers(-5, 5, 500)                      # repeats and negative indices
    vals = rng.standard_normal((500, 3))
    a, b = np.zeros((5, 3)), np.zeros((5, 3))
    np.add.at(a, idx, vals)
    backend.scatter_add(np, b, idx, vals)
    np.testing.assert_allclose(b, a, rtol=1e-12, atol=1e-12)
    check_op(rng, lambda t: t[idx], lambda t: t[idx], [(5, 3)])


def _erf_grid():
    lin = np.linspace(-6.5, 6.5, 26001)
    tiny = np.geomspace(1e-310, 6.0, 4001)
    edges = [0.0, 5e-324, 1e-20, 0.46875, 0.84375, 1.25, 4.0, 6.0, 27.0, 1e300]
    edges += [np.nextafter(e, 0.0) for e in edges[3:8]] + [np.nextafter(e, 9.0) for e in edges[3:8]]
    return np.concatenate([lin, tiny, -tiny, edges, np.negative(edges)])


def test_erf_float64_within_float64_rounding():
    import math
    from tensorlite.ops.nn import erf
    x = _erf_grid()
    got = erf(x)
    ref = np.array([math.erf(v) for v in x])
    assert got.dtype == np.float64 and got.shape == x.shape
    err = np.abs(got - ref)
    assert (err <= np.maximum(4e-16 * np.abs(ref), 1e-323)).all(), x[np.argmax(err / (np.abs(
        ref) + 1e-300))]                                   # 4e-16: 2 ulp; 1e-323: subnormals
    special = erf(np.array([0.0, -0.0, np.inf, -np.inf, np.nan]))
    np.testing.assert_array_equal(special[:4], [0.0, 0.0, 1.0, -1.0])
    assert np.signbit(special[1]) and not np.signbit(special[0]) and np.isnan(special[4])
    # split over threads in blocks: the same bits as one small call per piece
    big = np.random.default_rng(0).standard_normal((3, 70_000)) * 2
    pieces = np.concatenate([erf(c) for c in np.split(big.ravel(), 210)])   # 1000 each
    np.testing.assert_array_equal(erf(big).ravel(), pieces)
    np.testing.assert_array_equal(erf(big[:, ::7])[0, :10], erf(big[0, :70:7]))   # strided input
    assert erf(np.float64(0.5)).shape == () and erf(np.arange(3)).dtype == np.float64


def test_erf_float32_within_float32_rounding():
    import math
    from tensorlite.ops.nn import erf
    x = _erf_grid()
    x = x[np.abs(x) < 1e30].astype(np.float32)
    got = erf(x)
    assert got.dtype == np.float32                        # no upcast
    ref = np.array([math.erf(float(v)) for v in x])       # exact for the float32 input
    ulp = np.spacing(np.abs(ref).astype(np.float32)).astype(np.float64)
    assert (np.abs(got - ref) <= ulp).all()               # within one float32 ulp
    assert (got == ref.astype(np.float32)).mean() > 0.999  # correctly rounded nearly always


def test_gelu_exact_float32_and_threads(rng):
    # exact GELU in float32 (> 64K elements: the blocked, threaded path) against float64
    import math
    from nn import functional as F
    x64 = np.concatenate([np.linspace(-12, 10, 4401), rng.standard_normal(80_000) * 3])
    x = tl.tensor(x64.astype(np.float32), requires_grad=True)
    y = F.gelu(x)
    assert y.dtype == tl.float32
    xr = x.numpy().astype(np.float64)
    phi = 0.5 * np.array([math.erfc(-v / math.sqrt(2)) for v in xr])   # no cancellation
    ref = xr * phi
    ulp = np.spacing(np.abs(ref).astype(np.float32)).astype(np.float64)
    assert (np.abs(y.numpy() - ref) <= ulp).all()          # left tail included (x = -12)
    y.backward(tl.tensor(np.ones(x.shape, np.float32)))
    dref = phi + xr * np.exp(-0.5 * xr * xr) / math.sqrt(2 * math.pi)
    np.testing.assert_allclose(x.grad.numpy(), dref, rtol=1e-5, atol=1e-6)


def test_log_sigmoid_is_finite_far_out_and_has_slope_one_half_at_zero():
    x = tl.tensor(np.array([-1000.0, -30.0, 0.0, 30.0, 1000.0]), requires_grad=True)
    y = x.log_sigmoid()
    y.sum().backward()
    assert np.allclose(y.numpy(), [-1000.0, -30.0, -np.log(2), -np.exp(-30.0), 0.0], rtol=1e-12)
    assert np.allclose(x.grad.numpy(), [1.0, 1.0, 0.5, np.exp(-30.0) / (1 + np.exp(-30.0)), 0.0])
