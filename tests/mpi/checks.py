"""What the tests/mpi/ equivalence scripts share: the tolerances, one comparison, and a Group
that counts its all-reduces."""
import numpy as np

TOL = {"float64": 1e-10, "float32": 1e-5}


def close(a, b, dtype, what, where=""):
    """The error of ``a`` against ``b`` (float64: largest absolute; float32: relative L2),
    or an AssertionError naming ``where`` (the rank or stage) and ``what`` when the shapes
    differ or the error exceeds the tolerance."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape:
        raise AssertionError(f"{where}: {what}: shape {a.shape} vs {b.shape}")
    if dtype == "float64":
        err = float(np.max(np.abs(a - b))) if a.size else 0.0
    else:
        err = float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))
    if not err <= TOL[dtype]:
        worst = np.unravel_index(np.argmax(np.abs(a - b)), a.shape) if a.ndim else ()
        raise AssertionError(f"{where}, {dtype}: {what} differ: error {err:.3g} > {TOL[dtype]} "
                             f"(shape {a.shape}; worst element {worst}: {a[worst]!r} vs "
                             f"{b[worst]!r})")
    return err


class Counting:
    """A Group that counts its all-reduces (everything else passes through)."""

    def __init__(self, g):
        self.g, self.count = g, 0

    def all_reduce(self, *args, **kwargs):
        self.count += 1
        return self.g.all_reduce(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.g, name)
