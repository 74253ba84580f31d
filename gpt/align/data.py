"""Alignment data: SFT conversations and DPO preference pairs, from JSONL or the stdlib.

This is the data layer under the chat template and the trainers (``template.py``,
``sft.py``, ``dpo.py``): it only turns files into checked Python records, so every later
stage can trust that a role is known, a response is non-empty and a pair really differs.

JSON Lines
----------
`read_sft_jsonl` reads one `Conversation` per line, in either format::

    {"prompt": "...", "response": "..."}
    {"messages": [{"role": "system", "content": "..."},
                  {"role": "user", "content": "..."},
                  {"role": "assistant", "content": "..."}, ...]}

A ``messages`` list needs at least one assistant message, each assistant message must
come right after a user message, and a system message may only be the first one. Every
content (prompt, response) must hold a non-whitespace character. Keys other than these
(``"id"``, ``"meta"``, ...) are ignored. `read_dpo_jsonl` reads one `Preference` per line,
``{"prompt": "...", "chosen": "...", "rejected": "..."}``, three non-empty strings with
``chosen != rejected``.

Lines are split on ``"\\n"`` only (``str.splitlines`` would also split on U+2028, which
JSON allows unescaped inside a string); blank lines are ignored and not counted; line
numbers are the file's own (blank lines included). A bad line is skipped and recorded in
the `JsonlReport` with its line number and reason, or, with ``strict=True``, is a
`DataError` naming the file and the line. A missing file, a folder, a file that is not
UTF-8 (a leading BOM is allowed), and a file with no usable line are `DataError`s.

The default sets: the standard library teaches itself
---------------------------------------------------------
With no data file, SFT and DPO use the embedded default corpus (`gpt.data.corpus`: the
``.py`` files of the running Python's standard library, ``site-packages`` excluded) minus
its test folders (``test/``, ``tests/``, ``idlelib/idle_test``, ...; see `STDLIB_TEST_EXCLUDE`):
test code is not what we want to teach. `stdlib_functions` extracts with `ast` every
function and method (methods of classes at any depth; never a function nested in a
function) that has a docstring and at least one statement after it, and cuts its source
text in two, verbatim:

* ``prompt``: the lines from the ``def`` line (decorators left out) through the last
  line of the docstring;
* ``body``: the remaining lines of the function, through its last line.

Both are dedented by the ``def`` line's indentation (removed from each line that starts
with it; a line that does not, such as a string continuation at column 0, is kept as it
is), so ``prompt + body`` is the function's source, dedented. Line ends are normalised to
``"\\n"`` (as reading in text mode does) and ``body`` ends with ``"\\n"``. A function is kept
when ``len(prompt) + len(body) <= max_chars``. A file that is not UTF-8 or does not parse
is skipped and counted (`stdlib_report`). The order is the sorted relative paths, then the
source order. The extraction runs once per process (`functools.lru_cache`), then each
set is a filter over it: on Python 3.11.7 it reads 734 files (12 MB) and finds 6,732
functions (before the ``max_chars`` filter) in 1.6 s (measured on a 2-core VM, one core
used; `stdlib_report` gives the time of this run); a set then takes 0.02 s (SFT) to
0.2 s (DPO).

The SFT example of a function is the user turn ``prompt`` and the assistant turn ``body``.

Held-out split. A source file is held out when
``int(sha256(path).hexdigest(), 16) % 100 < heldout_percent`` (``path`` relative to the
stdlib root, UTF-8): no function of a held-out file is in train, and the split is the same
on every run and machine and for every seed. The seed only shuffles the train order
(SFT: ``numpy.random.default_rng(seed).permutation``) and, for DPO, picks the rejections
(DPO: three streams spawned from ``numpy.random.SeedSequence(seed)``: train rejections,
held-out rejections, train order). Held-out examples keep the sorted-path, source order.
A ``source`` names the file and qualname; it is not always unique (a function defined
twice, e.g. in the two branches of an ``if``, gives two examples with the same source).

DPO rejections (`default_dpo_set`). For each function ``f`` (train and held-out apart:
a rejection is drawn within ``f``'s own part, so held-out pairs never show a train body),
``prompt = f.prompt``, ``chosen = f.body`` and ``rejected`` is

* (a) the body of another function of the same part with the same `Function.arity` and a
  different body, chosen uniformly among all such functions; or
* (b) ``f.body`` with one top-level statement dropped: the body is parsed (after
  `textwrap.dedent`, since its lines are indented one level), one droppable statement is
  chosen uniformly and its lines (from its first decorator, if it has any, to its last
  line) are removed from the body text, the rest (comments included) kept verbatim. Only
  when the body has at least 2 top-level statements; a statement that shares a line with
  another one is not droppable (``a = 1; b = 2`` is not cut in half), and a body that does
  not parse after `textwrap.dedent` (a string continuation at column 0 defeats it) has
  none.

Rule (b) is used when (a) has no candidate, and with probability 1/2 when both apply
(one ``rng.random() < 0.5`` draw, made only in that case); (a) otherwise. A function to
which neither applies (a body with one statement and no same-arity partner) gives no pair.
The same seed gives identical lists.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import json
import os
import sysconfig
import textwrap
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from gpt.data.corpus import DEFAULT_CORPUS_EXCLUDE, DEFAULT_CORPUS_INCLUDE, default_corpus_root, iter_directory
from gpt.data.errors import DataError, DataFileNotFoundError

ROLES = ("system", "user", "assistant")  # the roles the chat template knows
# Test folders (and stray test modules) of the stdlib, left out of the default sets.
STDLIB_TEST_EXCLUDE: tuple[str, ...] = ("test", "tests", "idle_test", "test_*.py")
_SUMMARY_LINES = 5  # skipped lines listed in JsonlReport.summary and in errors


@dataclass(frozen=True)
class Conversation:
    """One SFT example: ``messages`` is a tuple of ``(role, content)`` pairs, roles from
    `ROLES`, contents non-empty strings. ``source`` says where it came from:
    ``"FILE:LINE"`` for JSONL, ``"stdlib:<rel path>:<qualname>"`` for the default set."""

    messages: tuple
    source: str


@dataclass(frozen=True)
class Preference:
    """One DPO example: for ``prompt``, ``chosen`` is preferred to ``rejected``."""

    prompt: str
    chosen: str
    rejected: str
    source: str


@dataclass
class JsonlReport:
    """What a JSONL reader kept and skipped (each skipped line with its reason)."""

    path: str
    lines: int = 0  # non-blank lines read
    kept: int = 0
    skipped: list = field(default_factory=list)  # (line number, reason) for each skipped line

    def summary(self) -> str:
        """One line: ``read N lines of PATH: kept K, skipped S (line 3: ...; ...)``."""
        text = f"read {self.lines} lines of {self.path}: kept {self.kept}, skipped {len(self.skipped)}"
        if self.skipped:
            text += f" ({_list_reasons(self.skipped)})"
        return text


def _list_reasons(skipped: list) -> str:
    shown = "; ".join(f"line {n}: {why}" for n, why in skipped[:_SUMMARY_LINES])
    more = len(skipped) - _SUMMARY_LINES
    return shown + (f"; and {more} more" if more > 0 else "")


# ---------------------------------------------------------------------------------------
# JSON Lines


def _json_kind(value) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    return {dict: "object", list: "list", str: "string", type(None): "null"}.get(type(value), type(value).__name__)


class _BadLine(Exception):
    """A line that is not a valid example; the message is the reason."""


def _text(obj: dict, key: str, where: str = "") -> str:
    """``obj[key]`` as a string with a non-whitespace character, else `_BadLine`."""
    if key not in obj:
        raise _BadLine(f"{where}no {key!r} field")
    value = obj[key]
    if not isinstance(value, str):
        raise _BadLine(f"{where}{key!r} is a JSON {_json_kind(value)}, not a string")
    if not value.strip():
        raise _BadLine(f"{where}{key!r} is empty" if not value else f"{where}{key!r} is only whitespace")
    return value


def _sft_messages(obj: dict) -> tuple:
    """The (role, content) pairs of one SFT record, or `_BadLine`."""
    has_pair = "prompt" in obj or "response" in obj
    if "messages" in obj and has_pair:
        raise _BadLine("has both 'messages' and 'prompt'/'response': use one format per line")
    if has_pair:
        return (("user", _text(obj, "prompt")), ("assistant", _text(obj, "response")))
    if "messages" not in obj:
        keys = list(obj)[:10]
        raise _BadLine(f"no 'prompt'/'response' or 'messages' field (keys: {keys})")
    items = obj["messages"]
    if not isinstance(items, list):
        raise _BadLine(f"'messages' is a JSON {_json_kind(items)}, not a list")
    if not items:
        raise _BadLine("'messages' is empty")
    messages = []
    for i, item in enumerate(items):
        where = f"message {i}: "
        if not isinstance(item, dict):
            raise _BadLine(f"{where}a JSON {_json_kind(item)}, not an object with 'role' and 'content'")
        if "role" not in item:
            raise _BadLine(f"{where}no 'role' field")
        role = item["role"]
        if not isinstance(role, str):
            raise _BadLine(f"{where}'role' is a JSON {_json_kind(role)}, not a string")
        if role not in ROLES:
            raise _BadLine(f"{where}role {role!r} is not one of the known roles {ROLES}")
        content = _text(item, "content", where)
        if role == "system" and i > 0:
            raise _BadLine(f"{where}a system message may only be the first message")
        if role == "assistant" and (i == 0 or messages[-1][0] != "user"):
            after = "starts the conversation" if i == 0 else f"follows a {messages[-1][0]} message"
            raise _BadLine(f"{where}an assistant message must follow a user message, but this one {after}")
        messages.append((role, content))
    if not any(role == "assistant" for role, _ in messages):
        raise _BadLine("no assistant message: nothing to learn from")
    return tuple(messages)


def _sft_record(obj: dict, source: str) -> Conversation:
    return Conversation(messages=_sft_messages(obj), source=source)


def _dpo_record(obj: dict, source: str) -> Preference:
    if "chosen" not in obj and ("response" in obj or "messages" in obj):
        raise _BadLine("an SFT example (prompt/response or messages), not a preference pair: "
                       "DPO needs \"prompt\", \"chosen\" and \"rejected\" (give this file to "
                       "tensorlite-gpt sft)")
    prompt, chosen, rejected = (_text(obj, k) for k in ("prompt", "chosen", "rejected"))
    if chosen == rejected:
        raise _BadLine("'chosen' and 'rejected' are the same text: nothing to prefer")
    return Preference(prompt=prompt, chosen=chosen, rejected=rejected, source=source)


_FORMATS = {
    "sft": '{"prompt": "...", "response": "..."} or {"messages": [{"role": "user", "content": "..."}, ...]}',
    "dpo": '{"prompt": "...", "chosen": "...", "rejected": "..."}',
}


def _read_jsonl(path, strict: bool, make, kind: str):
    name = os.fspath(path)
    p = Path(path)
    if not p.exists():
        raise DataFileNotFoundError(f"{kind.upper()} data file '{name}' does not exist: pass an existing .jsonl file")
    if p.is_dir():
        raise DataError(f"{kind.upper()} data path '{name}' is a directory: pass a .jsonl file (one example per line)")
    try:
        data = p.read_bytes()
    except OSError as exc:
        raise DataError(f"cannot read {kind.upper()} data file '{name}': {exc.strerror or exc}") from exc
    try:
        text = data.decode("utf-8-sig")  # a leading BOM is dropped, any other bad byte is an error
    except UnicodeDecodeError as exc:
        offset = exc.start + (3 if data.startswith(b"\xef\xbb\xbf") else 0)
        lineno = data.count(b"\n", 0, offset) + 1
        raise DataError(
            f"{name} is not UTF-8 (line {lineno}, byte {offset}: {data[offset:offset + 4]!r}): "
            f"save it as UTF-8 (JSON Lines is UTF-8 by definition)"
        ) from None
    if text.lstrip().startswith("["):
        raise DataError(f"{name} is a JSON array, not JSON Lines: write one JSON object per "
                        f"line ({_FORMATS[kind]}), e.g. with jq -c '.[]'")

    report = JsonlReport(path=name)
    examples = []
    for lineno, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        report.lines += 1
        try:
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise _BadLine(f"not JSON ({exc.msg} at column {exc.colno})") from None
            except RecursionError:
                raise _BadLine("not JSON (nested too deeply)") from None
            if not isinstance(obj, dict):
                raise _BadLine(f"a JSON {_json_kind(obj)}, not an object")
            examples.append(make(obj, f"{name}:{lineno}"))
        except _BadLine as bad:
            if strict:
                raise DataError(
                    f"{name} line {lineno}: {bad}; fix the line or drop --strict to skip such lines") from None
            report.skipped.append((lineno, str(bad)))
    report.kept = len(examples)
    if not examples:
        if not report.lines:
            raise DataError(
                f"{name} is empty: a {kind.upper()} file needs one JSON object per line, like {_FORMATS[kind]}")
        raise DataError(
            f"{name}: no usable {kind.upper()} example in the {report.lines} lines read "
            f"({_list_reasons(report.skipped)}); each line must be a JSON object like {_FORMATS[kind]}"
        )
    return examples, report


def read_sft_jsonl(path, strict: bool = False) -> tuple[list[Conversation], JsonlReport]:
    """The `Conversation`s of a JSONL file and what was skipped (see the module docstring).

    Raises:
        DataFileNotFoundError: the file does not exist.
        DataError: a folder, not UTF-8, no usable line, or (``strict``) the first bad line.
    """
    return _read_jsonl(path, strict, _sft_record, "sft")


def read_dpo_jsonl(path, strict: bool = False) -> tuple[list[Preference], JsonlReport]:
    """The `Preference`s of a JSONL file and what was skipped (see the module docstring).

    Raises:
        DataFileNotFoundError: the file does not exist.
        DataError: a folder, not UTF-8, no usable line, or (``strict``) the first bad line.
    """
    return _read_jsonl(path, strict, _dpo_record, "dpo")


# ---------------------------------------------------------------------------------------
# The standard library as a set of functions


@dataclass(frozen=True)
class Function:
    """One documented function of the stdlib, cut into the part a user would write and
    the part the model should complete (see the module docstring)."""

    path: str  # relative to the stdlib root, e.g. "textwrap.py", "json/decoder.py"
    qualname: str  # "TextWrapper._split", "dedent"
    prompt: str  # the signature line(s) + the docstring, exactly as in the source, dedented
    body: str  # the statements after the docstring, exactly as in the source, dedented the same way, ending with "\n"
    arity: int  # number of parameters (posonly + args + kwonly, +1 for *args, +1 for **kwargs)


@dataclass(frozen=True)
class ExtractionReport:
    """What the extraction read: files, the ones skipped (with why), functions found
    (before any ``max_chars`` filter) and the time it took."""

    root: str
    files: int
    skipped: tuple  # (relative path, reason) of files that did not decode or parse
    functions: int
    seconds: float


def _arity(args: ast.arguments) -> int:
    return (len(args.posonlyargs) + len(args.args) + len(args.kwonlyargs)
            + (args.vararg is not None) + (args.kwarg is not None))


def _dedent(line: str, indent: str) -> str:
    return line[len(indent):] if line.startswith(indent) else line


def _functions_of(rel: str, text: str) -> list[Function]:
    """Every documented function of one module with a statement after its docstring."""
    tree = ast.parse(text, filename=rel)
    lines = text.split("\n")
    found: list[Function] = []

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                fn = _function(child, prefix + child.name)
                if fn is not None:
                    found.append(fn)
                # never descend: functions (and classes) inside a function are not kept
            elif isinstance(child, ast.ClassDef):
                visit(child, f"{prefix}{child.name}.")
            elif isinstance(child, (ast.stmt, ast.excepthandler, ast.match_case)):
                visit(child, prefix)  # if/try/with/... blocks: conditional definitions count

    def _function(node, qualname: str) -> Function | None:
        body = node.body
        if len(body) < 2 or not (isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
                                 and isinstance(body[0].value.value, str)):
            return None
        doc_end = body[0].end_lineno
        if body[1].lineno <= doc_end:  # `"""doc"""; return x`: cannot be cut between lines
            return None
        first = lines[node.lineno - 1]
        indent = first[: len(first) - len(first.lstrip())]
        prompt = "".join(_dedent(l, indent) + "\n" for l in lines[node.lineno - 1: doc_end])
        code = "".join(_dedent(l, indent) + "\n" for l in lines[doc_end: node.end_lineno])
        return Function(rel, qualname, prompt, code, _arity(node.args))

    visit(tree, "")
    return found


def _stdlib_files(root: Path | None) -> tuple[Path, list[tuple[Path, str]]]:
    """The stdlib's .py files as the default corpus lists them, minus test folders."""
    exclude = DEFAULT_CORPUS_EXCLUDE + STDLIB_TEST_EXCLUDE
    if root is None:
        root = default_corpus_root()
        # site-packages lives inside the stdlib folder on most installs: pruned by path too.
        site = [Path(sysconfig.get_paths()[k]) for k in ("purelib", "platlib")]
        return root, iter_directory(root, DEFAULT_CORPUS_INCLUDE, exclude, skip_dirs=site)
    return root, iter_directory(root, DEFAULT_CORPUS_INCLUDE, exclude)


@functools.lru_cache(maxsize=4)
def _extract(root: str | None) -> tuple[tuple[Function, ...], ExtractionReport]:
    start = time.perf_counter()
    base, files = _stdlib_files(None if root is None else Path(root))
    functions: list[Function] = []
    skipped: list[tuple[str, str]] = []
    for path, rel in files:
        try:
            text = path.read_bytes().decode("utf-8")
        except OSError as exc:
            skipped.append((rel, f"unreadable ({exc.__class__.__name__})"))
            continue
        except UnicodeDecodeError:
            skipped.append((rel, "not UTF-8"))
            continue
        text = text.replace("\r\n", "\n").replace("\r", "\n")  # universal newlines, as open() does
        try:
            functions.extend(_functions_of(rel, text))
        except (SyntaxError, ValueError, RecursionError, MemoryError) as exc:  # ValueError: NUL bytes
            skipped.append((rel, f"does not parse ({exc.__class__.__name__}: {getattr(exc, 'msg', exc)})"))
    report = ExtractionReport(str(base), len(files), tuple(skipped), len(functions), time.perf_counter() - start)
    return tuple(functions), report


def _root_key(_root) -> str | None:
    return None if _root is None else os.path.realpath(_root)


def stdlib_report(*, _root=None) -> ExtractionReport:
    """What the (cached) extraction read and skipped, and how long it took."""
    return _extract(_root_key(_root))[1]


def stdlib_functions(max_chars: int = 400, *, _root=None) -> list[Function]:
    """The documented functions of the stdlib (test folders left out) whose prompt and
    body together have at most ``max_chars`` characters, in sorted-path, source order.

    ``_root`` (for tests) reads another folder instead of the running Python's stdlib."""
    if not isinstance(max_chars, int) or max_chars <= 0:
        raise DataError(f"max_chars={max_chars!r} must be a positive number of characters")
    functions, _ = _extract(_root_key(_root))
    return [f for f in functions if len(f.prompt) + len(f.body) <= max_chars]


def is_heldout(path: str, heldout_percent: int) -> bool:
    """Whether the stdlib file ``path`` (relative to the stdlib root) is held out: its
    sha256 modulo 100 is below ``heldout_percent``. The same on every run and machine."""
    return int(hashlib.sha256(path.encode("utf-8")).hexdigest(), 16) % 100 < heldout_percent


def _split(max_chars: int, heldout_percent: int, _root) -> tuple[list[Function], list[Function]]:
    if isinstance(heldout_percent, bool) or not isinstance(heldout_percent, int) or not 0 <= heldout_percent <= 100:
        raise DataError(f"heldout_percent={heldout_percent!r} must be a whole number from 0 to 100")
    functions = stdlib_functions(max_chars, _root=_root)
    if not functions:
        report = stdlib_report(_root=_root)
        raise DataError(
            f"no function of the {report.files} files under {report.root} fits max_chars={max_chars} "
            f"({report.functions} documented functions before that limit): raise --max-chars"
        )
    train = [f for f in functions if not is_heldout(f.path, heldout_percent)]
    heldout = [f for f in functions if is_heldout(f.path, heldout_percent)]
    return train, heldout


def _shuffled(items: list, seed: int) -> list:
    order = np.random.default_rng(seed).permutation(len(items))
    return [items[i] for i in order]


def default_sft_set(seed: int = 0, max_chars: int = 400, heldout_percent: int = 10,
                    *, _root=None) -> tuple[list[Conversation], list[Conversation]]:
    """(train, held-out) SFT conversations from the stdlib: the user turn is a function's
    signature and docstring, the assistant turn its body. Train is shuffled by ``seed``;
    held-out is in sorted-path, source order. See the module docstring for the split."""
    train, heldout = _split(max_chars, heldout_percent, _root)

    def conv(f: Function) -> Conversation:
        messages = (("user", f.prompt), ("assistant", f.body))
        return Conversation(messages=messages, source=f"stdlib:{f.path}:{f.qualname}")

    return _shuffled([conv(f) for f in train], seed), [conv(f) for f in heldout]


def _droppable_spans(body: str) -> list[tuple[int, int]]:
    """0-based [start, end) line spans of the body's top-level statements that can be
    dropped alone; empty when the body has fewer than 2 statements (or does not parse)."""
    try:
        statements = ast.parse(textwrap.dedent(body)).body
    except (SyntaxError, ValueError, RecursionError):  # e.g. a string continuation at column 0
        return []
    if len(statements) < 2:
        return []
    spans = []
    for s in statements:
        start = min([s.lineno] + [d.lineno for d in getattr(s, "decorator_list", ())])
        spans.append((start - 1, s.end_lineno))
    return [(a, b) for i, (a, b) in enumerate(spans)
            if all(b <= a2 or b2 <= a for j, (a2, b2) in enumerate(spans) if j != i)]


def _drop_lines(body: str, span: tuple[int, int]) -> str:
    """``body`` without its lines ``span`` (0-based, end exclusive), the rest verbatim.
    Lines are split on ``"\\n"`` only, as `ast` counts them (not on form feeds)."""
    lines = [line + "\n" for line in body.split("\n")[:-1]]  # a body ends with "\n"
    return "".join(lines[: span[0]] + lines[span[1]:])


def _pairs(functions: list[Function], rng: np.random.Generator) -> list[Preference]:
    """One `Preference` per function that has a rejection (rules (a)/(b) of the module
    docstring), drawn only among ``functions``."""
    by_arity: dict[int, list[Function]] = defaultdict(list)
    for f in functions:
        by_arity[f.arity].append(f)
    same_body = {arity: Counter(g.body for g in group) for arity, group in by_arity.items()}
    pairs = []
    for f in functions:
        group = by_arity[f.arity]
        has_partner = len(group) > same_body[f.arity][f.body]
        spans = _droppable_spans(f.body)
        if not has_partner and not spans:
            continue
        use_drop = bool(spans) and (not has_partner or rng.random() < 0.5)
        if use_drop:
            rejected = _drop_lines(f.body, spans[int(rng.integers(len(spans)))])
        else:  # uniform over the functions with a different body: rejection sampling
            while (other := group[int(rng.integers(len(group)))]).body == f.body:
                pass
            rejected = other.body
        pairs.append(Preference(prompt=f.prompt, chosen=f.body, rejected=rejected,
                                source=f"stdlib:{f.path}:{f.qualname}"))
    return pairs


def default_dpo_set(seed: int = 0, max_chars: int = 400, heldout_percent: int = 10,
                    *, _root=None) -> tuple[list[Preference], list[Preference]]:
    """(train, held-out) DPO pairs from the stdlib: the prompt is a function's signature
    and docstring, ``chosen`` its body, ``rejected`` a wrong body (rules (a) and (b) in the
    module docstring, drawn within the same part). Train is shuffled by ``seed``."""
    train, heldout = _split(max_chars, heldout_percent, _root)
    train_rng, heldout_rng, order_seed = np.random.SeedSequence(seed).spawn(3)
    train_pairs = _pairs(train, np.random.default_rng(train_rng))
    heldout_pairs = _pairs(heldout, np.random.default_rng(heldout_rng))
    order = np.random.default_rng(order_seed).permutation(len(train_pairs))
    return [train_pairs[i] for i in order], heldout_pairs
