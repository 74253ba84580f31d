"""Shape and movement: reshape/view, permute/transpose, squeeze/unsqueeze, expand, cat, stack, split."""
from __future__ import annotations

from .. import backend
from ..tensor import Function, Tensor
from .elementwise import check_same_device


def _shape_arg(shape):
    if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
        return tuple(shape[0])
    return tuple(shape)


def _dim(d: int, ndim: int, op: str) -> int:
    if not isinstance(d, int):
        raise TypeError(f"{op}: dim must be an int, got {d!r}")
    if not -ndim <= d < ndim:
        raise IndexError(f"{op}: dim {d} is out of range for a tensor with {ndim} dims "
                         f"(valid: {-ndim} .. {ndim - 1})")
    return d % ndim


class Reshape(Function):
    makes_view = True

    def forward(self, x, shape):
        self.in_shape = x.shape
        return x.reshape(shape)

    def backward(self, g):
        return g.reshape(self.in_shape)

    @staticmethod
    def unview(old_base, new, shape):
        """A write through this view, as the base's new value (it covers all of the base)."""
        return Reshape.apply(new, shape=old_base.shape)


def reshape(x: Tensor, *shape) -> Tensor:
    shape = _shape_arg(shape)
    size = x.data.size
    known, infer = 1, 0
    for n in shape:
        if n == -1:
            infer += 1
        elif not isinstance(n, int) or n < 0:
            raise ValueError(f"reshape: invalid size {n!r} in shape {shape}")
        else:
            known *= n
    if infer > 1 or (infer == 0 and known != size) or (infer == 1 and (known == 0 or size % known)):
        raise ValueError(f"reshape: cannot view a tensor of shape {x.shape} ({size} elements) "
                         f"as shape {shape}")
    if shape == x.shape:
        return x
    return Reshape.apply(x, shape=shape)


def flatten(x: Tensor, start_dim=0, end_dim=-1) -> Tensor:
    if x.ndim == 0:
        return reshape(x, 1)
    s, e = _dim(start_dim, x.ndim, "flatten"), _dim(end_dim, x.ndim, "flatten")
    if s > e:
        raise ValueError(f"flatten: start_dim {start_dim} comes after end_dim {end_dim}")
    return reshape(x, *x.shape[:s], -1, *x.shape[e + 1:])


class Permute(Function):
    makes_view = True

    def forward(self, x, dims):
        self.inv = tuple(sorted(range(len(dims)), key=dims.__getitem__))
        return x.transpose(dims)

    def backward(self, g):
        return g.transpose(self.inv)

    @staticmethod
    def unview(old_base, new, dims):
        return Permute.apply(new, dims=tuple(sorted(range(len(dims)), key=dims.__getitem__)))


def permute(x: Tensor, *dims) -> Tensor:
    dims = _shape_arg(dims)
    if sorted(d % max(x.ndim, 1) for d in dims) != list(range(x.ndim)) or len(dims) != x.ndim:
        raise ValueError(f"permute: dims {dims} are not a permutation of the {x.ndim} dims "
                         f"of a tensor of shape {x.shape}")
    dims = tuple(d % x.ndim for d in dims)
    if dims == tuple(range(x.ndim)):
        return x
    return Permute.apply(x, dims=dims)


def transpose(x: Tensor, d0: int, d1: int) -> Tensor:
    d0, d1 = _dim(d0, x.ndim, "transpose"), _dim(d1, x.ndim, "transpose")
    dims = list(range(x.ndim))
    dims[d0], dims[d1] = dims[d1], dims[d0]
    return permute(x, *dims)


def squeeze(x: Tensor, dim=None) -> Tensor:
    if dim is None:
        return reshape(x, *[n for n in x.shape if n != 1])
    dims = (dim,) if isinstance(dim, int) else tuple(dim)
    dims = {_dim(d, x.ndim, "squeeze") for d in dims}
    return reshape(x, *[n for i, n in enumerate(x.shape) if not (i in dims and n == 1)])


def unsqueeze(x: Tensor, dim: int) -> Tensor:
    d = _dim(dim, x.ndim + 1, "unsqueeze")
    shape = list(x.shape)
    shape.insert(d, 1)
    return reshape(x, *shape)


class Expand(Function):
    makes_view = True

    def forward(self, x, shape):
        return backend.xp_of(x).broadcast_to(x, shape)

    def backward(self, g):
        return g  # the engine sums it back to the input's shape


def expand(x: Tensor, *shape) -> Tensor:
    shape = _shape_arg(shape)
    if len(shape) < x.ndim:
        raise ValueError(f"expand: target shape {shape} has fewer dims than the tensor's {x.shape}")
    lead = len(shape) - x.ndim
    full = list(shape[:lead])
    for n_in, n_out in zip(x.shape, shape[lead:]):
        if n_out == -1:
            n_out = n_in
        if n_in != 1 and n_in != n_out:
            raise ValueError(f"expand: cannot expand shape {x.shape} to {shape} "
                             f"(size {n_in} is not 1 and differs from {n_out})")
        full.append(n_out)
    return Expand.apply(x, shape=tuple(full))


class Cat(Function):
    def forward(self, *arrays, axis):
        self.axis = axis
        self.bounds = []
        pos = 0
        for a in arrays:
            self.bounds.append((pos, pos + a.shape[axis]))
            pos += a.shape[axis]
        return backend.xp_of(arrays[0]).concatenate(arrays, axis=axis)

    def backward(self, g):
        idx = [slice(None)] * g.ndim
        out = []
        for (lo, hi), need in zip(self.bounds, self.needs_input_grad):
            idx[self.axis] = slice(lo, hi)
            out.append(g[tuple(idx)] if need else None)
        return tuple(out)


def _check_seq(tensors, op):
    tensors = list(tensors)
    if not tensors:
        raise ValueError(f"{op}: expected a non-empty list of tensors")
    for t in tensors:
        if not isinstance(t, Tensor):
            raise TypeError(f"{op}: expected tensors, got {type(t).__name__}")
    check_same_device(op, *tensors)
    dtypes = {t.dtype for t in tensors}
    if len(dtypes) > 1:
        raise TypeError(f"{op}: tensors have different dtypes {sorted(map(str, dtypes))}; "
                        "cast them to one with .to(dtype)")
    return tensors


def cat(tensors, dim: int = 0) -> Tensor:
    tensors = _check_seq(tensors, "cat")
    ref = tensors[0]
    axis = _dim(dim, ref.ndim, "cat")
    for t in tensors[1:]:
        if t.ndim != ref.ndim or any(a != b for i, (a, b) in enumerate(zip(t.shape, ref.shape))
                                     if i != axis):
            raise ValueError(f"cat: shapes {ref.shape} and {t.shape} differ outside dim {dim}")
    return Cat.apply(*tensors, axis=axis)


class Stack(Function):
    def forward(self, *arrays, axis):
        self.axis = axis
        return backend.xp_of(arrays[0]).stack(arrays, axis=axis)

    def backward(self, g):
        xp = backend.xp_of(g)
        return tuple(xp.take(g, i, axis=self.axis) if need else None
                     for i, need in enumerate(self.needs_input_grad))


def stack(tensors, dim: int = 0) -> Tensor:
    tensors = _check_seq(tensors, "stack")
    for t in tensors[1:]:
        if t.shape != tensors[0].shape:
            raise ValueError(f"stack: all tensors must have one shape, got {tensors[0].shape} "
                             f"and {t.shape}")
    return Stack.apply(*tensors, axis=_dim(dim, tensors[0].ndim + 1, "stack"))


class Slice(Function):
    """x[lo:hi] along one axis (split's pieces): the backward pads the gradient with zeros."""

    makes_view = True

    def forward(self, x, axis, lo, hi):
        self.in_shape, self.axis, self.lo, self.hi = x.shape, axis, lo, hi
        idx = [slice(None)] * x.ndim
        idx[axis] = slice(lo, hi)
        return x[tuple(idx)]

    def backward(self, g):
        xp = backend.xp_of(g)
        out = xp.zeros(self.in_shape, dtype=g.dtype)
        idx = [slice(None)] * g.ndim
        idx[self.axis] = slice(self.lo, self.hi)
        out[tuple(idx)] = g
        return out

    @staticmethod
    def unview(old_base, new, axis, lo, hi):
        from .indexing import IndexPut
        idx = [slice(None)] * old_base.ndim
        idx[axis] = slice(lo, hi)
        return IndexPut.apply(old_base, new, idx=tuple(idx))


def split(x: Tensor, split_size, dim: int = 0):
    """Split into pieces of ``split_size`` (an int, last piece smaller) or of the given sizes."""
    axis = _dim(dim, x.ndim, "split")
    n = x.shape[axis]
    if isinstance(split_size, int):
        if split_size <= 0:
            raise ValueError(f"split: split_size must be positive, got {split_size}")
        sizes = [split_size] * (n // split_size) + ([n % split_size] if n % split_size else [])
    else:
        sizes = list(split_size)
        if sum(sizes) != n:
            raise ValueError(f"split: sizes {sizes} sum to {sum(sizes)} but dim {dim} has size {n}")
    out, pos = [], 0
    for s in sizes:
        out.append(Slice.apply(x, axis=axis, lo=pos, hi=pos + s))
        pos += s
    return tuple(out)


def chunk(x: Tensor, chunks: int, dim: int = 0):
    n = x.shape[_dim(dim, x.ndim, "chunk")]
    return split(x, -(-n // chunks), dim)
