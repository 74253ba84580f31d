"""Direct Preference Optimization (Rafailov et al., 2023): from pairs of answers to one prompt,
one preferred (chosen) and one not (rejected), move the policy towards the chosen answer
relative to a frozen reference model (the SFT checkpoint it starts from), with no reward
model and no sampling:

    logp(a)  = the sum over the answer's tokens (and its <|end|>) of log p(token | before),
               the same tokens SFT learns (template.render's mask)
    z        = beta * ((logp_policy(chosen) - logp_ref(chosen))
                       - (logp_policy(rejected) - logp_ref(rejected)))
    loss     = mean over pairs of -log sigmoid(z)

``beta * (logp_policy - logp_ref)`` is each answer's implicit reward; the reward margin is
z (the chosen's minus the rejected's) and the accuracy the fraction of pairs with z > 0.
At the start the policy is the reference: every z is 0 and the loss log 2. The reference's
log-probabilities never change, so they are computed once, without a graph, for every pair
(train and held-out) when the run starts.

Layouts: one process, or --dp N (with --zero 1): each rank needs the whole vocabulary's
logits for the per-sequence log-probabilities, so tensor and pipeline parallelism are not
offered here.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

import tensorlite as tl
from gpt.config import DPOConfig
from gpt.data.errors import DataError
from gpt.model import GPT
from gpt.run_folder import TrainingError
from nn.checkpoint import CheckpointError
from nn import functional as F

from .sft import (RowLoader, SFTTrainer, _sha, _tokenizer_meta, encode_rows, load_examples,
                  read_base)
from .template import ChatTokenizer


# ------------------------------------------------------------------------------ the loss
def sequence_logps(model, x, y):
    """(B,) Tensor: for each row, the sum of log p(y[t] | x[..t]) over its learned targets
    (y != IGNORE)."""
    logits, _ = model(x)                                            # (B, T, V)
    return -F.cross_entropy(logits, y, reduction="none").sum(dim=-1)


def dpo_loss(pi_chosen, pi_rejected, ref_chosen, ref_rejected, beta: float):
    """The DPO loss (mean over pairs) and the reward margins z (B,): every argument a (B,)
    Tensor or array of sequence log-probabilities."""
    z = ((pi_chosen - ref_chosen) - (pi_rejected - ref_rejected)) * beta
    return -z.log_sigmoid().mean(), z


# ------------------------------------------------------------------------------ pairs
@dataclass
class PairsReport:
    pairs: int = 0
    kept: int = 0
    truncated: int = 0      # pairs with an answer cut to the block
    dropped: int = 0        # pairs with an answer that left no learned token in the block

    def line(self, what: str) -> str:
        return (f"{what}: {self.pairs} preference pairs -> {self.kept} kept; {self.truncated} "
                f"with an answer truncated to the block, {self.dropped} dropped (no answer "
                "token left in the block)")


def encode_pairs(tok: ChatTokenizer, prefs, block_size: int):
    """(Xc, Yc, Xr, Yr, report): each pair as two rows (prompt + chosen, prompt + rejected),
    by SFT's rows and truncation rule; a pair is dropped when either row is."""
    report = PairsReport(pairs=len(prefs))
    keep_c, keep_r = [], []
    for p in prefs:
        rows = [encode_rows(tok, [[("user", p.prompt), ("assistant", a)]], block_size)
                for a in (p.chosen, p.rejected)]
        if any(r[2].dropped for r in rows):
            report.dropped += 1
            continue
        report.truncated += any(r[2].truncated for r in rows)
        keep_c.append(rows[0][:2])
        keep_r.append(rows[1][:2])
    report.kept = len(keep_c)
    if not keep_c:
        empty = np.zeros((0, block_size), np.int64)
        return empty, empty, empty, empty, report
    Xc, Yc = (np.concatenate([r[k] for r in keep_c]) for k in (0, 1))
    Xr, Yr = (np.concatenate([r[k] for r in keep_r]) for k in (0, 1))
    return Xc, Yc, Xr, Yr, report


class PairLoader(RowLoader):
    """Batches ``(xc, yc, xr, yr, ref_c, ref_r, n)`` of pairs, as RowLoader does rows; ``n``
    is the number of pairs in the whole global batch."""

    def __init__(self, Xc, Yc, Xr, Yr, ref_c, ref_r, batch_size, **kw):
        super().__init__(Xc, Yc, batch_size, **kw)
        self.more = (Xr, Yr, ref_c, ref_r)

    def get_batch(self, step: int):
        idx = self.rows(step)
        b = len(idx) // self.world_size
        mine = idx[self.rank * b:(self.rank + 1) * b]
        Xr, Yr, rc, rr = self.more
        return self.X[mine], self.Y[mine], Xr[mine], Yr[mine], rc[mine], rr[mine], len(idx)


@tl.no_grad()
def reference_logps(model, X, Y, device: str, batch: int = 32) -> np.ndarray:
    """(N,) float64 sequence log-probabilities of the rows under ``model`` (no graph)."""
    was = model.training
    model.eval()
    out = [sequence_logps(model, tl.tensor(X[i:i + batch], device=device),
                          tl.tensor(Y[i:i + batch], device=device)).numpy()
           for i in range(0, len(X), batch)]
    model.train(was)
    return np.concatenate(out).astype(np.float64) if out else np.zeros(0)


def load_preferences(cfg: DPOConfig, say=print):
    """(train, held-out, description) preference pairs from --data or the embedded set."""
    from . import data
    return load_examples(cfg, data.read_dpo_jsonl, data.default_dpo_set,
                         "stdlib docstring -> true body vs a wrong one", "pairs", say)


# ------------------------------------------------------------------------------ the trainer
class DPOTrainer(SFTTrainer):
    """SFT's trainer (base run, guards, resume, layouts) with pairs and the DPO loss."""

    baseline_label = "reference"
    loss_is_ce = False
    rows_per_example = 2        # a pair: prompt + chosen, prompt + rejected

    def _load_data(self) -> dict:
        cfg, tok = self.cfg, self.tokenizer
        train, held, source = load_preferences(cfg, self.say)
        bs = self.model_cfg.block_size
        self.pairs = encode_pairs(tok, train, bs)
        self.val_pairs = encode_pairs(tok, held, bs)
        for pairs, what in ((self.pairs, "training"), (self.val_pairs, "held-out")):
            if len(pairs[0]) == 0:
                raise DataError(f"no {what} pair fits: {pairs[4].line(what)}; use a base model "
                                "with a longer block or shorter examples")
        return {"corpus": source, "options": {"block_size": bs, "beta": cfg.beta,
                                              "heldout_percent": cfg.heldout_percent,
                                              "max_chars": cfg.max_chars},
                "tokenizer": _tokenizer_meta(tok), "vocab_size": tok.vocab_size,
                "train": {"pairs": len(self.pairs[0]), "sha256": _sha(*self.pairs[:4])},
                "val": {"pairs": len(self.val_pairs[0]), "sha256": _sha(*self.val_pairs[:4])}}

    def _reference(self) -> GPT:
        """The frozen reference: the base run's weights (with the chat tokens grown)."""
        cfg = self.cfg
        try:
            _, base_tok, self.base_ckpt = read_base(cfg.base, self.say, made_by="sft")
        except (TrainingError, CheckpointError) as e:
            raise TrainingError(f"DPO needs its reference model, the --base run: {e}") from None
        if not isinstance(base_tok, ChatTokenizer):
            self._grown = (self.tokenizer.base_vocab_size, self.tokenizer.vocab_size)
            self.say(f"note: --base {cfg.base} was not fine-tuned (it has no chat tokens): DPO "
                     "usually starts from an SFT run (tensorlite-gpt sft), which also serves "
                     "as the reference")
        ref = GPT(self.model_cfg).to(cfg.device, cfg.dtype)
        ref.load_state_dict(self._base_weights())
        return ref

    def _make_loaders(self):
        cfg = self.cfg
        ref = self._reference()
        refs = [(reference_logps(ref, Xc, Yc, cfg.device), reference_logps(ref, Xr, Yr, cfg.device))
                for Xc, Yc, Xr, Yr, _ in (self.pairs, self.val_pairs)]
        del ref
        dp = self.par.dp if self.par is not None else None
        (Xc, Yc, Xr, Yr, _), (rc, rr) = self.pairs, refs[0]
        train = PairLoader(Xc, Yc, Xr, Yr, rc, rr, cfg.batch_size, seed=cfg.seed,
                           rank=dp.rank if dp else 0, world_size=dp.size if dp else 1)
        (Xc, Yc, Xr, Yr, _), (rc, rr) = self.val_pairs, refs[1]
        val = PairLoader(Xc, Yc, Xr, Yr, rc, rr, cfg.batch_size, mode="sequential")
        self._stats = np.zeros(3)                   # margin sum, correct, pairs (this rank)
        self._val_by_step = {}                      # step -> held-out numbers
        return train, val

    def _pair_logps(self, batch):
        xc, yc, xr, yr = batch[:4]
        d = self.cfg.device
        lp = sequence_logps(self.model, tl.tensor(np.concatenate([xc, xr]), device=d),
                            tl.tensor(np.concatenate([yc, yr]), device=d))
        b = len(xc)
        return lp[:b], lp[b:]

    def _batch_loss(self, batch):
        pc, pr = self._pair_logps(batch)
        rc, rr = (tl.tensor(a.astype(pc.dtype), device=self.cfg.device) for a in batch[4:6])
        loss, z = dpo_loss(pc, pr, rc, rr, self.cfg.beta)
        z = z.numpy()
        self._stats += (z.sum(), (z > 0).sum(), len(z))
        return loss

    def _micro_weights(self, batches) -> list:
        dp = self.par.dp.size if self.par is not None else 1
        total = sum(b[-1] for b in batches)
        return [len(b[0]) * dp / total for b in batches]

    def _log_extra(self) -> dict:
        """The reward margin and accuracy over the pairs since the last record (all ranks)."""
        s = self._stats.copy()
        if self.par is not None and self.par.dp.size > 1:
            self.par.dp.all_reduce(s)
        self._stats[:] = 0
        if not s[2]:
            return {}
        return {"margin": round(float(s[0] / s[2]), 5), "accuracy": round(float(s[1] / s[2]), 4)}

    def _val_loss(self) -> float:
        """The held-out DPO loss; its margin and accuracies in _val_extra."""
        was = self.model.training
        self.model.eval()
        z_all, pc_all, pr_all = [], [], []
        with tl.no_grad():
            for i in range(self.eval_steps):
                batch = self.val_loader.get_batch(i)
                pc, pr = self._pair_logps(batch)
                pc, pr = pc.numpy().astype(np.float64), pr.numpy().astype(np.float64)
                z_all.append(self.cfg.beta * ((pc - batch[4]) - (pr - batch[5])))
                pc_all.append(pc)
                pr_all.append(pr)
        self.model.train(was)
        z, pc, pr = (np.concatenate(a) for a in (z_all, pc_all, pr_all))
        self._val = {"val_margin": float(z.mean()), "val_accuracy": float((z > 0).mean()),
                     "val_logp_accuracy": float((pc > pr).mean())}
        return float(np.logaddexp(0.0, -z).mean())          # -log sigmoid(z)

    def _val_extra(self) -> dict:
        self._val_by_step[self.step] = dict(self._val)
        return {k: round(v, 5) for k, v in self._val.items()}

    def _baseline(self) -> float:
        """At the start the policy is the reference: every margin 0, the loss log 2, and the
        likelier answer the reference's (so these need no evaluation, resumed or not)."""
        n, _ = self.evaluated()
        _, _, rc, rr = self.val_loader.more
        self._val_start = {"val_margin": 0.0, "val_accuracy": 0.0,
                           "val_logp_accuracy": float((rc[:n] > rr[:n]).mean())}
        return math.log(2.0)


def dpo(cfg: DPOConfig, say=print) -> dict:
    trainer = DPOTrainer(cfg, say)
    for pairs, what in ((trainer.pairs, "training"), (trainer.val_pairs, "held-out")):
        say(pairs[4].line(what))
    summary = trainer.run()
    if not summary["interrupted"]:
        step = summary["best_step"]
        a, b = trainer._val_start, trainer._val_by_step.get(step)
        if b is None:                  # the best was evaluated before a resume: the last
            step, b = trainer.step, trainer._val
        n, _ = trainer.evaluated()
        summary.update({"val_start": a, "val_best": b})
        say(f"\nheld-out pairs ({n} of {len(trainer.val_pairs[0])}; the reference -> the tuned "
            f"model at step {step}): reward margin {a['val_margin']:.4f} -> "
            f"{b['val_margin']:.4f}, reward accuracy {a['val_accuracy']:.1%} -> "
            f"{b['val_accuracy']:.1%}, chosen more likely than rejected "
            f"{a['val_logp_accuracy']:.1%} -> {b['val_logp_accuracy']:.1%}")
    return summary

