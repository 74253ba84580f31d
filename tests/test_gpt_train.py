"""Training: exact resume after SIGKILL, non-finite losses, Ctrl-C, and the CLI's errors."""
import json
import signal
import sysconfig
from pathlib import Path

import numpy as np
import pytest

from gpt.cli import main
from gpt.data.prepare import prepare
from gpt.train import Trainer, TrainConfig, TrainingError, train

SMALL = ["--n-layer", "1", "--n-head", "2", "--d-model", "16", "--block-size", "16",
         "--batch-size", "4", "--warmup-steps", "3", "--eval-steps", "2", "--samples", "0",
         "--no-progress"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    src = tmp_path_factory.mktemp("src")
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for name in ("json/decoder.py", "json/encoder.py", "json/scanner.py", "textwrap.py",
                 "json/__init__.py", "shlex.py", "colorsys.py", "bisect.py", "fnmatch.py",
                 "keyword.py", "glob.py", "stat.py", "token.py", "getopt.py", "sched.py"):
        (src / name.replace("/", "_")).write_text((stdlib / name).read_text())
    out = tmp_path_factory.mktemp("data") / "prepared"
    prepare(str(src), out, tokenizer="byte", progress=False)
    return out


def small_cfg(data_dir, out, **kw):
    d = dict(data=str(data_dir), out=str(out), n_layer=1, n_head=2, d_model=16, block_size=16,
             batch_size=4, warmup_steps=3, eval_steps=2, samples=0, progress=False,
             max_steps=12, eval_interval=4, log_interval=1)
    d.update(kw)
    return TrainConfig.from_dict(d)


def _losses(out):
    recs = [json.loads(x) for x in (Path(out) / "log.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in recs if "loss" in r], \
           [(r["step"], r["val_loss"]) for r in recs if "val_loss" in r]



def test_resume_after_sigkill_logs_the_same_losses(data_dir, tmp_path, run_cli):
    common = ["train", "--data", str(data_dir), *SMALL, "--max-steps", "24", "--log-interval", "1",
              "--eval-interval", "8", "--ckpt-interval", "5", "--dropout", "0.1"]
    full = run_cli(common + ["--out", str(tmp_path / "full")])
    assert full.returncode == 0, full.stderr
    killed = run_cli(common + ["--out", str(tmp_path / "cut")],
                  env={"TENSORLITE_TEST_KILL_AT_STEP": "13"})
    assert killed.returncode == -signal.SIGKILL
    cut_train, _ = _losses(tmp_path / "cut")
    assert cut_train[-1][0] == 13  # it really died mid-run (13 steps done), after the step-10 checkpoint
    resumed = run_cli(common + ["--out", str(tmp_path / "cut"), "--resume"])
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed at step 10" in resumed.stdout
    a, b = _losses(tmp_path / "full"), _losses(tmp_path / "cut")
    assert len(a[0]) == 24
    assert a == b, "a resumed run must log the same losses, step for step"


def test_loss_falls_below_unigram_baseline(data_dir, tmp_path):
    s = train(small_cfg(data_dir, tmp_path, max_steps=200, eval_interval=100, d_model=32,
                        n_head=4, lr=1e-2, min_lr=1e-3, batch_size=8, block_size=32,
                        warmup_steps=10, eval_steps=50), say=lambda *a: None)
    assert s["best_val_loss"] < s["unigram_baseline"]
    assert (tmp_path / "loss.png").stat().st_size > 1000
    assert (tmp_path / "summary.json").exists()


def test_nonfinite_loss_stops_with_clear_error_and_keeps_checkpoint(data_dir, tmp_path, monkeypatch):
    real = Trainer.train_step

    def bad(self):
        loss, norm = real(self)
        return (float("nan"), norm) if self.step == 6 else (loss, norm)
    monkeypatch.setattr(Trainer, "train_step", bad)
    with pytest.raises(TrainingError, match="non-finite loss \\(nan\\) at step 6.*--skip-nonfinite"):
        train(small_cfg(data_dir, tmp_path), say=lambda *a: None)
    from nn.checkpoint import load_checkpoint
    assert load_checkpoint(tmp_path / "ckpt" / "latest")["extra"]["step"] == 4
    s = train(small_cfg(data_dir, tmp_path / "skip", skip_nonfinite=True), say=lambda *a: None)
    assert s["step"] == 12
    recs = (tmp_path / "skip" / "log.jsonl").read_text()
    assert '"skipped": true' in recs


def test_ctrl_c_saves_and_resume_finishes(data_dir, tmp_path, monkeypatch):
    real = Trainer.train_step

    def interrupt(self):
        if self.step == 7:
            raise KeyboardInterrupt
        return real(self)
    monkeypatch.setattr(Trainer, "train_step", interrupt)
    s = train(small_cfg(data_dir, tmp_path), say=lambda *a: None)
    assert s["interrupted"] and s["step"] == 7
    monkeypatch.setattr(Trainer, "train_step", real)
    s = train(small_cfg(data_dir, tmp_path, resume=True), say=lambda *a: None)
    assert s["step"] == 12 and not s["interrupted"]


def test_cli_config_file_and_overrides(data_dir, tmp_path, capsys):
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[train]\ndata = "{data_dir}"\nmax_steps = 3\nn_layer = 1\nn_head = 2\n'
                   f'd_model = 16\nblock_size = 16\nbatch_size = 2\nwarmup_steps = 1\n'
                   f'eval_interval = 3\neval_steps = 1\nsamples = 0\n')
    rc = main(["train", "--config", str(cfg), "--out", str(tmp_path / "r"), "--max-steps", "4",
               "--no-progress"])
    assert rc == 0
    assert json.loads((tmp_path / "r" / "summary.json").read_text())["step"] == 4
    capsys.readouterr()
    rc = main(["sample", "--out", str(tmp_path / "r"), "--prompt", "def ", "--max-new-tokens", "5"])
    out = capsys.readouterr().out
    assert rc == 0 and out.startswith("def ")
    rc = main(["eval", "--out", str(tmp_path / "r"), "--eval-steps", "2"])
    assert rc == 0 and '"val_loss"' in capsys.readouterr().out


@pytest.mark.parametrize("args,msg", [
    (["train", "--data", "/nonexistent/x"], "is not prepared"),
    (["train", "--preset", "huge"], "unknown preset 'huge'"),
    (["train", "--device", "cuda"], "use --device cpu"),
    (["train", "--warmup-steps", "50", "--max-steps", "10"], "--warmup-steps 50 must be between"),
    (["sample", "--out", "/nonexistent/run"], "--out /nonexistent/run does not exist"),
    (["train", "--config", "/nonexistent.toml"], "config file /nonexistent.toml does not exist"),
])
def test_cli_user_errors_are_one_line(args, msg, capsys, data_dir):
    if args[0] == "train" and "--data" not in args:
        args = args + ["--data", str(data_dir)]
    if args == ["train", "--device", "cuda", "--data", str(data_dir)]:
        import tensorlite as tl
        if tl.cuda_available():
            pytest.skip("a GPU is present")
    rc = main(args)
    err = capsys.readouterr().err
    assert rc == 2
    assert msg in err and "Traceback" not in err and err.count("\n") == 1


def test_sample_crops_long_prompt_with_a_note(data_dir, tmp_path, capsys):
    train(small_cfg(data_dir, tmp_path, max_steps=2, eval_interval=2, warmup_steps=None),
          say=lambda *a: None)
    rc = main(["sample", "--out", str(tmp_path), "--which", "latest", "--prompt", "x" * 40,
               "--max-new-tokens", "3"])
    assert rc == 0
    assert "keeping the last 16" in capsys.readouterr().err


def test_resume_with_other_model_is_clear_error(data_dir, tmp_path):
    train(small_cfg(data_dir, tmp_path, max_steps=2, eval_interval=2, warmup_steps=1),
          say=lambda *a: None)
    with pytest.raises(ValueError, match="different model .*d_model: 16 vs 32"):
        train(small_cfg(data_dir, tmp_path, d_model=32, resume=True), say=lambda *a: None)


def test_unigram_baseline_is_smoothed_cross_entropy():
    from gpt.train import unigram_baseline
    # train counts (2, 2, 0, 0) + 1 -> p = (3, 3, 1, 1) / 8
    assert unigram_baseline(np.array([0, 1, 0, 1]), np.array([0, 2]), 4) == pytest.approx(
        -(np.log(3 / 8) + np.log(1 / 8)) / 2)


def test_cli_prepare_then_train_on_a_user_folder(tmp_path, capsys):
    src = tmp_path / "texts"
    src.mkdir()
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for name in ("textwrap.py", "shlex.py", "fnmatch.py", "glob.py"):
        (src / name).write_text((stdlib / name).read_text())
    out = tmp_path / "prepared"
    assert main(["prepare", "--data", str(src), "--out", str(out), "--tokenizer", "char",
                 "--vocab-size", "400"]) == 0
    assert (out / "meta.json").exists() and (out / "report.json").exists()
    assert main(["train", "--data", str(out), "--out", str(tmp_path / "run"), *SMALL,
                 "--max-steps", "3", "--eval-interval", "3"]) == 0
    capsys.readouterr()
    assert main(["sample", "--out", str(tmp_path / "run"), "--prompt", "import ",
                 "--max-new-tokens", "8", "--top-p", "0.9", "--top-k", "20", "--num-samples", "2"]) == 0
    text = capsys.readouterr().out
    assert text.count("import ") == 2
    assert main(["prepare", "--data", str(tmp_path / "missing"), "--out", str(out)]) == 2
    assert "missing" in capsys.readouterr().err
