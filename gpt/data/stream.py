"""The pipeline behind `prepare`, streamed: bounded memory, every core, any number of ranks.

Nothing holds the corpus. The input files are cut into *chunks* (consecutive files in
corpus order, about `CHUNK_BYTES` of input each: a pure function of the file list, never of
the number of workers or ranks), and the chunks go through two passes:

1. **read, clean, sign** (`read_clean_sign`, in worker processes): each chunk's files are
   read, cleaned, and for every kept document the worker writes its cleaned text to the
   chunk's *spill file* (in the staging folder, deleted at the end) and returns only a
   per-document row: name, length, line count, exact-duplicate hash (16 bytes), MinHash
   signature (4 bytes a permutation). The main process keeps those rows: a few hundred
   bytes a document, never the text.
2. **encode** (`encode_chunk`, in worker processes): once dedup and the split have decided
   which document goes where and the tokenizer is trained, each chunk's kept documents are
   read back from its spill file and encoded; the main process appends the ids to the
   train and validation shards (`ShardWriter`: streamed to a temporary file, the header
   written at the end, renamed into place).

Order: `Workers.map` yields results in chunk order whatever order the workers finish in, and
each result is a function of its chunk alone, so the shards and the tokenizer are
byte-identical for any number of workers.

Between the passes, on the per-document rows only:

* **dedup** (`global_dedup`): exact duplicates by their hash, near duplicates by MinHash +
  LSH, the first of each group kept (corpus order), exactly `gpt.data.dedup.deduplicate`'s
  rules. Under mpiexec each rank holds the rows of its share of the chunks (a contiguous
  range, so corpus order is rank order); the hashes and the LSH band keys go to the rank
  that owns them (key mod ranks) in one buffer-based all-to-all each, the owner finds the
  documents that share a key, rank 0 verifies the candidate pairs on their signatures
  (gathered from their ranks) and decides, greedily in corpus order, and broadcasts what is
  removed. One process runs the same code with a group of one.
* **split** by document (`split_documents` over the kept documents, as before).
* **tokenizer**: trained by rank 0 on a sample of the training documents
  (`sample_documents`: all of them when their lines fit sentencepiece's
  ``input_sentence_size``, else random documents up to that many lines; sentencepiece then
  samples lines itself), read back from the spill files (gathered from the other ranks).

Under mpiexec each rank writes its own shards (``train-00001-of-00002.bin``) and meta.json
lists them; the concatenation of the ranks' shards in rank order is exactly the single
process's shard.
"""

from __future__ import annotations

import hashlib
import os
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from gpt.data import exchange
from gpt.data.clean import CleanConfig, CleanReport, clean_text
from gpt.data.corpus import JSONL_SUFFIXES, CorpusReport, jsonl_pieces, read_file
from gpt.data.dedup import (
    DedupConfig,
    DedupReport,
    band_keys,
    bucket_pairs,
    empty_signature,
    exact_key,
    greedy_removals,
    minhash_signatures,
    shingle_hashes,
)
from gpt.data.errors import DataError
from gpt.data.shards import ShardWriter, dtype_for_vocab, split_documents

CHUNK_BYTES = 4 << 20  # input bytes per task (a chunk of consecutive files)
CHUNK_FILES = 2048  # and at most this many files
_SPILL_ENCODING = ("utf-8", "surrogatepass")  # JSON strings may hold lone surrogates


def peak_rss_mb() -> float:
    """This process's peak resident memory so far, in MB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ----------------------------------------------------------------------------- chunks


def _entries(files: list[tuple[Path, str, int]]):
    """(path, key, bytes, piece) per file; a JSON Lines file larger than a chunk is cut at
    line ends into pieces of about `CHUNK_BYTES` (`corpus.jsonl_pieces`), so one big file is
    read in bounded memory and spread over the workers and ranks like many small ones."""
    for path, key, n in files:
        if n > CHUNK_BYTES and Path(path).suffix.lower() in JSONL_SUFFIXES:
            try:
                pieces, sha = jsonl_pieces(Path(path), CHUNK_BYTES)
            except OSError:         # unreadable: read_file counts it as skipped, as any file
                pieces = None
            if pieces:
                for i, (start, end, first_line) in enumerate(pieces):
                    yield str(path), key, end - start, (start, end, first_line, sha if i == 0 else None)
                continue
        yield str(path), key, n, None


def make_chunks(files: list[tuple[Path, str, int]]) -> list[list[tuple[str, str, int, tuple | None]]]:
    """Consecutive files (or pieces of a large .jsonl), about `CHUNK_BYTES` (and at most
    `CHUNK_FILES`) each: ``(path, key, bytes, piece)`` entries."""
    chunks: list[list] = []
    current: list = []
    size = 0
    for entry in _entries(files):
        n = entry[2]
        if current and (size + n > CHUNK_BYTES or len(current) >= CHUNK_FILES):
            chunks.append(current)
            current, size = [], 0
        current.append(entry)
        size += n
    if current:
        chunks.append(current)
    return chunks


def rank_share(chunk_bytes: list[int], ranks: int, rank: int) -> range:
    """The chunks rank ``rank`` of ``ranks`` reads: a contiguous range (so corpus order is
    rank order), balanced by input bytes."""
    starts = np.cumsum([0] + list(chunk_bytes))[:-1]
    total = max(1, int(sum(chunk_bytes)))
    owner = np.minimum(ranks - 1, (starts * ranks) // total)
    mine = np.flatnonzero(owner == rank)
    return range(int(mine[0]), int(mine[-1]) + 1) if len(mine) else range(0)


# ----------------------------------------------------------------------------- pass 1


@dataclass
class ChunkRows:
    """What a worker returns for one chunk: a row per kept document, no text."""

    sources: list[str]
    nbytes: np.ndarray  # (n,) int64: UTF-8 bytes of the cleaned text in the spill file
    nlines: np.ndarray  # (n,) int64
    exact: np.ndarray | None  # (n, 2) uint64: the exact-duplicate hash (blake2b-128)
    signatures: np.ndarray | None  # (n, num_perm) uint32
    corpus: CorpusReport
    clean: CleanReport
    entries: list[tuple[str, str]]  # fingerprint entries of the files read
    input_bytes: int
    rss_mb: float


def read_clean_sign(task: dict) -> ChunkRows:
    """Pass 1 on one chunk: read its files, clean, write the kept texts to ``task["spill"]``,
    and return their rows (exact hashes, MinHash signatures)."""
    clean_cfg = CleanConfig.from_options(task["clean"])
    dedup_cfg = DedupConfig.from_options(task["dedup"])
    corpus, clean = CorpusReport(), CleanReport(config=clean_cfg.to_dict())
    sources, nbytes, nlines, exact, shingles, entries = [], [], [], [], [], []
    with open(task["spill"], "wb") as spill:
        for path, key, _, piece in task["files"]:
            docs, entry = read_file(Path(path), key, task["text_field"], task["errors"], corpus, piece)
            if entry is not None:
                entries.append(entry)
            corpus.documents += len(docs)
            for doc in docs:
                corpus.chars += len(doc.text)
                text = clean_text(doc.text, doc.source, clean_cfg, clean)
                if text is None:
                    continue
                data = text.encode(*_SPILL_ENCODING)
                spill.write(data)
                sources.append(doc.source)
                nbytes.append(len(data))
                nlines.append(text.count("\n") + 1)
                if dedup_cfg.exact:
                    exact.append(exact_key(text))
                if dedup_cfg.near:
                    shingles.append(shingle_hashes(text, dedup_cfg.shingle_size))
    clean.documents_out = len(sources)
    n = len(sources)
    return ChunkRows(
        sources=sources,
        nbytes=np.asarray(nbytes, dtype=np.int64),
        nlines=np.asarray(nlines, dtype=np.int64),
        exact=np.frombuffer(b"".join(exact), dtype=np.uint64).reshape(n, 2).copy() if dedup_cfg.exact else None,
        signatures=minhash_signatures(shingles, dedup_cfg.num_perm, dedup_cfg.seed) if dedup_cfg.near else None,
        corpus=corpus,
        clean=clean,
        entries=entries,
        input_bytes=sum(e[2] for e in task["files"]),
        rss_mb=peak_rss_mb(),
    )


@dataclass
class LocalDocs:
    """This rank's documents after pass 1, as rows (corpus order); ``chunk``/``offset`` say
    where each one's text is in the spill files."""

    sources: list[str] = field(default_factory=list)
    chunk: list[np.ndarray] = field(default_factory=list)  # then (n,) int64
    offset: list[np.ndarray] = field(default_factory=list)
    nbytes: list[np.ndarray] = field(default_factory=list)
    nlines: list[np.ndarray] = field(default_factory=list)
    exact: list[np.ndarray] = field(default_factory=list)
    signatures: list[np.ndarray] = field(default_factory=list)
    corpus: CorpusReport = field(default_factory=CorpusReport)
    clean: CleanReport | None = None
    entries: list[tuple[str, str]] = field(default_factory=list)
    worker_rss_mb: float = 0.0

    def add(self, chunk_id: int, rows: ChunkRows) -> None:
        n = len(rows.sources)
        self.sources.extend(rows.sources)
        self.chunk.append(np.full(n, chunk_id, dtype=np.int64))
        self.offset.append(np.r_[0, np.cumsum(rows.nbytes)[:-1]].astype(np.int64) if n else np.empty(0, np.int64))
        self.nbytes.append(rows.nbytes)
        self.nlines.append(rows.nlines)
        if rows.exact is not None:
            self.exact.append(rows.exact)
        if rows.signatures is not None:
            self.signatures.append(rows.signatures)
        self.corpus.merge(rows.corpus)
        if self.clean is None:
            self.clean = rows.clean
        else:
            self.clean.merge(rows.clean)
        self.entries.extend(rows.entries)
        self.worker_rss_mb = max(self.worker_rss_mb, rows.rss_mb)

    def finish(self, num_perm: int) -> None:
        def cat(parts, shape, dtype):
            return np.concatenate(parts) if parts else np.empty(shape, dtype)

        self.chunk = cat(self.chunk, 0, np.int64)
        self.offset = cat(self.offset, 0, np.int64)
        self.nbytes = cat(self.nbytes, 0, np.int64)
        self.nlines = cat(self.nlines, 0, np.int64)
        self.exact = cat(self.exact, (0, 2), np.uint64)
        self.signatures = cat(self.signatures, (0, num_perm), np.uint32)

    def __len__(self) -> int:
        return len(self.sources)


# ----------------------------------------------------------------------------- dedup


def global_dedup(group, docs: LocalDocs, config: DedupConfig) -> tuple[np.ndarray, DedupReport | None]:
    """Exact then near duplicates over the documents of every rank; returns this rank's
    ``removed`` mask (n_local,) and, on rank 0, the report. Every rank calls it."""
    n = len(docs)
    counts = exchange.counts_of_all(group, n)
    rank = 0 if exchange.single(group) else group.rank
    first = int(counts[:rank].sum())  # global index of this rank's first document
    gidx = np.arange(first, first + n, dtype=np.int64)
    removed = np.zeros(n, dtype=bool)
    n_total = int(counts.sum())
    is_root = rank == 0
    report = DedupReport(documents_in=n_total, config=config.to_dict()) if is_root else None
    exact_pairs = np.empty((0, 2), dtype=np.int64)  # (removed, kept) global indices

    if config.exact:
        # each hash to the rank that owns it; that rank keeps the first document of each
        rows = np.column_stack([docs.exact.view(np.int64), gidx])  # (n, 3): hash words, index
        dest = (docs.exact[:, 0] % np.uint64(max(1, counts.size))).astype(np.int64)
        mine = exchange.all_to_all_rows(group, rows, dest)
        order = np.lexsort((mine[:, 2], mine[:, 1], mine[:, 0]))
        mine = mine[order]
        same = np.zeros(len(mine), dtype=bool)  # the same hash as the row before
        same[1:] = (mine[1:, 0] == mine[:-1, 0]) & (mine[1:, 1] == mine[:-1, 1])
        group_start = np.maximum.accumulate(np.where(~same, np.arange(len(mine)), 0))
        dups = np.column_stack([mine[same, 2], mine[group_start[same], 2]])
        exact_pairs = exchange.all_gather_rows(group, dups.astype(np.int64))
        exact_pairs = exact_pairs[np.argsort(exact_pairs[:, 0], kind="stable")]
        local = exact_pairs[(exact_pairs[:, 0] >= first) & (exact_pairs[:, 0] < first + n), 0] - first
        removed[local] = True

    near: list[tuple[int, int, float]] = []
    survivors = n_total - len(exact_pairs)
    if config.near and survivors > 1:
        bands, rows_per_band = config.bands_rows()
        live = np.flatnonzero(~removed & ~empty_signature(docs.signatures))
        keys = band_keys(docs.signatures[live], bands, rows_per_band)  # (n_live, bands) uint64
        records = np.column_stack([keys.ravel().view(np.int64), np.repeat(gidx[live], bands)])
        dest = (keys.ravel() % np.uint64(counts.size)).astype(np.int64)
        mine = exchange.all_to_all_rows(group, records, dest)  # the band keys this rank owns
        pairs = bucket_pairs(mine[:, 0].view(np.uint64), mine[:, 1])
        pairs = exchange.gather_rows(group, pairs.astype(np.int64))
        if is_root:
            pairs = np.unique(pairs, axis=0) if len(pairs) else pairs.reshape(0, 2)
            involved = np.unique(pairs)
        else:
            involved = None
        involved = exchange.broadcast_rows(group, None if involved is None else involved[:, None], 1, np.int64)[:, 0]
        held = involved[(involved >= first) & (involved < first + n)]
        sig_rows = np.column_stack([held, docs.signatures[held - first].astype(np.int64)])
        sig_rows = exchange.gather_rows(group, sig_rows.reshape(-1, 1 + config.num_perm))
        decided = None
        if is_root:
            where = {int(g): k for k, g in enumerate(sig_rows[:, 0])}
            sig = sig_rows[:, 1:]
            a = sig[[where[int(i)] for i in pairs[:, 0]]] if len(pairs) else sig[:0]
            b = sig[[where[int(j)] for j in pairs[:, 1]]] if len(pairs) else sig[:0]
            similarity = (a == b).mean(axis=1) if len(pairs) else np.empty(0)
            similar = similarity >= config.threshold
            report.bands, report.rows = bands, rows_per_band
            report.candidate_pairs, report.similar_pairs = len(pairs), int(similar.sum())
            near = greedy_removals(pairs[similar], similarity[similar])
            decided = np.array([(j, i) for j, i, _ in near], dtype=np.int64).reshape(-1, 2)
        decided = exchange.broadcast_rows(group, decided, 2, np.int64)
        local = decided[(decided[:, 0] >= first) & (decided[:, 0] < first + n), 0] - first
        removed[local] = True

    # the names report.json gives to each removed document and the one it duplicates
    wanted = np.unique(np.r_[exact_pairs.ravel(), np.array([k for j, i, _ in near for k in (j, i)], np.int64)])
    wanted = exchange.broadcast_rows(group, wanted[:, None] if is_root else None, 1, np.int64)[:, 0]
    held = wanted[(wanted >= first) & (wanted < first + n)]
    names = exchange.gather_objects(group, {int(g): docs.sources[int(g) - first] for g in held})
    if is_root:
        name = {k: v for part in names for k, v in part.items()}
        for j, i in exact_pairs.tolist():
            report.duplicates.append({"removed": name[j], "kept": name[i], "kind": "exact", "similarity": 1.0})
        for j, i, s in near:
            report.duplicates.append({"removed": name[j], "kept": name[i], "kind": "near", "similarity": round(s, 4)})
        report.exact_removed, report.near_removed = len(exact_pairs), len(near)
        report.documents_out = n_total - len(exact_pairs) - len(near)
    return removed, report


# ----------------------------------------------------------------------------- split + tokenizer sample


def sample_documents(lines: np.ndarray, budget: int, seed: int) -> np.ndarray:
    """Which training documents the tokenizer is trained on (sorted indices): all of them
    when their lines fit in ``budget`` (sentencepiece's ``input_sentence_size``), else
    documents drawn at random (seeded) until they hold ``budget`` lines."""
    if int(lines.sum()) <= budget:
        return np.arange(len(lines), dtype=np.int64)
    order = np.random.default_rng([seed, 1]).permutation(len(lines))
    take = int(np.searchsorted(np.cumsum(lines[order]), budget)) + 1
    return np.sort(order[:take]).astype(np.int64)


def split_cut(text: str, val_fraction: float) -> int:
    """Where one document is cut into (train, val): the line boundary nearest to
    ``1 - val_fraction`` of its length (a corpus of a single document)."""
    cut = int(len(text) * (1.0 - val_fraction))
    after = text.find("\n", cut)
    before = text.rfind("\n", 0, cut)
    candidates = [i + 1 for i in (after, before) if 0 <= i < len(text) - 1]
    if candidates:
        cut = min(candidates, key=lambda i: abs(i - int(len(text) * (1.0 - val_fraction))))
    return min(max(cut, 1), len(text) - 1)


def read_spill(path: Path, offset: int, nbytes: int) -> str:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(nbytes).decode(*_SPILL_ENCODING)


# ----------------------------------------------------------------------------- pass 2

TRAIN, VAL, CUT = 0, 1, 2  # where a document's tokens go (CUT: head to train, tail to val)
_TOKENIZERS: dict[str, object] = {}  # a worker's tokenizer, loaded once per file


def encode_chunk(task: dict) -> dict:
    """Pass 2 on one chunk: encode its kept documents (``task["docs"]``: rows of offset,
    bytes, destination, cut) from the spill file; returns the train and val ids (each
    document followed by eos) in the shard's dtype."""
    from gpt.data.tokenizer import ByteTokenizer, SentencePieceTokenizer, load_tokenizer

    tok = _TOKENIZERS.get(task["tokenizer"])
    if tok is None:
        tok = _TOKENIZERS[task["tokenizer"]] = load_tokenizer(task["tokenizer"])
    dtype = dtype_for_vocab(tok.vocab_size)
    train, val = [], []
    with open(task["spill"], "rb") as f:
        blob = f.read()
    for offset, nbytes, dest, cut in task["docs"]:
        text = blob[offset : offset + nbytes].decode(*_SPILL_ENCODING)
        if dest == CUT:
            train.append(text[:cut])
            val.append(text[cut:])
        else:
            (train if dest == TRAIN else val).append(text)
    eos = np.array([tok.eos_id], dtype=dtype)

    def encode(texts: list[str]) -> np.ndarray:
        if not texts:
            return np.empty(0, dtype=dtype)
        if isinstance(tok, ByteTokenizer):  # the bytes are the ids
            ids = [np.frombuffer(t.encode("utf-8"), dtype=np.uint8) for t in texts]
        elif isinstance(tok, SentencePieceTokenizer):
            ids = tok.encode_batch(texts, num_threads=1)  # the worker processes are the parallelism
        else:
            ids = tok.encode_batch(texts)
        parts = []
        for one in ids:
            parts.append(np.asarray(one, dtype=dtype))
            parts.append(eos)
        return np.concatenate(parts)

    return {
        "train": encode(train),
        "val": encode(val),
        "train_bytes": sum(len(t.encode("utf-8")) for t in train),
        "train_documents": len(train),
        "rss_mb": peak_rss_mb(),
    }


# ----------------------------------------------------------------------------- the driver


def _progress(enabled: bool, total: int, desc: str):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, leave=False)


def _stop_together(group, err: Exception | None) -> None:
    """Raise ``err`` on the lowest rank that has one and a quiet PeerError on the others
    (gpt.distributed.agree_on_errors); one process just raises it."""
    if exchange.single(group):
        if err is not None:
            raise err
        return
    from gpt.distributed import agree_on_errors

    agree_on_errors(group, err)


@dataclass
class StreamResult:
    """What the pipeline produced; the reports are complete on rank 0 only."""

    corpus: CorpusReport
    clean: CleanReport
    dedup: DedupReport | None
    entries: list[tuple[str, str]]
    n_kept: int
    train_documents: int
    val_documents: int
    single_document_split: bool
    tokenizer: object
    train_files: list[tuple[str, int]]  # (file name, tokens) of every rank, rank order
    val_files: list[tuple[str, int]]
    train_bytes: int
    timings: dict
    peak_rss_mb: list[dict]  # per rank: {"main": MB, "workers": MB}
    chunks: int
    workers: int = 1         # processes per rank that ran (at most the chunks to read)


def shard_names(ranks: int, rank: int) -> tuple[str, str]:
    if ranks == 1:
        return "train.bin", "val.bin"
    return f"train-{rank:05d}-of-{ranks:05d}.bin", f"val-{rank:05d}-of-{ranks:05d}.bin"


def run(
    group,
    out: Path,
    work: Path,
    chunks: list[list[tuple[str, str, int]]],
    options: dict,
    *,
    workers: int,
    progress: bool,
    nothing_left,
) -> StreamResult:
    """Run both passes into the folder ``out`` (this rank's shards and, on rank 0, the
    tokenizer), with spill files in ``work``. ``chunks`` is the whole corpus's (every rank
    gets the same list and reads its share). ``nothing_left(corpus, clean, dedup)`` makes
    the error for a corpus that cleaning and dedup emptied. Every rank calls it."""
    from gpt.data.tokenizer import DEFAULT_SENTENCES, tokenizer_filename, train_tokenizer
    from gpt.data.workers import Workers

    o = options
    ranks = 1 if exchange.single(group) else group.size
    rank = 0 if exchange.single(group) else group.rank
    is_root = rank == 0
    progress = progress and is_root
    clean_cfg = CleanConfig.from_options(o["clean"])
    dedup_cfg = DedupConfig.from_options(o["dedup"])
    timings: dict[str, float] = {}
    clock = [time.perf_counter()]

    def lap(name: str) -> None:
        now = time.perf_counter()
        timings[name] = round(now - clock[0], 3)
        clock[0] = now

    share = rank_share([sum(e[2] for e in c) for c in chunks], ranks, rank)
    spill = {cid: work / f"chunk-{cid:06d}.txt" for cid in share}
    docs = LocalDocs(clean=CleanReport(config=clean_cfg.to_dict()))
    import sys

    workers = max(1, min(workers, len(share)))  # never more processes than chunks to read
    with Workers(workers, fork="mpi4py.MPI" not in sys.modules) as pool:  # never fork an MPI process
        pool.start(len(share))
        # ------------------------------------------------------------ pass 1
        tasks = ({"files": chunks[cid], "spill": str(spill[cid]), "text_field": o["text_field"],
                  "errors": o["errors"], "clean": o["clean"], "dedup": o["dedup"]} for cid in share)
        bar = _progress(progress, sum(e[2] for cid in share for e in chunks[cid]),
                        "read, clean, minhash" + (f" (rank 0 of {ranks})" if ranks > 1 else ""))
        err = None
        try:
            for cid, rows in zip(share, pool.map(read_clean_sign, tasks, len(share))):
                docs.add(cid, rows)
                if bar is not None:
                    bar.update(rows.input_bytes)
        except DataError as exc:  # a bad input file: every rank stops, its message once
            err = exc
        finally:
            if bar is not None:
                bar.close()
        _stop_together(group, err)
        docs.finish(dedup_cfg.num_perm)
        lap("read+clean+minhash")

        # ------------------------------------------------------------ reports of every rank, dedup
        parts = exchange.gather_objects(group, (docs.corpus, docs.clean, docs.entries))
        corpus, clean, entries = docs.corpus, docs.clean, docs.entries
        if is_root and ranks > 1:
            corpus, clean, entries = CorpusReport(), CleanReport(config=clean_cfg.to_dict()), []
            for c, cl, e in parts:
                corpus.merge(c)
                clean.merge(cl)
                entries.extend(e)
        docs.entries = None
        removed, dedup_report = global_dedup(group, docs, dedup_cfg)
        lap("dedup")

        # ------------------------------------------------------------ split
        kept = np.flatnonzero(~removed)
        kept_counts = exchange.counts_of_all(group, len(kept))
        n_kept = int(kept_counts.sum())
        _stop_together(group, DataError(nothing_left(corpus, clean, dedup_report))
                       if n_kept == 0 and is_root else None)
        val_fraction, seed = o["val_fraction"], o["seed"]
        single = n_kept == 1 and val_fraction > 0
        first_kept = int(kept_counts[:rank].sum())
        dest = np.full(len(kept), TRAIN, dtype=np.int64)
        cut = np.zeros(len(kept), dtype=np.int64)
        if single:
            if len(kept):
                k = int(kept[0])
                text = read_spill(spill[int(docs.chunk[k])], int(docs.offset[k]), int(docs.nbytes[k]))
                dest[0], cut[0] = CUT, split_cut(text, val_fraction)
            n_train, n_val = 1, 1
        else:
            _, val_idx = split_documents(n_kept, val_fraction, seed)
            is_val = np.zeros(n_kept, dtype=bool)
            is_val[val_idx] = True
            dest[is_val[first_kept : first_kept + len(kept)]] = VAL
            n_val = len(val_idx)
            n_train = n_kept - n_val

        # ------------------------------------------------------------ tokenizer (rank 0, on a sample)
        kind, vocab_size = o["tokenizer"], o["vocab_size"]
        tok_file = tokenizer_filename(kind)
        err, proto = None, None
        if kind == "byte":
            tok = train_tokenizer([], "byte")
        else:
            mine = kept[dest != VAL]  # this rank's training documents, in order
            lines = exchange.all_gather_rows(group, docs.nlines[mine][:, None])[:, 0]
            first_train = int(exchange.counts_of_all(group, len(mine))[:rank].sum())
            options = dict(o["tokenizer_options"])
            chosen = sample_documents(lines, options.get("input_sentence_size") or DEFAULT_SENTENCES[kind], seed)
            n_sample = len(chosen)
            chosen = chosen[(chosen >= first_train) & (chosen < first_train + len(mine))] - first_train

            def text_of(k: int) -> str:
                t = read_spill(spill[int(docs.chunk[k])], int(docs.offset[k]), int(docs.nbytes[k]))
                return t[: cut[np.searchsorted(kept, k)]] if single else t

            own = (text_of(int(mine[c])) for c in chosen)
            if ranks > 1:  # the other ranks' sampled texts go to rank 0
                texts = [text_of(int(mine[c])) for c in chosen] if not is_root else []
                blob = "\n".join(texts).encode(*_SPILL_ENCODING) if texts else b""
                gathered = exchange.gather_bytes(group, blob if texts else b"")
            if is_root:
                if progress:
                    print(f"training {kind} tokenizer (vocab_size={vocab_size}) on {n_sample} of the "
                          f"{n_train} training documents ...", flush=True)

                def sample():
                    yield from own
                    if ranks > 1:
                        for blob in gathered[1:]:
                            if blob:
                                # one text per rank: the documents joined by "\n" give the
                                # same lines as the documents one by one
                                yield blob.decode(*_SPILL_ENCODING)

                try:
                    tok = train_tokenizer(sample(), kind, vocab_size, **{"seed": seed, **options})
                    proto = tok.model_proto
                except DataError as exc:
                    err = exc
            exchange.idle_barrier(group)  # the other ranks sleep while rank 0 trains
            _stop_together(group, err)
            proto = exchange.broadcast_bytes(group, proto)
            if not is_root:
                from gpt.data.tokenizer import SentencePieceTokenizer

                tok = SentencePieceTokenizer(proto, kind=kind)
        tok.save(work / tok_file)  # what the workers load
        if is_root:
            tok.save(out / tok_file)
        lap("tokenizer")

        # ------------------------------------------------------------ pass 2
        train_name, val_name = shard_names(ranks, rank)
        by_chunk: dict[int, list] = {}
        for k, d, c in zip(kept.tolist(), dest.tolist(), cut.tolist()):
            by_chunk.setdefault(int(docs.chunk[k]), []).append((int(docs.offset[k]), int(docs.nbytes[k]), d, c))
        encode_chunks = list(by_chunk)
        chunk_text_bytes = [sum(r[1] for r in by_chunk[cid]) for cid in encode_chunks]
        tasks = ({"spill": str(spill[cid]), "docs": by_chunk.pop(cid), "tokenizer": str(work / tok_file)}
                 for cid in encode_chunks)
        bar = _progress(progress, int(docs.nbytes[kept].sum()), "encode" + (f" (rank 0 of {ranks})" if ranks > 1 else ""))
        train_bytes = 0
        worker_rss = docs.worker_rss_mb
        try:
            with ShardWriter(out / train_name, tok.vocab_size) as train_w, \
                    ShardWriter(out / val_name, tok.vocab_size) as val_w:
                for nbytes, res in zip(chunk_text_bytes, pool.map(encode_chunk, tasks, len(encode_chunks))):
                    train_w.write(res["train"])
                    val_w.write(res["val"])
                    train_bytes += res["train_bytes"]
                    worker_rss = max(worker_rss, res["rss_mb"])
                    if bar is not None:
                        bar.update(nbytes)
        finally:
            if bar is not None:
                bar.close()
        lap("encode+write")

    counts = exchange.all_gather_rows(group, np.array([[train_w.count, val_w.count, train_bytes]], dtype=np.int64))
    names = [shard_names(ranks, r) for r in range(ranks)]
    rss = exchange.gather_objects(group, {"main": round(peak_rss_mb(), 1),
                                          "workers": round(worker_rss, 1) if workers > 1 else None})
    return StreamResult(
        corpus=corpus, clean=clean, dedup=dedup_report, entries=entries, n_kept=n_kept,
        train_documents=n_train, val_documents=n_val, single_document_split=single, tokenizer=tok,
        train_files=[(names[r][0], int(counts[r, 0])) for r in range(ranks)],
        val_files=[(names[r][1], int(counts[r, 1])) for r in range(ranks)],
        train_bytes=int(counts[:, 2].sum()), timings=timings, peak_rss_mb=rss, chunks=len(chunks),
        workers=workers,
    )
