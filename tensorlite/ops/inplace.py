"""In-place ops (``x += y``, ``x[idx] = v``, ``x.mul_(y)``, ``x.clamp_(...)``, ...) and how
autograd records them, as PyTorch does.

Outside a graph (under ``no_grad``, or when neither the tensor nor an operand requires grad)
an in-place op writes into the tensor's array and bumps its version counter, so that a
backward that saved the old values can tell (``_check_versions`` in tensor.py).

Inside a graph the op is recorded: the new value is computed by the out-of-place op, written
into the tensor's array (every view of that memory sees it, as in PyTorch), and the tensor's
history is *rebased* onto that op. Ops recorded earlier that used the tensor must still send
their gradients to its earlier value, so that value gets a stand-in Tensor (``old``) that
takes over the history it had; each op recorded the version of each input it used, and
``Function.inputs()`` maps (tensor, version) to the stand-in. So

    c = a + b
    c += c + 1        # c + 1 used c at version 0; the += records Add(old c, c + 1)
    (c * 2).sum().backward()   # a.grad = b.grad = 4

Views (x[idx], reshape/view, transpose/permute, squeeze/unsqueeze, split/chunk) share their
base's memory and version counter, and know how they were made. A write through a view is
recorded on its base as the base's new value (``unview``: for x[idx], ``x[idx] = new``, as
PyTorch's CopySlices), down a chain of views to the first base; then the view's history is the
same view of the new base. A view taken before its base was changed by a recorded op is given
that history when it is next used (``refresh_view``), as PyTorch regenerates a view's grad_fn.

Refused, each with an error that says what to do instead: a leaf that requires grad (PyTorch's
rule), and a write through memory shared some other way (.detach(), .expand()).
A backward that needs a value an in-place op overwrote raises the version error.
"""
from __future__ import annotations

import numpy as np

from .. import backend
from ..tensor import Tensor, enable_grad, is_grad_enabled, no_grad
from . import elementwise as _ew
from . import indexing as _ix


def _stale(t: Tensor) -> bool:
    """A view taken before its base was changed by a recorded in-place op."""
    return t._vgw is not None and t._vgw != t._vc[1]


def _view_root(t: Tensor) -> Tensor:
    """The tensor whose memory view ``t`` shows (t itself if it is not a view)."""
    while t._view_src is not None:
        t = t._view_src[0]
    return t


def _recorded(t: Tensor, operands) -> bool:
    """Whether changing ``t`` with these operands is part of a graph: t or an operand requires
    grad, or t is a view (taken under no_grad, or stale) of a tensor in a graph."""
    if not is_grad_enabled():
        return False
    if t.requires_grad or _stale(t) or any(isinstance(o, Tensor) and o.requires_grad
                                           for o in operands):
        return True
    return t._view_src is not None and _view_root(t).requires_grad


def _reads(ctx, old: Tensor) -> bool:
    """Whether ``ctx``'s backward will read the values of its input ``old``."""
    return ctx is not None and any(
        i < len(ctx.parents) and ctx.parents[i] is old for i in ctx.saved_values()[0])


def _view_refusal(t: Tensor, what: str) -> str:
    how = (f"made by {t._view_src[1].__name__}" if t._view_src is not None
           else "taken by .detach() or outside the graph")
    return (f"{what}: this tensor (shape {t.shape}) shares its memory with another tensor "
            f"({how}), and a write through it cannot be recorded on that tensor; change a copy "
            f"(v = v.clone()) or use an out-of-place op (v = v + 1)")


def _stand_in(t: Tensor, compute):
    """(old, new): ``old`` a stand-in for t's current value and history, ``new`` =
    compute(old), computed out of place and recorded."""
    old = Tensor._make(t.data, t.requires_grad, t._ctx)
    old._vc = [t._vc[0] + 1, 0]   # its memory is about to change: its own producer can tell
    old._hooks = t._hooks         # hooks registered so far see the gradient of the old value
    new = compute(old)
    if _reads(new._ctx, old):
        # its backward needs the values we are about to overwrite (x.mul_(w), w needing
        # grad): give it its own copy, as PyTorch saves the original self
        old.data = t.data.copy()
        new = compute(old)
    return old, new


def _rebase(t: Tensor, old: Tensor, ctx, requires_grad: bool) -> None:
    """t's history is now ``ctx``; ops that used t so far (versions below the current one)
    reach ``old`` instead."""
    t._past = (t._past or ()) + ((t._vc[0], old),)
    t._hooks = None
    t._ctx = ctx
    t.requires_grad = requires_grad


def _check_result(t: Tensor, new: Tensor, what: str) -> None:
    if new.shape != t.shape:
        raise RuntimeError(f"{what}: the result has shape {new.shape}, but the tensor changed in "
                           f"place has shape {t.shape}; an in-place op cannot change a tensor's "
                           f"shape (broadcast the other way, or use an out-of-place op)")
    if new.requires_grad and t.dtype.kind != "f":
        raise TypeError(f"{what}: the result requires grad but the tensor changed in place has "
                        f"dtype {t.dtype}; only float tensors can hold it")


def record(t: Tensor, what: str, compute) -> Tensor:
    """Change ``t`` in place to ``compute(old)`` (a Tensor of t's shape, computed out of place
    from ``old``, the stand-in for t's current value), recording it in the graph."""
    if t._vgw is not None:
        return _record_through_view(t, what, compute)
    if t._ctx is None and t.requires_grad:
        raise RuntimeError(
            f"{what}: a leaf tensor that requires grad (shape {t.shape}) is being used in an "
            f"in-place operation; do it under tl.no_grad() (as optimizers do), or change a copy "
            f"(w.clone())")
    old, new = _stand_in(t, compute)
    _check_result(t, new, what)
    t.data[...] = new.data
    t._vc[0] += 1
    t._vc[1] += 1            # views taken before now are stale (see refresh_view)
    _rebase(t, old, new._ctx, new.requires_grad)
    if t._ctx is not None:
        t._ctx.out_version = None   # an output it saved is `new`'s own array, not t's memory
    return t


def _record_through_view(t: Tensor, what: str, compute) -> Tensor:
    """``v = x[idx]; v += 1`` (and so ``x[idx] += 1``, ``x.view(-1).mul_(2)``,
    ``x.T[0] = 0``): recorded on the base as its new value (the view op's ``unview``: for
    x[idx], ``x[idx] = v + 1``, as PyTorch's CopySlices), then the view's history becomes
    the same view of the new base. A view of a view goes down the chain to the first base."""
    if _stale(t):
        refresh_view(t, what)
    src = t._view_src
    if src is None or not hasattr(src[1], "unview"):
        raise RuntimeError(_view_refusal(t, what))
    base, cls, params = src
    old, new = _stand_in(t, compute)
    _check_result(t, new, what)
    through = what if what.endswith("(through a view of it)") else f"{what} (through a view of it)"
    record(base, through, lambda old_base: cls.unview(old_base, new, **params))
    with enable_grad():
        _remake(t, old)
    return t


def _remake(t: Tensor, old: Tensor) -> None:
    """Give view ``t`` the history of the same view of its base as it is now."""
    base, cls, params = t._view_src
    fresh = cls.apply(base, **params)      # (a new array on the same memory; t keeps its own)
    _rebase(t, old, fresh._ctx, fresh.requires_grad)
    t._vgw = t._vc[1]


def refresh_view(t: Tensor, what: str) -> None:
    """A view taken before its base was changed by a recorded op is about to be used (or
    written): its values are the base's new ones, so its history becomes that view of the new
    base, as PyTorch regenerates a view's grad_fn. Ops that used it before keep its old
    history. A view that does not know its base (``.detach()``) cannot: refused."""
    src = t._view_src
    if src is None:          # .detach(): no history to give, its values are simply the new ones
        t._vgw = t._vc[1]
        return
    base = src[0]
    if _stale(base):
        refresh_view(base, what)
    old = Tensor._make(t.data, t.requires_grad, t._ctx)
    old._vc = [t._vc[0], 0]       # its values changed: a producer that saved them can tell
    old._hooks = t._hooks
    with enable_grad():
        _remake(t, old)


def _check_operand(t: Tensor, operand, what: str) -> None:
    """An operand of an in-place op must broadcast to the tensor's own shape."""
    shape = getattr(operand, "shape", None)
    if shape is not None and tuple(shape) != t.shape:
        try:
            fits = backend.xp_of(t.data).broadcast_shapes(tuple(shape), t.shape) == t.shape
        except ValueError:
            fits = False
        if not fits:
            raise RuntimeError(f"{what}: an operand of shape {tuple(shape)} cannot be written "
                               f"into a tensor of shape {t.shape} in place (it must broadcast "
                               f"to that shape); use an out-of-place op")


def _write(t: Tensor, change, what: str, operand=None) -> Tensor:
    """Outside a graph: change t's array in place and bump its version, with NumPy's errors
    for read-only memory or a dtype that cannot be written said in tensorlite's words (the
    callers check an operand's shape first)."""
    if not t.data.flags.writeable:
        raise RuntimeError(f"{what}: this tensor (shape {t.shape}) is a read-only view (made by "
                           f".expand(), whose elements share memory); change a copy "
                           f"(v = v.clone()) instead")
    try:
        change(t.data)
    except TypeError as e:
        odt = getattr(operand, "dtype", type(operand).__name__)
        raise TypeError(f"{what}: the result ({odt} operand) cannot be stored in a tensor of "
                        f"dtype {t.dtype} in place ({e}); use an out-of-place op, or convert "
                        f"first (.float())") from None
    t._vc[0] += 1
    return t


def _arr(o):
    return o.data if isinstance(o, Tensor) else o


def _arithmetic(name: str, op, inplace_name: str):
    """``t op= o``: in a graph, the out-of-place op recorded; outside, NumPy's in-place op."""
    def f(t: Tensor, o, what: str = name) -> Tensor:
        _check_operand(t, o, what)
        if _recorded(t, (o,)):
            return record(t, what, lambda old: op(old, o))
        return _write(t, lambda a: getattr(a, inplace_name)(_arr(o)), what, o)
    f.__name__ = name
    return f


add_ = _arithmetic("add_", _ew.add, "__iadd__")
sub_ = _arithmetic("sub_", _ew.sub, "__isub__")
mul_ = _arithmetic("mul_", _ew.mul, "__imul__")
div_ = _arithmetic("div_", _ew.div, "__itruediv__")


def clip_(t: Tensor, min=None, max=None) -> Tensor:
    if _recorded(t, ()):
        return record(t, "clamp_", lambda old: _ew.clip(old, min, max))
    with no_grad():
        new = _ew.clip(t, min, max).data    # (its checks of min and max)
    return _write(t, lambda a: a.__setitem__(Ellipsis, new), "clamp_")


def masked_fill_(t: Tensor, mask, value) -> Tensor:
    if _recorded(t, (value,)):
        return record(t, "masked_fill_", lambda old: _ix.masked_fill(old, mask, value))
    with no_grad():
        new = _ix.masked_fill(t, mask, value).data
    return _write(t, lambda a: a.__setitem__(Ellipsis, new), "masked_fill_")


def _assignable(vshape: tuple, tshape: tuple) -> bool:
    """NumPy's rule for ``a[idx] = v``: v's extra leading 1-dims dropped, then broadcast."""
    while len(vshape) > len(tshape) and vshape[0] == 1:
        vshape = vshape[1:]
    try:
        return tuple(np.broadcast_shapes(vshape, tshape)) == tuple(tshape)
    except ValueError:
        return False


def setitem_(t: Tensor, idx, value) -> None:
    """``t[idx] = value``."""
    arr_idx = _ix.index_arrays(t, idx)
    vshape = tuple(getattr(value, "shape", ()))
    if vshape:                       # an array value must fit the target (a number always does)
        try:
            target = t.data[arr_idx].shape
        except IndexError as e:
            raise IndexError(f"index {idx!r} is invalid for a tensor of shape {t.shape}: {e}") from None
        if not _assignable(vshape, target):
            raise RuntimeError(f"setitem: a value of shape {vshape} cannot be written into "
                               f"t[{idx!r}], of shape {target} (it must broadcast to that shape)")
    if _recorded(t, (value,)):
        if isinstance(value, Tensor):
            _ew.check_same_device("setitem", t, value)
        record(t, "setitem", lambda old: _ix.IndexPut.apply(old, value, idx=arr_idx))
        return
    _write(t, lambda a: a.__setitem__(arr_idx, _arr(value)), "setitem")


def copy_(t: Tensor, src) -> Tensor:
    """``t``'s values become ``src``'s (broadcast to t's shape, cast to its dtype, moved to
    its device); in a graph src gets the gradient and t's old value none."""
    arr = _arr(src)
    shape = tuple(getattr(arr, "shape", ()))
    try:
        fits = backend.xp_of(t.data).broadcast_shapes(shape, t.shape) == t.shape
    except ValueError:
        fits = False
    if not fits:
        raise RuntimeError(f"copy_: a source of shape {shape} cannot be copied into a tensor of "
                           f"shape {t.shape} (it must broadcast to that shape)")
    if backend.device_of(arr) != t.device:
        if isinstance(src, Tensor):
            src = src.to(t.device)
        arr = backend.to_device(arr, t.device)
    if _recorded(t, (src,)):
        return record(t, "copy_", lambda old: _ew.Fill.apply(old, src))
    return _write(t, lambda a: a.__setitem__(Ellipsis, arr), "copy_", arr)


def fill_(t: Tensor, value, what: str = "fill_") -> Tensor:
    if isinstance(value, Tensor):
        return copy_(t, value)
    if _recorded(t, ()):
        return record(t, what, lambda old: _ew.Fill.apply(old, value))
    return _write(t, lambda a: a.__setitem__(Ellipsis, value), what)


def overwrite_(t: Tensor, make, what: str) -> Tensor:
    """``t``'s values become ``make()`` (an array), whatever they were (normal_, uniform_)."""
    if _recorded(t, ()):
        return record(t, what, lambda old: _ew.Fill.apply(old, make()))
    return _write(t, lambda a: a.__setitem__(Ellipsis, make()), what)
