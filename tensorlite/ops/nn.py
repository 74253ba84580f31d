"""Fused neural-network ops: softmax family, linear, GELU, LayerNorm/RMSNorm, cross-entropy,
dropout and scaled dot-product attention.

Each op here could be composed from elementwise ops, reductions and matmuls; doing it as one
op saves intermediates (memory) and Python overhead (speed), and gives a closed-form backward.
The composed versions live in ``nn/reference.py``; the tests hold the two equal.
"""
from __future__ import annotations

import numpy as np

from .. import backend, cpu, jit
from ..tensor import Function, Tensor, is_grad_enabled
from .shape import _dim


class Softmax(Function):
    saves_output = True

    def forward(self, x, axis):
        xp = backend.xp_of(x)
        e = xp.exp(x - x.max(axis=axis, keepdims=True))   # shift: exp never overflows
        e /= e.sum(axis=axis, keepdims=True)
        self.out, self.axis = e, axis
        return e

    def backward(self, g):
        y = self.out
        return y * (g - (g * y).sum(axis=self.axis, keepdims=True))


class LogSoftmax(Function):
    saves_output = True

    def forward(self, x, axis):
        xp = backend.xp_of(x)
        shifted = x - x.max(axis=axis, keepdims=True)
        out = shifted - xp.log(xp.exp(shifted).sum(axis=axis, keepdims=True))
        self.out, self.axis = out, axis
        return out

    def backward(self, g):
        xp = backend.xp_of(g)
        return g - xp.exp(self.out) * g.sum(axis=self.axis, keepdims=True)


class LogSumExp(Function):
    def forward(self, x, axis, keepdim):
        xp = backend.xp_of(x)
        m = x.max(axis=axis, keepdims=True)
        e = xp.exp(x - m)
        s = e.sum(axis=axis, keepdims=True)
        self.p = e / s                     # softmax: the gradient of logsumexp
        self.axis, self.keepdim = axis, keepdim
        out = m + xp.log(s)
        return out if keepdim else out.squeeze(axis)

    def backward(self, g):
        xp = backend.xp_of(g)
        if not self.keepdim:
            g = xp.expand_dims(g, self.axis)
        return g * self.p


def _float(x: Tensor, op: str):
    if x.dtype.kind != "f":
        raise TypeError(f"{op}: needs a float tensor, got {x.dtype}; use .float() first")


def softmax(x: Tensor, dim: int = -1) -> Tensor:
    _float(x, "softmax")
    return Softmax.apply(x, axis=_dim(dim, x.ndim, "softmax"))


def log_softmax(x: Tensor, dim: int = -1) -> Tensor:
    _float(x, "log_softmax")
    return LogSoftmax.apply(x, axis=_dim(dim, x.ndim, "log_softmax"))


def logsumexp(x: Tensor, dim: int = -1, keepdim: bool = False) -> Tensor:
    _float(x, "logsumexp")
    return LogSumExp.apply(x, axis=_dim(dim, x.ndim, "logsumexp"), keepdim=keepdim)


# ============================================================================ helpers
def mm(a, b, bias=None):
    """a @ b (+ bias): on NumPy through tensorlite's thread pool (see tensorlite/cpu.py)."""
    if type(a) is np.ndarray and type(b) is np.ndarray:
        return cpu.matmul(a, b, bias)
    return a @ b if bias is None else a @ b + bias


def _rows2d(a):
    """(..., C) -> (N, C) view (or copy when not viewable)."""
    return a.reshape(-1, a.shape[-1])


# ============================================================================ linear
class Linear(Function):
    """y = x @ W^T + b with PyTorch's weight layout W: (out, in).

    x: (..., in) -> y: (..., out). One op instead of matmul + transpose + add: the weight
    gradient comes out as (out, in) directly, with no transposed copy, from one GEMM over
    all rows.
    """
    saved_inputs = (0, 1)

    def forward(self, x, w, b=None):
        self.x, self.w, self.has_b = x, w, b is not None
        y = mm(_rows2d(x), w.T, b)                            # (N, in) @ (in, out) + b
        return y.reshape(x.shape[:-1] + (w.shape[0],))

    def backward(self, g):
        x, w = self.x, self.w
        g2, x2 = _rows2d(g), _rows2d(x)                       # (N, out), (N, in)
        need_x, need_w = self.needs_input_grad[:2]
        need_b = self.has_b and self.needs_input_grad[2]
        if need_x and need_w and type(g2) is np.ndarray:      # both at once, a thread each
            gx, gw, gb = cpu.matmul_pair(g2, w, g2.T, x2, sum_a2=need_b)
            return gx.reshape(x.shape), gw, gb
        gx = mm(g2, w).reshape(x.shape) if need_x else None     # (N, out) @ (out, in)
        gw = mm(g2.T, x2) if need_w else None                   # (out, N) @ (N, in)
        gb = g2.sum(axis=0) if need_b else None
        return gx, gw, gb


# ============================================================================ activations
_GELU_C = 0.7978845608028654  # sqrt(2 / pi)
_GELU_A = 0.044715


def gelu_tanh_into(x, out):
    """out = 0.5 x (1 + tanh(c (x + a x^3))), elementwise on a block (``out`` may be ``x``)."""
    if jit.use_for(x, out):
        k, dt, xf = jit.kernels(), x.dtype.type, x.reshape(-1)
        t = np.empty_like(xf)
        k.gelu_tanh_arg(xf, t, dt(_GELU_C), dt(_GELU_A))
        np.tanh(t, out=t)
        k.gelu_tanh_finish(xf, t, out.reshape(-1))
        return
    xp = backend.xp_of(x)
    t = x * x
    t *= _GELU_A
    t += 1.0
    t *= x
    t *= _GELU_C
    xp.tanh(t, out=t)
    t += 1.0
    t *= x
    xp.multiply(t, 0.5, out=out)


def gelu_tanh_grad_into(x, g, out):
    """out = g * d gelu_tanh(x) / dx on a block (``out`` may be ``g``):
    0.5 (1 + t) + 0.5 x (1 - t^2) c (1 + 3 a x^2), t = tanh(c (x + a x^3))."""
    if jit.use_for(x, g, out):
        k, dt, xf = jit.kernels(), x.dtype.type, x.reshape(-1)
        t = np.empty_like(xf)
        k.gelu_tanh_arg(xf, t, dt(_GELU_C), dt(_GELU_A))
        np.tanh(t, out=t)
        k.gelu_tanh_grad_finish(xf, t, g.reshape(-1), out.reshape(-1), dt(_GELU_C), dt(_GELU_A))
        return
    xp = backend.xp_of(x)
    xsq = x * x
    t = xsq * _GELU_A
    t += 1.0
    t *= x
    t *= _GELU_C
    xp.tanh(t, out=t)                       # t
    xsq *= 3 * _GELU_A
    xsq += 1.0
    xsq *= _GELU_C                          # c (1 + 3 a x^2)
    d = t * t
    xp.subtract(1.0, d, out=d)
    d *= x
    d *= xsq                                # x (1 - t^2) c (1 + 3 a x^2)
    d += t
    d += 1.0
    d *= 0.5
    xp.multiply(d, g, out=out)


class GELUTanh(Function):
    """GELU, tanh approximation (GPT-2): 0.5 x (1 + tanh(c (x + a x^3))).

    backward: dy/dx = 0.5 (1 + t) + 0.5 x (1 - t^2) c (1 + 3 a x^2), t = tanh(c (x + a x^3)).
    Only x is saved; the backward recomputes t block by block, in cache.
    """
    saved_inputs = (0,)

    def forward(self, x):
        xp = backend.xp_of(x)
        self.x = x
        x2 = _rows2d(x)
        out = xp.empty_like(x2)
        cpu.for_rows(lambda lo, hi: gelu_tanh_into(x2[lo:hi], out[lo:hi]),
                     x2.shape[0], x2.shape[1], xp)
        return out.reshape(x.shape)

    def backward(self, g):
        xp = backend.xp_of(g)
        x2, g2 = _rows2d(self.x), _rows2d(g)
        gx = xp.empty_like(x2)
        cpu.for_rows(lambda lo, hi: gelu_tanh_grad_into(x2[lo:hi], g2[lo:hi], gx[lo:hi]),
                     x2.shape[0], x2.shape[1], xp)
        return gx.reshape(self.x.shape)


# ------------------------------------------------------------------ erf, vectorised on NumPy
# Three pieces, all evaluated in float64 (float32 data too: one widening per block):
# |x| <= X: erf(x) = x + x s(x^2), s a polynomial fitted to erf(x)/x - 1 over z = x^2 in
#   [0, X^2] (Chebyshev interpolation, mpmath.chebyfit at 40 digits; fit errors below). The
#   x + x s form keeps s's rounding (|s| <= 0.13) small next to the exact leading x.
# X < |x| <= 4: erfc(|x|) = exp(-x^2) C(|x|) / D(|x|), and 4 < |x|: erfc(|x|) =
#   exp(-x^2) / |x| (1/sqrt(pi) - t P(t) / Q(t)), t = 1/x^2: W. J. Cody's rational
#   approximations (Math. Comp. 23 (1969) 631-637; the coefficients of his public-domain
#   SPECFUN CALERF). The last piece matters only for the normal CDF's left tail (GELU of
#   x < -5.6): erf itself is 1 - erfc = +-1 there to float64 rounding from |x| = 5.93 on.
# float64 results: X = 0.84375, degree 11 (fit error 1.5e-19), measured within 2 ulp of
# math.erf. float32 results need less: X = 1.25, degree 8 (fit error 4e-11, under 1/1000 of a
# float32 ulp), so 92 % of a GELU's inputs take the shorter polynomial.
_ERF_S64 = (-8.879702704985848e-10, 1.4205594850504056e-08, -1.630309508468887e-07,
            1.6457914349746103e-06, -1.4925463570287675e-05, 0.00012055327421282683,
            -0.000854832691425112, 0.005223977624080742, -0.026866170645031,
            0.11283791670954745, -0.3761263890318375, 0.1283791670955126)
_ERF_S32 = (8.306594342548078e-07, -1.2820796639166515e-05, 0.00011743128133977967,
            -0.0008520607939614684, 0.00522251195818737, -0.02686573172951239,
            0.11283785050186523, -0.3761263851704868, 0.1283791670583038)
_ERFC_C = (2.15311535474403846e-8, 5.64188496988670089e-1, 8.88314979438837594e00,
           6.61191906371416295e01, 2.98635138197400131e02, 8.81952221241769090e02,
           1.71204761263407058e03, 2.05107837782607147e03, 1.23033935479799725e03)
_ERFC_D = (1.0, 1.57449261107098347e01, 1.17693950891312499e02, 5.37181101862009858e02,
           1.62138957456669019e03, 3.29079923573345963e03, 4.36261909014324716e03,
           3.43936767414372164e03, 1.23033935480374942e03)
_ERFC_P = (1.63153871373020978e-2, 3.05326634961232344e-1, 3.60344899949804439e-1,
           1.25781726111229246e-1, 1.60837851487422766e-2, 6.58749161529837803e-4)
_ERFC_Q = (1.0, 2.56852019228982242e00, 1.87295284992346047e00, 5.27905102951428412e-1,
           6.05183413124413191e-2, 2.33520497626869185e-3)
_RSQRT_PI = 0.5641895835477563
_ERF_BLOCK = 64 * 1024   # elements per block (float64 temporaries of 512 KB): measured 16K-128K,
                         # larger blocks spend less on per-call overhead in the rarer branches
_SQRT1_2 = 0.7071067811865476


def _horner(coeffs, t):
    """coeffs[0] t^n + ... + coeffs[n], for a float64 array t (a new array)."""
    p = t * coeffs[0]
    for c in coeffs[1:-1]:
        p += c
        p *= t
    p += coeffs[-1]
    return p


def _exp_neg_sq(y, exact: bool):
    """exp(-y^2) for y >= 0; ``exact``: as Cody does, without the error of rounding y^2
    (relative y^2 eps, seen in the normal CDF's left tail): y = h + d with h a multiple of
    1/16, h^2 exact, exp(-h^2) exp(-d (2h + d))."""
    if not exact:
        e = y * y
        np.negative(e, out=e)
        return np.exp(e, out=e)
    h = np.trunc(y * 16.0)
    h *= 1.0 / 16.0
    d = y - h
    e = y + h
    e *= d
    np.negative(e, out=e)
    np.exp(e, out=e)
    np.multiply(h, h, out=h)
    np.negative(h, out=h)
    e *= np.exp(h, out=h)
    return e


def _erf64(u, wide: bool, cdf: bool = False):
    """erf(u) for a float64 NumPy array (a new array), accurate to float64 if ``wide``, else
    to float32; ``cdf``: 0.5 (1 + erf(u)) instead, the normal CDF at u sqrt 2, taken as
    0.5 erfc(|u|) for u < 0 (no cancellation in its left tail)."""
    small, s = (0.84375, _ERF_S64) if wide else (1.25, _ERF_S32)
    with np.errstate(over="ignore", invalid="ignore"):   # huge |u|: replaced below
        z = u * u
        r = _horner(s, z)
        r *= u
        r += u                                # x + x s(x^2): right where |u| <= small
    if cdf:
        r *= 0.5
        r += 0.5
    big = z > small * small                   # nan compares False: it stays nan above
    if not big.any():
        return r
    ub = u[big]
    y = np.abs(ub)
    np.minimum(y, 40.0, out=y)                # exp(-40^2) is 0: inf gives erfc 0 too
    q = _horner(_ERFC_C, y)
    q /= _horner(_ERFC_D, y)
    far = y > 4.0
    if far.any():
        yf = y[far]
        t = 1.0 / (yf * yf)
        p = _horner(_ERFC_P, t)
        p /= _horner(_ERFC_Q, t)
        p *= t
        np.subtract(_RSQRT_PI, p, out=p)
        p /= yf
        q[far] = p
    q *= _exp_neg_sq(y, exact=cdf and wide)  # erfc(|u|)
    if cdf:
        q *= 0.5
        r[big] = np.where(ub < 0, q, 1.0 - q)
    else:
        np.subtract(1.0, q, out=q)
        r[big] = np.copysign(q, ub, out=q)
    return r


def erf(x):
    """The error function, elementwise, on either backend; float32 in, float32 out.

    On NumPy: the approximation above (no SciPy), over blocks on tensorlite's threads.
    """
    xp = backend.xp_of(x)
    if xp is not np:  # pragma: no cover - GPU only
        import cupyx.scipy.special
        return cupyx.scipy.special.erf(x)
    x = np.asarray(x)
    dtype = x.dtype if x.dtype.kind == "f" else np.dtype(np.float64)
    out = np.empty(x.shape, dtype=dtype)
    xf, of = x.reshape(-1), out.reshape(-1)
    wide = dtype.itemsize > 4

    def kernel(lo, hi):
        of[lo:hi] = _erf64(xf[lo:hi].astype(np.float64), wide)
    cpu.for_rows(kernel, xf.size, 1, block=_ERF_BLOCK)
    return out


class GELUExact(Function):
    """GELU, exact: x * Phi(x) = 0.5 x (1 + erf(x / sqrt 2)).

    On NumPy, Phi is computed in float64 block by block, its left tail without cancellation
    (float32 results within one ulp, nearly always correctly rounded), and kept, in the
    input's dtype, for the backward:
    dy/dx = Phi(x) + x phi(x), phi(x) = exp(-x^2 / 2) / sqrt(2 pi).
    """
    saved_inputs = (0,)

    def forward(self, x):
        xp = backend.xp_of(x)
        self.x = x
        if xp is not np:  # pragma: no cover - GPU only
            self.cdf = 0.5 * (1.0 + erf(x * _SQRT1_2))
            return x * self.cdf
        xf = x.reshape(-1)
        out = np.empty_like(xf)
        cdf = np.empty_like(xf)
        wide = x.dtype.itemsize > 4

        def kernel(lo, hi):
            xb = xf[lo:hi]
            phi = _erf64(np.multiply(xb, _SQRT1_2, dtype=np.float64), wide, cdf=True)
            cdf[lo:hi] = phi
            np.multiply(xb, phi, out=out[lo:hi])
        cpu.for_rows(kernel, xf.size, 1, block=_ERF_BLOCK)
        self.cdf = cdf.reshape(x.shape)
        return out.reshape(x.shape)

    def backward(self, g):
        xp = backend.xp_of(g)
        x, cdf = self.x.reshape(-1), self.cdf.reshape(-1)
        gf = g.reshape(-1)
        gx = xp.empty_like(x)

        def kernel(lo, hi):
            xb = x[lo:hi]
            d = xb * xb
            d *= -0.5
            xp.exp(d, out=d)
            d *= 0.3989422804014327             # phi(x) = exp(-x^2 / 2) / sqrt(2 pi)
            d *= xb
            d += cdf[lo:hi]
            xp.multiply(d, gf[lo:hi], out=gx[lo:hi])
        cpu.for_rows(kernel, x.size, 1, xp)
        return gx.reshape(self.x.shape)


# ============================================================================ normalisation
class LayerNorm(Function):
    """Normalise over the last dim, then scale and shift; closed-form backward.

    x: (..., C); weight, bias: (C,)
    forward:  xhat = (x - mean) * rstd,  y = xhat * w + b
    backward: dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat)),  dxhat = dy * w
              dw = sum over rows of dy * xhat,  db = sum over rows of dy
    Saves x (alive anyway), the row means and 1/std: xhat is recomputed per block.
    """
    saved_inputs = (0, 1)

    def forward(self, x, w=None, b=None, eps=1e-5):
        xp = backend.xp_of(x)
        x2 = _rows2d(x)
        n, c = x2.shape
        out = xp.empty_like(x2)
        mu = xp.empty((n, 1), dtype=x.dtype)
        rstd = xp.empty((n, 1), dtype=x.dtype)

        inv_c = 1.0 / c
        if jit.use_for(x2):                                     # compiled, one loop per row
            lnf = jit.kernels().layernorm_forward
            w1 = w if w is not None else xp.ones(c, x.dtype)
            b1 = b if b is not None else xp.zeros(c, x.dtype)

            def kernel(lo, hi):
                lnf(x2[lo:hi], w1, b1, eps, out[lo:hi], mu[lo:hi], rstd[lo:hi])
        else:
            def kernel(lo, hi):   # sums times 1/C: ndarray.mean costs a Python wrapper per call
                xb = x2[lo:hi]
                m = xb.sum(axis=1, keepdims=True)
                m *= inv_c
                xc = xp.subtract(xb, m, out=out[lo:hi])   # built in place in the output
                var = (xc * xc).sum(axis=1, keepdims=True)
                var *= inv_c
                var += eps
                r = 1.0 / xp.sqrt(var)
                xc *= r                                 # xhat
                if w is not None:
                    xc *= w
                if b is not None:
                    xc += b
                mu[lo:hi], rstd[lo:hi] = m, r
        cpu.for_rows(kernel, n, c, xp)
        self.x2, self.mu, self.rstd, self.w, self.has_b = x2, mu, rstd, w, b is not None
        self.shape = x.shape
        return out.reshape(x.shape)

    def backward(self, g):
        xp = backend.xp_of(g)
        x2, mu, rstd, w = self.x2, self.mu, self.rstd, self.w
        g2 = _rows2d(g)
        n, c = x2.shape
        gx = xp.empty_like(x2)
        need_x = self.needs_input_grad[0]
        inv_c = 1.0 / c
        if jit.use_for(x2, g2):                                 # compiled, one loop per row
            lnb = jit.kernels().layernorm_backward
            w1 = w if w is not None else xp.ones(c, x2.dtype)

            def kernel(lo, hi):
                gw_part, gb_part = xp.zeros(c, x2.dtype), xp.zeros(c, x2.dtype)
                lnb(x2[lo:hi], g2[lo:hi], w1, mu[lo:hi], rstd[lo:hi],
                    gx[lo:hi] if need_x else x2[lo:lo], gw_part, gb_part, need_x)
                return gw_part, gb_part
        else:
            kernel = self._numpy_backward_kernel(x2, g2, mu, rstd, w, gx, need_x, inv_c, xp)
        gw_sum, gb_sum = cpu.map_rows(kernel, n, c, xp)
        gw = gw_sum if w is not None and self.needs_input_grad[1] else None
        gbias = gb_sum if self.has_b and self.needs_input_grad[2] else None
        return (gx.reshape(self.shape) if need_x else None), gw, gbias

    @staticmethod
    def _numpy_backward_kernel(x2, g2, mu, rstd, w, gx, need_x, inv_c, xp):
        def kernel(lo, hi):
            xhat = (x2[lo:hi] - mu[lo:hi]) * rstd[lo:hi]
            gb = g2[lo:hi]
            parts = ((gb * xhat).sum(axis=0), gb.sum(axis=0))
            if need_x:
                dxhat = gb * w if w is not None else gb.copy()
                m2 = (dxhat * xhat).sum(axis=1, keepdims=True)
                m2 *= inv_c
                m1 = dxhat.sum(axis=1, keepdims=True)
                m1 *= inv_c
                dxhat -= m1
                xhat *= m2
                dxhat -= xhat
                xp.multiply(dxhat, rstd[lo:hi], out=gx[lo:hi])
            return parts
        return kernel


class RMSNorm(Function):
    """x * rstd * w with rstd = 1 / sqrt(mean(x^2) + eps) over the last dim (no centering)."""
    saved_inputs = (1,)

    def forward(self, x, w=None, eps=1e-6):
        xp = backend.xp_of(x)
        rstd = 1.0 / xp.sqrt((x * x).mean(axis=-1, keepdims=True) + eps)
        xhat = x * rstd
        self.xhat, self.rstd, self.w = xhat, rstd, w
        return xhat * w if w is not None else xhat

    def backward(self, g):
        xhat, rstd, w = self.xhat, self.rstd, self.w
        lead = tuple(range(g.ndim - 1))
        gw = (g * xhat).sum(axis=lead) if w is not None and self.needs_input_grad[1] else None
        gx = None
        if self.needs_input_grad[0]:
            dxhat = g * w if w is not None else g
            gx = (dxhat - xhat * (dxhat * xhat).mean(axis=-1, keepdims=True)) * rstd
        return gx, gw


# ============================================================================ loss
class CrossEntropy(Function):
    """Softmax + negative log-likelihood from logits, fused.

    logits: (N, V), targets: (N,) int; rows whose target is ``ignore_index`` count for nothing.
    loss_i = lse_i - logits_i[t_i] with lse_i = logsumexp(logits_i)
    d loss_i / d logits_i = softmax_i - onehot(t_i) = exp(logits_i - lse_i) - onehot(t_i)
    Saves the logits (alive anyway) and lse (N,): the probabilities are never stored, the
    backward recomputes them block by block while writing the gradient.
    With label smoothing e: loss_i = (1 - e) nll_i + e (lse_i - mean_j logits_ij).
    """
    saved_inputs = (0,)

    def forward(self, logits, targets, ignore_index, reduction, label_smoothing=0.0):
        xp = backend.xp_of(logits)
        n, v = logits.shape
        lse = xp.empty(n, dtype=logits.dtype)

        def kernel(lo, hi):
            lb = logits[lo:hi]
            m = lb.max(axis=1, keepdims=True)
            e = lb - m
            xp.exp(e, out=e)
            lse[lo:hi] = (m + xp.log(e.sum(axis=1, keepdims=True)))[:, 0]
        cpu.for_rows(kernel, n, v, xp)
        valid = targets != ignore_index
        safe_t = xp.where(valid, targets, 0)
        rows = xp.arange(n)
        nll = lse - logits[rows, safe_t]
        if label_smoothing:
            smooth = lse - logits.mean(axis=1)
            nll = (1 - label_smoothing) * nll + label_smoothing * smooth
        nll = xp.where(valid, nll, 0).astype(logits.dtype, copy=False)
        count = int(valid.sum())
        self.logits, self.lse, self.t, self.valid, self.rows = logits, lse, safe_t, valid, rows
        self.reduction, self.count, self.ls = reduction, count, label_smoothing
        if reduction == "none":
            return nll
        # a float16 sum of many row losses overflows (65504): reduce in float32 at least
        acc = xp.float32 if nll.dtype.itemsize < 4 else nll.dtype
        total = nll.sum(dtype=acc)
        if reduction == "sum":
            return total.astype(nll.dtype)
        return (total / max(count, 1)).astype(nll.dtype) if count else \
            (total * xp.asarray(float("nan"), dtype=acc)).astype(nll.dtype)

    def backward(self, g):
        xp = backend.xp_of(g)
        logits, lse = self.logits, self.lse
        n, v = logits.shape
        if self.reduction == "mean":
            scale = g / max(self.count, 1) * self.valid            # (N,)
        else:
            scale = g * self.valid
        scale = scale.astype(logits.dtype, copy=False)
        grad = xp.empty_like(logits)
        ls = self.ls

        def kernel(lo, hi):
            gb = grad[lo:hi]
            xp.subtract(logits[lo:hi], lse[lo:hi, None], out=gb)
            xp.exp(gb, out=gb)                                     # softmax rows
            if ls:
                gb -= ls / v
            gb *= scale[lo:hi, None]
        cpu.for_rows(kernel, n, v, xp)
        grad[self.rows, self.t] -= (1 - ls) * scale
        return grad, None


# ============================================================================ dropout
class Dropout(Function):
    """Zero each element with probability p, scale the rest by 1 / (1 - p) (inverted dropout)."""

    def forward(self, x, p, generator=None):
        from ..random import rand_like_array
        keep = 1.0 - p
        self.mask = (rand_like_array(x, generator) < keep).astype(x.dtype) * (1.0 / keep)
        return x * self.mask

    def backward(self, g):
        return g * self.mask


# ============================================================================ attention
def attention_forward(q, k, v, mask, is_causal, scale, dropout_p, generator):
    """The math of attention, shared by both attention ops.

    q: (G, Tq, D), k: (G, Tk, D), v: (G, Tk, Dv) with G = batch x heads
    -> out (G, Tq, Dv) and what the backward needs: P (G, Tq, Tk) and the dropout mask.
    S = q k^T * scale (+ mask); P = softmax(S) row by row; out = P v.
    On NumPy it runs over blocks of heads, each block start to finish (scores, softmax,
    mixing) while its scores are in cache, the blocks spread over the thread pool.
    """
    xp = backend.xp_of(q)
    g_, tq, _ = q.shape
    tk, dv_ = k.shape[1], v.shape[2]
    off = tk - tq
    causal = is_causal and tq > 1
    p = xp.empty((g_, tq, tk), dtype=q.dtype)
    out = xp.empty((g_, tq, dv_), dtype=q.dtype)
    dmask = None
    if dropout_p > 0.0:
        from ..random import rand_like_array
        keep = 1.0 - dropout_p
        dmask = (rand_like_array(p, generator) < keep).astype(p.dtype) * (1.0 / keep)
    p_used = xp.empty_like(p) if dmask is not None else p
    if causal:  # 0 where query i may see key j, -inf in its future: added to the scores
        future = xp.where(xp.arange(tk)[None, :] > (xp.arange(tq) + off)[:, None],
                          xp.asarray(-xp.inf, dtype=q.dtype), xp.asarray(0, dtype=q.dtype))

    def kernel(lo, hi):
        sb = p[lo:hi]
        xp.matmul(q[lo:hi], k[lo:hi].swapaxes(-1, -2), out=sb)              # scores
        sb *= scale
        if mask is not None:
            if mask.dtype == bool:
                sb[~mask[lo:hi]] = -xp.inf
            else:
                sb += mask[lo:hi]
        if causal:
            sb += future
        sb -= sb.max(axis=-1, keepdims=True)
        xp.exp(sb, out=sb)
        sb /= sb.sum(axis=-1, keepdims=True)                                 # P
        if dmask is not None:
            xp.multiply(sb, dmask[lo:hi], out=p_used[lo:hi])
        xp.matmul(p_used[lo:hi], v[lo:hi], out=out[lo:hi])                   # mixing
    cpu.for_rows(kernel, g_, tq * tk, xp)
    return out, p, p_used, dmask


def attention_backward(g, q, k, v, p, p_used, dmask, scale, need=(True, True, True),
                       dscores=None):
    """dv = P^T dout, dP = dout v^T, dS = P * (dP - rowsum(dP * P)), dq = dS k * scale,
    dk = dS^T q * scale. All (G, T, .) arrays; on NumPy by blocks of heads, as the forward.
    ``dscores`` (G, Tq, Tk), if given, receives dS: the gradient of an additive mask."""
    xp = backend.xp_of(g)
    dq = xp.empty_like(q) if need[0] else None
    dk = xp.empty_like(k) if need[1] else None
    dv = xp.empty_like(v) if need[2] else None

    softmax_back = (jit.kernels().softmax_scores_backward
                    if dscores is None and jit.use_for(p) else None)

    def kernel(lo, hi):
        if dv is not None:
            xp.matmul(p_used[lo:hi].swapaxes(-1, -2), g[lo:hi], out=dv[lo:hi])
        ds = xp.matmul(g[lo:hi], v[lo:hi].swapaxes(-1, -2))                # dP (b, Tq, Tk)
        if dmask is not None:
            ds *= dmask[lo:hi]
        pb = p[lo:hi]
        if softmax_back is not None:                   # compiled: dS * scale in one pass
            softmax_back(ds, pb, scale)
        else:
            ds -= (ds * pb).sum(axis=-1, keepdims=True)
            ds *= pb                                                         # dS
            if dscores is not None:
                dscores[lo:hi] = ds
            ds *= scale
        if dq is not None:
            xp.matmul(ds, k[lo:hi], out=dq[lo:hi])
        if dk is not None:
            xp.matmul(ds.swapaxes(-1, -2), q[lo:hi], out=dk[lo:hi])
    cpu.for_rows(kernel, g.shape[0], p.shape[1] * p.shape[2], xp)
    return dq, dk, dv


class Attention(Function):
    """Scaled dot-product attention as one op, keeping only the attention weights P.

    q: (..., Tq, D), k, v: (..., Tk, D)  ->  out: (..., Tq, D)
    ``mask``: None, a bool array (True = may attend) or a float array added to the scores;
    ``is_causal`` adds the causal mask. Dropout on P uses ``dropout_p`` and a seeded generator.
    """
    saved_inputs = (0, 1, 2)

    def forward(self, q, k, v, mask=None, is_causal=False, scale=None, dropout_p=0.0,
                generator=None):
        lead = q.shape[:-2]
        scale = 1.0 / (q.shape[-1] ** 0.5) if scale is None else scale
        q3, k3, v3 = (a.reshape((-1,) + a.shape[-2:]) for a in (q, k, v))
        if mask is not None:
            xp = backend.xp_of(q)
            mask = xp.broadcast_to(mask, lead + (q.shape[-2], k.shape[-2]))
            mask = mask.reshape((-1,) + mask.shape[-2:])
        out, p, p_used, dmask = attention_forward(q3, k3, v3, mask, is_causal, scale,
                                                  dropout_p, generator)
        self.saved = (q3, k3, v3, p, p_used, dmask, scale)
        self.shapes = (q.shape, k.shape, v.shape)
        return out.reshape(lead + out.shape[-2:])

    def backward(self, g):
        q3, k3, v3, p, p_used, dmask, scale = self.saved
        g3 = g.reshape((-1,) + g.shape[-2:])
        dq, dk, dv = attention_backward(g3, q3, k3, v3, p, p_used, dmask, scale,
                                        self.needs_input_grad)
        return tuple(d.reshape(s) if d is not None else None for d, s in zip((dq, dk, dv), self.shapes))


class SelfAttention(Function):
    """Multi-head self-attention straight from the packed qkv projection: the one attention
    op of MultiHeadAttention, for training and for cached decoding.

    qkv: (B, T, 3C) as produced by one Linear(C, 3C), C = n_head * D  ->  out: (B, T, C).
    ``n_head`` is the number of heads this layer holds (under tensor parallelism, one rank's
    share): D comes from the shape, nothing assumes that C is the model's width.
    ``mask`` (an input, optional): a bool array (True = may attend) or a float array added
    to the scores, broadcastable to (B, H, T, Tk); a float mask that requires grad (a learned
    bias) gets dL/dmask = dL/dscores, summed over its broadcast dims by the engine.
    ``is_causal``: query i (the i-th of the last T positions) sees keys <= it.
    ``cos``/``sin`` (T, D/2): rotary positions for q and k. ``dropout_p``: on the weights P.
    ``kv_cache``: an object whose ``update(k, v)`` stores the new keys/values (B, H, T, D)
    and returns all cached ones (B, H, Tk, D) (``nn.KVCache``); inference only: no gradient
    flows into the cache, so it is refused while grad mode is on.

    The same math as ``nn.reference.self_attention`` (split q, k, v, heads, rotate, attend,
    merge) without the intermediate copies: q, k, v are gathered into one (3, B, H, T, D)
    buffer once, and the backward writes dq, dk, dv straight back into one (B, T, 3C) gradient.
    """

    def forward(self, qkv, mask=None, *, n_head, is_causal=True, dropout_p=0.0, generator=None,
                cos=None, sin=None, kv_cache=None):
        xp = backend.xp_of(qkv)
        b, t, c3 = qkv.shape
        if c3 % (3 * n_head):
            raise ValueError(f"SelfAttention: qkv has {c3} features, not 3 x {n_head} heads x "
                             f"a head size")
        d = c3 // (3 * n_head)
        if kv_cache is not None and is_grad_enabled():
            raise RuntimeError("SelfAttention: a KVCache is for inference only (no gradient "
                               "flows through it); decode under tl.no_grad(), or train "
                               "without kv_cache")
        # (B, T, 3, H, D) -> (3, B, H, T, D), one copy; q, k, v are views of it
        heads = xp.ascontiguousarray(qkv.reshape(b, t, 3, n_head, d).transpose(2, 0, 3, 1, 4))
        if cos is not None:
            heads[:2] = rotate(heads[:2], cos, sin)
        q, k, v = heads[0], heads[1], heads[2]
        if kv_cache is not None:
            k, v = kv_cache.update(k, v)                       # (B, H, cached + T, D)
        tk, g_ = k.shape[2], b * n_head
        q, k, v = q.reshape(g_, t, d), k.reshape(g_, tk, d), v.reshape(g_, tk, d)  # views
        if mask is not None:
            if mask.dtype.kind == "f":
                mask = mask.astype(qkv.dtype, copy=False)
            mask = xp.broadcast_to(mask, (b, n_head, t, tk)).reshape(g_, t, tk)
        scale = 1.0 / d ** 0.5
        out, p, p_used, dmask = attention_forward(q, k, v, mask, is_causal, scale, dropout_p,
                                                  generator)
        self.saved = (q, k, v, p, p_used, dmask, scale, cos, sin)
        self.dims = (b, t, n_head, d)
        # (B*H, T, D) -> (B, T, H, D) -> (B, T, C)
        return out.reshape(b, n_head, t, d).transpose(0, 2, 1, 3).reshape(b, t, n_head * d)

    def backward(self, g):
        xp = backend.xp_of(g)
        q, k, v, p, p_used, dmask, scale, cos, sin = self.saved
        b, t, h, d = self.dims
        g3 = xp.ascontiguousarray(g.reshape(b, t, h, d).transpose(0, 2, 1, 3)).reshape(b * h, t, d)
        need_qkv = self.needs_input_grad[0]
        need_mask = len(self.needs_input_grad) > 1 and self.needs_input_grad[1]
        ds = xp.empty_like(p) if need_mask else None                      # (B*H, T, Tk)
        dq, dk, dv = attention_backward(g3, q, k, v, p, p_used, dmask, scale, (need_qkv,) * 3,
                                        dscores=ds)
        dqkv = None
        if need_qkv:
            dqkv = xp.empty((b, t, 3, h, d), dtype=g.dtype)
            grads = [dq, dk, dv]
            if cos is not None:  # the rotation's backward is the rotation by the opposite angle
                grads[0], grads[1] = rotate(dq, cos, -sin), rotate(dk, cos, -sin)
            for i, gi in enumerate(grads):
                dqkv[:, :, i] = gi.reshape(b, h, t, d).transpose(0, 2, 1, 3)
            dqkv = dqkv.reshape(b, t, 3 * h * d)
        return dqkv, (ds.reshape(b, h, t, p.shape[2]) if need_mask else None)


def rotate(x, cos, sin):
    """RoPE on the last dim of x (..., T, D): [x1 cos - x2 sin, x2 cos + x1 sin]."""
    xp = backend.xp_of(x)
    h = x.shape[-1] // 2
    x1, x2 = x[..., :h], x[..., h:]
    return xp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


# ============================================================================ rotary positions
class Rotary(Function):
    """Rotary position embedding (RoPE, Su et al. 2021), "rotate half" layout.

    x: (..., T, D); cos, sin: (T, D/2). With x = [x1, x2] (halves of the last dim):
    y = [x1 cos - x2 sin, x2 cos + x1 sin]. Its backward is the rotation by the opposite
    angle: dx = [g1 cos + g2 sin, g2 cos - g1 sin].
    """
    saved_inputs = (1, 2)

    def forward(self, x, cos, sin):
        self.cos, self.sin = cos, sin
        return rotate(x, cos, sin)

    def backward(self, g):
        return rotate(g, self.cos, -self.sin)
