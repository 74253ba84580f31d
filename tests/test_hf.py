"""Hugging Face GPT-2 folders (gpt/hf.py), without the network and without torch.

A small GPT-2-shaped folder is built in each test: random weights under GPT-2's names and
(in, out) Conv1D shapes, written with safetensors; biases and LayerNorms away from their
initial values (a missing bias or an ignored gain changes the logits); n_positions smaller
than the vocabulary (so wte and wpe cannot be confused); a LayerNorm epsilon of 1e-3 on
inputs whose variance is ~1e-2 (an ignored epsilon moves the logits by percents). The
model loaded with GPT.from_pretrained is checked against GPT-2's forward pass written below
in plain NumPy from the GPT-2 paper and transformers' modeling_gpt2.py, not from tensorlite.

Only the tokenizer tests need the `tokenizers` library (importorskip); the weight tests run
without it.
"""
import json
import os
import pickle
import struct
import sys

import numpy as np
import pytest
import safetensors.numpy as stn

import tensorlite as tl
from gpt import hf
from gpt.data.tokenizer import ByteTokenizer, SentencePieceTokenizer
from gpt.model import GPT, ConfigError, GPTConfig
from nn.checkpoint import CheckpointError, save_checkpoint

V, P, C, H, L = 300, 24, 24, 3, 2          # vocab, positions, width, heads, layers
EPS = 1e-3


def gpt2_config(**over):
    cfg = {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": V,
           "n_positions": P, "n_ctx": P, "n_embd": C, "n_layer": L, "n_head": H, "n_inner": None,
           "activation_function": "gelu_new", "layer_norm_epsilon": EPS, "resid_pdrop": 0.1,
           "embd_pdrop": 0.1, "attn_pdrop": 0.1, "initializer_range": 0.02,
           "scale_attn_weights": True, "bos_token_id": 0, "eos_token_id": 0}
    cfg.update(over)
    return {k: v for k, v in cfg.items() if v is not ...}


def gpt2_weights(seed=0, vocab=V, n_pos=P, d=C, n_layer=L, dtype=np.float32):
    """GPT-2's tensors, GPT-2's names and shapes (Conv1D weights (in, out))."""
    rng = np.random.default_rng(seed)

    def r(*shape, std=1.0, mean=0.0):
        return (mean + std * rng.standard_normal(shape)).astype(dtype)

    w = {"wte.weight": r(vocab, d, std=0.1), "wpe.weight": r(n_pos, d, std=0.05)}
    for i in range(n_layer):
        h = f"h.{i}."
        w.update({h + "ln_1.weight": r(d, std=0.2, mean=1.0), h + "ln_1.bias": r(d, std=0.1),
                  h + "attn.c_attn.weight": r(d, 3 * d, std=0.3), h + "attn.c_attn.bias": r(3 * d, std=0.1),
                  h + "attn.c_proj.weight": r(d, d, std=0.2), h + "attn.c_proj.bias": r(d, std=0.1),
                  h + "ln_2.weight": r(d, std=0.2, mean=1.0), h + "ln_2.bias": r(d, std=0.1),
                  h + "mlp.c_fc.weight": r(d, 4 * d, std=0.2), h + "mlp.c_fc.bias": r(4 * d, std=0.1),
                  h + "mlp.c_proj.weight": r(4 * d, d, std=0.1), h + "mlp.c_proj.bias": r(d, std=0.1)})
    w.update({"ln_f.weight": r(d, std=0.2, mean=1.0), "ln_f.bias": r(d, std=0.1)})
    return w


def write_folder(path, weights=None, config=None, **cfg_over):
    path.mkdir(parents=True, exist_ok=True)
    weights = gpt2_weights() if weights is None else weights
    (path / "config.json").write_text(json.dumps(config or gpt2_config(**cfg_over)))
    stn.save_file(weights, str(path / "model.safetensors"), metadata={"format": "pt"})
    return path


def gpt2_reference(w, cfg, ids, dtype=np.float64):
    """GPT-2's forward pass (transformers' GPT2LMHeadModel, eval mode) in plain NumPy."""
    w = {k: v.astype(dtype) for k, v in w.items()}
    eps = cfg.get("layer_norm_epsilon", 1e-5)
    d, nh = cfg["n_embd"], cfg["n_head"]
    hd = d // nh
    b, t = ids.shape

    def layer_norm(x, g, bias):
        mu = x.mean(-1, keepdims=True)
        var = ((x - mu) ** 2).mean(-1, keepdims=True)          # biased, as torch
        return (x - mu) / np.sqrt(var + eps) * g + bias

    def gelu_new(x):
        return 0.5 * x * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x ** 3)))

    def heads(z):                                               # (B, T, C) -> (B, H, T, D)
        return z.reshape(b, t, nh, hd).transpose(0, 2, 1, 3)

    x = w["wte.weight"][ids] + w["wpe.weight"][:t]
    causal = np.tril(np.ones((t, t), dtype=bool))
    for i in range(cfg["n_layer"]):
        p = f"h.{i}."
        a = layer_norm(x, w[p + "ln_1.weight"], w[p + "ln_1.bias"])
        qkv = a @ w[p + "attn.c_attn.weight"] + w[p + "attn.c_attn.bias"]   # Conv1D: x W + b
        q, k, v = (heads(z) for z in np.split(qkv, 3, axis=-1))
        s = q @ k.transpose(0, 1, 3, 2) / np.sqrt(hd)
        s = np.where(causal, s, -np.inf)
        pr = np.exp(s - s.max(-1, keepdims=True))
        pr /= pr.sum(-1, keepdims=True)
        y = (pr @ v).transpose(0, 2, 1, 3).reshape(b, t, d)
        x = x + y @ w[p + "attn.c_proj.weight"] + w[p + "attn.c_proj.bias"]
        m = layer_norm(x, w[p + "ln_2.weight"], w[p + "ln_2.bias"])
        m = gelu_new(m @ w[p + "mlp.c_fc.weight"] + w[p + "mlp.c_fc.bias"])
        x = x + m @ w[p + "mlp.c_proj.weight"] + w[p + "mlp.c_proj.bias"]
    x = layer_norm(x, w["ln_f.weight"], w["ln_f.bias"])
    return x @ w["wte.weight"].T                               # the tied head


def token_ids(seed=1, b=2, t=P, vocab=V):
    return np.random.default_rng(seed).integers(0, vocab, (b, t))


def logits_of(model, ids):
    with tl.no_grad():
        return model(ids)[0].numpy()


# ------------------------------------------------------------------------------ loading
def test_logits_match_gpt2_reference_float32_and_float64(tmp_path):
    w = gpt2_weights()
    folder = write_folder(tmp_path / "gpt2", w)
    ids = token_ids()
    ref = gpt2_reference(w, gpt2_config(), ids)
    assert np.abs(ref).max() > 1.0                             # logits of a useful scale

    m32 = GPT.from_pretrained(folder)
    assert m32.wte.weight.dtype == tl.float32 and not m32.training
    assert m32.config == GPTConfig(vocab_size=V, block_size=P, n_layer=L, n_head=H, d_model=C,
                                   dropout=0.1, layer_norm_eps=EPS)
    got32 = logits_of(m32, ids)
    # float32 rounding: the float64 reference on the same (float32) weights
    assert np.abs(got32 - ref).max() < 1e-5, np.abs(got32 - ref).max()

    m64 = GPT.from_pretrained(folder, dtype="float64")
    got64 = logits_of(m64, ids)
    assert got64.dtype == np.float64
    assert np.abs(got64 - ref).max() < 1e-13, np.abs(got64 - ref).max()
    # the weights were not changed on the way: every tensor is GPT-2's, transposed back
    for hf_name, tl_name, _, transposed in hf.name_map(m64.config):
        arr = m64.state_dict()[tl_name].numpy()
        np.testing.assert_array_equal(arr.T if transposed else arr, w[hf_name])


def test_eps_and_activation_matter(tmp_path):
    """The reference is sensitive to what a loader could get wrong: the config's epsilon
    (1e-5 would move the logits), and the tanh GELU (the exact one would too)."""
    w = gpt2_weights()
    ids = token_ids()
    ref = gpt2_reference(w, gpt2_config(), ids)
    assert np.abs(gpt2_reference(w, gpt2_config(layer_norm_epsilon=1e-5), ids) - ref).max() > 1e-2
    m = GPT.from_pretrained(write_folder(tmp_path / "a", w), dtype="float64")
    assert {ln.eps for ln in [m.ln_f] + [b.ln1 for b in m.blocks] + [b.ln2 for b in m.blocks]} == {EPS}
    # no layer_norm_epsilon in config.json: GPT2Config's default 1e-5
    cfg = gpt2_config(layer_norm_epsilon=...)
    m5 = GPT.from_pretrained(write_folder(tmp_path / "b", w, config=cfg), dtype="float64")
    assert m5.config.layer_norm_eps == 1e-5
    np.testing.assert_allclose(logits_of(m5, ids), gpt2_reference(w, cfg, ids), rtol=0, atol=1e-12)


def test_transformers_layout_with_prefix_lm_head_and_buffers_loads(tmp_path):
    """GPT2LMHeadModel's own save: "transformer." before every name, lm_head.weight (= wte),
    and the causal-mask buffers of older versions, which are ignored."""
    w = gpt2_weights()
    full = {"transformer." + k: v for k, v in w.items()}
    full["lm_head.weight"] = w["wte.weight"].copy()
    for i in range(L):
        full[f"transformer.h.{i}.attn.bias"] = np.tril(np.ones((1, 1, P, P), np.float32))
        full[f"transformer.h.{i}.attn.masked_bias"] = np.array(-1e4, np.float32)
    folder = write_folder(tmp_path / "lmhead", full)
    plain = GPT.from_pretrained(write_folder(tmp_path / "plain", w))
    model = GPT.from_pretrained(folder)
    np.testing.assert_array_equal(logits_of(model, token_ids()), logits_of(plain, token_ids()))

    full["lm_head.weight"] = full["lm_head.weight"] + 1e-3
    write_folder(folder, full)
    with pytest.raises(hf.HFError, match=r"lm_head.weight differs from wte.weight .*untied"):
        GPT.from_pretrained(folder)


def test_float16_bfloat16_and_float64_files(tmp_path):
    w = gpt2_weights()
    ids = token_ids()
    half = {k: v.astype(np.float16) for k, v in w.items()}
    m = GPT.from_pretrained(write_folder(tmp_path / "f16", half))
    assert m.wte.weight.dtype == tl.float32                   # computed in float32
    assert np.abs(logits_of(m, ids) - gpt2_reference(half, gpt2_config(), ids)).max() < 2e-5

    # bfloat16: NumPy cannot hold it, so the file is written by hand (the upper 16 bits)
    bits = {k: (v.view(np.uint32) >> 16).astype("<u2") for k, v in w.items()}
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for k, b in bits.items():
        header[k] = {"dtype": "BF16", "shape": list(b.shape), "data_offsets": [offset, offset + b.nbytes]}
        offset += b.nbytes
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)
    (tmp_path / "bf16").mkdir()
    (tmp_path / "bf16" / "config.json").write_text(json.dumps(gpt2_config()))
    (tmp_path / "bf16" / "model.safetensors").write_bytes(
        struct.pack("<Q", len(head)) + head + b"".join(b.tobytes() for b in bits.values()))
    as_f32 = {k: (b.astype(np.uint32) << 16).view(np.float32) for k, b in bits.items()}
    m = GPT.from_pretrained(tmp_path / "bf16", dtype="float64")
    np.testing.assert_array_equal(m.blocks[1].mlp.fc.weight.numpy().T, as_f32["h.1.mlp.c_fc.weight"])
    assert np.abs(logits_of(m, ids) - gpt2_reference(as_f32, gpt2_config(), ids)).max() < 1e-12

    m = GPT.from_pretrained(write_folder(tmp_path / "f64", {k: v.astype(np.float64) for k, v in w.items()}))
    assert m.wte.weight.dtype == tl.float64                   # float64 stays float64


# ------------------------------------------------------------------------------ refusals
def test_pickle_only_folder_is_refused_without_unpickling(tmp_path):
    marker = tmp_path / "unpickled"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))                 # runs if anyone unpickles it

    folder = tmp_path / "gpt2"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(gpt2_config()))
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps(Payload()))
    with pytest.raises(hf.HFError) as e:
        GPT.from_pretrained(folder)
    msg = str(e.value)
    for part in ("pytorch_model.bin", "pickle", "model.safetensors", "download gpt2",
                 "safe_serialization=True"):
        assert part in msg, part
    assert not marker.exists()
    assert hf.is_hf_folder(folder)                            # so the CLI routes it here


def test_other_architectures_are_refused_by_name(tmp_path):
    w = gpt2_weights()
    folder = write_folder(tmp_path / "llama", w, model_type="llama", architectures=["LlamaForCausalLM"])
    with pytest.raises(hf.HFError, match=r"model_type 'llama' \(LlamaForCausalLM\).*only GPT-2"):
        GPT.from_pretrained(folder)
    write_folder(folder, w, architectures=["GPT2ForSequenceClassification"])
    with pytest.raises(hf.HFError, match="not GPT2ForSequenceClassification"):
        GPT.from_pretrained(folder)
    write_folder(folder, w, model_type=...)
    with pytest.raises(hf.HFError, match="describes no model_type"):
        GPT.from_pretrained(folder)


def test_settings_tensorlite_cannot_reproduce_are_listed_together(tmp_path):
    folder = write_folder(tmp_path / "x", activation_function="gelu", n_inner=100,
                          scale_attn_by_inverse_layer_idx=True, tie_word_embeddings=False)
    with pytest.raises(hf.HFError) as e:
        GPT.from_pretrained(folder)
    msg = str(e.value)
    assert "activation_function 'gelu'" in msg and "gelu_new" in msg
    assert "n_inner 100" in msg and "4 x n_embd wide (96)" in msg
    assert "scale_attn_by_inverse_layer_idx True" in msg and "tie_word_embeddings False" in msg
    for ok in ("gelu_pytorch_tanh", "gelu_fast"):      # the same tanh formula under other names
        write_folder(folder, activation_function=ok)
        GPT.from_pretrained(folder)


def test_missing_unexpected_and_misshaped_tensors_are_listed(tmp_path):
    w = gpt2_weights()
    folder = tmp_path / "bad"

    missing = dict(w)
    del missing["h.1.mlp.c_fc.bias"]
    with pytest.raises(hf.HFError, match=r"1 missing: h\.1\.mlp\.c_fc\.bias \(96,\)$"):
        GPT.from_pretrained(write_folder(folder, missing))

    extra = dict(w, **{"h.0.attn.c_attn.lora_A": np.zeros((4, C), np.float32)})
    with pytest.raises(hf.HFError, match=r"1 unexpected: h\.0\.attn\.c_attn\.lora_A \(4, 24\)$"):
        GPT.from_pretrained(write_folder(folder, extra))

    # a Linear's (out, in) instead of Conv1D's (in, out): exactly what a wrong converter writes
    flipped = dict(w, **{"h.0.attn.c_attn.weight": np.ascontiguousarray(w["h.0.attn.c_attn.weight"].T)})
    with pytest.raises(hf.HFError, match=r"h\.0\.attn\.c_attn\.weight: expected \(24, 72\), found \(72, 24\)"):
        GPT.from_pretrained(write_folder(folder, flipped))

    # all at once, in one message; a config that disagrees with the tensors names its sizes
    allbad = dict(missing, **{"h.0.attn.c_attn.lora_A": np.zeros((4, C), np.float32),
                              "wpe.weight": np.zeros((P + 1, C), np.float32)})
    with pytest.raises(hf.HFError) as e:
        GPT.from_pretrained(write_folder(folder, allbad))
    msg = str(e.value)
    assert "n_positions 24" in msg and "1 missing: h.1.mlp.c_fc.bias" in msg
    assert "1 unexpected: h.0.attn.c_attn.lora_A" in msg
    assert "wpe.weight: expected (24, 24), found (25, 24)" in msg


def test_folder_problems_are_named(tmp_path):
    with pytest.raises(hf.HFError, match="does not exist"):
        GPT.from_pretrained(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    assert not hf.is_hf_folder(tmp_path / "empty")
    with pytest.raises(hf.HFError, match="no config.json"):
        GPT.from_pretrained(tmp_path / "empty")
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "config.json").write_text(json.dumps(gpt2_config()))
    with pytest.raises(hf.HFError, match="no model.safetensors; get it with hf download"):
        GPT.from_pretrained(tmp_path / "cfg")
    (tmp_path / "cfg" / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}")
    with pytest.raises(hf.HFError, match="not a readable safetensors file"):
        GPT.from_pretrained(tmp_path / "cfg")
    (tmp_path / "cfg" / "config.json").write_text("{not json")
    with pytest.raises(hf.HFError, match="not readable JSON"):
        GPT.from_pretrained(tmp_path / "cfg")


# ------------------------------------------------------------------------------ saving
def test_save_then_load_is_bit_for_bit(tmp_path):
    w = gpt2_weights()
    src = write_folder(tmp_path / "src", w)
    model = GPT.from_pretrained(src)
    out = model.save_pretrained(tmp_path / "out")
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors"]
    # GPT-2's own names, shapes, layouts and values: the file equals the one we read
    written = stn.load_file(str(out / "model.safetensors"))
    assert written.keys() == w.keys()
    for k in w:
        assert written[k].dtype == np.float32
        np.testing.assert_array_equal(written[k], w[k], err_msg=k)
    from safetensors import safe_open
    with safe_open(str(out / "model.safetensors"), framework="numpy") as f:
        assert f.metadata() == {"format": "pt"}
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["GPT2LMHeadModel"] and cfg["model_type"] == "gpt2"
    assert (cfg["n_embd"], cfg["n_layer"], cfg["n_head"], cfg["n_positions"], cfg["vocab_size"]) == (C, L, H, P, V)
    assert cfg["layer_norm_epsilon"] == EPS and cfg["activation_function"] == "gelu_new"
    assert cfg["tie_word_embeddings"] is True and cfg["tensorlite"]["tokenizer"] is None

    again = GPT.from_pretrained(out)
    assert again.config == model.config
    a, b = model.state_dict(), again.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k].numpy(), b[k].numpy(), err_msg=k)
    np.testing.assert_array_equal(logits_of(again, token_ids()), logits_of(model, token_ids()))


def test_a_trained_tensorlite_model_round_trips(tmp_path):
    """A tensorlite GPT of its own (float64, dropout, another epsilon) -> GPT-2 -> the same."""
    tl.manual_seed(3)
    cfg = GPTConfig(vocab_size=61, block_size=16, n_layer=3, n_head=2, d_model=16, dropout=0.2,
                    layer_norm_eps=1e-6)
    model = GPT(cfg).double()
    with tl.no_grad():
        for p in model.parameters():
            p.data += 0.05 * np.random.default_rng(0).standard_normal(p.shape)
    out = model.save_pretrained(tmp_path / "hf")
    assert hf.config_from_hf(json.loads((out / "config.json").read_text())) == cfg
    again = GPT.from_pretrained(out)
    assert again.wte.weight.dtype == tl.float64 and again.config == cfg
    for k, v in model.state_dict().items():
        np.testing.assert_array_equal(v.numpy(), again.state_dict()[k].numpy(), err_msg=k)
    model.eval()
    ids = token_ids(vocab=61, t=16)
    np.testing.assert_array_equal(logits_of(again, ids), logits_of(model, ids))
    # and the GPT-2 reference agrees with tensorlite's own forward on the exported weights
    hf_cfg = json.loads((out / "config.json").read_text())
    ref = gpt2_reference(stn.load_file(str(out / "model.safetensors")), hf_cfg, ids)
    assert np.abs(logits_of(model, ids) - ref).max() < 1e-12


def test_incompatible_models_are_refused_with_every_reason(tmp_path):
    cfg = dict(vocab_size=50, block_size=16, n_layer=2, n_head=2, d_model=8)
    bad = GPT(GPTConfig(**cfg, positional="rope", norm_first=False, bias=False, tie_weights=False))
    with pytest.raises(hf.HFError) as e:
        bad.save_pretrained(tmp_path / "out")
    msg = str(e.value)
    assert "(4 reasons)" in msg
    for part in ("positional 'rope'", "post-LN", "no biases", "untied LM head"):
        assert part in msg, part
    assert not (tmp_path / "out").exists() and os.listdir(tmp_path) == []

    with pytest.raises(hf.HFError, match="positional 'sinusoidal'"):
        GPT(GPTConfig(**cfg, positional="sinusoidal")).save_pretrained(tmp_path / "out")
    m = GPT(GPTConfig(**cfg))
    m.blocks[1].mlp.activation = "gelu"            # the exact GELU is not GPT-2's
    m.blocks[0].ln2.eps = 1e-3
    with pytest.raises(hf.HFError) as e:
        m.save_pretrained(tmp_path / "out")
    assert "MLP activation 'gelu' in blocks [1]" in str(e.value)
    assert "LayerNorm eps 0.001 in [0]" in str(e.value) and "(2 reasons)" in str(e.value)
    assert hf.gpt2_incompatibilities(GPT(GPTConfig(**cfg))) == []


def test_save_never_leaves_a_half_written_folder(tmp_path, monkeypatch):
    model = GPT.from_pretrained(write_folder(tmp_path / "src"))
    target = tmp_path / "out"
    target.mkdir()
    (target / "notes.txt").write_text("mine")
    with pytest.raises(hf.HFError, match=r"not empty \(it holds notes.txt\); pass overwrite=True"):
        model.save_pretrained(target)
    with pytest.raises(hf.HFError, match=r"holds files that are not a model's \(notes.txt\)"):
        model.save_pretrained(target, overwrite=True)          # a user's files are never replaced
    (target / "notes.txt").unlink()
    (target / "config.json").write_text("{}")                  # an older export

    def crash(arrays, path):                       # the disk fills halfway through the weights
        path.write_bytes(b"\x00" * 100)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(hf, "_save_weights", crash)
    with pytest.raises(hf.HFError, match="could not write .*No space left"):
        model.save_pretrained(target, overwrite=True)
    assert os.listdir(target) == ["config.json"]               # the old folder, untouched
    with pytest.raises(hf.HFError):
        model.save_pretrained(tmp_path / "new")
    assert not (tmp_path / "new").exists()
    assert sorted(os.listdir(tmp_path)) == ["out", "src"]      # no temporary folder left
    monkeypatch.undo()

    model.save_pretrained(target, overwrite=True)
    assert sorted(os.listdir(target)) == ["config.json", "model.safetensors"]
    (tmp_path / "empty").mkdir()
    model.save_pretrained(tmp_path / "empty")                 # an empty folder is fine
    assert sorted(os.listdir(tmp_path)) == ["empty", "out", "src"]

    run = tmp_path / "run"
    (run / "ckpt").mkdir(parents=True)
    with pytest.raises(hf.HFError, match="holds a tensorlite run"):
        model.save_pretrained(run, overwrite=True)
    (tmp_path / "file").write_text("x")
    with pytest.raises(hf.HFError, match="is a file"):
        model.save_pretrained(tmp_path / "file")


# ------------------------------------------------------------------------------ config
def test_gptconfig_layer_norm_eps_is_backward_compatible():
    old = {"vocab_size": 11, "block_size": 12, "n_layer": 2, "n_head": 2, "d_model": 8,
           "dropout": 0.0, "bias": True, "norm_first": True, "positional": "learned",
           "tie_weights": True, "extra": {}}                  # a config saved before the field
    cfg = GPTConfig.from_dict(old)
    assert cfg.layer_norm_eps == 1e-5
    assert GPTConfig.from_dict(cfg.to_dict()) == cfg
    m = GPT(GPTConfig.from_dict({**old, "layer_norm_eps": 1e-6}))
    assert {ln.eps for ln in [m.ln_f] + [b.ln1 for b in m.blocks] + [b.ln2 for b in m.blocks]} == {1e-6}
    for bad in (0.0, -1e-5, 1.5, True, "1e-5"):
        with pytest.raises(ConfigError, match="layer_norm_eps must be a number in"):
            GPTConfig.from_dict({**old, "layer_norm_eps": bad})


def test_export_run(tmp_path):
    tl.manual_seed(0)
    run = tmp_path / "run"
    model = GPT(GPTConfig(vocab_size=259, block_size=16, n_layer=1, n_head=2, d_model=8))
    save_checkpoint(run / "ckpt" / "latest", model=model, config=model.config.to_dict(),
                    extra={"step": 3})
    ByteTokenizer().save(run / "tokenizer.json")
    out = hf.export_run(run, tmp_path / "hf", say=lambda s: None)
    m, tok = hf.load_hf_folder(out)
    assert isinstance(tok, ByteTokenizer)
    for k, v in model.state_dict().items():
        np.testing.assert_array_equal(v.numpy(), m.state_dict()[k].numpy())
    with pytest.raises(CheckpointError, match="holds a tensorlite run"):
        hf.export_run(run, run, overwrite=True, say=lambda s: None)


# ------------------------------------------------------------------------------ tokenizers
LINES = ["def add(a, b):", "    return a + b", "print('hello world')", "héllo wörld — ünïcode",
         "日本語のテキスト", "for i in range(10):", "\tx = [i * i for i in range(3)]",
         "class Point:  # two spaces", "the quick brown fox jumps over the lazy dog"] * 3
MIXED = ("def f(x):\n    return x  # ünïcödé 日本語 🙂\n\n\tTabs\tand   spaces  \r\n"
         "print('héllo')\u2581x  ")


def train_bpe(vocab_size=320):
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import decoders, models, pre_tokenizers, trainers
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(LINES, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<|endoftext|>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return tok


def hf_folder_with_tokenizer(path):
    tok = train_bpe()
    vocab = tok.get_vocab_size()
    eot = tok.token_to_id("<|endoftext|>")
    folder = write_folder(path, gpt2_weights(vocab=vocab),
                          config=gpt2_config(vocab_size=vocab, bos_token_id=eot, eos_token_id=eot))
    tok.save(str(folder / "tokenizer.json"))
    return folder, tok


def test_hf_tokenizer_matches_tokenizers(tmp_path):
    folder, raw = hf_folder_with_tokenizer(tmp_path / "gpt2")
    model, tok = hf.load_hf_folder(folder)
    assert isinstance(tok, hf.HFTokenizer) and tok.kind == "hf"
    eot = raw.token_to_id("<|endoftext|>")
    assert tok.vocab_size == raw.get_vocab_size() == model.config.vocab_size
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (eot, eot, eot)
    ids = tok.encode(MIXED)
    assert ids == raw.encode(MIXED, add_special_tokens=False).ids and len(ids) > 20
    assert tok.decode(ids) == MIXED
    assert tok.encode_batch([MIXED, "", "x"]) == [ids, [], raw.encode("x").ids]
    assert tok.decode([eot] + ids + [eot]) == MIXED           # specials decode to nothing
    assert tok.encode("a<|endoftext|>b")[1] == eot            # as HF: the special is matched
    with pytest.raises(ValueError, match="out of range"):
        tok.decode([tok.vocab_size])
    tok.save(tmp_path / "copy.json")
    assert (tmp_path / "copy.json").read_bytes() == (folder / "tokenizer.json").read_bytes()
    assert hf.HFTokenizer.load(tmp_path / "copy.json").encode(MIXED) == ids
    # and the model runs on its ids
    assert logits_of(model, np.array([ids[:P]])).shape == (1, P, tok.vocab_size)


def test_hf_tokenizer_special_ids(tmp_path):
    folder, raw = hf_folder_with_tokenizer(tmp_path / "gpt2")
    data = (folder / "tokenizer.json").read_bytes()
    assert hf.HFTokenizer(data, pad_id=5).pad_id == 5
    with pytest.raises(hf.HFError, match="eos_id 9999 is not an id"):
        hf.HFTokenizer(data, eos_id=9999)
    cfg = gpt2_config(vocab_size=raw.get_vocab_size(), bos_token_id=..., eos_token_id=...)
    (folder / "config.json").write_text(json.dumps(cfg))
    dot = raw.token_to_id(".")
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": {"content": "<|endoftext|>"}, "eos_token": ".", "pad_token": None}))
    tok = hf.load_hf_tokenizer(folder)
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (raw.token_to_id("<|endoftext|>"), dot, dot)
    (folder / "config.json").write_text(json.dumps(dict(cfg, eos_token_id=50256)))
    with pytest.raises(hf.HFError, match="eos_token_id 50256 is not an id of"):
        hf.load_hf_tokenizer(folder)
    (folder / "tokenizer.json").write_text("{}")
    with pytest.raises(hf.HFError, match="not a tokenizer.json that the tokenizers library"):
        hf.load_hf_tokenizer(folder)
    (folder / "tokenizer.json").unlink()
    with pytest.raises(hf.HFError, match="no tokenizer.json; get it with hf download"):
        hf.load_hf_tokenizer(folder)


def test_save_pretrained_with_hf_tokenizer(tmp_path):
    folder, raw = hf_folder_with_tokenizer(tmp_path / "gpt2")
    model, tok = hf.load_hf_folder(folder)
    out = model.save_pretrained(tmp_path / "out", tokenizer=tok)
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors", "tokenizer.json"]
    assert (out / "tokenizer.json").read_bytes() == (folder / "tokenizer.json").read_bytes()
    cfg = json.loads((out / "config.json").read_text())
    eot = raw.token_to_id("<|endoftext|>")
    assert (cfg["bos_token_id"], cfg["eos_token_id"]) == (eot, eot) and "pad_token_id" not in cfg
    m2, tok2 = hf.load_hf_folder(out)
    assert isinstance(tok2, hf.HFTokenizer) and tok2.encode(MIXED) == tok.encode(MIXED)
    np.testing.assert_array_equal(logits_of(m2, token_ids(vocab=tok.vocab_size)),
                                  logits_of(model, token_ids(vocab=tok.vocab_size)))

    # a fine-tuned model's chat tokens (ids after the HF vocabulary) travel in config.json
    from gpt.align.template import ChatTokenizer
    chat = ChatTokenizer(tok)
    tl.manual_seed(0)
    tuned = GPT(GPTConfig(vocab_size=chat.vocab_size, block_size=16, n_layer=1, n_head=2, d_model=8))
    out = tuned.save_pretrained(tmp_path / "chat", tokenizer=chat)
    assert (out / "tokenizer.json").read_bytes() == (folder / "tokenizer.json").read_bytes()
    _, tok3 = hf.load_hf_folder(out)
    assert isinstance(tok3, ChatTokenizer) and isinstance(tok3.base, hf.HFTokenizer)
    assert tok3.special_ids == chat.special_ids and tok3.eos_id == eot
    text = "<|user|>" + MIXED + "<|end|><|assistant|>"
    assert tok3.encode(text) == chat.encode(text) and tok3.decode(chat.encode(text)) == text


def sentencepiece_tokenizer():
    import inspect
    text = inspect.getsource(json) + inspect.getsource(pickle)
    return SentencePieceTokenizer.train([text], model_type="bpe", vocab_size=400, num_threads=1)


@pytest.mark.parametrize("kind", ["byte", "bpe", "chat"])
def test_save_pretrained_with_tensorlite_tokenizers(tmp_path, kind):
    from gpt.align.template import ChatTokenizer
    tok = {"byte": ByteTokenizer, "bpe": sentencepiece_tokenizer,
           "chat": lambda: ChatTokenizer(ByteTokenizer())}[kind]()
    tl.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=16, n_layer=1, n_head=2, d_model=8))
    out = model.save_pretrained(tmp_path / "out", tokenizer=tok)
    file = "tokenizer.model" if kind == "bpe" else "tensorlite_tokenizer.json"
    assert sorted(os.listdir(out)) == sorted(["config.json", "model.safetensors", file])
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["tensorlite"]["tokenizer"] == {"kind": tok.kind, "file": file}
    assert (cfg["bos_token_id"], cfg["eos_token_id"], cfg["pad_token_id"]) == (tok.bos_id, tok.eos_id, tok.pad_id)
    m2, tok2 = hf.load_hf_folder(out)
    assert type(tok2) is type(tok) and tok2.vocab_size == tok.vocab_size == m2.config.vocab_size
    text = "def f(x):\n    return x  # ünïcödé\u2581 🙂"
    assert tok2.encode(text) == tok.encode(text) and tok2.decode(tok.encode(text)) == text
    if kind == "chat":
        assert tok2.special_ids == tok.special_ids and cfg["tensorlite"]["chat_tokens"]["base_vocab_size"] == 259
        assert tok2.encode("<|user|>hi<|end|>") == tok.encode("<|user|>hi<|end|>")
    with pytest.raises(hf.HFError, match="the tokenizer has 259 ids but the model's vocabulary only 50"):
        GPT(GPTConfig(vocab_size=50, block_size=8, n_layer=1, n_head=1, d_model=4)).save_pretrained(
            tmp_path / "small", tokenizer=ByteTokenizer())


def test_missing_tokenizers_library_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tokenizers", None)      # as if not installed
    with pytest.raises(hf.MissingExtraError, match=r'pip install -e "\.\[hf\]"') as e:
        hf.HFTokenizer(b"{}")
    assert isinstance(e.value, ImportError) and isinstance(e.value, CheckpointError)
    # the weights need no tokenizers
    GPT.from_pretrained(write_folder(tmp_path / "gpt2"))
