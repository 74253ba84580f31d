"""Elementwise ops: arithmetic, unary math, casts, comparisons.

Broadcasting: forwards broadcast like NumPy; backwards return the gradient at the output's
shape and the engine's ``unbroadcast`` sums it back to each input's shape.

Dtype rule (one rule, applied in ``_binary``): two tensors of the same dtype give that dtype;
a float tensor with an int/bool tensor gives the float tensor's dtype; two floats give the
wider one (an explicit float64 operand is the only way to get float64). Python and NumPy
scalars never change a tensor's dtype (a float scalar with an int tensor gives the default
float dtype).
"""
from __future__ import annotations

import numpy as np

from .. import backend
from ..tensor import Function, Tensor, get_default_dtype


# ----------------------------------------------------------------------------- helpers
def check_same_device(op: str, *tensors) -> None:
    """A clear error when an op's tensor inputs live on different devices."""
    first = None
    for t in tensors:
        if not isinstance(t, Tensor):
            continue
        if first is None:
            first = t
        elif type(t.data) is not type(first.data) or type(t.data) is not np.ndarray:
            da, db = backend.device_of(first.data), backend.device_of(t.data)
            if da != db:
                raise RuntimeError(f"{op}: expected all tensors on one device, got {da} and {db}; "
                                   f"move one with .to('{da}') or .to('{db}')")


def _wrap(x, like: Tensor):
    """A non-Tensor operand: Python/NumPy scalars stay scalars (weak dtype), arrays become
    Tensors on ``like``'s device."""
    if isinstance(x, np.generic):  # before float: np.float64 subclasses float but is strong
        return x.item()
    if isinstance(x, (bool, int, float)):
        return x
    if isinstance(x, (list, tuple)) or isinstance(x, np.ndarray) or backend.is_cupy_array(x):
        return Tensor(x, device=like.device)
    raise TypeError(f"unsupported operand of type {type(x).__name__}; use a Tensor or a number")


def _binary(op: str, a, b):
    """Normalise the operands of a binary op (see the module docstring for the dtype rule)."""
    if not isinstance(a, Tensor):
        a = _wrap(a, b)
    if not isinstance(b, Tensor):
        b = _wrap(b, a)
    if isinstance(a, Tensor) and isinstance(b, Tensor):
        da, db = a.data, b.data
        if type(da) is not np.ndarray or type(db) is not np.ndarray:
            check_same_device(op, a, b)
        if da.dtype != db.dtype:
            fa, fb = da.dtype.kind == "f", db.dtype.kind == "f"
            if fa and not fb:
                b = b.astype(da.dtype)
            elif fb and not fa:
                a = a.astype(db.dtype)
            else:
                dt = np.promote_types(da.dtype, db.dtype)
                a, b = a.astype(dt), b.astype(dt)
    elif isinstance(a, Tensor):
        if isinstance(b, float) and a.dtype.kind != "f":
            a = a.astype(get_default_dtype())
    elif isinstance(b, Tensor):
        if isinstance(a, float) and b.dtype.kind != "f":
            b = b.astype(get_default_dtype())
    return a, b


# ----------------------------------------------------------------------------- arithmetic
class Add(Function):
    def forward(self, a, b):
        return a + b

    def backward(self, g):
        return g, g


class Sub(Function):
    def forward(self, a, b):
        return a - b

    def backward(self, g):
        return g, (-g if self.needs_input_grad[1] else None)


class Mul(Function):
    saved_inputs = (0, 1)

    def forward(self, a, b):
        self.a, self.b = a, b
        return a * b

    def saved_values(self):  # a's values serve b's gradient, b's serve a's
        n = self.needs_input_grad
        return tuple(i for i, need in ((0, n[1]), (1, n[0])) if need), False

    def backward(self, g):
        ga = g * self.b if self.needs_input_grad[0] else None
        gb = g * self.a if self.needs_input_grad[1] else None
        return ga, gb


class Div(Function):
    """a / b. Saves its inputs, not its output (as PyTorch), so that an in-place change of the
    quotient (x = x / x.sum(); x *= 2) is no false alarm: db = -g a / b^2."""
    saved_inputs = (0, 1)

    def forward(self, a, b):
        self.a, self.b = a, b
        return a / b

    def saved_values(self):  # b serves both gradients; a only b's
        return ((0, 1) if self.needs_input_grad[1] else (1,)), False

    def backward(self, g):
        ga = g / self.b if self.needs_input_grad[0] else None
        gb = -g * self.a / (self.b * self.b) if self.needs_input_grad[1] else None
        return ga, gb


class PowScalar(Function):
    """x ** p for a constant exponent p."""
    saved_inputs = (0,)

    def forward(self, x, p):
        self.x, self.p = x, p
        return x ** p

    def backward(self, g):
        p = self.p
        if p == 2:
            return g * (2 * self.x), None
        return g * (p * self.x ** (p - 1)), None


class Pow(Function):
    """a ** b with both tensors (or a scalar base)."""
    saved_inputs = (0, 1)
    saves_output = True

    def forward(self, a, b):
        out = a ** b
        self.a, self.b, self.out = a, b, out
        return out

    def backward(self, g):
        xp = backend.xp_of(g)
        ga = g * self.b * self.a ** (self.b - 1) if self.needs_input_grad[0] else None
        gb = g * self.out * xp.log(self.a) if self.needs_input_grad[1] else None
        return ga, gb


class Neg(Function):
    def forward(self, x):
        return -x

    def backward(self, g):
        return -g


def add(a, b):
    a, b = _binary("add", a, b)
    return Add.apply(a, b)


def sub(a, b):
    a, b = _binary("sub", a, b)
    return Sub.apply(a, b)


def mul(a, b):
    a, b = _binary("mul", a, b)
    return Mul.apply(a, b)


def div(a, b):
    a, b = _binary("div", a, b)
    # true division of integers gives the default float dtype, never float64
    if isinstance(a, Tensor) and a.dtype.kind != "f":
        a = a.astype(get_default_dtype())
    if isinstance(b, Tensor) and b.dtype.kind != "f":
        b = b.astype(get_default_dtype())
    return Div.apply(a, b)


def pow(a, b):
    a, b = _binary("pow", a, b)
    if isinstance(a, Tensor) and not isinstance(b, Tensor):
        return PowScalar.apply(a, p=b)
    return Pow.apply(a, b)


# ----------------------------------------------------------------------------- unary math
class Exp(Function):
    saves_output = True

    def forward(self, x):
        self.out = backend.xp_of(x).exp(x)
        return self.out

    def backward(self, g):
        return g * self.out


class Log(Function):
    saved_inputs = (0,)

    def forward(self, x):
        self.x = x
        return backend.xp_of(x).log(x)

    def backward(self, g):
        return g / self.x


class Sqrt(Function):
    saves_output = True

    def forward(self, x):
        self.out = backend.xp_of(x).sqrt(x)
        return self.out

    def backward(self, g):
        return g / (2 * self.out)


class Tanh(Function):
    saves_output = True

    def forward(self, x):
        self.out = backend.xp_of(x).tanh(x)
        return self.out

    def backward(self, g):
        return g * (1 - self.out * self.out)


class Sigmoid(Function):
    saves_output = True

    def forward(self, x):
        # 0.5 * (1 + tanh(x / 2)) is sigmoid without overflow for large |x|
        self.out = 0.5 * backend.xp_of(x).tanh(0.5 * x) + 0.5
        return self.out

    def backward(self, g):
        return g * self.out * (1 - self.out)


class LogSigmoid(Function):
    """log(sigmoid(x)) = -log(1 + exp(-x)), without overflow or log(0) at any x:
    -(max(-x, 0) + log1p(exp(-|x|))). Its derivative is sigmoid(-x), 1/2 at x = 0 (a
    composition of relu and abs would give 0 there: their subgradients at 0 are 0)."""
    saved_inputs = (0,)

    def forward(self, x):
        xp = backend.xp_of(x)
        self.x = x
        return -(xp.maximum(-x, 0) + xp.log1p(xp.exp(-xp.abs(x))))

    def backward(self, g):
        # sigmoid(-x) = exp(min(-x, 0)) / (1 + exp(-|x|)): no cancellation where it is tiny
        xp, x = backend.xp_of(self.x), self.x
        return g * (xp.exp(xp.minimum(-x, 0)) / (1 + xp.exp(-xp.abs(x))))


class Relu(Function):
    def forward(self, x):
        self.mask = x > 0
        return x * self.mask

    def backward(self, g):
        return g * self.mask


class Abs(Function):
    def forward(self, x):
        xp = backend.xp_of(x)
        self.sign = xp.sign(x)
        return xp.abs(x)

    def backward(self, g):
        return g * self.sign


class Clip(Function):
    def forward(self, x, lo, hi):
        xp = backend.xp_of(x)
        out = xp.clip(x, lo, hi)
        self.mask = out == x  # gradient flows where the input was inside [lo, hi]
        return out

    def backward(self, g):
        return g * self.mask


def clip(x, min=None, max=None):
    if min is None and max is None:
        raise ValueError("clip: give at least one of min= and max=")
    if min is not None and max is not None and min > max:
        raise ValueError(f"clip: min={min} is greater than max={max}")
    return Clip.apply(x, lo=min, hi=max)


# ----------------------------------------------------------------------------- casts, copies
class Cast(Function):
    def forward(self, x, dtype):
        self.in_dtype = x.dtype
        return x.astype(dtype)

    def backward(self, g):
        return g.astype(self.in_dtype)


class ToDevice(Function):
    def forward(self, x, device):
        self.src = backend.device_of(x)
        return backend.to_device(x, device)

    def backward(self, g):
        return backend.to_device(g, self.src)


class Fill(Function):
    """The values ``v`` (broadcast to x's shape, in x's dtype), whatever x held: what
    ``copy_``, ``fill_`` and ``normal_`` record on a tensor in a graph. x's gradient is zero."""

    def forward(self, x, v):
        xp = backend.xp_of(x)
        self.in_shape = x.shape
        return xp.array(xp.broadcast_to(xp.asarray(v, dtype=x.dtype), x.shape))

    def backward(self, g):
        xp = backend.xp_of(g)
        gx = xp.zeros(self.in_shape, dtype=g.dtype) if self.needs_input_grad[0] else None
        return gx, (g if self.needs_input_grad[1] else None)


class Clone(Function):
    def forward(self, x):
        return x.copy()

    def backward(self, g):
        return g


# ----------------------------------------------------------------------------- no gradient
def compare(a, b, name: str) -> Tensor:
    """==, !=, <, <=, >, >=, &, | (``name`` is the ufunc): boolean tensors, never part of
    the graph."""
    a, b = _binary(name, a, b)
    da = a.data if isinstance(a, Tensor) else a
    db = b.data if isinstance(b, Tensor) else b
    xp = backend.xp_of(da if isinstance(a, Tensor) else db)
    return Tensor._make(getattr(xp, name)(da, db), False, None)


logical = compare


def logical_not(a: Tensor) -> Tensor:
    return Tensor._make(backend.xp_of(a.data).logical_not(a.data), False, None)
