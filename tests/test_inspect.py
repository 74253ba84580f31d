"""gpt.inspect: every number a picture shows, against a computation done another way.

Attention maps against softmax(q k^T / sqrt(d)) from the layer's own q, k (float64, causal
zeros, rows summing to 1); the logit lens at the last layer against the model's logits (bit for
bit) and at the embeddings against LayerNorm + head by hand; the activation statistics against
the blocks run one module at a time; gradient norms against .grad and clip_grad_norm_; update
ratios against AdamW's first step written out. The pictures and the report are smoke-tested."""
import json
import math
import os
import re

import numpy as np
import pytest

import nn
import tensorlite as tl
from gpt import inspect as I
from gpt.data.tokenizer import ByteTokenizer
from gpt.model import GPT, GPTConfig
from gpt.train import param_groups
from nn.optim import AdamW, clip_grad_norm_


def tiny(dtype=tl.float64, **kw):
    cfg = dict(vocab_size=29, block_size=16, n_layer=3, n_head=2, d_model=8)
    cfg.update(kw)
    tl.manual_seed(0)
    m = GPT(GPTConfig(**cfg)).to(dtype)
    # weights large enough that attention is not uniform and some GELU inputs are flat
    with tl.no_grad():
        for name, p in m.named_parameters():
            if name.endswith("weight") and p.ndim == 2:
                p.copy_(p.data * 20)
    return m


IDS = np.array([3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8])


def qk_by_hand(model, ids):
    """Each block's (q, k) (H, T, D), taken from its qkv projection's output (a tap of our
    own) and rotated by hand under rope."""
    got = []
    originals = {}
    for blk in model.blocks:
        lin = blk.attn.qkv
        originals[lin] = lin.forward

        def fwd(x, _f=lin.forward):
            y = _f(x)
            got.append(y.numpy().copy())
            return y
        object.__setattr__(lin, "forward", fwd)
    try:
        with tl.no_grad():
            model.eval()
            model(ids[None])
    finally:
        for lin in originals:
            del lin.__dict__["forward"]
    out = []
    h = model.config.n_head
    for blk, qkv in zip(model.blocks, got):
        t, c3 = qkv.shape[1:]
        d = c3 // 3 // h
        heads = qkv[0].reshape(t, 3, h, d).transpose(1, 2, 0, 3)      # (3, H, T, D)
        q, k = heads[0], heads[1]
        if blk.attn.rotary is not None:
            half = d // 2                         # RoPE: angle pos * 10000^(-2i/D)
            ang = np.arange(t)[:, None] * 10000.0 ** (-np.arange(0, d, 2) / d)[None, :]
            # (the layer builds its tables in float32, the default dtype, then casts them)
            cos, sin = (f(ang).astype(np.float32).astype(np.float64) for f in (np.cos, np.sin))

            def rot(x):
                x1, x2 = x[..., :half], x[..., half:]
                return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)
            q, k = rot(q), rot(k)
        out.append((q, k))
    return out


@pytest.mark.parametrize("kw", [dict(), dict(positional="rope"), dict(norm_first=False)])
def test_attention_maps_are_the_softmax_of_the_layers_scores(kw):
    m = tiny(**kw)
    maps = I.attention_maps(m, IDS)
    L, H, T = m.config.n_layer, m.config.n_head, len(IDS)
    assert maps.shape == (L, H, T, T) and maps.dtype == np.float64
    np.testing.assert_allclose(maps.sum(-1), 1.0, rtol=0, atol=1e-12)
    assert np.all(maps[:, :, np.triu_indices(T, 1)[0], np.triu_indices(T, 1)[1]] == 0.0)
    for layer, (q, k) in enumerate(qk_by_hand(m, IDS)):
        s = q @ k.transpose(0, 2, 1) / math.sqrt(q.shape[-1])
        s = np.where(np.triu(np.ones((T, T), bool), 1), -np.inf, s)
        p = np.exp(s - s.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        np.testing.assert_allclose(maps[layer], p, rtol=1e-10, atol=1e-13)
    assert maps.max() > 0.5 and maps[:, :, -1].min() < 0.05        # not uniform: a real test


def test_keep_weights_is_off_by_default_and_changes_nothing(rng):
    mha = nn.MultiHeadAttention(8, 2).double()
    x = tl.tensor(rng.standard_normal((2, 5, 8)), requires_grad=True)
    assert mha.keep_weights is False and mha.last_weights is None
    y0 = mha(x)
    assert mha.last_weights is None
    (y0 * y0).sum().backward()
    g0 = [x.grad.numpy().copy()] + [p.grad.numpy().copy() for p in mha.parameters()]
    x.grad = None
    mha.zero_grad()
    mha.keep_weights = True
    y1 = mha(x)
    (y1 * y1).sum().backward()
    np.testing.assert_array_equal(y0.numpy(), y1.numpy())
    for a, b in zip(g0, [x.grad.numpy()] + [p.grad.numpy() for p in mha.parameters()]):
        np.testing.assert_array_equal(a, b)
    w = mha.last_weights
    assert w.shape == (2, 2, 5, 5)
    np.testing.assert_allclose(w.sum(-1), 1.0, atol=1e-12)
    assert tl.gradcheck(lambda x, *ps: mha(x), [x] + list(mha.parameters()))


def test_record_leaves_the_model_as_it_was():
    m = tiny()
    m.train()
    I.activation_stats(m, IDS)
    assert m.training
    for mod in m.modules():
        assert "forward" not in mod.__dict__
        assert "keep_weights" not in mod.__dict__ and "last_weights" not in mod.__dict__


def test_logit_lens_last_layer_is_the_models_logits_and_first_is_the_embeddings_read_out():
    m = tiny(dtype=tl.float32)
    lens = I.logit_lens(m, IDS)
    L, T, V = m.config.n_layer, len(IDS), m.config.vocab_size
    assert lens.shape == (L + 1, T, V)
    m.eval()
    with tl.no_grad():
        logits = m(IDS[None])[0].numpy()[0]
    np.testing.assert_array_equal(lens[-1], logits)
    # row 0: LayerNorm(wte[ids] + wpe[:T]) @ wte^T, written out (float64)
    wte, wpe = m.wte.weight.numpy().astype(np.float64), m.wpe.weight.numpy().astype(np.float64)
    h = wte[IDS] + wpe[:T]
    mu, var = h.mean(-1, keepdims=True), h.var(-1, keepdims=True)
    g, b = m.ln_f.weight.numpy(), m.ln_f.bias.numpy()
    ref = ((h - mu) / np.sqrt(var + m.ln_f.eps) * g + b) @ wte.T
    np.testing.assert_allclose(lens[0], ref, rtol=1e-4, atol=1e-4)
    assert not np.allclose(lens[0], lens[-1], atol=1e-2)
    # the table views
    tp = I.lens_target_probability(lens, IDS)
    probs = I.softmax(lens)
    assert tp.shape == (L + 1, T - 1)
    for t in range(T - 1):
        np.testing.assert_allclose(tp[:, t], probs[:, t, IDS[t + 1]], rtol=1e-12)
    ids, p = I.top_k(lens, 3)
    assert ids.shape == p.shape == (L + 1, T, 3) and np.all(np.diff(p, axis=-1) <= 0)
    np.testing.assert_array_equal(ids[..., 0], lens.argmax(-1))


def test_next_token_topk_is_the_models_distribution():
    m = tiny()
    ids, p = I.next_token_topk(m, IDS, k=4)
    m.eval()
    with tl.no_grad():
        logits = m(IDS[None])[0].numpy()[0]
    full = np.exp(logits - logits.max(-1, keepdims=True))
    full /= full.sum(-1, keepdims=True)
    order = np.argsort(-full, -1)[:, :4]
    np.testing.assert_array_equal(ids, order)
    np.testing.assert_allclose(p, np.take_along_axis(full, order, -1), rtol=1e-12)
    with pytest.raises(ValueError, match="one sequence at a time"):
        I.next_token_topk(m, np.stack([IDS, IDS]), 2)


@pytest.mark.parametrize("norm_first", [True, False])
def test_activation_stats_against_the_blocks_run_one_module_at_a_time(norm_first):
    m = tiny(norm_first=norm_first)
    with tl.no_grad():
        for blk in m.blocks:      # many GELU inputs near the flat region's edge, -3
            blk.mlp.fc.bias.fill_(-2.5)
    batch = np.stack([IDS, IDS[::-1]])
    stats = I.activation_stats(m, batch)
    maps = [I.attention_maps(m, row) for row in batch]
    m.eval()
    res, ln1, ln2, flat = [], [], [], []
    scale = lambda a: a.std(-1).mean()  # noqa: E731
    with tl.no_grad():
        x = m.wte(tl.tensor(batch)) + m.wpe(batch.shape[1])
        res.append(np.linalg.norm(x.numpy(), axis=-1).mean())
        for blk in m.blocks:
            if norm_first:
                ln1.append(scale(x.numpy()))
                x = x + blk.attn(blk.ln1(x))
                ln2.append(scale(x.numpy()))
                pre = blk.mlp.fc(blk.ln2(x))
                x = x + blk.mlp(blk.ln2(x))
            else:
                a = x + blk.attn(x)
                ln1.append(scale(a.numpy()))
                x = blk.ln1(a)
                pre = blk.mlp.fc(x)
                b = x + blk.mlp(x)
                ln2.append(scale(b.numpy()))
                x = blk.ln2(b)
            flat.append((pre.numpy() < -3.0).mean())
            res.append(np.linalg.norm(x.numpy(), axis=-1).mean())
    np.testing.assert_allclose(stats["residual_norm"], res, rtol=1e-12)
    np.testing.assert_allclose(stats["ln1_input_scale"], ln1, rtol=1e-12)
    np.testing.assert_allclose(stats["ln2_input_scale"], ln2, rtol=1e-12)
    np.testing.assert_allclose(stats["gelu_flat_fraction"], flat, rtol=0, atol=0)
    assert 0 < min(flat) and max(flat) < 1                       # the threshold is exercised
    ent = np.mean([[(-(p * np.log(np.where(p > 0, p, 1))).sum(-1)).mean(-1) for p in mp]
                   for mp in maps], axis=0)                       # (L, H)
    np.testing.assert_allclose(stats["attention_entropy"], ent, rtol=1e-12)
    T = batch.shape[1]
    assert np.all(stats["attention_entropy"] <= np.log(np.arange(1, T + 1)).mean() + 1e-12)


def grads_of_one_step(m, batch):
    x, y = batch
    m.zero_grad()
    m(x, y)[1].backward()


def test_gradient_norms_per_layer_and_kind_are_those_of_grad(rng):
    m = tiny(dtype=tl.float32)
    health = I.TrainingHealth(m)
    x = rng.integers(0, 29, (3, 10))
    grads_of_one_step(m, (x, np.roll(x, -1, 1)))
    got = health.measure_grads()
    named = dict(m.named_parameters())
    sq = {n: float(np.sum(p.grad.numpy().astype(np.float64) ** 2)) for n, p in named.items()}
    layers = {"embedding": ["wte.weight", "wpe.weight"], "head": ["ln_f.weight", "ln_f.bias"]}
    for i in range(m.config.n_layer):
        layers[f"block {i}"] = [n for n in named if n.startswith(f"blocks.{i}.")]
    assert list(got["layer"]) == ["embedding", "block 0", "block 1", "block 2", "head"]
    for layer, names in layers.items():
        assert got["layer"][layer] == pytest.approx(math.sqrt(sum(sq[n] for n in names)),
                                                    rel=1e-12)
    kinds = {"attn.qkv": r"attn\.qkv\.weight", "mlp.proj": r"mlp\.proj\.weight",
             "norm": r"(ln\d|ln_f)\.(weight|bias)", "bias": r"(attn|mlp)\.\w+\.bias",
             "embedding": r"^(wte|wpe)\."}
    for kind, pattern in kinds.items():
        names = [n for n in named if re.search(pattern, n)]
        assert names
        assert got["kind"][kind] == pytest.approx(math.sqrt(sum(sq[n] for n in names)),
                                                  rel=1e-12)
    assert sorted(got["kind"]) == sorted(["embedding", "attn.qkv", "attn.proj", "mlp.fc",
                                          "mlp.proj", "norm", "bias"])
    # the total is the global norm that clipping sees
    total = clip_grad_norm_(m.parameters(), 1e9)
    assert got["total"] == pytest.approx(total, rel=1e-6)


def test_update_ratio_is_adamws_first_step(rng):
    m = tiny()
    lr, wd, eps = 1e-3, 0.1, 1e-8
    opt = AdamW(param_groups(m, wd), lr=lr, eps=eps)
    health = I.TrainingHealth(m)
    x = rng.integers(0, 29, (3, 10))
    grads_of_one_step(m, (x, np.roll(x, -1, 1)))
    named = dict(m.named_parameters())
    # AdamW's first step: p <- p (1 - lr wd) - lr g / (|g| + eps)   (bias-corrected moments)
    delta = {}
    for n, p in named.items():
        w, g = p.numpy().copy(), p.grad.numpy()
        decay = wd if p.ndim >= 2 else 0.0
        delta[n] = (-lr * decay * w - lr * g / (np.abs(g) + eps), w)
    health.snapshot_weights()
    opt.step()
    got = health.update_ratios()
    for i in range(m.config.n_layer):
        names = [n for n in named if n.startswith(f"blocks.{i}.")]
        num = math.sqrt(sum(np.sum(delta[n][0] ** 2) for n in names))
        den = math.sqrt(sum(np.sum(delta[n][1] ** 2) for n in names))
        assert got["layer"][f"block {i}"] == pytest.approx(num / den, rel=1e-9)
    assert 1e-5 < got["layer"]["block 0"] < 1e-2
    with pytest.raises(RuntimeError, match="snapshot_weights"):
        health.update_ratios()                              # the snapshot is used once


def test_training_health_record_logs_and_plots(rng, tmp_path):
    m = tiny(dtype=tl.float32)
    opt = AdamW(param_groups(m, 0.1), lr=1e-3)
    health = I.TrainingHealth(m)
    log = tmp_path / "log.jsonl"
    assert (log.write_text(json.dumps({"step": 1, "loss": 3.0}) + "\n") or True)
    assert I.plot_internals(log, tmp_path / "internals.png") is None     # nothing to draw yet
    with open(log, "a") as f:
        for step in range(1, 7):
            x = rng.integers(0, 29, (2, 10))
            grads_of_one_step(m, (x, np.roll(x, -1, 1)))
            if step % 2 == 0:
                health.measure_grads()
                clip_grad_norm_(m.parameters(), 1.0)
                health.snapshot_weights()
            opt.step()
            if step % 2 == 0:
                rec = health.finish(IDS[None, :8])
                f.write(json.dumps({"step": step, "inspect": rec}, allow_nan=False) + "\n")
    recs = I.read_internals(log)
    assert [s for s, _ in recs] == [2, 4, 6]
    r = recs[0][1]
    assert set(r) == {"grad_norm", "grad_norm_kind", "grad_norm_total", "update_ratio",
                      "update_ratio_kind", "activations"}
    assert len(r["activations"]["residual_norm"]) == m.config.n_layer + 1
    assert np.array(r["activations"]["attention_entropy"]).shape == (3, 2)
    png = I.plot_internals(log, tmp_path / "internals.png")
    assert_png(png, min_size=(400, 1000))
    assert sorted(os.listdir(tmp_path)) == ["internals.png", "log.jsonl"]


def test_inspecting_does_not_change_training(rng):
    """The same seed trains to the same weights, bit for bit, with TrainingHealth every other
    step (dropout on: the probe's forward must draw nothing from the generator)."""
    batches = [rng.integers(0, 29, (2, 10)) for _ in range(6)]

    def run(inspect):
        m = tiny(dtype=tl.float32, dropout=0.2)
        m.train()
        opt = AdamW(param_groups(m, 0.1), lr=1e-3)
        health = I.TrainingHealth(m)
        tl.manual_seed(7)
        for step, x in enumerate(batches):
            grads_of_one_step(m, (x, np.roll(x, -1, 1)))
            if inspect and step % 2:
                health.measure_grads()
            clip_grad_norm_(m.parameters(), 1.0)
            if inspect and step % 2:
                health.snapshot_weights()
            opt.step()
            if inspect and step % 2:
                health.finish(IDS[None])
        return [p.numpy().copy() for p in m.parameters()]
    for a, b in zip(run(False), run(True)):
        np.testing.assert_array_equal(a, b)


def assert_png(path, min_size=(100, 100)):
    import matplotlib.image as mpimg
    data = open(path, "rb").read()
    assert data.startswith(b"\x89PNG") and len(data) > 3000
    img = mpimg.imread(path)
    assert img.shape[0] >= min_size[0] and img.shape[1] >= min_size[1]
    rgb = img[..., :3]
    assert rgb.std() > 0.05 and (rgb < 0.5).mean() > 0.005          # not blank


def test_write_report_writes_every_picture_and_an_index_that_shows_them(tmp_path):
    m = tiny(dtype=tl.float32, vocab_size=259, d_model=16, block_size=32)
    tok = ByteTokenizer()
    notes = []
    out = I.write_report(m, tok, "def f(x):\n\treturn $x", tmp_path / "report", say=notes.append)
    assert out == tmp_path / "report" and not notes
    files = sorted(os.listdir(out))
    pngs = [f for f in files if f.endswith(".png")]
    assert pngs == sorted(["activations.png", "logit_lens.png", "next_token_topk.png"] +
                          [f"attention_layer{i}.png" for i in range(m.config.n_layer)])
    assert set(files) == set(pngs) | {"index.html", "internals.npz"}
    for f in pngs:
        assert_png(out / f)
    page = (out / "index.html").read_text(encoding="utf-8")
    assert sorted(re.findall(r"<img src='([^']+)'", page)) == pngs
    assert "http" not in page and "<script" not in page      # self-contained, no network
    assert "<pre>def f(x):\n\treturn $x</pre>" in page      # the prompt as written
    assert "<code>\\t</code>" in page and "<code>\u2423</code>" in page   # tokens, visible
    arrays = np.load(out / "internals.npz")
    ids = np.array(tok.encode("def f(x):\n\treturn $x"))
    np.testing.assert_array_equal(arrays["ids"], ids)
    np.testing.assert_allclose(arrays["attention"], I.attention_maps(m, ids), rtol=1e-6)
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]      # no temporaries


def test_write_report_refuses_to_clobber_and_is_all_or_nothing(tmp_path, monkeypatch):
    m = tiny(dtype=tl.float32, vocab_size=259)
    tok = ByteTokenizer()
    target = tmp_path / "r"
    target.mkdir()
    (target / "notes.txt").write_text("mine")
    with pytest.raises(I.InspectError, match="not empty .*notes.txt.*overwrite"):
        I.write_report(m, tok, "ab", target)
    assert (target / "notes.txt").read_text() == "mine"
    run = tmp_path / "run"
    run.mkdir()
    (run / "log.jsonl").write_text(json.dumps({"step": 3, "loss": 1.0}) + "\n")
    with pytest.raises(I.InspectError, match="holds a training run"):
        I.write_report(m, tok, "ab", run, overwrite=True)
    # --overwrite replaces an earlier report, never a user's other files
    with pytest.raises(I.InspectError, match=r"holds more than an earlier report \(notes.txt\)"):
        I.write_report(m, tok, "ab", target, overwrite=True)
    (target / "notes.txt").unlink()
    I.write_report(m, tok, "a", target, overwrite=True)
    before = sorted(os.listdir(target))
    # a failure half-way leaves the old folder as it was and nothing else
    monkeypatch.setattr(I, "plot_next_token_topk", lambda *a: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        I.write_report(m, tok, "ab", target, overwrite=True)
    assert sorted(os.listdir(target)) == before
    assert sorted(os.listdir(tmp_path)) == ["r", "run"]
    monkeypatch.undo()
    I.write_report(m, tok, "ab", target, overwrite=True)
    assert "index.html" in os.listdir(target)
    assert sorted(os.listdir(tmp_path)) == ["r", "run"]
    # an empty prompt reads from <bos>; a long one keeps the block's last tokens, and says so
    notes = []
    I.write_report(m, tok, "", tmp_path / "empty", say=notes.append)
    assert np.load(tmp_path / "empty" / "internals.npz")["ids"].tolist() == [tok.bos_id]
    I.write_report(m, tok, "x" * 40, tmp_path / "long", say=notes.append)
    assert notes == ["note: the prompt has 40 tokens; keeping the last 16 (the block size)"]


def test_token_labels():
    tok = ByteTokenizer()
    assert [I.token_label(tok, i) for i in tok.encode("a \n")] == ["a", "\u2423", "\\n"]
    assert I.token_label(tok, tok.bos_id) == "<bos>"
    assert I.token_label(tok, 0xC3) == "<0xC3>"
