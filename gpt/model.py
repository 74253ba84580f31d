"""GPT: token embedding + positions -> transformer blocks -> final norm -> LM head.

The architecture of GPT-2 (Radford et al. 2019) by default: learned positions, pre-LN blocks,
GELU (tanh) MLP, a final LayerNorm, and an LM head that shares the token embedding's matrix.
Options swap in the original transformer's pieces (post-LN, sinusoidal positions) or
Llama's rotary positions.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import numpy as np

import nn
import tensorlite as tl
from nn import functional as F
from tensorlite.tensor import Tensor

POSITIONAL = ("learned", "sinusoidal", "rope")


class ConfigError(ValueError):
    """A model configuration the user can fix (the CLI prints it as one line)."""


def _opt(default, help, **more):
    """A field with the help text the CLI shows for it (gpt.config derives the options)."""
    return field(default=default, metadata={"help": help, **more})


@dataclass
class GPTConfig:
    vocab_size: int = _opt(4096, "tokens in the vocabulary (from the tokenizer)", cli=False)
    block_size: int = _opt(128, "context length in tokens")
    n_layer: int = _opt(4, "transformer blocks")
    n_head: int = _opt(4, "attention heads")
    d_model: int = _opt(128, "width of the residual stream")
    dropout: float = _opt(0.0, "dropout probability")
    bias: bool = _opt(True, "no biases in linear layers and norms", flag="no_bias")
    norm_first: bool = _opt(True, "post-LN blocks (LayerNorm(x + Sublayer(x)), the original "
                                  "transformer) instead of pre-LN (GPT-2)", flag="post_ln")
    positional: str = _opt("learned", " | ".join(POSITIONAL))
    tie_weights: bool = _opt(True, "a separate LM head instead of the token embedding's "
                                   "matrix", flag="untied")
    # GPT-2's value and nn.LayerNorm's default, so configs saved before this field existed
    # build the same model; a Hugging Face config.json may set another (layer_norm_epsilon)
    layer_norm_eps: float = _opt(1e-5, "epsilon of every LayerNorm (GPT-2: 1e-5)")
    extra: dict = field(default_factory=dict, metadata={"cli": False})

    def __post_init__(self):
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "d_model"):
            v = getattr(self, name)
            if not isinstance(v, int) or v <= 0:
                raise ConfigError(f"GPTConfig: {name} must be a positive int, got {v!r}")
        if self.d_model % self.n_head:
            raise ConfigError(f"GPTConfig: d_model {self.d_model} is not divisible by n_head "
                              f"{self.n_head}; pick d_model = n_head * head_dim")
        if self.positional not in POSITIONAL:
            raise ConfigError(f"GPTConfig: positional must be one of {POSITIONAL}, got "
                              f"{self.positional!r}")
        if self.positional == "rope" and (self.d_model // self.n_head) % 2:
            raise ConfigError(f"GPTConfig: rope needs an even head size, got "
                              f"{self.d_model // self.n_head}")
        if not (isinstance(self.dropout, (int, float)) and 0.0 <= self.dropout < 1.0):
            raise ConfigError(f"GPTConfig: dropout must be in [0, 1), got {self.dropout}")
        eps = self.layer_norm_eps
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0.0 < eps < 1.0:
            raise ConfigError(f"GPTConfig: layer_norm_eps must be a number in (0, 1), got "
                              f"{eps!r}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "GPTConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"GPTConfig: unknown fields {unknown}")
        return cls(**d)


PRESETS = {
    "tiny": dict(n_layer=4, n_head=4, d_model=128, block_size=128),
    "small": dict(n_layer=6, n_head=6, d_model=384, block_size=256),
    "medium": dict(n_layer=8, n_head=8, d_model=512, block_size=256),
}


def preset(name: str, **overrides) -> GPTConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}")
    return GPTConfig(**{**PRESETS[name], **overrides})


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        c = self.config = config
        self.wte = nn.Embedding(c.vocab_size, c.d_model)
        rotary = None
        if c.positional == "learned":
            self.wpe = nn.LearnedPositionalEmbedding(c.block_size, c.d_model)
        elif c.positional == "sinusoidal":
            self.wpe = nn.SinusoidalPositionalEncoding(c.d_model, c.block_size)
        else:
            self.wpe = None
            rotary = nn.RotaryEmbedding(c.d_model // c.n_head, c.block_size)
        self.drop = nn.Dropout(c.dropout)
        self.blocks = nn.ModuleList([
            nn.TransformerBlock(c.d_model, c.n_head, 4 * c.d_model, dropout=c.dropout, bias=c.bias,
                                norm_first=c.norm_first, activation="gelu_tanh", rotary=rotary)
            for _ in range(c.n_layer)])
        for block in self.blocks:
            block.ln1.eps = block.ln2.eps = c.layer_norm_eps
        # post-LN blocks already end in a norm; pre-LN needs one before the head (GPT-2)
        self.ln_f = nn.LayerNorm(c.d_model, eps=c.layer_norm_eps, bias=c.bias) \
            if c.norm_first else nn.Identity()
        self.lm_head = None if c.tie_weights else nn.Linear(c.d_model, c.vocab_size, bias=False)
        self._init_weights()

    def _init_weights(self):
        """GPT-2: N(0, 0.02) everywhere, residual projections N(0, 0.02 / sqrt(2 * n_layer))
        so the residual stream's variance does not grow with depth; biases 0, norms 1."""
        with tl.no_grad():
            for name, p in self.named_parameters():
                if name.endswith("bias"):
                    p.zero_()
                elif ".ln" in name or name.startswith("ln_f"):
                    p.fill_(1.0)
                elif name.endswith("attn.proj.weight") or name.endswith("mlp.proj.weight"):
                    p.normal_(0.0, 0.02 / math.sqrt(2 * self.config.n_layer))
                else:
                    p.normal_(0.0, 0.02)

    # -- Hugging Face GPT-2 folders (gpt/hf.py) -------------------------------------------------
    @classmethod
    def from_pretrained(cls, folder, device: str = "cpu", dtype=None, dropout=None) -> "GPT":
        """The GPT-2 in a Hugging Face folder (config.json + model.safetensors; nothing is
        downloaded), in eval mode; its tokenizer is ``gpt.hf.load_hf_tokenizer(folder)``.
        See gpt.hf.load_pretrained."""
        from .hf import load_pretrained
        return load_pretrained(folder, device=device, dtype=dtype, dropout=dropout)

    def save_pretrained(self, folder, tokenizer=None, overwrite: bool = False):
        """Write this model (and ``tokenizer``) as a Hugging Face GPT-2 folder, atomically;
        a model GPT-2 cannot express is refused with every reason. See gpt.hf.save_pretrained."""
        from .hf import save_pretrained
        return save_pretrained(self, folder, tokenizer=tokenizer, overwrite=overwrite)

    # -- sizes ------------------------------------------------------------------------------
    def num_parameters(self, non_embedding: bool = False) -> int:
        """Parameter count; ``non_embedding`` leaves out the position table (as nanoGPT)."""
        n = super().num_parameters()
        if non_embedding and isinstance(self.wpe, nn.LearnedPositionalEmbedding):
            n -= self.wpe.weight.numel()
        return n

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token, 6N + 12 L T d (PaLM appendix B): 6N for the forward and
        backward matmuls with the weights, 12 L T d for attention's scores and mixing."""
        c = self.config
        t = seq_len or c.block_size
        return 6 * self.num_parameters(non_embedding=True) + 12 * c.n_layer * t * c.d_model

    # -- forward ------------------------------------------------------------------------------
    def forward(self, idx, targets=None, kv_caches=None):
        """idx: (B, T) token ids -> logits (B, T, V), and with targets (B, T) the mean
        cross-entropy. kv_caches: one nn.KVCache per block (``new_kv_caches()``), for
        incremental decoding under tl.no_grad(): the T new positions follow the cached ones."""
        if kv_caches is not None and len(kv_caches) != len(self.blocks):
            raise ValueError(f"GPT: {len(kv_caches)} KV caches for {len(self.blocks)} blocks; "
                             f"make them with new_kv_caches()")
        if not isinstance(idx, Tensor):
            idx = tl.tensor(np.asarray(idx), device=self.wte.weight.device)
        if idx.ndim != 2:
            raise ValueError(f"GPT: idx must be (batch, time) token ids, got shape {idx.shape}")
        b, t = idx.shape
        offset = kv_caches[0].length if kv_caches else 0
        if offset + t > self.config.block_size:
            raise ValueError(f"GPT: {offset + t} positions exceed block_size "
                             f"{self.config.block_size}; crop the input to the last "
                             f"{self.config.block_size} tokens")
        x = self.wte(idx)                                          # (B, T, C)
        if self.wpe is not None:
            x = x + self.wpe(t, offset)                            # + (T, C)
        x = self.drop(x)
        for i, block in enumerate(self.blocks):
            x = block(x, kv_cache=kv_caches[i] if kv_caches else None)
        return self.logits_and_loss(self.ln_f(x), targets)

    def logits_and_loss(self, x, targets=None):
        """The final hidden states (B, T, C) -> logits (B, T, V) from the LM head, and with
        targets (B, T) the mean cross-entropy. (Tensor parallelism swaps in its vocab-parallel
        head and loss here: parallel.tensor_parallel_.)"""
        head = self.wte.weight if self.lm_head is None else self.lm_head.weight
        logits = F.linear(x, head)                                 # (B, T, V)
        if targets is None:
            return logits, None
        return logits, F.cross_entropy(logits, targets)

    # -- pipeline parallelism ----------------------------------------------------------------
    def pipeline_pieces(self):
        """The model as the ordered pieces a pipeline cuts into stages (parallel.build_stage):
        ``first(idx) -> h`` (embeddings), the blocks, ``last(h, targets) -> loss`` (final norm,
        head, cross-entropy), and the weights first and last share (the tied embedding). The
        pieces hold this model's own modules, so a stage trains the model in place."""
        tied = [self.wte.weight] if self.lm_head is None else []
        return _Embed(self), list(self.blocks), _Head(self), tied

    # -- generation ----------------------------------------------------------------------------
    def new_kv_caches(self):
        """One empty nn.KVCache per block, each for up to block_size positions."""
        return [nn.KVCache(self.config.block_size) for _ in self.blocks]

    def generate_stream(self, idx, max_new_tokens: int, temperature: float = 1.0,
                        top_k: int | None = None, top_p: float | None = None, seed=None,
                        use_cache: bool = True):
        """Yield (B,) arrays of new token ids, one step at a time.

        With ``use_cache`` each step runs only the new token through the blocks, reusing the
        keys/values of earlier positions. Past block_size tokens the context window slides and
        every step recomputes the last block_size tokens, exactly as the uncached path does.
        """
        _check_sampling(temperature, top_k, top_p, max_new_tokens)
        was_training = self.training
        self.eval()
        try:
            rng = np.random.default_rng(seed) if seed is not None else \
                np.random.default_rng(tl.default_generator.np.integers(2**63))
            ids = _prompt_ids(idx)
            if ids.shape[1] == 0:
                raise ValueError("generate: the prompt is empty; give at least one token "
                                 "(e.g. the BOS id)")
            bs = self.config.block_size
            caches, pending = None, None
            for _ in range(max_new_tokens):
                with tl.no_grad():  # not around the yield: the caller's grad mode is its own
                    if use_cache and caches is not None and caches[0].length < bs:
                        logits, _ = self.forward(pending[:, None], kv_caches=caches)
                    else:
                        window = ids[:, -bs:]
                        caches = self.new_kv_caches() if use_cache and ids.shape[1] < bs else None
                        logits, _ = self.forward(window, kv_caches=caches)
                last = tl.backend.to_numpy(logits.data[:, -1, :])   # (B, V)
                nxt = sample_next(last, temperature, top_k, top_p, rng)
                ids = np.concatenate([ids, nxt[:, None]], axis=1)
                pending = nxt
                yield nxt
        finally:
            self.train(was_training)

    def generate(self, idx, max_new_tokens: int, temperature: float = 1.0, top_k=None,
                 top_p=None, seed=None, use_cache: bool = True) -> np.ndarray:
        """(B, T) prompt ids -> (B, T + max_new_tokens) ids. temperature 0 means greedy."""
        ids = _prompt_ids(idx)
        new = list(self.generate_stream(ids, max_new_tokens, temperature, top_k, top_p, seed,
                                        use_cache))
        return np.concatenate([ids] + [n[:, None] for n in new], axis=1) if new else ids


class _Embed(nn.Module):
    """GPT.forward's first lines, as a pipeline's first piece: (B, T) ids -> (B, T, C)."""

    def __init__(self, gpt: GPT):
        super().__init__()
        self.wte, self.wpe, self.drop = gpt.wte, gpt.wpe, gpt.drop

    def forward(self, idx):
        x = self.wte(idx)
        if self.wpe is not None:
            x = x + self.wpe(idx.shape[1])
        return self.drop(x)


class _Head(nn.Module):
    """GPT.forward's last lines, as a pipeline's last piece: (B, T, C), targets -> loss.
    The head and loss are the model's own ``logits_and_loss`` (the vocab-parallel ones under
    tensor parallelism), taken when the pieces are cut."""

    def __init__(self, gpt: GPT):
        super().__init__()
        self.ln_f = gpt.ln_f
        self.wte = gpt.wte if gpt.lm_head is None else None       # the tied matrix
        self.lm_head = gpt.lm_head
        self.__dict__["_logits_and_loss"] = gpt.logits_and_loss   # a method, not a child

    def forward(self, h, targets):
        return self._logits_and_loss(self.ln_f(h), targets)[1]


def _prompt_ids(idx) -> np.ndarray:
    """A prompt (list, array or Tensor; (T,) or (B, T)) as a (B, T) int64 array."""
    ids = np.asarray(idx.numpy() if isinstance(idx, Tensor) else idx, dtype=np.int64)
    return ids[None] if ids.ndim == 1 else ids


def _check_sampling(temperature, top_k, top_p, max_new_tokens):
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")


def sample_next(logits: np.ndarray, temperature: float, top_k, top_p, rng) -> np.ndarray:
    """logits (B, V) -> (B,) ids. Greedy at temperature 0; otherwise softmax(logits / T)
    restricted to the top_k ids and/or the smallest set whose probability reaches top_p."""
    logits = logits.astype(np.float64)
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = np.partition(logits, -top_k, axis=-1)[:, -top_k][:, None]
        logits = np.where(logits < kth, -np.inf, logits)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    if top_p is not None and top_p < 1.0:
        order = np.argsort(-p, axis=-1)
        sorted_p = np.take_along_axis(p, order, -1)
        # keep an id if the probability mass before it is still below top_p
        keep_sorted = (np.cumsum(sorted_p, -1) - sorted_p) < top_p
        keep = np.zeros_like(keep_sorted)
        np.put_along_axis(keep, order, keep_sorted, -1)
        p = np.where(keep, p, 0.0)
        p /= p.sum(-1, keepdims=True)
    u = rng.random((p.shape[0], 1))
    return np.minimum((np.cumsum(p, -1) < u).sum(-1), p.shape[-1] - 1)
