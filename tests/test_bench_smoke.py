"""bench.gpt_bench runs end to end on a micro model, tensorlite side only (no timing checks).

The benchmark is not part of the installed product (no `tensorlite-gpt bench`): it runs from a
source checkout as `python -m bench.gpt_bench`."""
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/ is not an installed package
import bench.gpt_bench as gb  # noqa: E402

MICRO = dict(vocab_size=64, n_layer=1, n_head=2, d_model=32, block_size=16, batch_size=2)


def test_train_and_gen_micro():
    r = gb.train_tensorlite(MICRO, steps=2, warmup=1)
    for k in ("step_ms", "fwd_ms", "bwd_ms", "opt_ms", "tokens_per_s", "other_cores"):
        assert r[k] >= 0, k
    assert r["params"] > 0 and r["flops_per_token"] > 6 * 0.9 * r["params"]
    g = gb.run_gen("tensorlite", MICRO, threads=1)
    assert g["gen_tokens"] == MICRO["block_size"] - 1
    assert g["kv_tokens_per_s"] > 0 and g["nocache_tokens_per_s"] > 0
    assert g["cache_matches_nocache"]          # greedy: same tokens with and without the cache

    gb.CONFIGS["micro"] = MICRO
    try:
        res = {("train", "micro", "tensorlite"): gb._med([{**r, "peak_rss_mb": 1.0}]),
               ("gen", "micro", "tensorlite"): g}
        md = gb.table("micro", res, ["tensorlite"], peak=100.0)
    finally:
        del gb.CONFIGS["micro"]
    assert md.startswith("| metric | tensorlite |") and "MFU %" in md and "KV end / quarter" in md


def test_main_usage_exit_codes(capsys):
    assert gb.main(["--help"]) == 0
    assert gb.main(["--config", "nope"]) == 2
    assert gb.main(["--steps", "0"]) == 2
    assert gb.blas_info()["threads"]


def test_threads_reach_tensorlite():
    # --threads N sizes tensorlite's own pool too, not just torch's and BLAS's
    import tensorlite as tl
    assert gb.worker_env(False, 3)["TENSORLITE_NUM_THREADS"] == "3"
    # a tensorlite run gets no BLAS variable: tensorlite puts BLAS on one thread itself, and a
    # variable would count as the user's choice (tensorlite/cpu.py)
    tl_env = gb.worker_env(False, 3, lib="tensorlite")
    assert tl_env["TENSORLITE_NUM_THREADS"] == "3"
    assert not any(k in tl_env and tl_env[k] != os.environ.get(k)
                   for k in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"))
    assert gb.worker_env(False, 3)["OMP_NUM_THREADS"] == "3"      # torch's runs: its OpenMP
    before = tl.get_num_threads()
    gb.CONFIGS["micro"] = MICRO
    try:
        r = gb.worker({"kind": "gen", "config": "micro", "lib": "tensorlite", "threads": 1})
        assert r["threads_used"] == 1 and tl.get_num_threads() == 1
    finally:
        del gb.CONFIGS["micro"]
        tl.set_num_threads(before)
    info = {"python": "3", "numpy": "2", "blas": gb.blas_info(), "env": {},
            "gemm_gflops": {"peak": 1.0}, "torch": {"version": "x", "cpu_capability": "y"}}
    assert "# threads: tensorlite 3 (" in "\n".join(gb.header(info, None, False, threads=3))
    assert ", torch 3 (" in gb.header(info, None, False, threads=3)[-1]


def test_goals_report_what_the_run_measured():
    res = {("train", "small", "tensorlite"): {"tokens_per_s": 2600.0, "flops_per_token": 80e6},
           ("train", "small", "torch-sdpa"): {"tokens_per_s": 2000.0},
           ("gen", "small", "tensorlite"): {"kv_tokens_per_s": 500.0, "nocache_tokens_per_s": 40.0},
           ("gen", "small", "torch-sdpa"): {"kv_tokens_per_s": 300.0, "nocache_tokens_per_s": 50.0}}
    md = gb.goals(res, ["small", "tiny"], peak=200.0)
    lines = md.splitlines()
    assert lines[0] == "| goal | small | tiny |"
    assert "| 1.30x (ok) | - |" in lines[2]                       # 2600 / 2000
    assert "104.00 % (ok)" in lines[3]                             # 80e6 * 2600 / 1e9 / 200
    assert "1.67x (ok)" in lines[4] and "0.80x (short)" in lines[5]
