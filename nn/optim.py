"""Optimizers (SGD, Adam, AdamW) and global-norm gradient clipping, with PyTorch's names.

Every update works in place on ``p.data`` through the array module of the data
(``xp = backend.xp_of(p.data)``), so the same code runs on NumPy and CuPy. State arrays
(momentum, Adam moments) have the parameter's dtype and device: a float32 model keeps
float32 state; bias-correction factors are Python floats, which never upcast an array.

Speed: an update is a handful of in-place ufunc passes over each parameter with one
scratch array per parameter (``tmp = (1-beta1)*g; m *= beta1; m += tmp``, and so on). On
NumPy, Adam(W) makes those passes over cache-sized blocks of each parameter
(``_adam_update_blocked``: bit-identical to the whole-array ``_adam_update``, 1.2x faster).
A flat-buffer "fused" AdamW (all params of a group in one array) was measured and not kept:
copying the grads into the flat buffer costs more than the per-parameter call overhead it
saves. AdamW step, 10.3M float32 params in 52 tensors, 2-core CPU: blocked 12.9 ms, plain
15.5 ms, flat buffer 24.0 ms, flat buffer in blocks 15.8 ms, textbook NumPy 23.1 ms. On
CuPy, one elementwise kernel per parameter (one read of p, g, m, v instead of ten passes)
is the next step.

``state_dict()`` follows PyTorch: ``{"state": {index: {name: array | int}}, "param_groups":
[{hyperparameters..., "params": [index, ...]}]}`` with parameters numbered in group order.
The arrays are the live state buffers (as in PyTorch): copy them if you keep the dict while
training goes on. ``nn.checkpoint`` splits it into a safetensors file and JSON.
"""
from __future__ import annotations

import math
import numbers

from tensorlite import backend, cpu, jit
from tensorlite.tensor import Tensor

__all__ = ["Optimizer", "SGD", "Adam", "AdamW", "clip_grad_norm_"]

_required = object()   # marks a hyperparameter with no default (SGD's lr)


def _is_array(x) -> bool:
    return hasattr(x, "shape") and hasattr(x, "dtype") and not isinstance(x, Tensor)


def _describe(p) -> str:
    name = getattr(p, "name", None)
    return (f"{name!r} " if name else "") + f"of shape {tuple(p.shape)}"


def _check_number(opt: str, name: str, value, low=0.0, high=None, high_open=False) -> float:
    """A float hyperparameter in [low, high] (or [low, high)), else an error naming it."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{opt}: {name} must be a number, got {value!r}")
    v = float(value)
    ok = math.isfinite(v) and v >= low and (high is None or (v < high if high_open else v <= high))
    if not ok:
        hi = "" if high is None else (f" and < {high}" if high_open else f" and <= {high}")
        raise ValueError(f"{opt}: invalid {name} {value!r}: must be finite, >= {low}{hi}")
    return v


class Optimizer:
    """Base class. ``params``: an iterable of Parameters, or of dicts (parameter groups) with
    a ``"params"`` entry and any hyperparameters that override the optimizer's defaults."""

    def __init__(self, params, defaults: dict):
        if isinstance(params, Tensor):
            raise TypeError(f"{type(self).__name__}: params must be an iterable of Parameters or "
                            f"of dicts, got a single Tensor {_describe(params)}; wrap it in a list")
        if isinstance(params, dict):
            params = [params]
        self.defaults = dict(defaults)
        self.state: dict = {}          # Parameter -> {name: array | int}
        self.param_groups: list = []
        groups = list(params)
        if not groups:
            raise ValueError(f"{type(self).__name__}: got an empty parameter list (did you pass "
                             "model.parameters() of a model without parameters, or a used-up "
                             "generator?)")
        if not isinstance(groups[0], dict):
            groups = [{"params": groups}]
        for g in groups:
            self.add_param_group(g)

    def __repr__(self):
        lines = [f"{type(self).__name__} ("]
        for i, g in enumerate(self.param_groups):
            hp = ", ".join(f"{k}={v}" for k, v in g.items() if k != "params")
            lines.append(f"  group {i}: {len(g['params'])} params, {hp}")
        return "\n".join(lines) + "\n)"

    # -- groups --------------------------------------------------------------------------
    def add_param_group(self, group: dict) -> None:
        """Add a group of parameters (as PyTorch: unset hyperparameters take the defaults)."""
        opt = type(self).__name__
        if not isinstance(group, dict):
            raise TypeError(f"{opt}: a parameter group must be a dict, got {type(group).__name__}")
        if "params" not in group:
            raise ValueError(f"{opt}: parameter group {sorted(group)} has no 'params' entry")
        ps = group["params"]
        ps = [ps] if isinstance(ps, Tensor) else list(ps)
        gi = len(self.param_groups)
        if not ps:
            raise ValueError(f"{opt}: parameter group {gi} is empty")
        seen = {id(p): i for i, g in enumerate(self.param_groups) for p in g["params"]}
        for j, p in enumerate(ps):
            if not isinstance(p, Tensor):
                raise TypeError(f"{opt}: group {gi} param {j} is a {type(p).__name__}, "
                                "not a Tensor/Parameter")
            if not p.is_leaf:
                raise ValueError(f"{opt}: group {gi} param {j} {_describe(p)} is not a leaf "
                                 "tensor (it was computed by an op); optimize the leaf instead")
            if p.dtype.kind != "f":
                raise TypeError(f"{opt}: group {gi} param {j} has dtype {p.dtype}; only float "
                                "tensors can be optimized")
            if id(p) in seen:
                where = "earlier in this group" if seen[id(p)] == gi else f"in group {seen[id(p)]}"
                raise ValueError(f"{opt}: group {gi} param {j} {_describe(p)} was already given "
                                 f"{where}; pass each parameter once (tied weights appear once "
                                 "in model.parameters())")
            seen[id(p)] = gi
        new = {"params": ps}
        for k, v in group.items():
            if k != "params":
                new[k] = v
        for k, v in self.defaults.items():
            if v is _required and k not in new:
                raise ValueError(f"{opt}: parameter group {gi} does not set {k!r} and there is "
                                 "no default")
            new.setdefault(k, v)
        self._check_group(new)
        self.param_groups.append(new)

    def _check_group(self, group: dict) -> None:
        """Validate (and normalise) a group's hyperparameters; subclasses extend."""
        group["lr"] = _check_number(type(self).__name__, "lr", group["lr"])
        if "weight_decay" in group:
            group["weight_decay"] = _check_number(type(self).__name__, "weight_decay",
                                                  group["weight_decay"])

    # -- grads -----------------------------------------------------------------------------
    def zero_grad(self, set_to_none: bool = True) -> None:
        for g in self.param_groups:
            for p in g["params"]:
                if p.grad is None:
                    continue
                if set_to_none:
                    p.grad = None
                else:
                    p.grad.data[...] = 0

    def step(self, closure=None):
        """One update of every parameter that has a ``.grad`` (others are skipped). ``closure``
        (optional) recomputes and returns the loss, as in PyTorch."""
        loss = None
        if closure is not None:
            from tensorlite.tensor import enable_grad
            with enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad.data
                if g.shape != p.data.shape:
                    raise RuntimeError(f"{type(self).__name__}: param {_describe(p)} has a grad "
                                       f"of shape {tuple(g.shape)}")
                self._update(p.data, g, self.state.setdefault(p, {}), group)
        return loss

    def _update(self, p, g, state: dict, group: dict) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    # -- state -----------------------------------------------------------------------------
    def _index(self):
        """(index, param) in group order: the numbering state_dict uses."""
        i = 0
        for g in self.param_groups:
            for p in g["params"]:
                yield i, p
                i += 1

    def state_dict(self) -> dict:
        """``{"state": {i: {...}}, "param_groups": [{..., "params": [i, ...]}]}`` (PyTorch's
        layout). Arrays are the live buffers; hyperparameters are plain Python values."""
        state = {i: dict(self.state[p]) for i, p in self._index() if self.state.get(p)}
        groups, i = [], 0
        for g in self.param_groups:
            d = {k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items() if k != "params"}
            d["params"] = list(range(i, i + len(g["params"])))
            i += len(g["params"])
            groups.append(d)
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore hyperparameters and state saved by ``state_dict()`` (arrays are copied to
        each parameter's device and dtype, so the two optimizers share no memory)."""
        opt = type(self).__name__
        if not isinstance(state_dict, dict) or "param_groups" not in state_dict:
            raise ValueError(f"{opt}.load_state_dict: expected a dict with 'state' and "
                             f"'param_groups', got {type(state_dict).__name__}")
        saved = state_dict["param_groups"]
        if len(saved) != len(self.param_groups):
            raise ValueError(f"{opt}.load_state_dict: the state has {len(saved)} parameter groups "
                             f"but this optimizer has {len(self.param_groups)}")
        for gi, (sg, g) in enumerate(zip(saved, self.param_groups)):
            if len(sg["params"]) != len(g["params"]):
                raise ValueError(f"{opt}.load_state_dict: group {gi} has {len(sg['params'])} "
                                 f"params in the state but {len(g['params'])} here")
        index = {}
        for sg, g in zip(saved, self.param_groups):
            for i, p in zip(sg["params"], g["params"]):
                index[int(i)] = p
        new_state = {}
        for key, entries in state_dict.get("state", {}).items():
            i = int(key)
            if i not in index:
                raise ValueError(f"{opt}.load_state_dict: state for parameter index {i}, but the "
                                 f"groups only have indices {sorted(index)}")
            p = index[i]
            st = {}
            for name, v in entries.items():
                if _is_array(v):
                    if tuple(v.shape) != tuple(p.shape):
                        raise ValueError(f"{opt}.load_state_dict: state {name!r} of parameter {i} "
                                         f"has shape {tuple(v.shape)} but the parameter has "
                                         f"shape {tuple(p.shape)}")
                    if backend.device_of(v) != p.device:
                        v = backend.to_device(v, p.device)
                    xp = backend.xp_of(p.data)
                    st[name] = xp.array(v, dtype=p.dtype, copy=True)
                else:
                    st[name] = v
            new_state[p] = st
        groups = []
        for sg, g in zip(saved, self.param_groups):
            ng = {k: v for k, v in sg.items() if k != "params"}
            ng["params"] = g["params"]
            for k, v in self.defaults.items():
                ng.setdefault(k, g.get(k, v))
            self._check_group(ng)
            groups.append(ng)
        self.param_groups = groups
        self.state = new_state


# ----------------------------------------------------------------------------------- SGD
class SGD(Optimizer):
    """Stochastic gradient descent with momentum, as PyTorch's ``SGD``:

        d = g + weight_decay * p
        b = d                                   (first step)
        b = momentum * b + (1 - dampening) * d  (later steps)
        d = d + momentum * b  if nesterov  else  b
        p = p - lr * d
    """

    def __init__(self, params, lr=_required, momentum=0.0, dampening=0.0, weight_decay=0.0,
                 nesterov=False):
        super().__init__(params, dict(lr=lr, momentum=momentum, dampening=dampening,
                                      weight_decay=weight_decay, nesterov=nesterov))

    def _check_group(self, group):
        super()._check_group(group)
        group["momentum"] = _check_number("SGD", "momentum", group["momentum"])
        group["dampening"] = _check_number("SGD", "dampening", group["dampening"])
        group["nesterov"] = bool(group["nesterov"])
        if group["nesterov"] and (group["momentum"] <= 0 or group["dampening"] != 0):
            raise ValueError(f"SGD: nesterov=True needs momentum > 0 and dampening == 0, got "
                             f"momentum={group['momentum']}, dampening={group['dampening']}")

    def _update(self, p, g, state, group):
        xp = backend.xp_of(p)
        lr, mom, wd = group["lr"], group["momentum"], group["weight_decay"]
        d = g
        if wd != 0:
            d = xp.multiply(p, wd)      # a new array: the grad itself is never modified
            d += g
        if mom != 0:
            buf = state.get("momentum_buffer")
            if buf is None:
                buf = state["momentum_buffer"] = d.copy()
            else:
                buf *= mom
                if group["dampening"] == 0:
                    buf += d
                else:
                    buf += (1.0 - group["dampening"]) * d
            if group["nesterov"]:
                if d is g:
                    d = xp.multiply(buf, mom)
                    d += g
                else:
                    d += mom * buf
            else:
                d = buf
        if d is g or d is state.get("momentum_buffer"):
            p -= lr * d
        else:            # d is our own scratch array: scale it in place
            d *= lr
            p -= d


# ---------------------------------------------------------------------------------- Adam
def _adam_update(p, g, m, v, step: int, lr: float, beta1: float, beta2: float, eps: float,
                 decoupled_wd: float) -> None:
    """One Adam(W) step on arrays, in place:

        p  = p * (1 - lr * decoupled_wd)                       (AdamW's decay; 0 for Adam)
        m  = beta1 * m + (1 - beta1) * g
        v  = beta2 * v + (1 - beta2) * g**2
        p  = p - lr / (1 - beta1**t) * m / (sqrt(v / (1 - beta2**t)) + eps)

    The last line is computed as ``p -= (lr*s/c1) * m / (sqrt(v) + eps*s)`` with
    ``s = sqrt(1 - beta2**t)``, ``c1 = 1 - beta1**t``: the same value with one pass fewer.
    """
    xp = backend.xp_of(p)
    bc1 = 1.0 - beta1 ** step
    s = math.sqrt(1.0 - beta2 ** step)
    if decoupled_wd != 0:
        p *= 1.0 - lr * decoupled_wd
    tmp = xp.multiply(g, 1.0 - beta1)      # the one scratch array, reused below
    m *= beta1
    m += tmp
    xp.multiply(g, g, out=tmp)
    tmp *= 1.0 - beta2
    v *= beta2
    v += tmp
    xp.sqrt(v, out=tmp)
    tmp += eps * s
    xp.divide(m, tmp, out=tmp)
    tmp *= lr * s / bc1
    p -= tmp


# Elements per block on the CPU (tests shrink it to exercise uneven blocks).
_CPU_BLOCK = cpu.BLOCK_ELEMS


def _adam_update_blocked(p, g, m, v, *args) -> None:
    """``_adam_update`` over cache-sized blocks of each parameter, spread over tensorlite's
    CPU threads (NumPy only). The result is bit-identical (each element sees the same
    operations); the intermediate passes hit the cache instead of memory. On CuPy one kernel
    per pass over the whole array is already the fast way."""
    n = _CPU_BLOCK
    if (backend.is_cupy_array(p) or (p.size <= n and not jit.use_for(p, g, m, v)) or
            not all(a.flags.c_contiguous for a in (p, g, m, v))):
        _adam_update(p, g, m, v, *args)
        return
    pf, gf, mf, vf = p.reshape(-1), g.reshape(-1), m.reshape(-1), v.reshape(-1)   # views
    if jit.use_for(p, g, m, v):              # opt-in: one compiled pass, bit-identical
        update = jit.kernels().adam_update
        consts = _adam_constants(p.dtype.type, *args)

        def kernel(lo, hi):
            update(pf[lo:hi], gf[lo:hi], mf[lo:hi], vf[lo:hi], *consts)
    else:
        def kernel(lo, hi):
            _adam_update(pf[lo:hi], gf[lo:hi], mf[lo:hi], vf[lo:hi], *args)
    cpu.for_rows(kernel, pf.size, 1, block=n)


def _adam_constants(dt, step, lr, beta1, beta2, eps, decoupled_wd):
    """The scalars of ``_adam_update``, each in the parameter's dtype as NumPy casts them."""
    bc1 = 1.0 - beta1 ** step
    s = math.sqrt(1.0 - beta2 ** step)
    return (dt(1.0 - lr * decoupled_wd), dt(beta1), dt(1.0 - beta1), dt(beta2), dt(1.0 - beta2),
            dt(eps * s), dt(lr * s / bc1))


class Adam(Optimizer):
    """Adam (Kingma & Ba, 2015) as PyTorch's ``Adam``; ``weight_decay`` is L2: it is added to
    the gradient (``g + weight_decay * p``) before the moments, so it is scaled by Adam's
    per-coordinate step size. For decoupled decay use ``AdamW``."""
    _decoupled = False

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0):
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps,
                                      weight_decay=weight_decay))

    def _check_group(self, group):
        super()._check_group(group)
        opt = type(self).__name__
        b = group["betas"]
        if isinstance(b, (int, float)) or len(b) != 2:
            raise ValueError(f"{opt}: betas must be a pair (beta1, beta2), got {b!r}")
        group["betas"] = (_check_number(opt, "betas[0]", b[0], 0.0, 1.0, high_open=True),
                          _check_number(opt, "betas[1]", b[1], 0.0, 1.0, high_open=True))
        group["eps"] = _check_number(opt, "eps", group["eps"])

    def _update(self, p, g, state, group):
        if not state:
            xp = backend.xp_of(p)
            state["step"] = 0
            state["exp_avg"] = xp.zeros_like(p)
            state["exp_avg_sq"] = xp.zeros_like(p)
        state["step"] += 1
        beta1, beta2 = group["betas"]
        wd = group["weight_decay"]
        if not self._decoupled and wd != 0:
            g = g + wd * p       # L2: a new array; the .grad is left as backward made it
        _adam_update_blocked(p, g, state["exp_avg"], state["exp_avg_sq"], state["step"],
                             group["lr"], beta1, beta2, group["eps"],
                             wd if self._decoupled else 0.0)


class AdamW(Adam):
    """Adam with decoupled weight decay (Loshchilov & Hutter, 2019), as PyTorch's ``AdamW``:
    ``p -= lr * weight_decay * p`` before the Adam step, independent of the gradient scale.
    Put biases and norm gains in a group with ``weight_decay=0``."""
    _decoupled = True

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01):
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)


# ------------------------------------------------------------------------------- clipping
def clip_grad_norm_(parameters, max_norm: float, norm_type: float = 2.0,
                    error_if_nonfinite: bool = False) -> float:
    """Scale all gradients in place so that their global norm is at most ``max_norm``
    (as PyTorch: ``g *= max_norm / (total_norm + 1e-6)`` when that factor is < 1).
    Returns the total norm before clipping, as a Python float. Parameters without a grad
    are ignored; the norm of no gradients is 0."""
    if isinstance(parameters, Tensor):
        parameters = [parameters]
    max_norm = _check_number("clip_grad_norm_", "max_norm", max_norm)
    norm_type = float(norm_type)
    if math.isnan(norm_type) or norm_type <= 0:
        raise ValueError(f"clip_grad_norm_: norm_type must be > 0 or inf, got {norm_type}")
    grads = [p.grad.data for p in parameters if p.grad is not None]
    if not grads:
        return 0.0
    total = _global_norm(grads, norm_type)
    if not math.isfinite(total) and error_if_nonfinite:
        bad = [i for i, g in enumerate(grads) if not math.isfinite(_global_norm([g], norm_type))]
        raise RuntimeError(f"clip_grad_norm_: the total norm of order {norm_type} of the "
                           f"gradients is {total} (non-finite gradients at positions {bad[:10]} "
                           "among the parameters with a grad), so it cannot be clipped; lower "
                           "the learning rate or find the inf/nan, or pass "
                           "error_if_nonfinite=False to scale by it anyway")
    coef = max_norm / (total + 1e-6)
    if coef < 1.0 or not math.isfinite(total):
        for g in grads:
            g *= coef
    return total


def _global_norm(grads, norm_type: float) -> float:
    """Norm of the concatenation of ``grads``: one device reduction per grad and one host
    sync per device (not per grad)."""
    partial: dict = {}
    for g in grads:
        xp = backend.xp_of(g)
        if g.dtype.itemsize < 4:
            g = g.astype(xp.float32)     # float16 squares overflow at ~256
        flat = g.reshape(-1)
        if norm_type == math.inf:
            r = xp.abs(flat).max() if flat.size else xp.zeros((), flat.dtype)
        elif norm_type == 2.0:
            r = xp.vdot(flat, flat)
        else:
            r = (xp.abs(flat) ** norm_type).sum()
        partial.setdefault(backend.device_of(g), []).append(r)
    vals = []
    for rs in partial.values():
        xp = backend.xp_of(rs[0])
        stacked = xp.stack(rs)
        vals.append(float(stacked.max() if norm_type == math.inf else stacked.sum(dtype=xp.float64)))
    if norm_type == math.inf:
        return max(vals)
    return math.fsum(vals) ** (1.0 / norm_type)
