"""cpu.matmul's row split: products at and above MIN_PARALLEL_FLOPS_ROWS are cut by rows over
the pool, smaller ones run whole on the calling thread; both give NumPy's answer."""
import numpy as np
import pytest

from tensorlite import cpu


@pytest.fixture
def threads():
    before = cpu.get_num_threads()
    yield cpu.set_num_threads
    cpu.set_num_threads(before)


@pytest.mark.parametrize("m", [48, 1024])          # below and above MIN_PARALLEL_FLOPS_ROWS
@pytest.mark.parametrize("with_bias", [False, True])
def test_matmul_rows_split_equals_numpy(m, with_bias, threads, monkeypatch):
    rng = np.random.default_rng(0)
    a = rng.standard_normal((m, 128)).astype(np.float32)
    b = rng.standard_normal((128, 384)).astype(np.float32)
    bias = rng.standard_normal(384).astype(np.float32) if with_bias else None
    split = 2.0 * a.size * b.shape[1] >= cpu.MIN_PARALLEL_FLOPS_ROWS
    calls = []
    real = cpu._run_parts
    monkeypatch.setattr(cpu, "_run_parts", lambda fn, parts: (calls.append(len(parts)),
                                                              real(fn, parts)))
    want = a @ b + (bias if with_bias else 0)
    for n in (1, 2, 3):
        threads(n)
        calls.clear()
        poison = np.full((m, 384), np.nan, np.float32)   # freed memory np.empty may get back:
        del poison                                       # rows left unwritten show as NaN
        np.testing.assert_allclose(cpu.matmul(a, b, bias), want, rtol=1e-5, atol=1e-4)
        assert calls == ([n] if split and n > 1 else []), (n, calls)


@pytest.mark.parametrize("n_rows", [8, 100, 1000])   # 512 elements a row: below and above
def test_rows_per_thread_one_block_when_not_parallel(n_rows, threads):
    # for_rows runs below MIN_PARALLEL_ELEMS on the calling thread: one block of all the rows
    # then (the fused MLP's products whole), one block per thread above it
    threads(2)
    blocks = []
    cpu.for_rows(lambda lo, hi: blocks.append((lo, hi)), n_rows, 512,
                 block=cpu.rows_per_thread(n_rows, 512))
    if n_rows * 512 < cpu.MIN_PARALLEL_ELEMS:
        assert blocks == [(0, n_rows)]
    else:
        assert sorted(blocks) == [(0, n_rows // 2), (n_rows // 2, n_rows)]
