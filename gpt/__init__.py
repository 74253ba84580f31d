"""gpt: a GPT and everything around it, from raw text to a chat model.

    from gpt import GPT, GPTConfig, TrainConfig, train, prepare, load_tokenizer, load_run

    model = GPT(GPTConfig(vocab_size=4096, n_layer=4, n_head=4, d_model=128, block_size=128))
    prepare(None, "data/stdlib")                       # the standard library, cleaned, tokenized
    train(TrainConfig.from_dict({"data": "data/stdlib", "out": "runs/gpt", "max_steps": 500}))
    model, tok, meta = load_run("runs/gpt")            # a trained run: model, tokenizer, meta
    ids = model.generate([tok.encode("def ")], 100, temperature=0.8)

The names are imported on first use, except ``train``: the function shares its name with
the module ``gpt.train``, which would otherwise shadow it once imported.
"""
from __future__ import annotations

import importlib

from .train import train  # noqa: F401  (the function, not the module)

_NAMES = {
    "GPT": "gpt.model", "GPTConfig": "gpt.model", "PRESETS": "gpt.model",
    "TrainConfig": "gpt.config", "SFTConfig": "gpt.config", "DPOConfig": "gpt.config",
    "train": "gpt.train", "Trainer": "gpt.train",   # train itself: imported above
    "prepare": "gpt.data.prepare",
    "load_tokenizer": "gpt.data.tokenizer", "train_tokenizer": "gpt.data.tokenizer",
    "load_run": "gpt.run_folder",
    "sft": "gpt.align.sft", "dpo": "gpt.align.dpo",
    "ChatTokenizer": "gpt.align.template",
}

__all__ = sorted(_NAMES)


def __getattr__(name: str):
    if name not in _NAMES:
        raise AttributeError(f"module 'gpt' has no attribute {name!r}")
    value = getattr(importlib.import_module(_NAMES[name]), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_NAMES))
