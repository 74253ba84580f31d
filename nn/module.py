"""Module, Parameter, ModuleList, Sequential: the containers every layer is built from.

As in PyTorch: assigning a ``Parameter`` or a ``Module`` to an attribute registers it, so
``named_parameters()`` and ``state_dict()`` find everything without bookkeeping in layers.
"""
from __future__ import annotations

from collections import OrderedDict

import tensorlite as tl
from tensorlite import backend
from tensorlite.tensor import Tensor, parse_to_args


class Parameter(Tensor):
    """A Tensor that is a module's learnable weight (``requires_grad=True`` by default)."""
    __slots__ = ()

    def __init__(self, data, requires_grad: bool = True):
        arr = data.data if isinstance(data, Tensor) else data
        super().__init__(arr, requires_grad=requires_grad)

    def __repr__(self):
        return "Parameter containing:\n" + super().__repr__()


class Module:
    """Base class of every layer. Subclasses set attributes in ``__init__`` and define ``forward``."""

    def __init__(self):
        object.__setattr__(self, "_parameters", OrderedDict())
        object.__setattr__(self, "_modules", OrderedDict())
        object.__setattr__(self, "_buffers", OrderedDict())
        object.__setattr__(self, "_non_persistent", set())
        object.__setattr__(self, "training", True)

    # -- registration -----------------------------------------------------------
    def __setattr__(self, name, value):
        if "_parameters" not in self.__dict__:
            raise RuntimeError(f"{type(self).__name__}: call super().__init__() before assigning "
                               f"attribute {name!r}")
        for d in (self._parameters, self._modules, self._buffers):
            d.pop(name, None)
        if isinstance(value, Parameter):
            self._parameters[name] = value
        elif isinstance(value, Module):
            self._modules[name] = value
        object.__setattr__(self, name, value)

    def __delattr__(self, name):
        for d in (self._parameters, self._modules, self._buffers):
            d.pop(name, None)
        object.__delattr__(self, name)

    def register_buffer(self, name: str, tensor, persistent: bool = True) -> None:
        """A tensor that is state but not a parameter (a mask, running statistics). Persistent
        buffers go into ``state_dict``."""
        object.__setattr__(self, name, tensor)
        if tensor is not None:
            self._buffers[name] = tensor
        if not persistent:
            self._non_persistent.add(name)

    def register_parameter(self, name: str, param) -> None:
        setattr(self, name, param)

    def add_module(self, name: str, module) -> None:
        setattr(self, name, module)

    # -- traversal -----------------------------------------------------------------
    def named_modules(self, prefix: str = "", memo=None):
        memo = set() if memo is None else memo
        if id(self) in memo:
            return
        memo.add(id(self))
        yield prefix, self
        for name, m in self._modules.items():
            if m is not None:
                yield from m.named_modules(f"{prefix}.{name}" if prefix else name, memo)

    def modules(self):
        return (m for _, m in self.named_modules())

    def children(self):
        return iter(m for m in self._modules.values() if m is not None)

    def named_children(self):
        return iter((n, m) for n, m in self._modules.items() if m is not None)

    def named_parameters(self, prefix: str = "", recurse: bool = True):
        """(name, Parameter) pairs; a parameter shared by two modules (tied weights) appears once."""
        seen = set()
        mods = self.named_modules(prefix) if recurse else [(prefix, self)]
        for mp, m in mods:
            for n, p in m._parameters.items():
                if p is None or id(p) in seen:
                    continue
                seen.add(id(p))
                yield (f"{mp}.{n}" if mp else n), p

    def parameters(self, recurse: bool = True):
        return (p for _, p in self.named_parameters(recurse=recurse))

    def named_buffers(self):
        for mp, m in self.named_modules():
            for n, b in m._buffers.items():
                yield (f"{mp}.{n}" if mp else n), b

    def buffers(self):
        return (b for _, b in self.named_buffers())

    def num_parameters(self) -> int:
        return int(sum(p.numel() for p in self.parameters()))

    def apply(self, fn):
        for m in self.children():
            m.apply(fn)
        fn(self)
        return self

    # -- modes and devices -------------------------------------------------------------
    def train(self, mode: bool = True):
        for m in self.modules():
            object.__setattr__(m, "training", mode)
        return self

    def eval(self):
        return self.train(False)

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.parameters():
            if set_to_none or p.grad is None:
                p.grad = None
            else:
                p.grad.data[...] = 0

    def requires_grad_(self, flag: bool = True):
        for p in self.parameters():
            p.requires_grad = flag
        return self

    def to(self, *args, dtype=None, device=None):
        """Move/cast every parameter and buffer in place (a Parameter keeps its identity, so an
        optimizer built earlier still holds the right objects). Only float tensors change dtype."""
        device, dtype = parse_to_args(args, device, dtype)
        dt = tl.as_dtype(dtype) if dtype is not None else None
        for t in list(self.parameters()) + list(self.buffers()):
            arr = t.data
            if device is not None:
                arr = backend.to_device(arr, device)
            if dt is not None and arr.dtype.kind == "f":
                arr = arr.astype(dt)
            t.data = arr
            if t.grad is not None:
                t.grad = None
        return self

    def double(self):
        return self.to(tl.float64)

    def float(self):
        return self.to(tl.float32)

    # -- state -------------------------------------------------------------------------
    def _state_tensors(self):
        """(name, live tensor) for every parameter and persistent buffer, in PyTorch's order
        (a module's own tensors, then its children's); a tied parameter appears once."""
        seen = set()
        for mp, m in self.named_modules():
            for n, p in m._parameters.items():
                if p is not None and id(p) not in seen:
                    seen.add(id(p))
                    yield (f"{mp}.{n}" if mp else n), p
            for n, b in m._buffers.items():
                if b is not None and n not in m._non_persistent:
                    yield (f"{mp}.{n}" if mp else n), b

    def state_dict(self) -> "OrderedDict[str, Tensor]":
        """name -> tensor for every parameter and persistent buffer (tied weights: once)."""
        return OrderedDict((k, t.detach()) for k, t in self._state_tensors())

    def load_state_dict(self, state, strict: bool = True):
        """Copy values into this module's tensors (in place). ``strict``: the keys must match
        exactly. A shape mismatch is always an error. Everything is checked before anything
        is copied. Returns (missing, unexpected) keys."""
        own = OrderedDict(self._state_tensors())
        missing = [k for k in own if k not in state]
        unexpected = [k for k in state if k not in own]
        if strict and (missing or unexpected):
            parts = []
            if missing:
                parts.append(f"missing keys {missing}")
            if unexpected:
                parts.append(f"unexpected keys {unexpected}")
            raise KeyError(f"load_state_dict for {type(self).__name__}: " + "; ".join(parts) +
                           " (pass strict=False to load the keys that match)")
        matched = [(k, own[k], v.data if isinstance(v, Tensor) else v)
                   for k, v in state.items() if k in own]
        for k, t, arr in matched:
            if tuple(arr.shape) != t.shape:
                raise ValueError(f"load_state_dict: {k!r} has shape {tuple(arr.shape)} in the "
                                 f"checkpoint but {t.shape} in the model")
        for _, t, arr in matched:
            if backend.device_of(arr) != t.device:
                arr = backend.to_device(arr, t.device)
            t.data[...] = backend.xp_of(t.data).asarray(arr, dtype=t.dtype)
        return missing, unexpected

    # -- calling -------------------------------------------------------------------------
    def forward(self, *args, **kwargs):  # pragma: no cover - abstract
        raise NotImplementedError(f"{type(self).__name__} has no forward()")

    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)

    def extra_repr(self) -> str:
        return ""

    def __repr__(self):
        lines = [f"{type(self).__name__}({self.extra_repr()}"]
        for n, m in self._modules.items():
            sub = repr(m).replace("\n", "\n  ")
            lines.append(f"  ({n}): {sub}")
        return lines[0] + (")" if len(lines) == 1 else "\n" + "\n".join(lines[1:]) + "\n)")


class ModuleList(Module):
    """A list of modules, registered by index ("0", "1", ...)."""

    def __init__(self, modules=()):
        super().__init__()
        for m in modules:
            self.append(m)

    def append(self, m: Module):
        setattr(self, str(len(self._modules)), m)
        return self

    def __getitem__(self, i):
        if isinstance(i, slice):
            return ModuleList(list(self._modules.values())[i])
        n = len(self._modules)
        if not -n <= i < n:
            raise IndexError(f"ModuleList index {i} out of range for {n} modules")
        return self._modules[str(i % n)]

    def __len__(self):
        return len(self._modules)

    def __iter__(self):
        return iter(self._modules.values())


class Sequential(Module):
    """Modules applied in order: ``Sequential(Linear(4, 8), ReLU(), Linear(8, 2))``."""

    def __init__(self, *modules):
        super().__init__()
        for i, m in enumerate(modules):
            setattr(self, str(i), m)

    def forward(self, x):
        for m in self._modules.values():
            x = m(x)
        return x

    def __getitem__(self, i):
        return list(self._modules.values())[i]

    def __len__(self):
        return len(self._modules)
