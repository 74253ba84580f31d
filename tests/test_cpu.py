"""tensorlite.cpu: the thread-pool paths give NumPy's answers, whatever the thread count."""
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import nn
import tensorlite as tl
from nn import functional as F
from nn import reference as R
from tensorlite import cpu


@pytest.fixture
def threads():
    before = cpu.get_num_threads()
    yield cpu.set_num_threads
    cpu.set_num_threads(before)


@pytest.mark.parametrize("shape_a,shape_b", [((300, 64), (64, 70)), ((7, 50, 33), (7, 33, 40)),
                                             ((64, 128), (128, 3))])
def test_matmul_split_equals_numpy(shape_a, shape_b, threads):
    rng = np.random.default_rng(0)
    a = rng.standard_normal(shape_a).astype(np.float32)
    b = rng.standard_normal(shape_b).astype(np.float32)
    for n in (1, 2, 3):
        threads(n)
        np.testing.assert_allclose(cpu.matmul(a, b), a @ b, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(cpu.matmul(a.swapaxes(-1, -2).copy().swapaxes(-1, -2), b), a @ b,
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("n_rows", [8, 600])     # below and above MIN_PARALLEL_FLOPS
def test_matmul_pair_equals_numpy(n_rows, threads):
    # a Linear's backward: g @ W and g^T @ x (a transposed view) side by side
    rng = np.random.default_rng(0)
    g = rng.standard_normal((n_rows, 96)).astype(np.float32)
    w = rng.standard_normal((96, 80)).astype(np.float32)
    x = rng.standard_normal((n_rows, 80)).astype(np.float32)
    for n in (1, 2):
        threads(n)
        gx, gw, gb = cpu.matmul_pair(g, w, g.T, x, sum_a2=True)
        np.testing.assert_allclose(gx, g @ w, rtol=1e-5, atol=1e-4)
        np.testing.assert_allclose(gw, g.T @ x, rtol=1e-5, atol=1e-4)
        np.testing.assert_allclose(gb, g.sum(axis=0), rtol=1e-5, atol=1e-4)


def test_for_rows_covers_every_row_once(threads):
    threads(2)
    seen = np.zeros(100_000, dtype=np.int64)

    def kernel(lo, hi):
        seen[lo:hi] += 1
    cpu.for_rows(kernel, 100_000, 1)
    assert (seen == 1).all()


def test_map_rows_sums_in_block_order(threads):
    threads(2)
    x = np.random.default_rng(1).standard_normal((4000, 64)).astype(np.float32)
    sums = [cpu.map_rows(lambda lo, hi: (x[lo:hi].sum(axis=0),), 4000, 64)[0] for _ in range(5)]
    for s in sums[1:]:
        np.testing.assert_array_equal(s, sums[0])  # bit-identical: training stays reproducible
    np.testing.assert_allclose(sums[0], x.sum(axis=0), rtol=1e-4, atol=1e-4)


def _fused_vs_reference(fused, ref, inputs, rtol=2e-4, atol=2e-5):
    def run(fn):
        for t in inputs:
            t.grad = None
        out = fn(*inputs)
        out.backward(tl.tensor(np.random.default_rng(3).standard_normal(out.shape).astype(np.float32)))
        return [out.numpy().copy()] + [t.grad.numpy().copy() for t in inputs]
    for a, b in zip(run(fused), run(ref)):
        np.testing.assert_allclose(a, b, rtol=rtol, atol=atol)


@pytest.mark.parametrize("n", [1, 2])
def test_large_fused_ops_match_references_in_float32(n, threads):
    # big enough (> 64K elements) to take the blocked, threaded paths
    threads(n)
    rng = np.random.default_rng(2)
    t = lambda *s: tl.tensor(rng.standard_normal(s).astype(np.float32), requires_grad=True)  # noqa
    x, w, b = t(600, 256), t(256), t(256)
    _fused_vs_reference(lambda x, w, b: F.layer_norm(x, 256, w, b), R.layer_norm, [x, w, b])
    _fused_vs_reference(lambda x: F.gelu(x, "tanh"), R.gelu_tanh, [t(600, 256)])
    logits = t(700, 300)
    targets = tl.tensor(rng.integers(0, 300, 700))
    _fused_vs_reference(lambda z: F.cross_entropy(z, targets),
                        lambda z: R.cross_entropy(z, targets), [logits])
    q, k, v = t(4, 3, 90, 16), t(4, 3, 90, 16), t(4, 3, 90, 16)
    _fused_vs_reference(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True),
                        lambda q, k, v: R.attention(q, k, v, is_causal=True), [q, k, v])


def test_training_is_deterministic_per_thread_count_and_close_across(threads):
    # exact resume needs bit-identical results run to run; another thread count may round
    # differently (other block boundaries), but only at float32 rounding level
    from gpt.model import GPT, GPTConfig
    results = []
    for n in (2, 2, 1):
        threads(n)
        tl.manual_seed(0)
        m = GPT(GPTConfig(vocab_size=300, block_size=64, n_layer=2, n_head=4, d_model=64))
        opt = nn.AdamW(m.parameters(), lr=1e-3)
        rng = np.random.default_rng(0)
        grads = []
        for _ in range(2):
            x = rng.integers(0, 300, (8, 64))
            _, loss = m(x, np.roll(x, -1, 1))
            loss.backward()
            grads = [p.grad.numpy().copy() for p in m.parameters()]
            opt.step()
            opt.zero_grad()
        results.append((grads, [p.numpy().copy() for p in m.parameters()], loss.item()))
    for a, b in zip(results[0][0] + results[0][1], results[1][0] + results[1][1]):
        np.testing.assert_array_equal(a, b)
    assert results[0][2] == results[1][2]
    # Adam divides by sqrt(v): compare the gradients, not the updated weights
    for a, b in zip(results[0][0], results[2][0]):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=2e-6)
    assert abs(results[0][2] - results[2][2]) < 1e-5


_FORK_SCRIPT = r'''
import multiprocessing as mp
import numpy as np
import nn
import tensorlite as tl
from tensorlite import cpu
from gpt.model import GPT, GPTConfig

cpu.set_num_threads(2)


def work(seed):
    """Parallel ops: a split matmul, a blocked fused op, three steps of a small GPT."""
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((512, 256)).astype(np.float32)
    b = rng.standard_normal((256, 256)).astype(np.float32)
    out = [cpu.matmul(a, b), nn.functional.gelu(tl.tensor(a)).numpy()]
    tl.manual_seed(seed)
    m = GPT(GPTConfig(vocab_size=300, block_size=64, n_layer=1, n_head=4, d_model=64))
    opt = nn.AdamW(m.parameters(), lr=1e-3)
    for _ in range(3):
        x = rng.integers(0, 300, (8, 64))
        _, loss = m(x, np.roll(x, -1, 1))
        loss.backward()
        opt.step()
        opt.zero_grad()
        out.append(loss.item())
    return out


if __name__ == "__main__":
    parent = [work(s) for s in (0, 1)]       # the parent's pool is up (and idle) from here
    assert cpu._pool is not None
    with mp.get_context("fork").Pool(2) as pool:
        children = pool.map(work, (0, 1))
    for p, c in zip(parent, children):
        for u, v in zip(p, c):
            np.testing.assert_array_equal(u, v)
    print("fork ok", [round(p[-1], 4) for p in parent])
'''


_linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                 reason="fork with threads running: Linux only")


@_linux_only
def test_forked_children_run_parallel_ops(tmp_path):
    # After the pool has run, a fork child used to wait forever for pool threads that were not
    # copied into it. In a subprocess, so a hang fails this test instead of hanging pytest.
    script = tmp_path / "fork_child.py"
    script.write_text(_FORK_SCRIPT)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")])}
    env.pop("TENSORLITE_NUM_THREADS", None)
    proc = subprocess.Popen([sys.executable, str(script)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)      # the script and its forked workers
        out, _ = proc.communicate()
        pytest.fail("forked workers hung on a parallel op:\n" + out[-2000:])
    assert proc.returncode == 0 and "fork ok" in out, out[-2000:]


@_linux_only
@pytest.mark.filterwarnings("ignore::DeprecationWarning")   # 3.12+: fork of a threaded process
def test_pool_is_reset_in_a_fork_child(threads):
    threads(2)
    cpu.for_rows(lambda lo, hi: None, 100_000, 1)       # the parent's pool exists
    assert cpu._pool is not None
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: report, then leave without running pytest's teardown
        try:
            ok = cpu._pool is None and not cpu._lock.locked()
            os.write(w, b"1" if ok else b"0")
        finally:
            os._exit(0)
    os.close(w)
    assert os.read(r, 1) == b"1"
    os.close(r)
    os.waitpid(pid, 0)



# ------------------------------------------------------------ process-wide settings (issue 10)
_STATE_SCRIPT = r"""
import ctypes, json, os, sys
import numpy as np
from threadpoolctl import threadpool_info

def blas():
    return [d["num_threads"] for d in threadpool_info() if d["user_api"] == "blas"]

def mmapped():
    # does glibc serve a 12 MB malloc with its own mmap (its default: above 128 KB) or from the
    # heap (tensorlite's setting: up to 32 MB)? One probe per process: freeing an mmapped block
    # raises glibc's dynamic threshold, so a second probe would not tell.
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL("libc.so.6")
    fields = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd",
              "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]
    info = getattr(libc, "mallinfo2", None)
    if info is None:
        return None
    info.restype = type("MallInfo2", (ctypes.Structure,), {"_fields_": fields})
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    before = info().hblks
    ptr = libc.malloc(12 << 20)
    after = info().hblks
    libc.free(ptr)
    return after > before

stage = sys.argv[1]
if stage != "numpy":
    import tensorlite as tl
    if stage == "limit":                      # the user limits BLAS before tensorlite runs
        from threadpoolctl import threadpool_limits
        threadpool_limits(limits=int(sys.argv[2]), user_api="blas")
    if stage in ("use", "use1", "limit"):      # the first op on tensorlite's CPU path
        if stage == "use1":
            tl.set_num_threads(1)
        a = tl.tensor(np.ones((256, 256), np.float32))
        (a @ a).sum()
    if stage == "configure":
        tl.cpu.configure()
out = {"blas": blas(), "mmapped": mmapped()}
if stage != "numpy":
    out["configured"] = tl.cpu._configured
print("STATE " + json.dumps(out))
"""


def _state(tmp_path, stage, *args, **env_extra):
    script = tmp_path / "state.py"
    script.write_text(_STATE_SCRIPT)
    env = {k: v for k, v in os.environ.items() if k not in cpu.BLAS_THREAD_VARS + (
        "TENSORLITE_KEEP_BLAS_THREADS", "TENSORLITE_NO_MALLOPT", "TENSORLITE_NUM_THREADS",
        "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES")}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[1]),
                                         os.environ.get("PYTHONPATH", "")])
    env.update(env_extra)
    out = subprocess.run([sys.executable, str(script), stage, *map(str, args)], env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    return json.loads(out.stdout.split("STATE ", 1)[1])


def _cores():
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


_multicore = pytest.mark.skipif(_cores() < 2, reason="one core: BLAS has one thread anyway")


@_multicore
def test_import_changes_nothing_process_wide_first_use_does(tmp_path):
    plain = _state(tmp_path, "numpy")
    assert plain["blas"] and min(plain["blas"]) > 1, plain   # NumPy's BLAS: its own threads
    imported = _state(tmp_path, "import")
    assert imported == {**plain, "configured": False}        # import tensorlite: untouched
    for stage in ("use", "use1", "configure"):               # first op (any thread count), or
        used = _state(tmp_path, stage)                       # the explicit call
        assert used["configured"] and used["blas"] == [1] * len(plain["blas"]), (stage, used)
        if plain["mmapped"] is not None:
            assert plain["mmapped"] and not used["mmapped"], (stage, plain, used)


@_multicore
def test_opt_outs_and_the_users_own_settings_win(tmp_path):
    plain = _state(tmp_path, "numpy")
    keep = _state(tmp_path, "use", TENSORLITE_KEEP_BLAS_THREADS="1")
    assert keep["blas"] == plain["blas"]
    # the user's thread variable: BLAS keeps what it says, even where that is all the cores
    env_set = _state(tmp_path, "use", OPENBLAS_NUM_THREADS=str(_cores()))
    assert env_set["blas"] == [_cores()] * len(plain["blas"])
    omp_set = _state(tmp_path, "use", OMP_NUM_THREADS=str(_cores()))
    assert omp_set["blas"] == [_cores()] * len(plain["blas"])
    if plain["mmapped"] is not None:
        assert not keep["mmapped"]                            # malloc is tuned all the same
        no_mallopt = _state(tmp_path, "use", TENSORLITE_NO_MALLOPT="1")
        assert no_mallopt["mmapped"] and no_mallopt["blas"] == [1] * len(plain["blas"])
        # glibc's own variable, set by the user: tensorlite does not override it
        assert _state(tmp_path, "use", MALLOC_MMAP_THRESHOLD_="131072")["mmapped"]
    if _cores() >= 3:   # a threadpoolctl limit below BLAS's default stays (2 cores: 1 is 1)
        assert _state(tmp_path, "limit", 2)["blas"] == [2] * len(plain["blas"])


class _FakeBlas:
    internal_api = "mkl"

    def __init__(self, n):
        self.n = n

    def get_num_threads(self):
        return self.n

    def set_num_threads(self, n):
        self.n = n


def test_blas_limit_set_before_first_use_wins(monkeypatch):
    # threadpoolctl's limits leave no mark but the thread count: below the library's own
    # default it is the user's, and stays
    for name in cpu.BLAS_THREAD_VARS + ("TENSORLITE_KEEP_BLAS_THREADS",):
        monkeypatch.delenv(name, raising=False)
    at_default, limited = _FakeBlas(8), _FakeBlas(3)
    monkeypatch.setattr(cpu, "_blas_libs", lambda: [at_default, limited])
    monkeypatch.setattr(cpu, "_usable_cores", lambda: 8)
    assert cpu.use_single_threaded_blas()
    assert (at_default.n, limited.n) == (1, 3)
    monkeypatch.setenv("OMP_NUM_THREADS", "8")
    at_default.n = 8
    assert not cpu.use_single_threaded_blas() and at_default.n == 8


@pytest.fixture
def fresh_threads(monkeypatch):
    for name in cpu.LOCAL_RANK_VARS + ("SLURM_NODEID", "TENSORLITE_NUM_THREADS"):
        monkeypatch.delenv(name, raising=False)
    before = cpu.get_num_threads()

    def default(cores, machine=None, **env):
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        monkeypatch.setattr(cpu, "_usable_cores", lambda: cores)
        monkeypatch.setattr(cpu.os, "cpu_count", lambda: machine or cores)
        try:
            return cpu._default_threads()
        finally:
            for k in env:
                monkeypatch.delenv(k)
    yield default
    cpu.set_num_threads(before)


def test_pool_size_shares_the_cores_among_local_ranks(fresh_threads):
    d = fresh_threads
    assert d(8) == 8
    assert d(8, MPI_LOCALNRANKS="2") == 4                       # MPICH's mpiexec (Hydra)
    assert d(8, OMPI_COMM_WORLD_LOCAL_SIZE="3") == 2            # Open MPI
    assert d(12, SLURM_STEP_TASKS_PER_NODE="4(x2),3", SLURM_NODEID="2") == 4   # srun: 3 here
    assert d(12, SLURM_STEP_TASKS_PER_NODE="4(x2),3", SLURM_NODEID="0") == 3
    assert d(2, MPI_LOCALNRANKS="4") == 1                       # more ranks than cores
    assert d(2, machine=8, MPI_LOCALNRANKS="4") == 2            # the launcher bound each rank
    assert d(8, MPI_LOCALNRANKS="1") == 8
    assert d(8, MPI_LOCALNRANKS="two") == 8                     # unreadable: not a job
    assert d(8, MPI_LOCALNRANKS="2", TENSORLITE_NUM_THREADS="3") == 3   # the user's number wins


def test_set_num_threads_wins_over_the_environment(monkeypatch, threads):
    monkeypatch.setenv("TENSORLITE_NUM_THREADS", "3")
    monkeypatch.setenv("MPI_LOCALNRANKS", "2")
    monkeypatch.setattr(cpu, "_num_threads", None)
    assert cpu.get_num_threads() == 3
    threads(1)
    assert cpu.get_num_threads() == 1


@pytest.mark.skipif(shutil.which("mpiexec") is None, reason="mpiexec not installed")
def test_ranks_under_mpiexec_share_the_cores():
    # one os.write per rank: two ranks' print()s can interleave on the shared pipe
    code = ("import os, tensorlite as tl; "
            "n = os.environ.get('MPI_LOCALNRANKS') or os.environ.get('OMPI_COMM_WORLD_LOCAL_SIZE'); "
            "os.write(1, f'RANK {n} {tl.get_num_threads()}\\n'.encode())")
    env = {k: v for k, v in os.environ.items() if k != "TENSORLITE_NUM_THREADS"}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[1]),
                                         os.environ.get("PYTHONPATH", "")])
    try:
        out = subprocess.run(["mpiexec", "-n", "2", sys.executable, "-c", code], env=env,
                             capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired:
        pytest.fail("mpiexec -n 2 did not finish in 120 s")
    if out.returncode != 0:
        pytest.skip(f"mpiexec cannot start 2 ranks here: {out.stderr.strip()[-300:]}")
    import re
    lines = re.findall(r"(RANK) (\S+) (\d+)", out.stdout)
    assert len(lines) == 2, out.stdout + out.stderr
    cores = _cores()
    share = max(1, cores // 2) if cores > (os.cpu_count() or cores) // 2 else cores
    for _, local, n in lines:
        assert local == "2" and int(n) == share, out.stdout
