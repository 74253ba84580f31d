"""Mixed precision: float16 compute, float32 master weights, dynamic loss scaling.

The recipe (Micikevicius et al. 2018, "Mixed Precision Training"; PyTorch's ``GradScaler``):

1. **Master weights in float32.** The optimizer updates float32 copies of the parameters.
   A float16 weight cannot take small updates (``1 + 1e-4`` rounds back to ``1`` in float16,
   whose spacing near 1 is ~1e-3), and AdamW's ``eps = 1e-8`` is 0 in float16 (the update
   divides by zero where a second moment underflows).
2. **A float16 working model** runs forward and backward: every matmul, attention and
   activation in float16, half the memory traffic. Norms and GELU already compute in float32
   inside (``nn.functional``); compute the loss in float32 too: ``logits.float()``.
3. **Loss scaling.** Gradients of a float16 graph underflow (anything below ~6e-8 is 0 in
   float16). Multiplying the loss by ``S`` (2^16 to start) multiplies every gradient by
   ``S`` and lifts them into float16's range; they are divided by ``S`` again in float32
   when they reach the masters. Too large an ``S`` overflows some gradient to inf/nan: that
   step is skipped (no weight, no optimizer state changes) and ``S`` is halved. After
   ``growth_interval`` steps in a row without overflow, ``S`` is doubled again, so it hovers
   near the largest scale that does not overflow.

One training step::

    model = GPT(cfg)                                  # built in float32 as usual
    mp = MixedPrecision(model, dtype="float16")       # masters copied, model cast in place
    opt = AdamW(mp.parameters(), lr=3e-4)             # the optimizer steps the masters
    for x, y in batches:
        logits, _ = model(x)                          # float16 forward
        loss = F.cross_entropy(logits.float(), y)     # float32 loss
        mp.backward(loss)                             # (loss * S).backward(): float16 grads
        info = mp.step(opt, max_norm=1.0)             # grads -> masters / S, inf check, clip,
                                                      # AdamW, masters -> model (or skip)
        # info.skipped, info.scale, info.grad_norm

Gradient accumulation: call ``mp.backward`` once per micro-batch (each loss already divided
by the number of micro-batches), then ``mp.step`` once. Checkpoints: ``mp.state_dict()``
holds the float32 masters (not the rounded float16 copies) and the scaler's state, so
``load_state_dict`` resumes bit-exactly (with the optimizer's own state_dict).

``GradScaler`` alone follows PyTorch's API for a model whose parameters are the ones the
optimizer steps: ``scaler.scale(loss).backward(); scaler.unscale_(opt)`` (before clipping);
``scaler.step(opt); scaler.update()``.

bfloat16 has float32's exponent range (no loss scaling needed) but neither NumPy nor CuPy
has a bfloat16 dtype, so tensorlite cannot hold one: asking for it is a clear error.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

import tensorlite as tl
from tensorlite import backend
from tensorlite.tensor import Tensor

from .module import Module, Parameter
from .optim import clip_grad_norm_

__all__ = ["GradScaler", "MixedPrecision", "AmpStep", "half_dtype"]


def half_dtype(dtype, device: str = "cpu") -> np.dtype:
    """The low-precision compute dtype for ``device``: float16, or a clear error for a dtype
    the backend cannot hold (bfloat16 on NumPy and CuPy) or one that is not low precision."""
    name = str(dtype).replace("torch.", "").replace("tl.", "").lower()
    if name in ("bfloat16", "bf16"):
        xp = backend.array_module(device)
        raise TypeError(
            f"mixed precision: bfloat16 is not supported on {device!r}: the backend "
            f"{xp.__name__} has no bfloat16 dtype (neither NumPy nor CuPy has one), so a "
            f"tensorlite tensor cannot hold it; use dtype='float16' (with loss scaling)")
    dt = tl.as_dtype(dtype)
    if dt != tl.float16:
        raise TypeError(f"mixed precision: the compute dtype must be float16, got {dt} "
                        f"(float32 and float64 need no master copies)")
    return dt


def _all_finite(arrays) -> bool:
    """True when every element of every array is finite: one reduction per array and one
    host sync per device (not per array)."""
    flags: dict = {}
    for a in arrays:
        xp = backend.xp_of(a)
        flags.setdefault(backend.device_of(a), []).append(xp.isfinite(a).all())
    for fs in flags.values():
        xp = backend.xp_of(fs[0])
        if not bool(xp.stack(fs).all()):
            return False
    return True


def _check_positive(name, v, above_one=False, below_one=False, integer=False):
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
        raise ValueError(f"GradScaler: {name} must be a finite number > 0, got {v!r}")
    if above_one and v <= 1:
        raise ValueError(f"GradScaler: {name} must be > 1, got {v!r}")
    if below_one and v >= 1:
        raise ValueError(f"GradScaler: {name} must be < 1, got {v!r}")
    if integer and (not isinstance(v, int)):
        raise ValueError(f"GradScaler: {name} must be an int, got {v!r}")
    return v


class GradScaler:
    """Dynamic loss scaling, with PyTorch's names and defaults.

    ``scale(loss)`` -> float32 ``loss * S``; ``unscale_(optimizer or params)`` divides the
    gradients by ``S`` in place and records whether any is inf/nan; ``step(optimizer)`` steps
    unless one was; ``update()`` halves ``S`` after an overflow (``backoff_factor``) and
    doubles it after ``growth_interval`` clean steps in a row (``growth_factor``).
    ``enabled=False`` makes every method a pass-through, so one loop serves both cases.
    """

    def __init__(self, init_scale: float = 2.0 ** 16, growth_factor: float = 2.0,
                 backoff_factor: float = 0.5, growth_interval: int = 2000, enabled: bool = True):
        self._scale = float(_check_positive("init_scale", init_scale))
        self.growth_factor = float(_check_positive("growth_factor", growth_factor, above_one=True))
        self.backoff_factor = float(_check_positive("backoff_factor", backoff_factor,
                                                    below_one=True))
        self.growth_interval = _check_positive("growth_interval", growth_interval, integer=True)
        self.enabled = bool(enabled)
        self._growth_tracker = 0      # clean steps since the last change of the scale
        self._found_inf = None        # this iteration: None until unscale_, then a bool
        self._unscaled: set = set()   # ids of the optimizers already unscaled this iteration

    def __repr__(self):
        return (f"GradScaler(scale={self._scale:g}, growth_tracker={self._growth_tracker}/"
                f"{self.growth_interval}, enabled={self.enabled})")

    def get_scale(self) -> float:
        return self._scale if self.enabled else 1.0

    def is_enabled(self) -> bool:
        return self.enabled

    @property
    def found_inf(self) -> bool:
        """Whether the gradients unscaled this iteration held an inf or nan."""
        return bool(self._found_inf)

    def scale(self, loss: Tensor) -> Tensor:
        """``loss * S`` in float32 (a float16 loss times 2^16 would overflow by itself)."""
        if not isinstance(loss, Tensor):
            raise TypeError(f"GradScaler.scale: expected the loss Tensor, got "
                            f"{type(loss).__name__}")
        if not self.enabled:
            return loss
        if loss.dtype.kind != "f":
            raise TypeError(f"GradScaler.scale: the loss must be a float tensor, got {loss.dtype}")
        if loss.dtype.itemsize < 4:
            loss = loss.float()
        return loss * self._scale

    @staticmethod
    def _params(optimizer_or_params):
        if hasattr(optimizer_or_params, "param_groups"):
            return [p for g in optimizer_or_params.param_groups for p in g["params"]]
        if isinstance(optimizer_or_params, Tensor):
            return [optimizer_or_params]
        return list(optimizer_or_params)

    def unscale_(self, optimizer_or_params) -> bool:
        """Divide the gradients by S in place (call it before clipping); returns whether they
        are all finite. Once per optimizer per iteration."""
        if not self.enabled:
            return True
        key = id(optimizer_or_params)
        if key in self._unscaled:
            raise RuntimeError("GradScaler.unscale_: already called for this optimizer since the "
                               "last update(); unscaling twice would divide the gradients by "
                               "the scale twice")
        grads = [p.grad.data for p in self._params(optimizer_or_params) if p.grad is not None]
        inv = 1.0 / self._scale
        for g in grads:
            g *= inv
        finite = _all_finite(grads)
        self._unscaled.add(key)
        self._found_inf = bool(self._found_inf) or not finite
        return finite

    def step(self, optimizer, *args, **kwargs):
        """``optimizer.step()`` unless an inf/nan gradient was found (then nothing changes:
        no weights, no moments, no step count). Returns the step's result, or None if skipped."""
        if not self.enabled:
            return optimizer.step(*args, **kwargs)
        if id(optimizer) not in self._unscaled:
            self.unscale_(optimizer)
        if self._found_inf:
            return None
        return optimizer.step(*args, **kwargs)

    def update(self, new_scale: float | None = None) -> None:
        """End of the iteration: adjust S (or set it to ``new_scale``)."""
        if not self.enabled:
            return
        if new_scale is not None:
            self._scale = float(_check_positive("new_scale", new_scale))
            self._growth_tracker = 0
        elif self._found_inf is None:
            raise RuntimeError("GradScaler.update: no gradients were unscaled this iteration "
                               "(call step() or unscale_() first)")
        elif self._found_inf:
            self._scale *= self.backoff_factor
            self._growth_tracker = 0
        else:
            self._growth_tracker += 1
            if self._growth_tracker == self.growth_interval:
                self._scale *= self.growth_factor
                self._growth_tracker = 0
        self._found_inf = None
        self._unscaled.clear()

    def state_dict(self) -> dict:
        """Plain Python values (PyTorch's keys): JSON-able, for checkpoints."""
        if not self.enabled:
            return {}
        return {"scale": self._scale, "growth_factor": self.growth_factor,
                "backoff_factor": self.backoff_factor, "growth_interval": self.growth_interval,
                "_growth_tracker": self._growth_tracker}

    def load_state_dict(self, state: dict) -> None:
        if not self.enabled:
            return
        if not state:
            raise RuntimeError("GradScaler.load_state_dict: the state is empty (it was saved "
                               "from a disabled scaler)")
        missing = {"scale", "growth_factor", "backoff_factor", "growth_interval",
                   "_growth_tracker"} - set(state)
        if missing:
            raise ValueError(f"GradScaler.load_state_dict: missing keys {sorted(missing)}")
        self._scale = float(_check_positive("scale", state["scale"]))
        self.growth_factor = float(state["growth_factor"])
        self.backoff_factor = float(state["backoff_factor"])
        self.growth_interval = int(state["growth_interval"])
        self._growth_tracker = int(state["_growth_tracker"])
        self._found_inf = None
        self._unscaled.clear()


@dataclass
class AmpStep:
    """What ``MixedPrecision.step`` did: skipped (an inf/nan gradient), the loss scale the
    step's gradients carried, the global gradient norm of the unscaled float32 gradients
    (None without clipping; inf when skipped)."""
    skipped: bool
    scale: float
    grad_norm: float | None


class MixedPrecision:
    """float32 master copies of ``model``'s parameters, the model itself cast to ``dtype``
    (float16) in place for forward and backward, and a ``GradScaler``. See the module
    docstring for the training step. Build the optimizer over ``mp.parameters()``."""

    def __init__(self, model: Module, dtype="float16", scaler: GradScaler | None = None):
        if not isinstance(model, Module):
            raise TypeError(f"MixedPrecision: expected an nn.Module, got {type(model).__name__}")
        named = list(model.named_parameters())
        if not named:
            raise ValueError("MixedPrecision: the model has no parameters")
        device = named[0][1].device
        self.dtype = half_dtype(dtype, device)
        self.model = model
        self.scaler = scaler if scaler is not None else GradScaler()
        self._names, self._working, self.master_params = [], [], []
        for name, p in named:
            if p.dtype.kind != "f":
                raise TypeError(f"MixedPrecision: parameter {name!r} has dtype {p.dtype}")
            xp = backend.xp_of(p.data)
            m = Parameter(xp.array(p.data, dtype=np.float32, copy=True))
            m.name = name
            self._names.append(name)
            self._working.append(p)
            self.master_params.append(m)
        model.to(dtype=self.dtype)   # parameters keep their identity; float buffers cast too

    def __repr__(self):
        return (f"MixedPrecision({len(self.master_params)} float32 masters, compute "
                f"{self.dtype}, {self.scaler!r})")

    def parameters(self) -> list:
        """The float32 masters: what the optimizer steps."""
        return list(self.master_params)

    def named_parameters(self):
        """(name, master) pairs, the model's names (for weight-decay groups by name)."""
        return list(zip(self._names, self.master_params))

    def backward(self, loss: Tensor) -> None:
        """``(loss * S).backward()``: float16 gradients on the working model, scaled by S.
        NumPy's overflow warnings are silenced here: an overflow is the scaler's signal
        (``step`` skips and lowers S), not an error."""
        with np.errstate(over="ignore", invalid="ignore"):
            self.scaler.scale(loss).backward()

    def zero_grad(self) -> None:
        for p in self._working:
            p.grad = None

    def step(self, optimizer, max_norm: float | None = None) -> AmpStep:
        """Move the working gradients into the masters (float32, divided by S), then skip the
        step on inf/nan, or clip to ``max_norm``, step ``optimizer`` and copy the masters into
        the model; update S; clear the working gradients."""
        masters = {id(m) for m in self.master_params}
        stepped = [p for g in optimizer.param_groups for p in g["params"]]
        strays = [getattr(p, "name", None) or tuple(p.shape) for p in stepped
                  if id(p) not in masters]
        if strays:
            raise ValueError(f"MixedPrecision.step: the optimizer holds parameters that are not "
                             f"the float32 masters (e.g. {strays[:3]}); build it over "
                             f"mp.parameters()")
        for w, m in zip(self._working, self.master_params):
            if w.grad is None:
                m.grad = None
            elif m.grad is not None and m.grad.shape == m.shape and m.grad.dtype == m.dtype:
                m.grad.data[...] = w.grad.data            # reuse the float32 buffer
            else:
                m.grad = Tensor._make(w.grad.data.astype(np.float32), False, None)
        scale = self.scaler.get_scale()
        self.scaler.unscale_(optimizer)
        norm = None
        if self.scaler.found_inf:
            norm = math.inf if max_norm else None
        else:
            if max_norm:
                norm = clip_grad_norm_(self.master_params, max_norm)
        stepped_now = not self.scaler.found_inf
        self.scaler.step(optimizer)
        if stepped_now:
            self.copy_masters_to_model()
        self.scaler.update()
        self.zero_grad()
        return AmpStep(skipped=not stepped_now, scale=scale, grad_norm=norm)

    def copy_masters_to_model(self) -> None:
        """The working model's weights := the masters, rounded to float16."""
        with tl.no_grad():
            for w, m in zip(self._working, self.master_params):
                w.copy_(m.data.astype(w.dtype))

    def state_dict(self) -> dict:
        """``{"master": {name: float32 array}, "scaler": {...}}`` (the arrays are copies)."""
        return {"master": {n: m.data.copy() for n, m in zip(self._names, self.master_params)},
                "scaler": self.scaler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        master = state.get("master", {})
        missing = [n for n in self._names if n not in master]
        extra = sorted(set(master) - set(self._names))
        if missing or extra:
            raise ValueError(f"MixedPrecision.load_state_dict: missing masters {missing[:5]}, "
                             f"unexpected {extra[:5]}")
        with tl.no_grad():
            for n, m in zip(self._names, self.master_params):
                a = master[n]
                if tuple(a.shape) != tuple(m.shape):
                    raise ValueError(f"MixedPrecision.load_state_dict: master {n!r} has shape "
                                     f"{tuple(a.shape)}, the model's {tuple(m.shape)}")
                m.copy_(a.astype(np.float32))        # copy_ moves it to m's device
        self.copy_masters_to_model()
        self.scaler.load_state_dict(state.get("scaler", {}))
