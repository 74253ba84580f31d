"""Random numbers: one seeded NumPy generator for every device.

Values are drawn on the host and moved to the tensor's device, so the same seed gives the
same initial weights on the CPU and on a GPU (parallel equivalence tests rely on it).
"""
from __future__ import annotations

import numpy as np

from . import backend


class Generator:
    """A seeded source of random numbers (wraps ``numpy.random.Generator``)."""

    def __init__(self, seed: int | None = None):
        self.manual_seed(seed)

    def manual_seed(self, seed):
        if seed is not None and (not isinstance(seed, (int, np.integer)) or seed < 0):
            raise ValueError(f"seed must be a non-negative int, got {seed!r}")
        self.np = np.random.Generator(np.random.PCG64(seed))
        return self

    def get_state(self) -> dict:
        """A JSON-able snapshot (for checkpoints)."""
        return self.np.bit_generator.state

    def set_state(self, state: dict) -> None:
        self.np.bit_generator.state = state


default_generator = Generator(0)


def manual_seed(seed: int) -> Generator:
    """Seed the global generator (and return it), as ``torch.manual_seed``."""
    return default_generator.manual_seed(seed)


def _gen(generator):
    return (generator or default_generator).np


def randn_array(shape, dtype, device, generator=None):
    a = _gen(generator).standard_normal(shape, dtype=np.float32 if dtype == np.float16 else dtype)
    return backend.to_device(a.astype(dtype, copy=False), device)


def rand_array(shape, dtype, device, generator=None):
    a = _gen(generator).random(shape, dtype=np.float32 if dtype == np.float16 else dtype)
    return backend.to_device(a.astype(dtype, copy=False), device)


def randn_like_array(a, generator=None):
    return randn_array(a.shape, a.dtype, backend.device_of(a), generator)


def rand_like_array(a, generator=None):
    return rand_array(a.shape, a.dtype, backend.device_of(a), generator)


def randint_array(low, high, shape, device, generator=None):
    return backend.to_device(_gen(generator).integers(low, high, shape, dtype=np.int64), device)
