"""`tensorlite-gpt train --dtype float16`: mixed precision (nn/amp.py) in the trainer. It tracks
the float32 run, saves float32 weights with the loss scaler's state, and resumes exactly."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gpt.cli import main

ROOT = Path(__file__).resolve().parents[1]
ARGS = ["--n-layer", "2", "--n-head", "2", "--d-model", "32", "--block-size", "32",
        "--batch-size", "8", "--max-steps", "12", "--eval-interval", "6", "--eval-steps", "2",
        "--log-interval", "1", "--samples", "0", "--no-progress", "--warmup-steps", "2",
        "--ckpt-interval", "4"]


@pytest.fixture(scope="module")
def data(byte_data):
    return byte_data


def _log(out):
    return [json.loads(x) for x in (Path(out) / "log.jsonl").read_text().splitlines()]


def test_float16_tracks_float32_and_saves_float32_weights(data, tmp_path):
    logs = {}
    for dtype in ("float32", "float16"):
        out = tmp_path / dtype
        assert main(["train", "--data", str(data), "--out", str(out), *ARGS,
                     "--dtype", dtype]) == 0
        logs[dtype] = [r["loss"] for r in _log(out) if "loss" in r]
    a, b = logs["float32"], logs["float16"]
    assert len(a) == len(b) == 12
    # float16 rounds activations to ~5e-4 relative; the losses stay within 1 %
    assert all(abs(x - y) <= 0.01 * abs(x) for x, y in zip(a, b)), (a, b)
    assert any(x != y for x, y in zip(a, b))                 # it really ran in float16
    recs = [r for r in _log(tmp_path / "float16") if "loss" in r]
    assert all(r["loss_scale"] > 1 for r in recs)
    from nn import checkpoint as ckpt
    meta = ckpt.load_checkpoint(tmp_path / "float16" / "ckpt" / "latest")
    assert meta["extra"]["amp"]["scale"] > 1
    from gpt.run_folder import load_run
    model, _, _ = load_run(tmp_path / "float16", "latest")
    assert all(p.dtype.name == "float32" for p in model.parameters())


def test_float16_resumes_exactly(data, tmp_path):
    args = [*ARGS, "--dtype", "float16"]
    assert main(["train", "--data", str(data), "--out", str(tmp_path / "full"), *args]) == 0
    env = dict(os.environ, PYTHONPATH=str(ROOT), TENSORLITE_TEST_KILL_AT_STEP="6")
    cut = subprocess.run([sys.executable, "-m", "gpt.cli", "train", "--data", str(data),
                          "--out", str(tmp_path / "cut"), *args], env=env,
                         capture_output=True, text=True, timeout=300)
    assert cut.returncode != 0
    assert main(["train", "--out", str(tmp_path / "cut"), "--resume", "--no-progress"]) == 0
    full, again = _log(tmp_path / "full"), _log(tmp_path / "cut")
    key = lambda r: (r["step"], r.get("loss"), r.get("val_loss"), r.get("loss_scale"))  # noqa: E731
    assert [key(r) for r in full] == [key(r) for r in again]


def test_float16_with_a_parallel_layout_is_one_line(data, tmp_path, capsys):
    assert main(["train", "--data", str(data), "--out", str(tmp_path / "x"), *ARGS,
                 "--dtype", "float16", "--inspect-interval", "2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "mixed precision) runs in one process" in err
