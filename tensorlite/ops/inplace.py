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

Refused, each with an error that says what to do instead:
- a leaf that requires grad (PyTorch's rule: its .grad would be the gradient of which value?);
- a write through a view (a reshape, transpose or .detach() result) would change the other
  tensor behind its history's back, so it is refused, except for ``x[idx]`` (basic indexing)
  of a tensor that is not itself a view: ``x[idx] += v`` / ``v = x[idx]; v *= 2`` are
  recorded on x as ``x[idx] = x[idx] + v`` (IndexPut), as PyTorch's CopySlices does;
- using a view taken before its base was changed by a recorded in-place op (its values are
  new, its history is not): checked in ``Function.apply``.
A backward that needs a value an in-place op overwrote raises the version error, as before.
"""
from __future__ import annotations

from .. import backend
from ..tensor import Tensor, is_grad_enabled, no_grad
from . import elementwise as _ew
from . import indexing as _ix


def _recorded(t: Tensor, operands) -> bool:
    """Whether changing ``t`` with these operands is part of a graph."""
    return is_grad_enabled() and (t.requires_grad or any(
        isinstance(o, Tensor) and o.requires_grad for o in operands))


def _reads(ctx, old: Tensor) -> bool:
    """Whether ``ctx``'s backward will read the values of its input ``old``."""
    return ctx is not None and any(
        i < len(ctx.parents) and ctx.parents[i] is old for i in ctx.saved_values()[0])


def _view_refusal(t: Tensor, what: str) -> str:
    if t._view_src is not None and t._vgw != t._vc[1]:
        return (f"{what}: this tensor (shape {t.shape}) is a view of a tensor that was changed "
                f"in place by a recorded op after the view was taken; take the view again")
    made = f"made by {t._ctx.name}" if t._ctx is not None else "taken outside the graph or by .detach()"
    return (f"{what}: this tensor (shape {t.shape}) is a view of another tensor's memory ({made}); "
            f"tensorlite records a write through a view only for x[idx] of a tensor that is not "
            f"itself a view, so the other tensor's history would not show this change. Change "
            f"the tensor it views instead (x[idx] += 1), make this one its own copy first "
            f"(v = v.clone()), or use an out-of-place op (v = v + 1)")


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
    if new.shape != t.shape:
        raise RuntimeError(f"{what}: the result has shape {new.shape}, but the tensor changed in "
                           f"place has shape {t.shape}; an in-place op cannot grow a tensor "
                           f"(broadcast the other way, or use an out-of-place op)")
    if new.requires_grad and t.dtype.kind != "f":
        raise TypeError(f"{what}: the result requires grad but the tensor changed in place has "
                        f"dtype {t.dtype}; only float tensors can hold it")
    t.data[...] = new.data
    t._vc[0] += 1
    t._vc[1] += 1            # views taken before now are stale (Function.apply refuses them)
    _rebase(t, old, new._ctx, new.requires_grad)
    if t._ctx is not None:
        t._ctx.out_version = None   # an output it saved is `new`'s own array, not t's memory
    return t


def _record_through_view(t: Tensor, what: str, compute) -> Tensor:
    """``v = x[idx]; v += 1`` (and so ``x[idx] += 1``): recorded as ``x[idx] = v + 1`` on the
    base, then v's history becomes ``x[idx]`` of the new x. Only for a view made by basic
    indexing of a tensor that is not itself a view; other views are refused."""
    src = t._view_src
    if src is None or src[0]._vgw is not None or t._vgw != t._vc[1]:
        raise RuntimeError(_view_refusal(t, what))
    base, idx = src
    old, new = _stand_in(t, compute)
    if new.shape != t.shape:
        raise RuntimeError(f"{what}: the result has shape {new.shape}, but the view changed in "
                           f"place has shape {t.shape}")
    record(base, f"{what} (through a view of it)", lambda old_base: _ix.IndexPut.apply(
        old_base, new, idx=idx))
    fresh = _ix.GetItem.apply(base, idx=idx, advanced=False)   # t's memory, now recorded
    _rebase(t, old, fresh._ctx, fresh.requires_grad)
    t._vgw = t._vc[1]
    return t


def _write(t: Tensor, change) -> Tensor:
    """Outside a graph: change t's array in place and bump its version."""
    change(t.data)
    t._vc[0] += 1
    return t


def _arr(o):
    return o.data if isinstance(o, Tensor) else o


def add_(t: Tensor, o, what: str = "add_") -> Tensor:
    if _recorded(t, (o,)):
        return record(t, what, lambda old: _ew.add(old, o))
    return _write(t, lambda a: a.__iadd__(_arr(o)))


def sub_(t: Tensor, o, what: str = "sub_") -> Tensor:
    if _recorded(t, (o,)):
        return record(t, what, lambda old: _ew.sub(old, o))
    return _write(t, lambda a: a.__isub__(_arr(o)))


def mul_(t: Tensor, o, what: str = "mul_") -> Tensor:
    if _recorded(t, (o,)):
        return record(t, what, lambda old: _ew.mul(old, o))
    return _write(t, lambda a: a.__imul__(_arr(o)))


def div_(t: Tensor, o, what: str = "div_") -> Tensor:
    if _recorded(t, (o,)):
        return record(t, what, lambda old: _ew.div(old, o))
    return _write(t, lambda a: a.__itruediv__(_arr(o)))


def clip_(t: Tensor, min=None, max=None) -> Tensor:
    if _recorded(t, ()):
        return record(t, "clamp_", lambda old: _ew.clip(old, min, max))
    with no_grad():
        new = _ew.clip(t, min, max).data    # (its checks of min and max)
    return _write(t, lambda a: a.__setitem__(Ellipsis, new))


def masked_fill_(t: Tensor, mask, value) -> Tensor:
    if _recorded(t, (value,)):
        return record(t, "masked_fill_", lambda old: _ix.masked_fill(old, mask, value))
    with no_grad():
        new = _ix.masked_fill(t, mask, value).data
    return _write(t, lambda a: a.__setitem__(Ellipsis, new))


def setitem_(t: Tensor, idx, value) -> None:
    """``t[idx] = value``."""
    arr_idx = _ix.index_arrays(t, idx)
    if _recorded(t, (value,)):
        if isinstance(value, Tensor):
            _ew.check_same_device("setitem", t, value)
        record(t, "setitem", lambda old: _ix.IndexPut.apply(old, value, idx=arr_idx))
        return
    _write(t, lambda a: a.__setitem__(arr_idx, _arr(value)))


def copy_(t: Tensor, src) -> Tensor:
    """``t``'s values become ``src``'s (broadcast to t's shape, cast to its dtype, moved to
    its device); in a graph src gets the gradient and t's old value none."""
    arr = _arr(src)
    if backend.device_of(arr) != t.device:
        if isinstance(src, Tensor):
            src = src.to(t.device)
        arr = backend.to_device(arr, t.device)
    if _recorded(t, (src,)):
        return record(t, "copy_", lambda old: _ew.Fill.apply(old, src))
    return _write(t, lambda a: a.__setitem__(Ellipsis, arr))


def fill_(t: Tensor, value, what: str = "fill_") -> Tensor:
    if isinstance(value, Tensor):
        return copy_(t, value)
    if _recorded(t, ()):
        return record(t, what, lambda old: _ew.Fill.apply(old, value))
    return _write(t, lambda a: a.__setitem__(Ellipsis, value))


def overwrite_(t: Tensor, make, what: str) -> Tensor:
    """``t``'s values become ``make()`` (an array), whatever they were (normal_, uniform_)."""
    if _recorded(t, ()):
        return record(t, what, lambda old: _ew.Fill.apply(old, make()))
    return _write(t, lambda a: a.__setitem__(Ellipsis, make()))
