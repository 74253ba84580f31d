"""gpt.align.data: SFT/DPO JSONL readers and the default sets drawn from the stdlib."""

import ast
import hashlib
import json
import textwrap
from collections import Counter

import pytest

from gpt.align.data import (
    ROLES,
    Conversation,
    Preference,
    default_dpo_set,
    default_sft_set,
    stdlib_functions,
    stdlib_report,
    read_dpo_jsonl,
    read_sft_jsonl,
)
from gpt.data.errors import DataError, DataFileNotFoundError


def heldout_by_hash(path, percent):
    """The split rule, written out again independently of the module."""
    return int(hashlib.sha256(path.encode("utf-8")).hexdigest(), 16) % 100 < percent


# ---------------------------------------------------------------------------------------
# JSONL


def write_lines(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def msgs(*pairs):
    return json.dumps({"messages": [{"role": r, "content": c} for r, c in pairs]})


SFT_LINES = [
    json.dumps({"prompt": "Add 2 and 2.", "response": "4", "id": 7}),  # 1: ok, extra key ignored
    "",  # 2: blank
    "{not json",  # 3
    "[1, 2]",  # 4
    json.dumps({"prompt": "p"}),  # 5
    json.dumps({"prompt": 3, "response": "r"}),  # 6
    json.dumps({"prompt": "p", "response": "   "}),  # 7
    json.dumps({"prompt": "", "response": "r"}),  # 8
    msgs(("system", "Be brief."), ("user", "Hi\u2028there"), ("assistant", "Hello."), ("user", "Bye"),
         ("assistant", "Bye.")),  # 9: ok (U+2028 inside a string does not split the line)
    msgs(("user", "q"), ("tool", "x"), ("assistant", "a")),  # 10
    msgs(("system", "s"), ("user", "q")),  # 11
    msgs(("assistant", "a"), ("user", "q")),  # 12
    msgs(("user", "q"), ("system", "s"), ("assistant", "a")),  # 13
    msgs(("user", "q"), ("assistant", "")),  # 14
    "   \t ",  # 15: blank (whitespace only)
    json.dumps({"text": "x"}),  # 16
    json.dumps({"messages": "hi"}),  # 17
    json.dumps({"messages": [{"role": "user", "content": "q"}], "prompt": "p", "response": "r"}),  # 18
    msgs(("user", "q"), ("assistant", "a"), ("assistant", "again")),  # 19
    msgs(("user", "q"), ("assistant", " \n ")),  # 20
    json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": 1, "content": "a"}]}),  # 21
    json.dumps({"prompt": "CRLF line", "response": "ok"}) + "\r",  # 22: ok, \r is JSON whitespace
]
SFT_BAD = [  # (line, a piece of the reason)
    (3, "not JSON"),
    (4, "a JSON list, not an object"),
    (5, "no 'response' field"),
    (6, "'prompt' is a JSON number, not a string"),
    (7, "'response' is only whitespace"),
    (8, "'prompt' is empty"),
    (10, "role 'tool' is not one of the known roles ('system', 'user', 'assistant')"),
    (11, "no assistant message"),
    (12, "an assistant message must follow a user message"),
    (13, "a system message may only be the first message"),
    (14, "message 1: 'content' is empty"),
    (16, "no 'prompt'/'response' or 'messages' field"),
    (17, "'messages' is a JSON string, not a list"),
    (18, "has both 'messages' and 'prompt'/'response'"),
    (19, "message 2: an assistant message must follow a user message, but this one follows a assistant"),
    (20, "message 1: 'content' is only whitespace"),
    (21, "message 1: 'role' is a JSON number, not a string"),
]


def test_sft_jsonl_both_formats_and_every_bad_line(tmp_path):
    path = write_lines(tmp_path / "sft.jsonl", SFT_LINES)
    convs, report = read_sft_jsonl(path)
    assert convs == [
        Conversation((("user", "Add 2 and 2."), ("assistant", "4")), f"{path}:1"),
        Conversation((("system", "Be brief."), ("user", "Hi\u2028there"), ("assistant", "Hello."), ("user", "Bye"),
                      ("assistant", "Bye.")), f"{path}:9"),
        Conversation((("user", "CRLF line"), ("assistant", "ok")), f"{path}:22"),
    ]
    assert all(role in ROLES for c in convs for role, _ in c.messages)
    assert report.path == str(path)
    assert report.lines == len(SFT_LINES) - 2  # two blank lines are not counted
    assert report.kept == 3
    assert [n for n, _ in report.skipped] == [n for n, _ in SFT_BAD]
    for (n, why), (_, expected) in zip(report.skipped, SFT_BAD):
        assert expected in why, (n, why)
    summary = report.summary()
    assert summary.startswith(f"read 20 lines of {path}: kept 3, skipped 17 (line 3: not JSON")
    assert "line 7: 'response' is only whitespace; and 12 more)" in summary and "line 8" not in summary
    assert "\n" not in summary


def test_sft_strict_raises_at_the_first_bad_line(tmp_path):
    path = write_lines(tmp_path / "sft.jsonl", SFT_LINES)
    with pytest.raises(DataError, match=r"sft.jsonl line 3: not JSON .*drop --strict"):
        read_sft_jsonl(path, strict=True)
    good = write_lines(tmp_path / "good.jsonl", [SFT_LINES[0], "", SFT_LINES[8]])
    convs, report = read_sft_jsonl(good, strict=True)
    assert len(convs) == 2 and report.skipped == [] and report.summary() == f"read 2 lines of {good}: kept 2, skipped 0"


def test_dpo_jsonl(tmp_path):
    lines = [
        json.dumps({"prompt": "p", "chosen": "good", "rejected": "bad"}),
        json.dumps({"prompt": "p", "chosen": "same", "rejected": "same"}),
        json.dumps({"prompt": "p", "chosen": "good"}),
        json.dumps({"prompt": "p", "chosen": "", "rejected": "bad"}),
        json.dumps({"prompt": " ", "chosen": "a", "rejected": "b"}),
        json.dumps({"prompt": "p", "chosen": ["a"], "rejected": "b"}),
        "null",
    ]
    path = write_lines(tmp_path / "dpo.jsonl", lines)
    prefs, report = read_dpo_jsonl(path)
    assert prefs == [Preference("p", "good", "bad", f"{path}:1")]
    assert (report.lines, report.kept) == (7, 1)
    assert report.skipped == [
        (2, "'chosen' and 'rejected' are the same text: nothing to prefer"),
        (3, "no 'rejected' field"),
        (4, "'chosen' is empty"),
        (5, "'prompt' is only whitespace"),
        (6, "'chosen' is a JSON list, not a string"),
        (7, "a JSON null, not an object"),
    ]
    with pytest.raises(DataError, match="line 2: 'chosen' and 'rejected' are the same"):
        read_dpo_jsonl(path, strict=True)


def test_jsonl_file_errors(tmp_path):
    with pytest.raises(DataFileNotFoundError, match="missing.jsonl"):
        read_sft_jsonl(tmp_path / "missing.jsonl")
    with pytest.raises(DataError, match="is a directory"):
        read_dpo_jsonl(tmp_path)
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes(json.dumps({"prompt": "p", "response": "r"}).encode() + b"\n" + b'{"prompt": "caf\xe9"}\n')
    with pytest.raises(DataError, match=r"latin.jsonl is not UTF-8 \(line 2"):
        read_sft_jsonl(latin)
    useless = write_lines(tmp_path / "useless.jsonl", ["", "oops", json.dumps({"prompt": "p", "response": ""})])
    reasons = r"\(line 2: not JSON.*line 3: 'response' is empty\)"
    with pytest.raises(DataError, match=r"no usable SFT example in the 2 lines read " + reasons):
        read_sft_jsonl(useless)
    with pytest.raises(DataError, match="no usable DPO example"):
        read_dpo_jsonl(useless)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n  \n")
    with pytest.raises(DataError, match="empty.jsonl is empty"):
        read_sft_jsonl(empty)
    bom = tmp_path / "bom.jsonl"
    bom.write_bytes(b"\xef\xbb\xbf" + json.dumps({"prompt": "p", "response": "r"}).encode())  # no final newline
    assert read_sft_jsonl(bom)[0] == [Conversation((("user", "p"), ("assistant", "r")), f"{bom}:1")]


# ---------------------------------------------------------------------------------------
# Extraction, on a small stdlib-like folder

MOD = '''\
"""Module docstring."""
import functools


@functools.cache
def top(a, b=1):
    """Add.

    Two lines of doc."""
    # a comment in the body
    return a + b


def undocumented(x):
    return x


def only_doc():
    """Nothing after me."""


def same_line():
    """Doc."""; return 1


def args(a, /, b, *rest, c, d=2, **kw):
    """All kinds."""
    pass


class Outer:
    """A class."""

    def meth(self, x):
        """Method doc."""
        def inner(y):
            """Nested: not kept."""
            return y
        return inner(x)

    class Inner:
        @staticmethod
        async def deep():
            """Async, two classes deep.
continuation at column 0
            """
            await thing()
            return 1


if True:
    def conditional(*a, **k):
        """Defined under an if."""
        return a, k
'''

MOD_FUNCTIONS = {  # qualname -> (prompt, body, arity)
    "top": ('def top(a, b=1):\n    """Add.\n\n    Two lines of doc."""\n',
            "    # a comment in the body\n    return a + b\n", 2),
    "args": ('def args(a, /, b, *rest, c, d=2, **kw):\n    """All kinds."""\n', "    pass\n", 6),
    "Outer.meth": ('def meth(self, x):\n    """Method doc."""\n',
                   '    def inner(y):\n        """Nested: not kept."""\n        return y\n    return inner(x)\n', 2),
    "Outer.Inner.deep": ('async def deep():\n    """Async, two classes deep.\ncontinuation at column 0\n    """\n',
                         "    await thing()\n    return 1\n", 0),
    "conditional": ('def conditional(*a, **k):\n    """Defined under an if."""\n', "    return a, k\n", 2),
}


@pytest.fixture
def fake_stdlib(tmp_path):
    root = tmp_path / "lib"
    (root / "pkg").mkdir(parents=True)
    (root / "mod.py").write_text(MOD)
    (root / "pkg" / "__init__.py").write_text("")
    (root / "pkg" / "sub.py").write_text('def f(x):\n    """Doc."""\n    return x\n')
    (root / "broken.py").write_text('def f(:\n    """Doc."""\n    return 1\n')
    (root / "latin.py").write_bytes(b'def f():\n    """Caf\xe9."""\n    return 1\n')
    for test_dir in ("test", "pkg/tests", "idlelib/idle_test"):
        (root / test_dir).mkdir(parents=True)
        (root / test_dir / "test_x.py").write_text('def test_f(x):\n    """Doc."""\n    assert x\n')
    (root / "site-packages").mkdir()
    (root / "site-packages" / "thirdparty.py").write_text('def f(x):\n    """Doc."""\n    return x\n')
    return root


def test_extraction_is_verbatim_and_keeps_the_right_functions(fake_stdlib):
    functions = stdlib_functions(10_000, _root=fake_stdlib)
    assert [(f.path, f.qualname) for f in functions] == [
        ("mod.py", q) for q in MOD_FUNCTIONS] + [("pkg/sub.py", "f")]
    for f in functions[:-1]:
        assert (f.prompt, f.body, f.arity) == MOD_FUNCTIONS[f.qualname], f.qualname
    # prompt + body is the def's source lines (decorators excluded), dedented by the def's indent
    lines = MOD.split("\n")
    for f in functions[:-1]:
        start = next(i for i, line in enumerate(lines) if line.lstrip().startswith(
            ("def " + f.qualname.split(".")[-1] + "(", "async def " + f.qualname.split(".")[-1] + "(")))
        indent = len(lines[start]) - len(lines[start].lstrip())
        n = (f.prompt + f.body).count("\n")
        expected = "".join((line[indent:] if line.startswith(" " * indent) else line) + "\n"
                           for line in lines[start:start + n])
        assert f.prompt + f.body == expected
        assert f.body.endswith("\n") and not f.prompt.startswith("@")
        ast.parse(f.prompt + f.body)  # a whole function again

    report = stdlib_report(_root=fake_stdlib)
    assert report.files == 5  # mod, pkg/__init__, pkg/sub, broken, latin: no test folder, no site-packages
    assert dict(report.skipped).keys() == {"broken.py", "latin.py"}
    assert "does not parse" in dict(report.skipped)["broken.py"]
    assert dict(report.skipped)["latin.py"] == "not UTF-8"


def test_max_chars_filter(fake_stdlib):
    sizes = {f.qualname: len(f.prompt) + len(f.body) for f in stdlib_functions(10_000, _root=fake_stdlib)}
    limit = sizes["top"]
    kept = {f.qualname for f in stdlib_functions(limit, _root=fake_stdlib)}
    assert kept == {q for q, n in sizes.items() if n <= limit} and "top" in kept
    assert "top" not in {f.qualname for f in stdlib_functions(limit - 1, _root=fake_stdlib)}
    with pytest.raises(DataError, match="max_chars=0"):
        stdlib_functions(0, _root=fake_stdlib)
    with pytest.raises(DataError, match="no function of the .* fits max_chars=10"):
        default_sft_set(max_chars=10, _root=fake_stdlib)


def test_sft_set_on_a_folder_splits_by_file_hash(tmp_path):
    root = tmp_path / "lib"
    root.mkdir()
    names = [f"m{i}.py" for i in range(40)]
    for name in names:
        (root / name).write_text("".join(
            f'def f{j}(x):\n    """Doc {j}."""\n    return x + {j}\n\n' for j in range(3)))
    train, heldout = default_sft_set(seed=0, heldout_percent=30, _root=root)
    held_files = {c.source.split(":")[1] for c in heldout}
    assert held_files == {n for n in names if heldout_by_hash(n, 30)} and 0 < len(held_files) < 40
    assert {c.source.split(":")[1] for c in train} == set(names) - held_files
    assert len(train) + len(heldout) == 120
    c = next(c for c in heldout + train if c.source == "stdlib:m3.py:f2")
    assert c.messages == (("user", 'def f2(x):\n    """Doc 2."""\n'), ("assistant", "    return x + 2\n"))
    assert default_sft_set(heldout_percent=0, _root=root)[1] == []
    assert default_sft_set(heldout_percent=100, _root=root)[0] == []
    with pytest.raises(DataError, match="heldout_percent=101"):
        default_sft_set(heldout_percent=101, _root=root)


# ---------------------------------------------------------------------------------------
# DPO rules, on folders where the rule to apply is known


def one_drop(chosen, rejected):
    """Whether `rejected` is `chosen` with the lines of exactly one top-level statement removed."""
    c, r = (text.split("\n")[:-1] for text in (chosen, rejected))  # both end with "\n"
    m = len(c) - len(r)
    if m <= 0 or not r:
        return False
    for k in range(len(r) + 1):
        if c[:k] == r[:k] and c[k + m:] == r[k:]:
            try:
                block = ast.parse(textwrap.dedent("\n".join(c[k:k + m]))).body
            except SyntaxError:
                continue
            if len(block) == 1:
                return True
    return False


def test_dpo_rule_b_only_when_no_partner_and_skip_when_neither(tmp_path):
    root = tmp_path / "lib"
    root.mkdir()
    (root / "a.py").write_text(
        'def one():\n    """No args."""\n    x = 1\n    @deco\n    def g():\n        pass\n    return x\n\n'
        'def two(a):\n    """One arg, one statement: no pair."""\n    return a\n\n'
        'def three(a, b):\n    """Two args."""\n    a += b; b += a\n    return a\n')
    for seed in range(20):
        train, heldout = default_dpo_set(seed=seed, heldout_percent=0, _root=root)
        assert heldout == []
        by_name = {p.source.split(":")[-1]: p for p in train}
        assert set(by_name) == {"one", "three"}  # `two` has neither a partner nor 2 statements
        one = by_name["one"]
        assert one.chosen == "    x = 1\n    @deco\n    def g():\n        pass\n    return x\n"
        assert one.rejected in ("    @deco\n    def g():\n        pass\n    return x\n",  # decorator goes too
                                "    x = 1\n    return x\n", "    x = 1\n    @deco\n    def g():\n        pass\n")
        # `a += b; b += a` share a line: only `return a` can be dropped
        assert by_name["three"].rejected == "    a += b; b += a\n"
    assert len({default_dpo_set(seed=s, heldout_percent=0, _root=root)[0][0].rejected for s in range(20)}) > 1


def test_dpo_rule_a_same_arity_different_body_within_the_part(tmp_path):
    root = tmp_path / "lib"
    root.mkdir()
    for i in range(30):
        (root / f"m{i}.py").write_text(
            f'def f(x):\n    """Doc."""\n    return x * {i % 10}\n\n'
            f'def g(x, y):\n    """Doc."""\n    return x - {i}\n')
    seen = Counter()
    for seed in range(5):
        train, heldout = default_dpo_set(seed=seed, heldout_percent=40, _root=root)
        for part in (train, heldout):
            bodies = {}
            for p in part:
                bodies.setdefault(p.prompt.split("(")[0], set()).add(p.chosen)
            for p in part:
                assert p.rejected != p.chosen
                assert p.rejected in bodies[p.prompt.split("(")[0]]  # same arity, same part
                seen[p.rejected] += 1
        assert {p.source.split(":")[1] for p in heldout}.isdisjoint({p.source.split(":")[1] for p in train})
    assert len(seen) >= 15  # the partners vary


# ---------------------------------------------------------------------------------------
# The real standard library


@pytest.fixture(scope="module")
def real_sets():
    sft = default_sft_set(seed=0)
    dpo = default_dpo_set(seed=0)
    report = stdlib_report()
    print(f"\nstdlib: {report.files} files, {report.functions} functions in {report.seconds:.2f} s; "
          f"SFT train {len(sft[0])} / held-out {len(sft[1])}; DPO train {len(dpo[0])} / held-out {len(dpo[1])}")
    return sft, dpo


def test_default_sft_set_on_the_stdlib(real_sets):
    (train, heldout), _ = real_sets
    assert len(train) > 1000 and len(heldout) > 50
    assert stdlib_report().skipped == ()
    file_of = lambda c: c.source.split(":")[1]  # noqa: E731
    train_files, held_files = {file_of(c) for c in train}, {file_of(c) for c in heldout}
    assert train_files.isdisjoint(held_files)
    assert all(heldout_by_hash(f, 10) for f in held_files) and not any(heldout_by_hash(f, 10) for f in train_files)
    assert not any(f.startswith(("test/", "idlelib/idle_test/")) or "/tests/" in f for f in train_files | held_files)
    all_files = {f.path for f in stdlib_functions(10**9)}
    share = sum(heldout_by_hash(f, 10) for f in all_files) / len(all_files)
    assert 0.05 < share < 0.15, share
    for c in train[:200] + heldout[:200]:
        (ur, prompt), (ar, body) = c.messages
        assert (ur, ar) == ("user", "assistant") and len(prompt) + len(body) <= 400
        assert prompt.startswith(("def ", "async def ")) and body.endswith("\n")

    train1, heldout1 = default_sft_set(seed=1)
    assert heldout1 == heldout
    assert train1 != train and Counter(train1) == Counter(train)


def test_default_dpo_set_on_the_stdlib(real_sets):
    _, (train, heldout) = real_sets
    assert len(train) > 1000 and len(heldout) > 50
    functions = stdlib_functions(400)
    arity = {}
    for f in functions:
        arity.setdefault((f.prompt, f.body), set()).add(f.arity)
    held_files = {f.path for f in functions if heldout_by_hash(f.path, 10)}
    kinds = Counter()
    for part, in_part in ((train, lambda f: f.path not in held_files), (heldout, lambda f: f.path in held_files)):
        bodies_by_arity = {}
        for f in functions:
            if in_part(f):
                bodies_by_arity.setdefault(f.arity, set()).add(f.body)
        for p in part:
            assert p.rejected != p.chosen
            (a,) = arity[(p.prompt, p.chosen)]
            if p.rejected in bodies_by_arity[a]:
                kinds["a"] += 1  # another body of the same arity in the same part
            else:
                assert one_drop(p.chosen, p.rejected), p.source
                kinds["b"] += 1
    assert kinds["a"] > 500 and kinds["b"] > 300, kinds
    assert default_dpo_set(seed=0) == (train, heldout)
    other = default_dpo_set(seed=1)
    assert other[0] != train and {p.chosen for p in other[0]} == {p.chosen for p in train}
