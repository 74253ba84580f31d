"""gpt.prepare: the whole pipeline on a small user folder and on a slice of the stdlib."""

import json

import numpy as np
import pytest

from gpt import prepare as prepare_module
from gpt.errors import DataError, DataFileNotFoundError
from gpt.prepare import ensure_prepared, is_prepared, load_prepared, prepare, read_meta
from gpt.shards import read_shard

WORDS = [f"name{i}" for i in range(500)] + ["def", "return", "class", "self", "if", "for", "in"]


def code_like(seed: int, n_lines: int = 60) -> str:
    rng = np.random.default_rng(seed)
    lines = []
    for _ in range(n_lines):
        w = rng.choice(WORDS, size=5)
        indent = "    " * int(rng.integers(0, 3))
        lines.append(f"{indent}{w[0]} = {w[1]}({w[2]}, {w[3]}) + {w[4]}")
    return "\n".join(lines) + "\n"


@pytest.fixture
def user_dir(tmp_path):
    root = tmp_path / "mycode"
    root.mkdir()
    for i in range(12):
        (root / f"mod{i:02d}.py").write_text(code_like(i))
    base = code_like(0).split("\n")
    base[10] = base[10].replace("=", "= changed +", 1)  # a near-duplicate of mod00: one line edited
    (root / "zz_near_copy.py").write_text("\n".join(base))
    (root / "zz_exact_copy.py").write_text(code_like(1) + "   \n")  # trailing whitespace only
    latin = ("# caf\xe9: one latin-1 byte in a long file\n" + code_like(99)).encode("latin-1")
    (root / "latin1.py").write_bytes(latin)
    (root / "logo.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\x0dIHDR")
    (root / "empty.py").write_text("")
    (root / ".git").mkdir()
    (root / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    return root


def decoded_documents(tok, path):
    ids = np.asarray(read_shard(path), dtype=np.int64)
    cuts = np.flatnonzero(ids == tok.eos_id)
    assert len(cuts) and cuts[-1] == len(ids) - 1  # every document ends with eos
    documents = np.split(ids, cuts + 1)[:-1]  # each ends with its eos
    return [tok.decode(doc[:-1]) for doc in documents]


def test_prepare_user_directory(user_dir, tmp_path, capsys):
    out = tmp_path / "prepared"
    meta = prepare(user_dir, out, tokenizer="bpe", vocab_size=350, val_fraction=0.2, seed=1)
    assert sorted(p.name for p in out.iterdir()) == ["meta.json", "report.json", "tokenizer.model", "train.bin", "val.bin"]
    report = json.loads((out / "report.json").read_text())

    assert report["corpus"]["files_read"] == 17 and report["corpus"]["skipped_binary"] == 1
    assert report["corpus"]["non_utf8_replaced"] == 1
    assert report["clean"]["dropped"]["too_short"] == 1  # empty.py
    dups = {(d["removed"], d["kept"], d["kind"]) for d in report["dedup"]["duplicates"]}
    assert dups == {("mycode/zz_exact_copy.py", "mycode/mod01.py", "exact"), ("mycode/zz_near_copy.py", "mycode/mod00.py", "near")}
    assert report["split"] == {"train_documents": 10, "val_documents": 3, "val_fraction": 0.2, "seed": 1,
                               "single_document_split": False}
    printed = capsys.readouterr().out
    assert "near duplicates 1" in printed and "exact duplicates 1" in printed and "train" in printed

    loaded_meta, tok, train_path, val_path = load_prepared(out)
    assert loaded_meta == meta == read_meta(out)
    assert meta["vocab_size"] == tok.vocab_size == 350 and meta["tokenizer"]["kind"] == "bpe"
    assert meta["dtype"] == "uint16" and meta["corpus"]["files"] == 17
    assert meta["train"]["tokens"] == len(read_shard(train_path)) and meta["val"]["documents"] == 3

    # the shards hold exactly the kept documents, each followed by eos, losslessly
    docs = decoded_documents(tok, train_path) + decoded_documents(tok, val_path)
    expected = [code_like(i) for i in range(12)] + [("# caf\ufffd: one latin-1 byte in a long file\n" + code_like(99))]
    assert sorted(docs) == sorted(expected)


def test_is_prepared_ensure_prepared_and_fingerprint(user_dir, tmp_path):
    out = tmp_path / "p"
    options = dict(tokenizer="byte", val_fraction=0.1, progress=False)
    assert not is_prepared(out, user_dir, **options)
    meta = ensure_prepared(user_dir, out, **options)
    assert meta["tokenizer"]["file"] == "tokenizer.json" and meta["vocab_size"] == 259
    assert is_prepared(out, user_dir, tokenizer="byte", val_fraction=0.1)
    assert not is_prepared(out, user_dir, tokenizer="byte", val_fraction=0.2)
    assert not is_prepared(out, user_dir, tokenizer="byte", val_fraction=0.1, clean={"min_chars": 5})
    stamp = (out / "meta.json").stat().st_mtime_ns
    ensure_prepared(user_dir, out, **options)
    assert (out / "meta.json").stat().st_mtime_ns == stamp  # reused, not rebuilt
    (user_dir / "mod03.py").write_text(code_like(1234))  # the input changed
    assert not is_prepared(out, user_dir, tokenizer="byte", val_fraction=0.1)
    assert is_prepared(out, user_dir, tokenizer="byte", val_fraction=0.1, check_fingerprint=False)
    ensure_prepared(user_dir, out, **options)
    assert is_prepared(out, user_dir, tokenizer="byte", val_fraction=0.1)
    with pytest.raises(DataError, match=r"unknown prepare option\(s\) \['vocab'\]"):
        is_prepared(out, user_dir, vocab=3)
    # switching the tokenizer kind replaces the tokenizer file
    prepare(user_dir, out, tokenizer="char", vocab_size=4096, progress=False)
    assert (out / "tokenizer.model").exists() and not (out / "tokenizer.json").exists()


def test_incomplete_or_missing_folders_say_how_to_fix(user_dir, tmp_path, monkeypatch):
    with pytest.raises(DataFileNotFoundError, match=r"data folder .*nowhere is not prepared .*run `tensorlite-gpt prepare --out .*nowhere`"):
        load_prepared(tmp_path / "nowhere")
    out = tmp_path / "p"
    prepare(user_dir, out, tokenizer="byte", progress=False)
    (out / "val.bin").unlink()
    with pytest.raises(DataFileNotFoundError, match=r"val\.bin is missing\): run `tensorlite-gpt prepare --out"):
        load_prepared(out)
    assert not is_prepared(out, user_dir, tokenizer="byte")

    # a crash while writing leaves a folder without meta.json: "not prepared", never half-valid
    prepare(user_dir, out, tokenizer="byte", progress=False)

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(prepare_module.ShardWriter, "write", crash)
    with pytest.raises(OSError, match="disk full"):
        prepare(user_dir, out, tokenizer="byte", progress=False)
    with pytest.raises(DataFileNotFoundError, match="no meta.json"):
        load_prepared(out)
    assert not any(p.name.endswith(".tmp") for p in out.iterdir())

    (out / "meta.json").write_text("{broken")
    with pytest.raises(DataError, match="meta.json is not valid JSON"):
        load_prepared(out)


def test_corrupt_shard_is_reported(user_dir, tmp_path):
    out = tmp_path / "p"
    prepare(user_dir, out, tokenizer="byte", progress=False)
    raw = (out / "train.bin").read_bytes()
    (out / "train.bin").write_bytes(raw[:-1])
    with pytest.raises(DataError, match=r"train\.bin is truncated or corrupt"):
        load_prepared(out)


def test_empty_corpus_and_bad_inputs_are_clear_errors(tmp_path):
    (tmp_path / "tiny").mkdir()
    (tmp_path / "tiny" / "a.txt").write_text("hi\n")
    with pytest.raises(DataError, match=r"no documents left to train on.*too_short.*min_chars"):
        prepare(tmp_path / "tiny", tmp_path / "out", progress=False)
    assert not (tmp_path / "out" / "meta.json").exists()
    with pytest.raises(FileNotFoundError, match="does not exist"):
        prepare(tmp_path / "missing", tmp_path / "out", progress=False)
    with pytest.raises(DataError, match="tokenizer='gpt2'"):
        prepare(tmp_path / "tiny", tmp_path / "out", tokenizer="gpt2", progress=False)
    with pytest.raises(DataError, match=r"unknown clean option\(s\) \['min_length'\]"):
        prepare(tmp_path / "tiny", tmp_path / "out", clean={"min_length": 1}, progress=False)


def test_single_document_is_split_at_a_line(tmp_path):
    text = "".join(f"line {i}: {'x' * (i % 17)}\n" for i in range(400))
    (tmp_path / "input.txt").write_text(text)
    out = tmp_path / "p"
    meta = prepare(tmp_path / "input.txt", out, tokenizer="char", vocab_size=300, val_fraction=0.1, progress=False)
    _, tok, train_path, val_path = load_prepared(out)
    (train,), (val,) = decoded_documents(tok, train_path), decoded_documents(tok, val_path)
    assert train + val == text and train.endswith("\n") and val.startswith("line ")
    assert 0.05 < len(val) / len(text) < 0.15
    assert meta["train"]["documents"] == meta["val"]["documents"] == 1


def test_jsonl_input(tmp_path):
    rows = [{"content": code_like(i, 20)} for i in range(6)] + [{"other": 1}]
    (tmp_path / "data.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    meta = prepare(tmp_path / "data.jsonl", tmp_path / "p", tokenizer="byte", text_field="content", progress=False)
    report = json.loads((tmp_path / "p" / "report.json").read_text())
    assert report["corpus"]["documents"] == 6 and report["corpus"]["jsonl_missing_field"] == 1
    assert meta["train"]["documents"] + meta["val"]["documents"] == 6


def test_default_corpus_subset(tmp_path):
    out = tmp_path / "stdlib"
    meta = prepare(None, out, tokenizer="bpe", vocab_size=600, max_files=40, progress=False)
    assert meta["corpus"]["files"] == 40 and meta["options"]["data"] is None
    assert meta["train"]["tokens"] > 50_000 and meta["val"]["documents"] >= 1
    assert is_prepared(out, None, tokenizer="bpe", vocab_size=600, max_files=40)
    assert not is_prepared(out, None, tokenizer="bpe", vocab_size=600, max_files=41)
    _, tok, train_path, _ = load_prepared(out)
    assert tok.decode(np.asarray(read_shard(train_path)[:200])).strip()  # real text comes back


def test_output_folder_inside_the_input_is_not_read_back(user_dir):
    out = user_dir / "prepared"
    first = prepare(user_dir, out, tokenizer="byte", progress=False)
    second = prepare(user_dir, out, tokenizer="byte", progress=False)
    assert second["corpus"] == first["corpus"] and second["train"] == first["train"]
    assert is_prepared(out, user_dir, tokenizer="byte")
