"""gpt.data.clean: normalisation and quality filters."""

import unicodedata

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gpt.data.clean import FILTER_ORDER, CleanConfig, clean_documents, normalize_text, quality_reason
from gpt.data.corpus import Document
from gpt.data.errors import DataError

CODE = "def f(x):\n    return x + 1\n\n\nclass A:\n    pass\n"


def test_line_endings_controls_bom_and_nfc():
    text, stats = normalize_text("\ufeffa\r\nb\rc\x00d\x1b[0m\te\x7f\x85f\n")
    assert text == "a\nb\ncd[0m\tef\n"
    assert stats == {"line_endings": 1, "control": 5, "nfc": 0}
    decomposed = "cafe\u0301"  # e + combining acute
    text, stats = normalize_text(decomposed)
    assert text == "caf\u00e9" and stats["nfc"] == 1


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_normalized_text_is_idempotent_and_clean(text):
    once, _ = normalize_text(text)
    assert normalize_text(once)[0] == once
    assert "\r" not in once
    assert all(unicodedata.category(ch) != "Cc" or ch in "\n\t" for ch in once)
    assert unicodedata.is_normalized("NFC", once)


def reasons(texts, **config):
    docs = [Document(f"d{i}", t) for i, t in enumerate(texts)]
    kept, report = clean_documents(docs, config)
    return [d.source for d in kept], report


def test_each_filter_drops_with_its_reason():
    texts = [
        CODE,  # kept
        "x = 1\n",  # too_short (6 < 32)
        CODE * 200,  # too_long with max_chars=5000
        CODE + "\ufffd" * 5,  # bad_encoding
        "#" * 40 + " !! ?? -- ++ ** //\n",  # low_alnum
        CODE + "data = b'" + "\\x00" * 400 + "'\n",  # long_line (> 1000)
        "\n".join(["print('repeated line here')"] * 20) + "\n" + CODE,  # repeated_lines
    ]
    kept, report = reasons(texts, max_chars=5000)
    assert kept == ["d0"]
    assert report.dropped == dict(zip(FILTER_ORDER, [1, 1, 1, 1, 1, 1]))
    assert report.examples["long_line"] == ["d5"]
    assert report.documents_in == 7 and report.documents_out == 1
    assert report.dropped_chars["too_short"] == len("x = 1\n")
    assert report.chars_out == len(CODE)


def test_thresholds_are_respected_at_the_boundary():
    doc = "a" * 50
    assert quality_reason(doc, CleanConfig(min_chars=50)) is None
    assert quality_reason(doc, CleanConfig(min_chars=51)) == "too_short"
    assert quality_reason(doc, CleanConfig(max_chars=49)) == "too_long"
    line = "x" * 1000 + "\n" + CODE
    assert quality_reason(line, CleanConfig(max_line_chars=1000)) is None
    assert quality_reason(line, CleanConfig(max_line_chars=999)) == "long_line"
    half = "alpha beta gamma delta\n" * 2 + "zeta eta theta iota\n" * 2  # half the chars repeat
    assert quality_reason(half, CleanConfig(max_repeated_line_fraction=0.5)) is None
    assert quality_reason(half, CleanConfig(max_repeated_line_fraction=0.49)) == "repeated_lines"
    symbols = "ab" + "-" * 8  # 2 of 10 non-space chars are alphanumeric
    assert quality_reason(symbols, CleanConfig(min_chars=0, min_alnum_fraction=0.2)) is None
    assert quality_reason(symbols, CleanConfig(min_chars=0, min_alnum_fraction=0.21)) == "low_alnum"
    unicode = "été ∑∑∑∑"  # 3 of 7 non-space chars are letters: 0.4286 (the non-ASCII path)
    assert quality_reason(unicode, CleanConfig(min_chars=0, min_alnum_fraction=0.42)) is None
    assert quality_reason(unicode, CleanConfig(min_chars=0, min_alnum_fraction=0.43)) == "low_alnum"


def test_none_disables_filters():
    junk = "\ufffd" * 10 + "!" * 5000
    off = CleanConfig(min_chars=None, max_chars=None, max_replacement_fraction=None, min_alnum_fraction=None,
                      max_line_chars=None, max_repeated_line_fraction=None)
    assert quality_reason(junk, off) is None
    assert quality_reason(junk, CleanConfig()) == "bad_encoding"


def test_kept_documents_are_normalised():
    kept, _ = clean_documents([Document("w", CODE.replace("\n", "\r\n"))])
    assert kept[0].text == CODE and kept[0].source == "w"


def test_bad_options_are_clear_errors():
    with pytest.raises(DataError, match=r"unknown clean option\(s\) \['min_char'\]"):
        clean_documents([], {"min_char": 3})
    with pytest.raises(DataError, match="min_alnum_fraction=1.5"):
        CleanConfig(min_alnum_fraction=1.5)
    with pytest.raises(DataError, match="min_chars=10 > max_chars=5"):
        CleanConfig(min_chars=10, max_chars=5)
    with pytest.raises(DataError, match="max_line_chars=-1"):
        CleanConfig(max_line_chars=-1)


def test_thresholds_as_written_on_the_command_line_or_in_toml():
    from gpt.data.clean import CLEAN_OPTIONS, clean_cli_options, parse_threshold

    assert parse_threshold("min_chars", "none") is None and parse_threshold("max_line_chars", "OFF") is None
    assert parse_threshold("min_chars", False) is None  # TOML has no null
    assert parse_threshold("min_chars", "12") == 12 and parse_threshold("min_alnum_fraction", "0.5") == 0.5
    assert parse_threshold("min_chars", 7) == 7
    with pytest.raises(DataError, match=r"clean option min_chars='1.5' must be an integer or none"):
        parse_threshold("min_chars", "1.5")
    with pytest.raises(DataError, match=r"max_repeated_line_fraction='lots' must be a fraction in \[0, 1\] or none"):
        parse_threshold("max_repeated_line_fraction", "lots")
    specs = clean_cli_options()  # one flag per field, defined by the dataclass alone
    assert tuple(specs) == CLEAN_OPTIONS
    parse, help_text = specs["max_line_chars"]
    assert parse("none") == "none" and parse("80") == 80 and "(default 1000; none disables it)" in help_text
    with pytest.raises(ValueError):  # argparse turns this into its one-line usage error
        parse("eighty")
