"""gpt.data.corpus: reading files, directories, JSONL and the default stdlib corpus."""

import json
import os

import pytest

from gpt.data.corpus import (
    corpus_fingerprint,
    default_corpus_root,
    matches,
    read_corpus,
)
from gpt.data.errors import DataError, DataFileNotFoundError


@pytest.fixture
def tree(tmp_path):
    root = tmp_path / "proj"
    (root / "pkg" / "sub").mkdir(parents=True)
    (root / ".git").mkdir()
    (root / "__pycache__").mkdir()
    (root / "a.py").write_text("print('a')\n")
    (root / "pkg" / "b.py").write_text("x = 1\n")
    (root / "pkg" / "notes.txt").write_text("some notes\n")
    (root / "pkg" / "sub" / "c.py").write_text("y = 2\n")
    (root / ".git" / "config").write_text("[core]\n")
    (root / "__pycache__" / "a.cpython-311.pyc").write_bytes(b"\x00\x01binary")
    return root


def sources(corpus):
    return [d.source for d in corpus.documents]


def test_directory_is_read_recursively_in_sorted_order_without_hidden_or_caches(tree):
    corpus = read_corpus(tree)
    assert sources(corpus) == ["proj/a.py", "proj/pkg/b.py", "proj/pkg/notes.txt", "proj/pkg/sub/c.py"]
    assert corpus.documents[0].text == "print('a')\n"
    assert corpus.report.files_read == 4 and corpus.report.documents == 4


def test_include_and_exclude_globs(tree):
    assert sources(read_corpus(tree, include=["*.py"])) == ["proj/a.py", "proj/pkg/b.py", "proj/pkg/sub/c.py"]
    assert sources(read_corpus(tree, include=["*.py"], exclude=["sub"])) == ["proj/a.py", "proj/pkg/b.py"]
    assert sources(read_corpus(tree, include=["pkg/*"])) == ["proj/pkg/b.py", "proj/pkg/notes.txt", "proj/pkg/sub/c.py"]
    # an explicit exclude list replaces the default one: .git is then read
    assert "proj/.git/config" in sources(read_corpus(tree, exclude=["__pycache__"]))


def test_matches_semantics():
    assert matches("a/b/c.py", "*.py", any_component=False)
    assert not matches("a/tests/c.py", "tests", any_component=False)
    assert matches("a/tests/c.py", "tests", any_component=True)
    assert matches("a/tests/c.py", "a/*", any_component=False)
    assert not matches("b/tests/c.py", "a/*", any_component=True)


def test_jsonl_documents_and_bad_lines(tmp_path):
    path = tmp_path / "data.jsonl"
    lines = [
        json.dumps({"text": "first document"}),
        "not json at all",
        json.dumps([1, 2, 3]),
        json.dumps({"body": "no text field"}),
        "",
        json.dumps({"text": "second\ndocument", "id": 7}),
    ]
    path.write_text("\n".join(lines) + "\n")
    corpus = read_corpus(path)
    assert [d.text for d in corpus.documents] == ["first document", "second\ndocument"]
    assert sources(corpus) == ["data.jsonl:1", "data.jsonl:6"]
    assert corpus.report.jsonl_bad_lines == 2
    assert corpus.report.jsonl_missing_field == 1
    other = read_corpus(path, text_field="body")
    assert [d.text for d in other.documents] == ["no text field"]


def test_non_utf8_replace_and_skip_policies(tmp_path):
    (tmp_path / "good.txt").write_text("héllo wörld\n", encoding="utf-8")
    (tmp_path / "latin.txt").write_bytes("caf\xe9 cr\xe8me\n".encode("latin-1"))
    replaced = read_corpus(tmp_path)
    assert replaced.report.non_utf8_replaced == 1 and replaced.report.non_utf8_skipped == 0
    text = {d.source.split("/")[-1]: d.text for d in replaced.documents}["latin.txt"]
    assert text == "caf\ufffd cr\ufffdme\n"
    skipped = read_corpus(tmp_path, errors="skip")
    assert sources(skipped) == [f"{tmp_path.name}/good.txt"]
    assert skipped.report.non_utf8_skipped == 1
    assert skipped.report.examples["non_utf8_skipped"] == [f"{tmp_path.name}/latin.txt"]
    with pytest.raises(DataError, match="errors='ignore'"):
        read_corpus(tmp_path, errors="ignore")


def test_binary_and_unreadable_files_are_skipped_and_counted(tmp_path):
    (tmp_path / "ok.txt").write_text("fine\n")
    (tmp_path / "blob.bin").write_bytes(b"\x89PNG\x00\x00\x00data")
    os.symlink(tmp_path / "gone", tmp_path / "dangling.txt")
    corpus = read_corpus(tmp_path)
    assert [d.text for d in corpus.documents] == ["fine\n"]
    assert corpus.report.skipped_binary == 1
    assert corpus.report.skipped_unreadable == 1


def test_missing_path_and_empty_selection_errors(tmp_path):
    with pytest.raises(DataFileNotFoundError, match="does-not-exist") as info:
        read_corpus(tmp_path / "does-not-exist")
    assert isinstance(info.value, FileNotFoundError) and isinstance(info.value, ValueError)
    (tmp_path / "a.txt").write_text("x")
    with pytest.raises(DataError, match=r"no files found.*\*\.md"):
        read_corpus(tmp_path, include=["*.md"])
    with pytest.raises(DataError, match="max_files=0"):
        read_corpus(tmp_path, max_files=0)


def test_fingerprint_identifies_content(tree):
    first = read_corpus(tree).report.fingerprint
    assert first == corpus_fingerprint(tree)
    assert first["files"] == 4 and first["bytes"] == sum(
        len(p.read_bytes()) for p in [tree / "a.py", tree / "pkg/b.py", tree / "pkg/notes.txt", tree / "pkg/sub/c.py"]
    )
    assert read_corpus(tree).report.fingerprint == first  # deterministic
    (tree / "pkg" / "b.py").write_text("x = 2\n")  # same size, other content
    changed = read_corpus(tree).report.fingerprint
    assert changed["bytes"] == first["bytes"] and changed["sha256"] != first["sha256"]


def test_default_corpus_is_the_stdlib_python_sources_without_site_packages():
    corpus = read_corpus(max_files=12)
    root = default_corpus_root()
    assert root.is_dir() and (root / "os.py").is_file()
    assert len(corpus.documents) == 12 and corpus.report.skipped_by_limit > 1000
    assert all(d.source.endswith(".py") for d in corpus.documents)
    assert all("site-packages" not in d.source for d in corpus.documents)
    assert corpus.report.fingerprint["files"] == 12
    assert corpus.report.fingerprint == corpus_fingerprint(max_files=12)
    everything = read_corpus()  # ~0.3 s: the whole stdlib
    assert everything.report.files_read > 500
    assert not [d.source for d in everything.documents if "site-packages" in d.source or not d.source.endswith(".py")]
    by_bytes = read_corpus(max_bytes=50_000)
    assert by_bytes.report.bytes_read >= 50_000 and by_bytes.report.files_read < 100


def test_jsonl_file_without_the_text_field_says_which_field_to_use(tmp_path):
    path = tmp_path / "chat.jsonl"
    path.write_text("\n".join(json.dumps({"id": i, "body": f"message number {i}"}) for i in range(3)) + "\n")
    with pytest.raises(DataError) as info:
        read_corpus(path)
    msg = str(info.value)
    assert f"{path}: no JSON record has a string in the field 'text'" in msg
    assert "line 1 has the keys ['id', 'body']" in msg and "--text-field body" in msg
    assert [d.text for d in read_corpus(path, text_field="body").documents][0] == "message number 0"
    # the field is there but holds no string
    path.write_text(json.dumps({"text": ["a", "b"]}) + "\n")
    with pytest.raises(DataError, match=r"line 1 has 'text' as a JSON list, not a string.*--text-field NAME"):
        read_corpus(path)


def test_jsonl_file_of_malformed_lines_names_the_line(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text("\n" + "{'text': 'single quotes'}\n" + '{"text": "x"\n')
    with pytest.raises(DataError, match=r"broken\.jsonl line 2 is not valid JSON \(Expecting property name .*column 2\)"
                                        r".*one JSON object per line"):
        read_corpus(path)
    path.write_text('"just a string"\n')
    with pytest.raises(DataError, match=r"line 1 is a JSON string, not an object"):
        read_corpus(path)
    # in a file that also has good records, bad lines are counted and skipped, with their line numbers
    path.write_text('{"text": "good"}\n{bad\n')
    corpus = read_corpus(path)
    assert [d.text for d in corpus.documents] == ["good"] and corpus.report.examples["jsonl_bad_lines"] == ["broken.jsonl:2"]
    path.write_text("")  # an empty file is no error: it just has no documents
    assert read_corpus(path).documents == []
