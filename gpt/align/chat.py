"""Talking to a fine-tuned model: the conversation so far, rendered by the template, then
<|assistant|>; the model's tokens are streamed (with the KV cache) until it emits <|end|>.

`tensorlite-gpt chat --out RUN` is an interactive loop over `stream_answer` (a line that ends
with a backslash goes on to the next, for messages of several lines); `--prompt` answers one
turn and exits. Ctrl-C while the model answers ends that answer (what was
said so far stays in the conversation), not the program; /reset forgets the conversation,
/exit or Ctrl-D leaves.
"""
from __future__ import annotations

import sys

import numpy as np

from .template import ChatTokenizer, render


def fit_prompt(tok: ChatTokenizer, messages: list, block_size: int, room: int) -> list:
    """The prompt ids for ``messages`` (+ <|assistant|>), dropping the oldest turns (never a
    system message) until ``room`` tokens are left for the answer within the block. A single
    turn longer than that is kept whole (generation then slides over its start)."""
    msgs = list(messages)
    while True:
        ids, _ = render(tok, msgs, generation_prompt=True)
        if len(ids) + room <= block_size:
            return ids
        first = 1 if msgs and msgs[0][0] == "system" else 0
        # the oldest exchange: a user message and the answer after it
        cut = first + 1
        while cut < len(msgs) and msgs[cut][0] != "user":
            cut += 1
        if cut >= len(msgs):          # only the newest turn left
            return ids
        msgs = msgs[:first] + msgs[cut:]


def stream_answer(model, tok: ChatTokenizer, messages, max_new_tokens: int = 200,
                  temperature: float = 0.8, top_k=None, top_p=None, seed=None):
    """Yield the answer's text piece by piece (whole characters only), ending at <|end|>
    or after ``max_new_tokens`` tokens."""
    bs = model.config.block_size
    ids = fit_prompt(tok, messages, bs, room=min(max_new_tokens, bs // 2))
    new, shown = [], ""
    for nxt in model.generate_stream(np.array([ids]), max_new_tokens, temperature=temperature,
                                     top_k=top_k, top_p=top_p, seed=seed):
        t = int(nxt[0])
        if t == tok.end_id:
            break
        new.append(t)
        text = tok.decode_content(new)
        if not text.endswith("\ufffd"):       # wait for the rest of a multi-byte character
            yield text[len(shown):]
            shown = text
    rest = tok.decode_content(new)[len(shown):]
    if rest:
        yield rest


def answer(model, tok: ChatTokenizer, messages, max_new_tokens: int = 200, **sampling) -> str:
    """The whole answer as one string."""
    return "".join(stream_answer(model, tok, messages, max_new_tokens, **sampling))


def chat_loop(model, tok: ChatTokenizer, system: str | None, max_new_tokens: int,
              sampling: dict, prompt: str | None = None, read=input, write=None):
    """One turn (``prompt``) or the interactive loop. Returns the conversation."""
    write = write or sys.stdout.write
    base = [("system", system)] if system else []
    msgs = list(base)

    def turn(text: str) -> None:
        msgs.append(("user", text))
        said = []
        try:
            for piece in stream_answer(model, tok, msgs, max_new_tokens, **sampling):
                said.append(piece)
                write(piece)
                sys.stdout.flush()
        except KeyboardInterrupt:
            write("  [stopped]")
        write("\n")
        msgs.append(("assistant", "".join(said)))

    if prompt is not None:
        turn(prompt)
        return msgs
    write("chat: type a message (end a line with \\ to go on to the next one); /reset forgets "
          "the conversation, /exit or Ctrl-D leaves; Ctrl-C stops an answer\n")
    while True:
        try:
            text = read("you> ")
            while text.endswith("\\"):           # a message of several lines
                text = text[:-1] + "\n" + read("...  ")
        except EOFError:
            write("\n")
            return msgs
        except KeyboardInterrupt:
            write("\n(/exit or Ctrl-D leaves)\n")
            continue
        if text.strip() == "/exit":
            return msgs
        if text.strip() == "/reset":
            msgs[:] = list(base)
            write("(conversation forgotten)\n")
            continue
        if not text.strip():
            continue
        write("model> ")
        turn(text)
