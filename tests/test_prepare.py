"""gpt.data.prepare: the whole pipeline on a small user folder and on a slice of the stdlib."""

import json

import numpy as np
import pytest

from gpt.data import prepare as prepare_module
from gpt.data.errors import DataError, DataFileNotFoundError
from gpt.data.prepare import ensure_prepared, is_prepared, load_prepared, prepare, read_meta
from gpt.data.shards import read_shard

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
    # switching the tokenizer kind (with overwrite: other options) replaces the tokenizer file
    prepare(user_dir, out, tokenizer="char", vocab_size=4096, overwrite=True, progress=False)
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

    # a crash while writing leaves the previous preparation as it was, and no half-written folder
    prepare(user_dir, out, tokenizer="byte", progress=False)
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def crash(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(prepare_module.ShardWriter, "write", crash)
    with pytest.raises(DataError, match=r"cannot write the prepared data to --out .*/p: No space left on device"):
        prepare(user_dir, out, tokenizer="byte", progress=False)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    load_prepared(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mycode", "p"]  # no .p.partial-* left behind
    monkeypatch.undo()

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
    with pytest.raises(DataError, match=r"no documents left to train on.*too_short.*--min-chars \(now 32\)"):
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


# ----------------------------------------------------------------------------- the CLI: --out is sacred

import os  # noqa: E402
import re  # noqa: E402

from gpt.cli import build_parser, main  # noqa: E402


def cli_prepare(capsys, *args):
    """Run `tensorlite-gpt prepare ARGS`; (exit status, stdout, stderr)."""
    rc = main(["prepare", *map(str, args)])
    out, err = capsys.readouterr()
    return rc, out, err


def one_error_line(err: str) -> str:
    """The CLI's error: one line on stderr, no traceback (a cleared progress bar may precede it)."""
    assert err.count("\n") == 1 and "Traceback" not in err, err
    line = err.split("\r")[-1].strip()
    assert line.startswith("tensorlite-gpt prepare: error: "), err
    return line


def prepare_flags() -> set[str]:
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    return {s for a in sub.choices["prepare"]._actions for s in a.option_strings}


def assert_flags_exist(message: str) -> None:
    """Every --flag a message advises is an option of `tensorlite-gpt prepare`."""
    named = set(re.findall(r"--[a-z][a-z-]*", message))
    assert named <= prepare_flags(), named - prepare_flags()


def snapshot(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_cli_prepare_refuses_an_out_folder_prepared_from_other_data_or_options(user_dir, tmp_path, capsys):
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text(code_like(7))
    out = tmp_path / "prepared"
    assert cli_prepare(capsys, "--data", user_dir, "--out", out, "--tokenizer", "char", "--vocab-size", "300")[0] == 0
    before = snapshot(out)

    rc, _, err = cli_prepare(capsys, "--data", other, "--out", out, "--tokenizer", "char", "--vocab-size", "300")
    line = one_error_line(err)
    assert rc == 2 and snapshot(out) == before
    assert f"--out {out} already holds data prepared from {user_dir} (char tokenizer, vocab" in line
    assert f"data ({user_dir} there, {other} now)" in line and "--overwrite" in line
    assert_flags_exist(line)

    rc, _, err = cli_prepare(capsys, "--data", user_dir, "--out", out, "--tokenizer", "byte")
    assert rc == 2 and 'tokenizer ("char" there, "byte" now)' in one_error_line(err) and snapshot(out) == before
    rc, _, err = cli_prepare(capsys, "--data", user_dir, "--out", out, "--tokenizer", "char", "--vocab-size", "300",
                             "--min-chars", "5")
    assert rc == 2 and "clean.min_chars (32 there, 5 now)" in one_error_line(err) and snapshot(out) == before

    # the same data and options again: nothing to do
    rc, printed, err = cli_prepare(capsys, "--data", user_dir, "--out", out, "--tokenizer", "char", "--vocab-size", "300")
    assert rc == 0 and "already prepared" in printed and "--overwrite" in printed and err == ""
    assert snapshot(out) == before

    # --overwrite replaces it
    rc, _, _ = cli_prepare(capsys, "--data", other, "--out", out, "--tokenizer", "byte", "--overwrite")
    assert rc == 0 and read_meta(out)["options"]["data"] == [str(other)]
    assert sorted(snapshot(out)) == ["meta.json", "report.json", "tokenizer.json", "train.bin", "val.bin"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mycode", "other", "prepared"]  # no temporary folders


def test_cli_prepare_never_replaces_a_users_files_without_overwrite(user_dir, tmp_path, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("precious")
    (mine / "train.bin").write_bytes(b"nanoGPT tokens")  # same name as ours, not ours
    rc, _, err = cli_prepare(capsys, "--data", user_dir, "--out", mine, "--tokenizer", "byte")
    line = one_error_line(err)
    assert rc == 2 and "is not empty and is not a prepared data folder (it holds thesis.tex, train.bin)" in line
    assert "--overwrite" in line and "another --out" in line
    assert_flags_exist(line)
    assert snapshot(mine) == {"thesis.tex": b"precious", "train.bin": b"nanoGPT tokens"}

    # a preparation of the same data, with a file of the user's added: preparing again would delete it
    out = tmp_path / "p"
    assert cli_prepare(capsys, "--data", user_dir, "--out", out, "--tokenizer", "byte")[0] == 0
    (out / "notes.md").write_text("mine")
    rc, _, err = cli_prepare(capsys, "--data", user_dir, "--out", out, "--tokenizer", "byte",
                             "--overwrite")      # only --overwrite replaces what is not prepare's
    assert rc == 0 and not (out / "notes.md").exists()
    (out / "notes.md").write_text("mine")
    (out / "notes.md").unlink()
    before = snapshot(out)
    (user_dir / "mod00.py").write_text(code_like(4321))  # the input changed: refused, not redone
    rc, _, err = cli_prepare(capsys, "--data", user_dir, "--out", out, "--tokenizer", "byte")
    line = one_error_line(err)
    assert rc == 2 and "was prepared from this data with these options, but the files have changed" in line
    assert "--overwrite" in line and snapshot(out) == before
    rc, _, _ = cli_prepare(capsys, "--data", user_dir, "--out", out, "--tokenizer", "byte", "--overwrite")
    assert rc == 0 and snapshot(out) != before

    rc, _, _ = cli_prepare(capsys, "--data", user_dir, "--out", mine, "--tokenizer", "byte", "--overwrite")
    assert rc == 0 and not (mine / "thesis.tex").exists() and load_prepared(mine)


def test_prepare_again_with_the_same_options_refreshes_in_place(user_dir, tmp_path):
    out = tmp_path / "p"
    prepare(user_dir, out, tokenizer="byte", progress=False)
    (user_dir / "mod05.py").write_text(code_like(555))  # the same data folder, changed content
    assert not is_prepared(out, user_dir, tokenizer="byte")
    prepare(user_dir, out, tokenizer="byte", progress=False)  # no overwrite needed
    assert is_prepared(out, user_dir, tokenizer="byte")


def test_overwrite_never_deletes_the_data_or_the_current_folder(user_dir, tmp_path, monkeypatch):
    with pytest.raises(DataError, match=r"holds the data path .*--overwrite would delete it"):
        prepare(user_dir, user_dir, tokenizer="byte", overwrite=True, progress=False)
    with pytest.raises(DataError, match=r"holds the data path"):
        prepare(user_dir / "mod01.py", tmp_path, tokenizer="byte", overwrite=True, progress=False)
    work = tmp_path / "work"
    (work / "sub").mkdir(parents=True)
    monkeypatch.chdir(work / "sub")
    with pytest.raises(DataError, match=r"holds the current folder"):
        prepare(user_dir, work, tokenizer="byte", overwrite=True, progress=False)
    assert (work / "sub").is_dir() and (user_dir / "mod01.py").is_file()


def test_cli_prepare_out_that_is_a_file(user_dir, tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("keep me")
    for out in (tmp_path / "notes.txt", tmp_path / "notes.txt" / "sub"):
        for extra in ([], ["--overwrite"]):
            rc, _, err = cli_prepare(capsys, "--data", user_dir, "--out", out, "--tokenizer", "byte", *extra)
            line = one_error_line(err)
            assert rc == 2 and f"{tmp_path / 'notes.txt'} is a file, not a folder" in line
            assert f"--out {out}" in line and "another --out" in line
    assert (tmp_path / "notes.txt").read_text() == "keep me"


def test_cli_prepare_out_that_cannot_be_written(user_dir, tmp_path, capsys, monkeypatch):
    locked = tmp_path / "locked"
    locked.mkdir()
    real_mkdir = os.mkdir

    def refuse(path, *args, **kwargs):  # what a read-only folder does (we may run as root)
        if str(path).startswith(str(locked)):
            raise PermissionError(13, "Permission denied", str(path))
        return real_mkdir(path, *args, **kwargs)

    monkeypatch.setattr(os, "mkdir", refuse)
    for out in (locked / "data", locked / "deeper" / "data"):
        rc, _, err = cli_prepare(capsys, "--data", user_dir, "--out", out, "--tokenizer", "byte")
        line = one_error_line(err)
        assert rc == 2 and f"cannot write the prepared data to --out {out}: Permission denied" in line
        assert "--out you can write to" in line
    assert list(locked.iterdir()) == []


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root writes into read-only folders")
def test_cli_prepare_into_a_read_only_folder(user_dir, tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        rc, _, err = cli_prepare(capsys, "--data", user_dir, "--out", locked / "data", "--tokenizer", "byte")
        assert rc == 2 and "Permission denied" in one_error_line(err)
    finally:
        locked.chmod(0o700)


def test_cli_prepare_jsonl_without_the_text_field(tmp_path, capsys):
    rows = [{"id": i, "content": code_like(i, 20), "lang": "py"} for i in range(5)]
    path = tmp_path / "chat.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    rc, _, err = cli_prepare(capsys, "--data", path, "--out", tmp_path / "p", "--tokenizer", "byte")
    line = one_error_line(err)
    assert rc == 2 and f"{path}: no JSON record has a string in the field 'text'" in line
    assert "line 1 has the keys ['id', 'content', 'lang']" in line and "--text-field content" in line
    assert "loosen" not in line and not (tmp_path / "p").exists()
    assert_flags_exist(line)
    rc, _, _ = cli_prepare(capsys, "--data", path, "--out", tmp_path / "p", "--tokenizer", "byte",
                           "--text-field", "content")
    assert rc == 0 and read_meta(tmp_path / "p")["train"]["documents"] + read_meta(tmp_path / "p")["val"]["documents"] == 5

    broken = tmp_path / "pretty.jsonl"
    broken.write_text(json.dumps(rows[:2], indent=2))  # a pretty-printed JSON array, not JSON Lines
    rc, _, err = cli_prepare(capsys, "--data", broken, "--out", tmp_path / "q", "--tokenizer", "byte")
    line = one_error_line(err)
    assert rc == 2 and f"{broken} line 1 is not valid JSON" in line and "one JSON object per line" in line


def test_report_names_the_skipped_jsonl_lines(tmp_path, capsys):
    lines = [json.dumps({"text": code_like(i, 20)}) for i in range(4)]
    lines.insert(2, '{"text": "truncated')
    (tmp_path / "d.jsonl").write_text("\n".join(lines) + "\n")
    prepare(tmp_path / "d.jsonl", tmp_path / "p", tokenizer="byte")
    assert "jsonl_bad_lines e.g. d.jsonl:3" in capsys.readouterr().out


def test_cli_clean_thresholds_are_prepare_options(tmp_path, capsys):
    (tmp_path / "tiny").mkdir()
    for i in range(4):
        (tmp_path / "tiny" / f"{i}.txt").write_text(f"short {i}\n")
    rc, _, err = cli_prepare(capsys, "--data", tmp_path / "tiny", "--out", tmp_path / "p", "--tokenizer", "byte")
    line = one_error_line(err)
    assert rc == 2 and "--min-chars (now 32)" in line
    assert_flags_exist(line)  # the advice names an option that exists

    rc, _, _ = cli_prepare(capsys, "--data", tmp_path / "tiny", "--out", tmp_path / "p", "--tokenizer", "byte",
                           "--min-chars", "4", "--max-line-chars", "none")
    clean = read_meta(tmp_path / "p")["options"]["clean"]
    assert rc == 0 and clean["min_chars"] == 4 and clean["max_line_chars"] is None

    config = tmp_path / "prep.toml"
    config.write_text('[prepare]\ntokenizer = "byte"\nmin_chars = 5\nmax_line_chars = "none"\nmin_alnum_fraction = 0.1\n')
    rc, _, _ = cli_prepare(capsys, "--data", tmp_path / "tiny", "--out", tmp_path / "q", "--config", config)
    clean = read_meta(tmp_path / "q")["options"]["clean"]
    assert rc == 0 and (clean["min_chars"], clean["max_line_chars"], clean["min_alnum_fraction"]) == (5, None, 0.1)

    config.write_text('[prepare]\nmin_chars = "few"\n')
    rc, _, err = cli_prepare(capsys, "--data", tmp_path / "tiny", "--out", tmp_path / "r", "--config", config)
    assert rc == 2 and "clean option min_chars='few' must be an integer or none" in one_error_line(err)


def test_every_clean_threshold_is_a_prepare_flag():
    from gpt.data.clean import CLEAN_OPTIONS
    assert {"--" + name.replace("_", "-") for name in CLEAN_OPTIONS} <= prepare_flags()
    assert {"--overwrite", "--text-field", "--character-coverage"} <= prepare_flags()


def test_a_prepared_folder_inside_the_data_is_not_read_as_text(user_dir, tmp_path):
    alone = prepare(user_dir, tmp_path / "alone", tokenizer="byte", progress=False)
    prepare(user_dir, user_dir / "prepared_here", tokenizer="byte", progress=False)
    again = prepare(user_dir, tmp_path / "again", tokenizer="byte", progress=False)
    report = json.loads((tmp_path / "again" / "report.json").read_text())
    assert report["corpus"]["files_read"] == json.loads(
        (tmp_path / "alone" / "report.json").read_text())["corpus"]["files_read"]
    assert again["train"]["tokens"] == alone["train"]["tokens"]


def test_orphaned_staging_folders_of_dead_prepares_are_removed(user_dir, tmp_path):
    out = tmp_path / "p"
    dead = tmp_path / ".p.partial-999999-0000abcd"       # a pid that is not running
    dead.mkdir()
    (dead / "chunk-000000.txt").write_text("left by a kill -9")
    alive = tmp_path / f".p.partial-{os.getppid()}-0000abcd"   # a running process's: kept
    alive.mkdir()
    prepare(user_dir, out, tokenizer="byte", progress=False)
    assert not dead.exists() and alive.exists()


def test_workers_never_exceed_the_chunks_to_read(user_dir, tmp_path):
    prepare(user_dir, tmp_path / "p", tokenizer="byte", progress=False, workers=300)
    report = json.loads((tmp_path / "p" / "report.json").read_text())
    assert report["processes"]["workers_per_rank"] <= max(1, report["processes"]["chunks"])
