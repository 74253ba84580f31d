"""`tensorlite-gpt train` under mpiexec, with any layout (--dp, --tp, --pp, --zero 1 and their
combinations), logs what one process logs, step for step, writes only from rank 0, resumes
under another layout, and refuses a layout that does not match the launcher."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mpi_launch import MPIEXEC, needs_mpi

ROOT = Path(__file__).resolve().parents[1]
pytestmark = needs_mpi

COMMON = ["--n-layer", "2", "--n-head", "4", "--d-model", "16", "--block-size", "16",
          "--batch-size", "8", "--max-steps", "8", "--eval-interval", "4", "--eval-steps", "2",
          "--log-interval", "1", "--samples", "0", "--no-progress", "--warmup-steps", "2"]


@pytest.fixture(scope="module")
def data(byte_data):
    return byte_data


def _train(args, n=1, env=None):
    e = dict(os.environ, PYTHONPATH=str(ROOT), TENSORLITE_NUM_THREADS="1")
    e.update(env or {})
    cmd = [sys.executable, "-m", "gpt.cli", "train", *args]
    if n > 1:
        cmd = [MPIEXEC, "-n", str(n), *cmd]
    return subprocess.run(cmd, env=e, capture_output=True, text=True, timeout=240)


def _log(out):
    return [json.loads(x) for x in (Path(out) / "log.jsonl").read_text().splitlines()]


def _numbers(out):
    return [(r["step"], r.get("loss"), r.get("val_loss")) for r in _log(out)]


@pytest.mark.parametrize("dtype,tol", [("float64", 1e-10), ("float32", 1e-5)])
@pytest.mark.parametrize("n,layout,accum", [
    (2, ["--dp", "2"], 1), (2, ["--dp", "2", "--zero", "1"], 1), (4, ["--dp", "4"], 2),
    (2, ["--tp", "2"], 1), (4, ["--dp", "2", "--tp", "2"], 2),
    (2, ["--pp", "2"], 2), (2, ["--pp", "2", "--pp-schedule", "gpipe"], 4),
    (4, ["--dp", "2", "--pp", "2"], 2), (4, ["--tp", "2", "--pp", "2"], 2),
    (4, ["--dp", "2", "--tp", "2", "--zero", "1"], 2),
    (4, ["--dp", "2", "--pp", "2", "--zero", "1", "--pp-schedule", "gpipe"], 2)],
    ids=lambda v: " ".join(v) if isinstance(v, list) else str(v))
def test_a_parallel_run_logs_what_one_process_logs(data, tmp_path, n, layout, accum, dtype, tol):
    args = ["--data", str(data), *COMMON, "--dtype", dtype, "--grad-accum", str(accum)]
    one = _train([*args, "--out", str(tmp_path / "one")])
    assert one.returncode == 0, one.stderr
    par = _train([*args, "--out", str(tmp_path / "par"), *layout], n=n)
    assert par.returncode == 0, par.stderr
    a, b = _numbers(tmp_path / "one"), _numbers(tmp_path / "par")
    assert [r[0] for r in a] == [r[0] for r in b] and len(a) == 10
    for (_, la, va), (_, lb, vb) in zip(a, b):
        x, y = (la, lb) if la is not None else (va, vb)
        assert abs(x - y) <= tol * max(1.0, abs(x)), (a, b)
    assert par.stdout.count("done: step 8") == 1          # only rank 0 prints
    assert not list(tmp_path.glob("par/*.tmp*"))
    size = one.stdout.split("model: ")[1].split(" parameters")[0]
    assert f"model: {size} parameters" in par.stdout      # the whole model's, not a shard's


@pytest.mark.parametrize("first,then", [((2, ["--tp", "2"]), (1, [])),
                                        ((1, []), (2, ["--tp", "2"])),
                                        ((4, ["--dp", "2", "--tp", "2"]), (2, ["--dp", "2"])),
                                        ((2, ["--pp", "2", "--grad-accum", "2"]), (1, [])),
                                        ((1, ["--grad-accum", "2"]), (2, ["--pp", "2"])),
                                        ((4, ["--tp", "2", "--pp", "2", "--grad-accum", "2"]),
                                         (1, [])),
                                        ((2, ["--pp", "2", "--grad-accum", "2"]), (4, ["--dp", "2", "--tp", "2",
                                                                  "--zero", "1"])),
                                        ((4, ["--dp", "2", "--tp", "2", "--zero", "1",
                                              "--grad-accum", "2"]),
                                         (4, ["--dp", "2", "--pp", "2", "--zero", "1"]))])
def test_a_checkpoint_resumes_under_another_layout(data, tmp_path, first, then):
    """Checkpoints hold the dense model and AdamW state whatever the layout: a run killed
    under one layout resumes under another and logs what one uninterrupted process logs."""
    args = ["--data", str(data), *COMMON, "--dtype", "float64", "--ckpt-interval", "4"]
    accum = [a for a in (first[1] + then[1]) if a == "--pp"] and ["--grad-accum", "2"]
    full = _train([*args, *accum, "--out", str(tmp_path / "full")])
    assert full.returncode == 0, full.stderr
    n, layout = first
    cut = _train([*args, "--out", str(tmp_path / "cut"), *layout], n=n,
                 env={"TENSORLITE_TEST_KILL_AT_STEP": "6"})
    assert cut.returncode != 0
    n, layout = then
    again = _train(["--out", str(tmp_path / "cut"), "--resume", "--no-progress", *layout], n=n)
    assert again.returncode == 0, again.stderr
    assert "resumed at step 4" in again.stdout
    for (s1, l1, v1), (s2, l2, v2) in zip(_numbers(tmp_path / "full"), _numbers(tmp_path / "cut")):
        assert s1 == s2
        x, y = (l1, l2) if l1 is not None else (v1, v2)
        assert abs(x - y) <= 1e-10 * max(1.0, abs(x))


def test_a_dp_run_resumes_in_one_process_and_under_zero(data, tmp_path):
    """The checkpoint of a DP run holds the unsharded AdamW state: it resumes in one process
    and under ZeRO-1 with another degree, continuing the same losses."""
    args = ["--data", str(data), *COMMON, "--dtype", "float64", "--ckpt-interval", "4"]
    full = _train([*args, "--out", str(tmp_path / "full")])
    assert full.returncode == 0, full.stderr
    first = _train([*args, "--out", str(tmp_path / "cut"), "--dp", "2", "--zero", "1"], n=2,
                   env={"TENSORLITE_TEST_KILL_AT_STEP": "5"})
    assert first.returncode != 0
    # --resume alone: the layout follows the launcher (one process: --dp 1, no ZeRO)
    again = _train(["--out", str(tmp_path / "cut"), "--resume", "--no-progress"])
    assert again.returncode == 0, again.stderr
    assert "resumed at step 4" in again.stdout
    assert "--dp 1 (the run had 2), --zero 0 (the run had 1)" in again.stdout
    for (s1, l1, v1), (s2, l2, v2) in zip(_numbers(tmp_path / "full"), _numbers(tmp_path / "cut")):
        assert s1 == s2
        x, y = (l1, l2) if l1 is not None else (v1, v2)
        assert abs(x - y) <= 1e-10 * max(1.0, abs(x))


@pytest.mark.parametrize("n,extra,msg", [
    (2, ["--dp", "1"], "--dp 1 x --tp 1 x --pp 1 = 1 ranks, but the launcher started 2"),
    (1, ["--dp", "2"], "--dp 2 but the launcher started 1 process(es)"),
    (2, ["--dp", "2", "--batch-size", "7"], "--batch-size 7 is the global micro-batch"),
    (1, ["--zero", "1"], "--zero 1 shards the optimizer state"),
    (2, ["--tp", "2", "--dp", "2"], "--dp 2 x --tp 2 x --pp 1 = 4 ranks, but the launcher started 2"),
    (2, ["--tp", "2", "--n-head", "1"], "--tp 2 must divide --n-head 1"),
    (4, ["--tp", "2", "--pp", "2", "--dp", "2"],
     "--dp 2 x --tp 2 x --pp 2 = 8 ranks, but the launcher started 4"),
    (4, ["--tp", "2", "--pp", "2", "--zero", "1"], "--zero 1 shards the optimizer state"),
    (2, ["--pp", "3"], "--pp 3 stages need at least as many blocks; --n-layer is 2"),
])
def test_a_layout_that_does_not_fit_is_one_line(data, tmp_path, n, extra, msg):
    r = _train(["--data", str(data), *COMMON, "--out", str(tmp_path / "r"), *extra], n=n)
    assert r.returncode != 0
    lines = [ln for ln in r.stderr.splitlines() if "error:" in ln]
    assert len(lines) == 1 and msg in lines[0], r.stderr
    # a mistake every rank sees ends the job normally: no MPI_Abort (which leaves MPICH's
    # shared-memory files behind), no second line
    assert "Traceback" not in r.stderr and "Abort" not in r.stderr, r.stderr
    assert r.returncode == 2
    assert not (tmp_path / "r").exists()


def test_the_ranks_left_by_tp_and_pp_are_data_parallel_and_other_commands_run_once(data,
                                                                                     tmp_path):
    r = _train(["--data", str(data), *COMMON, "--max-steps", "2", "--out", str(tmp_path / "r")],
               n=2)
    assert r.returncode == 0, r.stderr
    assert "2 data-parallel x 1 tensor-parallel x 1 pipeline ranks" in r.stdout
    e = dict(os.environ, PYTHONPATH=str(ROOT), TENSORLITE_NUM_THREADS="1")
    s = subprocess.run([MPIEXEC, "-n", "2", sys.executable, "-m", "gpt.cli", "sample", "--out",
                        str(tmp_path / "r"), "--prompt", "def", "--max-new-tokens", "5",
                        "--temperature", "0"], env=e, capture_output=True, text=True, timeout=120)
    assert s.returncode == 0 and s.stdout.count("def") == 1, (s.stdout, s.stderr)
    assert "sample runs in one process" in s.stderr


def test_option_errors_and_help_are_printed_once_under_mpiexec(data, tmp_path):
    r = _train(["--data", str(data), "--bogus-option"], n=2)
    assert r.returncode == 2 and r.stderr.count("unrecognized arguments: --bogus-option") == 1
    r = _train(["--help"], n=2)
    assert r.returncode == 0 and r.stdout.count("usage: tensorlite-gpt train") == 1


def test_dp_with_dropout_resumes_exactly(data, tmp_path):
    """Each rank's dropout masks are a function of (seed, rank, step): a DP run with dropout
    killed mid-way and resumed logs what the uninterrupted DP run logs."""
    args = ["--data", str(data), *COMMON, "--dropout", "0.2", "--ckpt-interval", "4",
            "--dp", "2"]
    full = _train([*args, "--out", str(tmp_path / "full")], n=2)
    assert full.returncode == 0, full.stderr
    cut = _train([*args, "--out", str(tmp_path / "cut")], n=2,
                 env={"TENSORLITE_TEST_KILL_AT_STEP": "6"})
    assert cut.returncode != 0
    again = _train(["--out", str(tmp_path / "cut"), "--resume", "--no-progress"], n=2)
    assert again.returncode == 0, again.stderr
    assert _numbers(tmp_path / "full") == _numbers(tmp_path / "cut")


def test_pp_timetable_is_printed(data, tmp_path):
    r = _train(["--data", str(data), *COMMON, "--out", str(tmp_path / "r"), "--pp", "2",
                "--grad-accum", "4", "--max-steps", "2", "--pp-timetable"], n=2)
    assert r.returncode == 0, r.stderr
    assert "1F1B: 2 stages, 4 micro-batches" in r.stdout and "stage 1  .  F0 B0" in r.stdout
    assert "bubble: predicted (p-1)/(m+p-1) = 1/5 = 20.0%" in r.stdout
