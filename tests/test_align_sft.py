"""The chat template and SFT's loss masking: what is learned is exactly the assistant's
tokens (and its <|end|>), once each, from the right position; nothing on the prompt side
moves the loss or a gradient."""
import numpy as np
import pytest

import tensorlite as tl
from gpt.align.sft import IGNORE, RowLoader, encode_rows, grow_vocab
from gpt.align.template import (SPECIALS, ChatTokenizer, check_messages, render, render_text)
from gpt.data.errors import DataError
from gpt.data.tokenizer import ByteTokenizer, train_tokenizer
from gpt.model import GPT, GPTConfig

CONV = (("system", "Be brief."), ("user", "def f(x):\n    \"\"\"Twice x.\"\"\"\n"),
        ("assistant", "    return 2 * x\n"), ("user", "And thrice?"), ("assistant", "3 * x"))


@pytest.fixture(scope="module")
def tokenizers():
    texts = ["def f(x):\n    return 2 * x\n", "hello world <|end|> and more text\n"] * 50
    return [ChatTokenizer(ByteTokenizer()), ChatTokenizer(train_tokenizer(texts, "bpe", 300))]


# ------------------------------------------------------------------------------ template
def test_rendered_conversation_round_trips_and_specials_never_split(tokenizers):
    for tok in tokenizers:
        ids, learn = render(tok, CONV)
        text = render_text(CONV)
        assert tok.encode(text) == ids                     # text and ids agree
        assert tok.decode(ids) == text                     # and decode back exactly
        for s in SPECIALS:
            assert tok.encode(s) == [tok.special_ids[s]]   # one id, never pieces
        assert len(ids) == len(learn)


def test_content_that_spells_a_special_token_stays_text(tokenizers):
    for tok in tokenizers:
        ids, _ = render(tok, [("user", "say <|end|> now"), ("assistant", "<|user|>")])
        specials = [i for i in ids if i >= tok.base_vocab_size]
        # only the template's own: user, end, assistant, end
        assert specials == [tok.special_ids[s] for s in
                            ("<|user|>", "<|end|>", "<|assistant|>", "<|end|>")]


def test_unknown_role_and_late_system_message_are_refused():
    with pytest.raises(DataError, match="no role 'tool'"):
        check_messages([("tool", "x")])
    with pytest.raises(DataError, match="system message may only come first"):
        check_messages([("user", "a"), ("system", "b")])


# ------------------------------------------------------------------------------ masking
def _learned_positions(tok, conv):
    """An independent construction: walk the messages, counting tokens."""
    want, pos = [], 0
    for role, content in conv:
        n = len(tok.base.encode(content))
        pos += 1                                    # the role token
        if role == "assistant":
            want.extend(range(pos, pos + n + 1))    # its content and its <|end|>
        pos += n + 1
    return want


def test_learned_tokens_are_the_answers_and_their_end_exactly_once(tokenizers):
    for tok in tokenizers:
        ids, learn = render(tok, CONV)
        assert [i for i, b in enumerate(learn) if b] == _learned_positions(tok, CONV)
        X, Y, rep = encode_rows(tok, [CONV], block_size=len(ids) + 5)
        counted = Y[0][Y[0] != IGNORE].tolist()
        answers = []
        for role, content in CONV:
            if role == "assistant":
                answers += tok.base.encode(content) + [tok.end_id]
        assert counted == answers and rep.learned == len(answers)
        # x is the row shifted: target t is token t + 1
        n = len(ids)
        assert X[0, :n - 1].tolist() == ids[:-1]
        assert (Y[0, n - 1:] == IGNORE).all() and (X[0, n - 1:] == tok.pad_id).all()


def test_the_boundary_between_prompt_and_answer(tokenizers):
    tok = tokenizers[0]
    conv = [("user", "ab"), ("assistant", "cd")]
    ids, _ = render(tok, conv)
    X, Y, _ = encode_rows(tok, [conv], block_size=16)
    a = ids.index(tok.special_ids["<|assistant|>"])
    assert Y[0, a - 2] == IGNORE                  # predicting the user's <|end|>: prompt
    assert Y[0, a - 1] == IGNORE                  # predicting <|assistant|>: given at inference
    assert Y[0, a] == ord("c")                    # the first answer token: learned
    assert Y[0, a + 2] == tok.end_id              # and the end of the answer
    assert Y[0, a + 3] == IGNORE                  # nothing after it


def test_prompt_side_tokens_move_neither_the_loss_nor_any_gradient():
    """The targets on the prompt side, replaced by anything (under the same mask), give the
    same loss and gradients; and the loss is the mean over exactly the answer's positions,
    recomputed from the logits (a mask off by one would count <|assistant|>)."""
    tok = ChatTokenizer(ByteTokenizer())
    conv = [("user", "hello there"), ("assistant", "hi")]
    X, Y, _ = encode_rows(tok, [conv], block_size=24)
    ids, learn = render(tok, conv)
    full = np.asarray(ids[1:] + [tok.pad_id] * (25 - len(ids)))[:24]   # every real next token
    rng = np.random.default_rng(0)
    tl.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=24, n_layer=1, n_head=2,
                          d_model=16)).to(dtype="float64")

    def loss_and_grads(y):
        for p in model.parameters():
            p.grad = None
        _, loss = model(tl.tensor(X), tl.tensor(y))
        loss.backward()
        return loss.item(), [p.grad.numpy().copy() for p in model.parameters()]

    l0, g0 = loss_and_grads(Y)
    mask = Y != IGNORE
    for _ in range(3):
        other = np.where(mask, full[None], rng.integers(0, 256, Y.shape))
        y2 = np.where(mask, other, IGNORE)      # the same mask, other prompt-side tokens
        l1, g1 = loss_and_grads(y2)
        assert l1 == l0 and all(np.array_equal(a, b) for a, b in zip(g0, g1))
    # the loss is the mean over exactly the answer tokens: recompute it from the logits
    logits, _ = model(tl.tensor(X))
    lp = logits.numpy()[0] - np.log(np.exp(logits.numpy()[0]).sum(-1, keepdims=True))
    learned_t = [t for t in range(len(ids) - 1) if learn[t + 1]]
    want = -np.mean([lp[t, ids[t + 1]] for t in learned_t])
    assert abs(l0 - want) < 1e-12
    # a mask one token early (learn[:-1]) would count <|assistant|> and miss <|end|>
    assert len(learned_t) == 3 and ids[learned_t[-1] + 1] == tok.end_id


# ------------------------------------------------------------------------------ rows
def test_truncation_keeps_the_prompt_and_drops_what_has_no_answer_left():
    tok = ChatTokenizer(ByteTokenizer())
    short = [("user", "a"), ("assistant", "b" * 4)]            # 1 + 1 + 1 + 1 + 4 + 1 = 9
    long_answer = [("user", "a"), ("assistant", "b" * 40)]
    long_prompt = [("user", "a" * 40), ("assistant", "b")]
    X, Y, rep = encode_rows(tok, [short, long_answer, long_prompt], block_size=12)
    assert (rep.conversations, rep.rows, rep.truncated, rep.dropped) == (3, 2, 2, 1)
    assert (Y[1] != IGNORE).sum() == 12 - 3                    # the answer, cut at the block
    assert rep.learned == 5 + 9


def test_packing_puts_whole_conversations_in_rows_and_learns_the_same_tokens():
    tok = ChatTokenizer(ByteTokenizer())
    convs = [[("user", "q" * k), ("assistant", "a" * (k + 1))] for k in range(1, 8)]
    _, Yp, rp = encode_rows(tok, convs, block_size=32, pack=True)
    _, Yd, rd = encode_rows(tok, convs, block_size=32, pack=False)
    assert rp.rows < rd.rows and rp.learned == rd.learned
    assert sorted(Yp[Yp != IGNORE].tolist()) == sorted(Yd[Yd != IGNORE].tolist())


def test_row_loader_is_a_function_of_the_step_and_slices_ranks():
    X = np.arange(10 * 4).reshape(10, 4)
    Y = np.where(X % 3 == 0, IGNORE, X)
    one = RowLoader(X, Y, 4, seed=3)
    seen = np.concatenate([one.rows(s) for s in range(5)])        # two epochs of 10
    assert sorted(seen[:10]) == list(range(10)) and sorted(seen[10:20]) == list(range(10))
    r0, r1 = RowLoader(X, Y, 4, seed=3, rank=0, world_size=2), RowLoader(X, Y, 4, seed=3,
                                                                        rank=1, world_size=2)
    x, y, n = one.get_batch(7)
    x0, y0, n0 = r0.get_batch(7)
    x1, y1, n1 = r1.get_batch(7)
    assert np.array_equal(np.concatenate([x0, x1]), x) and n == n0 == n1 == (y != IGNORE).sum()
    one.step = 5
    again = RowLoader(X, Y, 4, seed=3)
    again.load_state_dict(one.state_dict())
    assert np.array_equal(again.next_batch()[0], one.next_batch()[0])
    with pytest.raises(DataError, match="batch_size"):
        RowLoader(X, Y, 2, seed=3).load_state_dict(one.state_dict())


# ------------------------------------------------------------------------------ weights
def test_growing_the_vocabulary_keeps_every_old_logit():
    tl.manual_seed(0)
    cfg = GPTConfig(vocab_size=259, block_size=8, n_layer=1, n_head=2, d_model=16)
    small = GPT(cfg).to(dtype="float64")
    big = GPT(GPTConfig(**{**cfg.to_dict(), "vocab_size": 263})).to(dtype="float64")
    big.load_state_dict(grow_vocab({k: v.data for k, v in small.state_dict().items()}, 259, 263))
    x = tl.tensor(np.array([[1, 2, 3, 4]]))
    a, b = small(x)[0].numpy(), big(x)[0].numpy()
    assert np.array_equal(a, b[..., :259])
    mean_row = small.wte.weight.numpy().mean(0)
    assert np.allclose(big.wte.weight.numpy()[259:], mean_row)
