"""gpt.dedup: exact and MinHash/LSH near-duplicate removal."""

import numpy as np
import pytest

from gpt.corpus import Document
from gpt.dedup import (
    MERSENNE_P,
    DedupConfig,
    candidate_pairs,
    deduplicate,
    exact_key,
    minhash_signatures,
    optimal_bands_rows,
    shingle_hashes,
)
from gpt.errors import DataError

WORDS = [f"w{i}" for i in range(3000)]


def random_doc(seed: int, n_words: int = 400) -> list[str]:
    rng = np.random.default_rng(seed)
    return list(rng.choice(WORDS, size=n_words))


def render(words: list[str]) -> str:
    """Code-ish text: 8 words a line, some punctuation."""
    lines = [" = ".join(words[i : i + 2]) + "(" + ", ".join(words[i + 2 : i + 8]) + ")" for i in range(0, len(words), 8)]
    return "\n".join(lines) + "\n"


def mutate(words: list[str], n_changes: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    out = list(words)
    for i in rng.choice(len(out), size=n_changes, replace=False):
        out[i] = f"changed{i}"
    return out


def jaccard(a: str, b: str, k: int = 5) -> float:
    sa, sb = set(shingle_hashes(a, k).tolist()), set(shingle_hashes(b, k).tolist())
    return len(sa & sb) / len(sa | sb)


def test_exact_duplicates_keep_the_first_and_ignore_trailing_whitespace():
    a = "x = 1\ny = 2\n"
    docs = [Document("a", a), Document("b", "other text\n"), Document("c", "x = 1   \ny = 2\n\n\n"), Document("d", a)]
    kept, report = deduplicate(docs, {"near": False})
    assert [d.source for d in kept] == ["a", "b"]
    assert report.exact_removed == 2 and report.near_removed == 0
    assert [(d["removed"], d["kept"], d["kind"]) for d in report.duplicates] == [("c", "a", "exact"), ("d", "a", "exact")]
    assert exact_key("x\n") != exact_key("x \ny")


def test_minhash_finds_planted_near_duplicates_and_keeps_distinct_documents():
    originals = [render(random_doc(s)) for s in range(20)]
    base = random_doc(100)
    near = render(mutate(base, 3, seed=1))  # a few words changed
    docs = [Document(f"doc{i}", t) for i, t in enumerate(originals)]
    docs.insert(5, Document("base", render(base)))
    docs.append(Document("near-copy", near))
    assert 0.8 < jaccard(render(base), near) < 1.0
    kept, report = deduplicate(docs)
    assert [d.source for d in kept] == [d.source for d in docs if d.source != "near-copy"]
    assert report.near_removed == 1 and report.exact_removed == 0
    (dup,) = report.duplicates
    assert dup["removed"] == "near-copy" and dup["kept"] == "base" and dup["kind"] == "near"
    assert dup["similarity"] >= 0.8


def test_threshold_is_respected():
    base = random_doc(7)
    a, b = render(base), render(mutate(base, 40, seed=2))
    true = jaccard(a, b)
    assert 0.35 < true < 0.65
    docs = [Document("a", a), Document("b", b)]
    kept_strict, strict = deduplicate(docs, {"threshold": 0.8})
    assert len(kept_strict) == 2 and strict.near_removed == 0
    kept_loose, loose = deduplicate(docs, {"threshold": 0.25})
    assert [d.source for d in kept_loose] == ["a"] and loose.near_removed == 1
    assert loose.duplicates[0]["similarity"] >= 0.25
    assert (loose.bands, loose.rows) == optimal_bands_rows(0.25, 128)


def test_signatures_estimate_jaccard():
    base = random_doc(11, 600)
    for changes in (5, 30, 80):
        a, b = render(base), render(mutate(base, changes, seed=changes))
        sig = minhash_signatures([shingle_hashes(a, 5), shingle_hashes(b, 5)], num_perm=256, seed=3)
        assert sig.shape == (2, 256) and sig.dtype == np.uint32
        estimate = float((sig[0] == sig[1]).mean())
        assert abs(estimate - jaccard(a, b)) < 0.1, (changes, estimate, jaccard(a, b))


def test_shingles_are_stable_and_in_range():
    text = "def f(x):\n    return x + 1\n"
    h = shingle_hashes(text, 3)
    assert h.dtype == np.uint64 and np.all(h < MERSENNE_P) and np.all(np.diff(h.astype(np.int64)) > 0)
    assert np.array_equal(h, shingle_hashes(text, 3))
    assert len(shingle_hashes("a b", 5)) == 1  # fewer tokens than the shingle size: one shingle
    assert len(shingle_hashes("   \n", 5)) == 0


def test_optimal_bands_rows_follow_the_threshold():
    for t in (0.5, 0.7, 0.8, 0.9):
        b, r = optimal_bands_rows(t, 128)
        assert b * r <= 128
        # the S-curve's steepest point (1/b)^(1/r) lies near the threshold
        assert abs((1 / b) ** (1 / r) - t) < 0.12
    assert optimal_bands_rows(0.9, 128)[1] > optimal_bands_rows(0.5, 128)[1]


def test_candidate_pairs_from_shared_bands():
    sig = np.array([[1, 2, 3, 4], [1, 2, 9, 9], [7, 7, 3, 4], [5, 6, 8, 0]], dtype=np.uint32)
    pairs = candidate_pairs(sig, bands=2, rows=2)
    assert pairs.tolist() == [[0, 1], [0, 2]]


def test_empty_documents_never_match_and_near_can_be_disabled():
    docs = [Document("e1", "!!"), Document("e2", "  \n"), Document("x", render(random_doc(1)))]
    kept, report = deduplicate(docs, {"exact": False})
    assert len(kept) == 3 and report.near_removed == 0
    base = random_doc(3)
    pair = [Document("a", render(base)), Document("b", render(mutate(base, 2, seed=0)))]
    assert len(deduplicate(pair, {"near": False})[0]) == 2
    assert len(deduplicate(pair)[0]) == 1


def test_no_chains_every_removed_document_names_a_kept_one():
    base = random_doc(21)
    chain = [base]
    for step in range(6):  # each a little further from the first
        chain.append(mutate(chain[-1], 4, seed=50 + step))
    docs = [Document(f"c{i}", render(w)) for i, w in enumerate(chain)]
    kept, report = deduplicate(docs, {"threshold": 0.75})
    kept_names = {d.source for d in kept}
    assert report.near_removed >= 1
    assert all(d["kept"] in kept_names and d["removed"] not in kept_names for d in report.duplicates)


def test_bad_options():
    with pytest.raises(DataError, match="threshold=1.5"):
        DedupConfig(threshold=1.5)
    with pytest.raises(DataError, match="num_perm=1"):
        DedupConfig(num_perm=1)
    with pytest.raises(DataError, match=r"unknown dedup option\(s\) \['shingles'\]"):
        deduplicate([], {"shingles": 3})
