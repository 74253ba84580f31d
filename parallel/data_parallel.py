"""Data parallelism: every rank holds the whole model, reads its own slice of the global
batch, and the gradients are averaged over the ranks before the optimizer step, so every
rank takes the same step as one process on the whole batch would.

How the averaging hides behind the backward pass (PyTorch DDP's reducer):

    parameters in model order:   p0 p1 p2 p3 p4 p5 p6 p7
    backward produces grads:     p7 p6 p5 ... p0          (roughly the reverse)
    buckets (reverse order):     [p7 p6 p5] [p4 p3] [p2 p1 p0]    <= bucket_cap_mb each
                                      |         |          |
    each gradient is copied (divided by the world size) into its bucket's flat array as
    its post-accumulate-grad hook fires; when a bucket's last one is in, its all-reduce
    starts (MPI_Iallreduce) while backward goes on with the earlier layers; finish() waits
    for all of them, and each .grad becomes a view of its slot: the average.

The overlap rests on tensorlite's backward accumulating each weight's gradient (and running
its hook) right after the last op that used it (Kahn's order, tensorlite/tensor.py), so the
hooks fire while backward still works through the earlier layers. MPICH moves a
non-blocking collective forward only inside MPI calls (no progress thread by default), so
each hook also tests the oldest request in flight (``poll_in_hooks``): bench/README.md,
"Data parallelism", measures what that hides.

Buckets start strictly in order (bucket 1 only after bucket 0), because MPI matches
collectives on a communicator by their order on each rank: two ranks starting different
buckets first would reduce the wrong arrays together.

Unused parameters (``.grad`` None on some ranks in a step: a branch not taken) must not
stall the step. Each bucket carries, after its gradients, one count per parameter: 1 where
this rank has a gradient, 0 where it does not (its slot is zeros). A bucket with a missing
gradient starts in finish() instead of from a hook. After the all-reduce a parameter's
gradient is (sum over ranks) / world size, the average over the whole batch with zeros
from the ranks that did not use it, as one process on the whole batch would compute; a
parameter no rank used keeps ``.grad = None`` (so the optimizer skips it, as in one process).

Gradient accumulation: run the micro-steps but the last inside ``no_sync()`` (the hooks do
nothing there); the last micro-step's hooks see the summed gradients and launch the buckets.
"""
from __future__ import annotations

import contextlib

from tensorlite import backend
from tensorlite.tensor import Tensor

from .comm import Group


def broadcast_parameters(module_or_params, group: Group, root: int = 0) -> None:
    """Make every rank's parameters (and a module's buffers) equal to ``root``'s, in place."""
    if hasattr(module_or_params, "parameters"):
        tensors = list(module_or_params.parameters()) + list(module_or_params.buffers())
    else:
        tensors = list(module_or_params)
    if group.size == 1:
        return
    for t in tensors:
        a = t.data
        buf = a if a.flags.c_contiguous else backend.xp_of(a).ascontiguousarray(a)
        group.broadcast(buf, root)
        if buf is not a:
            a[...] = buf


def all_reduce_mean(value: float, group: Group) -> float:
    """The mean of a Python number over the ranks: the loss of the whole global batch from
    each rank's loss of its slice (equal slices, so the mean of means is the mean)."""
    return group.all_reduce_scalar(float(value)) / group.size


class _Bucket:
    """Some parameters whose gradients are all-reduced together, as one flat array:

        flat = [ grad_0 / N | grad_1 / N | ... | count_0 count_1 ... ]      N = world size

    Each gradient is divided by N on its way in (the copy does it: no extra pass), so after
    the all-reduce (a sum) the slots hold the averages and each ``.grad`` becomes a view of
    its slot: nothing is copied back (PyTorch's ``gradient_as_bucket_view``).
    """

    def __init__(self, params, xp, dtype, world_size: int):
        self.params, self.world_size = params, world_size
        self.offsets, n = [], 0
        for p in params:
            self.offsets.append(n)
            n += p.numel()
        self.n_grad = n
        self.flat = xp.zeros(n + len(params), dtype)
        self.pending = len(params)       # gradients still to come in this step
        self.request = None

    def slot(self, i: int):
        """Parameter ``i``'s part of ``flat``, in its shape (a view)."""
        o, p = self.offsets[i], self.params[i]
        return self.flat[o:o + p.numel()].reshape(p.shape)

    def put(self, i: int, grad) -> None:
        """Gradient ``i`` / N into its slot (zeros when this rank has none), and its count."""
        if grad is None:
            self.slot(i)[...] = 0
        else:
            backend.xp_of(grad).divide(grad, self.world_size, out=self.slot(i))
        self.flat[self.n_grad + i] = grad is not None


class DataParallel:
    """Averages gradients over ``group`` with bucketed all-reduces launched from gradient
    hooks. ``model`` is used as it is (it is not wrapped: checkpoint the model itself);
    build this after moving the model to its device and dtype (the buckets take theirs).

        dp = DataParallel(model, state.dp)          # broadcasts rank 0's weights
        for i in range(grad_accum):
            with dp.no_sync() if i < grad_accum - 1 else contextlib.nullcontext():
                loss = model(x, y) / grad_accum; loss.backward()
        dp.finish()                                 # before clipping: grads are averaged
        clip_grad_norm_(model.parameters(), 1.0)    # the global norm: grads are identical
        opt.step(); opt.zero_grad()

    ``bucket_cap_mb``: the most gradient bytes per bucket (PyTorch's default, 25). Smaller
    buckets start earlier, more of them. ``poll_in_hooks``: each hook also tests the oldest
    request in flight; MPI libraries without a progress thread (MPICH by default) only
    move a non-blocking collective forward inside MPI calls, so without this a bucket's
    all-reduce may not advance at all until finish() (bench/bench_dp.py measures it).
    """

    def __init__(self, model, group: Group, bucket_cap_mb: float = 25.0,
                 poll_in_hooks: bool = True):
        self.module, self.group = model, group
        self.poll_in_hooks = poll_in_hooks
        self.require_sync = True
        broadcast_parameters(model, group)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.buckets = self._make_buckets(list(reversed(self.params)), bucket_cap_mb * 2 ** 20,
                                          group.size)
        self._where = {id(p): (b, i) for b in self.buckets for i, p in enumerate(b.params)}
        self._ready: set = set()         # ids of parameters whose gradient is in its bucket
        self._next = 0                   # the next bucket to launch
        self._hooks = [p.register_post_accumulate_grad_hook(self._on_grad) for p in self.params]
        # what the hooks did in the step in progress; `last_stats`: in the last finished step
        self.stats = self._new_stats()
        self.last_stats = None

    @staticmethod
    def _new_stats():
        return {"hooks": 0, "launched_in_hooks": 0, "first_launch_at_hook": None}

    @staticmethod
    def _make_buckets(params, cap_bytes, world_size):
        buckets, cur = [], []
        for p in params:
            if cur and (cur[-1].dtype != p.dtype or cur[-1].device != p.device or
                        sum(q.data.nbytes for q in cur) + p.data.nbytes > cap_bytes):
                buckets.append(cur)
                cur = []
            cur.append(p)
        if cur:
            buckets.append(cur)
        return [_Bucket(b, backend.xp_of(b[0].data), b[0].dtype, world_size) for b in buckets]

    def __call__(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    @contextlib.contextmanager
    def no_sync(self):
        """Backward passes inside accumulate gradients locally and communicate nothing."""
        old, self.require_sync = self.require_sync, False
        try:
            yield
        finally:
            self.require_sync = old

    # -- during backward --------------------------------------------------------------------
    def _on_grad(self, p) -> None:
        """Post-accumulate-grad hook: ``p.grad`` is complete for this backward."""
        if not self.require_sync:
            return
        if id(p) in self._ready:
            raise RuntimeError(
                f"DataParallel: the gradient of a parameter of shape {p.shape} arrived twice "
                "before finish(): run every micro-step but the last inside dp.no_sync(), and "
                "call dp.finish() after the last backward")
        self._ready.add(id(p))
        self.stats["hooks"] += 1
        bucket, i = self._where[id(p)]
        bucket.put(i, p.grad.data)
        bucket.pending -= 1
        while self._next < len(self.buckets) and self.buckets[self._next].pending == 0:
            self._launch(self.buckets[self._next])
            self.stats["launched_in_hooks"] += 1
            if self.stats["first_launch_at_hook"] is None:
                self.stats["first_launch_at_hook"] = self.stats["hooks"]
        if self.poll_in_hooks:
            for b in self.buckets[:self._next]:
                if not b.request.completed:
                    b.request.test()       # enters MPI: lets the collective make progress
                    break

    def _launch(self, bucket: _Bucket) -> None:
        for i, p in enumerate(bucket.params):
            if id(p) not in self._ready:
                # no hook in this step: unused in the last micro-step (maybe in an earlier
                # one, whose gradient is in .grad) or not at all (None: zeros, count 0)
                bucket.put(i, None if p.grad is None else p.grad.data)
        bucket.request = self.group.all_reduce(bucket.flat, async_op=True)
        self._next += 1

    # -- after backward ---------------------------------------------------------------------
    def finish(self) -> None:
        """Launch the buckets still waiting (those with unused parameters), wait for every
        all-reduce, and make each parameter's ``.grad`` the average over the ranks. Call it
        once per optimizer step, after the last backward, before clipping.

        The ``.grad`` are views of the buckets (clipping and the optimizer may change them
        in place): valid until the next step's backward refills the buckets, so copy one to
        keep it longer. ``zero_grad()`` (to None) between steps, as usual."""
        if not self.require_sync:
            raise RuntimeError("DataParallel.finish() inside no_sync(): call it after the last "
                               "micro-step, outside no_sync()")
        while self._next < len(self.buckets):
            self._launch(self.buckets[self._next])
        for b in self.buckets:
            b.request.wait()
            counts = backend.to_numpy(b.flat[b.n_grad:])   # host: one copy, not one per test
            for i, p in enumerate(b.params):
                # no rank had a gradient: None, as in one process; else the average, in place
                p.grad = None if counts[i] == 0 else Tensor._make(b.slot(i), False, None)
            b.pending, b.request = len(b.params), None
        self._ready.clear()
        self._next = 0
        self.last_stats, self.stats = self.stats, self._new_stats()

    def remove_hooks(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []
