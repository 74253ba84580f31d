"""`tensorlite-gpt inspect` and `train --inspect-interval` from the command line."""
import json

import pytest

from gpt.cli import main

SMALL = ["--n-layer", "2", "--n-head", "2", "--d-model", "32", "--block-size", "32",
         "--batch-size", "4", "--eval-steps", "2", "--samples", "0", "--no-progress",
         "--warmup-steps", "0"]


@pytest.fixture(scope="module")
def run(tmp_path_factory, byte_data):
    data = byte_data
    out = tmp_path_factory.mktemp("runs") / "r"
    assert main(["train", "--data", str(data), "--out", str(out), *SMALL, "--max-steps", "6",
                 "--eval-interval", "3", "--inspect-interval", "2"]) == 0
    return data, out


def test_train_logs_and_plots_the_internals_every_n_steps(run):
    _, out = run
    recs = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    inspected = [r for r in recs if "inspect" in r]
    assert [r["step"] for r in inspected] == [2, 4, 6]
    rec = inspected[0]["inspect"]
    assert set(rec["grad_norm"]) == {"embedding", "block 0", "block 1", "head"}
    assert all(v > 0 for v in rec["update_ratio"].values())
    assert (out / "internals.png").stat().st_size > 1000


def test_inspect_writes_a_report_and_never_overwrites_one(run, tmp_path, capsys):
    _, out = run
    to = tmp_path / "pics"
    assert main(["inspect", "--out", str(out), "--prompt", "def f(x):", "--to", str(to)]) == 0
    assert f"wrote {to / 'index.html'}" in capsys.readouterr().out
    html = (to / "index.html").read_text()
    pngs = sorted(p.name for p in to.glob("*.png"))
    assert pngs and all(p in html for p in pngs) and "attention_layer1.png" in pngs
    before = {p.name: p.stat().st_mtime_ns for p in to.iterdir()}
    assert main(["inspect", "--out", str(out), "--prompt", "x", "--to", str(to)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--overwrite" in err
    assert {p.name: p.stat().st_mtime_ns for p in to.iterdir()} == before
    assert main(["inspect", "--out", str(out), "--to", str(out)]) == 2     # the run itself
    assert main(["inspect", "--out", str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.parametrize("extra,msg", [(["--inspect-interval", "-1"], "--inspect-interval must"),
                                       (["--inspect-interval", "2", "--tp", "2"],
                                        "--inspect-interval reads every weight")])
def test_inspect_interval_mistakes_are_one_line(run, tmp_path, capsys, extra, msg):
    data, _ = run
    assert main(["train", "--data", str(data), "--out", str(tmp_path / "x"), *SMALL,
                 *extra]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and msg in err, err
