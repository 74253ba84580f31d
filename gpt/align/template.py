"""The chat template: a conversation as one token sequence, and which tokens are learned.

Defined once, used by SFT, DPO and the chat command alike:

    <|user|>How do I ...?<|end|><|assistant|>You ...<|end|><|user|>...<|end|><|assistant|>

Each message is its role's token, its content (the base tokenizer's ids, verbatim: no
separator is added, so the content decodes back exactly), and ``<|end|>``. An optional
``<|system|>`` message may come first. At inference the prompt is the conversation so far
followed by ``<|assistant|>``, and the model's answer ends where it emits ``<|end|>``.

The four special tokens are new ids appended after the base tokenizer's vocabulary
(``ChatTokenizer``): they are never produced by encoding a message's content, so user text
that happens to contain "<|end|>" stays ordinary text and cannot end a turn, and a special
token never splits into pieces.

What is learned (SFT): the loss is on the assistant's content and its ``<|end|>`` (the model
must learn to stop), nothing else: not the system or user messages, not the role tokens
(those are given at inference). `render` returns that mask per token; a training row predicts
token t+1 from tokens 0..t, so target t counts when ``learn[t + 1]``.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable

from gpt.data.errors import DataError
from gpt.data.shards import atomic_write_text
from gpt.data.tokenizer import Tokenizer

from .data import ROLES

SPECIALS = ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>")   # one per role in ROLES, + end
TEMPLATE_FILE = "chat_template.json"
_FORMAT = "tensorlite-chat-template"


class ChatTokenizer(Tokenizer):
    """A base tokenizer with the template's special tokens appended: ids ``base.vocab_size +
    i`` for ``SPECIALS[i]``. ``encode`` maps the special strings in a text to their ids (so a
    rendered conversation's text encodes to its ids) and everything between them through the
    base; ``decode`` is its inverse. `render` never passes content through ``encode``'s
    special-string matching."""

    def __init__(self, base: Tokenizer):
        if isinstance(base, ChatTokenizer):
            base = base.base
        self.base = base
        self.kind = base.kind
        self.base_vocab_size = base.vocab_size
        self.special_ids = {s: base.vocab_size + i for i, s in enumerate(SPECIALS)}
        self._special_of = {i: s for s, i in self.special_ids.items()}

    # -- the Tokenizer interface --------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.base_vocab_size + len(SPECIALS)

    @property
    def bos_id(self) -> int:
        return self.base.bos_id

    @property
    def eos_id(self) -> int:
        return self.base.eos_id

    @property
    def pad_id(self) -> int:
        return self.base.pad_id

    @property
    def end_id(self) -> int:
        return self.special_ids["<|end|>"]

    def role_id(self, role: str) -> int:
        if role not in ROLES:
            raise DataError(f"the chat template has no role {role!r}; roles are {ROLES}")
        return self.special_ids[f"<|{role}|>"]

    def encode(self, text: str) -> list[int]:
        ids, rest = [], text
        while rest:
            hits = [(rest.find(s), s) for s in SPECIALS if s in rest]
            if not hits:
                ids.extend(self.base.encode(rest))
                break
            at, s = min(hits)
            if at:
                ids.extend(self.base.encode(rest[:at]))
            ids.append(self.special_ids[s])
            rest = rest[at + len(s):]
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        out, run = [], []
        for i in self._check_ids(ids):
            if i in self._special_of:
                if run:
                    out.append(self.base.decode(run))
                    run = []
                out.append(self._special_of[i])
            else:
                run.append(i)
        if run:
            out.append(self.base.decode(run))
        return "".join(out)

    def decode_content(self, ids: Iterable[int]) -> str:
        """Text of ``ids`` with the special tokens left out (what a user reads)."""
        return self.base.decode([i for i in ids if int(i) < self.base_vocab_size])

    def save(self, path: str | os.PathLike) -> None:
        """The base tokenizer's file (the template is saved beside it: `save_template`)."""
        self.base.save(path)

    def __repr__(self) -> str:
        return f"ChatTokenizer({self.base!r} + {len(SPECIALS)} chat tokens)"


# ------------------------------------------------------------------------------ rendering
def check_messages(messages) -> tuple:
    """``messages`` as a tuple of (role, content) pairs, checked: known roles, string contents,
    a system message only first. Raises DataError naming what is wrong."""
    out = []
    for k, m in enumerate(messages):
        role, content = (m["role"], m["content"]) if isinstance(m, dict) else m
        if role not in ROLES:
            raise DataError(f"message {k}: the chat template has no role {role!r}; roles are "
                            f"{ROLES}")
        if not isinstance(content, str):
            raise DataError(f"message {k}: content must be a string, got "
                            f"{type(content).__name__}")
        if role == "system" and k:
            raise DataError(f"message {k}: a system message may only come first")
        out.append((role, content))
    return tuple(out)


def render(tok: ChatTokenizer, messages, generation_prompt: bool = False):
    """(ids, learn): the conversation's token ids and, per token, whether SFT learns it (the
    assistant's content and its <|end|>). With ``generation_prompt`` the ids end with
    <|assistant|>, ready for the model to answer (``learn`` is then all False)."""
    ids, learn = [], []
    for role, content in check_messages(messages):
        body = tok.base.encode(content)
        ids.append(tok.role_id(role))
        learn.append(False)
        ids.extend(body)
        ids.append(tok.end_id)
        learn.extend([role == "assistant" and not generation_prompt] * (len(body) + 1))
    if generation_prompt:
        ids.append(tok.role_id("assistant"))
        learn.append(False)
    return ids, learn


def render_text(messages, generation_prompt: bool = False) -> str:
    """The same conversation as text (for reading; ``ChatTokenizer.encode`` of it gives
    `render`'s ids when no content contains a special token's string)."""
    text = "".join(f"<|{role}|>{content}<|end|>" for role, content in check_messages(messages))
    return text + ("<|assistant|>" if generation_prompt else "")


# ------------------------------------------------------------------------------ files
def save_template(folder: str | os.PathLike, tok: ChatTokenizer) -> None:
    """``chat_template.json`` in a run folder: the special tokens and their ids, so sample,
    eval and chat rebuild the same ChatTokenizer from the base tokenizer file beside it."""
    spec = {"format": _FORMAT, "version": 1, "specials": list(SPECIALS),
            "base_vocab_size": tok.base_vocab_size,
            "ids": {s: i for s, i in tok.special_ids.items()}}
    atomic_write_text(Path(folder) / TEMPLATE_FILE, json.dumps(spec, indent=1) + "\n")


def load_chat_tokenizer(folder: str | os.PathLike, base: Tokenizer) -> ChatTokenizer | None:
    """The ChatTokenizer of a run folder with a chat template (None without one), checked
    against the base tokenizer found beside it."""
    path = Path(folder) / TEMPLATE_FILE
    if not path.exists():
        return None
    try:
        spec = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise DataError(f"{path} is not a readable chat template ({e})") from None
    if not isinstance(spec, dict) or spec.get("format") != _FORMAT or \
            spec.get("specials") != list(SPECIALS):
        raise DataError(f"{path} is not a tensorlite chat template of this version "
                        f"(specials {spec.get('specials') if isinstance(spec, dict) else None})")
    if spec.get("base_vocab_size") != base.vocab_size:
        raise DataError(f"{path} was made for a tokenizer of {spec.get('base_vocab_size')} ids, "
                        f"but the tokenizer beside it has {base.vocab_size}")
    return ChatTokenizer(base)
