"""Under ``mpiexec -n 4``: groups laid out as Megatron's, every collective, the ranks on
this machine, and data parallelism with parameters some ranks (or all) do not use.

Rank 0 prints one JSON line; any failed check raises and ends every rank.
"""
import contextlib
import json
import os

import numpy as np

import nn
import parallel
import tensorlite as tl
from parallel.layout import Layout

state = parallel.init_parallel(tp=2)
world = state.world
rank, size = world.rank, world.size
assert size == 4, "run me with mpiexec -n 4"
out = {}

# -- groups: who is in which, asked of MPI itself ------------------------------------------
layout = Layout(size, tp=2)
for kind in ("dp", "tp", "pp"):
    g = getattr(state, kind)
    members = np.empty(g.size, np.int64)
    g.all_gather(np.array([rank], np.int64), members)
    assert members.tolist() == layout.group(kind, rank), (kind, members, layout.group(kind, rank))
    assert g.rank == layout.coords(rank)[kind]
out["groups"] = {k: layout.groups(k) for k in ("dp", "tp", "pp")}

# -- collectives -----------------------------------------------------------------------------
a = np.arange(6, dtype=np.float64) + rank
world.all_reduce(a)
assert np.array_equal(a, 4 * np.arange(6) + 6), a
for op, want in (("max", 3), ("min", 0)):
    b = np.array([rank], np.int32)
    world.all_reduce(b, op)
    assert b[0] == want, (op, b)
c = np.full(5, float(rank), np.float32)
req = world.all_reduce(c, async_op=True)
req.wait()
assert req.completed and np.all(c == 6)
send = np.arange(8, dtype=np.float64) * (rank + 1)          # (size * 2,)
recv = np.empty(2, np.float64)
world.reduce_scatter(send, recv)
assert np.array_equal(recv, np.arange(8)[2 * rank:2 * rank + 2] * 10), recv
gathered = np.empty(8, np.float64)
world.all_gather(recv, gathered, async_op=True).wait()
assert np.array_equal(gathered, np.arange(8) * 10.0)
d = np.full(3, rank, np.int64)
world.broadcast(d, root=2)
assert np.all(d == 2)
e = np.full(4, float(rank))
state.tp.broadcast(e, root=1)                               # a sub-group's own rank numbering
assert np.all(e == layout.group("tp", rank)[1])
right, left = (rank + 1) % size, (rank - 1) % size          # a ring of isend / irecv
got = np.empty(3, np.float64)
reqs = [world.irecv(got, left, tag=7), world.isend(np.full(3, float(rank)), right, tag=7)]
for r_ in reqs:
    r_.wait()
assert np.all(got == left)
assert world.all_reduce_scalar(rank + 0.5, "max") == 3.5
try:
    world.all_reduce(np.zeros((4, 4))[:, 0])
    raise AssertionError("a strided array was accepted")
except ValueError as err:
    assert "C-contiguous" in str(err) and "strides" in str(err), err
world.barrier()

# -- this machine ------------------------------------------------------------------------------
assert parallel.local_size() == 4 and parallel.local_rank() == rank
threads = parallel.cpu_threads_per_rank()
cores = len(os.sched_getaffinity(0))
assert threads == max(1, cores // 4), (threads, cores)
if not os.environ.get("TENSORLITE_NUM_THREADS"):
    assert tl.get_num_threads() == threads, (tl.get_num_threads(), threads)
out["threads"] = [threads, cores]


# -- data parallel with unused parameters --------------------------------------------------------
class Net(nn.Module):
    """a -> b -> out; ``c`` is never used; ``b`` is skipped when ``skip_b``."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(3, 3), nn.Linear(3, 3), nn.Linear(3, 3)

    def forward(self, x, skip_b):
        h = self.a(x).tanh()
        return (h if skip_b else self.b(h)).sum()


def grads_of(model):
    return {n: (None if p.grad is None else p.grad.data.copy()) for n, p in model.named_parameters()}


tl.manual_seed(0)
net = Net().double()
dp = parallel.DataParallel(net, state.dp, bucket_cap_mb=48 / 2 ** 20)   # 2 params a bucket
x = tl.tensor(np.random.default_rng(rank).standard_normal((4, 3)))
# rank with dp coordinate 1 skips b in the last micro-step but uses it in the first
skip_last = state.dp.rank == 1
local = {}                                       # what one process would accumulate here
for micro, skip in enumerate((False, skip_last)):
    quiet = dp.no_sync() if micro == 0 else contextlib.nullcontext()
    with quiet:
        net(x * (micro + 1), skip).backward()
local = grads_of(net)                            # before finish: the local sums
dp.finish()
after = grads_of(net)
assert after["c.weight"] is None and after["c.bias"] is None, "unused everywhere: stays None"
for name, g in local.items():
    if g is None:
        continue
    everyone = np.empty(g.size * state.dp.size)
    state.dp.all_gather(np.ascontiguousarray(g.reshape(-1)), everyone)
    want = everyone.reshape(state.dp.size, -1).mean(axis=0).reshape(g.shape)
    assert np.allclose(after[name], want, rtol=0, atol=1e-15), name
# a rank with no gradient at all for b in a step: zeros from it, not a hang
net.zero_grad()
net(x, skip_b=state.dp.rank == 0).backward()
dp.finish()
assert net.b.weight.grad is not None and net.c.weight.grad is None
# a second backward without no_sync is refused, naming the fix
net.zero_grad()
net(x, False).backward()
try:
    net(x, False).backward()
    raise AssertionError("a second backward before finish() was accepted")
except RuntimeError as err:
    assert "no_sync" in str(err), err
out["unused_parameters"] = "ok"

if rank == 0:
    print("RESULT " + json.dumps(out), flush=True)
