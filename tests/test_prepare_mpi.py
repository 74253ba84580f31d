"""prepare under mpiexec: N ranks give what one process gives.

The ranks each read a contiguous share of the files (tests/mpi/prepare_ranks.py runs the CLI
under ``mpiexec -n N``), and near and exact copies are planted in the last files, so they sit
on the last rank while their originals sit on the first: the duplicates are found only if the
ranks really exchange their hashes and LSH band keys. Compared with one process on the same
files: the same documents removed (report.json's dedup section, every pair named), the same
tokenizer (byte for byte: rank 0 trains it on the sample gathered from every rank), and the
same token stream (the ranks' shards, in rank order, are the single process's shard).
"""
import json

import numpy as np
import pytest

from gpt.data.prepare import is_prepared, load_prepared, prepare
from gpt.data.shards import read_shard
from mpi_launch import needs_mpi, result_of
from test_prepare_stream import make_corpus

pytestmark = needs_mpi


def concatenated(paths) -> np.ndarray:
    paths = paths if isinstance(paths, list) else [paths]
    return np.concatenate([np.asarray(read_shard(p)) for p in paths])


@pytest.mark.parametrize("ranks", [2, 3])
def test_ranks_prepare_what_one_process_prepares(tmp_path, ranks):
    corpus = make_corpus(tmp_path / "code", 40, seed=3)
    args = ["--data", str(corpus), "--tokenizer", "bpe", "--vocab-size", "330", "--seed", "4"]
    single = tmp_path / "single"
    prepare(corpus, single, tokenizer="bpe", vocab_size=330, seed=4, workers=1, progress=False)
    out = tmp_path / "ranks"
    r = result_of(ranks, "prepare_ranks.py", *args, "--out", str(out), timeout=120)

    assert r["ranks"] == ranks and len(r["processes"]["peak_rss_mb"]) == ranks
    names = [s["file"] for s in r["meta"]["train"]["shards"]]
    assert names == [f"train-{k:05d}-of-{ranks:05d}.bin" for k in range(ranks)]
    one, many = json.loads((single / "report.json").read_text()), json.loads((out / "report.json").read_text())
    assert many["dedup"] == one["dedup"] and one["dedup"]["near_removed"] >= 7 and one["dedup"]["exact_removed"] == 7  # planted: range(0, 40, 6)
    for part in ("corpus", "clean", "split", "tokenizer", "shards"):
        assert many[part] == one[part], part
    assert (out / "tokenizer.model").read_bytes() == (single / "tokenizer.model").read_bytes()

    meta_one, tok, train_one, val_one = load_prepared(single)
    meta_many, _, train_many, val_many = load_prepared(out)
    assert isinstance(train_many, list) and len(train_many) == ranks
    assert np.array_equal(concatenated(train_many), concatenated(train_one))
    assert np.array_equal(concatenated(val_many), concatenated(val_one))
    assert meta_many["corpus"] == meta_one["corpus"] and meta_many["options"] == meta_one["options"]
    assert is_prepared(out, corpus, tokenizer="bpe", vocab_size=330, seed=4)
    # every rank read something: the shards all hold tokens
    assert all(s["tokens"] > 0 for s in meta_many["train"]["shards"])


def test_a_mistake_under_mpiexec_is_one_line_from_one_rank(tmp_path):
    from mpi_launch import run_mpi

    (tmp_path / "tiny").mkdir()
    for i in range(6):
        (tmp_path / "tiny" / f"{i}.txt").write_text(f"short {i}\n")
    rc, out, err, _ = run_mpi(2, "prepare_ranks.py", "--data", str(tmp_path / "tiny"), "--out",
                              str(tmp_path / "p"), "--tokenizer", "byte", timeout=60)
    lines = [ln for ln in err.splitlines() if "error:" in ln]
    assert rc == 2 and len(lines) == 1 and "no documents left to train on" in lines[0], (rc, out, err)
    assert "--min-chars (now 32)" in lines[0] and "Traceback" not in err
    assert not (tmp_path / "p").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["tiny"]
