"""tensorlite.cpu: the thread-pool paths give NumPy's answers, whatever the thread count."""
import os
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
