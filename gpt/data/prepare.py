"""Run the whole data pipeline into a prepared data folder, and read one back.

``prepare`` chains the stages (corpus -> clean -> dedup -> split -> tokenizer ->
shards), streamed in bounded memory through worker processes and, under mpiexec, over
several ranks (`gpt.data.stream`), and writes into ``out_dir``::

    report.json       what every stage kept and dropped, how long it took, the processes
                      and their peak memory
    tokenizer.model   the sentencepiece model (``tokenizer.json`` for the byte tokenizer)
    train.bin         token shard of the training documents, each followed by eos
    val.bin           token shard of the validation documents (under mpiexec: one train and
                      one val shard per rank, ``train-00000-of-00002.bin`` ...)
    meta.json         vocab size, tokenizer kind, token counts, the shards of each split,
                      corpus fingerprint, the options, the folder format version

The new folder is written beside ``out_dir`` (hidden, ``.<name>.partial-*``, which also
holds the cleaned text while the pipeline runs) and renamed into place only when complete,
so *a folder with meta.json is a complete one*: a crash or an error mid-way leaves the
previous content as it was (and no half-written folder).

``out_dir`` is sacred when it holds something else: `check_out_dir` refuses, before
anything is read or written, a file, a non-empty folder that is not a prepared one (the
user's files), and a preparation of other data or with other options (naming its data,
tokenizer and vocab size and what differs), unless ``overwrite=True`` (``--overwrite``).
A preparation of the same data with the same options is prepared again in place (its
input may have changed); the CLI first asks `is_prepared` and does nothing when the
folder is already up to date. How it runs (``workers``, the ranks) is not an option: the
output is the same.

The split is by document and happens before the tokenizer is trained, so the tokenizer
never sees validation text. A corpus of a single document (one big text file) is split
at the line boundary nearest to ``1 - val_fraction`` of its length instead.

``is_prepared(out_dir, ...)`` says whether a folder holds exactly what ``prepare`` would
write for the same options and the same input (corpus fingerprint); ``ensure_prepared``
prepares only when needed, so the default corpus is prepared once and reused.

Timing: each stage's time is in report.json; bench/bench_prepare.py measures 0.1 to 1 GB
(bench/README.md).
"""

from __future__ import annotations

import inspect
import json
import os
import re
import secrets
import shutil
import sys
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from nn.checkpoint import fsync_path

from gpt.data.clean import CLEAN_OPTIONS, THRESHOLD_OF_REASON, CleanConfig, clean_documents, parse_threshold
from gpt.data.corpus import check_data_paths, corpus_fingerprint, default_corpus_root, fingerprint_of, plan_corpus
from gpt.data.dedup import DedupConfig
from gpt.data.errors import DataError, DataFileNotFoundError
from gpt.data.shards import FORMAT_VERSION as SHARD_FORMAT_VERSION
from gpt.data.shards import ShardWriter, atomic_write_text, read_header  # noqa: F401 (ShardWriter: gpt.data.stream's, patched by tests)
from gpt.data.tokenizer import TOKENIZER_KINDS, Tokenizer, load_tokenizer, tokenizer_filename

PREPARED_FORMAT_VERSION = 1
META_FILE, REPORT_FILE, TRAIN_FILE, VAL_FILE = "meta.json", "report.json", "train.bin", "val.bin"


def _not_prepared(out_dir: Path, why: str) -> str:
    if out_dir.is_file() or (out_dir.is_dir() and not (out_dir / META_FILE).exists()
                             and any(out_dir.iterdir())):
        # raw text, not a prepared folder: prepare it into a folder of its own
        return (f"{out_dir} is not a prepared data folder ({why}): prepare it first with "
                f"`tensorlite-gpt prepare --data {out_dir} --out data/<name>`, then pass "
                f"--data data/<name>")
    return f"data folder {out_dir} is not prepared ({why}): run `tensorlite-gpt prepare --out {out_dir}`"


# ----------------------------------------------------------------------------- options


def _canonical_options(
    data,
    *,
    tokenizer: str,
    vocab_size: int,
    val_fraction: float,
    seed: int,
    include,
    exclude,
    text_field: str,
    errors: str,
    max_files,
    max_bytes,
    clean,
    dedup,
    tokenizer_options,
) -> dict:
    """The options as stored in meta.json: plain JSON values, paths made absolute, the
    clean/dedup configs expanded with their defaults, so equal runs compare equal."""
    if tokenizer not in TOKENIZER_KINDS:
        raise DataError(f"tokenizer={tokenizer!r} is not a tokenizer kind: use one of {TOKENIZER_KINDS}")
    if not (isinstance(val_fraction, (int, float)) and 0.0 <= val_fraction < 1.0):
        raise DataError(f"val_fraction={val_fraction!r} must be in [0, 1)")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**32:
        raise DataError(f"--seed {seed!r} must be an integer in [0, 2**32)")
    coverage = (tokenizer_options or {}).get("character_coverage")
    if coverage is not None and not (isinstance(coverage, (int, float))
                                     and 0.0 < coverage <= 1.0):
        raise DataError(f"--character-coverage {coverage!r} must be in (0, 1] (the share of "
                        "characters that get their own pieces; 0.9995 by default)")
    if data is not None:
        data = [data] if isinstance(data, (str, os.PathLike)) else list(data)
        data = [str(Path(p).resolve()) for p in data]
    options = {
        "data": data,
        "include": None if include is None else list(include),
        "exclude": None if exclude is None else list(exclude),
        "text_field": text_field,
        "errors": errors,
        "max_files": max_files,
        "max_bytes": max_bytes,
        "clean": CleanConfig.from_options(clean).to_dict(),
        "dedup": DedupConfig.from_options(dedup).to_dict(),
        "tokenizer": tokenizer,
        "vocab_size": vocab_size,
        "tokenizer_options": dict(tokenizer_options or {}),
        "val_fraction": val_fraction,
        "seed": seed,
    }
    return json.loads(json.dumps(options))  # tuples -> lists, like a meta.json read back


# ----------------------------------------------------------------------------- report


def format_report(report: dict) -> str:
    """A short human summary of report.json (what prepare prints)."""
    c, cl, d, sp, tk, sh = (report[k] for k in ("corpus", "clean", "dedup", "split", "tokenizer", "shards"))
    dropped = ", ".join(f"{k}={v}" for k, v in cl["dropped"].items() if v) or "none"
    skipped = {k: c[k] for k in ("skipped_binary", "skipped_unreadable", "skipped_by_limit", "non_utf8_skipped",
                                 "jsonl_bad_lines", "jsonl_missing_field") if c[k]}
    # name the first few skipped JSONL lines (file:line), so a bad line can be found
    where = [f"{k} e.g. {', '.join(c['examples'][k][:3])}" for k in ("jsonl_bad_lines", "jsonl_missing_field")
             if c[k] and c.get("examples", {}).get(k)]
    lines = [
        f"corpus : {c['files_read']} files, {c['bytes_read'] / 1e6:.1f} MB -> {c['documents']} documents"
        + (f" (skipped {skipped})" if skipped else "")
        + (f" ({'; '.join(where)})" if where else "")
        + (f", {c['non_utf8_replaced']} with non-UTF-8 bytes replaced" if c["non_utf8_replaced"] else ""),
        f"clean  : kept {cl['documents_out']}/{cl['documents_in']} (dropped: {dropped})",
        f"dedup  : kept {d['documents_out']}/{d['documents_in']} (exact duplicates {d['exact_removed']}, "
        f"near duplicates {d['near_removed']}"
        + (f", LSH {d['bands']} bands x {d['rows']} rows" if d["bands"] else "") + ")",
        f"split  : {sp['train_documents']} train / {sp['val_documents']} val documents"
        + (" (single document cut in two)" if sp["single_document_split"] else ""),
        f"tokens : {tk['kind']} vocab {tk['vocab_size']}, train {sh['train_tokens']:,} / val {sh['val_tokens']:,} "
        f"tokens ({sh['dtype']}), {tk['bytes_per_token']:.2f} bytes/token",
        "time   : " + ", ".join(f"{k} {v:.1f}s" for k, v in report["timings"].items()),
    ]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- prepare


def prepare(
    data: str | os.PathLike | Sequence[str | os.PathLike] | None,
    out_dir: str | os.PathLike,
    *,
    tokenizer: str = "bpe",
    vocab_size: int = 4096,
    val_fraction: float = 0.05,
    seed: int = 0,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    text_field: str = "text",
    errors: str = "replace",
    max_files: int | None = None,
    max_bytes: int | None = None,
    clean: CleanConfig | dict | None = None,
    dedup: DedupConfig | dict | None = None,
    tokenizer_options: dict | None = None,
    overwrite: bool = False,
    progress: bool = True,
    workers: int | None = None,
    world=None,
) -> dict:
    """Prepare a data folder; returns the metadata (the content of meta.json).

    Args:
        data: a file, a directory, a list of them, or None for the default corpus
            (the Python standard library's ``.py`` sources). See `gpt.data.corpus.read_corpus`
            for ``include``, ``exclude``, ``text_field``, ``errors``, ``max_files``,
            ``max_bytes``.
        out_dir: the folder to write (created if needed). What is already there is
            replaced only when it is a preparation of the same data with the same
            options (prepared again: its input may have changed), or with
            ``overwrite=True``; anything else (a preparation of other data or with other
            options, a folder of other files, a file) is a `DataError` raised before
            anything is read or written. See `check_out_dir`.
        tokenizer: ``"bpe"``, ``"unigram"``, ``"char"`` or ``"byte"``.
        vocab_size: sentencepiece vocabulary size (an upper bound for char; ignored for byte).
        val_fraction: the share of documents held out for validation, in [0, 1).
        seed: seeds the split and the tokenizer's sentence sampling.
        clean: `CleanConfig` or a dict of its fields (filter thresholds; None disables one).
        dedup: `DedupConfig` or a dict of its fields (exact/near, shingle_size,
            num_perm, threshold, ...).
        tokenizer_options: extra `SentencePieceTokenizer.train` options
            (character_coverage, input_sentence_size, max_sentence_length, num_threads).
        overwrite: replace whatever ``out_dir`` holds.
        progress: show tqdm bars and print the report summary.
        workers: processes that read, clean, sign and encode (default: the usable cores,
            shared among the ranks on this machine). The output is byte-identical for any
            number (`gpt.data.stream`).
        world: a `parallel.comm.Group` of several MPI ranks that prepare together (every
            rank calls `prepare` with the same arguments): each reads its share of the
            files and writes its own shards, listed in meta.json. None: one process.

    The new folder is written next to ``out_dir`` (a hidden ``.<name>.partial-*``
    folder) and renamed into place only when complete, so a crash or an error leaves the
    previous content untouched.

    Raises:
        DataFileNotFoundError: a data path does not exist.
        DataError: a bad option, an ``out_dir`` that must not be replaced or cannot be
            written, or nothing left to train on.
    """
    from gpt.data import exchange, stream
    from gpt.data.workers import usable_cores

    t_start = time.perf_counter()
    group = world if world is not None and world.size > 1 else None
    rank = group.rank if group is not None else 0
    out = Path(out_dir)
    if workers is None:
        local = 1
        if group is not None:
            from parallel.world import local_size

            local = local_size()
        workers = max(1, usable_cores() // local)
    err, setup, staging = None, None, None
    try:
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
            raise DataError(f"--workers {workers!r} must be a positive integer (the processes that read, clean, "
                            f"sign and encode; by default the usable cores)")
        options = _canonical_options(
            data, tokenizer=tokenizer, vocab_size=vocab_size, val_fraction=val_fraction, seed=seed,
            include=include, exclude=exclude, text_field=text_field, errors=errors, max_files=max_files,
            max_bytes=max_bytes, clean=clean, dedup=dedup, tokenizer_options=tokenizer_options,
        )
        if data is not None:
            check_data_paths(data)
        if rank == 0:  # one rank decides where to write and what to read; the others are told
            target = check_out_dir(out, options, overwrite=overwrite)
            staging = _make_staging(out, target)
            plan = plan_corpus(data, include=options["include"], exclude=options["exclude"],
                               errors=options["errors"], max_files=options["max_files"],
                               max_bytes=options["max_bytes"], skip_dirs=[out, staging])
            setup = (str(target), str(staging), stream.make_chunks(plan.files), plan.report)
    except DataError as exc:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
        err = exc
    exchange.idle_barrier(group)  # the other ranks sleep while rank 0 walks the input
    stream._stop_together(group, err)
    target, staging, chunks, plan_report = exchange.broadcast_object(group, setup)
    target, staging = Path(target), Path(staging)
    work = staging / f".work-{rank}"
    try:
        work.mkdir()
        result = stream.run(group, staging, work, chunks, options, workers=workers, progress=progress,
                            nothing_left=lambda c, cl, d: _nothing_left(c, cl, d, options["clean"]))
        shutil.rmtree(work)
        if group is not None:
            group.barrier()  # every rank's shards are complete
        meta = report = None
        if rank == 0:
            meta, report = _write_meta_and_report(staging, result, plan_report, options, result.workers,
                                                  1 if group is None else group.size, t_start)
            _swap_in(staging, target, out)
        exchange.idle_barrier(group)
    except BaseException as exc:
        shutil.rmtree(work, ignore_errors=True)
        if rank == 0:
            shutil.rmtree(staging, ignore_errors=True)
        if isinstance(exc, OSError) and not isinstance(exc, DataError):
            raise _write_error(out, exc) from exc
        raise
    meta = exchange.broadcast_object(group, meta)
    if progress and rank == 0:
        print(format_report(report), flush=True)
        names = [s["file"] for part in ("train", "val") for s in meta[part]["shards"]]
        print(f"prepared {out} ({META_FILE}, {REPORT_FILE}, {meta['tokenizer']['file']}, {', '.join(names)})",
              flush=True)
    return meta


def _write_meta_and_report(out: Path, result, plan_report, options: dict, workers: int, ranks: int,
                           t_start: float) -> tuple[dict, dict]:
    """report.json and meta.json (last) of a finished pipeline run (`gpt.data.stream.run`)."""
    corpus = result.corpus
    for name in ("roots", "files_matched", "skipped_by_limit", "errors_policy"):
        setattr(corpus, name, getattr(plan_report, name))
    corpus.fingerprint = fingerprint_of(result.entries, corpus.bytes_read)
    tok = result.tokenizer
    train_tokens = sum(n for _, n in result.train_files)
    val_tokens = sum(n for _, n in result.val_files)
    dtype = read_header(out / result.train_files[0][0]).dtype.name
    timings = dict(result.timings)
    timings["total"] = round(time.perf_counter() - t_start, 3)
    report = {
        "corpus": corpus.to_dict(),
        "clean": result.clean.to_dict(),
        "dedup": result.dedup.to_dict(),
        "split": {
            "train_documents": result.train_documents,
            "val_documents": result.val_documents,
            "val_fraction": options["val_fraction"],
            "seed": options["seed"],
            "single_document_split": result.single_document_split,
        },
        "tokenizer": {
            "kind": tok.kind,
            "vocab_size": tok.vocab_size,
            "requested_vocab_size": None if options["tokenizer"] == "byte" else options["vocab_size"],
            # text bytes per token on the training split, excluding the eos separators
            "bytes_per_token": result.train_bytes / max(1, train_tokens - result.train_documents),
        },
        "shards": {"train_tokens": train_tokens, "val_tokens": val_tokens, "dtype": dtype},
        "timings": timings,
        "processes": {"ranks": ranks, "workers_per_rank": workers, "chunks": result.chunks,
                      "peak_rss_mb": result.peak_rss_mb},
    }
    atomic_write_text(out / REPORT_FILE, json.dumps(report, indent=1) + "\n")

    def split(files, documents):
        return {"file": files[0][0], "tokens": sum(n for _, n in files), "documents": documents,
                "shards": [{"file": name, "tokens": n} for name, n in files]}

    tok_file = tokenizer_filename(tok.kind)
    meta = {
        "format_version": PREPARED_FORMAT_VERSION,
        "shard_format_version": SHARD_FORMAT_VERSION,
        "vocab_size": tok.vocab_size,
        "tokenizer": {
            "kind": tok.kind,
            "file": tok_file,
            "vocab_size": tok.vocab_size,
            "bos_id": tok.bos_id,
            "eos_id": tok.eos_id,
            "pad_id": tok.pad_id,
        },
        "dtype": dtype,
        "train": split(result.train_files, result.train_documents),
        "val": split(result.val_files, result.val_documents),
        "corpus": corpus.fingerprint,
        "options": options,
    }
    atomic_write_text(out / META_FILE, json.dumps(meta, indent=1) + "\n")
    return meta, report


def _nothing_left(cr, clean_report, dedup_report, clean: dict) -> str:
    """The message for an empty corpus after clean + dedup, naming the thresholds that
    dropped documents as the prepare options that loosen them."""
    dropped = {k: v for k, v in clean_report.dropped.items() if v}
    flags = [f"--{THRESHOLD_OF_REASON[r].replace('_', '-')} (now {clean[THRESHOLD_OF_REASON[r]]})" for r in dropped]
    if flags:
        advice = (f"loosen the threshold that dropped them: {', '.join(flags)} ('none' disables a filter; "
                  f"clean={{...}} in Python), or point the data path at more text")
    elif cr.jsonl_missing_field or cr.jsonl_bad_lines:
        where = ", ".join(cr.examples.get("jsonl_missing_field", cr.examples.get("jsonl_bad_lines", []))[:3])
        advice = (f"{cr.jsonl_missing_field} JSON Lines records had no string in the text field and "
                  f"{cr.jsonl_bad_lines} lines were not JSON objects (e.g. {where}): name the field that holds "
                  f"the text with --text-field, or fix the file")
    else:
        advice = "point the data path at (more) text files"
    cleaned = (", ".join(f"{n} {reason}" for reason, n in dropped.items()) if dropped else "none")
    return (
        f"no documents left to train on: read {cr.documents} documents from {cr.files_read} files "
        f"(skipped binary={cr.skipped_binary}, non-UTF-8={cr.non_utf8_skipped}), the clean stage dropped "
        f"{cleaned} and dedup removed {dedup_report.exact_removed + dedup_report.near_removed}; {advice}"
    )


# ----------------------------------------------------------------------------- the output folder

# what prepare writes into a folder (and the hidden temporary files of its atomic writes)
_OWN_FILES = frozenset({META_FILE, REPORT_FILE, TRAIN_FILE, VAL_FILE, "tokenizer.model", "tokenizer.json"})


_RANK_SHARD = re.compile(r"(train|val)-\d{5}-of-\d{5}\.bin")  # one per rank under mpiexec


def _is_own(name: str) -> bool:
    return name in _OWN_FILES or bool(_RANK_SHARD.fullmatch(name)) or (name.startswith(".") and name.endswith(".tmp"))


def looks_prepared(folder: str | os.PathLike) -> bool:
    """Whether a folder holds prepared data (meta.json and its train shard: ``train.bin``, or
    one per rank, ``train-00000-of-00002.bin``, when mpiexec prepared it), without checking it:
    what commands that write into a folder ask before refusing to write over the data."""
    folder = Path(folder)
    if not (folder / "meta.json").is_file():
        return False
    if (folder / "train.bin").exists():
        return True
    try:
        return any(_RANK_SHARD.fullmatch(p.name) for p in folder.iterdir())
    except OSError:
        return False


def describe_prepared(meta: dict) -> str:
    """What a prepared folder holds, in a few words: its data and tokenizer."""
    options = meta.get("options") if isinstance(meta.get("options"), dict) else {}
    data = options.get("data")
    source = "the default corpus (the Python standard library)" if data is None else ", ".join(map(str, data))
    tok = meta.get("tokenizer") if isinstance(meta.get("tokenizer"), dict) else {}
    return f"{source} ({tok.get('kind', '?')} tokenizer, vocab {meta.get('vocab_size', '?')})"


def _differences(there: dict, wanted: dict, limit: int = 4) -> str:
    """``"data (A there, B now), clean.min_chars (32 there, 5 now)"``."""

    def flat(d: dict) -> dict:
        items = {}
        for k, v in d.items():
            if isinstance(v, dict):
                items.update({f"{k}.{kk}": vv for kk, vv in v.items()})
            else:
                items[k] = v
        return items

    def show(k, v):
        if k == "data":
            return "the default corpus" if v is None else ", ".join(map(str, v))
        return "missing" if v is _MISSING else json.dumps(v)

    a, b = flat(there if isinstance(there, dict) else {}), flat(wanted)
    keys = list(b) + [k for k in a if k not in b]
    diffs = [f"{k} ({show(k, a.get(k, _MISSING))} there, {show(k, b.get(k, _MISSING))} now)"
             for k in keys if a.get(k, _MISSING) != b.get(k, _MISSING)]
    more = f" and {len(diffs) - limit} more" if len(diffs) > limit else ""
    return ", ".join(diffs[:limit]) + more


_MISSING = object()


def check_out_dir(out_dir: str | os.PathLike, options: dict, *, overwrite: bool = False) -> Path:
    """Check that ``prepare`` may write ``out_dir``; returns the real path to write.

    Allowed: a folder that does not exist or is empty; a prepared folder (readable
    meta.json) of the same data and options that holds nothing but prepare's own files;
    with ``overwrite``, any folder except one holding the data, the current folder or the
    home folder. Everything else is a `DataError` saying what is there, raised before
    anything is touched. ``options`` are the canonical options (`_canonical_options`).
    """
    out = Path(out_dir)
    target = out.resolve()  # a symlinked folder is replaced at its real location, the link kept
    for parent in target.parents:
        if parent.exists():
            if not parent.is_dir():
                raise DataError(f"--out {out} cannot be created: {parent} is a file, not a folder; "
                                f"choose another --out")
            break
    if not target.exists():
        return target
    if not target.is_dir():
        raise DataError(f"--out {out} is a file, not a folder: prepare writes a folder of several files; "
                        f"choose another --out (a new or empty folder)")
    try:
        entries = sorted(os.listdir(target))
    except OSError as exc:
        raise _write_error(out, exc) from exc
    if not entries:
        return target
    try:
        meta = read_meta(target)
    except DataError:
        meta = None
    if overwrite:
        _check_overwrite_is_safe(out, target, options)
        return target
    if meta is None:
        shown = ", ".join(entries[:5]) + (f" and {len(entries) - 5} more" if len(entries) > 5 else "")
        raise DataError(
            f"--out {out} is not empty and is not a prepared data folder (it holds {shown}): choose another "
            f"--out (a new or empty folder), or pass --overwrite to replace everything in it"
        )
    if meta.get("options") != options:
        raise DataError(
            f"--out {out} already holds data prepared from {describe_prepared(meta)}, with other data or options "
            f"than this run: {_differences(meta.get('options'), options)}; pass --overwrite to replace it, or "
            f"choose another --out"
        )
    foreign = [e for e in entries if not _is_own(e)]
    if foreign:
        raise DataError(
            f"--out {out} holds a preparation of the same data and options, and also other files "
            f"({', '.join(foreign[:5])}{' ...' if len(foreign) > 5 else ''}) that preparing again would delete: "
            f"move them out, or pass --overwrite to replace everything in it"
        )
    return target


def _check_overwrite_is_safe(out: Path, target: Path, options: dict) -> None:
    """--overwrite deletes the folder: never one that holds the input or the user's work."""
    roots = [Path(p) for p in options["data"]] if options["data"] is not None else [default_corpus_root()]
    guarded = [("the data path", r.resolve()) for r in roots] + [("the current folder", Path.cwd().resolve())]
    try:
        guarded.append(("the home folder", Path.home().resolve()))
    except (RuntimeError, KeyError):  # no home folder
        pass
    for what, path in guarded:
        if path == target or target in path.parents:
            raise DataError(f"--out {out} holds {what} ({path}): --overwrite would delete it; choose another --out")


def _write_error(out: Path, exc: OSError) -> DataError:
    why = exc.strerror or str(exc)
    where = f" ({exc.filename})" if exc.filename else ""
    return DataError(
        f"cannot write the prepared data to --out {out}: {why}{where}; choose an --out you can write to "
        f"(with free space)"
    )


def _remove_orphaned_staging(target: Path) -> None:
    """Remove the hidden staging folders of earlier prepares into ``target`` whose process is
    gone (killed with -9, or a machine that went down): nothing else would."""
    prefix = f".{target.name}.partial-"
    try:
        siblings = list(target.parent.iterdir())
    except OSError:
        return
    for path in siblings:
        if not path.name.startswith(prefix) or not path.is_dir():
            continue
        pid = path.name[len(prefix):].split("-")[0]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)       # still running: it is that process's
            continue
        except ProcessLookupError:
            shutil.rmtree(path, ignore_errors=True)
        except OSError:
            continue


def _make_staging(out: Path, target: Path) -> Path:
    """A new, empty, hidden folder next to ``target`` to prepare into."""
    _remove_orphaned_staging(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        while True:
            staging = target.parent / f".{target.name}.partial-{os.getpid()}-{secrets.token_hex(4)}"
            try:
                staging.mkdir()
                return staging
            except FileExistsError:
                continue
    except OSError as exc:
        raise _write_error(out, exc) from exc


def _swap_in(staging: Path, target: Path, out: Path) -> None:
    """Rename the complete ``staging`` folder to ``target``, replacing what is there."""
    if not os.path.lexists(target):
        os.rename(staging, target)
        fsync_path(str(target.parent))
        return
    old = target.parent / f".{target.name}.old-{os.getpid()}-{secrets.token_hex(4)}"
    os.rename(target, old)
    try:
        os.rename(staging, target)
    except BaseException:
        os.rename(old, target)
        raise
    fsync_path(str(target.parent))
    try:
        shutil.rmtree(old)
    except OSError as exc:
        print(f"warning: prepared {out}, but its previous content, moved to {old}, could not be deleted "
              f"({exc.strerror or exc}): delete it by hand", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- the CLI's flat options


def options_from_flat(flat: dict) -> dict:
    """Keyword arguments of `prepare` from the CLI's flat option names: the clean
    thresholds (``min_chars``, ... the `CleanConfig` fields) go into ``clean``,
    ``character_coverage`` into ``tokenizer_options``, the rest is passed as is."""
    kwargs = dict(flat)
    clean = {k: parse_threshold(k, kwargs.pop(k)) for k in CLEAN_OPTIONS if k in kwargs}
    if clean:
        kwargs["clean"] = {**(kwargs.get("clean") or {}), **clean}
    if "character_coverage" in kwargs:
        kwargs["tokenizer_options"] = {**(kwargs.get("tokenizer_options") or {}),
                                       "character_coverage": kwargs.pop("character_coverage")}
    return kwargs


# ----------------------------------------------------------------------------- reading back


def read_meta(out_dir: str | os.PathLike) -> dict:
    """meta.json of a prepared folder, checked for presence and format version."""
    out = Path(out_dir)
    path = out / META_FILE
    if not path.is_file():
        why = "the folder does not exist" if not out.exists() else f"no {META_FILE}"
        raise DataFileNotFoundError(_not_prepared(out, why))
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(_not_prepared(out, f"{META_FILE} is not valid JSON: {exc}")) from None
    version = meta.get("format_version") if isinstance(meta, dict) else None
    if version != PREPARED_FORMAT_VERSION:
        raise DataError(
            _not_prepared(out, f"{META_FILE} has format_version {version!r}, this tensorlite reads "
                               f"{PREPARED_FORMAT_VERSION}")
        )
    return meta


def load_prepared(out_dir: str | os.PathLike) -> tuple[dict, Tokenizer, Path | list[Path], Path | list[Path]]:
    """Check a prepared folder and return (meta, tokenizer, train shards, val shards).

    A split is one shard path (one process prepared it) or the list of its shards in order
    (one per rank under mpiexec), either of which `BatchLoader` reads. Checks that
    meta.json, the tokenizer and every shard exist, that the shard headers agree with the
    token counts in meta.json and the tokenizer with its vocab size."""
    out = Path(out_dir)
    meta = read_meta(out)
    try:
        tok_file = out / meta["tokenizer"]["file"]
        splits = {}
        for part in ("train", "val"):
            # "shards" since the streaming prepare; a folder prepared before names one "file"
            shards = meta[part].get("shards") or [{"file": meta[part]["file"], "tokens": meta[part]["tokens"]}]
            splits[part] = [(out / s["file"], s["tokens"]) for s in shards]
        vocab_size = meta["vocab_size"]
    except (KeyError, TypeError, AttributeError) as exc:
        raise DataError(_not_prepared(out, f"{META_FILE} lacks the field {exc}")) from None
    for path in [tok_file] + [path for shards in splits.values() for path, _ in shards]:
        if not path.is_file():
            raise DataFileNotFoundError(_not_prepared(out, f"{path.name} is missing"))
    tok = load_tokenizer(tok_file)
    if tok.vocab_size != vocab_size:
        raise DataError(_not_prepared(out, f"{tok_file.name} has vocab_size {tok.vocab_size}, "
                                           f"{META_FILE} says {vocab_size}"))
    if meta["tokenizer"].get("kind"):
        tok.kind = meta["tokenizer"]["kind"]
    for shards in splits.values():
        for path, count in shards:
            header = read_header(path)  # raises on bad magic / version / truncation
            if header.count != count:
                raise DataError(_not_prepared(out, f"{path.name} has {header.count} tokens, {META_FILE} says {count}"))
    train, val = ([p for p, _ in splits[k]] for k in ("train", "val"))
    return meta, tok, train[0] if len(train) == 1 else train, val[0] if len(val) == 1 else val


# how to run, not what to make: never in meta.json's options (the output is the same)
_NOT_OPTIONS = ("progress", "overwrite", "workers", "world")
_PREPARE_PARAMS = {
    name: p.default for name, p in inspect.signature(prepare).parameters.items()
    if p.kind is inspect.Parameter.KEYWORD_ONLY and name not in _NOT_OPTIONS
}


def is_prepared(
    out_dir: str | os.PathLike,
    data: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
    *,
    check_fingerprint: bool = True,
    **options,
) -> bool:
    """True when ``out_dir`` holds a complete preparation made with the same options
    (the keyword arguments of `prepare`, defaults filled in) and, unless
    ``check_fingerprint=False``, from input files that have not changed since (the
    fingerprint re-hashes the input files: ~0.1 s for the stdlib)."""
    unknown = sorted(set(options) - set(_PREPARE_PARAMS) - set(_NOT_OPTIONS))
    if unknown:
        raise DataError(f"unknown prepare option(s) {unknown}: valid options are {sorted(_PREPARE_PARAMS)}")
    for name in _NOT_OPTIONS:
        options.pop(name, None)
    wanted = _canonical_options(data, **{**_PREPARE_PARAMS, **options})
    try:
        meta, _, _, _ = load_prepared(out_dir)
    except DataError:
        return False
    if meta.get("options") != wanted:
        return False
    if check_fingerprint:
        try:
            fingerprint = corpus_fingerprint(
                data, include=wanted["include"], exclude=wanted["exclude"],
                max_files=wanted["max_files"], max_bytes=wanted["max_bytes"], skip_dirs=[out_dir],
            )
        except DataError:
            return False
        if fingerprint != meta.get("corpus"):
            return False
    return True


def ensure_prepared(
    data: str | os.PathLike | Sequence[str | os.PathLike] | None,
    out_dir: str | os.PathLike,
    **options,
) -> dict:
    """`prepare` unless `is_prepared` already holds for these options; returns meta."""
    progress = options.get("progress", True)
    check = {k: v for k, v in options.items() if k not in _NOT_OPTIONS}
    if is_prepared(out_dir, data, **check):
        if progress:
            print(f"reusing prepared data in {out_dir}", flush=True)
        return read_meta(out_dir)
    return prepare(data, out_dir, **options)
