"""The CuPy backend: the same op code on a GPU gives the CPU's values and gradients.

Skipped with the reason when CuPy or a GPU is missing (see conftest.py).
"""
import numpy as np
import pytest

import tensorlite as tl

pytestmark = pytest.mark.gpu

CASES = [
    ("matmul", lambda a, b: (a @ b).tanh(), [(2, 3, 4), (4, 5)]),
    ("batched", lambda a, b: a @ b.transpose(-1, -2), [(2, 3, 4), (2, 5, 4)]),
    ("broadcast", lambda a, b: (a * b + a / (b * b + 1)).sum(dim=0), [(3, 1, 4), (5, 4)]),
    ("softmax", lambda a, b: a.softmax(-1) * b.log_softmax(-1), [(3, 4), (3, 4)]),
    ("reduce", lambda a, b: a.var(dim=1) + b.max(dim=0) + a.mean(), [(4, 3), (2, 4)]),
    ("index", lambda a, b: a[np.array([0, 0, 2])] + b[1:, None].sum(), [(3, 4), (3, 2)]),
    ("take", lambda a, b: tl.take(a, tl.tensor([[0, 2, 2]], device=a.device)) * b, [(3, 4), (4,)]),
    ("cat", lambda a, b: tl.cat([a, b], 0).sigmoid(), [(2, 3), (4, 3)]),
    ("where", lambda a, b: tl.where(a > 0, a, b).relu(), [(3, 3), (3,)]),
]


@pytest.mark.parametrize("name,fn,shapes", CASES, ids=[c[0] for c in CASES])
def test_gpu_matches_cpu(name, fn, shapes):
    rng = np.random.default_rng(0)
    arrays = [rng.standard_normal(s) for s in shapes]
    cpu = [tl.tensor(a, requires_grad=True) for a in arrays]
    gpu = [tl.tensor(a, device="cuda", requires_grad=True) for a in arrays]
    oc, og = fn(*cpu), fn(*gpu)
    assert og.device == "cuda:0"
    np.testing.assert_allclose(og.numpy(), oc.numpy(), rtol=1e-10, atol=1e-12)
    w = rng.standard_normal(oc.shape)
    oc.backward(tl.tensor(w))
    og.backward(tl.tensor(w, device="cuda"))
    for c, g in zip(cpu, gpu):
        np.testing.assert_allclose(g.grad.numpy(), c.grad.numpy(), rtol=1e-10, atol=1e-12)


def test_gpu_gradcheck():
    x = tl.randn(3, 4, dtype=tl.float64, device="cuda", requires_grad=True)
    assert tl.gradcheck(lambda t: (t @ t.T).softmax(-1), [x])


def test_to_device_round_trip_is_differentiable():
    x = tl.randn(3, requires_grad=True)
    y = (x.to("cuda") * 2).to("cpu")
    assert y.device == "cpu"
    y.sum().backward()
    np.testing.assert_allclose(x.grad.numpy(), [2, 2, 2])


def test_float32_stays_float32_on_gpu():
    x = tl.randn(4, 4, device="cuda")
    assert (x @ x * 2.5).softmax(-1).dtype == tl.float32
