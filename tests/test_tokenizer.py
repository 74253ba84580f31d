"""gpt.data.tokenizer: exact round trips for every kind, save/load, clear vocab-size errors."""

import json

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from gpt.data.corpus import read_corpus
from gpt.data.errors import DataError, DataFileNotFoundError
from gpt.data.tokenizer import (
    ByteTokenizer,
    SentencePieceTokenizer,
    load_tokenizer,
    train_tokenizer,
)

# text with the characters that break naive sentencepiece setups mixed in
TRICKY = st.sampled_from(["\n", "\t", " ", "  ", "\u2581", "\r", "\x00", "é", "e\u0301", "日本", "🙂", "<s>", "</s>", "<unk>", "<0x41>"])
TEXTS = st.one_of(st.text(), st.lists(st.one_of(TRICKY, st.text(max_size=5)), max_size=30).map("".join))


@pytest.fixture(scope="module")
def corpus_texts():
    # ~200 KB of real code: enough for the small vocabularies below, fast to train on
    return [d.text for d in read_corpus(max_bytes=200_000).documents]


@pytest.fixture(scope="module")
def trained(corpus_texts):
    return {
        "bpe": train_tokenizer(corpus_texts, "bpe", 800),
        "unigram": train_tokenizer(corpus_texts[:4], "unigram", 600),
        "char": train_tokenizer(corpus_texts, "char", 4096),
    }


@settings(max_examples=300, deadline=None)
@given(TEXTS)
@example("  leading spaces\n\ttabs\n\n\ntrailing  ")
def test_byte_round_trip(text):
    tok = ByteTokenizer()
    ids = tok.encode(text)
    assert all(0 <= i < 256 for i in ids)
    assert tok.decode(ids) == text


def test_byte_specials_and_save_load(tmp_path):
    tok = ByteTokenizer()
    assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id) == (259, 256, 257, 258)
    assert tok.decode([tok.bos_id, 104, 105, tok.eos_id, tok.pad_id]) == "hi"
    tok.save(tmp_path / "tok.json")
    assert json.loads((tmp_path / "tok.json").read_text())["kind"] == "byte"
    assert isinstance(load_tokenizer(tmp_path / "tok.json"), ByteTokenizer)
    assert tok.decode([0xE6]) == "\ufffd"  # half a character decodes, never raises
    with pytest.raises(DataError, match="token id 259 is out of range"):
        tok.decode([259])


@pytest.mark.parametrize("kind", ["bpe", "unigram", "char"])
def test_sentencepiece_round_trip_on_the_corpus(trained, corpus_texts, kind):
    tok = trained[kind]
    assert tok.kind == kind
    for text in corpus_texts:
        assert tok.decode(tok.encode(text)) == text
    assert tok.encode_batch(corpus_texts[:5] + ["a\u2581b"]) == [tok.encode(t) for t in corpus_texts[:5] + ["a\u2581b"]]


@pytest.mark.parametrize("kind", ["bpe", "unigram", "char"])
def test_sentencepiece_round_trip_any_text(trained, kind):
    tok = trained[kind]

    @settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(TEXTS)
    @example("\u2581")
    @example(" \u2581 x\u2581\u2581\n")
    @example("    indented\n\n\tand tabbed  \n")
    def check(text):
        ids = tok.encode(text)
        assert all(0 <= i < tok.vocab_size for i in ids)
        assert tok.decode(ids) == text

    check()


def test_sentencepiece_ids_newline_and_compression(trained, corpus_texts):
    tok = trained["bpe"]
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, 3)
    assert tok.vocab_size == 800
    assert tok.encode("\n") == [SentencePieceTokenizer.NEWLINE]
    assert tok.encode("a\n\nb").count(SentencePieceTokenizer.NEWLINE) == 2
    assert tok.decode([tok.bos_id] + tok.encode("x = 1") + [tok.eos_id]) == "x = 1"
    text = "".join(corpus_texts)
    assert len(text.encode()) / len(tok.encode(text)) > 2.0  # it learned real merges
    assert trained["char"].vocab_size < 4096  # char: vocab_size is an upper bound


def test_save_load_dispatch(trained, tmp_path):
    for kind, tok in trained.items():
        path = tmp_path / f"{kind}.model"
        tok.save(path)
        loaded = load_tokenizer(path)
        assert isinstance(loaded, SentencePieceTokenizer) and loaded.kind == kind
        assert loaded.vocab_size == tok.vocab_size
        sample = "def f(x):\n\treturn x\u2581 + 1\n"
        assert loaded.encode(sample) == tok.encode(sample)
    (tmp_path / "junk.model").write_bytes(b"not a model")
    with pytest.raises(DataError, match="junk.model"):
        load_tokenizer(tmp_path / "junk.model")
    with pytest.raises(DataFileNotFoundError, match="missing.model"):
        load_tokenizer(tmp_path / "missing.model")


def test_vocab_size_errors_name_the_values(corpus_texts):
    small = corpus_texts[:2]
    with pytest.raises(DataError, match=r"vocab_size=50000 is too large .* vocab_size <= \d+") as info:
        train_tokenizer(small, "bpe", 50000)
    assert isinstance(info.value, ValueError)
    with pytest.raises(DataError, match=r"vocab_size=20000 is too large for this corpus: a unigram"):
        train_tokenizer(small, "unigram", 20000)
    with pytest.raises(DataError, match="vocab_size=100 is too small"):
        train_tokenizer(small, "bpe", 100)
    with pytest.raises(DataError, match="tokenizer='wordpiece'"):
        train_tokenizer(small, "wordpiece", 1000)
    with pytest.raises(DataError, match="no text to train"):
        train_tokenizer(["", "\n\n"], "bpe", 300)


def test_training_is_deterministic(corpus_texts):
    a = train_tokenizer(corpus_texts[:3], "bpe", 400, seed=1)
    b = train_tokenizer(corpus_texts[:3], "bpe", 400, seed=1)
    assert a.model_proto == b.model_proto
