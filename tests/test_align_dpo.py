"""DPO: the loss against its formula (value and gradients, float64), the sequence
log-probabilities against a direct computation, and on a small synthetic preference set
DPO raises the held-out margin and accuracy."""
import numpy as np
import pytest

import tensorlite as tl
from gpt.align.data import Preference
from gpt.align.dpo import PairLoader, dpo_loss, encode_pairs, reference_logps, sequence_logps
from gpt.align.sft import IGNORE
from gpt.align.template import ChatTokenizer
from gpt.data.tokenizer import ByteTokenizer
from gpt.model import GPT, GPTConfig
from gpt.train import param_groups
from nn.optim import AdamW
from tensorlite.gradcheck import gradcheck


def _direct(pc, pr, rc, rr, beta):
    z = beta * ((pc - rc) - (pr - rr))
    return np.mean(np.logaddexp(0.0, -z)), z


@pytest.mark.parametrize("beta", [0.1, 1.0, 5.0])
def test_dpo_loss_equals_the_formula_and_its_gradient(beta):
    rng = np.random.default_rng(0)
    pc, pr, rc, rr = (rng.normal(-20, 5, 6) for _ in range(4))
    rc[0], rr[0], pc[0], pr[0] = 1.0, 1.0, 1.0, 1.0         # z = 0: the start of every run
    ts = [tl.tensor(a, requires_grad=True) for a in (pc, pr, rc, rr)]
    loss, z = dpo_loss(*ts, beta)
    want, zw = _direct(pc, pr, rc, rr, beta)
    assert abs(loss.item() - want) < 1e-14 and np.allclose(z.numpy(), zw, rtol=1e-14)
    loss.backward()
    sig = 1.0 / (1.0 + np.exp(zw))                           # sigmoid(-z)
    g = -beta * sig / len(pc)                                # d loss / d pc
    for t, sign in zip(ts, (1, -1, -1, 1)):
        assert np.allclose(t.grad.numpy(), sign * g, rtol=1e-12, atol=0)
    assert abs(ts[0].grad.numpy()[0] + beta * 0.5 / len(pc)) < 1e-15   # slope 1/2 at z = 0
    gradcheck(lambda a, b, c, d: dpo_loss(a, b, c, d, beta)[0],
              [tl.tensor(a, requires_grad=True) for a in (pc, pr, rc, rr)], atol=1e-9, rtol=1e-7)


def _tiny(vocab, seed=0, block=24):
    tl.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=vocab, block_size=block, n_layer=1, n_head=2,
                         d_model=16)).to(dtype="float64")


def test_sequence_logps_is_the_sum_over_the_answer_tokens():
    tok = ChatTokenizer(ByteTokenizer())
    Xc, Yc, Xr, Yr, rep = encode_pairs(tok, [Preference("def f", "ab", "abc", "t:1")], 23)
    assert rep.kept == 1
    model = _tiny(tok.vocab_size)
    got = sequence_logps(model, tl.tensor(Xc), tl.tensor(Yc)).numpy()
    logits = model(tl.tensor(Xc))[0].numpy()[0]
    lp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    ts = [t for t in range(Yc.shape[1]) if Yc[0, t] != IGNORE]
    assert len(ts) == 3                                       # "a", "b", <|end|>
    assert abs(got[0] - sum(lp[t, Yc[0, t]] for t in ts)) < 1e-12


def _pairs(rng, n):
    """Prompts of random letters; chosen = the prompt reversed + "!", rejected the same with
    "?" (a preference a model can pick up and carry to unseen prompts)."""
    out = []
    for i in range(n):
        p = "".join(rng.choice(list("abcdefgh"), size=rng.integers(3, 7)))
        out.append(Preference(p, p[::-1] + "!", p[::-1] + "?", f"syn:{i}"))
    return out


def test_dpo_raises_the_held_out_margin_and_accuracy():
    rng = np.random.default_rng(1)
    tok = ChatTokenizer(ByteTokenizer())
    train, held = encode_pairs(tok, _pairs(rng, 64), 23), encode_pairs(tok, _pairs(rng, 32), 23)
    policy, ref = _tiny(tok.vocab_size), _tiny(tok.vocab_size)
    refs = [(reference_logps(ref, p[0], p[1], "cpu"), reference_logps(ref, p[2], p[3], "cpu"))
            for p in (train, held)]

    def held_out():
        pc = reference_logps(policy, held[0], held[1], "cpu")
        pr = reference_logps(policy, held[2], held[3], "cpu")
        z = 0.5 * ((pc - refs[1][0]) - (pr - refs[1][1]))
        return z.mean(), (z > 0).mean()

    m0, a0 = held_out()
    assert m0 == 0 and a0 == 0                               # the policy is the reference
    loader = PairLoader(*train[:4], *refs[0], 16, seed=0)
    opt = AdamW(param_groups(policy, 0.0), lr=3e-3)
    for _ in range(40):
        xc, yc, xr, yr, rc, rr, _ = loader.next_batch()
        lp = sequence_logps(policy, tl.tensor(np.concatenate([xc, xr])),
                            tl.tensor(np.concatenate([yc, yr])))
        loss, _ = dpo_loss(lp[:16], lp[16:], tl.tensor(rc), tl.tensor(rr), 0.5)
        loss.backward()
        opt.step()
        opt.zero_grad()
    m1, a1 = held_out()
    assert m1 > 1.0 and a1 > 0.9, (m1, a1)


def test_a_pair_is_dropped_when_either_answer_leaves_nothing_to_learn():
    tok = ChatTokenizer(ByteTokenizer())
    prefs = [Preference("x" * 30, "a", "b", "t:1"), Preference("y", "a", "b", "t:2")]
    Xc, _, Xr, _, rep = encode_pairs(tok, prefs, 16)
    assert (rep.pairs, rep.kept, rep.dropped) == (2, 1, 1) and len(Xc) == len(Xr) == 1
