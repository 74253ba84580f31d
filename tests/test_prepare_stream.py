"""gpt.data.stream: prepare streams the corpus through worker processes in bounded memory.

- byte-identical output (shards, tokenizer, meta.json, report.json less its timings) for 1, 2
  and 3 workers over a corpus cut into many small chunks of very different sizes, so the
  workers finish out of order (a pool that handed results back as they finish fails it);
- the dedup of the stream finds what `deduplicate` finds on the same documents, duplicates
  planted across chunks included;
- the main process's peak memory does not grow with the corpus (a subprocess prepares 2 MB and
  8 MB; an in-memory pipeline holds several copies of the text and grows by tens of MB).
"""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from gpt.data import stream
from gpt.data.corpus import read_corpus
from gpt.data.dedup import deduplicate
from gpt.data.errors import DataError
from gpt.data.clean import clean_documents
from gpt.data.prepare import load_prepared, prepare, read_meta
from gpt.data.shards import read_shard

ROOT = Path(__file__).resolve().parents[1]
WORDS = [f"name{i}" for i in range(400)] + ["def", "return", "class", "self", "if", "for", "in", "while"]


def code_like(seed: int, n_lines: int) -> str:
    rng = np.random.default_rng(seed)
    lines = []
    for _ in range(n_lines):
        w = rng.choice(WORDS, size=5)
        lines.append(f"{'    ' * int(rng.integers(0, 3))}{w[0]} = {w[1]}({w[2]}, {w[3]}) + {w[4]}")
    return "\n".join(lines) + "\n"


def make_corpus(root: Path, n_files: int, seed: int = 0) -> Path:
    """Files of very different sizes (10 to 400 lines), with exact and near copies planted
    far from their originals (other chunks), and a few files the clean stage drops."""
    root.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    texts = {}
    for i in range(n_files):
        texts[i] = code_like(seed * 100_000 + i, int(rng.choice([10, 40, 400])))
        (root / f"f{i:04d}.py").write_text(texts[i])
    for k, src in enumerate(range(0, n_files, max(1, n_files // 6))):
        (root / f"z_exact{k}.py").write_text(texts[src] + "  \n")  # trailing whitespace only
        near = texts[src].split("\n")
        near[3] = near[3] + " + changed"
        (root / f"z_near{k}.py").write_text("\n".join(near))
    (root / "z_empty.py").write_text("")
    return root


def report_without_timings(folder: Path) -> dict:
    report = json.loads((folder / "report.json").read_text())
    report.pop("timings")
    report.pop("processes")
    return report


@pytest.fixture
def small_chunks(monkeypatch):
    monkeypatch.setattr(stream, "CHUNK_BYTES", 6000)  # many chunks from a small corpus


def test_output_is_byte_identical_for_any_number_of_workers(tmp_path, small_chunks):
    corpus = make_corpus(tmp_path / "code", 60)
    outs = {}
    for workers in (1, 2, 3):
        out = tmp_path / f"w{workers}"
        prepare(corpus, out, tokenizer="bpe", vocab_size=340, val_fraction=0.1, workers=workers, progress=False)
        outs[workers] = out
        processes = json.loads((out / "report.json").read_text())["processes"]
        assert processes["workers_per_rank"] == workers and processes["chunks"] > 20
    files = sorted(p.name for p in outs[1].iterdir())
    assert files == ["meta.json", "report.json", "tokenizer.model", "train.bin", "val.bin"]
    for workers in (2, 3):
        for name in ("train.bin", "val.bin", "tokenizer.model", "meta.json"):
            assert (outs[workers] / name).read_bytes() == (outs[1] / name).read_bytes(), (workers, name)
        assert report_without_timings(outs[workers]) == report_without_timings(outs[1])
    dedup = report_without_timings(outs[1])["dedup"]
    assert dedup["exact_removed"] == 6 and dedup["near_removed"] == 6


def test_stream_dedup_equals_the_in_memory_dedup(tmp_path, small_chunks):
    corpus = make_corpus(tmp_path / "code", 40, seed=1)
    out = tmp_path / "p"
    prepare(corpus, out, tokenizer="byte", val_fraction=0.0, workers=2, progress=False)
    docs, _ = clean_documents(read_corpus(corpus).documents)
    kept, expected = deduplicate(docs)
    got = json.loads((out / "report.json").read_text())["dedup"]
    assert got["duplicates"] == expected.duplicates and got["documents_out"] == len(kept)
    assert got["candidate_pairs"] == expected.candidate_pairs and got["similar_pairs"] == expected.similar_pairs
    _, tok, train, _ = load_prepared(out)
    assert tok.decode(np.asarray(read_shard(train))) == "".join(d.text for d in kept)  # eos decodes to nothing


_MEASURE = """
import json, sys
from pathlib import Path
from gpt.data import stream
from gpt.data.prepare import prepare
stream.CHUNK_BYTES = 1 << 18  # both corpora span many chunks: what is measured is growth, not a chunk's share
corpus, out = sys.argv[1], sys.argv[2]
prepare(corpus, out, tokenizer="byte", workers=1, progress=False)
print(json.loads((Path(out) / "report.json").read_text())["processes"]["peak_rss_mb"][0]["main"])
"""


def test_memory_does_not_grow_with_the_corpus(tmp_path):
    peaks = {}
    for n_files in (200, 800):  # ~2 MB and ~8 MB of text
        corpus = make_corpus(tmp_path / f"code{n_files}", n_files, seed=2)
        size = sum(p.stat().st_size for p in corpus.iterdir()) / 1e6
        run = subprocess.run([sys.executable, "-c", _MEASURE, str(corpus), str(tmp_path / f"out{n_files}")],
                             capture_output=True, text=True, cwd=ROOT, timeout=300)
        assert run.returncode == 0, run.stderr
        peaks[n_files] = (size, float(run.stdout.split()[-1]))
    (small, rss_small), (big, rss_big) = peaks[200], peaks[800]
    assert big > 3.5 * small
    # rows of ~300 documents more (a few hundred bytes each) and allocator noise: a few MB;
    # holding the extra 6 MB of text (raw, cleaned, shingles) would add tens of MB
    assert rss_big - rss_small < 6, peaks


def _big_jsonl(path, n=3000, bad_line=2222):
    rng = np.random.default_rng(4)
    words = ["alpha", "beta", "gamma", "delta", "tensor", "graph", "token", "layer"]
    lines = []
    for i in range(1, n + 1):
        if i == bad_line:
            lines.append("{not json")
        else:
            text = " ".join(rng.choice(words, size=int(rng.integers(20, 60))))
            lines.append(json.dumps({"id": i, "text": f"record {i}: {text}"}))
    path.write_text("\n".join(lines) + "\n")
    return path


def test_a_large_jsonl_is_read_in_pieces_with_the_same_result(tmp_path, monkeypatch):
    """One big .jsonl is cut at line ends into chunk-sized pieces (bounded memory, spread over
    the workers): the documents, tokens and line numbers are those of reading it whole."""
    data = _big_jsonl(tmp_path / "big.jsonl")
    whole = tmp_path / "whole"
    prepare(data, whole, tokenizer="byte", val_fraction=0.1, workers=1, progress=False)
    monkeypatch.setattr(stream, "CHUNK_BYTES", 20_000)     # now ~15 pieces
    outs = {}
    for workers in (1, 2):
        outs[workers] = tmp_path / f"pieces{workers}"
        prepare(data, outs[workers], tokenizer="byte", val_fraction=0.1, workers=workers, progress=False)
        report = json.loads((outs[workers] / "report.json").read_text())
        assert report["processes"]["chunks"] > 10
    for out in outs.values():
        for name in ("train.bin", "val.bin", "tokenizer.json"):
            assert (out / name).read_bytes() == (whole / name).read_bytes(), (out, name)
        a, b = report_without_timings(out), report_without_timings(whole)
        assert a["corpus"] == b["corpus"] and a["dedup"] == b["dedup"]
        assert a["corpus"]["files_read"] == 1
        assert "big.jsonl:2222" in json.dumps(a["corpus"])    # the bad line, numbered as in the file
    assert read_meta(whole)["corpus"] == read_meta(outs[1])["corpus"]   # the same fingerprint


def test_a_large_jsonl_whose_first_piece_has_no_text_is_read_like_the_whole_file(tmp_path, monkeypatch):
    """Pieces never speak for the whole file: a big file whose first piece holds only records
    without the text field still gives the documents of its later pieces (a helper's find)."""
    data = tmp_path / "mixed.jsonl"
    lines = [json.dumps({"content": f"other field {i} " * 20}) for i in range(400)]
    lines += [json.dumps({"text": f"record {i}: " + "words and more words " * (5 + i % 7)}) for i in range(400)]
    data.write_text("\n".join(lines) + "\n")
    whole = tmp_path / "whole"
    prepare(data, whole, tokenizer="byte", val_fraction=0.1, workers=1, progress=False)
    monkeypatch.setattr(stream, "CHUNK_BYTES", 20_000)
    split = tmp_path / "split"
    prepare(data, split, tokenizer="byte", val_fraction=0.1, workers=2, progress=False)
    for name in ("train.bin", "val.bin"):
        assert (split / name).read_bytes() == (whole / name).read_bytes()
    assert report_without_timings(split)["corpus"] == report_without_timings(whole)["corpus"]
    # a big file with no text at all: the end-of-pass error names --text-field
    (tmp_path / "none.jsonl").write_text("\n".join(lines[:400]) + "\n")
    with pytest.raises(DataError, match="had no string in the text field .* --text-field"):
        prepare(tmp_path / "none.jsonl", tmp_path / "n", tokenizer="byte", workers=1, progress=False)
