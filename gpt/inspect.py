"""Look inside a GPT: what a trained model computes on a prompt, and how healthy training is.

On a prompt (one forward pass, no graph, eval mode):

    attention_maps(model, ids)      (L, H, T, T)   the attention probabilities of every head
    logit_lens(model, ids)          (L+1, T, V)    next-token logits read from the residual
                                                   stream after the embeddings and each block,
                                                   through the final norm and the LM head
    activation_stats(model, ids)    dict           per-layer residual norm, norm-input scale,
                                                   GELU flat-region fraction, attention entropy
    next_token_topk(model, ids, k)  (T, k) x 2     the model's own top-k next tokens

During training (every N steps, see ``TrainingHealth``): gradient norms per layer and per kind
of parameter, read from ``.grad``; update-to-weight ratios, from the weights before and after
the optimizer's step; the activation statistics above on a fixed probe sequence.

Pictures: ``write_report`` (a folder of PNGs and a self-contained index.html) and
``plot_internals`` (internals.png from the records in log.jsonl). Every number drawn comes
from one of the array-returning functions here, and the tests check those.

How the insides are observed: each block, norm and MLP input layer is tapped by wrapping
its module's ``forward`` for the one pass (and put back after it), and the attention
probabilities come from ``MultiHeadAttention.keep_weights``. Nothing in the model changes.
These are single-process tools: a tensor-parallel layer would show its own heads only.
"""
from __future__ import annotations

import contextlib
import html
import json
import math
import os
import secrets
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

import tensorlite as tl
from tensorlite import backend
from tensorlite.tensor import Tensor

from .run_folder import TrainingError, run_status

# GELU's "flat region": inputs x < FLAT_BELOW. There GELU(x) = x Phi(x) lies in
# (-0.0041, 0) and its slope GELU'(x) = Phi(x) + x phi(x) in (-0.012, 0): the unit is off and
# passes almost no gradient back (a unit that stays there for every input is dead).
FLAT_BELOW = -3.0


class InspectError(TrainingError):
    """A report that cannot be written where asked (the CLI prints it as one line)."""


# ----------------------------------------------------------------------------- one pass
@contextlib.contextmanager
def _tapped(taps):
    """Run ``fn(args, out)`` after each ``module``'s forward, for (module, fn) in taps, by
    wrapping the module's forward on the instance while the block runs."""
    saved = []
    try:
        for module, fn in taps:
            before = module.__dict__.get("forward", None)
            inner = module.forward

            def wrapper(*args, _inner=inner, _fn=fn, **kwargs):
                out = _inner(*args, **kwargs)
                _fn(args, out)
                return out
            object.__setattr__(module, "forward", wrapper)
            saved.append((module, before))
        yield
    finally:
        for module, before in reversed(saved):
            if before is None:
                module.__dict__.pop("forward", None)
            else:
                object.__setattr__(module, "forward", before)


@dataclass
class Internals:
    """What one forward pass of a GPT on ``ids`` (B, T) computed, as NumPy arrays.

    residual[l]      (B, T, C)     the residual stream after l blocks (l = 0: the embeddings)
    norm_inputs[i]   2 x (B, T, C) the inputs of block i's two norms (ln1, ln2)
    mlp_inputs[i]    (B, T, F)     the activation's inputs in block i's MLP (fc's outputs)
    attention[i]     (B, H, T, T)  block i's attention probabilities (row: query, col: key)
    logits           (B, T, V)     the model's output
    lens             (L+1, B, T, V) or None: the LM head applied to each residual[l]
    """
    ids: np.ndarray
    residual: list
    norm_inputs: list
    mlp_inputs: list
    attention: list
    logits: np.ndarray
    lens: np.ndarray | None


def _as_ids(ids) -> np.ndarray:
    a = np.asarray(ids.numpy() if isinstance(ids, Tensor) else ids)
    if a.ndim == 1:
        a = a[None]
    if a.ndim != 2 or a.shape[1] == 0 or a.dtype.kind not in "iu":
        raise ValueError(f"expected token ids of shape (T,) or (B, T) with T >= 1, got an "
                         f"array of shape {a.shape} and dtype {a.dtype}")
    return a.astype(np.int64)


def _one_sequence(ids, what: str) -> np.ndarray:
    a = _as_ids(ids)
    if a.shape[0] != 1:
        raise ValueError(f"{what}: one sequence at a time ((T,) or (1, T) ids), got a batch of "
                         f"{a.shape[0]}")
    return a


def record(model, ids, lens: bool = True) -> Internals:
    """One forward pass of ``model`` on ``ids`` ((T,) or (B, T)) under no_grad and in eval
    mode (no dropout), with everything ``Internals`` lists recorded; the model's mode and
    settings are as before afterwards."""
    ids = _as_ids(ids)
    blocks = list(model.blocks)
    n = len(blocks)
    residual, norm_inputs = [None] * (n + 1), [[None, None] for _ in range(n)]
    mlp_inputs = [None] * n

    def put(lst, i):
        return lambda args, out: lst.__setitem__(i, out.data)

    taps = []
    for i, blk in enumerate(blocks):
        if i == 0:
            taps.append((blk, lambda args, out: residual.__setitem__(0, args[0].data)))
        taps.append((blk, put(residual, i + 1)))
        taps.append((blk.ln1, lambda args, out, i=i: norm_inputs[i].__setitem__(0, args[0].data)))
        taps.append((blk.ln2, lambda args, out, i=i: norm_inputs[i].__setitem__(1, args[0].data)))
        taps.append((blk.mlp.fc, put(mlp_inputs, i)))
    attns = [blk.attn for blk in blocks]
    kept = [a.__dict__.get("keep_weights") for a in attns]
    was_training = model.training
    model.eval()
    try:
        for a in attns:
            a.keep_weights = True
        with tl.no_grad():
            with _tapped(taps):
                logits, _ = model(ids)
            attention = [a.last_weights for a in attns]
            lens_logits = None
            if lens:   # the same head the model applies to its last hidden state
                lens_logits = [model.logits_and_loss(model.ln_f(Tensor(h)))[0].data
                               for h in residual]
    finally:
        for a, k in zip(attns, kept):
            a.__dict__.pop("keep_weights", None)
            if k is None:
                a.__dict__.pop("last_weights", None)
            else:
                a.keep_weights = k
        model.train(was_training)
    np_ = backend.to_numpy
    return Internals(
        ids=ids, residual=[np_(r) for r in residual],
        norm_inputs=[[np_(a), np_(b)] for a, b in norm_inputs],
        mlp_inputs=[np_(m) for m in mlp_inputs], attention=[np_(a) for a in attention],
        logits=np_(logits.data),
        lens=None if lens_logits is None else np.stack([np_(x) for x in lens_logits]))


# ----------------------------------------------------------------------------- prompt views
def attention_maps(model, ids) -> np.ndarray:
    """(L, H, T, T): the attention probabilities of every layer and head on one sequence, as
    the attention op computed them: row t (a query) over the keys, each row summing to 1,
    zero above the diagonal (the causal mask)."""
    rec = record(model, _one_sequence(ids, "attention_maps"), lens=False)
    return np.stack([a[0] for a in rec.attention])


def logit_lens(model, ids) -> np.ndarray:
    """(L+1, T, V): the next-token logits read from the residual stream after the embeddings
    (row 0) and after each block (row l), through the final norm and the LM head
    (nostalgebraist's logit lens). Row L is the model's own output, exactly."""
    rec = record(model, _one_sequence(ids, "logit_lens"), lens=True)
    return rec.lens[:, 0]


def softmax(logits: np.ndarray) -> np.ndarray:
    """Probabilities over the last axis, in float64."""
    z = np.asarray(logits, dtype=np.float64)
    z = np.exp(z - z.max(-1, keepdims=True))
    return z / z.sum(-1, keepdims=True)


def top_k(logits: np.ndarray, k: int):
    """(ids, probs), each (..., k): the k most probable ids over the last axis, most probable
    first, and their probabilities (float64)."""
    if not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"top_k: k must be an int >= 1, got {k!r}")
    if logits.ndim > 2:     # one slice at a time: (L+1, T, V) of a large vocabulary is big
        parts = [top_k(x, k) for x in logits]
        return np.stack([i for i, _ in parts]), np.stack([p for _, p in parts])
    p = softmax(logits)
    k = min(int(k), p.shape[-1])
    idx = np.argsort(-p, axis=-1, kind="stable")[..., :k]
    return idx, np.take_along_axis(p, idx, -1)


def lens_target_probability(lens: np.ndarray, ids) -> np.ndarray:
    """(L+1, T-1): at each layer, the probability the lens gives the token that actually comes
    next in the prompt (position t's target is token t+1)."""
    ids = _one_sequence(ids, "lens_target_probability")[0]
    return np.stack([np.take_along_axis(softmax(x[:-1]), ids[1:, None], -1)[:, 0]
                     for x in lens])                            # layer by layer: (T-1, V) each


def next_token_topk(model, ids, k: int = 5):
    """(ids, probs), each (T, k): the model's k most probable next tokens at every position
    of one sequence, most probable first."""
    rec = record(model, _one_sequence(ids, "next_token_topk"), lens=False)
    return top_k(rec.logits[0], k)


def stats_of(rec: Internals, flat_below: float = FLAT_BELOW) -> dict:
    """The activation statistics of a recorded pass (see ``activation_stats``)."""
    f64 = np.float64
    res = np.array([np.linalg.norm(r.astype(f64), axis=-1).mean() for r in rec.residual])
    scale = np.array([[x.astype(f64).std(axis=-1).mean() for x in pair]
                      for pair in rec.norm_inputs])
    flat = np.array([(m < flat_below).mean() for m in rec.mlp_inputs])
    ent = []
    for a in rec.attention:                                     # (B, H, T, Tk)
        a = a.astype(f64)
        plogp = np.where(a > 0, a * np.log(np.where(a > 0, a, 1.0)), 0.0)
        ent.append(-plogp.sum(-1).mean(axis=(0, 2)))            # (H,)
    return {"residual_norm": res, "ln1_input_scale": scale[:, 0],
            "ln2_input_scale": scale[:, 1], "gelu_flat_fraction": flat,
            "attention_entropy": np.array(ent)}


def activation_stats(model, ids, flat_below: float = FLAT_BELOW) -> dict:
    """Per-layer statistics of one forward pass on ``ids`` ((T,) or (B, T)), averaged over
    the batch and the positions, as float64 arrays:

    residual_norm       (L+1,)  the L2 norm of the residual-stream vector at each position,
                                after the embeddings (0) and after each block
    ln1_input_scale,    (L,)    the standard deviation over the channels of the input of each
    ln2_input_scale             block's first and second norm: what LayerNorm divides by
    gelu_flat_fraction  (L,)    the fraction of the MLP's activation inputs x < flat_below
                                (default -3, where GELU(x) is in (-0.0041, 0) and its slope in
                                (-0.012, 0): the unit is off and passes almost no gradient)
    attention_entropy   (L, H)  the entropy (nats) of each head's attention row, averaged over
                                the query positions (row 0 sees only itself: entropy 0; a row
                                t at most log(t + 1), when it attends uniformly)
    """
    return stats_of(record(model, ids, lens=False), flat_below)


# ----------------------------------------------------------------------------- training
def layer_and_kind(name: str) -> tuple[str, str]:
    """A GPT parameter's layer ("embedding", "block 3", "head") and kind ("embedding",
    "attn.qkv", "attn.proj", "mlp.fc", "mlp.proj", "norm", "bias"), from its module path."""
    parts = name.split(".")
    if parts[0] == "blocks" and len(parts) > 2:
        layer, rest = f"block {parts[1]}", parts[2:]
    elif parts[0] in ("wte", "wpe"):
        layer, rest = "embedding", parts
    elif parts[0] in ("ln_f", "lm_head"):
        layer, rest = "head", parts
    else:
        layer, rest = parts[0], parts
    if rest[-1] == "bias" and not rest[0].startswith("ln"):
        kind = "bias"
    elif rest[0].startswith("ln"):
        kind = "norm"
    elif rest[0] in ("wte", "wpe", "lm_head"):
        kind = "embedding"
    else:
        kind = ".".join(rest[:-1]) or rest[-1]
    return layer, kind


def _sq(a) -> float:
    """The squared L2 norm of a backend array, accumulated in float64."""
    flat = a.reshape(-1).astype(backend.xp_of(a).float64)
    return float(flat @ flat)


class TrainingHealth:
    """Gradient norms, update-to-weight ratios and activation statistics of a model under
    training, for every N steps of a training loop:

        health = TrainingHealth(model)
        ...                                # forward and backward (and the gradient reduction)
        grads = health.measure_grads()     # before clipping: the gradients backward produced
        clip(); health.snapshot_weights()  # just before the optimizer's step
        opt.step()
        rec = health.finish(probe_ids)     # after the step -> a JSON-ready dict to log

    Layers and kinds as ``layer_and_kind``; a tied weight counts once, under its first name
    (GPT's tied embedding: "embedding", with the head's share of the gradient in it). The
    norm of a group is the L2 norm of its parameters concatenated; the update ratio of a group
    is ||W_after - W_before|| / ||W_before|| over the same concatenation. Cost on the steps it
    runs: one copy of the weights, a few reductions, and one forward pass on the probe.
    """

    def __init__(self, model, flat_below: float = FLAT_BELOW):
        self.model = model
        self.flat_below = flat_below
        self.params = [(n, p, *layer_and_kind(n)) for n, p in model.named_parameters()]
        self._grads = None
        self._before = None

    @staticmethod
    def _group_norms(pairs) -> dict:
        """{group: sqrt(sum of squares)} from (group, squared norm) pairs, first-seen order."""
        out: dict = {}
        for g, sq in pairs:
            out[g] = out.get(g, 0.0) + sq
        return {g: math.sqrt(v) for g, v in out.items()}

    def measure_grads(self) -> dict:
        """{"layer": {layer: norm}, "kind": {kind: norm}, "total": norm} of the current
        ``.grad``s (parameters without one are left out)."""
        sq = [(layer, kind, _sq(p.grad.data)) for _, p, layer, kind in self.params
              if p.grad is not None]
        self._grads = {"layer": self._group_norms((l, s) for l, _, s in sq),
                       "kind": self._group_norms((k, s) for _, k, s in sq),
                       "total": math.sqrt(sum(s for *_, s in sq))}
        return self._grads

    def snapshot_weights(self) -> None:
        """Copy the weights (call just before the optimizer's step)."""
        self._before = [p.data.copy() for _, p, _, _ in self.params]

    def update_ratios(self) -> dict:
        """{"layer": {layer: ratio}, "kind": {kind: ratio}} of the change since
        ``snapshot_weights`` (call after the step); forgets the snapshot."""
        if self._before is None:
            raise RuntimeError("TrainingHealth.update_ratios: call snapshot_weights() before "
                               "the optimizer's step first")
        du, w = [], []
        for (_, p, layer, kind), old in zip(self.params, self._before):
            d = p.data.astype(backend.xp_of(old).float64) - old
            du.append((layer, kind, _sq(d)))
            w.append((layer, kind, _sq(old)))
        self._before = None
        out = {}
        for key, i in (("layer", 0), ("kind", 1)):
            num = self._group_norms((t[i], t[2]) for t in du)
            den = self._group_norms((t[i], t[2]) for t in w)
            out[key] = {g: (num[g] / den[g] if den[g] > 0 else float("nan")) for g in num}
        return out

    def activations(self, probe_ids) -> dict:
        """``activation_stats`` on ``probe_ids`` as lists (JSON-ready)."""
        s = activation_stats(self.model, probe_ids, self.flat_below)
        return {k: v.tolist() for k, v in s.items()}

    def finish(self, probe_ids=None) -> dict:
        """The record of this step: the gradient norms measured before the step, the update
        ratios against the snapshot, and (with ``probe_ids``) the activation statistics."""
        rec = {}
        if self._grads is not None:
            rec["grad_norm"] = self._grads["layer"]
            rec["grad_norm_kind"] = self._grads["kind"]
            rec["grad_norm_total"] = self._grads["total"]
            self._grads = None
        if self._before is not None:
            u = self.update_ratios()
            rec["update_ratio"] = u["layer"]
            rec["update_ratio_kind"] = u["kind"]
        if probe_ids is not None:
            rec["activations"] = self.activations(probe_ids)
        return rec


# ----------------------------------------------------------------------------- pictures
def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save(fig, path: Path) -> Path:
    plt = _plt()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")        # a glyph missing from the font: drawn as a box
        fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def token_label(tokenizer, i: int) -> str:
    """A token as a short visible string: special ids by name, a space as '␣', control
    characters escaped, a byte that is not a whole character as <0xNN>."""
    i = int(i)
    for name in ("bos", "eos", "pad"):
        if getattr(tokenizer, f"{name}_id", None) == i:
            return f"<{name}>"
    if hasattr(tokenizer, "id_to_piece"):
        s = tokenizer.id_to_piece(i).replace("\u2581", "\u2423")   # sentencepiece's space mark
    else:
        s = tokenizer.decode([i])
        if s == "" or "\ufffd" in s:
            return f"<0x{i:02X}>" if i < 256 else f"<{i}>"
        s = s.replace(" ", "\u2423")
    s = "".join(c if c.isprintable() or c == "\u2423" else repr(c)[1:-1] for c in s)
    return s if len(s) <= 14 else s[:13] + "\u2026"


def _tex_safe(s: str) -> str:
    return s.replace("$", r"\$")


def plot_attention(maps: np.ndarray, labels: list, layer: int, path: Path) -> Path:
    """One layer's heads (H, T, T) as heat maps, tokens on the axes."""
    plt = _plt()
    h, t, _ = maps.shape
    cols = min(h, 4)
    rows = -(-h // cols)
    side = min(max(2.8, 0.22 * t + 1.2), 9)
    fig, axes = plt.subplots(rows, cols, figsize=(side * cols, side * rows), squeeze=False)
    ticks = np.arange(t) if t <= 48 else np.arange(0, t, max(1, t // 32))
    for k, ax in enumerate(axes.flat):
        if k >= h:
            ax.axis("off")
            continue
        # the causal mask's cells (keys after the query) in grey: "cannot", not "does not"
        future = np.triu(np.ones((t, maps.shape[2]), dtype=bool), 1 + maps.shape[2] - t)
        cmap = plt.get_cmap("viridis").with_extremes(bad="#dddddd")
        ax.imshow(np.ma.masked_array(maps[k], future), cmap=cmap, vmin=0, vmax=1)
        ax.set_title(f"layer {layer} head {k}", fontsize=9)
        ax.set_xticks(ticks)
        ax.set_xticklabels([_tex_safe(labels[j]) for j in ticks], rotation=90, fontsize=7)
        ax.set_yticks(ticks)
        ax.set_yticklabels([_tex_safe(labels[j]) for j in ticks], fontsize=7)
        ax.set_xlabel("key (attended to)", fontsize=8)
        ax.set_ylabel("query", fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def plot_logit_lens(target_p: np.ndarray, top_ids: np.ndarray, labels: list, tokenizer,
                    path: Path) -> Path:
    """(L+1, T-1) probability of the correct next token as a heat map, each cell labelled
    with the lens's top guess."""
    plt = _plt()
    n_l, n_t = target_p.shape
    fig, ax = plt.subplots(figsize=(min(max(5, 0.55 * n_t + 2), 40), 0.45 * n_l + 2))
    im = ax.imshow(target_p, cmap="magma", vmin=0, vmax=1, aspect="auto")
    if n_t <= 40:
        for l in range(n_l):
            for t in range(n_t):
                ax.text(t, l, _tex_safe(token_label(tokenizer, top_ids[l, t])), ha="center",
                        va="center", fontsize=6,
                        color="white" if target_p[l, t] < 0.5 else "black")
    ticks = np.arange(n_t) if n_t <= 48 else np.arange(0, n_t, max(1, n_t // 32))
    rot = 0 if max(len(labels[t]) for t in range(n_t + 1)) <= 3 and n_t <= 30 else 90
    ax.set_xticks(ticks)
    ax.set_xticklabels([_tex_safe(labels[t]) for t in ticks], rotation=rot, fontsize=7)
    ax.set_xlabel("input token at the position")
    top = ax.secondary_xaxis("top")
    top.set_xticks(ticks)
    top.set_xticklabels([_tex_safe(labels[t + 1]) for t in ticks], rotation=rot, fontsize=7)
    top.set_xlabel("the token that comes next (the target)", fontsize=8)
    ax.set_yticks(np.arange(n_l))
    ax.set_yticklabels(["embeddings"] + [f"block {i}" for i in range(n_l - 1)], fontsize=8)
    ax.set_title("logit lens: probability of the correct next token (cell text: the top guess)",
                 fontsize=10, pad=28)
    fig.colorbar(im, ax=ax, fraction=0.03)
    fig.tight_layout()
    return _save(fig, path)


def plot_activation_stats(stats: dict, path: Path) -> Path:
    """The four per-layer statistics of ``activation_stats`` side by side."""
    plt = _plt()
    fig, axes = plt.subplots(1, 4, figsize=(17, 3.6))
    n = len(stats["ln1_input_scale"])
    ax = axes[0]
    ax.plot(range(n + 1), stats["residual_norm"], "o-")
    ax.set_xticks(range(n + 1))
    ax.set_xticklabels(["emb"] + [str(i) for i in range(n)])
    ax.set_title("residual-stream norm (after layer)")
    ax = axes[1]
    ax.plot(range(n), stats["ln1_input_scale"], "o-", label="ln1 (before attention)")
    ax.plot(range(n), stats["ln2_input_scale"], "s--", label="ln2 (before MLP)")
    ax.set_title("norm input scale (std over channels)")
    ax.legend(fontsize=7)
    ax = axes[2]
    ax.bar(range(n), stats["gelu_flat_fraction"])
    ax.set_ylim(0, max(0.05, float(np.max(stats["gelu_flat_fraction"])) * 1.2))
    ax.set_title(f"GELU inputs in the flat region (x < {FLAT_BELOW:g})")
    ax = axes[3]
    ent = stats["attention_entropy"]
    im = ax.imshow(ent.T, cmap="viridis", aspect="auto", vmin=0)
    if ent.size <= 256:
        for i in range(ent.shape[0]):
            for j in range(ent.shape[1]):
                ax.text(i, j, f"{ent[i, j]:.2f}", ha="center", va="center", fontsize=7,
                        color="white" if ent[i, j] < 0.6 * ent.max() else "black")
    ax.set_xlabel("layer")
    ax.set_ylabel("head")
    ax.set_xticks(range(ent.shape[0]))
    ax.set_yticks(range(ent.shape[1]))
    ax.set_title("attention entropy per head (nats)")
    fig.colorbar(im, ax=ax, fraction=0.05, format="%.2f")
    for ax in axes[:3]:
        ax.set_xlabel("layer")
        ax.grid(alpha=0.3)
    for ax in axes[1:3]:
        ax.set_xticks(range(n))
    fig.tight_layout()
    return _save(fig, path)


def plot_next_token_topk(top_ids: np.ndarray, top_p: np.ndarray, labels: list, tokenizer,
                         path: Path) -> Path:
    """(T, k) next-token probabilities at each prompt position, cells labelled with tokens."""
    plt = _plt()
    t, k = top_p.shape
    fig, ax = plt.subplots(figsize=(1.3 * k + 2.5, min(0.32 * t + 1.5, 60)))
    im = ax.imshow(top_p, cmap="Blues", vmin=0, vmax=1, aspect="auto")
    for i in range(t):
        for j in range(k):
            ax.text(j, i, _tex_safe(f"{token_label(tokenizer, top_ids[i, j])} "
                                    f"{top_p[i, j]:.2f}"), ha="center", va="center",
                    fontsize=7, color="white" if top_p[i, j] > 0.6 else "black")
    ax.set_yticks(np.arange(t))
    ax.set_yticklabels([_tex_safe(s) for s in labels], fontsize=7)
    ax.set_xticks(np.arange(k))
    ax.set_xticklabels([f"#{j + 1}" for j in range(k)])
    ax.set_ylabel("after the prompt's token")
    ax.set_title("next-token distribution: top-k", fontsize=10)
    fig.colorbar(im, ax=ax, fraction=0.04)
    fig.tight_layout()
    return _save(fig, path)


def read_internals(log_path) -> list:
    """The (step, record) pairs that ``TrainingHealth.finish`` logged into log.jsonl, each
    line as {"step": N, "inspect": record}."""
    out = []
    for line in Path(log_path).read_text().splitlines():
        if not line.strip():
            continue
        r = json.loads(line)
        if isinstance(r.get("inspect"), dict):
            out.append((r["step"], r["inspect"]))
    return out


def plot_internals(log_path, png_path) -> Path | None:
    """internals.png from log.jsonl: gradient norm per layer and per kind, update-to-weight
    ratio per layer (log scale; 1e-3, the usual guide, dashed), and the activation statistics,
    each against the step. Written atomically; None when the log holds no record yet."""
    recs = read_internals(log_path)
    if not recs:
        return None
    plt = _plt()
    steps = [s for s, _ in recs]
    fig, axes = plt.subplots(2, 4, figsize=(20, 8))

    def lines(ax, key, title, log=True, sub=None):
        series: dict = {}
        for s, r in recs:
            d = r.get(key) if sub is None else (r.get("activations") or {}).get(key)
            if d is None:
                continue
            items = d.items() if isinstance(d, dict) else (
                ((f"block {i}" if sub != "res" else ("embedding" if i == 0 else
                                                     f"block {i - 1}")), v)
                for i, v in enumerate(d))
            for name, v in items:
                v = float(np.mean(v)) if isinstance(v, list) else v
                series.setdefault(name, ([], []))
                series[name][0].append(s)
                series[name][1].append(v if v is not None else np.nan)
        cmap = plt.get_cmap("viridis")
        for j, (name, (xs, ys)) in enumerate(series.items()):
            ax.plot(xs, ys, label=name, color=cmap(j / max(1, len(series) - 1)), lw=1.2)
        if log and series:
            ax.set_yscale("log")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if series:
            ax.legend(fontsize=6, ncol=2)

    lines(axes[0, 0], "grad_norm", "gradient norm per layer")
    lines(axes[0, 1], "grad_norm_kind", "gradient norm per kind of parameter")
    lines(axes[0, 2], "update_ratio", "update / weight per layer")
    axes[0, 2].axhline(1e-3, ls="--", color="gray", lw=1)
    axes[0, 2].text(steps[0], 1e-3, " 1e-3", va="bottom", fontsize=7, color="gray")
    lines(axes[0, 3], "residual_norm", "residual-stream norm", log=False, sub="res")
    lines(axes[1, 0], "ln1_input_scale", "ln1 input scale", log=False, sub="layer")
    lines(axes[1, 1], "ln2_input_scale", "ln2 input scale", log=False, sub="layer")
    lines(axes[1, 2], "gelu_flat_fraction", f"GELU inputs < {FLAT_BELOW:g} (fraction)",
          log=False, sub="layer")
    lines(axes[1, 3], "attention_entropy", "attention entropy, mean over heads (nats)",
          log=False, sub="layer")
    fig.tight_layout()
    png_path = Path(png_path)
    tmp = png_path.with_name(png_path.stem + f".tmp-{os.getpid()}.png")
    _save(fig, tmp)
    os.replace(tmp, png_path)
    return png_path


# ----------------------------------------------------------------------------- the report
_CSS = """body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;
color:#222}h1{font-size:1.5em}h2{font-size:1.2em;margin-top:2em;border-bottom:1px solid #ddd}
figure{margin:1em 0}img{max-width:100%;border:1px solid #eee}figcaption{color:#555;
font-size:.9em}table{border-collapse:collapse;font-size:.8em}td,th{border:1px solid #ddd;
padding:2px 5px;text-align:center;white-space:nowrap}th{background:#f4f4f4}
code,pre{background:#f4f4f4;padding:0 3px}.scroll{overflow-x:auto}"""


def _prompt_ids(tokenizer, prompt: str, block_size: int, say) -> list:
    ids = tokenizer.encode(prompt)
    if not ids:
        bos = getattr(tokenizer, "bos_id", None)
        ids = [bos if bos is not None and bos >= 0 else tokenizer.encode("\n")[0]]
    if len(ids) > block_size:
        say(f"note: the prompt has {len(ids)} tokens; keeping the last {block_size} "
            "(the block size)")
        ids = ids[-block_size:]
    return ids


def _is_report_file(name: str) -> bool:
    """What write_report puts in its folder (and nothing else)."""
    return name in ("index.html", "internals.npz") or (
        name.endswith(".png") and not name.startswith("."))


def _prepare_target(folder: Path, overwrite: bool) -> None:
    if not str(folder).strip() or os.path.abspath(folder) in (
            os.getcwd(), os.path.abspath(os.sep), os.path.expanduser("~")) or \
            folder.name in ("", ".", ".."):
        raise InspectError(f"--to {folder!s}: name a folder of its own for the report")
    if folder.exists():
        if not folder.is_dir():
            raise InspectError(f"{folder} is a file; pass a folder to write the report into")
        from gpt.data.prepare import looks_prepared
        if looks_prepared(folder):
            raise InspectError(f"{folder} is a prepared data folder; write the report into a "
                               "folder of its own")
        if (folder / "config.json").is_file():
            raise InspectError(f"{folder} is a model folder (config.json); write the report "
                               "into a folder of its own")
        if run_status(folder) is not None:
            raise InspectError(f"{folder} holds a training run; write the report into a "
                               f"folder of its own (e.g. {folder / 'inspect'})")
        held = sorted(os.listdir(folder))
        if held and not overwrite:
            shown = ", ".join(held[:6]) + (" ..." if len(held) > 6 else "")
            raise InspectError(f"{folder} is not empty (it holds {shown}); pass --overwrite to "
                               "replace an earlier report, or choose another folder")
        others = [n for n in held if not _is_report_file(n)]
        if others:      # --overwrite replaces an earlier report, never anything else
            shown = ", ".join(others[:6]) + (" ..." if len(others) > 6 else "")
            raise InspectError(f"{folder} holds more than an earlier report ({shown}); "
                               "--overwrite only replaces a folder of index.html, PNGs and "
                               "internals.npz: choose another folder")


def _commit(tmp: Path, target: Path) -> None:
    """Move the finished ``tmp`` folder to ``target``, replacing what is there (checked by
    the caller): the old folder is moved aside first and removed only after the rename."""
    old = None
    if target.exists():
        if os.listdir(target):
            old = target.with_name(f".{target.name}.old-{secrets.token_hex(4)}")
            os.rename(target, old)
        else:
            os.rmdir(target)
    try:
        os.rename(tmp, target)
    except BaseException:
        if old is not None:
            os.rename(old, target)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def write_report(model, tokenizer, prompt: str, folder, overwrite: bool = False, k: int = 5,
                 say=print) -> Path:
    """Write what ``model`` computes on ``prompt`` into ``folder``: attention maps of every
    layer, the logit lens, activation statistics and the top-k next tokens, as PNGs, the
    arrays in internals.npz, and an index.html that shows them (relative links, no network).
    ``folder`` must not exist or be empty unless ``overwrite``, and never holds a run. The
    folder appears complete or not at all. Returns its path."""
    target = Path(os.path.expanduser(str(folder)))
    _prepare_target(target, overwrite)
    ids = _prompt_ids(tokenizer, prompt, model.config.block_size, say)
    arr = np.array([ids], dtype=np.int64)
    rec = record(model, arr, lens=True)
    labels = [token_label(tokenizer, i) for i in ids]
    maps = np.stack([a[0] for a in rec.attention])              # (L, H, T, T)
    lens = rec.lens[:, 0]                                       # (L+1, T, V)
    lens_ids, lens_p = top_k(lens, k)                            # (L+1, T, k)
    stats = stats_of(rec)
    nxt_ids, nxt_p = top_k(rec.logits[0], k)                     # (T, k)
    target_p = lens_target_probability(lens, arr) if len(ids) > 1 else None

    parent = Path(os.path.abspath(target)).parent
    tmp = parent / f".{target.name}.tmp-{secrets.token_hex(4)}"
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
    except OSError as e:
        raise InspectError(f"cannot write {target}: {e.strerror or e}; choose another "
                           "--to") from None
    try:
        figures = []                                            # (file, heading, caption)
        for layer in range(maps.shape[0]):
            name = f"attention_layer{layer}.png"
            plot_attention(maps[layer], labels, layer, tmp / name)
            figures.append((name, f"Attention, layer {layer}",
                            f"Each head's attention probabilities in block {layer}: row = the "
                            "query token, column = the key it attends to; rows sum to 1 and "
                            "the upper triangle is 0 (a token sees only itself and earlier "
                            "ones)."))
        if target_p is not None:
            plot_logit_lens(target_p, lens_ids[:, :-1, 0], labels, tokenizer,
                            tmp / "logit_lens.png")
            figures.append(("logit_lens.png", "Logit lens",
                            "The residual stream after the embeddings and after each block, "
                            "read through the final norm and the LM head as if it were the "
                            "last layer: colour = the probability of the token that really "
                            "comes next, text = the top guess. The last row is the model's "
                            "own prediction."))
        plot_activation_stats(stats, tmp / "activations.png")
        figures.append(("activations.png", "Activation statistics",
                        "Per layer: the residual stream's norm; the scale (std over channels) "
                        "of what each LayerNorm receives; the fraction of GELU inputs below "
                        f"{FLAT_BELOW:g}, where GELU is flat and passes almost no gradient; "
                        "each head's attention entropy (low: sharp, one token; high: spread)."))
        plot_next_token_topk(nxt_ids, nxt_p, labels, tokenizer, tmp / "next_token_topk.png")
        figures.append(("next_token_topk.png", "Next-token distribution",
                        f"At each position of the prompt, the model's {k} most probable next "
                        "tokens and their probabilities."))
        np.savez_compressed(tmp / "internals.npz", ids=arr[0], attention=maps,
                            lens_top_ids=lens_ids, lens_top_probs=lens_p,
                            lens_target_prob=target_p if target_p is not None else np.zeros((0,)),
                            next_top_ids=nxt_ids, next_top_probs=nxt_p,
                            **{f"stats_{k_}": v for k_, v in stats.items()})
        shown = prompt if len(ids) == len(tokenizer.encode(prompt)) and prompt else \
            tokenizer.decode(ids) if prompt else "(empty: the BOS token alone)"
        if prompt and len(ids) < len(tokenizer.encode(prompt)):
            shown = f"(the last {len(ids)} tokens, the block size)\n" + shown
        (tmp / "index.html").write_text(_html(shown, labels, model, figures, lens_ids, lens_p,
                                              nxt_ids, nxt_p, tokenizer), encoding="utf-8")
        _commit(tmp, target)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError):
            raise InspectError(f"could not write {target}: {e.strerror or e}; choose another "
                               "--to") from None
        raise
    return target


def _html(prompt, labels, model, figures, lens_ids, lens_p, nxt_ids, nxt_p, tokenizer) -> str:
    e = html.escape
    c = model.config
    tok = lambda i: e(token_label(tokenizer, i))  # noqa: E731
    parts = ["<!DOCTYPE html>", "<html><head><meta charset='utf-8'>",
             "<title>tensorlite-gpt inspect</title>", f"<style>{_CSS}</style></head><body>",
             "<h1>Inside the model</h1>",
             f"<p>{c.n_layer} layers, {c.n_head} heads, width {c.d_model}, vocabulary "
             f"{c.vocab_size}. The prompt ({len(labels)} tokens):</p><pre>{e(prompt)}</pre>",
             "<p>Tokens: " + " ".join(f"<code>{e(s)}</code>" for s in labels) + "</p>"]
    for name, head, caption in figures:
        parts.append(f"<h2>{e(head)}</h2><figure><img src='{e(name)}' alt='{e(head)}'>"
                     f"<figcaption>{e(caption)}</figcaption></figure>")
        if name == "logit_lens.png":
            parts.append("<p>The lens as a table: the top guess at each layer and position "
                         "(hover for the top-k).</p><div class='scroll'><table><tr><th></th>"
                         + "".join(f"<th>{e(s)}</th>" for s in labels) + "</tr>")
            for layer in range(lens_ids.shape[0]):
                name_l = "embeddings" if layer == 0 else f"block {layer - 1}"
                cells = []
                for t in range(lens_ids.shape[1]):
                    title = ", ".join(f"{token_label(tokenizer, i)} {p:.3f}"
                                      for i, p in zip(lens_ids[layer, t], lens_p[layer, t]))
                    cells.append(f"<td title='{e(title)}'>{tok(lens_ids[layer, t, 0])} "
                                 f"<small>{lens_p[layer, t, 0]:.2f}</small></td>")
                parts.append(f"<tr><th>{name_l}</th>{''.join(cells)}</tr>")
            parts.append("</table></div>")
    parts.append("<h2>Top-k next tokens as a table</h2><div class='scroll'><table><tr>"
                 "<th>after</th>" + "".join(f"<th>#{j + 1}</th>" for j in range(nxt_ids.shape[1]))
                 + "</tr>")
    for t, s in enumerate(labels):
        parts.append(f"<tr><th>{e(s)}</th>" + "".join(
            f"<td>{tok(i)} <small>{p:.3f}</small></td>" for i, p in zip(nxt_ids[t], nxt_p[t]))
            + "</tr>")
    parts.append("</table></div><p>The numbers: <a href='internals.npz'>internals.npz</a> "
                 "(NumPy arrays).</p></body></html>")
    return "\n".join(parts) + "\n"
