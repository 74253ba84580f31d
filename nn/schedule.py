"""Learning-rate schedules: pure functions of the step, and small schedulers that set
``group["lr"]`` on an optimizer (PyTorch's ``LRScheduler`` habits: build it after the
optimizer, call ``scheduler.step()`` once after each ``optimizer.step()``).

    sched = WarmupCosine(opt, warmup_steps=100, max_steps=5000, min_lr=3e-5)
    for it in range(5000):
        loss.backward(); opt.step(); opt.zero_grad(); sched.step()

Optimizer step ``k`` (counting from 0) runs with ``warmup_cosine(k, ...)``.
"""
from __future__ import annotations

import math
import numbers

__all__ = ["constant_lr", "warmup_cosine", "LRScheduler", "WarmupCosine", "LambdaLR"]


def _check_step(fn: str, step) -> int:
    if isinstance(step, bool) or not isinstance(step, numbers.Integral) or step < 0:
        raise ValueError(f"{fn}: step must be an int >= 0, got {step!r}")
    return int(step)


def _check_lr(fn: str, name: str, lr) -> float:
    if isinstance(lr, bool) or not isinstance(lr, numbers.Real) or not math.isfinite(lr) or lr < 0:
        raise ValueError(f"{fn}: {name} must be a finite number >= 0, got {lr!r}")
    return float(lr)


def constant_lr(step: int, lr: float) -> float:
    """The same learning rate at every step."""
    _check_step("constant_lr", step)
    return _check_lr("constant_lr", "lr", lr)


def _check_warmup_cosine(max_lr, warmup_steps, max_steps, min_lr):
    fn = "warmup_cosine"
    max_lr = _check_lr(fn, "max_lr", max_lr)
    min_lr = _check_lr(fn, "min_lr", min_lr)
    for name, v in (("warmup_steps", warmup_steps), ("max_steps", max_steps)):
        if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 0:
            raise ValueError(f"{fn}: {name} must be an int >= 0, got {v!r}")
    if warmup_steps > max_steps:
        raise ValueError(f"{fn}: warmup_steps={warmup_steps} is greater than "
                         f"max_steps={max_steps}; the warmup must end before the decay does")
    if min_lr > max_lr:
        raise ValueError(f"{fn}: min_lr={min_lr} is greater than max_lr={max_lr}")
    return max_lr, int(warmup_steps), int(max_steps), min_lr


def warmup_cosine(step: int, max_lr: float, warmup_steps: int, max_steps: int,
                  min_lr: float = 0.0) -> float:
    """Linear warmup then cosine decay (as nanoGPT's ``get_lr``):

    - ``step < warmup_steps``: ``max_lr * (step + 1) / (warmup_steps + 1)`` (small but not 0
      at step 0, so the first step is not wasted; reaches ``max_lr`` at ``warmup_steps``);
    - ``warmup_steps <= step < max_steps``: ``min_lr + (max_lr - min_lr) * (1 + cos(pi * r)) / 2``
      with ``r = (step - warmup_steps) / (max_steps - warmup_steps)`` going from 0 to 1;
    - ``step >= max_steps``: ``min_lr``.
    """
    step = _check_step("warmup_cosine", step)
    max_lr, warmup_steps, max_steps, min_lr = _check_warmup_cosine(max_lr, warmup_steps,
                                                                   max_steps, min_lr)
    if step < warmup_steps:
        return max_lr * (step + 1) / (warmup_steps + 1)
    if step >= max_steps:
        return min_lr
    r = (step - warmup_steps) / (max_steps - warmup_steps)
    return min_lr + (max_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * r))


class LRScheduler:
    """Base class: sets every group's ``lr`` to ``lr_at(step)[i]``. The base learning rates
    are the groups' ``lr`` when the scheduler is built (kept as ``group["initial_lr"]``, as
    PyTorch does). Construction applies step 0; each ``step()`` moves to the next step."""

    def __init__(self, optimizer):
        if not hasattr(optimizer, "param_groups"):
            raise TypeError(f"{type(self).__name__}: expected an optimizer, got "
                            f"{type(optimizer).__name__}")
        self.optimizer = optimizer
        for g in optimizer.param_groups:
            g.setdefault("initial_lr", g["lr"])
        self.base_lrs = [float(g["initial_lr"]) for g in optimizer.param_groups]
        self.last_step = 0
        self._apply()

    def lr_at(self, step: int) -> list:  # pragma: no cover - abstract
        raise NotImplementedError

    def _apply(self):
        lrs = self.lr_at(self.last_step)
        for g, lr in zip(self.optimizer.param_groups, lrs):
            g["lr"] = float(lr)
        self._last_lr = [float(lr) for lr in lrs]

    def step(self) -> None:
        self.last_step += 1
        self._apply()

    def get_last_lr(self) -> list:
        """The learning rate of each group, as set by the last ``step()`` (or construction)."""
        return list(self._last_lr)

    def state_dict(self) -> dict:
        """JSON-able: the step and the schedule's numbers (not the optimizer, not callables)."""
        return {k: v for k, v in self.__dict__.items()
                if k not in ("optimizer", "_last_lr") and not callable(v)}

    def load_state_dict(self, state: dict) -> None:
        own = self.state_dict()
        unknown = sorted(set(state) - set(own))
        if unknown:
            raise ValueError(f"{type(self).__name__}.load_state_dict: unknown keys {unknown} "
                             f"(expected {sorted(own)}); is this another scheduler's state?")
        for k, v in state.items():
            setattr(self, k, list(v) if isinstance(v, tuple) else v)
        if len(self.base_lrs) != len(self.optimizer.param_groups):
            raise ValueError(f"{type(self).__name__}.load_state_dict: the state has "
                             f"{len(self.base_lrs)} base learning rates but the optimizer has "
                             f"{len(self.optimizer.param_groups)} groups")
        self._apply()


class WarmupCosine(LRScheduler):
    """``warmup_cosine`` for every group, with the group's initial ``lr`` as ``max_lr``.
    ``min_lr``: one number for all groups (as PyTorch's ``eta_min``) or one per group."""

    def __init__(self, optimizer, warmup_steps: int, max_steps: int, min_lr=0.0):
        n = len(optimizer.param_groups)
        mins = list(min_lr) if isinstance(min_lr, (list, tuple)) else [min_lr] * n
        if len(mins) != n:
            raise ValueError(f"WarmupCosine: {len(mins)} min_lr values for {n} parameter groups")
        self.warmup_steps, self.max_steps, self.min_lrs = warmup_steps, max_steps, mins
        for g, m in zip(optimizer.param_groups, mins):   # errors before touching the optimizer
            _check_warmup_cosine(g.get("initial_lr", g["lr"]), warmup_steps, max_steps, m)
        super().__init__(optimizer)

    def lr_at(self, step: int) -> list:
        return [warmup_cosine(step, base, self.warmup_steps, self.max_steps, m)
                for base, m in zip(self.base_lrs, self.min_lrs)]


class LambdaLR(LRScheduler):
    """``lr = initial_lr * lr_lambda(step)`` (PyTorch's ``LambdaLR``; the function is not saved
    in ``state_dict``)."""

    def __init__(self, optimizer, lr_lambda):
        self.lr_lambda = lr_lambda
        super().__init__(optimizer)

    def lr_at(self, step: int) -> list:
        return [base * float(self.lr_lambda(step)) for base in self.base_lrs]
