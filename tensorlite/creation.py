"""Tensor constructors with PyTorch's names: tensor, zeros, ones, full, arange, randn, rand, ..."""
from __future__ import annotations

import numpy as np

from . import backend, random
from .tensor import Tensor, as_dtype, get_default_dtype


def _shape(shape) -> tuple:
    if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
        shape = tuple(shape[0])
    for n in shape:
        if not isinstance(n, (int, np.integer)) or n < 0:
            raise ValueError(f"invalid shape {tuple(shape)}: sizes must be non-negative ints")
    return tuple(int(n) for n in shape)


def _float_dtype(dtype):
    return as_dtype(dtype) if dtype is not None else get_default_dtype()


def _make(arr, requires_grad):
    t = Tensor._make(arr, False, None)
    if requires_grad:
        t.requires_grad_(True)
    return t


def tensor(data, dtype=None, device="cpu", requires_grad=False) -> Tensor:
    """A new tensor from Python data, an array or a tensor (Python floats become float32).
    Always a copy, as ``torch.tensor``: changing one never changes the other."""
    t = Tensor(data, dtype=dtype, device=device, requires_grad=False)
    src = data.data if isinstance(data, Tensor) else data
    if t.data is src or (hasattr(src, "shape") and backend.xp_of(t.data).may_share_memory(t.data, src)):
        t.data = t.data.copy(order="K")
    if requires_grad:
        t.requires_grad_(True)
    return t


def zeros(*shape, dtype=None, device="cpu", requires_grad=False) -> Tensor:
    xp = backend.array_module(device)
    return _make(backend.to_device(xp.zeros(_shape(shape), dtype=_float_dtype(dtype)), device),
                 requires_grad)


def ones(*shape, dtype=None, device="cpu", requires_grad=False) -> Tensor:
    xp = backend.array_module(device)
    return _make(backend.to_device(xp.ones(_shape(shape), dtype=_float_dtype(dtype)), device),
                 requires_grad)


def full(shape, fill_value, dtype=None, device="cpu", requires_grad=False) -> Tensor:
    xp = backend.array_module(device)
    if dtype is None:
        dtype = (np.bool_ if isinstance(fill_value, bool) else np.int64
                 if isinstance(fill_value, int) else get_default_dtype())
    arr = xp.full(_shape((shape,) if isinstance(shape, int) else (shape,)), fill_value,
                  dtype=as_dtype(dtype))
    return _make(backend.to_device(arr, device), requires_grad)


def zeros_like(t: Tensor, dtype=None, requires_grad=False) -> Tensor:
    return zeros(t.shape, dtype=dtype or t.dtype, device=t.device, requires_grad=requires_grad)


def ones_like(t: Tensor, dtype=None, requires_grad=False) -> Tensor:
    return ones(t.shape, dtype=dtype or t.dtype, device=t.device, requires_grad=requires_grad)


def arange(start, end=None, step=1, dtype=None, device="cpu", requires_grad=False) -> Tensor:
    if end is None:
        start, end = 0, start
    if step == 0:
        raise ValueError("arange: step must be non-zero")
    if dtype is None:
        ints = all(isinstance(v, (int, np.integer)) for v in (start, end, step))
        dtype = np.int64 if ints else get_default_dtype()
    xp = backend.array_module(device)
    return _make(backend.to_device(xp.arange(start, end, step, dtype=as_dtype(dtype)), device),
                 requires_grad)


def eye(n: int, m: int | None = None, dtype=None, device="cpu") -> Tensor:
    xp = backend.array_module(device)
    return _make(backend.to_device(xp.eye(n, m, dtype=_float_dtype(dtype)), device), False)


def randn(*shape, dtype=None, device="cpu", requires_grad=False, generator=None) -> Tensor:
    """Standard normal samples from the seeded global generator (see ``manual_seed``)."""
    dt = _float_dtype(dtype)
    backend.array_module(device)
    return _make(random.randn_array(_shape(shape), dt, device, generator), requires_grad)


def rand(*shape, dtype=None, device="cpu", requires_grad=False, generator=None) -> Tensor:
    """Uniform samples in [0, 1)."""
    dt = _float_dtype(dtype)
    backend.array_module(device)
    return _make(random.rand_array(_shape(shape), dt, device, generator), requires_grad)


def randint(low, high, size, device="cpu", generator=None) -> Tensor:
    if high <= low:
        raise ValueError(f"randint: high={high} must be greater than low={low}")
    backend.array_module(device)
    return _make(random.randint_array(low, high, _shape(tuple(size)), device, generator), False)
