"""A user's runs are sacred: guards on --out, exact resume after Ctrl-C anywhere in a step,
time-based checkpoints, damaged checkpoints, and user mistakes that end in one line."""
import hashlib
import importlib
import json
import os
import shutil
import signal
import sysconfig
from pathlib import Path

import numpy as np
import pytest

import tensorlite as tl
from gpt.cli import main
from gpt.model import ConfigError, GPT, GPTConfig
from gpt.data.prepare import prepare
from gpt.train import Trainer, TrainConfig, TrainingError, train
from nn.optim import AdamW

SMALL = ["--n-layer", "1", "--n-head", "2", "--d-model", "16", "--block-size", "16",
         "--batch-size", "4", "--warmup-steps", "3", "--eval-steps", "2", "--samples", "0",
         "--no-progress", "--log-interval", "1"]
quiet = dict(say=lambda *a: None)

train_mod = importlib.import_module("gpt.train")   # the module (gpt.train is the function)


def _src(tmp, names):
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    tmp.mkdir(parents=True, exist_ok=True)
    for name in names:
        (tmp / name.replace("/", "_")).write_text((stdlib / name).read_text())
    return tmp


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    src = _src(tmp_path_factory.mktemp("src"), ["json/decoder.py", "json/encoder.py",
                                                 "textwrap.py", "shlex.py", "fnmatch.py",
                                                 "glob.py", "getopt.py", "sched.py"])
    out = tmp_path_factory.mktemp("data") / "prepared"
    prepare(str(src), out, tokenizer="byte", progress=False)
    return out


@pytest.fixture(scope="module")
def other_data(tmp_path_factory):
    src = _src(tmp_path_factory.mktemp("src2"), ["colorsys.py", "bisect.py", "keyword.py",
                                                  "stat.py", "token.py", "string.py"])
    out = tmp_path_factory.mktemp("data2") / "prepared"
    prepare(str(src), out, tokenizer="char", vocab_size=400, progress=False)
    return out


def cfg_for(data_dir, out, **kw):
    d = dict(data=str(data_dir), out=str(out), n_layer=1, n_head=2, d_model=16, block_size=16,
             batch_size=4, warmup_steps=3, eval_steps=2, samples=0, progress=False,
             max_steps=12, eval_interval=4, log_interval=1, dropout=0.1)
    d.update(kw)
    return TrainConfig.from_dict(d)


def _tree_digest(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _log(out):
    return [json.loads(x) for x in (Path(out) / "log.jsonl").read_text().splitlines()]


def _losses(out):
    return [(r["step"], r.get("loss"), r.get("val_loss")) for r in _log(out)
            if "loss" in r or "val_loss" in r]


def _strict_json(text):
    def bad(c):
        raise ValueError(f"not JSON: {c}")
    return json.loads(text, parse_constant=bad)


# ---------------------------------------------------------------------------------- --out guard
def test_second_train_into_a_run_is_refused_and_touches_nothing(data_dir, tmp_path, capsys):
    out = tmp_path / "run"
    train(cfg_for(data_dir, out, max_steps=4), **quiet)
    before = _tree_digest(out)
    rc = main(["train", "--data", str(data_dir), "--out", str(out), *SMALL, "--max-steps", "4"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1
    assert "already holds a run (a checkpoint at step 4 of 4, best validation loss" in err
    assert "--resume" in err and "--overwrite" in err
    assert _tree_digest(out) == before


def test_a_run_being_trained_is_never_resumed_or_overwritten_beside_it(data_dir, tmp_path,
                                                                       capsys, monkeypatch):
    """While one process trains into --out (it holds out/.lock), a --resume or an --overwrite
    into the same folder is refused before it writes anything; after the run ends (or dies:
    the OS drops the lock) the folder is free again."""
    import fcntl
    out = tmp_path / "run"
    train(cfg_for(data_dir, out, max_steps=4), **quiet)
    holder = open(out / ".lock", "w")                   # another process's lock, as it holds it
    holder.write("pid 4242 on elsewhere, since 2026-11-30 00:00:00\n")
    holder.flush()
    fcntl.flock(holder, fcntl.LOCK_EX | fcntl.LOCK_NB)
    before = _tree_digest(out)
    for extra in (["--resume", "--max-steps", "8"], ["--overwrite", "--max-steps", "4"]):
        rc = main(["train", "--data", str(data_dir), "--out", str(out), *SMALL, *extra])
        err = capsys.readouterr().err
        assert rc == 2 and err.count("\n") == 1, err
        assert "is being trained right now (pid 4242 on elsewhere" in err
        assert _tree_digest(out) == before
    holder.close()                                      # the other run ended
    s = train(cfg_for(data_dir, out, max_steps=8, resume=True), **quiet)
    assert s["step"] == 8


def test_overwrite_replaces_the_run(data_dir, tmp_path):
    out = tmp_path / "run"
    train(cfg_for(data_dir, out, max_steps=8), **quiet)
    (out / "notes.txt").write_text("mine")            # a user's own file stays
    s = train(cfg_for(data_dir, out, max_steps=4, overwrite=True), **quiet)
    assert s["step"] == 4
    assert max(r["step"] for r in _log(out)) == 4     # the old log (steps 1-8) is gone
    assert (out / "notes.txt").read_text() == "mine"
    with pytest.raises(ConfigError, match="contradict"):
        train(cfg_for(data_dir, out, resume=True, overwrite=True), **quiet)


def test_resume_on_other_data_is_refused_before_any_write(data_dir, other_data, tmp_path, capsys):
    out = tmp_path / "run"
    train(cfg_for(data_dir, out, max_steps=4), **quiet)
    before = _tree_digest(out)
    rc = main(["train", "--data", str(other_data), "--out", str(out), *SMALL, "--max-steps", "8",
               "--resume"])
    err = capsys.readouterr().err
    assert rc == 2 and "holds other data" in err and f"--data {data_dir}" in err
    assert _tree_digest(out) == before               # the tokenizer.json above all
    # without --data, --resume continues on the run's own data
    rc = main(["train", "--out", str(out), *SMALL, "--max-steps", "8", "--dropout", "0.1",
               "--resume"])
    assert rc == 0 and "resumed at step 4" in capsys.readouterr().out


def test_resume_of_a_run_without_checkpoint_asks_for_overwrite(tmp_path, data_dir):
    out = tmp_path / "run"
    out.mkdir()
    (out / "log.jsonl").write_text('{"step": 41, "loss": 3.0}\n')
    for resume in (True, False):     # never advise --resume when there is nothing to resume
        with pytest.raises(TrainingError, match="a log up to step 41 and no checkpoint: there is "
                                                "nothing to resume from; pass --overwrite"):
            train(cfg_for(data_dir, out, resume=resume), **quiet)
    assert (out / "log.jsonl").read_text() == '{"step": 41, "loss": 3.0}\n'


def test_a_prepared_data_folder_is_never_a_run_folder(data_dir, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(data_dir, data)
    before = _tree_digest(data)
    for extra in ([], ["--overwrite"], ["--resume"]):
        rc = main(["train", "--data", str(data_dir), "--out", str(data), *SMALL, *extra])
        err = capsys.readouterr().err
        assert rc == 2 and "is a prepared data folder" in err, err
    assert _tree_digest(data) == before


def test_resume_alone_continues_the_run_as_it_was_started(data_dir, tmp_path, capsys,
                                                          monkeypatch):
    out = tmp_path / "run"
    args = ["--data", str(data_dir), "--out", str(out), "--positional", "rope", "--no-bias",
            *SMALL, "--max-steps", "4", "--eval-interval", "2", "--lr", "0.005"]
    assert main(["train", *args]) == 0
    monkeypatch.chdir(tmp_path / "..")            # from another folder, without --data
    capsys.readouterr()
    assert main(["train", "--out", str(out), "--resume", "--max-steps", "6", "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "resuming with --max-steps 6 (the run had 4)" in text and "resumed at step 4" in text
    from nn.checkpoint import load_checkpoint
    meta = load_checkpoint(out / "ckpt" / "latest")
    tc = meta["extra"]["train_config"]
    assert tc["lr"] == 0.005 and tc["model"]["positional"] == "rope" and not tc["model"]["bias"]
    assert tc["data"] == str(Path(data_dir).resolve()) and meta["extra"]["step"] == 6
    assert main(["train", "--out", str(out), "--resume", "--max-steps", "6"]) == 2
    assert "at step 6 and --max-steps is 6: nothing to train" in capsys.readouterr().err
    assert main(["train", "--out", str(out), "--resume", "--max-steps", "9",
                 "--batch-size", "8"]) == 2
    assert "resume with --batch-size 4" in capsys.readouterr().err


def test_nonfinite_validation_loss_saves_nothing(data_dir, tmp_path, monkeypatch):
    real = train_mod.evaluate
    monkeypatch.setattr(train_mod, "evaluate", lambda m, l, n: float("nan")
                        if (tmp_path / "ckpt" / "latest").exists() else real(m, l, n))
    with pytest.raises(TrainingError, match=r"non-finite validation loss \(nan\) at step 8: "
                                            r"stopping; the last good checkpoint of this run is "
                                            r".*\(step 4\)"):
        train(cfg_for(data_dir, tmp_path), **quiet)
    from nn.checkpoint import load_checkpoint
    assert load_checkpoint(tmp_path / "ckpt" / "latest")["extra"]["step"] == 4
    summary = _strict_json((tmp_path / "summary.json").read_text())
    assert summary["checkpoint_step"] == 4 and "non-finite" in summary["stopped"]


def test_sigterm_saves_at_a_step_boundary_like_ctrl_c(data_dir, tmp_path, monkeypatch):
    state = {"t": None}
    real_init = Trainer.__init__

    def init(self, *a, **k):
        real_init(self, *a, **k)
        state["t"] = self
    monkeypatch.setattr(Trainer, "__init__", init)
    real_step = AdamW.step

    def step(self, *a, **k):
        if state["t"].step == 5:
            os.kill(os.getpid(), signal.SIGTERM)
        return real_step(self, *a, **k)
    monkeypatch.setattr(AdamW, "step", step)
    s = train(cfg_for(data_dir, tmp_path), **quiet)
    assert s["interrupted"] == "SIGTERM" and s["step"] == 6 and s["checkpoint_step"] == 6
    monkeypatch.undo()
    full = train(cfg_for(data_dir, tmp_path / "full"), **quiet)
    train(cfg_for(data_dir, tmp_path, resume=True), **quiet)
    assert full["step"] == 12 and _losses(tmp_path / "full") == _losses(tmp_path)


@pytest.mark.parametrize("toml,msg", [
    ("[train]\nresume = \"no\"\n", "resume = 'no' must be true or false"),
    ("[train]\nuntied = \"false\"\n", "untied = 'false' must be true or false"),
    ("[train]\nn_layer = 1.5\n", "n_layer = 1.5 must be an integer"),
    ("[trian]\nlr = 1\n", "unknown table(s) ['[trian]']"),
])
def test_config_file_values_are_checked(toml, msg, tmp_path, capsys):
    cfg = tmp_path / "c.toml"
    cfg.write_text(toml)
    rc = main(["train", "--config", str(cfg), "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert rc == 2 and msg in err and err.count("\n") == 1, err


# ---------------------------------------------------------------------------------- Ctrl-C
def _sigint_during(monkeypatch, phase, at_step, times=1):
    """Send this process SIGINT from inside `phase` of the step `at_step` (as a user's Ctrl-C
    lands: anywhere)."""
    state = {"trainer": None, "sent": 0}
    real_init = Trainer.__init__

    def init(self, *a, **k):
        real_init(self, *a, **k)
        state["trainer"] = self
    monkeypatch.setattr(Trainer, "__init__", init)

    def fire():
        t = state["trainer"]
        if t is not None and t.step == at_step and state["sent"] < times:
            state["sent"] += 1
            os.kill(os.getpid(), signal.SIGINT)
    targets = {"forward": (GPT, "forward"), "backward": (tl.Tensor, "backward"),
               "optimizer": (AdamW, "step")}
    cls, name = targets[phase]
    real = getattr(cls, name)

    def wrapped(*a, **k):
        fire()
        return real(*a, **k)
    monkeypatch.setattr(cls, name, wrapped)
    return state


@pytest.mark.parametrize("phase", ["forward", "backward", "optimizer"])
def test_ctrl_c_anywhere_in_a_step_resumes_exactly(phase, data_dir, tmp_path, monkeypatch):
    full = train(cfg_for(data_dir, tmp_path / "full"), **quiet)
    assert full["step"] == 12
    state = _sigint_during(monkeypatch, phase, at_step=6)
    s = train(cfg_for(data_dir, tmp_path / "cut"), **quiet)
    assert state["sent"] == 1
    assert s["interrupted"] and s["step"] == 7      # step 6 finished, then saved and stopped
    monkeypatch.undo()
    s = train(cfg_for(data_dir, tmp_path / "cut", resume=True), **quiet)
    assert s["step"] == 12 and not s["interrupted"]
    assert _losses(tmp_path / "full") == _losses(tmp_path / "cut"), \
        "every logged train and validation loss must equal the uninterrupted run's"


def test_second_ctrl_c_stops_at_once_without_saving(data_dir, tmp_path, monkeypatch):
    lines = []
    state = _sigint_during(monkeypatch, "backward", at_step=6, times=2)
    # two micro-batches: the second Ctrl-C lands in the second backward of the same step
    s = train(cfg_for(data_dir, tmp_path, grad_accum=2), say=lines.append)
    assert state["sent"] == 2 and s["interrupted"]
    assert "stopped without saving" in lines[-1] and "ckpt/latest" in lines[-1]
    from nn.checkpoint import load_checkpoint
    assert load_checkpoint(tmp_path / "ckpt" / "latest")["extra"]["step"] == 4
    monkeypatch.undo()
    full = train(cfg_for(data_dir, tmp_path / "full", grad_accum=2), **quiet)
    s = train(cfg_for(data_dir, tmp_path, grad_accum=2, resume=True), **quiet)
    assert s["step"] == full["step"] == 12
    assert _losses(tmp_path / "full") == _losses(tmp_path)
    assert _strict_json((tmp_path / "summary.json").read_text())["step"] == 12


def test_summary_is_valid_json_before_any_evaluation(data_dir, tmp_path, monkeypatch):
    _sigint_during(monkeypatch, "forward", at_step=1)
    s = train(cfg_for(data_dir, tmp_path), **quiet)
    assert s["interrupted"] and s["step"] == 2
    summary = _strict_json((tmp_path / "summary.json").read_text())
    assert summary["best_val_loss"] is None


# ---------------------------------------------------------------------------------- time checkpoints

def test_time_based_checkpoint_lets_a_killed_run_resume(data_dir, tmp_path, run_cli):
    common = ["train", "--data", str(data_dir), *SMALL, "--max-steps", "8", "--dropout", "0.1",
              "--eval-interval", "100", "--ckpt-interval", "100"]
    full = run_cli(common + ["--out", str(tmp_path / "full")])
    assert full.returncode == 0, full.stderr
    # every ~0.06 ms: each step boundary is past due, so a checkpoint follows every step
    killed = run_cli(common + ["--out", str(tmp_path / "cut"), "--ckpt-minutes", "0.000001"],
                  env={"TENSORLITE_TEST_KILL_AT_STEP": "5"})
    assert killed.returncode == -signal.SIGKILL
    resumed = run_cli(common + ["--out", str(tmp_path / "cut"), "--resume"])
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed at step 5" in resumed.stdout
    assert _losses(tmp_path / "full") == _losses(tmp_path / "cut")


# ---------------------------------------------------------------------------------- non-finite, float16
def test_nonfinite_before_any_checkpoint_says_none_exists(data_dir, tmp_path, monkeypatch):
    real = Trainer.train_step

    def bad(self):
        loss, norm = real(self)
        return (float("nan"), norm) if self.step == 2 else (loss, norm)
    monkeypatch.setattr(Trainer, "train_step", bad)
    with pytest.raises(TrainingError, match="at step 2: stopping; no checkpoint of this run "
                                            "exists yet"):
        train(cfg_for(data_dir, tmp_path), **quiet)
    with pytest.raises(TrainingError, match=r"at step 2: stopping; the last good checkpoint of "
                                            r"this run is .*ckpt/latest"):
        train(cfg_for(data_dir, tmp_path / "b", ckpt_interval=1), **quiet)


def test_a_dtype_training_cannot_use_is_refused_in_one_line(data_dir, tmp_path, capsys):
    rc = main(["train", "--data", str(data_dir), "--out", str(tmp_path / "r"), *SMALL,
               "--dtype", "bfloat16"])
    err = capsys.readouterr().err
    assert rc == 2 and "--dtype must be float32, float64 or float16" in err
    assert err.count("\n") == 1 and not (tmp_path / "r").exists()


# ---------------------------------------------------------------------------------- MFU
def test_mfu_is_never_logged_above_one(data_dir, tmp_path, monkeypatch):
    calls = []

    def low_peak(device="cpu", **k):      # a peak measured on a very busy machine
        calls.append(1)
        return 1.0
    monkeypatch.setattr(train_mod, "measure_gemm_peak", low_peak)
    train(cfg_for(data_dir, tmp_path, max_steps=4), **quiet)
    recs = [r for r in _log(tmp_path) if "mfu" in r]
    assert recs and all(0 <= r["mfu"] <= 1.0 for r in recs)
    assert all(r.get("mfu_capped") for r in recs)
    assert len(calls) > 1                  # re-measured when the MFU came out above 1


# ---------------------------------------------------------------------------------- memory
@pytest.mark.parametrize("shape", [(8, 64, 32, 2, 2, 512), (4, 128, 64, 1, 4, 1024),
                                   (2, 32, 96, 3, 3, 2048)])
def test_memory_estimate_matches_measured_peak(shape):
    import tracemalloc
    from gpt.train import estimate_memory, param_groups
    b, t, c, layers, h, v = shape
    cfg = GPTConfig(vocab_size=v, block_size=t, n_layer=layers, n_head=h, d_model=c)
    x = np.random.default_rng(0).integers(0, v, (b, t))
    tracemalloc.start()
    try:
        model = GPT(cfg)
        opt = AdamW(param_groups(model, 0.1), lr=1e-3)
        for _ in range(2):
            _, loss = model(tl.tensor(x), tl.tensor(x))
            loss.backward()
            opt.step()
            opt.zero_grad()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    est = estimate_memory(cfg, b)
    assert 0.7 * peak <= est <= 1.6 * peak, (est, peak)


def test_a_config_that_does_not_fit_is_refused_before_allocating(data_dir, tmp_path, capsys):
    rc = main(["train", "--data", str(data_dir), "--out", str(tmp_path / "r"), *SMALL,
               "--block-size", "100000"])
    err = capsys.readouterr().err
    assert rc == 2 and "needs about" in err and "GiB" in err and "--batch-size" in err
    assert err.count("\n") == 1


# ---------------------------------------------------------------------------------- user mistakes
@pytest.mark.parametrize("extra,msg", [
    (["--grad-clip", "-1"], "--grad-clip must be >= 0"),
    (["--lr", "nan"], "--lr must be a finite number"),
    (["--ckpt-interval", "0"], "--ckpt-interval must be an integer >= 1"),
    (["--device", "tpu"], "unknown device 'tpu'"),
])
def test_bad_train_values_are_one_line(extra, msg, data_dir, tmp_path, capsys):
    rc = main(["train", "--data", str(data_dir), "--out", str(tmp_path / "r"), *SMALL, *extra])
    err = capsys.readouterr().err
    assert rc == 2 and msg in err and err.count("\n") == 1, err


def test_out_that_is_a_file_or_unwritable(data_dir, tmp_path, capsys, monkeypatch):
    f = tmp_path / "afile"
    f.write_text("x")
    assert main(["train", "--data", str(data_dir), "--out", str(f), *SMALL]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err
    assert main(["train", "--data", str(data_dir), "--out", str(f / "sub"), *SMALL]) == 2
    assert "is a file, so the folder cannot be created" in capsys.readouterr().err
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, m: False if str(p) == str(tmp_path) else
                        real_access(p, m))
    assert main(["train", "--data", str(data_dir), "--out", str(tmp_path / "new"), *SMALL]) == 2
    assert "no permission to write in" in capsys.readouterr().err


def test_a_write_that_fails_mid_run_is_one_line(data_dir, tmp_path, capsys, monkeypatch):
    from nn import checkpoint as ckpt

    def full_disk(*a, **k):
        raise OSError(28, "No space left on device", str(tmp_path / "r" / "ckpt"))
    monkeypatch.setattr(ckpt, "save_checkpoint", full_disk)
    rc = main(["train", "--data", str(data_dir), "--out", str(tmp_path / "r"), *SMALL,
               "--max-steps", "4"])
    err = capsys.readouterr().err
    assert rc == 2 and "could not write" in err and "No space left" in err
    assert err.count("\n") == 1


@pytest.fixture(scope="module")
def trained(data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "r"
    train(cfg_for(data_dir, out, max_steps=4, eval_interval=2), **quiet)
    return out


@pytest.mark.parametrize("extra,msg", [
    (["--temperature", "nan"], "--temperature must be a finite number"),
    (["--temperature", "inf"], "--temperature must be a finite number"),
    (["--num-samples", "0"], "--num-samples must be >= 1"),
    (["--top-p", "1.5"], "--top-p must be in (0, 1]"),
    (["--device", "cuda:x"], "unknown device"),
])
def test_bad_sample_values_are_one_line(extra, msg, trained, capsys):
    rc = main(["sample", "--out", str(trained), *extra])
    err = capsys.readouterr().err
    assert rc == 2 and msg in err and err.count("\n") == 1, err


def _corrupt(ckpt_root: Path):
    folder = ckpt_root / (ckpt_root / "latest").read_text().strip()
    f = folder / "model.safetensors"
    data = bytearray(f.read_bytes())
    mid = len(data) // 2
    data[mid:mid + 1024] = b"\xff" * 1024
    f.write_bytes(bytes(data))


def test_sample_and_eval_fall_back_from_a_damaged_checkpoint(trained, tmp_path, capsys):
    run = tmp_path / "r"
    shutil.copytree(trained, run)
    _corrupt(run / "ckpt" / "best")
    assert main(["sample", "--out", str(run), "--max-new-tokens", "4"]) == 0
    err = capsys.readouterr().err
    assert "model.safetensors" in err and "SHA-256" in err and "ckpt/latest instead" in err
    assert main(["eval", "--out", str(run), "--eval-steps", "1"]) == 0
    rec = _strict_json(capsys.readouterr().out)
    assert rec["checkpoint"].startswith(str(run / "ckpt" / "latest"))
    _corrupt(run / "ckpt" / "latest")
    assert main(["sample", "--out", str(run), "--max-new-tokens", "4"]) == 2
    err = capsys.readouterr().err
    assert "model.safetensors" in err and "Traceback" not in err


def test_sample_uses_latest_when_there_is_no_best(trained, tmp_path, capsys):
    run = tmp_path / "r"
    shutil.copytree(trained, run)
    shutil.rmtree(run / "ckpt" / "best")
    assert main(["sample", "--out", str(run), "--max-new-tokens", "3"]) == 0
    assert main(["sample", "--out", str(run), "--which", "best", "--max-new-tokens", "3"]) == 0
    assert "no ckpt/best yet; using ckpt/latest" in capsys.readouterr().err


def test_internal_errors_keep_their_traceback(monkeypatch, data_dir, tmp_path):
    def bug(*a, **k):
        raise RuntimeError("an internal bug")
    monkeypatch.setattr(train_mod, "train", bug)
    with pytest.raises(RuntimeError, match="an internal bug"):
        main(["train", "--data", str(data_dir), "--out", str(tmp_path / "r"), *SMALL])


def test_a_folder_prepared_under_mpiexec_is_recognised_as_data(tmp_path):
    """mpiexec's prepare writes train-00000-of-00002.bin ... and no train.bin: train, sample,
    inspect and export must still see prepared data there, and never write a run over it."""
    from gpt.data.prepare import looks_prepared
    from gpt.run_folder import check_out
    d = tmp_path / "prepared"
    d.mkdir()
    (d / "meta.json").write_text("{}")
    assert not looks_prepared(d)
    (d / "train-00000-of-00002.bin").write_bytes(b"x")
    assert looks_prepared(d)
    with pytest.raises(TrainingError, match="is a prepared data folder"):
        check_out(TrainConfig(data=str(tmp_path / "elsewhere"), out=str(d)))


def test_unigram_baseline_counts_shards_in_chunks():
    rng = np.random.default_rng(0)
    a, b = rng.integers(0, 50, 1000).astype(np.uint16), rng.integers(0, 50, 777).astype(np.uint16)
    val = rng.integers(0, 50, 300).astype(np.uint16)
    whole = train_mod.unigram_baseline(np.concatenate([a, b]), val, 50)
    assert train_mod.unigram_baseline([a, b], [val], 50) == pytest.approx(whole, rel=1e-15)
    counts = train_mod._token_counts([a, b], 50, chunk=64)
    np.testing.assert_array_equal(counts, np.bincount(np.concatenate([a, b]), minlength=50))
