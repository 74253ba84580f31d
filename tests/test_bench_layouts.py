"""bench/bench_layouts.py: a smoke run on a very small model (every layout of 2 ranks, one
timed step after one untimed) whose JSON must hold every layout with sane numbers, and its
accounting of a step (communication, bubble, compute) on numbers made up to check it.
No timing assertions: those belong to the benchmark's table, not the tests."""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bench import bench_layouts as bl
from mpi_launch import needs_mpi

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--n-layer", "2", "--n-head", "2", "--d-model", "32", "--block-size", "32",
         "--batch-size", "4", "--grad-accum", "2", "--steps", "1", "--warmup", "1"]


def _share(x):
    return 0.0 <= x <= 1.0


@needs_mpi
def test_a_small_run_reports_every_layout_of_two_ranks(tmp_path):
    out = tmp_path / "layouts.json"
    cmd = [sys.executable, str(ROOT / "bench" / "bench_layouts.py"), "--ranks", "2",
           "--wait-quiet", "0", "--json", str(out), *SMALL]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=ROOT, env=env, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)                # mpiexec and every rank
        stdout, stderr = proc.communicate()
        pytest.fail(f"bench_layouts still running after 120 s\n{stdout}\n{stderr}")
    assert proc.returncode == 0, stderr
    res = json.loads(out.read_text())
    names = [r["layout"] for r in res["runs"]]
    assert names == ["1 process", "1 process, 1 thread", "--dp 2", "--dp 2 --zero 1", "--tp 2",
                     "--pp 2 --pp-schedule gpipe", "--pp 2 --pp-schedule 1f1b"]
    for name in names:
        assert f"| {name} |" in stdout                    # in the printed table
    assert res["tokens_per_step"] == 4 * 2 * 32
    params = res["params"]
    losses = []
    for r in res["runs"]:
        s, n = r["summary"], r["ranks"]
        a = np.array(r["per_rank"])
        assert a.shape == (n, 1, len(r["fields"])), (r["layout"], a.shape)
        assert s["step_ms"] > 0
        for x in (s["comm_share"]["max"], s["comm_share"]["mean"], s["compute_share"],
                  s["bubble_share_of_step"], *s["comm_share"]["per_rank"]):
            assert _share(x), (r["layout"], s)
        # each second counted once: communication outside the bubble + bubble <= the step
        f = r["fields"].index
        idle = np.where(a[..., f("span")] > 0, a[..., f("span")] - a[..., f("busy")], 0)
        assert np.all(a[..., f("comm")] - a[..., f("comm_in_bubble")] + idle
                      <= a[..., f("step")] * (1 + 1e-9)), r["layout"]
        total_mb = sum(s["comm_mb"].values())
        if n == 1:
            assert s["comm_share"]["max"] == 0 and total_mb == 0
        else:
            assert sum(s["comm_ms"].values()) > 0 and total_mb > 0, r["layout"]
        pp = r["options"].get("pp", 1)
        if pp > 1:
            b = s["bubble"]
            assert b["predicted"] == (pp - 1) / (2 + pp - 1) == 1 / 3
            assert len(b["per_stage"]) == pp and all(map(_share, b["per_stage"] + b["per_rank"]))
            # activations go one way, their gradients (the same shapes) the other
            assert s["comm_mb"]["send"] == s["comm_mb"]["recv"] > 0
        else:
            assert "bubble" not in s
        losses.append(s["loss"])
    by = {r["layout"]: r["summary"]["comm_mb"] for r in res["runs"]}
    grads_mb = 4 * params / 1e6                            # float32 gradients, whole model
    assert by["--dp 2"]["all_reduce"] >= grads_mb          # every gradient, once per step
    assert by["--dp 2 --zero 1"]["reduce_scatter"] >= grads_mb
    assert by["--dp 2 --zero 1"]["all_gather"] >= grads_mb
    assert by["--tp 2"]["all_reduce"] > 0
    # the same model, seed and global batch in every layout: the same training
    assert max(losses) - min(losses) <= 1e-4 * abs(losses[0]), losses


def test_the_shares_of_a_step_add_up_on_made_up_numbers():
    """Two pipeline stages, two steps each: step 1 s; 0.3 s blocked in communication, of which
    0.1 s inside the bubble (span 0.7 s, 0.5 s of it in Forward/Backward)."""
    f = bl.fields()
    row = dict.fromkeys(f, 0.0)
    row.update(step=1.0, comm=0.3, comm_in_bubble=0.1, busy=0.5, span=0.7, loss=2.5,
               s_recv=0.1, s_all_reduce=0.2, bytes_recv=2e6)
    rank = [[row[k] for k in f]] * 2
    run = {"fields": f, "per_rank": [rank, rank], "options": {"pp": 2}, "coords": [[0, 0, 0],
                                                                                  [0, 0, 1]]}
    s = bl.summarize(run, grad_accum=4)
    assert s["step_ms"] == pytest.approx(1000)
    assert s["comm_share"]["max"] == pytest.approx(0.2)    # 0.3 - the 0.1 inside the bubble
    assert s["bubble_share_of_step"] == pytest.approx(0.2)  # 0.7 - 0.5
    assert s["compute_share"] == pytest.approx(0.6)
    assert s["bubble"]["predicted"] == 1 / 5
    assert s["bubble"]["per_stage"] == pytest.approx([0.2 / 0.7] * 2)
    assert s["comm_ms"]["recv"] == pytest.approx(100) and s["comm_mb"]["recv"] == 2.0
    assert bl.flags({"dp": 2, "pp_schedule": "gpipe"}) == "--dp 2 --pp-schedule gpipe"


def test_repeats_pool_the_steps_of_the_quiet_ones():
    def run(others, step):                                 # one rank, two steps
        return {"layout": "--dp 2", "others": others, "per_rank": [[[step], [step]]]}
    p = bl.pool([run(0.6, 9.0), run(0.01, 1.0), run(0.1, 2.0)])
    assert (p["repeats"], p["kept"], p["others"]) == (3, 2, 0.1)
    assert p["per_rank"] == [[[1.0], [1.0], [2.0], [2.0]]]
    assert [r["others"] for r in p["repeats_raw"]] == [0.6, 0.01, 0.1]
    busy = bl.pool([run(0.6, 9.0), run(0.5, 8.0)])         # none quiet: all of them
    assert busy["kept"] == 2 and busy["per_rank"] == [[[9.0], [9.0], [8.0], [8.0]]]
