"""Remove exact and near-duplicate documents.

Third stage of the data pipeline. Duplicates waste a small model's capacity and leak
between the train and validation splits (a test file copied into two packages would be
in both). Two passes, in corpus order, the *first* document of a group is kept:

1. **Exact**: documents whose normalised text (trailing whitespace removed from every
   line, leading/trailing blank lines removed) has the same blake2b-128 digest.
2. **Near**: MinHash + LSH over token shingles, estimating the Jaccard similarity of
   the documents' sets of ``shingle_size``-token windows.

MinHash, vectorised
-------------------
* Tokens: ``\\w+`` runs and single punctuation bytes of the UTF-8 text (a code-aware
  split: ``self.x=1`` -> ``self . x = 1``), each hashed once with ``zlib.crc32``
  (stable across runs and machines, unlike Python's ``hash``).
* Shingles: the k token hashes of a window are combined with a polynomial in uint64
  (wrapping) arithmetic and mixed with the splitmix64 finaliser, all in NumPy, then
  reduced modulo the Mersenne prime p = 2**31 - 1 and de-duplicated per document.
* Permutations: ``num_perm`` universal hash functions h_i(x) = (a_i x + b_i) mod p,
  evaluated for all of a document's shingles and all permutations at once as a
  (shingles, num_perm) uint64 matrix (a, b, x < 2**31 so a*x + b < 2**62: exact, no
  overflow); "mod p" is a Mersenne fold plus one branch-free conditional subtraction,
  exactly in [0, p) (see `_mod_mersenne`: a bare fold is not reduced and biases the
  minimum towards the same shingles in every permutation). A document's signature is the
  column-wise minimum. The stdlib's 4.5 M shingles x 128 permutations take about 1 s on
  one core.
* LSH: the signature is cut into ``bands`` bands of ``rows`` rows, with (bands, rows)
  chosen from the threshold to minimise the false-positive plus false-negative
  probability mass (`optimal_bands_rows`); each band becomes a 64-bit key
  (`band_keys`), documents that share a key in some band are candidates (`bucket_pairs`), and a candidate pair is a duplicate only if the fraction of equal
  signature entries (the Jaccard estimate) is >= ``threshold``.
* Removal is greedy in corpus order: a document is removed when it is similar to an
  earlier document that is itself kept, so every removed document names a kept one
  (no chains of A~B~C removing C for A).
"""

from __future__ import annotations

import hashlib
import re
import zlib
from dataclasses import asdict, dataclass, field, fields

import numpy as np

from gpt.data.corpus import Document
from gpt.data.errors import DataError, build_config

MERSENNE_P = np.uint64((1 << 31) - 1)
_TOKEN = re.compile(rb"\w+|[^\w\s]")
_POLY = np.uint64(0x100000001B3)  # FNV-64 prime: odd, so the polynomial mixes every token
_BLOCK_ROWS = 2048  # shingles per (rows, num_perm) uint64 block: 2048 x 128 x 8 B = 2 MiB
_MAX_PAIRS_PER_BUCKET = 256  # a bucket larger than this pairs its members with its first only


@dataclass(frozen=True)
class DedupConfig:
    exact: bool = True
    near: bool = True
    shingle_size: int = 5  # tokens per shingle
    num_perm: int = 128  # MinHash permutations (signature length)
    threshold: float = 0.8  # estimated Jaccard similarity at or above which docs are near-duplicates
    seed: int = 0  # of the permutations
    bands: int | None = None  # LSH bands; None: chosen from threshold and num_perm

    def __post_init__(self):
        if not isinstance(self.shingle_size, int) or self.shingle_size < 1:
            raise DataError(f"dedup option shingle_size={self.shingle_size!r} must be an integer >= 1")
        if not isinstance(self.num_perm, int) or self.num_perm < 2:
            raise DataError(f"dedup option num_perm={self.num_perm!r} must be an integer >= 2")
        if not (isinstance(self.threshold, (int, float)) and 0.0 < self.threshold <= 1.0):
            raise DataError(f"dedup option threshold={self.threshold!r} must be a Jaccard similarity in (0, 1]")
        if self.bands is not None and not (isinstance(self.bands, int) and 1 <= self.bands <= self.num_perm):
            raise DataError(
                f"dedup option bands={self.bands!r} must be an integer in [1, num_perm={self.num_perm}] or None"
            )

    @classmethod
    def from_options(cls, value: "DedupConfig | dict | None") -> "DedupConfig":
        return build_config(cls, value, "dedup")

    def bands_rows(self) -> tuple[int, int]:
        """The LSH (bands, rows): ``bands`` if given, else chosen from the threshold."""
        if self.bands is None:
            return optimal_bands_rows(self.threshold, self.num_perm)
        return self.bands, self.num_perm // self.bands

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class DedupReport:
    documents_in: int = 0
    documents_out: int = 0
    exact_removed: int = 0
    near_removed: int = 0
    bands: int = 0
    rows: int = 0
    candidate_pairs: int = 0  # pairs sharing an LSH bucket
    similar_pairs: int = 0  # candidates whose estimated Jaccard >= threshold
    # one entry per removed document: {"removed", "kept", "kind": "exact"|"near", "similarity"}
    duplicates: list[dict] = field(default_factory=list)
    config: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


# ----------------------------------------------------------------------------- exact


def exact_key(text: str) -> bytes:
    """Digest of the text up to trailing whitespace and surrounding blank lines."""
    norm = "\n".join(line.rstrip() for line in text.split("\n")).strip("\n")
    return hashlib.blake2b(norm.encode("utf-8", "surrogatepass"), digest_size=16).digest()


# ----------------------------------------------------------------------------- minhash


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser: a bijective mix of uint64 values (wrapping arithmetic)."""
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def shingle_hashes(text: str, shingle_size: int) -> np.ndarray:
    """Sorted unique hashes (uint64, values < 2**31 - 1) of the text's token shingles.

    A text with fewer tokens than ``shingle_size`` has one shingle (all its tokens);
    a text with no tokens has none (it never matches anything)."""
    tokens = _TOKEN.findall(text.encode("utf-8", "surrogatepass"))
    n = len(tokens)
    if n == 0:
        return np.empty(0, dtype=np.uint64)
    th = np.fromiter(map(zlib.crc32, tokens), dtype=np.uint64, count=n)  # (n,)
    k = min(shingle_size, n)
    with np.errstate(over="ignore"):
        h = th[: n - k + 1].copy()  # (n - k + 1,)
        for j in range(1, k):
            h = h * _POLY + th[j : n - k + 1 + j]
        h = _splitmix64(h)
    return np.unique(h % MERSENNE_P)


def permutations(num_perm: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The (a, b) coefficients, each (num_perm,) uint64, of h(x) = (a x + b) mod p."""
    rng = np.random.default_rng(seed)
    a = rng.integers(1, int(MERSENNE_P), size=num_perm, dtype=np.uint64)
    b = rng.integers(0, int(MERSENNE_P), size=num_perm, dtype=np.uint64)
    return a, b


def _mod_mersenne(y: np.ndarray, tmp: np.ndarray) -> np.ndarray:
    """In place: y -> y mod p, exactly in [0, p), for p = 2**31 - 1 and y <= p (p - 1).

    Since 2**31 = 1 (mod p), the fold z = (y & p) + (y >> 31) is congruent to y, but it
    is *not* reduced: with y <= p (p - 1) (the largest a x + b for a, x, b < p),
    y >> 31 <= p - 2 and y & p <= p, so z lies in [0, 2 p - 2]: a residue r in [0, p - 2]
    comes out as r or r + p depending on x. Used as is, that biases MinHash: the high
    bits of a x + b push a hash over p more often when they are large, the same small
    shingles win the minimum in many permutations, and the permutations correlate (the
    estimate's spread was 1.6-2.5x the theoretical sqrt(J (1 - J) / k)).

    One conditional subtraction finishes the reduction, branch-free: z - p wraps around
    (to >= 2**64 - p) when z < p and is z - p < p otherwise, so min(z, z - p) is z when
    z < p and z - p when p <= z <= 2 p - 2; either way exactly z mod p, in [0, p). Five
    elementwise passes (shift/and/add/subtract/min) instead of a 64-bit division."""
    np.right_shift(y, np.uint64(31), out=tmp)
    np.bitwise_and(y, MERSENNE_P, out=y)
    y += tmp  # z in [0, 2 p - 2], z = y (mod p)
    np.subtract(y, MERSENNE_P, out=tmp)  # uint64 wraps for z < p
    np.minimum(y, tmp, out=y)
    return y


def minhash_signatures(shingles: list[np.ndarray], num_perm: int, seed: int = 0) -> np.ndarray:
    """MinHash signatures, (n_docs, num_perm) uint32, of per-document shingle hash sets.

    For each document, its shingles (in blocks of at most 2048 rows, to stay in cache)
    go through all permutations at once as a (rows, num_perm) uint64 matrix, and the
    column-wise minimum is its signature. Documents without shingles get all-ones
    signatures (2**32 - 1, larger than any hash value), which match nothing real."""
    a, b = permutations(num_perm, seed)
    a, b = a[None, :], b[None, :]  # (1, num_perm)
    sig = np.full((len(shingles), num_perm), np.iinfo(np.uint32).max, dtype=np.uint64)
    buf = np.empty((_BLOCK_ROWS, num_perm), dtype=np.uint64)
    tmp = np.empty_like(buf)
    for d, x in enumerate(shingles):
        for lo in range(0, len(x), _BLOCK_ROWS):
            rows = x[lo : lo + _BLOCK_ROWS, None]  # (rows, 1)
            h, t = buf[: len(rows)], tmp[: len(rows)]
            np.multiply(rows, a, out=h)  # a, x < 2**31: a*x + b < 2**62, exact in uint64
            h += b
            np.minimum(sig[d], _mod_mersenne(h, t).min(axis=0), out=sig[d])
    return sig.astype(np.uint32)


def optimal_bands_rows(threshold: float, num_perm: int, fp_weight: float = 0.5) -> tuple[int, int]:
    """(bands, rows) with bands * rows <= num_perm minimising the weighted probability
    mass of false positives (similarity < threshold yet a candidate) and false negatives
    (similarity >= threshold yet never a candidate); the LSH S-curve is 1 - (1 - s^r)^b."""
    s = np.linspace(0.0, 1.0, 1001)
    ds = s[1] - s[0]
    best, best_err = (1, num_perm), np.inf
    for b in range(1, num_perm + 1):
        for r in range(1, num_perm // b + 1):
            p_candidate = 1.0 - (1.0 - s**r) ** b
            fp = np.sum(np.where(s < threshold, p_candidate, 0.0)) * ds
            fn = np.sum(np.where(s >= threshold, 1.0 - p_candidate, 0.0)) * ds
            err = fp_weight * fp + (1.0 - fp_weight) * fn
            if err < best_err - 1e-12:
                best, best_err = (b, r), err
    return best


def band_keys(signatures: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """(n_docs, bands) uint64: a 64-bit key of each band of each signature, the band's
    number mixed in (so equal rows in two different bands never share a bucket). Two
    documents share a bucket when they have the same key: the band's rows are equal (or,
    with probability ~2**-64 a pair, they collide; a candidate is verified on the whole
    signature anyway). Keys, not the rows, are what prepare exchanges between MPI ranks:
    8 bytes a band."""
    n = len(signatures)
    keys = np.empty((n, bands), dtype=np.uint64)
    sig = signatures.astype(np.uint64)
    with np.errstate(over="ignore"):
        for band in range(bands):
            h = np.full(n, _splitmix64(np.uint64(band + 1)), dtype=np.uint64)
            for col in range(band * rows, (band + 1) * rows):
                h = _splitmix64(h * _POLY + sig[:, col])
            keys[:, band] = h
    return keys


def bucket_pairs(keys: np.ndarray, docs: np.ndarray) -> np.ndarray:
    """Unique (i, j) document pairs, i < j, (n_pairs, 2) int64, of records ``(keys[k],
    docs[k])`` that share a key. A bucket of more than 256 documents pairs its first (lowest)
    document with each other one only, not every pair (a template copied thousands of times
    would otherwise give millions of pairs)."""
    keys, docs = np.asarray(keys, dtype=np.uint64), np.asarray(docs, dtype=np.int64)
    order = np.lexsort((docs, keys))  # by key, then document
    k, d = keys[order], docs[order]
    if len(k) < 2:
        return np.empty((0, 2), dtype=np.int64)
    starts = np.flatnonzero(np.r_[True, k[1:] != k[:-1]])
    sizes = np.diff(np.r_[starts, len(k)])
    found: list[np.ndarray] = []
    for lo, size in zip(starts[sizes > 1].tolist(), sizes[sizes > 1].tolist()):
        members = d[lo : lo + size]
        if size > _MAX_PAIRS_PER_BUCKET:
            pairs = np.stack([np.full(size - 1, members[0]), members[1:]], axis=1)
        else:
            i, j = np.triu_indices(size, k=1)
            pairs = np.stack([members[i], members[j]], axis=1)
        found.append(pairs)
    if not found:
        return np.empty((0, 2), dtype=np.int64)
    pairs = np.concatenate(found)
    return np.unique(pairs[pairs[:, 0] != pairs[:, 1]], axis=0)


def candidate_pairs(signatures: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """Unique (i, j) pairs, i < j, (n_pairs, 2) int64, that agree on at least one band."""
    n = len(signatures)
    keys = band_keys(signatures, bands, rows)  # (n, bands)
    return bucket_pairs(keys.ravel(), np.repeat(np.arange(n, dtype=np.int64), bands))


def greedy_removals(pairs: np.ndarray, similarity: np.ndarray) -> list[tuple[int, int, float]]:
    """Which documents near-dedup removes, from the similar pairs (i < j) and their estimated
    similarity: ``[(removed j, kept i, similarity)]`` in the order decided. Greedy in corpus
    order: by the later document, its most similar partner first; a pair is skipped when
    either side is already removed, so every removed document names a kept one (no chains of
    A~B~C removing C for A)."""
    order = np.lexsort((pairs[:, 0], -similarity, pairs[:, 1]))
    removed: set[int] = set()
    out = []
    for (i, j), s in zip(pairs[order].tolist(), similarity[order].tolist()):
        if j in removed or i in removed:
            continue
        removed.add(j)
        out.append((j, i, s))
    return out


def empty_signature(signatures: np.ndarray) -> np.ndarray:
    """(n_docs,) bool: documents without shingles (all-ones signatures; a real hash is < p)."""
    return signatures[:, 0] == np.iinfo(np.uint32).max


# ----------------------------------------------------------------------------- driver


def deduplicate(
    documents: list[Document], config: DedupConfig | dict | None = None, *, progress: bool = False
) -> tuple[list[Document], DedupReport]:
    """Drop exact, then near-duplicate documents; keep the first of each group.

    Returns the kept documents in their original order and a report naming, for each
    removed document, the kept document it duplicates. (An in-memory list; `prepare`
    streams the same steps, `gpt.data.stream`, over any number of workers and ranks.)"""
    config = DedupConfig.from_options(config)
    report = DedupReport(documents_in=len(documents), config=config.to_dict())
    docs = list(documents)

    if config.exact:
        first: dict[bytes, int] = {}
        kept = []
        for doc in docs:
            key = exact_key(doc.text)
            if key in first:
                report.duplicates.append(
                    {"removed": doc.source, "kept": kept[first[key]].source, "kind": "exact", "similarity": 1.0}
                )
                continue
            first[key] = len(kept)
            kept.append(doc)
        report.exact_removed = len(docs) - len(kept)
        docs = kept

    if config.near and len(docs) > 1:
        bands, rows = config.bands_rows()
        report.bands, report.rows = bands, rows
        items = docs
        if progress:
            from tqdm.auto import tqdm

            items = tqdm(docs, desc="dedup: shingles", unit="doc", leave=False)
        shingles = [shingle_hashes(d.text, config.shingle_size) for d in items]
        sig = minhash_signatures(shingles, config.num_perm, config.seed)  # (n_docs, num_perm)
        real = np.flatnonzero(~empty_signature(sig))
        keys = band_keys(sig[real], bands, rows)
        pairs = bucket_pairs(keys.ravel(), np.repeat(real, bands))
        report.candidate_pairs = len(pairs)
        similarity = (sig[pairs[:, 0]] == sig[pairs[:, 1]]).mean(axis=1) if len(pairs) else np.empty(0)
        similar = similarity >= config.threshold
        report.similar_pairs = int(similar.sum())
        removals = greedy_removals(pairs[similar], similarity[similar])
        for j, i, s in removals:
            report.duplicates.append(
                {"removed": docs[j].source, "kept": docs[i].source, "kind": "near", "similarity": round(s, 4)}
            )
        report.near_removed = len(removals)
        gone = {j for j, _, _ in removals}
        docs = [d for k, d in enumerate(docs) if k not in gone]

    report.documents_out = len(docs)
    return docs, report


DEDUP_OPTIONS = tuple(f.name for f in fields(DedupConfig))
