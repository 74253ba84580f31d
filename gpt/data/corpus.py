"""Read the raw corpus: text files, directories, JSONL, or the embedded default corpus.

This is the first stage of the data pipeline (see DESIGN.md): it turns paths into a list
of `Document`s (a stable source name + the decoded text) and a `CorpusReport` that
counts everything it skipped, so later stages never touch the filesystem.

Inputs
------
* a text file: one document;
* a ``.jsonl`` / ``.ndjson`` file: one document per line, the text taken from the field
  ``text_field`` (default ``"text"``); lines that are not JSON objects with a string in
  that field are counted (``jsonl_bad_lines`` / ``jsonl_missing_field``) and skipped;
* a directory: walked recursively in sorted order (so the corpus order is reproducible),
  each file filtered by the ``include`` / ``exclude`` glob patterns (see `matches`);
* nothing (``paths=None``): the *embedded default corpus*, the ``.py`` sources of the
  running Python's standard library, found through ``sysconfig.get_paths()["stdlib"]``
  with ``site-packages`` excluded. It is on every machine that has Python, so the
  pipeline needs no download, and it is a real, messy code corpus.

Policies (never a crash)
------------------------
* Files with a NUL byte in their first 8 KiB are binary: skipped, counted.
* Unreadable files (permissions, races with deletion): skipped, counted.
* Non-UTF-8 bytes follow ``errors``: ``"replace"`` (default) decodes with U+FFFD in place
  of each bad byte sequence and keeps the document (counted in ``non_utf8_replaced``; the
  clean stage can drop documents with too many replacement characters); ``"skip"`` drops
  the whole document (counted in ``non_utf8_skipped``). Python's PEP 263 coding cookies
  are deliberately *not* honoured: the pipeline has one rule for every file type.

Fingerprint
-----------
`CorpusReport.fingerprint` identifies the raw input: the number of files, their total
bytes, and a sha256 over the sorted ``(source key, sha256 of the file's bytes)`` pairs.
Keys are relative to each root (``<root name>/<relative path>``), so the fingerprint of
the default corpus is the same on every machine with the same Python version. It is
stored in ``meta.json`` so a prepared data folder can tell whether its input changed.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import sysconfig
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Iterable, Sequence

from gpt.data.errors import DataError, DataFileNotFoundError

ERROR_POLICIES = ("replace", "skip")
JSONL_SUFFIXES = (".jsonl", ".ndjson")
# Hidden files and folders (.git, .venv, ...) and Python caches are never corpus text.
DEFAULT_EXCLUDE: tuple[str, ...] = (".*", "__pycache__", "*.pyc", "*.pyo")
DEFAULT_CORPUS_INCLUDE: tuple[str, ...] = ("*.py",)
DEFAULT_CORPUS_EXCLUDE: tuple[str, ...] = DEFAULT_EXCLUDE + ("site-packages", "dist-packages")
_BINARY_SNIFF_BYTES = 8192
_MAX_EXAMPLES = 5  # sources listed per skip reason in the report


@dataclass(frozen=True)
class Document:
    """One unit of text. ``source`` is a stable, human-readable name (used in reports
    and by dedup to say which document was kept for which), e.g. ``python3.11/ast.py``
    or ``data/chat.jsonl:17``."""

    source: str
    text: str


@dataclass
class CorpusReport:
    """What `read_corpus` read and what it skipped, and why."""

    roots: list[str] = field(default_factory=list)
    files_matched: int = 0  # files that passed include/exclude (or were named directly)
    files_read: int = 0  # files whose bytes were read (those count in the fingerprint)
    documents: int = 0  # documents produced (a JSONL file gives several)
    bytes_read: int = 0
    chars: int = 0  # characters in the produced documents
    skipped_binary: int = 0
    skipped_unreadable: int = 0
    skipped_by_limit: int = 0  # files not read because of max_files / max_bytes
    non_utf8_replaced: int = 0  # documents kept with U+FFFD replacements
    non_utf8_skipped: int = 0  # documents dropped because of errors="skip"
    jsonl_bad_lines: int = 0  # not JSON, or not a JSON object
    jsonl_missing_field: int = 0  # object without a string in text_field
    errors_policy: str = "replace"
    examples: dict[str, list[str]] = field(default_factory=dict)
    fingerprint: dict = field(default_factory=dict)

    def note(self, reason: str, source: str) -> None:
        """Count one ``reason`` (a counter field of this report) and remember a few example
        sources for it."""
        setattr(self, reason, getattr(self, reason) + 1)
        bucket = self.examples.setdefault(reason, [])
        if len(bucket) < _MAX_EXAMPLES:
            bucket.append(source)

    def to_dict(self) -> dict:
        return asdict(self)

    def merge(self, other: "CorpusReport") -> None:
        """Add the counts of ``other`` (the report of a later part of the same corpus: a
        chunk, a rank's share) to this one; examples keep the first few in corpus order."""
        _merge_counts(self, other, ("roots", "errors_policy", "fingerprint", "files_matched", "skipped_by_limit"))


def _merge_counts(into, other, skip: tuple[str, ...]) -> None:
    """``into += other`` field by field: integers add, dicts of integers add per key, the
    example lists concatenate up to their limit (a helper of the reports' ``merge``)."""
    for f in fields(into):
        if f.name in skip:
            continue
        a, b = getattr(into, f.name), getattr(other, f.name)
        if f.name == "examples":
            for reason, sources in b.items():
                bucket = a.setdefault(reason, [])
                bucket.extend(sources[: max(0, _MAX_EXAMPLES - len(bucket))])
        elif isinstance(a, dict):
            for k, v in b.items():
                a[k] = a.get(k, 0) + v
        elif isinstance(a, int) and not isinstance(a, bool):
            setattr(into, f.name, a + b)


@dataclass
class Corpus:
    documents: list[Document]
    report: CorpusReport


def default_corpus_root() -> Path:
    """The standard library folder of the running Python (the embedded default corpus)."""
    return Path(sysconfig.get_paths()["stdlib"])


def matches(rel_path: str, pattern: str, *, any_component: bool) -> bool:
    """Glob matching used by include/exclude.

    A pattern containing ``/`` is matched (fnmatch, case-sensitive) against the whole
    relative POSIX path, where ``*`` also crosses ``/`` (``"test/*"`` excludes a whole
    subtree). A pattern without ``/`` is matched against the file name, and, when
    ``any_component`` (used for excludes), against every folder name too, so
    ``exclude=["tests"]`` drops every ``tests`` folder at any depth.
    """
    if "/" in pattern:
        return fnmatch.fnmatchcase(rel_path, pattern)
    parts = rel_path.split("/")
    candidates = parts if any_component else parts[-1:]
    return any(fnmatch.fnmatchcase(p, pattern) for p in candidates)


def _is_prepared_output(filenames) -> bool:
    """The files of a folder `prepare` wrote: meta.json beside its train shard(s)."""
    return "meta.json" in filenames and any(
        n == "train.bin" or (n.startswith("train-") and n.endswith(".bin")) for n in filenames)


def iter_directory(
    root: Path, include: Sequence[str] | None, exclude: Sequence[str], skip_dirs: Iterable[Path] = ()
) -> list[tuple[Path, str]]:
    """All files under ``root`` that pass the filters, as sorted ``(path, relative posix
    path)`` pairs. Excluded folders are pruned during the walk (a ``.git`` folder is never
    descended into). ``skip_dirs`` are absolute folders pruned as well."""
    skip = {os.path.realpath(p) for p in skip_dirs}
    skip_names = {os.path.basename(p) for p in skip}
    # The walk prunes an excluded folder, so every folder it enters passed the patterns: a
    # pattern without "/" (matched against every component) need only be tried on the last
    # one. The same for skip_dirs: a folder the walk enters is no link, so its real path ends
    # in its own name (a 100,000-file tree: 16 s -> about 1 s).
    by_name = [p for p in exclude if "/" not in p]
    by_path = [p for p in exclude if "/" in p]

    def excluded(rel: str, name: str) -> bool:
        return any(fnmatch.fnmatchcase(name, p) for p in by_name) or any(
            fnmatch.fnmatchcase(rel, p) for p in by_path)

    found: list[tuple[Path, str]] = []
    top = os.fspath(root)
    for dirpath, dirnames, filenames in os.walk(top):
        # os.walk joins names onto top: the relative folder is what follows it
        rel_dir = "" if dirpath == top else dirpath[len(os.path.join(top, "")):].replace(os.sep, "/") + "/"
        if dirpath != top and _is_prepared_output(filenames):
            dirnames[:] = []   # a folder prepare wrote (an --out inside the data): not text
            continue
        dirnames[:] = sorted(
            d
            for d in dirnames
            if not excluded(rel_dir + d, d)
            and not (d in skip_names and os.path.realpath(os.path.join(dirpath, d)) in skip)
        )
        for name in sorted(filenames):
            rel = rel_dir + name
            if excluded(rel, name):
                continue
            if include is not None and not any(matches(rel, p, any_component=False) for p in include):
                continue
            found.append((Path(dirpath) / name, rel))
    found.sort(key=lambda pair: pair[1])
    return found


def _decode(data: bytes, errors: str) -> tuple[str | None, bool]:
    """Decode UTF-8 under the policy. Returns (text or None if skipped, had_bad_bytes)."""
    try:
        return data.decode("utf-8"), False
    except UnicodeDecodeError:
        if errors == "skip":
            return None, True
        return data.decode("utf-8", errors="replace"), True


def _json_kind(obj) -> str:
    return {dict: "object", list: "list", str: "string", bool: "boolean", type(None): "null"}.get(
        type(obj), "number")


def _read_jsonl(
    data: bytes, key: str, text_field: str, errors: str, report: CorpusReport, path: str | None = None,
    first_line: int = 1, whole_file: bool = True,
) -> list[Document]:
    """One document per line holding a JSON object with a string in ``text_field``.

    Bad lines are counted and skipped, but a file that yields *no* document although it
    has records is a `DataError` naming the file, the first offending line and how to
    fix it (a wrong ``text_field`` or a file that is not JSON Lines would otherwise
    vanish from the corpus with only a counter to show for it)."""
    docs: list[Document] = []
    missing: tuple[int, object] | None = None  # (line, first object without a string text_field)
    bad_json: tuple[int, str] | None = None  # (line, why it is not a JSON object)
    records = 0
    for lineno, raw in enumerate(data.split(b"\n"), start=first_line):
        if not raw.strip():
            continue
        records += 1
        source = f"{key}:{lineno}"
        line, bad = _decode(raw, errors)
        if line is None:
            report.note("non_utf8_skipped", source)
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            report.note("jsonl_bad_lines", source)
            bad_json = bad_json or (lineno, f"is not valid JSON ({exc.msg} at column {exc.colno})")
            continue
        if not isinstance(obj, dict):
            report.note("jsonl_bad_lines", source)
            bad_json = bad_json or (lineno, f"is a JSON {_json_kind(obj)}, not an object")
            continue
        text = obj.get(text_field)
        if not isinstance(text, str):
            report.note("jsonl_missing_field", source)
            missing = missing or (lineno, obj)
            continue
        if bad:
            report.note("non_utf8_replaced", source)
        docs.append(Document(source, text))
    if docs or not records:
        return docs
    if not whole_file:   # a piece of a large file: no piece can speak for the whole file
        return docs
    name = path or key
    if missing is not None:
        lineno, obj = missing
        keys = list(obj)
        if text_field in obj:
            found = f"line {lineno} has {text_field!r} as a JSON {_json_kind(obj[text_field])}, not a string"
        else:
            found = f"line {lineno} has the keys {keys[:10]}" + (f" and {len(keys) - 10} more" if len(keys) > 10 else "")
        strings = [k for k in keys if isinstance(obj[k], str) and k != text_field]
        guess = max(strings, key=lambda k: len(obj[k])) if strings else "NAME"
        raise DataError(
            f"{name}: no JSON record has a string in the field {text_field!r} ({found}): name the field that "
            f"holds the text with --text-field {guess} (text_field in --config or in Python)"
        )
    if bad_json is not None:
        lineno, why = bad_json
        raise DataError(
            f"{name} line {lineno} {why}, and no line of it gave a document: a .jsonl file needs one JSON object "
            f"per line (like {{{json.dumps(text_field)}: \"...\"}}); fix the file, or rename it to read it as plain text"
        )
    return docs


def fingerprint_of(entries: list[tuple[str, str]], n_bytes: int) -> dict:
    digest = hashlib.sha256()
    for key, content_hash in sorted(entries):
        digest.update(key.encode("utf-8", "surrogateescape"))
        digest.update(b"\0")
        digest.update(content_hash.encode("ascii"))
        digest.update(b"\n")
    return {"files": len(entries), "bytes": n_bytes, "sha256": digest.hexdigest()}


def check_data_paths(paths: str | os.PathLike | Sequence[str | os.PathLike]) -> list[Path]:
    """The data paths as a list of `Path`; a `DataFileNotFoundError` for one that does not
    exist (checked up front so prepare fails before it touches its output folder)."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    if len(paths) == 0:
        raise DataError("no data paths given: pass at least one file or directory (or None for the default corpus)")
    roots = [Path(p) for p in paths]
    for root in roots:
        if not root.exists():
            raise DataFileNotFoundError(
                f"data path '{root}' does not exist: pass an existing file or directory "
                f"(or leave the data path out to use the default stdlib corpus)"
            )
    return roots


def _resolve_roots(
    paths: str | os.PathLike | Sequence[str | os.PathLike] | None,
    include: Sequence[str] | None,
    exclude: Sequence[str] | None,
    skip_dirs: Sequence[str | os.PathLike] = (),
) -> list[tuple[Path, str, list[tuple[Path, str]]]]:
    """(root, label, [(file, key)]) for each input path, keys prefixed by the root label."""
    skip_dirs = [Path(p) for p in skip_dirs]
    if paths is None:
        root = default_corpus_root()
        inc = DEFAULT_CORPUS_INCLUDE if include is None else include
        exc = DEFAULT_CORPUS_EXCLUDE if exclude is None else exclude
        # site-packages lives inside the stdlib folder on most installs: prune it by path too.
        site = [Path(sysconfig.get_paths()[k]) for k in ("purelib", "platlib")]
        files = iter_directory(root, inc, exc, skip_dirs=site + skip_dirs)
        return [(root, root.name, [(p, f"{root.name}/{rel}") for p, rel in files])]
    paths = check_data_paths(paths)
    exc = DEFAULT_EXCLUDE if exclude is None else exclude
    roots = []
    for root in paths:
        if root.is_dir():
            label = root.resolve().name or "root"
            files = iter_directory(root, include, exc, skip_dirs=skip_dirs)
            roots.append((root, label, [(f, f"{label}/{rel}") for f, rel in files]))
        else:  # a file named explicitly is always read, whatever include/exclude say
            roots.append((root, root.name, [(root, root.name)]))
    return roots


def read_corpus(
    paths: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
    *,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    text_field: str = "text",
    errors: str = "replace",
    max_files: int | None = None,
    max_bytes: int | None = None,
    skip_dirs: Sequence[str | os.PathLike] = (),
    progress: bool = False,
) -> Corpus:
    """Read files into documents.

    Args:
        paths: a file, a directory, a list of them, or None for the default corpus.
        include: glob patterns a file must match (None: every file; for the default
            corpus ``("*.py",)``). See `matches`.
        exclude: glob patterns that drop files and prune folders (None: hidden files
            and folders and Python caches; for the default corpus also site-packages).
        text_field: the field holding the text in ``.jsonl`` files.
        errors: non-UTF-8 policy, ``"replace"`` or ``"skip"`` (see the module docstring).
        max_files, max_bytes: read at most this many files / stop once this many bytes
            were read (files are taken in sorted order). For quick runs and tests.
        skip_dirs: folders never descended into (prepare passes its output folder, so
            a data folder prepared inside its own input is not read back as input).
        progress: show a tqdm bar.

    Raises:
        DataFileNotFoundError: a path does not exist.
        DataError: a bad option, or nothing at all to read.
    """
    plan = plan_corpus(paths, include=include, exclude=exclude, errors=errors, max_files=max_files,
                       max_bytes=max_bytes, skip_dirs=skip_dirs)
    report = plan.report
    documents: list[Document] = []
    entries: list[tuple[str, str]] = []  # (key, sha256 of content) for the fingerprint
    bar = _progress(plan.files, progress, "read corpus", unit="file")
    try:  # the bar is cleared even when a file stops the run (the error is one clean line)
        for path, key, _ in bar:
            docs, entry = read_file(path, key, text_field, errors, report)
            documents.extend(docs)
            if entry is not None:
                entries.append(entry)
    finally:
        if bar is not plan.files:
            bar.close()

    report.documents = len(documents)
    report.chars = sum(len(d.text) for d in documents)
    report.fingerprint = fingerprint_of(entries, report.bytes_read)
    return Corpus(documents, report)


@dataclass
class CorpusPlan:
    """The files a corpus will be read from, in corpus order, each ``(path, key, size in
    bytes)`` (size from ``stat``; 0 when it cannot be read), after ``max_files`` /
    ``max_bytes``; ``report`` holds the roots, files matched and skipped by the limits."""

    files: list[tuple[Path, str, int]]
    report: CorpusReport


def plan_corpus(
    paths: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
    *,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    errors: str = "replace",
    max_files: int | None = None,
    max_bytes: int | None = None,
    skip_dirs: Sequence[str | os.PathLike] = (),
) -> CorpusPlan:
    """Walk the input and decide which files will be read, reading none of them (the limits
    are applied with the sizes ``stat`` gives, in corpus order, as `read_corpus` reads).
    Raises what `read_corpus` raises for bad options or an empty selection."""
    if errors not in ERROR_POLICIES:
        raise DataError(f"errors={errors!r} is not a non-UTF-8 policy: use one of {ERROR_POLICIES}")
    for name, value in (("max_files", max_files), ("max_bytes", max_bytes)):
        if value is not None and value <= 0:
            raise DataError(f"{name}={value} must be a positive number (or None for no limit)")

    roots = _resolve_roots(paths, include, exclude, skip_dirs)
    report = CorpusReport(roots=[str(r) for r, _, _ in roots], errors_policy=errors)
    files = [pair for _, _, pairs in roots for pair in pairs]
    report.files_matched = len(files)
    if not files:
        if include or exclude is not None:
            raise DataError(
                f"no files found in {report.roots} with include={list(include) if include else None} and "
                f"exclude={list(exclude) if exclude is not None else 'default (hidden files and folders, Python caches)'}: "
                f"check the path, and the glob patterns of include and exclude"
            )
        raise DataError(f"no files found in {', '.join(report.roots)} (hidden files and folders and Python "
                        f"caches are skipped): check the path")
    planned: list[tuple[Path, str, int]] = []
    n_read = n_bytes = 0
    for i, (path, key) in enumerate(files):
        if (max_files is not None and n_read >= max_files) or (max_bytes is not None and n_bytes >= max_bytes):
            report.skipped_by_limit = len(files) - i
            break
        try:
            size = path.stat().st_size
            n_read += 1
            n_bytes += size
        except OSError:  # read_file counts it as unreadable
            size = 0
        planned.append((path, key, size))
    return CorpusPlan(planned, report)


def read_file(
    path: Path, key: str, text_field: str, errors: str, report: CorpusReport, piece=None
) -> tuple[list[Document], tuple[str, str] | None]:
    """The documents of one file, and its fingerprint entry ``(key, sha256)`` (None when it
    could not be read); what was skipped is counted in ``report`` (``files_read``,
    ``bytes_read`` and the skip reasons; ``documents``, ``chars`` and the fingerprint are
    the caller's to total). ``piece``: for a large JSON Lines file cut by `jsonl_pieces`,
    ``(start, end, first_line, sha256 or None)``: only bytes start..end are read, and the
    file (its count and its fingerprint entry) is counted by its first piece only."""
    try:
        if piece is None:
            data = path.read_bytes()
        else:
            with open(path, "rb") as f:
                f.seek(piece[0])
                data = f.read(piece[1] - piece[0])
    except OSError as exc:
        report.note("skipped_unreadable", f"{key} ({exc.__class__.__name__})")
        return [], None
    report.bytes_read += len(data)
    if piece is not None:
        first = piece[3] is not None
        report.files_read += first
        entry = (key, piece[3]) if first else None
        return _read_jsonl(data, key, text_field, errors, report, str(path), first_line=piece[2],
                           whole_file=False), entry
    report.files_read += 1
    entry = (key, hashlib.sha256(data).hexdigest())
    if b"\0" in data[:_BINARY_SNIFF_BYTES]:
        report.note("skipped_binary", key)
        return [], entry
    if path.suffix.lower() in JSONL_SUFFIXES:
        return _read_jsonl(data, key, text_field, errors, report, str(path)), entry
    text, bad = _decode(data, errors)
    if text is None:
        report.note("non_utf8_skipped", key)
        return [], entry
    if bad:
        report.note("non_utf8_replaced", key)
    return [Document(key, text)], entry


def file_sha256(path: Path, block: int = 1 << 20) -> str:
    """sha256 of a file's content, read in blocks (a large file is never held whole)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while data := f.read(block):
            h.update(data)
    return h.hexdigest()


def jsonl_pieces(path: Path, target: int, block: int = 1 << 20):
    """Cut a JSON Lines file into pieces of about ``target`` bytes at line ends, in one pass
    of bounded memory: ``([(start, end, first_line), ...], sha256 of the whole file)``, or
    ``(None, None)`` for a file that looks binary (read whole and skipped as usual)."""
    h = hashlib.sha256()
    cuts, lines, pos, start, first_line = [], 0, 0, 0, 1
    with open(path, "rb") as f:
        head = f.read(_BINARY_SNIFF_BYTES)
        if b"\0" in head:
            return None, None
        f.seek(0)
        while data := f.read(block):
            h.update(data)
            i = 0
            while pos + len(data) - start >= target:     # a cut falls in this block
                j = data.find(b"\n", max(i, start + target - pos - 1))
                if j < 0:
                    break
                end = pos + j + 1
                cut_lines = lines + data.count(b"\n", 0, j + 1)
                cuts.append((start, end, first_line))
                start, first_line = end, cut_lines + 1
                i = j + 1
            lines += data.count(b"\n")
            pos += len(data)
    if pos > start:
        cuts.append((start, pos, first_line))
    return cuts, h.hexdigest()


def corpus_fingerprint(
    paths: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
    *,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    max_files: int | None = None,
    max_bytes: int | None = None,
    skip_dirs: Sequence[str | os.PathLike] = (),
) -> dict:
    """The fingerprint `read_corpus` would report, without decoding anything.

    Cheap enough (one read + sha256 per file) to check whether a prepared data folder
    is still up to date with its input."""
    roots = _resolve_roots(paths, include, exclude, skip_dirs)
    entries: list[tuple[str, str]] = []
    n_bytes = 0
    for _, _, pairs in roots:
        for path, key in pairs:
            if (max_files is not None and len(entries) >= max_files) or (
                max_bytes is not None and n_bytes >= max_bytes
            ):
                return fingerprint_of(entries, n_bytes)
            try:
                digest, size = file_sha256(path), path.stat().st_size
            except OSError:
                continue
            n_bytes += size
            entries.append((key, digest))
    return fingerprint_of(entries, n_bytes)


def _progress(iterable, enabled: bool, desc: str, **kwargs):
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, leave=False, **kwargs)
