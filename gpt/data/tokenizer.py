"""Tokenizers: text <-> token ids, with one interface for every kind.

Fourth stage of the data pipeline. Every tokenizer guarantees ``decode(encode(t)) == t``
for any Python string ``t`` that is valid Unicode (no lone surrogates): a language
model trained on code must be able to reproduce indentation, tabs, trailing spaces and
blank lines exactly.

* `ByteTokenizer`: no training, no unknown tokens. Ids 0..255 are the UTF-8 bytes, then
  three specials: ``bos_id = 256``, ``eos_id = 257``, ``pad_id = 258``;
  ``vocab_size = 259``. Good for tests and tiny models; ~1 token per byte.
* `SentencePieceTokenizer`: BPE, unigram or char models trained with the
  ``sentencepiece`` package from an in-memory iterator of lines, configured so that
  nothing is lost: ``normalization_rule_name="identity"`` (no NFKC, the clean stage
  already did NFC), ``remove_extra_whitespaces=False`` and ``add_dummy_prefix=False``
  (spaces are data), ``byte_fallback=True`` (a character outside the vocabulary becomes
  its UTF-8 bytes, never ``<unk>``), ``allow_whitespace_only_pieces=True`` (runs of
  indentation become single pieces), ``split_digits=True``. Newline is a user-defined
  symbol, so ``"\\n"`` is always exactly one token (training is on lines, which never
  contain it). Ids: ``unk=0, bos=1, eos=2, pad=3, "\\n"=4``, then the 256 byte pieces,
  then the learned pieces. U+2581 ("▁"), which sentencepiece uses internally for a space,
  is encoded as its three byte pieces so it decodes to itself and not to a space.

`load_tokenizer(path)` reads either kind back: a JSON file is a byte tokenizer, anything
else a sentencepiece model.
"""

from __future__ import annotations

import json
import os
import re
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Iterable, Iterator, Sequence

from gpt.data.errors import DataError, DataFileNotFoundError
from gpt.data.shards import atomic_write_bytes, atomic_write_text

SENTENCEPIECE_KINDS = ("bpe", "unigram", "char")
TOKENIZER_KINDS = SENTENCEPIECE_KINDS + ("byte",)
_SPACE_META = "\u2581"  # sentencepiece's whitespace symbol
_JSON_FORMAT = "tensorlite-tokenizer"
# lines sampled for training when input_sentence_size is None (see SentencePieceTokenizer.train)
DEFAULT_SENTENCES = {"bpe": 2_000_000, "char": 2_000_000, "unigram": 100_000}


class Tokenizer(ABC):
    """The interface the rest of the stack sees."""

    kind: str

    @property
    @abstractmethod
    def vocab_size(self) -> int: ...

    @property
    @abstractmethod
    def bos_id(self) -> int: ...

    @property
    @abstractmethod
    def eos_id(self) -> int: ...

    @property
    @abstractmethod
    def pad_id(self) -> int: ...

    @abstractmethod
    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (no bos/eos added)."""

    @abstractmethod
    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids``; special ids (bos/eos/pad) decode to nothing."""

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """``[encode(t) for t in texts]``, possibly faster (multithreaded)."""
        return [self.encode(t) for t in texts]

    @abstractmethod
    def save(self, path: str | os.PathLike) -> None:
        """Write the tokenizer to one file (atomically)."""

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Tokenizer":
        return load_tokenizer(path)

    def _check_ids(self, ids: Iterable[int]) -> list[int]:
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise DataError(
                f"token id {bad[0]} is out of range for this {self.kind} tokenizer (vocab_size={self.vocab_size})"
            )
        return ids

    def __repr__(self) -> str:
        return f"{type(self).__name__}(kind={self.kind!r}, vocab_size={self.vocab_size})"


# ----------------------------------------------------------------------------- bytes


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes as ids 0..255, then bos=256, eos=257, pad=258 (vocab_size 259)."""

    kind = "byte"

    @property
    def vocab_size(self) -> int:
        return 259

    @property
    def bos_id(self) -> int:
        return 256

    @property
    def eos_id(self) -> int:
        return 257

    @property
    def pad_id(self) -> int:
        return 258

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Iterable[int]) -> str:
        # an arbitrary id sequence (e.g. sampled) may cut a character in half: U+FFFD then
        return bytes(i for i in self._check_ids(ids) if i < 256).decode("utf-8", errors="replace")

    def save(self, path: str | os.PathLike) -> None:
        spec = {"format": _JSON_FORMAT, "version": 1, "kind": "byte", "vocab_size": self.vocab_size,
                "bos_id": self.bos_id, "eos_id": self.eos_id, "pad_id": self.pad_id}
        atomic_write_text(path, json.dumps(spec, indent=1) + "\n")


# ----------------------------------------------------------------------------- sentencepiece


def _model_type_of(proto: bytes) -> str | None:
    """Read ``trainer_spec.model_type`` out of a serialized sentencepiece ModelProto.

    A minimal protobuf walk (ModelProto field 2 = TrainerSpec, its field 3 = model_type),
    so loading a tokenizer does not need the protobuf package. None if not found."""
    names = {1: "unigram", 2: "bpe", 3: "word", 4: "char"}

    def varint(buf: bytes, i: int) -> tuple[int, int]:
        shift = value = 0
        while True:
            byte = buf[i]
            i += 1
            value |= (byte & 0x7F) << shift
            if byte < 0x80:
                return value, i
            shift += 7

    def fields(buf: bytes) -> Iterator[tuple[int, int, object]]:
        i = 0
        while i < len(buf):
            key, i = varint(buf, i)
            number, wire = key >> 3, key & 7
            if wire == 0:
                value, i = varint(buf, i)
            elif wire == 1:
                value, i = buf[i : i + 8], i + 8
            elif wire == 2:
                n, i = varint(buf, i)
                value, i = buf[i : i + n], i + n
            elif wire == 5:
                value, i = buf[i : i + 4], i + 4
            else:
                raise ValueError("unsupported wire type")
            yield number, wire, value

    try:
        for number, wire, value in fields(proto):
            if number == 2 and wire == 2:
                for n2, w2, v2 in fields(value):
                    if n2 == 3 and w2 == 0:
                        return names.get(v2)
                return "unigram"  # the proto2 default
    except (IndexError, ValueError):
        return None
    return None


def _training_lines(texts: Iterable[str], max_chars: int) -> Iterator[str]:
    """Non-empty lines of the texts, long lines cut into pieces of at most ``max_chars``
    characters (sentencepiece silently skips sentences longer than max_sentence_length
    bytes; a prose corpus with one paragraph per line would otherwise be lost)."""
    for text in texts:
        for line in text.split("\n"):
            for i in range(0, len(line), max_chars):
                yield line[i : i + max_chars]


_TOO_HIGH = re.compile(r"Vocabulary size too high \((\d+)\)\. Please set it to a value <= (\d+)")
_TOO_LOW = re.compile(r"Vocabulary size is smaller than required_chars\. (\d+) vs (\d+)")


def _training_error(exc: RuntimeError, model_type: str, vocab_size: int) -> DataError:
    msg = str(exc)
    if m := _TOO_HIGH.search(msg):
        return DataError(
            f"vocab_size={vocab_size} is too large for this corpus: a {model_type} tokenizer can learn at most "
            f"{m.group(2)} pieces from it; pass a vocab_size <= {m.group(2)} or give it more text"
        )
    if m := _TOO_LOW.search(msg):
        return DataError(
            f"vocab_size={vocab_size} is too small for a {model_type} tokenizer on this corpus: it needs at least "
            f"{m.group(2)} pieces (specials, the 256 byte pieces and the required characters); pass a vocab_size >= "
            f"{m.group(2)} or a lower character_coverage"
        )
    if "sentences_.empty()" in msg:
        return DataError(f"no text to train the {model_type} tokenizer on: the corpus is empty after cleaning")
    return DataError(f"sentencepiece failed to train a {model_type} tokenizer with vocab_size={vocab_size}: {msg}")


class SentencePieceTokenizer(Tokenizer):
    """A trained sentencepiece model (bpe, unigram or char) with exact round trips."""

    UNK, BOS, EOS, PAD, NEWLINE = 0, 1, 2, 3, 4

    def __init__(self, model_proto: bytes, kind: str | None = None):
        import sentencepiece as spm

        self._proto = bytes(model_proto)
        self._sp = spm.SentencePieceProcessor(model_proto=self._proto)
        self.kind = kind or _model_type_of(self._proto) or "sentencepiece"
        # the UTF-8 bytes of U+2581 as byte-piece ids, to encode that character literally
        self._space_meta_ids = [self._sp.piece_to_id(f"<0x{b:02X}>") for b in _SPACE_META.encode("utf-8")]

    @classmethod
    def train(
        cls,
        texts: Iterable[str],
        model_type: str = "bpe",
        vocab_size: int = 4096,
        *,
        character_coverage: float = 0.9995,
        max_sentence_length: int = 16384,
        input_sentence_size: int | None = None,
        seed: int = 0,
        num_threads: int | None = None,
    ) -> "SentencePieceTokenizer":
        """Train on the lines of ``texts`` (an iterable of documents).

        ``input_sentence_size`` lines at most are sampled (sentencepiece's reservoir, seeded
        by ``seed``) so training time stays bounded on large corpora; the stdlib has about
        0.8 M non-empty lines. The default (None) is per model type (`DEFAULT_SENTENCES`):
        2 M lines for bpe and char (the whole stdlib, ~4 s for bpe 4096), 100 k for
        unigram, whose EM training is ~20x slower per line (the whole stdlib: 70 s; 100 k
        lines: 16 s, and the same 2.99 bytes/token). For ``model_type="char"`` ``vocab_size`` is an upper bound:
        the model has one piece per character kept (plus specials and bytes), and
        `vocab_size` reports the real number.
        """
        import io

        import sentencepiece as spm

        if model_type not in SENTENCEPIECE_KINDS:
            raise DataError(
                f"model_type={model_type!r} is not a sentencepiece model type: use one of {SENTENCEPIECE_KINDS}"
            )
        if not isinstance(vocab_size, int) or isinstance(vocab_size, bool) or vocab_size <= 0:
            raise DataError(f"vocab_size={vocab_size!r} must be a positive integer")
        minimum = 5 + 256  # 4 specials + "\n", 256 byte pieces
        if vocab_size <= minimum:
            raise DataError(
                f"vocab_size={vocab_size} is too small for a {model_type} tokenizer with byte fallback: it needs more "
                f"than {minimum} pieces (4 specials, newline, 256 bytes); pass a vocab_size > {minimum}, or use the "
                f"byte tokenizer"
            )
        spm.set_random_generator_seed(seed)  # process-global in sentencepiece: seeds the sentence sampling
        model = io.BytesIO()
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=_training_lines(texts, max_sentence_length // 4),
                model_writer=model,
                model_type=model_type,
                vocab_size=vocab_size,
                character_coverage=character_coverage,
                normalization_rule_name="identity",
                remove_extra_whitespaces=False,
                add_dummy_prefix=False,
                byte_fallback=True,
                allow_whitespace_only_pieces=True,
                split_digits=True,
                user_defined_symbols=["\n"],
                unk_id=cls.UNK,
                bos_id=cls.BOS,
                eos_id=cls.EOS,
                pad_id=cls.PAD,
                max_sentence_length=max_sentence_length,
                input_sentence_size=input_sentence_size or DEFAULT_SENTENCES[model_type],
                shuffle_input_sentence=True,
                num_threads=num_threads or os.cpu_count() or 1,
                minloglevel=2,  # warnings and errors only
            )
        except RuntimeError as exc:
            if "KeyboardInterrupt" in str(exc):   # Ctrl-C inside sentencepiece's C++ loop
                raise KeyboardInterrupt from None
            raise _training_error(exc, model_type, vocab_size) from None
        return cls(model.getvalue(), kind=model_type)

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    @property
    def bos_id(self) -> int:
        return self._sp.bos_id()

    @property
    def eos_id(self) -> int:
        return self._sp.eos_id()

    @property
    def pad_id(self) -> int:
        return self._sp.pad_id()

    @property
    def model_proto(self) -> bytes:
        return self._proto

    def id_to_piece(self, i: int) -> str:
        return self._sp.id_to_piece(int(i))

    def encode(self, text: str) -> list[int]:
        if _SPACE_META not in text:
            return self._sp.encode(text)
        ids: list[int] = []
        for k, part in enumerate(text.split(_SPACE_META)):
            if k:
                ids.extend(self._space_meta_ids)
            if part:
                ids.extend(self._sp.encode(part))
        return ids

    def encode_batch(self, texts: Sequence[str], num_threads: int | None = None) -> list[list[int]]:
        texts = list(texts)
        plain = [i for i, t in enumerate(texts) if _SPACE_META not in t]
        out: list[list[int] | None] = [None] * len(texts)
        if plain:
            encoded = self._sp.encode([texts[i] for i in plain], num_threads=num_threads or os.cpu_count() or 1)
            for i, ids in zip(plain, encoded):
                out[i] = ids
        for i, ids in enumerate(out):
            if ids is None:
                out[i] = self.encode(texts[i])
        return out  # type: ignore[return-value]

    def decode(self, ids: Iterable[int]) -> str:
        return self._sp.decode(self._check_ids(ids))

    def save(self, path: str | os.PathLike) -> None:
        atomic_write_bytes(path, self._proto)


# ----------------------------------------------------------------------------- factory


def train_tokenizer(texts: Iterable[str], kind: str = "bpe", vocab_size: int = 4096, **options) -> Tokenizer:
    """A tokenizer of ``kind`` (one of bpe, unigram, char, byte) for ``texts``.

    The byte tokenizer needs no training (``texts`` and ``vocab_size`` are ignored)."""
    if kind == "byte":
        return ByteTokenizer()
    if kind not in SENTENCEPIECE_KINDS:
        raise DataError(f"tokenizer={kind!r} is not a tokenizer kind: use one of {TOKENIZER_KINDS}")
    return SentencePieceTokenizer.train(texts, model_type=kind, vocab_size=vocab_size, **options)


def tokenizer_filename(kind: str) -> str:
    """The file name prepare uses for a tokenizer of this kind."""
    return "tokenizer.json" if kind in ("byte", "hf") else "tokenizer.model"


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """Load a tokenizer saved by `Tokenizer.save`: JSON -> byte, else a sentencepiece model."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise DataFileNotFoundError(f"tokenizer file {path} does not exist") from None
    if data.lstrip()[:1] == b"{":
        try:
            spec = json.loads(data)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise DataError(f"tokenizer file {path} is not valid JSON: {exc}") from None
        if isinstance(spec, dict) and "model" in spec and "added_tokens" in spec:
            from gpt.hf import HFTokenizer      # a Hugging Face tokenizer.json (a run
            return HFTokenizer(data)            # fine-tuned from an HF folder keeps one)
        if spec.get("format") != _JSON_FORMAT or spec.get("kind") != "byte":
            raise DataError(
                f"tokenizer file {path} is JSON but not a tensorlite byte tokenizer "
                f"(format={spec.get('format')!r}, kind={spec.get('kind')!r})"
            )
        return ByteTokenizer()
    try:
        return SentencePieceTokenizer(data)
    except RuntimeError as exc:
        raise DataError(f"tokenizer file {path} is not a sentencepiece model ({exc})") from None
