"""Supervised fine-tuning (SFT): a pretrained GPT learns to answer in the chat template.

    conversations (JSONL, or the embedded set: stdlib docstring -> function body)
      -> render (template.py): ids and, per token, whether it is learned
      -> rows of block_size + 1 tokens, padded (or packed), targets of unlearned tokens
         set to IGNORE (-100), which cross-entropy skips
      -> the pretraining Trainer (train.py), with the base run's weights (the embedding grown
         by the four chat tokens) and these rows instead of the token stream

The loss of a step is the mean over the step's learned tokens (all micro-batches, all ranks):
each micro-batch's mean is weighted by its share of them (`SFTTrainer._micro_weights`), so
the number one process logs is what any layout logs, and a short answer counts no more per
token than a long one.

Truncation rule (counted in the report): a conversation longer than block_size + 1 tokens
keeps its first block_size + 1 tokens (the prompt whole when it fits, the answer cut); one
whose kept tokens hold no learned target (a prompt as long as the block) is dropped.
Padding puts each conversation in its own row (the pad id fills the rest, never a target).
Packing (``--pack``) fills rows with whole conversations in order (none is split across
rows); a conversation then attends to the ones before it in its row, as documents do in
pretraining, which changes nothing in what is learned but is not the same computation as
padding.
"""
from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

import tensorlite as tl
from gpt.config import SFTConfig
from gpt.data.errors import DataError
from gpt.distributed import check_world
from gpt.model import GPT, ConfigError, GPTConfig
from gpt.run_folder import (TrainingError, check_out, load_tokenizer_of, pick_checkpoint,
                            resumable, writing, atomic_json, json_safe)
from gpt.train import Trainer, check_memory
from nn import checkpoint as ckpt

from .template import ChatTokenizer, render, save_template, SPECIALS

IGNORE = -100


# ------------------------------------------------------------------------------ rows
@dataclass
class RowsReport:
    conversations: int = 0
    rows: int = 0
    truncated: int = 0       # longer than a row: cut to block_size + 1 tokens
    dropped: int = 0         # nothing learned left after the cut
    learned: int = 0         # target tokens that count in the loss

    def line(self, what: str) -> str:
        return (f"{what}: {self.conversations} conversations -> {self.rows} rows, "
                f"{self.learned} learned tokens; {self.truncated} truncated to the block, "
                f"{self.dropped} dropped (no answer token left in the block)")


def encode_rows(tok: ChatTokenizer, conversations, block_size: int, pack: bool = False):
    """(X, Y, report): X (N, block_size) input ids, Y (N, block_size) targets with IGNORE
    where a token is not learned (prompt, role tokens, padding). See the module docstring
    for the truncation and packing rules."""
    width = block_size + 1
    report = RowsReport()
    pieces = []                                     # (ids, learn) of each kept conversation
    for conv in conversations:
        report.conversations += 1
        ids, learn = render(tok, conv.messages if hasattr(conv, "messages") else conv)
        if len(ids) > width:
            report.truncated += 1
            ids, learn = ids[:width], learn[:width]
        if not any(learn[1:]):
            report.dropped += 1
            continue
        pieces.append((ids, learn))
    rows = []
    if pack:
        cur_ids, cur_learn = [], []
        for ids, learn in pieces:
            if len(cur_ids) + len(ids) > width:
                rows.append((cur_ids, cur_learn))
                cur_ids, cur_learn = [], []
            cur_ids, cur_learn = cur_ids + ids, cur_learn + learn
        if cur_ids:
            rows.append((cur_ids, cur_learn))
    else:
        rows = pieces
    X = np.full((len(rows), block_size), tok.pad_id, np.int64)
    Y = np.full((len(rows), block_size), IGNORE, np.int64)
    for r, (ids, learn) in enumerate(rows):
        ids_a = np.asarray(ids, np.int64)
        n = len(ids_a)
        X[r, :n - 1] = ids_a[:-1]
        # target t is token t + 1; it counts when token t + 1 is learned
        Y[r, :n - 1] = np.where(np.asarray(learn[1:], bool), ids_a[1:], IGNORE)
    report.rows = len(rows)
    report.learned = int((Y != IGNORE).sum())
    return X, Y, report


class RowLoader:
    """Batches ``(x, y, n)`` of rows: this rank's slice of the global batch's rows and ``n``,
    the number of learned targets in the whole global batch (every rank's rows).

    ``"random"`` mode: row order is a fresh permutation each epoch, seeded by (seed, epoch),
    so batch ``s`` is a function of (rows, seed, s) and the state is the step alone (exact
    resume, any number of ranks). ``"sequential"``: rows in order, the last batch shorter,
    `steps_per_epoch` batches see each row once."""

    def __init__(self, X, Y, batch_size: int, seed: int = 0, mode: str = "random",
                 rank: int = 0, world_size: int = 1):
        if len(X) == 0:
            raise DataError("no rows to train on")
        if batch_size % world_size:
            raise DataError(f"batch_size={batch_size} is the global batch and must be "
                            f"divisible by world_size={world_size}")
        self.X, self.Y = X, Y
        self.batch_size, self.seed, self.mode = int(batch_size), int(seed), mode
        self.rank, self.world_size = rank, world_size
        self.step = 0

    @property
    def steps_per_epoch(self) -> int:
        return -(-len(self.X) // self.batch_size)

    def rows(self, step: int) -> np.ndarray:
        """The global batch's row indices."""
        n, b = len(self.X), self.batch_size
        if self.mode == "sequential":
            return np.arange(step * b, min((step + 1) * b, n)) % n
        k = step * b + np.arange(b)
        out = np.empty(b, np.int64)
        for epoch in np.unique(k // n):
            perm = np.random.default_rng([self.seed, int(epoch)]).permutation(n)
            at = k // n == epoch
            out[at] = perm[k[at] % n]
        return out

    def get_batch(self, step: int):
        idx = self.rows(step)
        y_all = self.Y[idx]
        b = len(idx) // self.world_size
        mine = slice(self.rank * b, (self.rank + 1) * b)
        return self.X[idx][mine], y_all[mine], int((y_all != IGNORE).sum())

    def next_batch(self):
        batch = self.get_batch(self.step)
        self.step += 1
        return batch

    def state_dict(self) -> dict:
        return {"version": 1, "kind": "rows", "mode": self.mode, "seed": self.seed,
                "step": self.step, "batch_size": self.batch_size, "rows": len(self.X)}

    def load_state_dict(self, state: dict) -> None:
        want = {"kind": "rows", "seed": self.seed, "batch_size": self.batch_size,
                "rows": len(self.X)}
        differ = {k: (state.get(k), v) for k, v in want.items() if state.get(k) != v}
        if differ:
            raise DataError("the loader state is for other rows: " + ", ".join(
                f"{k} {a!r} vs {b!r} now" for k, (a, b) in differ.items()))
        self.step = int(state["step"])


def _sha(*arrays) -> str:
    h = hashlib.sha256()
    for a in arrays:
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def _tokenizer_meta(tok: ChatTokenizer) -> dict:
    return {"kind": tok.kind, "chat": list(SPECIALS), "base_vocab_size": tok.base_vocab_size}


def heldout_line(line_no: int, percent: int) -> bool:
    """--data files: whether the conversation on this line is held out (a hash of the line
    number, so the split is fixed and independent of the file's name)."""
    return int(hashlib.sha256(str(line_no).encode()).hexdigest(), 16) % 100 < percent


def load_examples(cfg, read_jsonl, default_set, embedded: str, what: str, say=print):
    """(train, held-out, description) of the examples of --data (read_jsonl; held out by
    line, `heldout_line`) or of the embedded set (default_set; held out by source file)."""
    if cfg.data is None:
        train, held = default_set(seed=cfg.seed, max_chars=cfg.max_chars,
                                  heldout_percent=cfg.heldout_percent)
        return train, held, {"embedded": embedded, "max_chars": cfg.max_chars}
    items, report = read_jsonl(cfg.data, strict=cfg.strict)
    if report.skipped:
        say(report.summary())
    train, held = [], []
    for x in items:
        line = int(x.source.rsplit(":", 1)[1])
        (held if heldout_line(line, cfg.heldout_percent) else train).append(x)
    if not train or not held:
        raise DataError(f"--data {cfg.data}: {len(items)} {what} give {len(train)} to train on "
                        f"and {len(held)} held out; give more lines (or change "
                        "--heldout-percent)")
    digest = hashlib.sha256(Path(cfg.data).read_bytes()).hexdigest()
    return train, held, {"file": str(Path(cfg.data).resolve()), "sha256": digest}


def load_conversations(cfg: SFTConfig, say=print):
    """(train, held-out, description) conversations from --data or the embedded set."""
    from . import data
    return load_examples(cfg, data.read_sft_jsonl, data.default_sft_set,
                         "stdlib docstring -> body", "conversations", say)


# ------------------------------------------------------------------------------ weights
def read_base(base: str, say=print, made_by: str = "train"):
    """(model config, tokenizer, checkpoint folder) of --base: a run folder (its best, else
    latest, checkpoint) or a Hugging Face GPT-2 folder (checkpoint None)."""
    from gpt.hf import is_hf_folder, load_hf_tokenizer, read_hf_config, config_from_hf
    if is_hf_folder(base):
        return config_from_hf(read_hf_config(base)), load_hf_tokenizer(base), None
    path = pick_checkpoint(base, None, say, what="--base", made_by=made_by)
    return (GPTConfig.from_dict(ckpt.load_checkpoint(path)["config"]), load_tokenizer_of(base),
            path)


def grow_vocab(state: dict, old: int, new: int) -> dict:
    """A GPT state_dict with the token embedding (and an untied head) grown from ``old`` to
    ``new`` rows; each new row starts at the mean of the old ones (the chat tokens begin as
    an average token, not as noise the first steps must undo)."""
    out = dict(state)
    for k in ("wte.weight", "lm_head.weight", "lm_head.bias"):
        if k in out:
            a = out[k].data if hasattr(out[k], "data") and not isinstance(out[k], np.ndarray) \
                else out[k]
            xp = tl.backend.xp_of(a)
            if a.shape[0] != old:
                raise ConfigError(f"the base model's {k} has {a.shape[0]} rows, its tokenizer "
                                  f"{old} ids")
            extra = xp.broadcast_to(a.mean(axis=0, keepdims=True), (new - old,) + a.shape[1:])
            out[k] = xp.concatenate([a, extra.astype(a.dtype)])
    return out


# ------------------------------------------------------------------------------ the trainer
class SFTTrainer(Trainer):
    """The pretraining Trainer on conversation rows, starting from the base run."""

    baseline_label = "base model"

    def _preflight(self, world) -> None:
        cfg = self.cfg
        cfg.validate()
        check_world(cfg, world)
        check_out(cfg)
        self._grown = None
        if cfg.resume and resumable(cfg.out):       # the run's own model and tokenizer
            self.base_ckpt = None
            meta = ckpt.load_checkpoint(pick_checkpoint(cfg.out, "latest", self.say))
            tok = load_tokenizer_of(cfg.out)
            base_cfg = GPTConfig.from_dict(meta["config"])
        else:
            base_cfg, tok, self.base_ckpt = read_base(cfg.base, self.say)
            if base_cfg.vocab_size != tok.vocab_size:
                raise TrainingError(f"--base {cfg.base}: its tokenizer has {tok.vocab_size} ids "
                                    f"but its model {base_cfg.vocab_size}")
            if not isinstance(tok, ChatTokenizer):
                tok = ChatTokenizer(tok)
                self._grown = (base_cfg.vocab_size, tok.vocab_size)
        self.tokenizer = tok
        self.model_cfg = dataclasses.replace(base_cfg, vocab_size=tok.vocab_size,
                                             dropout=cfg.model.dropout)
        cfg.model = self.model_cfg                 # saved with the run, checked on resume
        cfg.validate(model=True)                   # the layout against the base's shape
        self.meta = self._load_data()
        self.meta["base"] = str(Path(cfg.base).resolve())
        check_memory(self.model_cfg, cfg)
        self._resume_point = self._find_resume_point() if cfg.resume else None

    def _load_data(self) -> dict:
        """Read and encode the data (self.rows, self.val_rows, self.heldout); return its
        fingerprint for the run's checkpoints (a resume checks it)."""
        cfg, tok = self.cfg, self.tokenizer
        train, held, source = load_conversations(cfg, self.say)
        bs = self.model_cfg.block_size
        self.rows = encode_rows(tok, train, bs, cfg.pack)
        self.heldout = held
        self.val_rows = encode_rows(tok, held, bs, cfg.pack)
        for (X, _, rep), what in ((self.rows, "training"), (self.val_rows, "held-out")):
            if len(X) == 0:
                raise DataError(f"no {what} conversation fits: {rep.line(what)}; use a base "
                                "model with a longer block or shorter examples")
        options = {"pack": cfg.pack, "block_size": bs, "heldout_percent": cfg.heldout_percent,
                   "strict": cfg.strict, "max_chars": cfg.max_chars}
        return {"corpus": source, "options": options, "tokenizer": _tokenizer_meta(tok),
                "vocab_size": tok.vocab_size,
                "train": {"rows": len(self.rows[0]), "sha256": _sha(*self.rows[:2])},
                "val": {"rows": len(self.val_rows[0]), "sha256": _sha(*self.val_rows[:2])}}

    def _base_weights(self) -> dict:
        """The base run's state_dict (grown by the chat tokens when it had none)."""
        if self.base_ckpt is None:                 # a Hugging Face folder
            model = GPT.from_pretrained(self.cfg.base, self.cfg.device, self.cfg.dtype)
        else:
            base = ckpt.load_checkpoint(self.base_ckpt)
            model = GPT(GPTConfig.from_dict(base["config"])).to(self.cfg.device, self.cfg.dtype)
            ckpt.load_checkpoint(self.base_ckpt, model=model)
        state = {k: v.data for k, v in model.state_dict().items()}
        return grow_vocab(state, *self._grown) if self._grown else state

    def _init_weights(self) -> None:
        if self.cfg.resume and self._resume_point is not None:
            return                                  # the checkpoint's weights come next
        state = self._base_weights()
        if self._grown:
            old, new = self._grown
            self.say(f"note: the base tokenizer has no chat tokens: added {', '.join(SPECIALS)} "
                     f"as ids {old}..{new - 1}; the token embedding (and the tied head) grow "
                     f"from {old} to {new} rows, the new rows starting at the mean of the old")
        self.model.load_state_dict(state)

    def _make_loaders(self):
        cfg = self.cfg
        dp = self.par.dp if self.par is not None else None
        X, Y, _ = self.rows
        train = RowLoader(X, Y, cfg.batch_size, seed=cfg.seed, rank=dp.rank if dp else 0,
                          world_size=dp.size if dp else 1)
        Xv, Yv, _ = self.val_rows
        return train, RowLoader(Xv, Yv, cfg.batch_size, mode="sequential")

    def _batch_loss(self, batch):
        x, y, _ = batch
        return super()._batch_loss((x, y))

    def _micro_weights(self, batches) -> list:
        """Each micro-batch's mean times its share of the step's learned targets (its rows
        on this rank, out of every rank's): the step's loss is the mean over its tokens."""
        dp = self.par.dp.size if self.par is not None else 1
        total = sum(n for _, _, n in batches)
        return [float((y != IGNORE).sum()) * dp / total for _, y, _ in batches]

    def _val_loss(self) -> float:
        """The mean loss over the held-out rows' learned tokens (the first eval_steps
        batches; each batch's mean weighted by its tokens)."""
        was = self.model.training
        self.model.eval()
        total = count = 0.0
        with tl.no_grad():
            for i in range(self.eval_steps):
                x, y, n = self.val_loader.get_batch(i)
                loss = self.model(tl.tensor(x, device=self.cfg.device),
                                  tl.tensor(y, device=self.cfg.device))[1].item()
                total, count = total + loss * n, count + n
        self.model.train(was)
        return total / max(count, 1)

    def evaluated(self) -> tuple:
        """(rows, learned tokens) that each evaluation covers (the held-out loader is
        sequential: its first rows; for DPO the rows are pairs)."""
        n = min(self.eval_steps * self.val_loader.batch_size, len(self.val_loader.X))
        return n, int((self.val_loader.Y[:n] != IGNORE).sum())

    def _baseline(self) -> float:
        """The held-out loss before fine-tuning (the base model; saved with the run)."""
        if self.resumed_from is not None:
            saved = (ckpt.load_checkpoint(self.resumed_from).get("extra") or {}).get("baseline")
            if saved is not None:
                return float(saved)
        if self.pipe is not None:
            self._sync_pipeline()
        return self._val_loss()

    def _state(self) -> dict:
        state = super()._state()
        state["train_config"]["base"] = str(Path(self.cfg.base).resolve())
        return {**state, "baseline": self.baseline}

    def _save_tokenizer(self) -> None:
        super()._save_tokenizer()
        save_template(self.out, self.tokenizer)


# ------------------------------------------------------------------------------ the command
def compare(trainer: SFTTrainer, base_dir: str, n: int, max_new_tokens: int, say=print) -> list:
    """``n`` held-out prompts with the base model's continuation of the raw prompt, the tuned
    model's answer in the template, and the true answer (greedy, so reproducible)."""
    from ..run_folder import load_run
    from .chat import answer
    convs = trainer.heldout[:n]
    try:
        base, base_tok, _ = load_run(base_dir, None, trainer.cfg.device, lambda m: None)
        base.to(trainer.cfg.device, trainer.cfg.dtype)
    except TrainingError:
        base = None
    out = []
    for conv in convs:
        prompt = [m for m in conv.messages if m[0] != "assistant"]
        truth = next(c for r, c in conv.messages if r == "assistant")
        tuned = answer(trainer.model, trainer.tokenizer, prompt, max_new_tokens, temperature=0)
        plain = None
        if base is not None:
            text = "".join(c for _, c in prompt)
            ids = base_tok.encode(text)[-base.config.block_size:]
            new = base.generate(np.array([ids]), max_new_tokens, temperature=0)[0, len(ids):]
            plain = base_tok.decode(new.tolist())
        out.append({"prompt": "".join(c for _, c in prompt), "base": plain, "tuned": tuned,
                    "truth": truth})
    return out


def sft(cfg: SFTConfig, say=print) -> dict:
    trainer = SFTTrainer(cfg, say)
    for (_, _, rep), what in ((trainer.rows, "training"), (trainer.val_rows, "held-out")):
        say(rep.line(what))
    summary = trainer.run()
    if trainer.pipe is not None:
        trainer._sync_pipeline()
    if not summary["interrupted"]:
        rows, tokens = trainer.evaluated()
        say(f"\nheld-out answer loss: {summary['baseline']:.4f} before (the base model) "
            f"-> {summary['best_val_loss']:.4f} after (the best checkpoint, step "
            f"{summary['best_step']}); on {rows} of the {len(trainer.val_rows[0])} held-out rows "
            f"({tokens} answer tokens; --eval-steps x --batch-size)")
    if cfg.samples and not summary["interrupted"] and (trainer.is_main or trainer.tp):
        rows = compare(trainer, cfg.base, cfg.samples, cfg.sample_tokens, say)
        if trainer.is_main:
            for r in rows:
                say("=" * 72 + "\n" + r["prompt"].rstrip())
                if r["base"] is not None:
                    say("--- base model (continuing the raw prompt):\n" + r["base"].rstrip())
                say("--- tuned model (answering in the chat template):\n" + r["tuned"].rstrip())
                say(("--- the true body:\n" if cfg.data is None else "--- the answer in the data:\n")
                    + r["truth"].rstrip())
            if rows and trainer.is_main:
                with writing(trainer.out / "samples.json"):
                    atomic_json(trainer.out / "samples.json", json_safe(rows))
    return summary

