"""A Hugging Face GPT-2 folder wherever the command reads a run: sample, eval, chat, sft
--base (then chat, export, and chat on the export, which must answer as the run did)."""
import json
import re
from pathlib import Path

import pytest

from gpt.cli import main

from test_hf import hf_folder_with_tokenizer

pytest.importorskip("tokenizers")

SFT = ["--max-steps", "6", "--eval-interval", "3", "--eval-steps", "2", "--batch-size", "4",
       "--warmup-steps", "0", "--samples", "1", "--sample-tokens", "8", "--no-progress",
       "--dtype", "float64", "--heldout-percent", "25"]
PROMPT = "def f(x):"


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return hf_folder_with_tokenizer(tmp_path_factory.mktemp("hf") / "gpt2")[0]


@pytest.fixture(scope="module")
def chats(tmp_path_factory):
    f = tmp_path_factory.mktemp("data") / "chats.jsonl"
    rows = [{"prompt": f"def f{i}(x):", "response": f"    return x + {i}\n"} for i in range(40)]
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return f


def _err(capsys, command):
    cap = capsys.readouterr()
    lines = [ln for ln in cap.err.splitlines() if ln.startswith(f"tensorlite-gpt {command}: error:")]
    assert len(lines) == 1 and "Traceback" not in cap.err, cap.err
    return lines[0]


def test_sample_reads_a_folder(folder, capsys):
    args = ["sample", "--out", str(folder), "--prompt", PROMPT, "--max-new-tokens", "6",
            "--temperature", "0"]
    assert main(args) == 0
    first = capsys.readouterr().out
    assert first.startswith(PROMPT) and main(args) == 0
    assert capsys.readouterr().out == first               # greedy: the same text again


def test_eval_and_chat_on_a_plain_folder_say_what_is_missing(folder, capsys):
    assert main(["eval", "--out", str(folder)]) == 2
    assert "Hugging Face model folder" in _err(capsys, "eval")
    assert main(["chat", "--out", str(folder), "--prompt", "hi"]) == 2
    assert "without the chat template" in _err(capsys, "chat")


def test_sft_from_a_folder_then_export_answers_the_same(folder, chats, tmp_path, capsys):
    run = tmp_path / "sft"
    assert main(["sft", "--base", str(folder), "--data", str(chats), "--out", str(run), *SFT]) == 0
    out = capsys.readouterr().out
    assert "added <|system|>" in out and "held-out answer loss" in out
    m = re.search(r"held-out answer loss: ([\d.]+) before .* -> ([\d.]+) after", out)
    assert float(m.group(2)) < float(m.group(1))
    chat = ["chat", "--prompt", "def f3(x):", "--temperature", "0", "--max-new-tokens", "8"]
    assert main([*chat, "--out", str(run)]) == 0
    answer = capsys.readouterr().out
    hf = tmp_path / "exported"
    assert main(["export", "--out", str(run), "--to", str(hf)]) == 0
    capsys.readouterr()
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in hf.iterdir()}
    cfg = json.loads((hf / "config.json").read_text())
    assert cfg["architectures"] == ["GPT2LMHeadModel"] and cfg["vocab_size"] == json.loads(
        (folder / "config.json").read_text())["vocab_size"] + 4
    assert main([*chat, "--out", str(hf)]) == 0
    assert capsys.readouterr().out == answer             # the export is the same model
    # a second export into the same folder is refused, --overwrite replaces it
    assert main(["export", "--out", str(run), "--to", str(hf)]) == 2
    assert "--overwrite" in _err(capsys, "export")
    assert main(["export", "--out", str(run), "--to", str(hf), "--overwrite"]) == 0
    # and the exported folder is a base for another fine-tuning
    again = tmp_path / "sft2"
    assert main(["sft", "--base", str(hf), "--data", str(chats), "--out", str(again), *SFT]) == 0
    assert "added <|system|>" not in capsys.readouterr().out   # it has the chat tokens


def test_export_refuses_what_is_not_a_run_and_never_writes_into_one(folder, tmp_path, capsys):
    assert main(["export", "--out", str(tmp_path / "nope"), "--to", str(tmp_path / "x")]) == 2
    assert "does not exist" in _err(capsys, "export")
    assert not (tmp_path / "x").exists()
    assert main(["export", "--out", str(folder), "--to", str(tmp_path / "y")]) == 0  # HF -> HF
    capsys.readouterr()
    assert sorted(p.name for p in (tmp_path / "y").iterdir()) == sorted(
        p.name for p in Path(folder).iterdir())
