"""Gradient checking: analytic gradients (backward) against central differences.

``fn`` may return a tensor of any shape. Both sides are taken of the scalar
``L(x) = sum(w * fn(x))`` for one fixed random ``w``: the analytic side is ``backward(w)``
(a vector-Jacobian product), the numeric side perturbs each input element by +-eps. A random
``w`` catches a wrong Jacobian with probability one, at the cost of one backward instead of
one per output element.

All arithmetic is float64: inputs are cast (a float32 gradcheck measures rounding, not
calculus). For large inputs, ``gradcheck_directional`` compares one directional derivative
(``dL/dx . u`` for a random ``u``) instead of every element.
"""
from __future__ import annotations

import numpy as np

from . import backend
from .tensor import Tensor, float64, no_grad


class GradcheckError(AssertionError):
    pass


def _prepare(inputs):
    if isinstance(inputs, Tensor):
        inputs = (inputs,)
    inputs = tuple(inputs)
    for t in inputs:
        if isinstance(t, Tensor) and t.requires_grad and t.dtype != float64:
            raise TypeError(f"gradcheck: input of dtype {t.dtype} requires grad; gradcheck needs "
                            "float64 inputs (use .double()): float32 rounding swamps the check")
    wrt = [t for t in inputs if isinstance(t, Tensor) and t.requires_grad]
    if not wrt:
        raise ValueError("gradcheck: no input has requires_grad=True: nothing to check")
    return inputs, wrt


def _scalar_fn(fn, inputs, w):
    """L(inputs) = sum(w * fn(inputs)) as a float, without building a graph."""
    with no_grad():
        out = fn(*inputs)
    return float(backend.to_numpy((out.data * w).sum()))


def _analytic(fn, inputs, wrt, seed):
    for t in wrt:
        t.grad = None
    out = fn(*inputs)
    if not isinstance(out, Tensor):
        raise TypeError(f"gradcheck: fn must return a Tensor, got {type(out).__name__}")
    if out.dtype != float64:
        raise TypeError(f"gradcheck: fn returned {out.dtype}; with float64 inputs every op should "
                        "stay float64 (an op is downcasting)")
    rng = np.random.default_rng(seed)
    w = backend.to_device(rng.standard_normal(out.shape), out.device)
    if not out.requires_grad:
        raise GradcheckError("gradcheck: the output does not depend on any input that requires grad")
    out.backward(Tensor._make(w, False, None))
    grads = [backend.to_numpy(t.grad.data) if t.grad is not None else np.zeros(t.shape)
             for t in wrt]
    return w, grads


def gradcheck(fn, inputs, eps: float = 1e-6, atol: float = 1e-5, rtol: float = 1e-4,
              seed: int = 0, raise_exception: bool = True) -> bool:
    """Compare ``fn``'s analytic gradients with central differences, element by element.

    Returns True, or raises ``GradcheckError`` naming the worst element: which input, its
    index, the analytic and the numeric value. ``|a - n| <= atol + rtol * |n|`` must hold.
    """
    inputs, wrt = _prepare(inputs)
    w, analytic = _analytic(fn, inputs, wrt, seed)
    worst = None
    for k, (t, ga) in enumerate(zip(wrt, analytic)):
        if not t.data.flags.c_contiguous:
            t.data = backend.xp_of(t.data).ascontiguousarray(t.data)
        flat = t.data.reshape(-1)  # a view: perturb in place, restore after
        numeric = np.empty(flat.size)
        for i in range(flat.size):
            orig = flat[i].item()
            flat[i] = orig + eps
            fp = _scalar_fn(fn, inputs, w)
            flat[i] = orig - eps
            fm = _scalar_fn(fn, inputs, w)
            flat[i] = orig
            numeric[i] = (fp - fm) / (2 * eps)
        ga = ga.reshape(-1)
        err = np.abs(ga - numeric) - (atol + rtol * np.abs(numeric))
        if err.size and (worst is None or err.max() > worst[0]):
            i = int(err.argmax())
            worst = (float(err.max()), k, np.unravel_index(i, t.shape), ga[i], numeric[i])
    if worst is not None and worst[0] > 0:
        _, k, idx, a, n = worst
        msg = (f"gradcheck failed for input {k} (shape {wrt[k].shape}) at index {tuple(map(int, idx))}: "
               f"analytic {a:.10g} vs numeric {n:.10g} (|diff| {abs(a - n):.3g} > "
               f"atol {atol} + rtol {rtol} * |numeric|)")
        if raise_exception:
            raise GradcheckError(msg)
        return False
    return True


def gradcheck_directional(fn, inputs, eps: float = 1e-6, atol: float = 1e-5, rtol: float = 1e-4,
                          seed: int = 0, n_directions: int = 2,
                          raise_exception: bool = True) -> bool:
    """The cheap check for large inputs: for random directions u (one per input, all moved at
    once), compare ``sum_k <grad_k, u_k>`` with ``(L(x + eps u) - L(x - eps u)) / 2 eps``."""
    inputs, wrt = _prepare(inputs)
    w, analytic = _analytic(fn, inputs, wrt, seed)
    rng = np.random.default_rng(seed + 1)
    for d in range(n_directions):
        us = [rng.standard_normal(t.shape) for t in wrt]
        predicted = sum(float((ga * u).sum()) for ga, u in zip(analytic, us))
        origs = [t.data.copy() for t in wrt]
        for t, u, o in zip(wrt, us, origs):
            t.data[...] = o + eps * backend.to_device(u, t.device)
        fp = _scalar_fn(fn, inputs, w)
        for t, u, o in zip(wrt, us, origs):
            t.data[...] = o - eps * backend.to_device(u, t.device)
        fm = _scalar_fn(fn, inputs, w)
        for t, o in zip(wrt, origs):
            t.data[...] = o
        numeric = (fp - fm) / (2 * eps)
        if abs(predicted - numeric) > atol + rtol * abs(numeric):
            msg = (f"directional gradcheck failed (direction {d}): analytic {predicted:.10g} vs "
                   f"numeric {numeric:.10g} (|diff| {abs(predicted - numeric):.3g})")
            if raise_exception:
                raise GradcheckError(msg)
            return False
    return True
