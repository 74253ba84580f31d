"""Backends: NumPy always, CuPy when it is installed and a GPU is present.

Op code never names ``numpy`` directly: it asks ``xp_of(array)`` for the array module of
its data, as CuPy's ``get_array_module`` does, so one body runs on both.
"""
from __future__ import annotations

import numpy as np

try:  # CuPy imports fine without a GPU; only the first allocation fails.
    import cupy as _cupy
except Exception:  # pragma: no cover - depends on the machine
    _cupy = None

_CUDA_OK: bool | None = None
_CUDA_WHY = ""


def cuda_available() -> bool:
    """True when CuPy is installed and can allocate on a GPU."""
    global _CUDA_OK, _CUDA_WHY
    if _CUDA_OK is None:
        if _cupy is None:
            _CUDA_OK, _CUDA_WHY = False, "CuPy is not installed (pip install 'tensorlite[gpu]')"
        else:
            try:
                _CUDA_OK = bool(_cupy.is_available())
                if not _CUDA_OK:
                    _CUDA_WHY = "CuPy is installed but no CUDA GPU is available"
            except Exception as e:  # pragma: no cover
                _CUDA_OK, _CUDA_WHY = False, f"CuPy cannot reach a GPU: {e}"
    return _CUDA_OK


def cuda_unavailable_reason() -> str:
    cuda_available()
    return _CUDA_WHY


def xp_of(a):
    """The array module (numpy or cupy) that owns array ``a``."""
    if type(a) is np.ndarray or _cupy is None:
        return np
    return _cupy if isinstance(a, _cupy.ndarray) else np


def is_cupy_array(a) -> bool:
    return _cupy is not None and isinstance(a, _cupy.ndarray)


def device_of(a) -> str:
    """'cpu' for NumPy data, 'cuda:N' for CuPy data."""
    if type(a) is np.ndarray or not is_cupy_array(a):
        return "cpu"
    return f"cuda:{a.device.id}"


def parse_device(device) -> tuple[str, int]:
    """'cpu' -> ('cpu', 0); 'cuda' / 'cuda:N' -> ('cuda', N). Anything else is an error."""
    if device is None:
        return "cpu", 0
    s = str(device).strip().lower()
    if s == "cpu":
        return "cpu", 0
    if s == "cuda" or s == "gpu":
        return "cuda", 0
    if s.startswith("cuda:") and s[5:].isdigit():
        return "cuda", int(s[5:])
    raise ValueError(f"unknown device {device!r}: use 'cpu', 'cuda' or 'cuda:N'")


def array_module(device) -> object:
    """numpy for 'cpu', cupy for 'cuda[:N]' (a clear error when no GPU is usable)."""
    kind, _ = parse_device(device)
    if kind == "cpu":
        return np
    if not cuda_available():
        raise RuntimeError(f"device {device!r} requested but {cuda_unavailable_reason()}; use device='cpu'")
    return _cupy


def to_device(a, device):
    """Copy array ``a`` to ``device`` (no copy when it is already there)."""
    kind, idx = parse_device(device)
    if kind == "cpu":
        return _cupy.asnumpy(a) if is_cupy_array(a) else a
    array_module(device)
    with _cupy.cuda.Device(idx):
        if is_cupy_array(a) and a.device.id == idx:
            return a
        return _cupy.asarray(a)


def to_numpy(a) -> np.ndarray:
    return _cupy.asnumpy(a) if is_cupy_array(a) else np.asarray(a)


def scatter_add(xp, target, index, values):
    """target[index] += values, accumulating repeated indices (in place)."""
    if xp is np:
        if isinstance(index, np.ndarray) and index.ndim == 1 and index.dtype.kind in "iu" \
                and values.ndim == target.ndim and index.size > 64:
            # rows of an embedding gradient: sort the ids, sum each run of equal ids with one
            # reduceat, add once per distinct id (measured: 0.36 vs 1.65 ms for np.add.at on
            # 2048 rows of 128 into 256; 3.5 vs 5.0 ms for 2048 x 384 into 4096;
            # the stable sort fixes the order of the sums, so it is deterministic)
            index = np.where(index < 0, index + target.shape[0], index)  # -1 and n-1: one row
            order = np.argsort(index, kind="stable")
            ids = index[order]
            starts = np.flatnonzero(np.concatenate(([True], ids[1:] != ids[:-1])))
            target[ids[starts]] += np.add.reduceat(values[order], starts, axis=0)
            return
        np.add.at(target, index, values)
    else:  # pragma: no cover - GPU only
        import cupyx
        cupyx.scatter_add(target, index, values)
