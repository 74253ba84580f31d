"""tensorlite: a Tensor with reverse-mode autograd over NumPy (CPU) or CuPy (GPU) arrays.

    import tensorlite as tl
    x = tl.randn(3, 4, requires_grad=True)
    (x.tanh() @ x.T).sum().backward()
    x.grad
"""
from . import backend, cpu, jit
from .cpu import get_num_threads, set_num_threads
from .backend import cuda_available, cuda_unavailable_reason
from .creation import (arange, eye, full, ones, ones_like, rand, randint, randn, tensor, zeros,
                       zeros_like)
from .draw import draw_graph
from .gradcheck import GradcheckError, gradcheck, gradcheck_directional
from .ops.elementwise import add, clip, div, mul, pow, sub
from .ops.indexing import masked_fill, one_hot, take, where
from .ops.matmul import matmul
from .ops.nn import log_softmax, logsumexp, softmax
from .ops.reduce import argmax, argmin
from .ops.shape import cat, chunk, expand, flatten, permute, reshape, split, squeeze, stack, \
    transpose, unsqueeze
from .random import Generator, default_generator, manual_seed
from .tensor import (Function, Tensor, as_dtype, bool_, enable_grad, float16, float32, float64,
                     get_default_dtype, int8, int16, int32, int64, is_grad_enabled, no_grad,
                     set_default_dtype, uint8, unbroadcast)

clamp = clip


def _unary(name):
    def f(x, *args, **kwargs):
        return getattr(x, name)(*args, **kwargs)
    f.__name__ = name
    f.__doc__ = f"Functional form of ``Tensor.{name}``."
    return f


exp, log, sqrt, tanh, sigmoid, relu, abs, log_sigmoid = (_unary(n) for n in (
    "exp", "log", "sqrt", "tanh", "sigmoid", "relu", "abs", "log_sigmoid"))
sum, mean, max, min, var, std = (_unary(n) for n in ("sum", "mean", "max", "min", "var", "std"))
neg = _unary("__neg__")

__version__ = "0.1.0"
