"""parallel/ in one process, no MPI needed: the rank layout, the one-process communicator,
GPU-buffer staging (with a NumPy-only fake device), DataParallel's buckets and unused
parameters, ZeroAdamW against AdamW, and the startup functions without mpi4py.
(tests/test_parallel_mpi.py runs the same code on 2 and 4 ranks under mpiexec.)"""
import sys

import numpy as np
import pytest

import nn
import parallel
import tensorlite as tl
from nn.optim import AdamW, clip_grad_norm_
from parallel import comm as comm_mod
from parallel import world as world_mod
from parallel.comm import Group, SelfComm
from parallel.layout import Layout


@pytest.fixture
def no_mpi4py(monkeypatch):
    """As if mpi4py were not installed (and no world made yet)."""
    monkeypatch.setitem(sys.modules, "mpi4py", None)
    monkeypatch.setattr(world_mod, "_world", None)
    monkeypatch.setattr(world_mod, "_node", None)
    for var in world_mod._LAUNCHER_SIZE_VARS:
        monkeypatch.delenv(var, raising=False)


# ----------------------------------------------------------------------------- layout
def test_layout_is_megatrons():
    """The example of Megatron-LM's initialize_model_parallel docstring, group for group."""
    L = Layout(16, tp=2, pp=4)
    assert L.dp == 2
    assert L.groups("tp") == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9], [10, 11], [12, 13], [14, 15]]
    assert L.groups("dp") == [[0, 2], [1, 3], [4, 6], [5, 7], [8, 10], [9, 11], [12, 14], [13, 15]]
    assert L.groups("pp") == [[0, 4, 8, 12], [1, 5, 9, 13], [2, 6, 10, 14], [3, 7, 11, 15]]


@pytest.mark.parametrize("world,tp,pp", [(1, 1, 1), (8, 2, 2), (12, 3, 2), (6, 1, 3), (4, 4, 1)])
def test_layout_colors_keys_and_coordinates_agree(world, tp, pp):
    L = Layout(world, tp, pp)
    for r in range(world):
        c = L.coords(r)
        assert L.rank(**c) == r
        for kind in ("tp", "dp", "pp"):
            g = L.group(kind, r)
            assert g[c[kind]] == r                              # the key is the position
            assert L.groups(kind)[L.color(kind, r)] == g        # the colour names the group
    for kind in ("tp", "dp", "pp"):
        assert sorted(sum(L.groups(kind), [])) == list(range(world))   # a partition


def test_layout_errors_name_the_values():
    with pytest.raises(ValueError, match=r"6 ranks cannot be cut into tp=2 x pp=2 = 4"):
        Layout(6, tp=2, pp=2)
    with pytest.raises(ValueError, match="tp must be an integer >= 1, got 0"):
        Layout(4, tp=0)
    with pytest.raises(ValueError, match="group kind must be one of"):
        Layout(4).group("ep", 0)


# ----------------------------------------------------------------------------- one process
def test_self_group_collectives():
    g = Group(SelfComm(), "world")
    assert (g.rank, g.size) == (0, 1)
    a = np.arange(4.0)
    assert g.all_reduce(a) is None and np.array_equal(a, np.arange(4.0))   # in place
    recv = np.empty(4)
    g.reduce_scatter(np.arange(4.0), recv)
    assert np.array_equal(recv, np.arange(4.0))
    out = np.empty(4)
    req = g.all_gather(recv, out, async_op=True)
    assert req.test() and req.completed
    req.wait()
    assert np.array_equal(out, np.arange(4.0))
    g.broadcast(a)
    assert g.all_reduce_scalar(2.5) == 2.5
    assert g.split(0, 0, "dp").size == 1
    with pytest.raises(RuntimeError, match="no other rank"):
        g.send(a, dest=0)
    with pytest.raises(ValueError, match=r"C-contiguous .* shape \(4, 4\) and strides \(8, 32\)"):
        g.all_reduce(np.zeros((4, 4)).T)
    with pytest.raises(ValueError, match="op must be one of"):
        g.all_reduce(a, op="mean")
    with pytest.raises(ValueError, match=r"float64 \(3 elements\) and float64 \(4 elements\)"):
        g.reduce_scatter(np.zeros(3), np.zeros(4))


# ----------------------------------------------------------------------------- staging
class FakeDeviceArray:
    """Stands for a CuPy array: memory MPI must not be handed unless it is CUDA-aware."""

    def __init__(self, host):
        self._a = np.array(host)
        self.flags, self.shape, self.dtype = self._a.flags, self._a.shape, self._a.dtype
        self.size = self._a.size

    def __setitem__(self, key, value):            # what a CUDA-aware MPI writes
        self._a[key] = value._a if isinstance(value, FakeDeviceArray) else value

    def __getitem__(self, key):
        return self._a[key]


class FakeStaging:
    def __init__(self, log):
        self.log = log

    def is_device(self, a):
        return isinstance(a, FakeDeviceArray)

    def synchronize(self, a):
        self.log.append("sync")

    def to_host(self, a):
        self.log.append("to_host")
        return a._a.copy()

    def copy_from_host(self, a, host):
        self.log.append("from_host")
        a._a[...] = host


class PairComm(SelfComm):
    """Rank 0 of two; the other rank always contributes ``OTHER``. Records what MPI was
    handed, and completes non-blocking calls only at Wait (as a slow network would)."""
    OTHER = 10.0

    def __init__(self, log):
        self.log = log

    def Get_size(self):
        return 2

    def _host(self, buf):
        self.log.append(f"mpi:{type(buf).__name__}")
        return buf._a if isinstance(buf, FakeDeviceArray) else buf

    def Allreduce(self, sendbuf, recvbuf, op=SelfComm.SUM):
        r = self._host(recvbuf)
        r[...] = (r if sendbuf is SelfComm.IN_PLACE else self._host(sendbuf)) + self.OTHER

    def Allgather(self, sendbuf, recvbuf):
        s, r = self._host(sendbuf), self._host(recvbuf)
        r[:s.size], r[s.size:] = s, self.OTHER

    def Iallreduce(self, sendbuf, recvbuf, op=SelfComm.SUM):
        comm = self

        class Later:
            def Wait(self):
                comm.Allreduce(sendbuf, recvbuf, op)

            def Test(self):
                return False
        return Later()


def test_staging_through_host_when_mpi_is_not_cuda_aware():
    log = []
    g = Group(PairComm(log), "world", mpi=SelfComm, cuda_aware=False, staging=FakeStaging(log))
    dev = FakeDeviceArray(np.arange(3.0))
    g.all_reduce(dev)
    assert log == ["to_host", "mpi:ndarray", "from_host"]        # MPI never sees the device
    assert np.array_equal(dev._a, np.arange(3.0) + 10)
    log.clear()
    dev = FakeDeviceArray(np.ones(2))
    req = g.all_reduce(dev, async_op=True)
    assert np.array_equal(dev._a, np.ones(2))                    # nothing lands before wait
    req.wait()
    assert np.array_equal(dev._a, np.full(2, 11.0)) and log[-1] == "from_host"
    log.clear()
    send, recv = FakeDeviceArray(np.array([1.0, 2.0])), FakeDeviceArray(np.full(4, -1.0))
    g.all_gather(send, recv)
    # the send side is read, never written back; the receive side is written, never read
    assert log == ["to_host", "mpi:ndarray", "mpi:ndarray", "from_host"]
    assert np.array_equal(recv._a, [1, 2, 10, 10]) and np.array_equal(send._a, [1, 2])


def test_device_arrays_go_to_a_cuda_aware_mpi_after_a_stream_sync():
    log = []
    g = Group(PairComm(log), "world", mpi=SelfComm, cuda_aware=True, staging=FakeStaging(log))
    dev = FakeDeviceArray(np.arange(3.0))
    g.all_reduce(dev)
    assert log == ["sync", "mpi:FakeDeviceArray"]                # synchronised, then direct
    assert np.array_equal(dev._a, np.arange(3.0) + 10)


def test_cuda_awareness_can_be_forced(monkeypatch):
    monkeypatch.setattr(comm_mod, "_cuda_aware", None)
    monkeypatch.setenv("TENSORLITE_MPI_CUDA_AWARE", "1")
    assert comm_mod.mpi_cuda_aware() is True
    monkeypatch.setattr(comm_mod, "_cuda_aware", None)
    monkeypatch.setenv("TENSORLITE_MPI_CUDA_AWARE", "0")
    assert comm_mod.mpi_cuda_aware() is False


# ----------------------------------------------------------------------------- DataParallel
class TwoLayers(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.unused = nn.Linear(4, 8), nn.Linear(8, 2), nn.Linear(2, 2)

    def forward(self, x, use_b=True):
        h = self.a(x).tanh()
        out = self.b(h) if use_b else h
        return (out * out).sum()


def test_data_parallel_buckets_are_reverse_order_and_capped():
    tl.manual_seed(0)
    model = TwoLayers().double()
    params = list(model.parameters())
    # reverse order: unused.bias 2, unused.weight 4, b.bias 2, b.weight 16, a.bias 8,
    # a.weight 32 elements; a cap of 20 float64 -> [2 4 2] [16] [8] [32]
    dp = parallel.DataParallel(model, Group(SelfComm()), bucket_cap_mb=20 * 8 / 2 ** 20)
    assert [p for b in dp.buckets for p in b.params] == params[::-1]
    assert [[p.numel() for p in b.params] for b in dp.buckets] == [[2, 4, 2], [16], [8], [32]]
    for b in dp.buckets:
        assert b.flat.size == sum(p.numel() for p in b.params) + len(b.params)   # + counts


def test_data_parallel_in_one_process_keeps_the_gradients():
    tl.manual_seed(0)
    model = TwoLayers().double()
    ref = TwoLayers().double()
    ref.load_state_dict(model.state_dict())
    dp = parallel.DataParallel(model, Group(SelfComm()), bucket_cap_mb=1e-4)
    x1, x2 = tl.randn(3, 4, dtype=tl.float64), tl.randn(3, 4, dtype=tl.float64)
    with dp.no_sync():
        model(x1).backward()
    assert dp.stats["hooks"] == 0                        # no_sync: the hooks do nothing
    model(x2, use_b=False).backward()                    # b used in the first micro-step only
    assert dp.stats["launched_in_hooks"] < len(dp.buckets)   # b's buckets wait for finish()
    dp.finish()
    ref(x1).backward()
    ref(x2, use_b=False).backward()
    for (n, p), q in zip(model.named_parameters(), ref.parameters()):
        if q.grad is None:
            assert p.grad is None, n                     # unused: None, as in one process
        else:
            assert np.array_equal(p.grad.data, q.grad.data), n
    assert dp.last_stats["hooks"] == 2 and dp.stats["hooks"] == 0


def test_data_parallel_refuses_misuse_with_the_fix():
    model = TwoLayers().double()
    dp = parallel.DataParallel(model, Group(SelfComm()))
    x = tl.randn(2, 4, dtype=tl.float64)
    model(x).backward()
    with pytest.raises(RuntimeError, match=r"arrived twice before finish\(\): run every micro-step"):
        model(x).backward()
    with dp.no_sync(), pytest.raises(RuntimeError, match="inside no_sync"):
        dp.finish()
    assert dp.stats["hooks"] == 4        # the first backward's; the second stopped at its first
    dp.remove_hooks()
    model.zero_grad()
    model(x).backward()                  # no hooks left: nothing happens
    assert dp.stats["hooks"] == 4


def test_all_reduce_mean_and_broadcast_in_one_process():
    g = Group(SelfComm())
    assert parallel.all_reduce_mean(3.25, g) == 3.25
    p = nn.Parameter(tl.randn(2, 3))
    before = p.data.copy()
    parallel.broadcast_parameters([p], g)
    assert np.array_equal(p.data, before)


# ----------------------------------------------------------------------------- ZeroAdamW
def _mlp(dtype=tl.float64, seed=0):
    tl.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 7), nn.LayerNorm(7), nn.Linear(7, 3)).to(dtype)


def _groups(model):
    decay = [p for p in model.parameters() if p.ndim >= 2]
    rest = [p for p in model.parameters() if p.ndim < 2]
    return [{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}]


def _run(model, opt, steps, clip=None, zero=False):
    rng = np.random.default_rng(1)
    for _ in range(steps):
        x = tl.tensor(rng.standard_normal((4, 5)))
        (model(x) ** 2).mean().backward()
        if clip is not None:
            opt.clip_grad_norm_(clip) if zero else clip_grad_norm_(model.parameters(), clip)
        opt.step()
        opt.zero_grad()


def test_zero_in_one_process_is_adamw_bit_for_bit():
    a, b = _mlp(), _mlp()
    opt_a = AdamW(_groups(a), lr=1e-2, betas=(0.9, 0.95))
    opt_b = parallel.ZeroAdamW(_groups(b), Group(SelfComm()), lr=1e-2, betas=(0.9, 0.95))
    _run(a, opt_a, 4)
    _run(b, opt_b, 4, zero=True)
    for p, q in zip(a.parameters(), b.parameters()):
        assert np.array_equal(p.data, q.data)
    sa, sb = opt_a.state_dict(), opt_b.state_dict()
    assert sa["param_groups"] == sb["param_groups"]
    for i, st in sa["state"].items():
        assert sb["state"][i]["step"] == st["step"] == 4
        for k in ("exp_avg", "exp_avg_sq"):
            assert np.array_equal(sb["state"][i][k], st[k])
    assert opt_b.state_nbytes() == sum(v.nbytes for st in opt_a.state.values()
                                       for k, v in st.items() if k != "step")


def test_zero_clipping_and_lr_changes_follow_adamw():
    a, b = _mlp(), _mlp()
    opt_a = AdamW(_groups(a), lr=1e-2)
    opt_b = parallel.ZeroAdamW(_groups(b), Group(SelfComm()), lr=1e-2)
    for o in (opt_a, opt_b):
        for g in o.param_groups:
            g["lr"] = 3e-3                         # what an LR schedule does between steps
    _run(a, opt_a, 3, clip=0.05)
    _run(b, opt_b, 3, clip=0.05, zero=True)
    for p, q in zip(a.parameters(), b.parameters()):
        np.testing.assert_allclose(q.data, p.data, rtol=0, atol=1e-13)
    assert not np.allclose(_mlp()[0].weight.data, a[0].weight.data)   # it did train


def test_zero_resumes_from_adamw_and_through_a_checkpoint(tmp_path):
    a, b = _mlp(), _mlp()
    opt_a = AdamW(_groups(a), lr=1e-2)
    _run(a, opt_a, 2)
    nn.save_checkpoint(tmp_path / "ck", model=a, optimizer=opt_a)
    opt_b = parallel.ZeroAdamW(_groups(b), Group(SelfComm()), lr=0.5)
    full = AdamW(_groups(b), lr=0.5)
    nn.load_checkpoint(tmp_path / "ck", model=b, optimizer=full)   # loaded after building opt_b
    opt_b.load_state_dict(full.state_dict())
    assert opt_b.param_groups[0]["lr"] == 1e-2
    _run(a, opt_a, 2)
    _run(b, opt_b, 2, zero=True)
    for p, q in zip(a.parameters(), b.parameters()):
        assert np.array_equal(p.data, q.data)
    nn.save_checkpoint(tmp_path / "z", model=b, optimizer=opt_b.unsharded())
    c = _mlp(seed=5)
    opt_c = AdamW(_groups(c), lr=1.0)
    nn.load_checkpoint(tmp_path / "z", model=c, optimizer=opt_c)
    _run(a, opt_a, 1)
    _run(c, opt_c, 1)
    for p, q in zip(a.parameters(), c.parameters()):
        assert np.array_equal(p.data, q.data)


class FakeRankComm(SelfComm):
    """Rank ``rank`` of ``size`` for ZeroAdamW's bookkeeping (no data actually moves)."""

    def __init__(self, rank, size):
        self.rank, self.size = rank, size

    def Get_rank(self):
        return self.rank

    def Get_size(self):
        return self.size


def test_zero_shards_cut_at_group_boundaries_keep_each_groups_weight_decay():
    model = _mlp()                      # decay group: 35 + 21 = 56; no-decay: 7+7+7+3 = 24
    sizes = []
    for rank in range(3):               # 80 elements -> shards of 27 (81 with padding)
        opt = parallel.ZeroAdamW(_groups(model), Group(FakeRankComm(rank, 3)))
        assert opt.shard == 27 and opt.lo == 27 * rank
        pieces = [(a, piece.numel(), g["weight_decay"])
                  for (piece, a), g in zip(opt._pieces(), opt._inner.param_groups)]
        sizes.append(pieces)
    assert sizes == [[(0, 27, 0.1)], [(27, 27, 0.1)], [(54, 2, 0.1), (56, 24, 0.0)]]


def test_zero_refuses_what_it_cannot_shard():
    m = _mlp()
    m[2].to(tl.float32)
    with pytest.raises(TypeError, match="share one dtype and device"):
        parallel.ZeroAdamW(list(m.parameters()), Group(SelfComm()))
    a = _mlp()
    opt_a = AdamW(list(a.parameters()), lr=1e-2)
    a[0].weight.grad = tl.ones(7, 5, dtype=tl.float64)     # only one parameter has a grad
    opt_a.step()
    z = parallel.ZeroAdamW(list(a.parameters()), Group(SelfComm()))
    with pytest.raises(ValueError, match="state has 1 of 6 parameters"):
        z.load_state_dict(opt_a.state_dict())


# ----------------------------------------------------------------------------- startup
def test_one_process_without_mpi4py(no_mpi4py):
    state = parallel.init_parallel()
    assert isinstance(state.world.comm, SelfComm) and state.is_main
    assert (state.dp.size, state.tp.size, state.pp.size) == (1, 1, 1)
    assert parallel.local_rank() == 0 and parallel.local_size() == 1
    assert parallel.cpu_threads_per_rank() >= 1
    with pytest.raises(ValueError, match="cannot be cut into tp=2"):
        parallel.init_parallel(tp=2)
    hook = sys.excepthook
    parallel.install_abort_handler()
    assert sys.excepthook is hook                   # one process: Python's own handling
    with pytest.raises(KeyError):
        with parallel.abort_on_error():
            raise KeyError("passes through")
    with pytest.raises(SystemExit):
        with parallel.abort_on_error():
            sys.exit(2)


def test_launched_as_many_ranks_without_mpi4py_is_an_error(no_mpi4py, monkeypatch):
    monkeypatch.setenv("PMI_SIZE", "4")
    with pytest.raises(RuntimeError, match=r"one of 4 MPI ranks .* pip install -e '\.\[mpi\]'"):
        parallel.world_group()


def test_parallel_does_not_import_gpt():
    import ast
    import pathlib
    for f in pathlib.Path(parallel.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(f.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not any(n == "gpt" or n.startswith("gpt.") for n in names), f.name
