"""In-place ops on tensors in a graph (issue 18): recorded as PyTorch records them.

Each in-place program is held equal, forward and backward, to its out-of-place twin, and
gradchecked in float64; each refusal's message is checked; and the checks that guard against
a wrong gradient (a saved value overwritten, a stale view) are shown to fire.
"""
import numpy as np
import pytest

import tensorlite as tl
from tensorlite.ops import inplace as inplace_mod


def t64(values, grad=True):
    return tl.tensor(values, dtype=tl.float64, requires_grad=grad)


# ----------------------------------------------------------------------------- micrograd
def test_micrograd_sanity_check_by_hand():
    # z = 3x + 2 = -10, q = relu(z) + z*x = 40, h = relu(z*z) = 100, y = h + q + q*x = -20;
    # dy/dx = 2z*3 + (3x + z) + (3x + z)*x + q = -60 - 22 + 88 + 40 = 46
    x = t64([-4.0])
    z = 2 * x + 2 + x
    q = z.relu() + z * x
    h = (z * z).relu()
    y = h + q + q * x
    y.backward()
    assert y.item() == -20.0
    assert x.grad.item() == 46.0


def _micrograd_more_ops(a, b, inplace: bool):
    c = a + b
    d = a * b + b ** 3
    if inplace:
        c += c + 1
        c += 1 + c + (-a)
        d += d * 2 + (b + a).relu()
        d += 3 * d + (b - a).relu()
    else:
        c = c + (c + 1)
        c = c + (1 + c + (-a))
        d = d + (d * 2 + (b + a).relu())
        d = d + (3 * d + (b - a).relu())
    e = c - d
    f = e ** 2
    g = f / 2.0
    if inplace:
        g += 10.0 / f
    else:
        g = g + 10.0 / f
    return g


def _micrograd_more_ops_floats(a: float, b: float) -> float:
    """The same arithmetic on Python floats: an independent reference for the value."""
    c = a + b
    d = a * b + b ** 3
    c = c + (c + 1)
    c = c + (1 + c + (-a))
    d = d + (d * 2 + max(b + a, 0.0))
    d = d + (3 * d + max(b - a, 0.0))
    f = (c - d) ** 2
    return f / 2.0 + 10.0 / f


def test_micrograd_more_ops_with_inplace_updates():
    a, b = t64([-4.0]), t64([2.0])
    g = _micrograd_more_ops(a, b, inplace=True)
    g.backward()
    assert g.item() == pytest.approx(_micrograd_more_ops_floats(-4.0, 2.0), rel=1e-14)
    # the gradients by central differences on the float program (no tensorlite in it)
    h = 1e-6
    da = (_micrograd_more_ops_floats(-4.0 + h, 2.0) - _micrograd_more_ops_floats(-4.0 - h, 2.0)) / (2 * h)
    db = (_micrograd_more_ops_floats(-4.0, 2.0 + h) - _micrograd_more_ops_floats(-4.0, 2.0 - h)) / (2 * h)
    assert a.grad.item() == pytest.approx(da, rel=1e-7)
    assert b.grad.item() == pytest.approx(db, rel=1e-7)
    # and exactly what the out-of-place twin gives
    a2, b2 = t64([-4.0]), t64([2.0])
    g2 = _micrograd_more_ops(a2, b2, inplace=False)
    g2.backward()
    assert g.item() == g2.item()
    assert a.grad.item() == a2.grad.item() and b.grad.item() == b2.grad.item()
    # a 1 % error in either gradient would fail the finite-difference check above
    assert abs(a.grad.item() - 1.01 * da) > 1e-7 * abs(da)


# ----------------------------------------------------------------------------- every op vs its twin
# (name, in-place program, out-of-place twin): each takes (h, w, m) with h = a non-leaf that
# requires grad, w = a leaf that requires grad, m = a bool mask; returns h's final value
_MASK = np.array([[True, False, False, True], [False, True, False, False], [True, True, False, False]])


def _ip_iadd(h, w, m): h += w * 0.5; return h
def _op_iadd(h, w, m): return h + w * 0.5
def _ip_isub(h, w, m): h -= w.tanh(); return h
def _op_isub(h, w, m): return h - w.tanh()
def _ip_imul_const(h, w, m): h *= 3.0; return h
def _op_imul_const(h, w, m): return h * 3.0
def _ip_imul_tensor(h, w, m): h *= w; return h              # backward needs h's old values
def _op_imul_tensor(h, w, m): return h * w
def _ip_idiv_tensor(h, w, m): h /= (w * w + 1.0); return h
def _op_idiv_tensor(h, w, m): return h / (w * w + 1.0)
def _ip_add_alpha(h, w, m): return h.add_(w, alpha=2.0)
def _op_add_alpha(h, w, m): return h + w * 2.0
def _ip_sub_alpha(h, w, m): return h.sub_(w, alpha=0.5)
def _op_sub_alpha(h, w, m): return h - w * 0.5
def _ip_mul_(h, w, m): return h.mul_(w.sigmoid())
def _op_mul_(h, w, m): return h * w.sigmoid()
def _ip_div_(h, w, m): return h.div_(2.0)
def _op_div_(h, w, m): return h / 2.0
def _ip_clamp(h, w, m): return h.clamp_(-0.3, 0.4)
def _op_clamp(h, w, m): return h.clamp(-0.3, 0.4)
def _ip_masked_fill(h, w, m): return h.masked_fill_(tl.tensor(m), -2.0)
def _op_masked_fill(h, w, m): return h.masked_fill(tl.tensor(m), -2.0)
def _ip_setitem_const(h, w, m): h[:, 1] = -1.0; return h
def _op_setitem_const(h, w, m): return h.masked_fill(tl.tensor(np.arange(4) == 1), -1.0)
def _ip_setitem_tensor(h, w, m): h[1:, :2] = w[0, :2] * 3.0; return h    # value broadcasts
def _op_setitem_tensor(h, w, m):
    rows = tl.cat([h[:1], tl.cat([(w[0, :2] * 3.0).unsqueeze(0).expand(2, 2), h[1:, 2:]], 1)], 0)
    return rows
def _ip_setitem_mask(h, w, m): h[tl.tensor(m)] = 0.25; return h
def _op_setitem_mask(h, w, m): return h.masked_fill(tl.tensor(m), 0.25)
def _ip_copy(h, w, m): return h.copy_(w.exp())
def _op_copy(h, w, m): return w.exp() + h * 0.0
def _ip_fill(h, w, m): h.fill_(0.7); return h * w
def _op_fill(h, w, m): return (h * 0.0 + 0.7) * w
def _ip_zero(h, w, m): h.zero_(); return h + w
def _op_zero(h, w, m): return h * 0.0 + w
def _ip_view_iadd(h, w, m):   # x[idx] op= v: through a view of h, recorded on h
    h[1:, 2:] += w[:2, :2]
    h[0] *= w[2]
    return h
def _op_view_iadd(h, w, m):
    rest = tl.cat([h[1:, :2], h[1:, 2:] + w[:2, :2]], 1)
    return tl.cat([(h[0] * w[2]).unsqueeze(0), rest], 0)
def _ip_named_view(h, w, m):  # a view kept in a name, changed, then used beside its base
    v = h[1]
    v *= w[0]
    v[2] = 0.5                # a write into v: recorded on h too
    return h + v.unsqueeze(0)
def _op_named_view(h, w, m):
    v = h[1] * w[0]
    v = tl.cat([v[:2], tl.tensor([0.5], dtype=tl.float64), v[3:]], 0)
    h = tl.cat([h[:1], v.unsqueeze(0), h[2:]], 0)
    return h + v.unsqueeze(0)
def _ip_chain(h, w, m):       # several in a row, each reading the last, with uses in between
    u = h * 2.0
    h += u
    v = h.tanh()
    h *= w
    h[0] = v[1] * 2.0
    h.clamp_(max=1.5)
    return h + u + v
def _op_chain(h, w, m):
    u = h * 2.0
    h = h + u
    v = h.tanh()
    h = h * w
    h = tl.cat([(v[1] * 2.0).unsqueeze(0), h[1:]], 0)
    h = h.clamp(max=1.5)
    return h + u + v


PROGRAMS = [name[4:] for name in dict(globals()) if name.startswith("_ip_")]


def _run(fn, x_np, w_np):
    x, w = t64(x_np), t64(w_np)
    h = x * 1.0 + 0.0           # a non-leaf that requires grad
    out = fn(h, w, _MASK)
    loss = (out * out.tanh()).sum()
    loss.backward()
    return loss.item(), x.grad.numpy() if x.grad is not None else np.zeros_like(x_np), \
        w.grad.numpy() if w.grad is not None else np.zeros_like(w_np)


@pytest.mark.parametrize("name", PROGRAMS)
def test_inplace_program_equals_its_out_of_place_twin(name):
    rng = np.random.default_rng(0)
    x_np, w_np = rng.standard_normal((3, 4)), rng.standard_normal((3, 4))
    ip = _run(globals()["_ip_" + name], x_np, w_np)
    op = _run(globals()["_op_" + name], x_np, w_np)
    assert ip[0] == pytest.approx(op[0], rel=1e-13, abs=1e-13)
    np.testing.assert_allclose(ip[1], op[1], rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(ip[2], op[2], rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("name", PROGRAMS)
def test_inplace_program_gradcheck(name):
    rng = np.random.default_rng(1)
    x, w = t64(rng.standard_normal((3, 4))), t64(rng.standard_normal((3, 4)))

    def f(x, w):
        h = x * 1.0 + 0.0
        out = globals()["_ip_" + name](h, w, _MASK)
        return out * out.tanh()
    assert tl.gradcheck(f, (x, w), atol=1e-7, rtol=1e-6)


def test_mul_by_a_tensor_that_needs_grad_keeps_the_old_values(monkeypatch):
    """h *= w needs h's values before the change for w's gradient: tensorlite gives the op its
    own copy (as PyTorch saves the original self). Without that copy the gradient is wrong."""
    rng = np.random.default_rng(2)
    x_np, w_np = rng.standard_normal((3, 4)), rng.standard_normal((3, 4))
    right = _run(_op_imul_tensor, x_np, w_np)
    np.testing.assert_allclose(_run(_ip_imul_tensor, x_np, w_np)[2], right[2], rtol=1e-13)
    monkeypatch.setattr(inplace_mod, "_reads", lambda ctx, old: False)   # the planted bug
    wrong = _run(_ip_imul_tensor, x_np, w_np)
    assert not np.allclose(wrong[2], right[2])


def test_earlier_users_of_a_tensor_get_the_gradient_of_its_earlier_value():
    """y used c before c *= 3: y's gradient must reach a + b through c's *old* value (x1),
    not through the multiplication (which would make it x3)."""
    a, b = t64([1.0, 2.0]), t64([3.0, 4.0])
    c = a + b
    y = c + 5.0                 # Add saves nothing: nothing stale, only the routing matters
    c *= 3.0
    (y + c).sum().backward()
    np.testing.assert_array_equal(a.grad.numpy(), [4.0, 4.0])   # 1 (through y) + 3 (through c)
    np.testing.assert_array_equal(b.grad.numpy(), [4.0, 4.0])


def test_a_plain_tensor_changed_by_one_that_requires_grad_joins_the_graph():
    w = t64([1.0, -2.0, 3.0])
    h = tl.zeros(3, dtype=tl.float64)
    h += w * w
    h[1] = w[0]
    assert h.requires_grad and not h.is_leaf and h.grad_fn.name == "IndexPut"
    h.sum().backward()
    np.testing.assert_array_equal(w.grad.numpy(), [2.0 + 1.0, 0.0, 6.0])


def test_hooks_registered_before_the_change_see_the_old_values_gradient():
    x = t64([1.0, 2.0])
    h = x * 1.0
    seen = []
    h.register_hook(lambda g: seen.append(g.numpy().copy()))
    h *= 5.0
    (h * 2.0).sum().backward()
    np.testing.assert_array_equal(seen[0], [10.0, 10.0])
    np.testing.assert_array_equal(x.grad.numpy(), [10.0, 10.0])


def test_no_grad_and_plain_tensors_are_written_in_place_as_before():
    w = t64([1.0, 2.0])
    with tl.no_grad():
        w -= 1.0
        w[0] = 5.0
        w.mul_(2.0).clamp_(max=6.0)
    assert w.is_leaf and w.requires_grad
    np.testing.assert_array_equal(w.numpy(), [6.0, 2.0])
    p = tl.tensor([1.0, 2.0])
    arr = p.data
    p += 1
    p.masked_fill_(tl.tensor([True, False]), 0.0)
    assert p.data is arr and not p.requires_grad and p._version == 2
    np.testing.assert_array_equal(p.numpy(), [0.0, 3.0])


# ----------------------------------------------------------------------------- what stays an error
def test_inplace_on_a_leaf_that_requires_grad_is_refused_in_pytorchs_words():
    w = t64([1.0, 2.0])
    for change in (lambda: w.__iadd__(1.0), lambda: w.__setitem__(0, 1.0), lambda: w.mul_(2.0),
                   lambda: w.clamp_(0.0, 1.0), lambda: w.zero_(), lambda: w.normal_()):
        with pytest.raises(RuntimeError, match=r"a leaf tensor that requires grad \(shape \(2,\)\) "
                           r"is being used in an in-place operation; do it under tl.no_grad"):
            change()
    np.testing.assert_array_equal(w.numpy(), [1.0, 2.0])    # and nothing was written


def test_a_backward_that_needs_an_overwritten_value_raises():
    x = t64([0.5, 1.0])
    y = x.exp()                 # Exp's backward reads its output
    y += 1
    with pytest.raises(RuntimeError, match="its output of Exp .* changed in place"):
        y.sum().backward()
    w = t64([1.0, 2.0])
    h = x * 1.0
    z = (w * h).sum()           # Mul reads h for w's gradient
    h += 1
    with pytest.raises(RuntimeError, match=r"input 1 of Mul .* changed in place"):
        z.backward()


def test_nothing_saved_was_overwritten_so_no_false_alarm():
    x = t64([1.0, 2.0])
    y = x * 2                   # Mul by a constant reads only the constant
    y += 1
    y.sum().backward()
    np.testing.assert_array_equal(x.grad.numpy(), [2.0, 2.0])
    x.grad = None
    g = x / 2.0                 # Div by a constant does not read its output
    g *= 3.0
    g.sum().backward()
    np.testing.assert_array_equal(x.grad.numpy(), [1.5, 1.5])


# writes through views: (in-place program, out-of-place twin), each on h = x * 1 (6 elements)
def _v_reshape(h, x):
    y = h.reshape(2, 3)
    y += x[:3]                                   # broadcast over the rows
    return h * y.reshape(6)
def _v_reshape_twin(h, x):
    y = h.reshape(2, 3) + x[:3]
    return y.reshape(6) * y.reshape(6)
def _v_transpose(h, x):
    h.reshape(2, 3).T[0] *= x[4]                 # a slice of a transpose of a reshape
    return h.tanh()
def _v_transpose_twin(h, x):
    m = tl.tensor(np.array([1.0, 0, 0, 1, 0, 0]))
    return (h * (1 + m * (x[4] - 1))).tanh()
def _v_permute3(h, x):
    p = h.reshape(1, 2, 3).permute(2, 0, 1)      # (3, 1, 2): p[i, 0, j] = h[3 j + i]
    p[1] += x[:2].reshape(1, 2)                  # h[1] += x0, h[4] += x1
    return h * x
def _v_permute3_twin(h, x):
    m0 = tl.tensor(np.array([0.0, 1, 0, 0, 0, 0]))
    m1 = tl.tensor(np.array([0.0, 0, 0, 0, 1, 0]))
    return (h + m0 * x[0] + m1 * x[1]) * x
def _v_slice_of_slice(h, x):
    h[1:][1:3] += x[:2] ** 2
    return h * h
def _v_slice_of_slice_twin(h, x):
    h = tl.cat([h[:2], h[2:4] + x[:2] ** 2, h[4:]], 0)
    return h * h
def _v_unsqueeze(h, x):
    u = h.unsqueeze(0)
    u.mul_(x.sigmoid())
    return u.squeeze(0) + h
def _v_unsqueeze_twin(h, x):
    h = h * x.sigmoid()
    return h + h
def _v_two_rows(h, x):                          # disjoint views of one base, each changed
    m = h.reshape(2, 3)
    r0, r1 = m[0], m[1]
    r0 += 1.0
    r1 *= x[:3]                                  # r1 is stale after r0's write: regenerated
    return r0 * r1 + m.sum()
def _v_two_rows_twin(h, x):
    r0, r1 = h[:3] + 1.0, h[3:] * x[:3]
    return r0 * r1 + (r0.sum() + r1.sum())
def _v_stale_read(h, x):                        # a view read after its base changed
    r = h[2:5]
    h *= x.tanh()
    return r * 3.0 + h[0]
def _v_stale_read_twin(h, x):
    h = h * x.tanh()
    return h[2:5] * 3.0 + h[0]
def _v_split(h, x):
    a, b = h.split(3)
    b.sub_(x[:3] * x[3:])
    return tl.cat([h.exp(), a], 0)
def _v_split_twin(h, x):
    a, b = h[:3], h[3:] - x[:3] * x[3:]
    return tl.cat([tl.cat([a, b], 0).exp(), a], 0)


VIEW_PROGRAMS = ["reshape", "transpose", "permute3", "slice_of_slice", "unsqueeze", "two_rows", "stale_read",
                 "split"]


def _run_view(fn, x_np):
    x = t64(x_np)
    h = x * 1.0
    out = fn(h, x)
    loss = (out * out.tanh()).sum()
    loss.backward()
    return loss.item(), x.grad.numpy()


@pytest.mark.parametrize("name", VIEW_PROGRAMS)
def test_writes_through_views_equal_their_out_of_place_twins(name):
    x_np = np.random.default_rng(3).standard_normal(6) * 0.7
    ip = _run_view(globals()["_v_" + name], x_np)
    op = _run_view(globals()["_v_" + name + "_twin"], x_np)
    assert ip[0] == pytest.approx(op[0], rel=1e-13)
    np.testing.assert_allclose(ip[1], op[1], rtol=1e-12, atol=1e-13)

    def f(x):
        out = globals()["_v_" + name](x * 1.0, x)
        return out * out.tanh()
    assert tl.gradcheck(f, (t64(x_np),), atol=1e-7, rtol=1e-6)


def test_a_write_through_detach_or_expand_in_a_graph_is_refused():
    x = t64(np.arange(6.0))
    h = x * 1.0
    with pytest.raises(RuntimeError, match=r"shares its memory with another tensor \(taken by "
                                           r"\.detach\(\) or outside the graph\), and a write "
                                           r"through it cannot be recorded"):
        d = h.detach()
        d += x
    e = (x[:1] * 1.0).expand(6)
    with pytest.raises(RuntimeError, match=r"made by Expand\), and a write through it cannot"):
        e += x
    with pytest.raises(RuntimeError, match=r"read-only view \(made by \.expand\(\)"):
        with tl.no_grad():
            e += 1.0
    np.testing.assert_array_equal(h.numpy(), np.arange(6.0))   # and nothing was written
    with pytest.raises(RuntimeError, match=r"a leaf tensor that requires grad \(shape \(6,\)\) is "
                                           r"being used in an in-place operation"):
        x[0:2] += 1.0                   # through a view of a leaf: the leaf rule
    d = h.detach()
    h *= 2.0                            # d's memory changed under a recorded op: new values,
    np.testing.assert_array_equal((d * 1.0).numpy(), 2 * np.arange(6.0))   # no history to keep


def test_a_plain_buffer_written_through_a_view_by_a_tensor_that_needs_grad():
    x = t64([1.0, 2.0, 3.0])
    buf = tl.zeros(4, dtype=tl.float64)
    buf[1:3] += x[:2] * 2.0
    buf[0] = x[2]
    assert buf.requires_grad and buf.grad_fn.name == "IndexPut"
    (buf * buf).sum().backward()        # buf = [x2, 2 x0, 2 x1, 0]
    np.testing.assert_array_equal(x.grad.numpy(), [8.0, 16.0, 6.0])


def test_a_view_of_a_plain_buffer_taken_before_a_recorded_write_sees_its_gradient():
    """buf[1] taken while buf needed no grad, then buf[1] = x: the view's values are x's, so
    its history must lead to x (a helper's find: it used to lose that gradient)."""
    x = t64([1.0, 2.0, 3.0])
    buf = tl.zeros((2, 3), dtype=tl.float64)
    r = buf[1]
    buf[1] = x
    loss = (r * r).sum() + x.sum()
    loss.backward()
    assert loss.item() == 20.0
    np.testing.assert_array_equal(x.grad.numpy(), [3.0, 5.0, 7.0])
    x.grad = None
    buf2 = tl.zeros(3, dtype=tl.float64)
    v = buf2[:2]
    buf2 += x
    v *= 2.0                            # a write through a view taken before: recorded too
    buf2.sum().backward()
    np.testing.assert_array_equal(buf2.detach().numpy(), [2.0, 4.0, 3.0])
    np.testing.assert_array_equal(x.grad.numpy(), [2.0, 2.0, 1.0])


def test_views_share_the_version_counter_of_their_base():
    """An in-place change through a base (or a .detach()) of values a backward saved through
    a view is seen: before views shared counters, these gave a wrong gradient."""
    w = t64([1.0, 2.0])
    buf = tl.tensor([1.0, 1.0, 1.0, 1.0], dtype=tl.float64)
    y = (w * buf[0:2]).sum()    # Mul saves the view's values for w's gradient
    buf += 1                    # buf needs no grad: allowed, but the view's values changed
    with pytest.raises(RuntimeError, match=r"input 1 of Mul .* changed in place"):
        y.backward()
    z = w.exp()
    s = z.sum()
    z.detach().mul_(2.0)        # the same memory: Exp's saved output is gone
    with pytest.raises(RuntimeError, match="its output of Exp"):
        s.backward()


def test_inplace_result_must_keep_the_tensors_shape_and_float_dtype():
    h = t64([1.0, 2.0]) * 1.0
    with pytest.raises(RuntimeError, match=r"\+=: an operand of shape \(3, 2\) cannot be "
                                           r"written into a tensor of shape \(2,\)"):
        h += tl.zeros((3, 2), dtype=tl.float64)
    with pytest.raises(RuntimeError, match=r"setitem: a value of shape \(2,\) cannot be written "
                                           r"into t\[0\], of shape \(3,\)"):
        h2 = t64(np.ones((2, 3))) * 1.0
        h2[0] = tl.ones(2, dtype=tl.float64)
    n = tl.tensor([1, 2])
    with pytest.raises(TypeError, match="requires grad but the tensor changed in place has dtype int64"):
        n += t64([1.0, 2.0])


def test_inplace_on_zero_dim_results_of_ops():
    """(x * x).mean() used to hold a NumPy scalar, so loss /= n failed."""
    x = t64([1.0, 2.0])
    loss = (x * x).mean()
    loss /= 4
    loss.backward()
    np.testing.assert_array_equal(x.grad.numpy(), [0.25, 0.5])
    a, b = t64(-4.0), t64(2.0)          # micrograd's expression on true scalars
    g = _micrograd_more_ops(a, b, inplace=True)
    g.backward()
    assert g.item() == pytest.approx(_micrograd_more_ops_floats(-4.0, 2.0), rel=1e-14)
    with tl.no_grad():
        s = x.sum()
        s += 1
    assert s.item() == 4.0


def test_saved_inputs_of_log_sigmoid_and_rotary_are_checked():
    x = t64([-1.0, 0.5, 2.0])
    y = x * 1
    z = y.log_sigmoid()
    y += 5
    with pytest.raises(RuntimeError, match="input 0 of LogSigmoid .* changed in place"):
        z.sum().backward()


def test_changing_an_index_after_indexing_does_not_change_the_gradient():
    x = t64([1.0, 2.0, 3.0, 4.0])
    i = tl.tensor([0, 2])
    y = x[i]
    i[0] = 3
    (y * tl.tensor([10.0, 20.0], dtype=tl.float64)).sum().backward()
    np.testing.assert_array_equal(x.grad.numpy(), [10.0, 0.0, 20.0, 0.0])
    x.grad = None
    h = x * 1
    m = h < 2.5
    h[m] = 0.0
    m.fill_(True)
    h.sum().backward()
    np.testing.assert_array_equal(x.grad.numpy(), [0.0, 0.0, 1.0, 1.0])


def test_masked_fill_with_a_tensor_value_gets_its_gradient():
    x = t64([1.0, 2.0, 3.0])
    v = t64(2.5)
    y = x * 2
    y.masked_fill_(x > 1, v)
    y.sum().backward()
    assert v.grad.item() == 2.0
    np.testing.assert_array_equal(x.grad.numpy(), [2.0, 0.0, 0.0])
    with pytest.raises(ValueError, match="one-element tensor"):
        x.masked_fill(x > 1, t64([1.0, 2.0]))


def test_setitem_with_a_value_that_has_extra_leading_ones():
    x = t64([1.0, 2.0, 3.0])
    v = t64([[4.0, 5.0, 6.0]])
    y = tl.zeros((2, 3), dtype=tl.float64) + x
    y[0] = v
    (y * 2).sum().backward()
    np.testing.assert_array_equal(v.grad.numpy(), [[2.0, 2.0, 2.0]])
    np.testing.assert_array_equal(x.grad.numpy(), [2.0, 2.0, 2.0])


def test_inplace_mistakes_outside_a_graph_are_clear():
    p = tl.tensor([1.0, 2.0])
    with pytest.raises(RuntimeError, match=r"\+=: an operand of shape \(3, 2\) cannot be written "
                                           r"into a tensor of shape \(2,\)"):
        p += tl.zeros((3, 2))
    with pytest.raises(RuntimeError, match=r"copy_: a source of shape \(3,\) cannot be copied "
                                           r"into a tensor of shape \(2,\)"):
        p.copy_(tl.zeros(3))
    n = tl.tensor([1, 2])
    with pytest.raises(TypeError, match=r"\+=: the result \(float operand\) cannot be stored in "
                                        r"a tensor of dtype int64 in place"):
        n += 1.5


# ----------------------------------------------------------------------------- second review
def test_contiguous_of_a_non_contiguous_tensor_is_a_copy():
    a = t64([[1.0, 2.0], [3.0, 4.0]])
    h = a * 1
    y = h.T.contiguous()
    y.mul_(10.0)
    (h + y.T).sum().backward()
    np.testing.assert_array_equal(h.detach().numpy(), [[1.0, 2.0], [3.0, 4.0]])
    np.testing.assert_array_equal(a.grad.numpy(), np.full((2, 2), 11.0))
    assert h.contiguous() is h                       # already contiguous: itself, as PyTorch


def test_numpy_and_zero_dim_integer_indices_give_views():
    x = tl.zeros((2, 3))
    x[np.int64(1)].fill_(7.0)
    x[tl.tensor(0)][np.array(2)] = 5.0
    np.testing.assert_array_equal(x.numpy(), [[0, 0, 5], [7, 7, 7]])
    a = t64([1.0, 1.0])
    h = a * 1
    h[np.int64(0)].mul_(5.0)
    h.sum().backward()
    np.testing.assert_array_equal(h.detach().numpy(), [5.0, 1.0])
    np.testing.assert_array_equal(a.grad.numpy(), [5.0, 1.0])


def test_tl_tensor_always_copies():
    arr = np.array([1.0, 2.0])
    t = tl.tensor(arr)
    t += 1
    np.testing.assert_array_equal(arr, [1.0, 2.0])
    a = t64([0.0, 1.0])
    h = a.exp()
    b = tl.tensor(h)
    b += 1
    h.sum().backward()
    np.testing.assert_allclose(a.grad.numpy(), np.exp([0.0, 1.0]), rtol=1e-15)


def test_a_view_taken_under_no_grad_then_written_is_recorded_on_its_base():
    a = t64([1.0, 2.0])
    h = a * 2
    with tl.no_grad():
        v = h[0]
    v.fill_(5.0)                     # h = [5, 4]: (h * a).sum() = 5 a0 + 2 a1^2
    (h * a).sum().backward()
    np.testing.assert_array_equal(a.grad.numpy(), [5.0, 8.0])


def test_detached_and_expanded_tensors_stay_usable_after_their_base_changes():
    a = t64([1.0, 2.0])
    h = a * 2
    d = h.detach()
    e = h.expand(3, 2)
    h += 1
    np.testing.assert_array_equal((d + 1).numpy(), [4.0, 6.0])
    (e * 1).sum().backward()                         # e is the same view of the new h
    np.testing.assert_array_equal(a.grad.numpy(), [6.0, 6.0])


def test_dividing_then_changing_the_quotient_in_place():
    a = t64([1.0, 3.0])
    x = a * 1
    x = x / x.sum()
    x *= 2
    (x * x).sum().backward()
    # x = 2 a / s, s = a0 + a1 = 4; L = 4 (a0^2 + a1^2) / s^2
    s = 4.0
    expected = [8 * a0 / s ** 2 - 8 * (1.0 + 9.0) / s ** 3 for a0 in (1.0, 3.0)]
    np.testing.assert_allclose(a.grad.numpy(), expected, rtol=1e-14)


def test_a_view_of_a_leaf_serves_two_backwards():
    w = t64([[1.0, 2.0], [3.0, 4.0]])
    wt = w.T
    for i in range(2):
        (wt * (i + 1)).sum().backward()
    np.testing.assert_array_equal(w.grad.numpy(), np.full((2, 2), 3.0))


def test_leaf_message_through_views_names_the_op_once_and_detach__forgets_the_past():
    a = t64([[1.0, 2.0], [3.0, 4.0]])
    with pytest.raises(RuntimeError, match=r"^\+= \(through a view of it\): a leaf tensor"):
        a.T.T[0] += 1
    state = tl.zeros(3, dtype=tl.float64)
    for _ in range(5):
        state[:] = a[0, :1] * tl.ones(3, dtype=tl.float64)
        state.detach_()
    assert state._past is None
