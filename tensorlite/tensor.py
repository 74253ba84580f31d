"""The Tensor and the whole reverse-mode autograd engine.

A ``Tensor`` wraps one backend array (``numpy.ndarray`` or ``cupy.ndarray``). Every
differentiable op is a ``Function`` subclass whose ``forward`` and ``backward`` sit side
by side (in ``tensorlite/ops/``). ``Function.apply`` runs the forward on raw arrays and, when
gradients are wanted, records the node on the output tensor. ``Tensor.backward`` walks the
recorded graph in reverse topological order (iteratively: no recursion limit), calls each
node's ``backward`` once with the summed gradient of its output, accumulates into leaves,
then frees the graph unless ``retain_graph=True``.
"""
from __future__ import annotations

import contextlib
import functools
import threading

import numpy as np

from . import backend

# ----------------------------------------------------------------------------- dtypes
float16, float32, float64 = np.dtype("float16"), np.dtype("float32"), np.dtype("float64")
int8, int16, int32, int64 = np.dtype("int8"), np.dtype("int16"), np.dtype("int32"), np.dtype("int64")
uint8, bool_ = np.dtype("uint8"), np.dtype("bool")
_DTYPES = {"float16": float16, "half": float16, "float32": float32, "float": float32,
           "float64": float64, "double": float64, "int8": int8, "int16": int16,
           "int32": int32, "int64": int64, "long": int64, "uint8": uint8, "bool": bool_}
_default_dtype = float32


def as_dtype(dtype) -> np.dtype:
    """Accepts tl.float32, np.float32, 'float32', ... and returns a numpy dtype."""
    if isinstance(dtype, str):
        key = dtype.replace("torch.", "").replace("tl.", "")
        if key in _DTYPES:
            return _DTYPES[key]
        raise TypeError(f"unsupported dtype {dtype!r}: use one of {sorted(set(_DTYPES))}")
    try:
        dt = np.dtype(dtype)
    except TypeError:
        raise TypeError(f"unsupported dtype {dtype!r}: use one of {sorted(set(_DTYPES))}") from None
    if dt.kind not in "fiub":
        raise TypeError(f"unsupported dtype {dt}: tensors hold float, int or bool data")
    return dt


def get_default_dtype() -> np.dtype:
    return _default_dtype


def set_default_dtype(dtype) -> None:
    """The float dtype used for Python floats and for randn/zeros without ``dtype=``."""
    global _default_dtype
    dt = as_dtype(dtype)
    if dt.kind != "f":
        raise TypeError(f"default dtype must be a float dtype, got {dt}")
    _default_dtype = dt


# ----------------------------------------------------------------------------- grad mode
class _GradMode(threading.local):
    enabled = True


_grad_mode = _GradMode()


def is_grad_enabled() -> bool:
    return _grad_mode.enabled


class _SetGrad(contextlib.ContextDecorator):
    def __init__(self, enabled: bool):
        self.enabled = enabled

    def __enter__(self):
        self.prev = _grad_mode.enabled
        _grad_mode.enabled = self.enabled

    def __exit__(self, *exc):
        _grad_mode.enabled = self.prev
        return False


def no_grad():
    """Context manager and decorator: ops inside record no graph."""
    return _SetGrad(False)


def enable_grad():
    return _SetGrad(True)


# ----------------------------------------------------------------------------- Function
class Function:
    """One differentiable op. Subclasses define

        forward(self, *arrays, **params) -> array      (raw backend arrays in, array out)
        backward(self, grad) -> grad or tuple of grads  (one per Tensor input, None allowed)

    and save whatever backward needs on ``self``. ``self.needs_input_grad[i]`` tells
    backward which input gradients are wanted so it can skip the others.
    """
    __slots__ = ("parents", "needs_input_grad", "freed", "versions", "__dict__")
    # which inputs' values the backward reads (positions), and whether it reads the output's:
    # an in-place change of one of those between forward and backward is an error, not a
    # silently wrong gradient (the same check as PyTorch's version counters). An op whose
    # reads depend on which gradients are wanted says so in ``saved_values()`` (Mul: a's values
    # only for b's gradient), so ``y = x * 2; y += 1`` is not a false alarm.
    saved_inputs: tuple = ()
    saves_output: bool = False
    # the output can be a view of input 0's memory (reshape, transpose, basic indexing): it
    # then shares that tensor's version counter, so an in-place change of either is seen
    makes_view: bool = False

    @classmethod
    def apply(cls, *inputs, **params):
        if _grad_mode.enabled:
            for t in inputs:
                if isinstance(t, Tensor) and t._vgw is not None and t._vgw != t._vc[1]:
                    # a view taken before its base was changed by a recorded op: its values
                    # are new, so its history becomes "that view of the new base" (as PyTorch)
                    _ip.refresh_view(t, cls.__name__)
        ctx = cls()
        arrays = [t.data if isinstance(t, Tensor) else t for t in inputs]
        out = ctx.forward(*arrays, **params)
        if type(out) is not np.ndarray and isinstance(out, np.generic):
            out = np.asarray(out)   # a full reduction's NumPy scalar: a 0-d array, writable
        result = None
        if _grad_mode.enabled:
            needs = tuple(isinstance(t, Tensor) and t.requires_grad for t in inputs)
            if any(needs):
                # every input's version: for the saved-value check, and to know which value
                # of a tensor changed in place since this op used (see inputs())
                versions = [t._vc[0] if isinstance(t, Tensor) else 0 for t in inputs]
                ctx.parents = inputs
                ctx.needs_input_grad = needs
                ctx.freed = False
                ctx.versions = versions
                result = Tensor._make(out, True, ctx)
        if result is None:
            result = Tensor._make(out, False, None)
        if cls.makes_view and isinstance(inputs[0], Tensor):
            _share_if_view(result, inputs[0], cls, params)
        if cls.saves_output and result._ctx is not None:
            ctx.out_version = result._vc[0]
        return result

    def saved_values(self) -> tuple:
        """(positions of the inputs whose values backward will read, whether it reads the
        output's): by default the class's ``saved_inputs`` and ``saves_output``."""
        return type(self).saved_inputs, type(self).saves_output

    def forward(self, *args, **kwargs):  # pragma: no cover - abstract
        raise NotImplementedError

    def backward(self, grad):  # pragma: no cover - abstract
        raise NotImplementedError

    @property
    def name(self) -> str:
        return type(self).__name__

    def inputs(self) -> tuple:
        """The graph vertex of each input: the input itself, or, for a tensor changed in place
        (and so given a new history) after this op used it, the stand-in that holds the
        history it had then (see tensorlite/ops/inplace.py)."""
        ps = self.parents
        for p in ps:
            if isinstance(p, Tensor) and p._past is not None:
                return tuple(_at_version(p, v) for p, v in zip(ps, self.versions))
        return ps


def _at_version(p, v):
    if isinstance(p, Tensor) and p._past is not None:
        for end, old in p._past:
            if v < end:
                return old
    return p


def _share_if_view(out: "Tensor", base: "Tensor", cls, params: dict) -> None:
    """``out`` came from a view op on ``base``: if it shares its memory, it shares its version
    counter, remembers how many recorded writes ``base`` had seen (the view is stale once that
    count moves on), and how it was made: so that a stale view can be given the history of
    the same view of the new base, and a write through it (when the op can map the view's new
    value back onto its base: ``cls.unview``) be recorded on the base
    (tensorlite/ops/inplace.py)."""
    a, b = out.data, base.data
    if a is b or backend.xp_of(a).may_share_memory(a, b):
        out._vc = base._vc
        out._vgw = base._vc[1] if base._vgw is None else base._vgw
        out._view_src = (base, cls, params)


def unbroadcast(grad, shape):
    """Sum ``grad`` down to ``shape``: the backward of NumPy broadcasting, shared by all ops."""
    if grad.shape == shape:
        return grad
    nd = grad.ndim - len(shape)
    if nd > 0:
        grad = grad.sum(axis=tuple(range(nd)))
    axes = tuple(i for i, n in enumerate(shape) if n == 1 and grad.shape[i] != 1)
    if axes:
        grad = grad.sum(axis=axes, keepdims=True)
    return grad.reshape(shape)


# ----------------------------------------------------------------------------- Tensor
class Tensor:
    """An n-dimensional array with reverse-mode automatic differentiation.

    ``grad`` semantics: ``None`` until a backward reaches this leaf; backward *adds* into it;
    ``zero_grad()`` sets it back to ``None`` (as PyTorch's ``set_to_none=True``).
    """
    # _vc: the version counter [in-place changes, recorded (graph) in-place changes], shared
    # with the tensors whose memory this one shares (views, .detach()); _vgw: for a view, the
    # second count when it was taken (None: not a view); _view_src: for a view, (base, the
    # view op, its parameters); _past: see tensorlite/ops/inplace.py
    __slots__ = ("data", "requires_grad", "grad", "_ctx", "_hooks", "_post_hooks", "_vc",
                 "_vgw", "_view_src", "_past", "__weakref__", "name")
    __array_ufunc__ = None  # make numpy defer to our reflected operators (np.float32(2) * t)

    def __init__(self, data, dtype=None, device=None, requires_grad=False):
        arr = _to_array(data, dtype, device)
        if requires_grad and arr.dtype.kind != "f":
            raise TypeError(f"only float tensors can require grad, got dtype {arr.dtype}")
        self._init(arr, bool(requires_grad), None)

    def _init(self, data, requires_grad: bool, ctx) -> None:
        self.data = data
        self.requires_grad = requires_grad
        self.grad = None
        self._ctx = ctx
        self._hooks = None
        self._post_hooks = None
        self._vc = [0, 0]
        self._vgw = None
        self._view_src = None
        self._past = None
        self.name = None

    @classmethod
    def _make(cls, data, requires_grad, ctx):
        """A tensor around an existing backend array, skipping __init__'s conversions
        (every op output is made here)."""
        t = object.__new__(cls)
        t._init(data, requires_grad, ctx)
        return t

    # -- properties --------------------------------------------------------
    @property
    def shape(self) -> tuple:
        return self.data.shape

    @property
    def ndim(self) -> int:
        return self.data.ndim

    @property
    def dtype(self) -> np.dtype:
        return self.data.dtype

    @property
    def device(self) -> str:
        return backend.device_of(self.data)

    @property
    def _version(self) -> int:
        """How many times this tensor's memory was changed in place (shared with its views)."""
        return self._vc[0]

    @property
    def is_leaf(self) -> bool:
        return self._ctx is None

    @property
    def grad_fn(self):
        return self._ctx

    @property
    def T(self) -> "Tensor":
        return self.permute(*reversed(range(self.ndim)))

    def size(self, dim=None):
        return self.shape if dim is None else self.shape[dim]

    def numel(self) -> int:
        return int(self.data.size)

    def dim(self) -> int:
        return self.data.ndim

    def __len__(self):
        if self.ndim == 0:
            raise TypeError("len() of a 0-d tensor")
        return self.shape[0]

    def __repr__(self):
        extra = ", requires_grad=True" if self.requires_grad else ""
        if self._ctx is not None:
            extra = f", grad_fn={self._ctx.name}"
        dev = "" if self.device == "cpu" else f", device='{self.device}'"
        body = np.array2string(backend.to_numpy(self.data), separator=", ", precision=4,
                               threshold=50, prefix="tensor(")
        return f"tensor({body}, dtype={self.dtype}{dev}{extra})"

    def __bool__(self):
        if self.data.size != 1:
            raise ValueError(f"the truth value of a tensor of shape {self.shape} is ambiguous; "
                             "use .any() or .all()")
        return bool(self.data)

    def __hash__(self):
        return id(self)

    # -- conversion ----------------------------------------------------------
    def numpy(self) -> np.ndarray:
        """The data as a NumPy array (copied off the GPU when needed; shares memory on CPU)."""
        if self.requires_grad and backend.device_of(self.data) == "cpu":
            return self.data  # PyTorch refuses here; sharing a view is harmless for readers
        return backend.to_numpy(self.data)

    def tolist(self):
        return backend.to_numpy(self.data).tolist()

    def item(self):
        if self.data.size != 1:
            raise ValueError(f"item(): only a one-element tensor can be converted to a Python "
                             f"number, this one has shape {self.shape}")
        return self.data.reshape(-1)[0].item()

    def __float__(self):
        return float(self.item())

    def __int__(self):
        return int(self.item())

    def detach(self) -> "Tensor":
        """The same data (the same memory, and so the same version counter), cut from the graph."""
        d = Tensor._make(self.data, False, None)
        d._vc = self._vc
        d._vgw = self._vc[1] if self._vgw is None else self._vgw
        return d

    def detach_(self) -> "Tensor":
        self._ctx = None
        self.requires_grad = False
        self._past = None        # its earlier values' histories go with its own
        return self

    def requires_grad_(self, flag: bool = True) -> "Tensor":
        if flag and self.dtype.kind != "f":
            raise TypeError(f"only float tensors can require grad, got dtype {self.dtype}")
        if self._ctx is not None and not flag:
            raise RuntimeError("requires_grad_(False) on a non-leaf tensor: use .detach()")
        self.requires_grad = flag
        return self

    def to(self, *args, dtype=None, device=None) -> "Tensor":
        """``t.to("cuda")``, ``t.to(tl.float64)``, ``t.to("cpu", tl.float32)``. Differentiable."""
        device, dtype = parse_to_args(args, device, dtype)
        out = self
        if device is not None:
            from .ops.elementwise import ToDevice
            if backend.parse_device(device) != backend.parse_device(self.device):
                out = ToDevice.apply(out, device=device)
        if dtype is not None and as_dtype(dtype) != out.dtype:
            out = out.astype(dtype)
        return out

    def cpu(self):
        return self.to("cpu")

    def cuda(self, index: int = 0):
        return self.to(f"cuda:{index}")

    def astype(self, dtype) -> "Tensor":
        from .ops.elementwise import Cast
        dt = as_dtype(dtype)
        if dt == self.dtype:
            return self
        return Cast.apply(self, dtype=dt)

    def float(self):
        return self.astype(float32)

    def double(self):
        return self.astype(float64)

    def half(self):
        return self.astype(float16)

    def long(self):
        return self.astype(int64)

    def clone(self) -> "Tensor":
        from .ops.elementwise import Clone
        return Clone.apply(self)

    def contiguous(self) -> "Tensor":
        """Itself if its memory is already in row-major order, else a copy that is (as
        PyTorch: an in-place change of the copy leaves this tensor alone)."""
        if self.data.flags.c_contiguous:
            return self
        from .ops.elementwise import Clone
        return Clone.apply(self)

    # -- autograd ------------------------------------------------------------
    def register_hook(self, hook):
        """``hook(grad) -> Tensor | None`` runs when this tensor's gradient is computed;
        a returned tensor replaces the gradient. Returns a handle with ``.remove()``."""
        if not self.requires_grad:
            raise RuntimeError("cannot register a hook on a tensor that does not require grad")
        if self._hooks is None:
            self._hooks = []
        self._hooks.append(hook)
        return _HookHandle(self._hooks, hook)

    def register_post_accumulate_grad_hook(self, hook):
        """``hook(tensor)`` runs on a leaf after its ``.grad`` has been accumulated in a backward
        pass (data parallelism launches its bucketed all-reduce from here)."""
        if self._ctx is not None:
            raise RuntimeError("post-accumulate-grad hooks are for leaf tensors only")
        if self._post_hooks is None:
            self._post_hooks = []
        self._post_hooks.append(hook)
        return _HookHandle(self._post_hooks, hook)

    def zero_grad(self) -> None:
        self.grad = None

    def backward(self, grad=None, retain_graph: bool = False) -> None:
        """Reverse-mode autodiff from this tensor into every leaf that requires grad."""
        if not self.requires_grad:
            raise RuntimeError("backward(): this tensor does not require grad and has no grad_fn "
                               "(did you create it under no_grad(), or forget requires_grad=True?)")
        if grad is None:
            if self.data.size != 1:
                raise RuntimeError(f"backward(): grad can be implicitly created only for scalar "
                                   f"outputs, this tensor has shape {self.shape}; pass grad=")
            g = backend.xp_of(self.data).ones_like(self.data)
        else:
            g = grad.data if isinstance(grad, Tensor) else backend.xp_of(self.data).asarray(grad)
            if g.shape != self.shape:
                raise RuntimeError(f"backward(): grad has shape {g.shape} but the tensor has "
                                   f"shape {self.shape}")
            if g.dtype != self.dtype:
                g = g.astype(self.dtype)
        _run_backward(self, g, retain_graph)

    # -- operators (defined in ops/, bound here) --------------------------------
    def __add__(self, o): return _ew.add(self, o)
    def __radd__(self, o): return _ew.add(o, self)
    def __sub__(self, o): return _ew.sub(self, o)
    def __rsub__(self, o): return _ew.sub(o, self)
    def __mul__(self, o): return _ew.mul(self, o)
    def __rmul__(self, o): return _ew.mul(o, self)
    def __truediv__(self, o): return _ew.div(self, o)
    def __rtruediv__(self, o): return _ew.div(o, self)
    def __pow__(self, o): return _ew.pow(self, o)
    def __rpow__(self, o): return _ew.pow(o, self)
    def __neg__(self): return _ew.Neg.apply(self)
    def __pos__(self): return self
    def __abs__(self): return _ew.Abs.apply(self)
    def __matmul__(self, o): return _mm.matmul(self, o)
    def __rmatmul__(self, o): return _mm.matmul(o, self)
    def __getitem__(self, idx): return _ix.getitem(self, idx)
    def __setitem__(self, idx, value): _ip.setitem_(self, idx, value)

    def __eq__(self, o): return _ew.compare(self, o, "equal")
    def __ne__(self, o): return _ew.compare(self, o, "not_equal")
    def __lt__(self, o): return _ew.compare(self, o, "less")
    def __le__(self, o): return _ew.compare(self, o, "less_equal")
    def __gt__(self, o): return _ew.compare(self, o, "greater")
    def __ge__(self, o): return _ew.compare(self, o, "greater_equal")
    def __invert__(self): return _ew.logical_not(self)
    def __and__(self, o): return _ew.logical(self, o, "logical_and")
    def __or__(self, o): return _ew.logical(self, o, "logical_or")

    # -- in-place: recorded in the graph as PyTorch does (tensorlite/ops/inplace.py) --------
    def __iadd__(self, o): return _ip.add_(self, o, "+=")
    def __isub__(self, o): return _ip.sub_(self, o, "-=")
    def __imul__(self, o): return _ip.mul_(self, o, "*=")
    def __itruediv__(self, o): return _ip.div_(self, o, "/=")
    def add_(self, o, alpha=1): return _ip.add_(self, o if alpha == 1 else o * alpha, "add_")
    def sub_(self, o, alpha=1): return _ip.sub_(self, o if alpha == 1 else o * alpha, "sub_")
    def mul_(self, o): return _ip.mul_(self, o, "mul_")
    def div_(self, o): return _ip.div_(self, o, "div_")
    def clip_(self, min=None, max=None): return _ip.clip_(self, min, max)
    clamp_ = clip_
    def masked_fill_(self, mask, value): return _ip.masked_fill_(self, mask, value)
    def copy_(self, src) -> "Tensor": return _ip.copy_(self, src)
    def fill_(self, value) -> "Tensor": return _ip.fill_(self, value)
    def zero_(self) -> "Tensor": return _ip.fill_(self, 0, "zero_")

    def normal_(self, mean=0.0, std=1.0, generator=None) -> "Tensor":
        from .random import randn_like_array
        return _ip.overwrite_(self, lambda: randn_like_array(self.data, generator) * std + mean,
                              "normal_")

    def uniform_(self, low=0.0, high=1.0, generator=None) -> "Tensor":
        from .random import rand_like_array
        return _ip.overwrite_(self, lambda: rand_like_array(self.data, generator) * (high - low)
                              + low, "uniform_")

    # -- methods that mirror functions ----------------------------------------
    def exp(self): return _ew.Exp.apply(self)
    def log(self): return _ew.Log.apply(self)
    def sqrt(self): return _ew.Sqrt.apply(self)
    def tanh(self): return _ew.Tanh.apply(self)
    def sigmoid(self): return _ew.Sigmoid.apply(self)
    def log_sigmoid(self): return _ew.LogSigmoid.apply(self)
    def relu(self): return _ew.Relu.apply(self)
    def abs(self): return _ew.Abs.apply(self)
    def clip(self, min=None, max=None): return _ew.clip(self, min, max)
    clamp = clip
    def pow(self, e): return _ew.pow(self, e)
    def sum(self, dim=None, keepdim=False): return _rd.sum(self, dim, keepdim)
    def mean(self, dim=None, keepdim=False): return _rd.mean(self, dim, keepdim)
    def max(self, dim=None, keepdim=False): return _rd.max(self, dim, keepdim)
    def min(self, dim=None, keepdim=False): return _rd.min(self, dim, keepdim)
    def var(self, dim=None, keepdim=False, correction=1, unbiased=None):
        return _rd.var(self, dim, keepdim, correction, unbiased)
    def std(self, dim=None, keepdim=False, correction=1, unbiased=None):
        return _rd.var(self, dim, keepdim, correction, unbiased).sqrt()
    def argmax(self, dim=None, keepdim=False): return _rd.argmax(self, dim, keepdim)
    def argmin(self, dim=None, keepdim=False): return _rd.argmin(self, dim, keepdim)
    def any(self, dim=None): return _rd.any(self, dim)
    def all(self, dim=None): return _rd.all(self, dim)
    def logsumexp(self, dim=-1, keepdim=False): return _nnops.logsumexp(self, dim, keepdim)
    def softmax(self, dim=-1): return _nnops.softmax(self, dim)
    def log_softmax(self, dim=-1): return _nnops.log_softmax(self, dim)
    def reshape(self, *shape): return _sh.reshape(self, *shape)
    def view(self, *shape): return _sh.reshape(self, *shape)
    def flatten(self, start_dim=0, end_dim=-1): return _sh.flatten(self, start_dim, end_dim)
    def transpose(self, d0, d1): return _sh.transpose(self, d0, d1)
    def permute(self, *dims): return _sh.permute(self, *dims)
    def squeeze(self, dim=None): return _sh.squeeze(self, dim)
    def unsqueeze(self, dim): return _sh.unsqueeze(self, dim)
    def expand(self, *shape): return _sh.expand(self, *shape)
    def split(self, split_size, dim=0): return _sh.split(self, split_size, dim)
    def chunk(self, chunks, dim=0): return _sh.chunk(self, chunks, dim)
    def masked_fill(self, mask, value): return _ix.masked_fill(self, mask, value)
    def take(self, indices): return _ix.take(self, indices)
    def matmul(self, o): return _mm.matmul(self, o)


class _HookHandle:
    def __init__(self, hooks, hook):
        self.hooks, self.hook = hooks, hook

    def remove(self):
        if self.hook in self.hooks:
            self.hooks.remove(self.hook)


def _is_dtype_name(s: str) -> bool:
    return s.replace("torch.", "").replace("tl.", "") in _DTYPES


def parse_to_args(args, device=None, dtype=None):
    """The positional arguments of ``.to(...)`` (tensors and modules): a device string or a
    dtype, in any order -> (device, dtype)."""
    for a in args:
        if isinstance(a, str) and not _is_dtype_name(a):
            device = a
        else:
            dtype = a
    return device, dtype


def _to_array(data, dtype, device):
    """Build a backend array from Python data, a NumPy/CuPy array or a Tensor."""
    if isinstance(data, Tensor):
        data = data.data
    dt = as_dtype(dtype) if dtype is not None else None
    if isinstance(data, np.generic):
        data = np.asarray(data)  # NumPy scalars keep their dtype, as NumPy arrays do
    if backend.is_cupy_array(data) or isinstance(data, np.ndarray):
        arr = data
        if dt is not None and arr.dtype != dt:
            arr = arr.astype(dt)
    else:
        arr = np.asarray(data)
        if dt is None:
            if arr.dtype.kind == "f":
                arr = arr.astype(_default_dtype, copy=False)   # Python floats -> float32
            elif arr.dtype.kind in "iu" and arr.dtype != np.int64:
                arr = arr.astype(np.int64)
        else:
            arr = arr.astype(dt, copy=False)
        if arr.dtype.kind not in "fiub":
            raise TypeError(f"cannot make a tensor from data of dtype {arr.dtype} "
                            f"(type {type(data).__name__})")
    if arr.dtype.kind not in "fiub":
        raise TypeError(f"unsupported dtype {arr.dtype}: tensors hold float, int or bool data")
    if device is not None and backend.parse_device(device) != backend.parse_device(backend.device_of(arr)):
        arr = backend.to_device(arr, device)
    return arr


# ----------------------------------------------------------------------------- backward
def _topo_order(root: Tensor) -> list:
    """Tensors reachable from ``root`` that need grad, each after every tensor that uses it,
    and each leaf right after its last user: its gradient is then complete while backward
    still runs through the earlier layers, so its post-accumulate hooks fire early (data
    parallelism starts a bucket's all-reduce from them and hides it behind the rest).

    Kahn's algorithm, iterative (a 10,000-op chain is fine): count each tensor's users, then
    a tensor is ready when all its users are done; of an op's inputs that become ready, the
    leaves are taken first."""
    users, stack, seen = {}, [root], {id(root)}
    while stack:                                  # 1. count the users of every tensor
        ctx = stack.pop()._ctx
        if ctx is None:
            continue
        if ctx.freed:
            raise RuntimeError(
                f"backward(): trying to backward through the graph a second time (the "
                f"buffers of {ctx.name} were freed after the first backward); call "
                f"backward(retain_graph=True) the first time if you need to")
        for p in ctx.inputs():
            if isinstance(p, Tensor) and p.requires_grad:
                users[id(p)] = users.get(id(p), 0) + 1
                if id(p) not in seen:
                    seen.add(id(p))
                    stack.append(p)
    order, ready = [], [root]
    while ready:                                  # 2. a tensor once all its users are done
        t = ready.pop()
        order.append(t)
        ctx = t._ctx
        if ctx is None:
            continue
        done = []
        for p in ctx.inputs():
            if isinstance(p, Tensor) and p.requires_grad:
                users[id(p)] -= 1
                if users[id(p)] == 0:
                    done.append(p)
        # pushed last, popped first: the leaves, then the inputs that lead further back
        ready.extend(sorted(done, key=lambda p: p._ctx is None))
    return order


def _run_backward(root: Tensor, grad, retain_graph: bool) -> None:
    order = _topo_order(root)
    grads = {id(root): grad}
    given = {id(grad)}   # arrays already handed to a leaf (or owned by the caller)
    with no_grad():
        for t in order:
            g = grads.pop(id(t), None)
            if g is None:
                continue
            if t._hooks:
                for hook in t._hooks:
                    r = hook(Tensor._make(g, False, None))
                    if r is not None:
                        g = r.data if isinstance(r, Tensor) else r
            ctx = t._ctx
            if ctx is None:  # a leaf: accumulate
                if t.grad is None:
                    # a leaf's .grad must own its memory: optimizers and clipping update it in
                    # place, and add/reshape backwards hand the same array to several inputs
                    if id(g) in given or g.base is not None or (
                            t._post_hooks and any(v is g for v in grads.values())):
                        # (a hook may edit .grad in place while g still waits for another input)
                        g = g.copy()
                    given.add(id(g))
                    t.grad = Tensor._make(g, False, None)
                else:
                    t.grad.data = t.grad.data + g
                if t._post_hooks:
                    for hook in t._post_hooks:
                        hook(t)
                continue
            _check_versions(t, ctx)
            in_grads = ctx.backward(g)
            if not isinstance(in_grads, tuple):
                in_grads = (in_grads,)
            for p, pg, need in zip(ctx.inputs(), in_grads, ctx.needs_input_grad):
                if not need or pg is None:
                    continue
                if pg.shape != p.data.shape:  # a broadcast the op did not reduce
                    pg = unbroadcast(pg, p.data.shape)
                if pg.dtype != p.data.dtype:
                    pg = pg.astype(p.data.dtype)
                k = id(p)
                prev = grads.get(k)
                grads[k] = pg if prev is None else prev + pg
            if not retain_graph and not type(ctx).makes_view:
                _free(ctx)   # (a view op keeps only shapes: W.T reused by two backwards works)


def _check_versions(out: Tensor, ctx) -> None:
    """Raise if a value ``ctx``'s backward reads was changed in place since its forward."""
    positions, reads_output = ctx.saved_values()
    stale = None
    ov = ctx.__dict__.get("out_version")
    if reads_output and ov is not None and out._version != ov:
        stale = (out, ov, "its output")
    for i in positions:
        p = ctx.parents[i] if i < len(ctx.parents) else None
        if isinstance(p, Tensor) and p._version != ctx.versions[i]:
            stale = (p, ctx.versions[i], f"input {i}")
    if stale is not None:
        t, v, which = stale
        raise RuntimeError(
            f"backward: {which} of {ctx.name} (a tensor of shape {t.shape}) was changed in "
            f"place after the forward used it (version {t._version}, expected {v}), so the "
            f"values its backward needs are gone; change a copy (.clone()) or use an "
            f"out-of-place op (x = x + 1 instead of x += 1)")


def _free(ctx) -> None:
    parents_kept = ()
    ctx.__dict__.clear()          # saved arrays
    ctx.parents = parents_kept    # intermediates can now be garbage-collected
    ctx.freed = True


# late imports: the op families import Tensor and Function from this module
from .ops import elementwise as _ew  # noqa: E402
from .ops import reduce as _rd  # noqa: E402
from .ops import shape as _sh  # noqa: E402
from .ops import indexing as _ix  # noqa: E402
from .ops import matmul as _mm  # noqa: E402
from .ops import nn as _nnops  # noqa: E402
from .ops import inplace as _ip  # noqa: E402
