"""Optional compiled kernels (numba) for the row-wise work of a training step. Opt-in.

NumPy makes one pass over memory per ufunc and costs microseconds per call, so on a small
model LayerNorm (about ten passes forward, fifteen backward) and the backward of attention's
softmax take a large share of a step. These kernels do each in one loop per row, compiled by
numba: the same math as the NumPy code beside each call site (``tensorlite/ops/nn.py``), which
stays the reference and the default.

Not compiled: exp and tanh themselves. NumPy's are vectorised (about 0.4 ns an element
here); numba's call the scalar libm functions (2.4 ns for exp, 16 ns for tanh: measured), so
a one-pass GELU kernel was 17x slower than NumPy's nine passes. GELU is therefore three
passes: a kernel for tanh's argument, NumPy's tanh, a kernel for the rest. Softmax forward
and cross-entropy stay NumPy. AdamW's update is one pass, without fastmath: bit-identical
to the NumPy code.

Opt in with ``TENSORLITE_JIT=1`` in the environment or ``tl.jit.enable()``, after
``pip install 'tensorlite[jit]'`` (numba). Without numba, or without opting in, nothing here
runs and numba is never imported. The kernels release the GIL, so tensorlite's thread pool
runs them on its blocks side by side (``cpu.for_rows``); they are compiled on first use
(about a second per kernel and dtype) and cached on disk by numba.

Numerics: float32 and float64 only (other dtypes take the NumPy path). Row sums are
reassociated (``fastmath={'reassoc', 'contract', 'nsz'}``: vectorised sums and fused
multiply-adds; NaN and infinity propagate as in NumPy), so results differ from NumPy's in the
last bits: ``tests/test_jit.py`` holds the two within 1e-12 in float64 and gradchecks every
op with the kernels on. LayerNorm's and GELU's kernels compute a float32 row in float64
(numba promotes at the first float64 constant); so near float32's overflow (|x| > ~1e19,
where NumPy's x^2 overflows) the kernels still give the right answer where NumPy's float32
passes give inf or 0. AdamW's kernel computes in the parameter's dtype: bit-identical.

The compiled code is cached by numba next to this file (``__pycache__``) or in ~/.cache;
where neither can be written, set ``NUMBA_CACHE_DIR`` (else the kernels are compiled anew in
each process, with a note on stderr). Importing numba and LLVM costs ~100 MB of memory.
"""
from __future__ import annotations

import os

import numpy as np

_enabled = None   # None: not decided yet (read TENSORLITE_JIT on first use)
_kernels = None
_OFF = ("", "0", "false", "no", "off")
_ON = ("1", "true", "yes", "on")


def _say(msg: str) -> None:
    """One line on stderr (a warning's source-line echo would only confuse a CLI user)."""
    import sys
    print(f"tensorlite: {msg}", file=sys.stderr, flush=True)


def available() -> bool:
    """Whether numba can be imported."""
    try:
        import numba  # noqa: F401
    except ImportError:
        return False
    return True


def enable(flag: bool = True) -> None:
    """Use the compiled kernels (True) or the NumPy code (False) from now on."""
    global _enabled
    if flag and not available():
        raise RuntimeError("tl.jit.enable(): numba is not installed; install it with "
                           "pip install 'tensorlite[jit]' (or pip install numba), or keep the "
                           "NumPy path")
    _enabled = bool(flag)


def is_enabled() -> bool:
    global _enabled
    if _enabled is None:
        raw = os.environ.get("TENSORLITE_JIT", "")
        value = raw.strip().lower()
        want = value in _ON
        if value not in _ON + _OFF:
            _say(f"TENSORLITE_JIT={raw!r} is neither on ({', '.join(_ON)}) nor off "
                 f"({', '.join(v for v in _OFF if v)}, or unset): running on NumPy")
        elif want and not available():
            _say("TENSORLITE_JIT is set but numba is not installed (pip install "
                 "'tensorlite[jit]'): running on NumPy")
            want = False
        _enabled = want
    return _enabled


def use_for(*arrays) -> bool:
    """Whether a call site should take its kernel for these NumPy arrays: JIT on, float32 or
    float64, C-contiguous (a kernel writes through flat indexing)."""
    if not is_enabled():
        return False
    for a in arrays:
        if type(a) is not np.ndarray or a.dtype not in (np.float32, np.float64) \
                or not a.flags.c_contiguous:
            return False
    return True


def kernels():
    """The compiled kernels (built on first call)."""
    global _kernels
    if _kernels is None:
        try:
            _kernels = _build(cache=True)
        except RuntimeError as e:     # numba found nowhere to write its cache
            if "cannot cache" not in str(e):
                raise
            _say("numba cannot cache the compiled kernels (no writable folder next to "
                 "tensorlite or in ~/.cache; set NUMBA_CACHE_DIR to one): compiling them "
                 "for this process only")
            _kernels = _build(cache=False)
    return _kernels


def _build(cache: bool):
    import math

    import numba as nb

    jit = nb.njit(nogil=True, cache=cache, error_model="numpy",
                  fastmath={"reassoc", "contract", "nsz"})

    @jit
    def layernorm_forward(x, w, b, eps, out, mu, rstd):
        """x, out: (N, C); w, b: (C,); mu, rstd: (N, 1). out = (x - mean) * rstd * w + b."""
        n, c = x.shape
        for i in range(n):
            s = x[i, 0] * 0
            for j in range(c):
                s += x[i, j]
            m = s / c
            v = s * 0
            for j in range(c):
                d = x[i, j] - m
                v += d * d
            r = 1.0 / math.sqrt(v / c + eps)
            for j in range(c):
                out[i, j] = (x[i, j] - m) * r * w[j] + b[j]
            mu[i, 0] = m
            rstd[i, 0] = r

    @jit
    def layernorm_backward(x, g, w, mu, rstd, gx, gw, gb, need_x):
        """gx = rstd (dxhat - mean(dxhat) - xhat mean(dxhat xhat)), dxhat = g w; adds this
        block's sums of g xhat and g into gw, gb (C,)."""
        n, c = x.shape
        for i in range(n):
            m = mu[i, 0]
            r = rstd[i, 0]
            s1 = x[i, 0] * 0
            s2 = s1
            for j in range(c):
                xh = (x[i, j] - m) * r
                gij = g[i, j]
                gw[j] += gij * xh
                gb[j] += gij
                dxh = gij * w[j]
                s1 += dxh
                s2 += dxh * xh
            if need_x:
                s1 /= c
                s2 /= c
                for j in range(c):
                    xh = (x[i, j] - m) * r
                    gx[i, j] = (g[i, j] * w[j] - s1 - xh * s2) * r

    @jit
    def softmax_scores_backward(ds, p, scale):
        """In place: ds = scale * p * (ds - rowsum(ds * p)) (G, Tq, Tk)."""
        ng, tq, tk = ds.shape
        for h in range(ng):
            for i in range(tq):
                acc = ds[h, i, 0] * 0
                for j in range(tk):
                    acc += ds[h, i, j] * p[h, i, j]
                for j in range(tk):
                    ds[h, i, j] = scale * p[h, i, j] * (ds[h, i, j] - acc)

    @jit
    def gelu_tanh_arg(x, z, c, a):
        """z = c (x + a x^3): tanh's argument (NumPy's vectorised tanh then runs on z)."""
        for i in range(x.size):
            v = x[i]
            z[i] = c * (v * (1.0 + a * v * v))

    @jit
    def gelu_tanh_finish(x, t, out):
        """out = 0.5 x (1 + t), t = tanh(c (x + a x^3))."""
        for i in range(x.size):
            out[i] = 0.5 * x[i] * (1.0 + t[i])

    @jit
    def gelu_tanh_grad_finish(x, t, g, out, c, a):
        """out = g (0.5 (1 + t) + 0.5 x (1 - t^2) c (1 + 3 a x^2))."""
        for i in range(x.size):
            v = x[i]
            ti = t[i]
            out[i] = g[i] * (0.5 * (1.0 + ti) + 0.5 * v * (1.0 - ti * ti) * c * (1.0 + 3.0 * a * v * v))

    # Adam(W): the same float operations in the same order as nn.optim._adam_update, no
    # fastmath: bit-identical to the NumPy passes, in one pass instead of thirteen
    @nb.njit(nogil=True, cache=cache, error_model="numpy")
    def adam_update(p, g, m, v, decay, b1, one_b1, b2, one_b2, eps_s, step_size):
        for i in range(p.size):
            gi = g[i]
            pi = p[i] * decay
            mi = m[i] * b1 + gi * one_b1
            vi = v[i] * b2 + (gi * gi) * one_b2
            m[i] = mi
            v[i] = vi
            p[i] = pi - (mi / (np.sqrt(vi) + eps_s)) * step_size

    class Kernels:
        pass
    k = Kernels()
    for f in (layernorm_forward, layernorm_backward, softmax_scores_backward, gelu_tanh_arg,
              gelu_tanh_finish, gelu_tanh_grad_finish, adam_update):
        setattr(k, f.__name__, f)
    return k
