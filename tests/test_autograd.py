"""Autograd semantics: accumulation, graph freeing, hooks, no_grad, dtype rules, errors."""
import gc
import weakref

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import tensorlite as tl
from tensorlite import backend


def test_gradients_accumulate_across_backwards():
    x = tl.tensor([1.0, 2.0], requires_grad=True)
    (x * 3).sum().backward()
    (x * x).sum().backward()
    np.testing.assert_allclose(x.grad.numpy(), [3 + 2, 3 + 4])
    x.zero_grad()
    assert x.grad is None


def test_leaf_grads_do_not_alias_each_other():
    # add's backward hands one array to both inputs; in-place edits of one .grad must not
    # leak into the other (optimizers and clipping edit .grad in place)
    a = tl.tensor([1.0, 2.0], requires_grad=True)
    b = tl.tensor([3.0, 4.0], requires_grad=True)
    (a + b).sum().backward()
    a.grad.data *= 10
    np.testing.assert_array_equal(b.grad.numpy(), [1, 1])


def test_long_chain_has_no_recursion_limit():
    x = tl.tensor(1.0, dtype=tl.float64, requires_grad=True)
    y = x
    for _ in range(10_000):
        y = y * 1.0001
    y.backward()
    assert x.grad.item() == pytest.approx(1.0001 ** 10_000, rel=1e-9)
    del y  # freeing a 10,000-deep chain must not overflow the C stack either
    gc.collect()


def test_graph_is_freed_and_intermediates_collected():
    x = tl.randn(4, 4, requires_grad=True)
    h1 = x.tanh()
    h2 = h1 @ h1
    loss = h2.sum()
    refs = [weakref.ref(h1), weakref.ref(h2)]
    saved = weakref.ref(h2.grad_fn.a)   # an array the matmul node saved for backward
    del h1, h2
    assert all(r() is not None for r in refs)  # the graph holds them until backward
    loss.backward()
    gc.collect()
    assert all(r() is None for r in refs), "intermediate tensors outlive backward"
    assert saved() is None, "saved arrays outlive backward"
    assert loss.grad_fn.freed


def test_second_backward_through_freed_graph_is_clear_error():
    x = tl.randn(3, requires_grad=True)
    y = (x * x).sum()
    y.backward()
    with pytest.raises(RuntimeError, match="second time.*retain_graph=True"):
        y.backward()


def test_retain_graph_allows_second_backward():
    x = tl.tensor([1.0, 2.0], requires_grad=True)
    y = (x * x).sum()
    y.backward(retain_graph=True)
    y.backward()
    np.testing.assert_allclose(x.grad.numpy(), [4, 8])


def test_backward_non_scalar_needs_grad():
    x = tl.randn(3, requires_grad=True)
    with pytest.raises(RuntimeError, match=r"scalar outputs.*shape \(3,\)"):
        (x * 2).backward()
    (x * 2).backward(tl.ones(3))
    np.testing.assert_allclose(x.grad.numpy(), [2, 2, 2])
    with pytest.raises(RuntimeError, match=r"grad has shape \(2,\) but the tensor has shape \(3,\)"):
        (x * 2).backward(tl.ones(2))


def test_backward_on_tensor_without_grad_is_clear_error():
    with pytest.raises(RuntimeError, match="does not require grad"):
        tl.tensor([1.0]).sum().backward()


def test_no_grad_context_and_decorator():
    x = tl.randn(3, requires_grad=True)
    with tl.no_grad():
        y = x * 2
    assert not y.requires_grad and y.grad_fn is None

    @tl.no_grad()
    def f(t):
        return t * 3
    assert not f(x).requires_grad
    assert tl.is_grad_enabled()
    assert (x * 2).requires_grad


def test_hooks_modify_gradient_and_post_accumulate():
    x = tl.tensor([1.0, 2.0], requires_grad=True)
    seen = []
    h = x.register_hook(lambda g: g * 10)
    x.register_post_accumulate_grad_hook(lambda t: seen.append(t.grad.numpy().copy()))
    (x * x).sum().backward()
    np.testing.assert_allclose(x.grad.numpy(), [20, 40])
    assert len(seen) == 1 and np.allclose(seen[0], [20, 40])
    h.remove()
    x.zero_grad()
    (x * x).sum().backward()
    np.testing.assert_allclose(x.grad.numpy(), [2, 4])


def test_hook_on_intermediate_sees_total_gradient_once():
    x = tl.tensor([1.0, 2.0], requires_grad=True)
    h = x * 2
    calls = []
    h.register_hook(lambda g: calls.append(g.numpy().copy()))
    (h * h + h).sum().backward()  # h used three times: one call with the summed gradient
    assert len(calls) == 1
    np.testing.assert_allclose(calls[0], 2 * h.numpy() + 1)


def test_post_accumulate_hook_fires_once_per_leaf_even_if_used_many_times():
    w = tl.tensor([1.0, 2.0], requires_grad=True)
    count = []
    w.register_post_accumulate_grad_hook(lambda t: count.append(1))
    ((w * 2) + (w * 3) + w.exp()).sum().backward()
    assert len(count) == 1


def test_detach_and_requires_grad_rules():
    x = tl.randn(3, requires_grad=True)
    d = (x * 2).detach()
    assert not d.requires_grad and d.is_leaf
    with pytest.raises(TypeError, match="only float tensors can require grad.*int64"):
        tl.tensor([1, 2], requires_grad=True)


def test_inplace_on_requires_grad_is_refused_outside_no_grad():
    w = tl.randn(3, requires_grad=True)
    with pytest.raises(RuntimeError, match="in-place.*no_grad"):
        w += 1
    with tl.no_grad():
        w -= 1.0


# ----------------------------------------------------------------------------- dtypes
def test_float32_default_and_no_silent_upcast():
    assert tl.tensor([1.0, 2.0]).dtype == tl.float32
    assert tl.randn(2).dtype == tl.float32
    x = tl.randn(3)
    assert (x * 2.5).dtype == tl.float32
    assert (x * np.float64(2.5)).dtype == tl.float32          # NumPy scalars are weak too
    assert (x + tl.tensor([1, 2, 3])).dtype == tl.float32     # int tensor joins the float
    assert (tl.arange(4) / 2).dtype == tl.float32             # int / int: default float
    assert (tl.arange(4) * 0.5).dtype == tl.float32
    assert (x + x.double()).dtype == tl.float64               # explicit float64 wins
    assert tl.tensor(np.zeros(2)).dtype == tl.float64         # arrays keep their dtype
    assert tl.arange(3).dtype == tl.int64


def test_float16_accepted():
    x = tl.randn(4, dtype=tl.float16, requires_grad=True)
    y = (x * x).sum()
    assert y.dtype == tl.float16
    y.backward()
    assert x.grad.dtype == tl.float16


def test_to_dtype_is_differentiable():
    x = tl.tensor([1.0, 2.0], requires_grad=True)
    y = x.to(tl.float64) * 3
    assert y.dtype == tl.float64
    y.sum().backward()
    assert x.grad.dtype == tl.float32
    np.testing.assert_allclose(x.grad.numpy(), [3, 3])


def test_unsupported_dtype_error():
    with pytest.raises(TypeError, match="unsupported dtype 'complex64'"):
        tl.zeros(2, dtype="complex64")
    with pytest.raises(TypeError, match="complex128"):
        tl.tensor(np.zeros(2, dtype=np.complex128))


# ----------------------------------------------------------------------------- errors
def test_matmul_shape_error_names_shapes():
    with pytest.raises(ValueError, match=r"matmul: \(4, 3\) @ \(4, 5\): inner dimensions 3 and 4 differ"):
        tl.randn(4, 3) @ tl.randn(4, 5)
    with pytest.raises(ValueError, match=r"batch dimensions \(2,\) and \(3,\)"):
        tl.randn(2, 4, 3) @ tl.randn(3, 3, 5)


def test_shape_errors_name_values():
    x = tl.randn(2, 3)
    with pytest.raises(ValueError, match=r"cannot view a tensor of shape \(2, 3\) \(6 elements\) as shape \(4, 2\)"):
        x.reshape(4, 2)
    with pytest.raises(IndexError, match="dim 5 is out of range for a tensor with 2 dims"):
        x.sum(dim=5)
    with pytest.raises(ValueError, match=r"cat: shapes \(2, 3\) and \(2, 4\) differ outside dim 0"):
        tl.cat([x, tl.randn(2, 4)])
    with pytest.raises(ValueError, match=r"expand: cannot expand shape \(2, 3\) to \(4, 3\)"):
        x.expand(4, 3)
    with pytest.raises(ValueError, match=r"operands could not be broadcast|broadcast"):
        x + tl.randn(4)
    with pytest.raises(IndexError, match=r"take: index 7 is out of range for a table of 5 rows"):
        tl.take(tl.randn(5, 2), tl.tensor([1, 7]))


class _FakeGpuArray(np.ndarray):
    """A NumPy array that claims to live on a GPU, to test device checks without one."""


def test_device_mismatch_error_names_both_devices(monkeypatch):
    real = backend.device_of
    monkeypatch.setattr(backend, "device_of",
                        lambda a: "cuda:0" if isinstance(a, _FakeGpuArray) else real(a))
    a = tl.randn(3)
    b = tl.Tensor._make(np.ones(3).view(_FakeGpuArray), False, None)
    for op in (lambda: a + b, lambda: a * b, lambda: a @ b, lambda: tl.cat([a, b])):
        with pytest.raises(RuntimeError, match="cpu and cuda:0"):
            op()


def test_cuda_request_without_gpu_is_clear():
    if tl.cuda_available():
        pytest.skip("a GPU is present")
    with pytest.raises(RuntimeError, match="device 'cuda' requested but .*use device='cpu'"):
        tl.zeros(2, device="cuda")
    with pytest.raises(ValueError, match="unknown device 'tpu'"):
        tl.zeros(2, device="tpu")


# ----------------------------------------------------------------------------- hypothesis
def _broadcastable_pair():
    return hnp.mutually_broadcastable_shapes(num_shapes=2, min_dims=0, max_dims=3, max_side=3)


@given(shapes=_broadcastable_pair(), seed=st.integers(0, 2**16))
def test_broadcast_gradients_reduce_to_input_shapes(shapes, seed):
    rng = np.random.default_rng(seed)
    sa, sb = shapes.input_shapes
    a = tl.tensor(np.asarray(rng.standard_normal(sa)), requires_grad=True)
    b = tl.tensor(np.asarray(rng.standard_normal(sb)), requires_grad=True)
    out = a * b + a
    assert out.shape == shapes.result_shape
    out.sum().backward()
    assert a.grad.shape == sa and b.grad.shape == sb
    # d/da sum(a*b + a) = sum of (b + 1) over the broadcast axes
    full_b = np.broadcast_to(b.numpy(), shapes.result_shape) + 1
    expect_a = tl.unbroadcast(full_b, sa)
    np.testing.assert_allclose(a.grad.numpy(), expect_a, rtol=1e-12, atol=1e-12)


@given(arr=hnp.arrays(np.float64, hnp.array_shapes(min_dims=1, max_dims=3, max_side=4),
                      elements=st.floats(-10, 10)),
       data=st.data())
def test_reductions_match_numpy_on_any_shape(arr, data):
    dim = data.draw(st.integers(-arr.ndim, arr.ndim - 1))
    keep = data.draw(st.booleans())
    t = tl.tensor(arr, requires_grad=True)
    np.testing.assert_allclose(t.sum(dim, keep).numpy(), arr.sum(dim, keepdims=keep))
    np.testing.assert_allclose(t.max(dim, keep).numpy(), arr.max(dim, keepdims=keep))
    t.mean(dim, keep).sum().backward()
    np.testing.assert_allclose(t.grad.numpy(), np.full(arr.shape, 1 / arr.shape[dim]))


@given(shape=hnp.array_shapes(min_dims=1, max_dims=4, max_side=3), seed=st.integers(0, 999))
def test_permute_round_trip(shape, seed):
    rng = np.random.default_rng(seed)
    perm = tuple(rng.permutation(len(shape)).tolist())
    x = tl.tensor(np.asarray(rng.standard_normal(shape)), requires_grad=True)
    y = x.permute(*perm)
    assert y.shape == tuple(shape[p] for p in perm)
    w = rng.standard_normal(y.shape)
    (y * tl.tensor(w)).sum().backward()
    np.testing.assert_allclose(x.grad.numpy(), np.transpose(w, np.argsort(perm)))


# ----------------------------------------------------------------------------- gradcheck itself
def test_gradcheck_catches_a_wrong_backward():
    class BadSquare(tl.Function):
        def forward(self, x):
            self.x = x
            return x * x

        def backward(self, g):
            return g * self.x * 2.01  # 0.5 % wrong

    x = tl.randn(3, dtype=tl.float64, requires_grad=True)
    with pytest.raises(tl.GradcheckError, match=r"input 0 \(shape \(3,\)\) at index \(\d,\): analytic .* vs numeric"):
        tl.gradcheck(lambda t: BadSquare.apply(t), [x])
    with pytest.raises(tl.GradcheckError, match="directional"):
        tl.gradcheck_directional(lambda t: BadSquare.apply(t), [x])
    assert tl.gradcheck_directional(lambda t: (t * t).sum(), [x])


def test_gradcheck_refuses_float32():
    with pytest.raises(TypeError, match="float64"):
        tl.gradcheck(lambda t: t * 2, [tl.randn(2, requires_grad=True)])


def test_random_is_seeded():
    tl.manual_seed(7)
    a = tl.randn(5).numpy()
    tl.manual_seed(7)
    np.testing.assert_array_equal(a, tl.randn(5).numpy())
    assert not np.array_equal(a, tl.randn(5).numpy())


def test_tensor_api_basics():
    x = tl.tensor([[1.0, 2.0], [3.0, 4.0]])
    assert x.shape == (2, 2) and x.ndim == 2 and x.device == "cpu" and x.numel() == 4
    assert x[1, 1].item() == 4.0
    assert isinstance(x.numpy(), np.ndarray)
    assert x.tolist() == [[1.0, 2.0], [3.0, 4.0]]
    with pytest.raises(ValueError, match=r"only a one-element tensor.*shape \(2, 2\)"):
        x.item()
    assert tl.zeros(2, 3).shape == (2, 3) and tl.ones((2,)).numpy().sum() == 2
    assert tl.full((2,), 7).dtype == tl.int64
    np.testing.assert_array_equal(tl.arange(1, 7, 2).numpy(), [1, 3, 5])
    assert "requires_grad=True" in repr(tl.randn(2, requires_grad=True))


def test_post_hook_editing_grad_in_place_does_not_leak_to_other_leaves():
    # data parallelism all-reduces .grad in place from these hooks
    a = tl.tensor([1.0, 2.0], requires_grad=True)
    b = tl.tensor([3.0, 4.0], requires_grad=True)
    for t in (a, b):
        t.register_post_accumulate_grad_hook(lambda t: t.grad.data.__imul__(10))
    (a + b).sum().backward()
    np.testing.assert_array_equal(a.grad.numpy(), [10, 10])
    np.testing.assert_array_equal(b.grad.numpy(), [10, 10])


def test_inplace_change_of_a_saved_tensor_is_detected():
    w = tl.tensor([1.0, 2.0], requires_grad=True)
    x = tl.tensor([3.0, 4.0])
    y = (w * x).sum()          # Mul saves x for w's gradient
    x += 1                     # allowed (x needs no grad), but the saved values are now stale
    with pytest.raises(RuntimeError, match=r"input 1 of Mul .* changed in place .*version 1, expected 0"):
        y.backward()
    z = w.exp()
    s = (z + 1.0).sum()        # Add saves nothing
    with tl.no_grad():
        z += 1                 # Exp's backward reads its own output
    with pytest.raises(RuntimeError, match="its output of Exp"):
        s.backward()
    # an op whose backward does not read the input: no false alarm
    a = tl.tensor([1.0, 2.0])
    y = (w + a).sum()
    a += 1
    y.backward()
    np.testing.assert_array_equal(w.grad.numpy(), [1, 1])


def test_leaf_gradients_are_complete_as_soon_as_their_last_user_is_done():
    """Backward accumulates a weight's gradient (and runs its post-accumulate hooks) right
    after the last op that used it, not after the whole graph: data parallelism starts its
    all-reduces from those hooks while backward goes on through the earlier layers."""
    events = []
    x = tl.randn(4, 8)
    ws = [tl.randn(8, 8, requires_grad=True) for _ in range(3)]
    for i, w in enumerate(ws):
        w.register_post_accumulate_grad_hook(lambda t, i=i: events.append(f"w{i}"))
    h = x
    for i, w in enumerate(ws):
        h = (h @ w).tanh()
        h.register_hook(lambda g, i=i: events.append(f"h{i}"))
    h.sum().backward()
    # the output layer's weight is done before the gradient reaches the first layer
    assert events.index("w2") < events.index("h1") < events.index("w1") < events.index("h0")
    assert events.index("w1") < events.index("h0") < events.index("w0")
