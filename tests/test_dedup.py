"""gpt.data.dedup: exact and MinHash/LSH near-duplicate removal."""

import numpy as np
import pytest

from gpt.data.corpus import Document
from gpt.data.dedup import (
    MERSENNE_P,
    DedupConfig,
    candidate_pairs,
    deduplicate,
    exact_key,
    minhash_signatures,
    optimal_bands_rows,
    permutations,
    shingle_hashes,
)
from gpt.data.errors import DataError

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


def test_signatures_estimate_jaccard_of_real_text():
    base = random_doc(11, 600)
    for changes in (5, 30, 80):
        a, b = render(base), render(mutate(base, changes, seed=changes))
        sig = minhash_signatures([shingle_hashes(a, 5), shingle_hashes(b, 5)], num_perm=256, seed=3)
        assert sig.shape == (2, 256) and sig.dtype == np.uint32
        estimate, true = float((sig[0] == sig[1]).mean()), jaccard(a, b)
        assert abs(estimate - true) < 3 * np.sqrt(true * (1 - true) / 256), (changes, estimate, true)


# ---------------------------------------------------------------- MinHash statistics
# With exact permutations h_i(x) = (a_i x + b_i) mod p, each signature entry of two sets
# agrees with probability J (their Jaccard similarity), independently across entries, so
# the k-entry estimate is Binomial(k, J) / k: unbiased with standard deviation
# sqrt(J (1 - J) / k), and an LSH band of r rows matches with probability J^r (S-curve
# 1 - (1 - J^r)^b over b bands). The tests below compare the estimator against that
# theory over many synthetic pairs; a hash that is not a true reduction mod p (e.g. the
# bare Mersenne fold (y & p) + (y >> 31), which returns r or r + p) fails them all.


def sets_with_jaccard(J: float, n_pairs: int, seed: int, union: int = 200) -> tuple[list[np.ndarray], float]:
    """n_pairs pairs of shingle sets, [A0, B0, A1, B1, ...], each pair with |A u B| = union
    and exact Jaccard round(J * union) / union (returned), from random 64-bit hashes
    reduced mod p as `shingle_hashes` does."""
    rng = np.random.default_rng(seed)
    inter = round(J * union)
    only_a = (union - inter) // 2
    sets = []
    for _ in range(n_pairs):
        x = np.unique(rng.integers(0, 2**64, size=union + 8, dtype=np.uint64) % MERSENNE_P)
        x = rng.permutation(x)[:union]
        assert len(x) == union
        common, a_only, b_only = x[:inter], x[inter : inter + only_a], x[inter + only_a :]
        sets += [np.sort(np.r_[common, a_only]), np.sort(np.r_[common, b_only])]
    return sets, inter / union


def test_permutation_hashes_are_exact_residues_mod_p():
    p = int(MERSENNE_P)
    edges = np.array([0, 1, 2, p - 2, p - 1], dtype=np.uint64)
    x = np.r_[edges, np.random.default_rng(0).integers(0, p, 200, dtype=np.uint64)]
    single = minhash_signatures([x[i : i + 1] for i in range(len(x))], num_perm=64, seed=5)  # (n, 64): h_i(x)
    a, b = permutations(64, seed=5)
    expected = [[(int(ai) * int(xi) + int(bi)) % p for ai, bi in zip(a, b)] for xi in x]  # Python ints: exact
    assert np.array_equal(single.astype(np.int64), np.array(expected, dtype=np.int64))
    assert single.max() < p


@pytest.mark.parametrize("J", [0.74, 0.5])
def test_estimator_is_unbiased_with_the_binomial_spread(J):
    k, n_pairs = 128, 400
    sets, J = sets_with_jaccard(J, n_pairs, seed=int(J * 100))
    sig = minhash_signatures(sets, num_perm=k, seed=1)
    estimate = (sig[0::2] == sig[1::2]).mean(axis=1)  # (n_pairs,)
    sd_theory = np.sqrt(J * (1 - J) / k)
    # the sample sd of 400 estimates has a relative standard error ~ 1/sqrt(800) = 3.5 %
    assert abs(estimate.std(ddof=1) / sd_theory - 1) < 0.2, (estimate.std(ddof=1), sd_theory)
    assert abs(estimate.mean() - J) < 4 * sd_theory / np.sqrt(n_pairs), (estimate.mean(), J)


def _candidate_rate(J: float, n_pairs: int, seed: int, bands: int, rows: int) -> tuple[int, np.ndarray, np.ndarray]:
    """Over n_pairs pairs at Jaccard J: (candidate count, candidate mask, estimates)."""
    sets, _ = sets_with_jaccard(J, n_pairs, seed=seed)
    sig = minhash_signatures(sets, num_perm=128, seed=seed)
    pairs = candidate_pairs(sig, bands, rows)
    same = pairs[(pairs[:, 0] % 2 == 0) & (pairs[:, 1] == pairs[:, 0] + 1)]  # a pair's own two sets
    mask = np.zeros(n_pairs, dtype=bool)
    mask[same[:, 0] // 2] = True
    return len(pairs), mask, (sig[0::2] == sig[1::2]).mean(axis=1)


def test_lsh_recall_and_false_positives_follow_the_s_curve():
    threshold, n_pairs = 0.8, 1000
    bands, rows = optimal_bands_rows(threshold, 128)

    def theory(J):
        prob = 1 - (1 - J**rows) ** bands
        return n_pairs * prob, np.sqrt(n_pairs * prob * (1 - prob))

    # recall at J = 0.89 (above the threshold): candidates, and candidates whose estimate
    # also clears the threshold (P(Binomial(128, 0.89) / 128 < 0.8) ~ 1e-3)
    n_found, cand, estimate = _candidate_rate(0.89, n_pairs, seed=11, bands=bands, rows=rows)
    mean, sd = theory(0.89)
    assert n_found == cand.sum()  # random sets of different pairs never collide in a band
    assert cand.sum() >= mean - 3 * sd, (cand.sum(), mean, sd)
    assert (cand & (estimate >= threshold)).sum() >= mean - 3 * sd - 5
    # false positives at J = 0.7 (below it): near the S-curve's ~8 %, on both sides
    # (at J = 0.3 the theory is ~1e-6: too small to test anything)
    _, cand, _ = _candidate_rate(0.7, n_pairs, seed=12, bands=bands, rows=rows)
    mean, sd = theory(0.7)
    assert abs(cand.sum() - mean) < 3 * sd, (cand.sum(), mean, sd)


def test_permutations_are_not_correlated():
    """For one set of n shingles, each permutation's minimum is a uniformly random
    element, independently: about n (1 - (1 - 1/n)^k) distinct winners, none often."""
    n, k = 200, 128
    x = np.unique(np.random.default_rng(9).integers(0, int(MERSENNE_P), size=n, dtype=np.uint64))
    single = minhash_signatures([x[i : i + 1] for i in range(len(x))], num_perm=k, seed=2)  # (n, k)
    full = minhash_signatures([x], num_perm=k, seed=2)[0]
    assert np.array_equal(single.min(axis=0), full)
    winners = single.argmin(axis=0)
    expected = len(x) * (1 - (1 - 1 / len(x)) ** k)  # ~95
    assert len(np.unique(winners)) > 0.8 * expected, (len(np.unique(winners)), expected)
    assert np.bincount(winners).max() <= 8  # P(some element wins >= 8 of 128) ~ 1e-4


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
