"""Hugging Face GPT-2 folders: read one into tensorlite's GPT, write a GPT as one.

A GPT-2 folder is what ``hf download gpt2 ...`` or transformers' ``save_pretrained`` writes::

    config.json          GPT2Config: n_embd, n_layer, n_head, n_positions, vocab_size,
                         layer_norm_epsilon, activation_function, bos/eos_token_id
    model.safetensors    the weights, under GPT-2's names (the table below)
    tokenizer.json       the byte-level BPE, read with the `tokenizers` library (the
                         optional extra: pip install -e ".[hf]")

Nothing is downloaded: the user brings the folder. Only safetensors are read.
``pytorch_model.bin`` is a pickle, and unpickling a file runs whatever code it names, so a
folder that holds only that is refused, with the two ways to get ``model.safetensors``.

GPT-2 is tensorlite's default architecture (learned positions, pre-LN, GELU tanh, the head
tied to the token embedding), so the names map one to one::

    GPT-2                        shape     tensorlite                   shape
    wte.weight                   (V, C)    wte.weight                   (V, C)
    wpe.weight                   (P, C)    wpe.weight                   (P, C)
    h.i.ln_1.{weight,bias}       (C,)      blocks.i.ln1.{weight,bias}   (C,)
    h.i.attn.c_attn.weight       (C, 3C)   blocks.i.attn.qkv.weight     (3C, C)   transposed
    h.i.attn.c_attn.bias         (3C,)     blocks.i.attn.qkv.bias       (3C,)
    h.i.attn.c_proj.weight       (C, C)    blocks.i.attn.proj.weight    (C, C)    transposed
    h.i.attn.c_proj.bias         (C,)      blocks.i.attn.proj.bias      (C,)
    h.i.ln_2.{weight,bias}       (C,)      blocks.i.ln2.{weight,bias}   (C,)
    h.i.mlp.c_fc.weight          (C, 4C)   blocks.i.mlp.fc.weight       (4C, C)   transposed
    h.i.mlp.c_fc.bias            (4C,)     blocks.i.mlp.fc.bias         (4C,)
    h.i.mlp.c_proj.weight        (4C, C)   blocks.i.mlp.proj.weight     (C, 4C)   transposed
    h.i.mlp.c_proj.bias          (C,)      blocks.i.mlp.proj.bias       (C,)
    ln_f.{weight,bias}           (C,)      ln_f.{weight,bias}           (C,)

Why the transposes: GPT-2's projections are Conv1D modules, ``y = x @ W + b`` with W stored
(in, out); a Linear stores (out, in). Why nothing else: c_attn's 3C outputs are [q | k | v],
each then split into heads (B, T, H, D), the same order as tensorlite's packed qkv.
Files written by transformers' GPT2LMHeadModel put "transformer." before every name and add
``lm_head.weight`` (equal to wte: the head is tied); older ones also hold the causal-mask
buffers ``h.i.attn.bias`` / ``h.i.attn.masked_bias``. The prefix is dropped, the buffers are
ignored, and lm_head must equal wte.

What `save_pretrained` writes, and who can read it:

* ``config.json`` (``architectures: ["GPT2LMHeadModel"]``, ``model_type: "gpt2"``) and
  ``model.safetensors`` (the names above without a prefix, as the official ``gpt2`` repo
  has them; ``metadata={"format": "pt"}``): transformers' ``GPT2LMHeadModel.from_pretrained``
  and any other GPT-2 loader read the model.
* The tokenizer, in the file it came from. An HF tokenizer is ``tokenizer.json``, which
  ``AutoTokenizer`` reads. A tensorlite sentencepiece tokenizer is ``tokenizer.model`` (the
  sentencepiece library reads it, transformers' GPT-2 tokenizer does not; tensorlite encodes
  U+2581 as its three byte pieces, which plain sentencepiece does not), a byte tokenizer
  ``tensorlite_tokenizer.json`` (ids 0..255 are the UTF-8 bytes, then bos, eos, pad): never
  ``tokenizer.json``, the name HF tools parse. config.json's ``"tensorlite"`` section says
  which file and kind, and the chat tokens of a fine-tuned model (ids after the base
  vocabulary; HF tools do not see them). Only tensorlite reads that section.

Every write is atomic: a new folder under a hidden temporary name, renamed into place when
complete, so a crash never leaves a half-written folder that looks valid.
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import struct
from pathlib import Path

import numpy as np

from gpt.data.tokenizer import Tokenizer
from nn.checkpoint import CheckpointError, fsync_path

__all__ = ["HFError", "MissingExtraError", "HFTokenizer", "is_hf_folder", "load_pretrained",
           "load_hf_tokenizer", "load_hf_folder", "read_hf_config", "save_pretrained", "export_run",
           "gpt2_incompatibilities", "config_from_hf", "config_to_hf", "name_map",
           "hf_to_state_dict", "state_dict_to_hf"]

CONFIG_FILE, WEIGHTS_FILE, HF_TOKENIZER_FILE = "config.json", "model.safetensors", "tokenizer.json"
PICKLE_FILE = "pytorch_model.bin"
SP_TOKENIZER_FILE, BYTE_TOKENIZER_FILE = "tokenizer.model", "tensorlite_tokenizer.json"
GPT2_ARCHITECTURES = ("GPT2LMHeadModel", "GPT2Model")
# HF's names for GELU's tanh approximation; all compute 0.5 x (1 + tanh(sqrt(2/pi)(x + 0.044715 x^3)))
TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")
_SECTION = "tensorlite"           # config.json's key for what only tensorlite reads
_SECTION_FORMAT = "tensorlite-hf-export"
_TMP_PREFIX = ".tmp-"
_EXTRA_HINT = 'pip install -e ".[hf]" (or pip install "tokenizers>=0.15")'
_DOWNLOAD_HINT = ("hf download gpt2 config.json model.safetensors tokenizer.json --local-dir "
                  "DIR (huggingface_hub; older versions: huggingface-cli download ...)")


class HFError(CheckpointError):
    """A Hugging Face folder that cannot be read, or a model that cannot be written as one;
    the message names the file, the tensors or the settings, and what to do."""


class MissingExtraError(HFError, ImportError):
    """The `tokenizers` library (the ``hf`` extra) is not installed."""


def _import_tokenizers():
    try:
        import tokenizers
    except ImportError:
        raise MissingExtraError(f"reading a Hugging Face tokenizer.json needs the `tokenizers` "
                                f"library, which is not installed: {_EXTRA_HINT}") from None
    return tokenizers


# ============================================================================ the tokenizer
class HFTokenizer(Tokenizer):
    """A Hugging Face ``tokenizer.json`` (``tokenizers.Tokenizer``) behind tensorlite's
    Tokenizer interface.

    ``encode`` adds no special tokens (no bos/eos; GPT-2 adds none anyway), and never
    truncates or pads whatever the file configures. ``decode`` leaves out special tokens
    and bos/eos/pad. A text that contains a special token's string (GPT-2's
    ``<|endoftext|>``) encodes it as that token, as HF does, so it does not decode back;
    every other text round-trips through a byte-level BPE such as GPT-2's.

    ``bos_id`` / ``eos_id``: given, else ``<|endoftext|>``'s id when the vocabulary has it
    (GPT-2: 50256 for both), else -1 (none). ``pad_id``: given, else ``eos_id`` (GPT-2 has
    no pad token; padded positions are masked out of every loss, so any valid id serves).
    ``save`` writes the original file's bytes unchanged.
    """

    kind = "hf"

    def __init__(self, tokenizer_json: bytes | str, *, bos_id: int | None = None,
                 eos_id: int | None = None, pad_id: int | None = None, source: str = "tokenizer.json"):
        tokenizers = _import_tokenizers()
        data = tokenizer_json.encode("utf-8") if isinstance(tokenizer_json, str) else bytes(tokenizer_json)
        try:
            tok = tokenizers.Tokenizer.from_str(data.decode("utf-8"))
        except Exception as e:         # the library raises its own Exception type
            raise HFError(f"{source} is not a tokenizer.json that the tokenizers library can "
                          f"read ({e}); copy it again from the model's repository") from None
        tok.no_truncation()            # tensorlite wants every id of a text, unpadded
        tok.no_padding()
        self._json, self._tok, self.source = data, tok, source
        self._vocab_size = tok.get_vocab_size(with_added_tokens=True)
        eot = tok.token_to_id("<|endoftext|>")
        default = -1 if eot is None else int(eot)
        self._bos = self._checked_id("bos_id", default if bos_id is None else bos_id)
        self._eos = self._checked_id("eos_id", default if eos_id is None else eos_id)
        self._pad = self._checked_id("pad_id", self._eos if pad_id is None else pad_id)
        self._specials = {i for i in (self._bos, self._eos, self._pad) if i >= 0}

    def _checked_id(self, what: str, i) -> int:
        if isinstance(i, bool) or not isinstance(i, (int, np.integer)) or not -1 <= i < self._vocab_size:
            raise HFError(f"{self.source}: {what} {i!r} is not an id of this tokenizer "
                          f"({self._vocab_size} ids; -1 means none)")
        return int(i)

    @classmethod
    def from_file(cls, path: str | os.PathLike, **ids) -> "HFTokenizer":
        """``tokenizer.json`` at ``path``; ``ids``: bos_id / eos_id / pad_id (see the class)."""
        path = Path(path)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise HFError(f"{path} does not exist") from None
        except OSError as e:
            raise HFError(f"{path} cannot be read ({e.strerror or e})") from None
        return cls(data, source=str(path), **ids)

    @classmethod
    def from_folder(cls, folder: str | os.PathLike, file: str = HF_TOKENIZER_FILE) -> "HFTokenizer":
        """The tokenizer of a model folder, with its bos/eos/pad ids from config.json
        (``bos_token_id``...), else from tokenizer_config.json (``bos_token``...), else the
        defaults (see the class)."""
        folder = Path(folder)
        tok = cls.from_file(folder / file)
        ids = _special_ids(folder, tok)
        if ids:
            tok = cls(tok._json, source=tok.source, **ids)
        return tok

    @classmethod
    def load(cls, path: str | os.PathLike) -> "HFTokenizer":
        return cls.from_file(path)

    # -- the Tokenizer interface ---------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def bos_id(self) -> int:
        return self._bos

    @property
    def eos_id(self) -> int:
        return self._eos

    @property
    def pad_id(self) -> int:
        return self._pad

    @property
    def backend_tokenizer(self):
        """The underlying ``tokenizers.Tokenizer``."""
        return self._tok

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids) -> str:
        ids = [i for i in self._check_ids(ids) if i not in self._specials]
        return self._tok.decode(ids, skip_special_tokens=True)

    def save(self, path: str | os.PathLike) -> None:
        from gpt.data.shards import atomic_write_bytes
        atomic_write_bytes(path, self._json)

    def __repr__(self) -> str:
        return f"HFTokenizer(vocab_size={self.vocab_size}, bos={self.bos_id}, eos={self.eos_id})"


def _special_ids(folder: Path, tok: HFTokenizer) -> dict:
    """bos_id / eos_id / pad_id of the tokenizer in ``folder``, from config.json's
    ``*_token_id`` or else tokenizer_config.json's ``*_token`` strings; missing ones left out."""
    ids = {}
    config = _read_json(folder / CONFIG_FILE) if (folder / CONFIG_FILE).is_file() else {}
    tcfg_path = folder / "tokenizer_config.json"
    tcfg = _read_json(tcfg_path) if tcfg_path.is_file() else {}
    for role in ("bos", "eos", "pad"):
        i = config.get(f"{role}_token_id")
        if isinstance(i, list):             # newer configs may list several eos ids
            i = i[0] if i else None
        if i is None:
            token = tcfg.get(f"{role}_token")
            if isinstance(token, dict):     # {"content": "<|endoftext|>", ...}
                token = token.get("content")
            if isinstance(token, str):
                i = tok.backend_tokenizer.token_to_id(token)
                if i is None:
                    raise HFError(f"{tcfg_path}: {role}_token {token!r} is not in "
                                  f"{tok.source}")
        if i is not None:
            if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < tok.vocab_size:
                raise HFError(f"{folder / CONFIG_FILE}: {role}_token_id {i!r} is not an id of "
                              f"{tok.source} ({tok.vocab_size} ids); the folder's files do not "
                              "belong together")
            ids[f"{role}_id"] = i
    return ids


# ============================================================================ reading a folder
def is_hf_folder(path: str | os.PathLike) -> bool:
    """True when ``path`` is a folder holding ``config.json``: a Hugging Face model folder
    (tensorlite's run and data folders never hold one). Whether it can be loaded is for
    `load_pretrained` to say."""
    path = Path(os.path.expanduser(str(path)))
    return path.is_dir() and (path / CONFIG_FILE).is_file()


def _read_json(path: Path) -> dict:
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise HFError(f"{path} does not exist") from None
    except (OSError, ValueError) as e:
        raise HFError(f"{path} is not readable JSON ({e})") from None
    if not isinstance(obj, dict):
        raise HFError(f"{path} holds a JSON {type(obj).__name__}, not an object")
    return obj


def read_hf_config(folder: str | os.PathLike) -> dict:
    """config.json of a GPT-2 folder; any other architecture is refused by name."""
    folder = Path(folder)
    if not folder.exists():
        raise HFError(f"{folder} does not exist: pass a Hugging Face GPT-2 folder (config.json, "
                      f"model.safetensors, tokenizer.json), e.g. from {_DOWNLOAD_HINT}")
    if not folder.is_dir():
        raise HFError(f"{folder} is a file, not a Hugging Face model folder")
    if not (folder / CONFIG_FILE).is_file():
        raise HFError(f"{folder} holds no {CONFIG_FILE}, so it is not a Hugging Face model "
                      f"folder; get one with {_DOWNLOAD_HINT}")
    hf = _read_json(folder / CONFIG_FILE)
    model_type = hf.get("model_type")
    archs = hf.get("architectures") or []
    if model_type != "gpt2":
        what = f"model_type {model_type!r}" if model_type is not None else "no model_type"
        raise HFError(f"{folder / CONFIG_FILE} describes {what}"
                      + (f" ({', '.join(map(str, archs))})" if archs else "")
                      + ": only GPT-2 (model_type 'gpt2', GPT2LMHeadModel) can be loaded")
    other = [a for a in archs if a not in GPT2_ARCHITECTURES]
    if other:
        raise HFError(f"{folder / CONFIG_FILE}: architectures {archs}: only a GPT-2 language "
                      f"model ({' or '.join(GPT2_ARCHITECTURES)}) can be loaded, not "
                      f"{', '.join(map(str, other))}")
    return hf


def _positive_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def config_from_hf(hf: dict, dropout: float | None = None, where: str = CONFIG_FILE):
    """A GPT-2 config.json (a dict) -> GPTConfig; every setting tensorlite's GPT cannot
    reproduce is listed in one HFError. ``dropout``: None takes ``resid_pdrop`` (GPT-2: 0.1;
    tensorlite has one dropout probability where GPT-2 has three, equal in every release)."""
    from .model import ConfigError, GPTConfig
    reasons = []
    dims = {}
    for key in ("vocab_size", "n_embd", "n_layer", "n_head"):
        v = hf.get(key)
        if not _positive_int(v):
            reasons.append(f"{key} {v!r} is not a positive integer")
        dims[key] = v
    n_pos = hf.get("n_positions", hf.get("n_ctx"))
    if not _positive_int(n_pos):
        reasons.append(f"n_positions {n_pos!r} is not a positive integer")
    if _positive_int(dims["n_embd"]) and _positive_int(dims["n_head"]) and \
            dims["n_embd"] % dims["n_head"]:
        reasons.append(f"n_embd {dims['n_embd']} is not divisible by n_head {dims['n_head']}")
    act = hf.get("activation_function", "gelu_new")
    if act not in TANH_GELUS:
        reasons.append(f"activation_function {act!r}: tensorlite's GPT uses GELU's tanh "
                       f"approximation ({' / '.join(TANH_GELUS)})")
    n_inner = hf.get("n_inner")
    if n_inner is not None and n_inner != 4 * (dims["n_embd"] or 0):
        reasons.append(f"n_inner {n_inner!r}: tensorlite's MLP is 4 x n_embd wide "
                       f"({4 * dims['n_embd'] if _positive_int(dims['n_embd']) else '?'})")
    eps = hf.get("layer_norm_epsilon", 1e-5)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps < 1:
        reasons.append(f"layer_norm_epsilon {eps!r} is not a number in (0, 1)")
    for key, want in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False),
                      ("add_cross_attention", False), ("tie_word_embeddings", True)):
        if key in hf and hf[key] != want:
            why = {"scale_attn_weights": "attention scores are always scaled by 1/sqrt(head size)",
                   "scale_attn_by_inverse_layer_idx": "no per-layer attention scaling",
                   "add_cross_attention": "no cross-attention (a decoder-only GPT)",
                   "tie_word_embeddings": "the LM head is the token embedding (tied)"}[key]
            reasons.append(f"{key} {hf[key]!r}: {why}")
    if dropout is None:
        dropout = hf.get("resid_pdrop", 0.1)
    if reasons:
        raise HFError(f"{where}: this GPT-2 variant cannot be loaded into tensorlite's GPT: "
                      + "; ".join(reasons))
    try:
        return GPTConfig(vocab_size=dims["vocab_size"], block_size=n_pos, n_layer=dims["n_layer"],
                         n_head=dims["n_head"], d_model=dims["n_embd"], dropout=dropout,
                         bias=True, norm_first=True, positional="learned", tie_weights=True,
                         layer_norm_eps=float(eps))
    except ConfigError as e:
        raise HFError(f"{where}: {e}") from None


def name_map(config) -> list[tuple[str, str, tuple, bool]]:
    """(GPT-2 name, tensorlite name, GPT-2 shape, transposed) for every weight of a GPT-2
    with this GPTConfig, in the order of the module docstring's table."""
    c, d = config, config.d_model
    rows = [("wte.weight", "wte.weight", (c.vocab_size, d), False),
            ("wpe.weight", "wpe.weight", (c.block_size, d), False)]
    for i in range(c.n_layer):
        h, b = f"h.{i}.", f"blocks.{i}."
        rows += [(h + "ln_1.weight", b + "ln1.weight", (d,), False),
                 (h + "ln_1.bias", b + "ln1.bias", (d,), False),
                 (h + "attn.c_attn.weight", b + "attn.qkv.weight", (d, 3 * d), True),
                 (h + "attn.c_attn.bias", b + "attn.qkv.bias", (3 * d,), False),
                 (h + "attn.c_proj.weight", b + "attn.proj.weight", (d, d), True),
                 (h + "attn.c_proj.bias", b + "attn.proj.bias", (d,), False),
                 (h + "ln_2.weight", b + "ln2.weight", (d,), False),
                 (h + "ln_2.bias", b + "ln2.bias", (d,), False),
                 (h + "mlp.c_fc.weight", b + "mlp.fc.weight", (d, 4 * d), True),
                 (h + "mlp.c_fc.bias", b + "mlp.fc.bias", (4 * d,), False),
                 (h + "mlp.c_proj.weight", b + "mlp.proj.weight", (4 * d, d), True),
                 (h + "mlp.c_proj.bias", b + "mlp.proj.bias", (d,), False)]
    rows += [("ln_f.weight", "ln_f.weight", (d,), False), ("ln_f.bias", "ln_f.bias", (d,), False)]
    return rows


_PREFIX = "transformer."
_LM_HEAD = "lm_head.weight"


def _ignored(name: str) -> bool:
    """The causal-mask buffers older transformers versions saved (never weights)."""
    parts = name.split(".")
    return len(parts) == 4 and parts[0] == "h" and parts[2] == "attn" and \
        parts[3] in ("bias", "masked_bias")


def _plain_name(name: str) -> str:
    return name[len(_PREFIX):] if name.startswith(_PREFIX) else name


def _check_names_and_shapes(shapes: dict, config, file) -> None:
    """``shapes``: the file's names (prefix dropped) -> shapes. Missing, unexpected and
    mis-shaped tensors, all of them, in one HFError."""
    expected = {hf: shape for hf, _, shape, _ in name_map(config)}
    missing = [f"{n} {shape}" for n, shape in expected.items() if n not in shapes]
    unexpected = [f"{n} {tuple(s)}" for n, s in shapes.items()
                  if n not in expected and n != _LM_HEAD and not _ignored(n)]
    wte = expected["wte.weight"]
    bad = [f"{n}: expected {expected.get(n, wte)}, found {tuple(s)}" for n, s in shapes.items()
           if (n in expected or n == _LM_HEAD) and tuple(s) != expected.get(n, wte)]
    if not (missing or unexpected or bad):
        return
    parts = ([f"{len(missing)} missing: " + ", ".join(missing)] if missing else []) + \
        ([f"{len(unexpected)} unexpected: " + ", ".join(unexpected)] if unexpected else []) + \
        ([f"{len(bad)} with the wrong shape: " + "; ".join(bad)] if bad else [])
    raise HFError(f"{file} does not hold the GPT-2 that config.json describes (n_layer "
                  f"{config.n_layer}, n_embd {config.d_model}, vocab_size {config.vocab_size}, "
                  f"n_positions {config.block_size}): " + ". ".join(parts))


def _weights_file(folder: Path) -> Path:
    path = folder / WEIGHTS_FILE
    if path.is_file():
        return path
    if (folder / "model.safetensors.index.json").is_file():
        raise HFError(f"{folder} holds sharded weights (model.safetensors.index.json and "
                      "model-*-of-*.safetensors); tensorlite reads one model.safetensors. Merge "
                      "them where transformers is installed: model.save_pretrained(DIR, "
                      "safe_serialization=True, max_shard_size='100GB')")
    if (folder / PICKLE_FILE).is_file() or (folder / "pytorch_model.bin.index.json").is_file():
        raise HFError(f"{folder} holds {PICKLE_FILE} but no {WEIGHTS_FILE}: {PICKLE_FILE} is a "
                      "pickle, and unpickling a file runs whatever code it names, so tensorlite "
                      f"never reads one. Get {WEIGHTS_FILE} instead: {_DOWNLOAD_HINT}; or "
                      "convert it where transformers is installed (and you trust the file): "
                      "GPT2LMHeadModel.from_pretrained(DIR).save_pretrained(DIR, "
                      "safe_serialization=True)")
    raise HFError(f"{folder} holds no {WEIGHTS_FILE}; get it with {_DOWNLOAD_HINT}")


def _read_bf16(path: Path, name: str) -> np.ndarray:
    """A bfloat16 tensor as float32 (NumPy has no bfloat16, so safetensors' NumPy reader
    cannot return one): the file's raw 16 bits are a float32's upper half."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        info = json.loads(f.read(n))[name]
        lo, hi = info["data_offsets"]
        f.seek(8 + n + lo)
        raw = np.frombuffer(f.read(hi - lo), dtype="<u2")
    return (raw.astype(np.uint32) << 16).view(np.float32).reshape(info["shape"])


_FLOATS = {"F16": np.float16, "BF16": np.float32, "F32": np.float32, "F64": np.float64}


def _read_weights(path: Path, config) -> dict:
    """GPT-2's tensors from ``path`` (names without the prefix), checked before any data is
    read; lm_head, when present, must equal wte."""
    from safetensors import SafetensorError, safe_open
    try:
        with safe_open(str(path), framework="numpy") as f:
            names = {_plain_name(k): k for k in f.keys()}
            if len(names) < len(list(f.keys())):
                raise HFError(f"{path} holds some tensors both with and without the "
                              f"'{_PREFIX}' prefix; it is not a file transformers wrote")
            shapes = {n: tuple(f.get_slice(k).get_shape()) for n, k in names.items()}
            _check_names_and_shapes(shapes, config, path)
            wanted = [hf for hf, *_ in name_map(config)] + ([_LM_HEAD] if _LM_HEAD in names else [])
            dtypes = {n: f.get_slice(names[n]).get_dtype() for n in wanted}
            bad = sorted({d for d in dtypes.values() if d not in _FLOATS})
            if bad:
                raise HFError(f"{path} holds tensors of dtype {bad}; GPT-2 weights are float "
                              f"({', '.join(_FLOATS)})")
            arrays = {n: (_read_bf16(path, names[n]) if dtypes[n] == "BF16" else f.get_tensor(names[n]))
                      for n in wanted}
    except SafetensorError as e:
        raise HFError(f"{path} is not a readable safetensors file ({e}); download it again") from None
    if _LM_HEAD in arrays:
        head, wte = arrays.pop(_LM_HEAD), arrays["wte.weight"]
        if not np.array_equal(head, wte):
            diff = float(np.max(np.abs(head.astype(np.float64) - wte.astype(np.float64))))
            raise HFError(f"{path}: lm_head.weight differs from wte.weight (max |difference| "
                          f"{diff:.3g}): an untied LM head, which GPT-2 does not have and this "
                          "loader does not read")
    broken = [n for n, a in arrays.items() if not np.isfinite(a).all()]
    if broken:
        raise HFError(f"{path}: {len(broken)} tensor(s) hold NaN or infinite values "
                      f"({', '.join(broken[:5])}); the file is damaged or the model diverged")
    return arrays


def hf_to_state_dict(arrays: dict, config) -> dict:
    """GPT-2's arrays (names without prefix) -> tensorlite's state_dict names, Conv1D
    weights transposed to Linear's (out, in)."""
    return {tl_name: (arrays[hf].T if transposed else arrays[hf])
            for hf, tl_name, _, transposed in name_map(config)}


def load_pretrained(folder: str | os.PathLike, device: str = "cpu", dtype=None,
                    dropout: float | None = None):
    """The GPT of a Hugging Face GPT-2 folder (config.json + model.safetensors) on
    ``device``, in eval mode. ``dtype``: None keeps float64 weights float64 and makes every
    other float dtype float32 (tensorlite's compute dtype); ``dropout``: None takes
    config.json's resid_pdrop. The tokenizer is `load_hf_tokenizer`'s."""
    import tensorlite as tl
    from .model import GPT
    folder = Path(os.path.expanduser(str(folder)))
    hf = read_hf_config(folder)
    config = config_from_hf(hf, dropout, where=str(folder / CONFIG_FILE))
    arrays = _read_weights(_weights_file(folder), config)
    if dtype is None:
        dtype = np.float64 if all(a.dtype == np.float64 for a in arrays.values()) else np.float32
    model = GPT(config).to(device, tl.as_dtype(dtype))
    model.load_state_dict(hf_to_state_dict(arrays, config))
    return model.eval()


def load_hf_tokenizer(folder: str | os.PathLike):
    """The tokenizer of a model folder: the file config.json's "tensorlite" section names (a
    folder `save_pretrained` wrote; with its chat tokens, if any), else tokenizer.json as an
    `HFTokenizer`."""
    from gpt.data.tokenizer import load_tokenizer
    folder = Path(os.path.expanduser(str(folder)))
    section = (_read_json(folder / CONFIG_FILE).get(_SECTION) or {}) \
        if (folder / CONFIG_FILE).is_file() else {}
    spec = section.get("tokenizer") if isinstance(section, dict) else None
    if spec:
        file = spec.get("file") if isinstance(spec, dict) else None
        if not isinstance(file, str) or file != os.path.basename(file) or file.startswith("."):
            raise HFError(f"{folder / CONFIG_FILE}: \"{_SECTION}\".tokenizer.file {file!r} is "
                          "not a file name in the folder")
        if not (folder / file).is_file():
            raise HFError(f"{folder / file} is missing; config.json says the tokenizer is there")
        base = HFTokenizer.from_folder(folder, file) if spec.get("kind") == HFTokenizer.kind \
            else load_tokenizer(folder / file)
        return _with_chat_tokens(base, section.get("chat_tokens"), folder)
    path = folder / HF_TOKENIZER_FILE
    if not path.is_file():
        raise HFError(f"{folder} holds no {HF_TOKENIZER_FILE}; get it with {_DOWNLOAD_HINT}")
    return HFTokenizer.from_folder(folder)


def _with_chat_tokens(base, chat: dict | None, folder: Path):
    if not chat:
        return base
    from .align.template import SPECIALS, ChatTokenizer
    if not isinstance(chat, dict) or chat.get("specials") != list(SPECIALS) or \
            chat.get("base_vocab_size") != base.vocab_size:
        raise HFError(f"{folder / CONFIG_FILE}: \"{_SECTION}\".chat_tokens {chat!r} do not fit "
                      f"this version's chat template {list(SPECIALS)} on a {base.vocab_size}-id "
                      "tokenizer")
    return ChatTokenizer(base)


def load_hf_folder(folder: str | os.PathLike, device: str = "cpu", dtype=None,
                   dropout: float | None = None):
    """(model, tokenizer) of a Hugging Face GPT-2 folder (see `load_pretrained` and
    `load_hf_tokenizer`); a tokenizer with more ids than the model's vocabulary is refused."""
    model = load_pretrained(folder, device, dtype, dropout)
    tok = load_hf_tokenizer(folder)
    if tok.vocab_size > model.config.vocab_size:
        raise HFError(f"{folder}: the tokenizer has {tok.vocab_size} ids but the model's "
                      f"vocabulary only {model.config.vocab_size}; the folder's files do not "
                      "belong together")
    return model, tok


# ============================================================================ writing a folder
def gpt2_incompatibilities(model) -> list[str]:
    """Every reason ``model`` cannot be written as a GPT-2 (empty when it can)."""
    from nn.layers import LayerNorm

    from .model import GPT
    if not isinstance(model, GPT):
        return [f"it is a {type(model).__name__}, not a tensorlite GPT"]
    c, out = model.config, []
    if c.positional != "learned":
        out.append(f"positional {c.positional!r}: GPT-2 has learned absolute positions (wpe)")
    if not c.norm_first:
        out.append("post-LN blocks (norm_first=False): GPT-2 is pre-LN, with a final ln_f")
    if not c.bias:
        out.append("no biases (bias=False): GPT-2's projections and LayerNorms have biases")
    if not c.tie_weights or model.lm_head is not None:
        out.append("an untied LM head (tie_weights=False): GPT-2's head is the token "
                   "embedding wte")
    acts, norms, eps, widths, other_attn = {}, {}, {}, {}, []
    for i, block in enumerate(model.blocks):
        mlp = getattr(block, "mlp", None)
        act = getattr(mlp, "activation", None)
        if act != "gelu_tanh":
            acts.setdefault(act, []).append(i)
        fc = getattr(mlp, "fc", None)
        if getattr(fc, "out_features", 4 * c.d_model) != 4 * c.d_model:
            widths.setdefault(fc.out_features, []).append(i)
        for name in ("ln1", "ln2"):
            ln = getattr(block, name, None)
            if not isinstance(ln, LayerNorm):
                norms.setdefault(type(ln).__name__, []).append(i)
            elif ln.eps != c.layer_norm_eps:
                eps.setdefault(ln.eps, []).append(i)
        attn = getattr(block, "attn", None)
        if not getattr(attn, "causal", True) or (   # rope: already said by positional
                getattr(attn, "rotary", None) is not None and c.positional != "rope"):
            other_attn.append(i)
    for act, blocks in acts.items():
        out.append(f"MLP activation {act!r} in blocks {blocks}: GPT-2 uses GELU's tanh "
                   "approximation (gelu_new)")
    for width, blocks in widths.items():
        out.append(f"MLP width {width} in blocks {blocks}: GPT-2's is 4 x n_embd = {4 * c.d_model}")
    for kind, blocks in norms.items():
        out.append(f"{kind} norms in blocks {blocks}: GPT-2 uses LayerNorm")
    if isinstance(model.ln_f, LayerNorm) and model.ln_f.eps != c.layer_norm_eps:
        eps.setdefault(model.ln_f.eps, []).append("ln_f")
    for e, where in eps.items():
        out.append(f"LayerNorm eps {e} in {where}, not the config's {c.layer_norm_eps}: "
                   "GPT-2 has one layer_norm_epsilon")
    if other_attn:
        out.append(f"non-causal or rotary attention in blocks {other_attn}")
    if not out:      # a GPT whose layers were swapped (a tensor-parallel shard, say)
        expected = {tl_name: shape[::-1] if t else shape for _, tl_name, shape, t in name_map(c)}
        found = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        odd = [f"{k} {found.get(k)}" for k in sorted(set(expected) | set(found))
               if expected.get(k) != found.get(k)]
        if odd:
            out.append("parameters that are not a whole single-process GPT's (a tensor-"
                       "parallel shard?): " + ", ".join(odd[:8]) + (" ..." if len(odd) > 8 else ""))
    return out


def state_dict_to_hf(state: dict, config) -> dict:
    """tensorlite's state_dict (arrays or Tensors) -> GPT-2's names and (in, out) layouts,
    contiguous NumPy arrays ready for safetensors."""
    from tensorlite import backend
    from tensorlite.tensor import Tensor
    out = {}
    for hf, tl_name, _, transposed in name_map(config):
        v = state[tl_name]
        arr = backend.to_numpy(v.data if isinstance(v, Tensor) else v)
        out[hf] = np.ascontiguousarray(arr.T if transposed else arr)
    return out


def _tokenizer_spec(tokenizer) -> tuple[dict | None, dict | None, object]:
    """(tokenizer section, chat_tokens section, the base tokenizer to write) for config.json."""
    if tokenizer is None:
        return None, None, None
    from gpt.data.tokenizer import ByteTokenizer, SentencePieceTokenizer

    from .align.template import SPECIALS, ChatTokenizer
    chat, base = None, tokenizer
    if isinstance(tokenizer, ChatTokenizer):
        base = tokenizer.base
        chat = {"specials": list(SPECIALS), "base_vocab_size": base.vocab_size,
                "ids": dict(tokenizer.special_ids)}
    if isinstance(base, HFTokenizer):
        file = HF_TOKENIZER_FILE
    elif isinstance(base, SentencePieceTokenizer):
        file = SP_TOKENIZER_FILE
    elif isinstance(base, ByteTokenizer):
        file = BYTE_TOKENIZER_FILE
    else:
        raise HFError(f"save_pretrained: cannot write a {type(base).__name__} (kind "
                      f"{getattr(base, 'kind', None)!r}); pass an HFTokenizer, a sentencepiece "
                      "or byte tokenizer, or tokenizer=None")
    return {"kind": base.kind, "file": file}, chat, base


def config_to_hf(config, tokenizer=None, dtype: str = "float32") -> dict:
    """A GPT-2 config.json (a dict) for a GPTConfig; bos/eos/pad ids from ``tokenizer``
    (null when unknown: -1 or no tokenizer); its "tensorlite" section names the tokenizer."""
    spec, chat, _ = _tokenizer_spec(tokenizer)

    def token_id(role):
        i = getattr(tokenizer, f"{role}_id", -1) if tokenizer is not None else -1
        return int(i) if i is not None and i >= 0 else None

    c = config
    hf = {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
          "vocab_size": c.vocab_size, "n_positions": c.block_size, "n_ctx": c.block_size,
          "n_embd": c.d_model, "n_layer": c.n_layer, "n_head": c.n_head, "n_inner": None,
          "activation_function": "gelu_new", "layer_norm_epsilon": c.layer_norm_eps,
          "resid_pdrop": c.dropout, "embd_pdrop": c.dropout, "attn_pdrop": c.dropout,
          "initializer_range": 0.02, "scale_attn_weights": True, "tie_word_embeddings": True,
          "use_cache": True, "bos_token_id": token_id("bos"), "eos_token_id": token_id("eos"),
          "torch_dtype": dtype}
    pad = token_id("pad")
    if pad is not None and pad != hf["eos_token_id"]:
        hf["pad_token_id"] = pad
    hf[_SECTION] = {"format": _SECTION_FORMAT, "version": 1, "tokenizer": spec}
    if chat:
        hf[_SECTION]["chat_tokens"] = chat
    return hf


# what a model folder holds: what save_pretrained writes, and what a Hugging Face snapshot
# of a GPT-2 model commonly has beside it
_EXPORT_FILES = {"config.json", "model.safetensors", "tokenizer.json", "tokenizer.model",
                 "tensorlite_tokenizer.json", "tokenizer_config.json", "vocab.json",
                 "merges.txt", "special_tokens_map.json", "generation_config.json", "README.md",
                 ".gitattributes"}


def _holds_tensorlite_run(path: Path) -> bool:
    from gpt.data.prepare import looks_prepared
    return (path / "ckpt").exists() or (path / "log.jsonl").exists() or looks_prepared(path)


def _write_bytes(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _save_weights(arrays: dict, path: Path) -> None:
    """The one place that writes the safetensors file (tests replace it to simulate a crash)."""
    import safetensors.numpy as stn
    from nn.checkpoint import readable_as_umask
    stn.save_file(arrays, str(path), metadata={"format": "pt"})
    readable_as_umask(str(path))


def save_pretrained(model, folder: str | os.PathLike, tokenizer=None,
                    overwrite: bool = False) -> Path:
    """Write ``model`` (and ``tokenizer``) as a Hugging Face GPT-2 folder; returns it.

    A model GPT-2 cannot express is refused with every reason (`gpt2_incompatibilities`).
    ``folder`` must not exist, or be empty, unless ``overwrite``; a tensorlite run or data
    folder is never overwritten. The folder appears complete or not at all (see the module
    docstring for what is written and who can read it)."""
    reasons = gpt2_incompatibilities(model)
    if reasons:
        raise HFError(f"save_pretrained: this model cannot be written as GPT-2 ({len(reasons)} "
                      "reason" + ("s" if len(reasons) > 1 else "") + "): " + "; ".join(reasons))
    c = model.config
    if tokenizer is not None and tokenizer.vocab_size > c.vocab_size:
        raise HFError(f"save_pretrained: the tokenizer has {tokenizer.vocab_size} ids but the "
                      f"model's vocabulary only {c.vocab_size}; pass the model's own tokenizer")
    if not str(folder).strip():
        raise HFError("the folder to write is empty; name one")
    target = Path(os.path.expanduser(str(folder)))
    if os.path.abspath(target) in (os.getcwd(), os.path.abspath(os.sep)):
        raise HFError(f"{folder} is the current (or root) folder; name a new folder to write "
                      "the model into")
    if target.exists():
        if not target.is_dir():
            raise HFError(f"{target} is a file; pass a folder to write the model into")
        if _holds_tensorlite_run(target):
            raise HFError(f"{target} holds a tensorlite run or prepared data; write the Hugging "
                          "Face folder somewhere else")
        held = sorted(os.listdir(target))
        if held and not overwrite:
            shown = ", ".join(held[:6]) + (" ..." if len(held) > 6 else "")
            raise HFError(f"{target} is not empty (it holds {shown}); pass overwrite=True "
                          "(--overwrite) to replace it, or choose another folder")
        others = [n for n in held if n not in _EXPORT_FILES]
        if others:       # overwrite replaces a model folder, never a user's other files
            shown = ", ".join(others[:6]) + (" ..." if len(others) > 6 else "")
            raise HFError(f"{target} holds files that are not a model's ({shown}); overwrite "
                          "only replaces a folder of config.json, model.safetensors and a "
                          "tokenizer: choose another folder")

    # everything in memory and checked before the first write
    _, _, base_tok = _tokenizer_spec(tokenizer)
    arrays = state_dict_to_hf(model.state_dict(), c)
    dtype = str(next(iter(arrays.values())).dtype)
    hf = config_to_hf(c, tokenizer, dtype)
    config_text = json.dumps(hf, indent=2, allow_nan=False) + "\n"

    parent = Path(os.path.abspath(target)).parent     # beside the target: renames stay in one folder
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise HFError(f"cannot create {parent} for {target}: {e.strerror or e}; choose "
                      "another folder") from None
    tmp = parent / f"{_TMP_PREFIX}{target.name}-{secrets.token_hex(4)}"
    old = None
    try:
        tmp.mkdir()
        _save_weights(arrays, tmp / WEIGHTS_FILE)
        fsync_path(str(tmp / WEIGHTS_FILE))
        if base_tok is not None:
            base_tok.save(tmp / hf[_SECTION]["tokenizer"]["file"])
        _write_bytes(tmp / CONFIG_FILE, config_text.encode("utf-8"))
        fsync_path(str(tmp))
        if target.exists():
            if os.listdir(target):             # overwrite: move the old folder aside first
                old = parent / f"{_TMP_PREFIX}{target.name}-old-{secrets.token_hex(4)}"
                os.rename(target, old)
            else:
                os.rmdir(target)
        os.rename(tmp, target)                 # the commit
        fsync_path(str(parent))
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and not target.exists():
            os.rename(old, target)             # put the old folder back
            old = None
        if isinstance(e, OSError):
            raise HFError(f"could not write {target}: {e.strerror or e}; choose another "
                          "folder") from None
        raise
    if old is not None:
        if old.is_symlink():
            old.unlink()
        else:
            shutil.rmtree(old, ignore_errors=True)
    return target


def export_run(out: str | os.PathLike, folder: str | os.PathLike, which: str | None = None,
               overwrite: bool = False, say=print) -> Path:
    """Write the trained run in ``out`` (its ``which`` checkpoint: best, else latest; see
    gpt.run_folder.pick_checkpoint) and its tokenizer as a Hugging Face GPT-2 ``folder``."""
    from .run_folder import load_run
    model, tok, _ = load_run(out, which, "cpu", say)
    return save_pretrained(model, folder, tokenizer=tok, overwrite=overwrite)
