"""`tensorlite-gpt sft` and `chat` end to end: one tiny pretrained base run per module, then
fine-tuning on the embedded docstring -> body set and on a JSONL file; the held-out loss
before (checked against a reference computed here from the base run) and after; exact resume
after SIGKILL; every layout (and gradient accumulation) logging what one process logs, which
holds only if the step's loss is the mean over its answer tokens; and the user's mistakes,
each one line."""
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from gpt.cli import main
from mpi_launch import MPIEXEC, needs_mpi

ROOT = Path(__file__).resolve().parents[1]


# the base run: 2 layers, 2 heads, 32 wide, block 64, byte tokenizer (259 ids)
BASE = ["--n-layer", "2", "--n-head", "2", "--d-model", "32", "--block-size", "64",
        "--batch-size", "8", "--max-steps", "30", "--eval-interval", "30", "--eval-steps", "2",
        "--lr", "1e-2", "--warmup-steps", "3", "--samples", "0", "--no-progress"]
# every sft run: functions of at most 150 characters (prompts longer than the block are
# dropped), float64, a log record every step; --eval-steps 10 covers all 47 held-out rows in
# batches of 8 (and of 16), so the validation loss does not depend on the batch size
MAX_CHARS = 150
SFT = ["--max-chars", str(MAX_CHARS), "--max-steps", "12", "--eval-interval", "6",
       "--eval-steps", "10", "--log-interval", "1", "--warmup-steps", "2", "--lr", "3e-3",
       "--dtype", "float64", "--ckpt-interval", "4", "--no-progress"]
REF = ["--batch-size", "8", "--grad-accum", "2", "--samples", "1", "--sample-tokens", "8"]
CHAT_PROMPT = 'def f(x):\n    """Return x."""\n'
NOTE = "note: the base tokenizer has no chat tokens: added <|system|>, <|user|>, <|assistant|>, " \
       "<|end|> as ids 259..262"


def _cli(args, n=1, env=None, timeout=240):
    e = dict(os.environ, PYTHONPATH=str(ROOT), TENSORLITE_NUM_THREADS="1")
    e.update(env or {})
    cmd = [sys.executable, "-m", "gpt.cli", *args]
    if n > 1:
        cmd = [MPIEXEC, "-n", str(n), *cmd]
    return subprocess.run(cmd, env=e, capture_output=True, text=True, timeout=timeout)


def _log(out):
    return [json.loads(x) for x in (Path(out) / "log.jsonl").read_text().splitlines()]


def _numbers(out):
    return [(r["step"], r.get("loss"), r.get("val_loss")) for r in _log(out)]


def _same_numbers(a, b, tol):
    assert [r[0] for r in a] == [r[0] for r in b], (a, b)
    for (_, la, va), (_, lb, vb) in zip(a, b):
        assert (la is None) == (lb is None) and (va is None) == (vb is None), (a, b)
        x, y = (la, lb) if la is not None else (va, vb)
        assert abs(x - y) <= tol * max(1.0, abs(x)), (a, b)


def _strict_json(text):
    def bad(c):
        raise ValueError(f"not JSON: {c}")
    return json.loads(text, parse_constant=bad)


def _tree_state(folder: Path) -> dict:
    """Every file under ``folder``: its bytes' digest and its mtime."""
    return {str(p.relative_to(folder)): (hashlib.sha256(p.read_bytes()).hexdigest(),
                                         p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _one_error_line(err: str, command: str = "sft") -> str:
    assert "Traceback" not in err, err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"tensorlite-gpt {command}: error: "), err
    return lines[0]


# ------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def data(byte_data):
    return byte_data


@pytest.fixture(scope="module")
def base(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("base") / "run"
    r = _cli(["train", "--data", str(data), "--out", str(out), *BASE])
    assert r.returncode == 0, r.stderr
    return out


@pytest.fixture(scope="module")
def ref(base, tmp_path_factory):
    """One process, --batch-size 8 --grad-accum 2: the run every other one is held to."""
    out = tmp_path_factory.mktemp("ref") / "sft"
    r = _cli(["sft", "--base", str(base), "--out", str(out), *SFT, *REF])
    assert r.returncode == 0, r.stderr
    return out, r


@pytest.fixture(scope="module")
def functions_file(tmp_path_factory):
    """A JSONL file of 96 of the embedded set's short functions (prompts of at most 48
    characters, answers of 1 to 60 learned tokens in a row), one in four as messages with a
    system message: the layouts read it instead of the embedded set, which every process
    (every rank) would otherwise extract from the stdlib again."""
    from gpt.align.data import default_sft_set
    train, _ = default_sft_set(max_chars=MAX_CHARS)
    convs = [c for c in train if len(c.messages[0][1].encode()) <= 48]
    assert len(convs) >= 90
    lines = []
    for i, c in enumerate(convs[:96]):
        (_, prompt), (_, body) = c.messages
        lines.append(json.dumps({"prompt": prompt, "response": body} if i % 4 else
                                {"messages": [{"role": "system", "content": "Python."},
                                              {"role": "user", "content": prompt},
                                              {"role": "assistant", "content": body}]}))
    f = tmp_path_factory.mktemp("jsonl") / "functions.jsonl"
    f.write_text("\n".join(lines) + "\n")
    return f


@pytest.fixture(scope="module")
def file_ref(base, functions_file, tmp_path_factory):
    """The same on the file: one process, --batch-size 8 --grad-accum 2."""
    out = tmp_path_factory.mktemp("file_ref") / "sft"
    r = _cli(["sft", "--base", str(base), "--data", str(functions_file), "--out", str(out),
              *SFT, "--batch-size", "8", "--grad-accum", "2", "--samples", "0"])
    assert r.returncode == 0, r.stderr
    return out


def _heldout_reference(base):
    """(rows, answer tokens, mean cross-entropy) of the base model on the held-out set, computed
    here from the documented rules: the template <|user|>prompt<|end|><|assistant|>body<|end|>,
    rows of block + 1 tokens (longer ones cut, ones with no answer token left dropped), targets
    only on the body and its <|end|>, and the embedding grown by four rows at the mean of the
    old ones."""
    from gpt.align.data import default_sft_set
    from gpt.model import GPT, GPTConfig
    from gpt.run_folder import load_run
    model, tok, _ = load_run(base)
    assert tok.vocab_size == 259
    user, assistant, end = 260, 261, 262
    _, held = default_sft_set(max_chars=MAX_CHARS, heldout_percent=10)
    width = model.config.block_size + 1
    rows = []
    for conv in held:
        (_, prompt), (_, body) = conv.messages
        p, b = tok.encode(prompt), tok.encode(body)
        ids = [user, *p, end, assistant, *b, end]
        learn = [False] * (len(p) + 3) + [True] * (len(b) + 1)
        ids, learn = ids[:width], learn[:width]
        if any(learn[1:]):
            rows.append((ids, learn))
    T = width - 1
    X = np.full((len(rows), T), tok.pad_id, np.int64)
    Y = np.full((len(rows), T), -1, np.int64)
    for r, (ids, learn) in enumerate(rows):
        X[r, :len(ids) - 1] = ids[:-1]
        Y[r, :len(ids) - 1] = np.where(learn[1:], ids[1:], -1)
    state = {k: v.data for k, v in model.state_dict().items()}
    w = state["wte.weight"]
    state["wte.weight"] = np.concatenate([w, np.repeat(w.mean(0, keepdims=True), 4, 0)])
    grown = GPT(GPTConfig.from_dict({**model.config.to_dict(), "vocab_size": 263}))
    grown.load_state_dict(state)
    grown.to("cpu", "float64")
    grown.eval()
    logits = grown(X)[0].numpy().astype(np.float64)           # (N, T, 263)
    m = logits.max(-1, keepdims=True)
    logp = logits - (m + np.log(np.exp(logits - m).sum(-1, keepdims=True)))
    at = Y >= 0
    nll = -np.take_along_axis(logp, np.where(at, Y, 0)[..., None], -1)[..., 0]
    return len(rows), int(at.sum()), float(nll[at].mean())


# ------------------------------------------------------------------------------ 1. the run
def test_sft_on_the_embedded_set_writes_the_run_and_learns(base, ref):
    out, r = ref
    text = r.stdout
    assert text.count(NOTE) == 1, text
    assert re.search(r"^training: \d+ conversations -> \d+ rows, \d+ learned tokens; \d+ "
                     r"truncated to the block, \d+ dropped", text, re.M), text
    held = re.search(r"^held-out: (\d+) conversations -> (\d+) rows, (\d+) learned tokens", text,
                     re.M)
    assert held, text
    m = re.search(r"held-out answer loss: (\d+\.\d+) before \(the base model\) -> (\d+\.\d+) "
                  r"after \(the best checkpoint, step \d+\); on (\d+) of the (\d+) held-out "
                  r"rows \((\d+) answer tokens", text)
    assert m, text
    before, after = float(m.group(1)), float(m.group(2))
    assert after < before - 0.05, text
    for name in ("ckpt/latest", "ckpt/best", "log.jsonl", "loss.png", "summary.json",
                 "chat_template.json", "tokenizer.json", "samples.json"):
        assert (out / name).exists(), name
    assert (out / "loss.png").stat().st_size > 1000
    assert not list(out.glob("*.tmp*"))
    assert "done: step 12" in text and f"tensorlite-gpt chat --out {out}" in text

    # the "before" is the base model's mean loss over every held-out answer token
    rows, tokens, loss = _heldout_reference(base)
    assert (int(held.group(2)), int(held.group(3))) == (rows, tokens)
    assert (int(m.group(3)), int(m.group(4)), int(m.group(5))) == (rows, rows, tokens)
    summary = _strict_json((out / "summary.json").read_text())
    assert abs(summary["baseline"] - loss) <= 1e-9, (summary, loss)
    assert f"{loss:.4f}" == m.group(1)
    assert summary["step"] == 12 and summary["interrupted"] is False
    assert abs(summary["best_val_loss"] - after) <= 5e-5
    assert abs(summary["best_val_loss"] - min(r["val_loss"] for r in _log(out)
                                              if "val_loss" in r)) <= 1e-6

    spec = json.loads((out / "chat_template.json").read_text())
    assert spec["base_vocab_size"] == 259
    assert spec["ids"] == {"<|system|>": 259, "<|user|>": 260, "<|assistant|>": 261,
                           "<|end|>": 262}
    samples = json.loads((out / "samples.json").read_text())
    assert len(samples) == 1 and set(samples[0]) == {"prompt", "base", "tuned", "truth"}
    assert samples[0]["prompt"].rstrip() in text and samples[0]["truth"].rstrip() in text
    recs = _log(out)
    assert [r["step"] for r in recs if "loss" in r] == list(range(1, 13))
    assert [r["step"] for r in recs if "val_loss" in r] == [6, 12]


def test_sample_and_chat_read_the_fine_tuned_run(ref, data, capsys):
    out, _ = ref
    # eval: a fine-tuned run has no prepared data of its own; on prepared data it evaluates
    rc = main(["eval", "--out", str(out), "--eval-steps", "2"])
    cap = capsys.readouterr()
    assert rc == 2 and "--data" in _one_error_line(cap.err, "eval")
    rc = main(["eval", "--out", str(out), "--data", str(data), "--eval-steps", "2"])
    rec = _strict_json(capsys.readouterr().out)
    assert rc == 0 and rec["batches"] == 2 and 0 < rec["val_loss"] < 10
    s = _cli(["sample", "--out", str(out), "--prompt", "def ", "--max-new-tokens", "6",
              "--temperature", "0"])
    assert s.returncode == 0, s.stderr
    assert s.stdout.startswith("def ") and len(s.stdout) > len("def \n")
    args = ["chat", "--out", str(out), "--prompt", CHAT_PROMPT, "--max-new-tokens", "20",
            "--temperature", "0"]
    a, b = _cli(args), _cli(args)
    assert a.returncode == 0 and b.returncode == 0, a.stderr + b.stderr
    assert a.stdout == b.stdout and a.stdout.endswith("\n") and "<|" not in a.stdout
    # greedy decoding written out here, without the KV cache: the template's prompt, then the
    # argmax until <|end|> or 20 tokens
    from gpt.run_folder import load_run
    model, tok, _ = load_run(out)
    model.eval()
    ids = [260, *tok.base.encode(CHAT_PROMPT), 262, 261]
    new = []
    for _ in range(20):
        t = int(np.argmax(model(np.array([ids + new]))[0].numpy()[0, -1]))
        if t == 262:
            break
        new.append(t)
    assert a.stdout == tok.base.decode(new) + "\n"
    assert new, "the tuned model answered nothing at all"


# ------------------------------------------------------------------------------ 2. resume
def test_sft_killed_and_resumed_logs_what_the_uninterrupted_run_logs(base, ref, tmp_path):
    out, r_ref = ref
    cut = tmp_path / "cut"
    k = _cli(["sft", "--base", str(base), "--out", str(cut), *SFT, *REF],
             env={"TENSORLITE_TEST_KILL_AT_STEP": "7"})
    assert k.returncode == -signal.SIGKILL, k.stderr
    assert max(r["step"] for r in _log(cut)) == 7          # it died mid-run, after step 7
    again = _cli(["sft", "--out", str(cut), "--resume", "--no-progress"])   # the run's own options
    assert again.returncode == 0, again.stderr
    assert "resumed at step 4" in again.stdout
    assert NOTE not in again.stdout                        # the run's tokenizer has them already
    assert _numbers(cut) == _numbers(out)
    _same_numbers(_numbers(cut), _numbers(out), 1e-12)
    # the same "before" (saved with the run) and "after", and the same greedy completions
    line = [x for x in r_ref.stdout.splitlines() if x.startswith("held-out answer loss")]
    assert line and line[0] in again.stdout.splitlines(), again.stdout
    assert json.loads((cut / "samples.json").read_text()) == \
        json.loads((out / "samples.json").read_text())


# ------------------------------------------------------------------------------ 3. layouts
@pytest.mark.parametrize("n,layout", [
    pytest.param(1, ["--batch-size", "16", "--grad-accum", "1"], id="one process, batch 16"),
    pytest.param(2, ["--dp", "2", "--batch-size", "8", "--grad-accum", "2"], id="dp 2",
                 marks=needs_mpi),
    pytest.param(2, ["--tp", "2", "--batch-size", "8", "--grad-accum", "2"], id="tp 2",
                 marks=needs_mpi),
    pytest.param(2, ["--pp", "2", "--batch-size", "8", "--grad-accum", "2"], id="pp 2",
                 marks=needs_mpi),
    pytest.param(2, ["--dp", "2", "--zero", "1", "--batch-size", "8", "--grad-accum", "2"],
                 id="dp 2 zero 1", marks=needs_mpi),
])
def test_every_layout_logs_what_one_process_logs(base, functions_file, file_ref, tmp_path, n,
                                                 layout):
    """Micro-batches hold different numbers of answer tokens: the step's loss (and gradient)
    is the mean over all of them only when each micro-batch's mean is weighted by its share,
    over the accumulation steps and over the ranks. Batch 16 in one step reads the same rows
    as two micro-batches of 8."""
    r = _cli(["sft", "--base", str(base), "--data", str(functions_file),
              "--out", str(tmp_path / "par"), *SFT, "--samples", "0", *layout], n=n)
    assert r.returncode == 0, r.stderr
    _same_numbers(_numbers(file_ref), _numbers(tmp_path / "par"), 1e-10)
    assert len(_numbers(file_ref)) == 14
    assert r.stdout.count(NOTE) == 1 and r.stdout.count("done: step 12") == 1
    assert r.stdout.count("held-out answer loss") == 1


def test_a_plain_mean_of_micro_batches_would_be_caught(base, functions_file, file_ref, tmp_path,
                                                       monkeypatch, capsys):
    """What makes the layout tests able to fail: on these rows, weighting each micro-batch by
    1 / grad_accum (a mean of means, as pretraining does) gives another loss at the very first
    step (before any update) than the mean over the step's answer tokens."""
    from gpt.align.sft import SFTTrainer
    monkeypatch.setattr(SFTTrainer, "_micro_weights", lambda self, b: [1.0 / len(b)] * len(b))
    rc = main(["sft", "--base", str(base), "--data", str(functions_file),
               "--out", str(tmp_path / "mean"), *SFT, "--batch-size", "8", "--grad-accum", "2",
               "--samples", "0", "--max-steps", "1", "--warmup-steps", "0"])
    assert rc == 0, capsys.readouterr().err
    first = [r["loss"] for r in _log(tmp_path / "mean") if "loss" in r][0]
    want = [r["loss"] for r in _log(file_ref) if "loss" in r][0]
    assert abs(first - want) > 1e-3, (first, want)


# ------------------------------------------------------------------------------ 4. mistakes
def test_a_second_sft_into_a_run_is_refused_and_touches_nothing(base, ref, tmp_path):
    run = tmp_path / "sft"
    shutil.copytree(ref[0], run)
    before = _tree_state(run)
    r = _cli(["sft", "--base", str(base), "--out", str(run), *SFT, *REF])
    assert r.returncode == 2 and r.stdout == ""
    line = _one_error_line(r.stderr)
    assert f"{run} already holds a run (a checkpoint at step 12 of 12" in line
    assert "--resume" in line and "--overwrite" in line
    assert _tree_state(run) == before


def test_overwrite_replaces_the_run(base, ref, tmp_path, capsys):
    run = tmp_path / "sft"
    shutil.copytree(ref[0], run)
    (run / "notes.txt").write_text("mine")
    rc = main(["sft", "--base", str(base), "--out", str(run), *SFT, "--batch-size", "4",
               "--max-steps", "3", "--eval-interval", "3", "--samples", "0", "--overwrite"])
    assert rc == 0, capsys.readouterr().err
    assert max(r["step"] for r in _log(run)) == 3          # the old log (steps 1-12) is gone
    assert not (run / "samples.json").exists()              # the old run's, not this one's
    from nn.checkpoint import load_checkpoint
    assert load_checkpoint(run / "ckpt" / "latest")["extra"]["step"] == 3
    assert (run / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("kind", ["missing", "prepared data", "empty folder"])
def test_a_base_that_is_not_a_run_is_one_line(kind, base, data, tmp_path, capsys):
    where = {"missing": tmp_path / "nope", "prepared data": data,
             "empty folder": tmp_path / "empty"}[kind]
    if kind == "empty folder":
        where.mkdir()
    msg = {"missing": f"--base {where} does not exist",
           "prepared data": f"--base {where} is a prepared data folder, not a run",
           "empty folder": f"no checkpoint at {where / 'ckpt'}: --base must be a trained run"}[kind]
    rc = main(["sft", "--base", str(where), "--out", str(tmp_path / "out"), *SFT])
    cap = capsys.readouterr()
    assert rc == 2 and msg in _one_error_line(cap.err) and cap.out == ""
    assert not (tmp_path / "out").exists()


def _jsonl_lines(n):
    """``n`` short examples: prompt/response pairs, and every fifth in the messages format
    (a system message, two turns)."""
    lines = []
    for i in range(n):
        if i % 5 == 4:
            lines.append(json.dumps({"messages": [
                {"role": "system", "content": "Python."},
                {"role": "user", "content": f"x{i} = ?"},
                {"role": "assistant", "content": f"x{i} = {i}\n"},
                {"role": "user", "content": f"def g{i}():"},
                {"role": "assistant", "content": f"    return {i}\n"}]}))
        else:
            lines.append(json.dumps({"prompt": f'def f{i}(x):\n    """x + {i}."""\n',
                                     "response": f"    return x + {i}\n"}))
    return lines


def test_a_missing_data_file_is_one_line(base, tmp_path, capsys):
    rc = main(["sft", "--base", str(base), "--data", str(tmp_path / "no.jsonl"),
               "--out", str(tmp_path / "out"), *SFT])
    cap = capsys.readouterr()
    assert rc == 2 and f"'{tmp_path / 'no.jsonl'}' does not exist" in _one_error_line(cap.err)
    assert not (tmp_path / "out").exists()


def test_malformed_lines_are_skipped_and_named_or_stop_under_strict(base, tmp_path, capsys):
    lines = _jsonl_lines(30)
    lines[2] = "{not json"
    lines[5] = json.dumps({"messages": [{"role": "robot", "content": "hi"},
                                        {"role": "assistant", "content": "x"}]})
    lines[8] = json.dumps({"prompt": "p", "response": ""})
    f = tmp_path / "bad.jsonl"
    f.write_text("\n".join(lines) + "\n")
    rc = main(["sft", "--base", str(base), "--data", str(f), "--out", str(tmp_path / "a"), *SFT,
               "--batch-size", "4", "--max-steps", "2", "--eval-interval", "2", "--samples",
               "0"])
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    report = [x for x in cap.out.splitlines() if x.startswith("read ")]
    assert len(report) == 1, cap.out
    assert report[0].startswith(f"read 30 lines of {f}: kept 27, skipped 3 (line 3: not JSON")
    assert "line 6: message 0: role 'robot' is not one of the known roles" in report[0]
    assert report[0].endswith("line 9: 'response' is empty)")
    assert re.search(r"^training: (\d+) conversations", cap.out, re.M)
    n_train = int(re.search(r"^training: (\d+) conversations", cap.out, re.M).group(1))
    n_held = int(re.search(r"^held-out: (\d+) conversations", cap.out, re.M).group(1))
    assert n_train + n_held == 27

    rc = main(["sft", "--base", str(base), "--data", str(f), "--out", str(tmp_path / "b"), *SFT,
               "--strict"])
    cap = capsys.readouterr()
    line = _one_error_line(cap.err)
    assert rc == 2 and f"{f} line 3: not JSON" in line and "--strict" in line
    assert "line 6" not in line and "line 9" not in line
    assert not (tmp_path / "b").exists()


def test_too_few_lines_for_a_held_out_split_is_one_line(base, tmp_path, capsys):
    f = tmp_path / "few.jsonl"
    f.write_text("\n".join(_jsonl_lines(2)) + "\n")
    rc = main(["sft", "--base", str(base), "--data", str(f), "--out", str(tmp_path / "out"),
               *SFT])
    cap = capsys.readouterr()
    line = _one_error_line(cap.err)
    assert rc == 2 and "2 conversations give 2 to train on and 0 held out" in line
    assert "give more lines" in line
    assert not (tmp_path / "out").exists()


def test_rows_that_hold_no_answer_token_in_the_block_are_one_line(base, tmp_path, capsys):
    f = tmp_path / "long.jsonl"
    f.write_text("".join(json.dumps({"prompt": "p" * 80, "response": "r"}) + "\n"
                         for _ in range(30)))
    rc = main(["sft", "--base", str(base), "--data", str(f), "--out", str(tmp_path / "out"),
               *SFT])
    cap = capsys.readouterr()
    line = _one_error_line(cap.err)
    assert rc == 2 and "no training conversation fits" in line and "27 dropped" in line
    assert not (tmp_path / "out").exists()


@needs_mpi
def test_a_data_error_under_mpiexec_is_one_line(base, tmp_path):
    f = tmp_path / "bad.jsonl"
    f.write_text("\n".join(["{not json", *_jsonl_lines(20)]) + "\n")
    r = _cli(["sft", "--base", str(base), "--data", str(f), "--out", str(tmp_path / "out"),
              *SFT, "--strict", "--dp", "2"], n=2)
    assert r.returncode == 2
    assert f"{f} line 1: not JSON" in _one_error_line(r.stderr)
    assert "Abort" not in r.stderr and not (tmp_path / "out").exists()


def _killed_run_on_a_file_then_edited(base, tmp_path):
    """(sft arguments, file, run): a run on a JSONL file killed after step 5 (checkpoint at
    step 4), then its file's first line edited."""
    f = tmp_path / "mine.jsonl"
    lines = _jsonl_lines(30)
    f.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    args = ["sft", "--base", str(base), "--data", str(f), "--out", str(out), *SFT,
            "--batch-size", "4", "--samples", "0"]
    k = _cli(args, env={"TENSORLITE_TEST_KILL_AT_STEP": "5"})
    assert k.returncode == -signal.SIGKILL, k.stderr
    f.write_text("\n".join([json.dumps({"prompt": "changed", "response": "x"}), *lines[1:]])
                 + "\n")
    return args, f, out


def test_resume_on_a_changed_data_file_is_refused_and_touches_nothing(base, tmp_path, capsys):
    args, _, out = _killed_run_on_a_file_then_edited(base, tmp_path)
    before = _tree_state(out)
    rc = main([*args, "--resume"])
    line = _one_error_line(capsys.readouterr().err)
    assert rc == 2 and "--resume" in line and "changed since the run" in line
    assert _tree_state(out) == before


def test_resume_on_a_changed_data_file_does_not_advise_the_same_file(base, tmp_path, capsys):
    args, f, _ = _killed_run_on_a_file_then_edited(base, tmp_path)
    rc = main([*args, "--resume"])
    line = _one_error_line(capsys.readouterr().err)
    assert rc == 2 and f"pass --data {f}" not in line, line


def test_sft_never_overwrites_its_own_base(base, functions_file, tmp_path, capsys):
    run = tmp_path / "base"
    shutil.copytree(base, run)
    before = _tree_state(run)
    rc = main(["sft", "--base", str(run), "--out", str(run), "--data", str(functions_file),
               *SFT, "--batch-size", "4", "--max-steps", "2", "--eval-interval", "2",
               "--warmup-steps", "0", "--samples", "0", "--overwrite"])
    cap = capsys.readouterr()
    assert rc == 2 and "--base" in _one_error_line(cap.err)
    assert _tree_state(run) == before


def test_sft_resume_on_a_pretraining_run_says_what_it_is(base, tmp_path, capsys):
    run = tmp_path / "base"
    shutil.copytree(base, run)
    before = _tree_state(run)
    rc = main(["sft", "--out", str(run), "--resume", *SFT])
    line = _one_error_line(capsys.readouterr().err)
    assert _tree_state(run) == before
    assert rc == 2 and "is a directory" not in line and "pretrain" in line, line


def test_chat_refuses_a_pretrained_run_and_bad_options(base, ref, capsys):
    out, _ = ref
    rc = main(["chat", "--out", str(base), "--prompt", "hi"])
    line = _one_error_line(capsys.readouterr().err, "chat")
    assert rc == 2 and "without the chat template" in line
    assert f"run tensorlite-gpt sft --base {base} first" in line
    for extra, msg in ((["--prompt", ""], "--prompt is empty"),
                       (["--prompt", "   "], "--prompt is empty"),
                       (["--prompt", "hi", "--temperature", "-1"],
                        "--temperature must be a finite number >= 0 (0 = greedy), got -1.0")):
        rc = main(["chat", "--out", str(out), *extra])
        cap = capsys.readouterr()
        assert rc == 2 and msg in _one_error_line(cap.err, "chat") and cap.out == ""


# ------------------------------------------------------------------------------ 5. --data
def _heldout(line_no, percent=10):
    """The documented split of --data files: a line is held out by a hash of its number."""
    return int(hashlib.sha256(str(line_no).encode()).hexdigest(), 16) % 100 < percent


def test_sft_on_a_jsonl_file_learns(base, tmp_path, capsys):
    lines = _jsonl_lines(40)
    f = tmp_path / "mine.jsonl"
    f.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    rc = main(["sft", "--base", str(base), "--data", str(f), "--out", str(out), *SFT,
               "--batch-size", "8", "--max-steps", "30", "--eval-interval", "10",
               "--samples", "0"])
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    assert "read " not in cap.out                   # nothing skipped, nothing to report
    # learned tokens: each answer's bytes and its <|end|> (every row fits the block)
    learned = {True: 0, False: 0}
    count = {True: 0, False: 0}
    for k, line in enumerate(lines, start=1):
        rec = json.loads(line)
        answers = ([m["content"] for m in rec["messages"] if m["role"] == "assistant"]
                   if "messages" in rec else [rec["response"]])
        learned[_heldout(k)] += sum(len(a.encode()) + 1 for a in answers)
        count[_heldout(k)] += 1
    assert count[True] and count[False]
    assert (f"training: {count[False]} conversations -> {count[False]} rows, {learned[False]} "
            f"learned tokens; 0 truncated to the block, 0 dropped") in cap.out
    assert (f"held-out: {count[True]} conversations -> {count[True]} rows, {learned[True]} "
            f"learned tokens; 0 truncated") in cap.out
    summary = _strict_json((out / "summary.json").read_text())
    vals = [r["val_loss"] for r in _log(out) if "val_loss" in r]
    assert len(vals) == 3 and vals[-1] < vals[0] < summary["baseline"]
    assert summary["best_val_loss"] < 0.7 * summary["baseline"], summary


# ------------------------------------------------------------------------------ dpo
def test_dpo_from_the_sft_run_raises_the_margin_and_guards_its_resume(ref, tmp_path, capsys):
    sft_run, _ = ref
    out = tmp_path / "dpo"
    args = ["dpo", "--base", str(sft_run), "--out", str(out), "--max-chars", str(MAX_CHARS),
            "--max-steps", "8", "--eval-interval", "4", "--eval-steps", "4", "--batch-size", "8",
            "--lr", "3e-3", "--warmup-steps", "1", "--log-interval", "1", "--dtype", "float64",
            "--no-progress"]
    r = _cli(args)
    assert r.returncode == 0, r.stderr
    m = re.search(r"held-out pairs \((\d+) of (\d+); the reference -> the tuned model at step "
                  r"(\d+)\): reward margin 0\.0000 -> (-?\d+\.\d+), reward accuracy 0\.0% -> "
                  r"(\d+\.\d)%", r.stdout)
    assert m, r.stdout
    assert int(m.group(1)) == 32 and float(m.group(4)) > 0 and float(m.group(5)) > 0
    recs = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    assert [r_["step"] for r_ in recs if "val_margin" in r_] == [4, 8]
    assert all("margin" in r_ and "accuracy" in r_ for r_ in recs if "loss" in r_)
    # a changed --beta on resume names itself, and nothing is written
    before = _tree_state(out)
    rc = main(["dpo", "--out", str(out), "--resume", "--max-steps", "10", "--beta", "0.5"])
    line = _one_error_line(capsys.readouterr().err, "dpo")
    assert rc == 2 and "--beta 0.5 (the run had 0.1)" in line
    assert _tree_state(out) == before
