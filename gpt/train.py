"""Pretraining: next-token prediction with AdamW, warmup + cosine, clipping, accumulation,
periodic evaluation, checkpoints that resume exactly, a log, a loss plot and samples.

One step:  for each micro-batch: loss = CE(model(x), y) / grad_accum; loss.backward()
           -> clip the global gradient norm -> AdamW step at lr(step) -> zero the grads.
The loss is divided by grad_accum so that the summed gradients are the mean over the whole
batch, the same as one big batch would give.

Exact resume: a checkpoint holds the weights, the optimizer's moments, the step, the data
loader's position and the random generator's state; training is deterministic given those,
so a resumed run logs the same losses step for step as one that was never interrupted.
"""
from __future__ import annotations

import json
import math
import os
import signal
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np

import nn
import tensorlite as tl
from nn import checkpoint as ckpt
from nn.optim import AdamW, clip_grad_norm_
from nn.schedule import warmup_cosine

from .loader import BatchLoader
from .model import GPT, ConfigError, GPTConfig, PRESETS

LOG_NAME = "log.jsonl"


class TrainingError(RuntimeError):
    """Training cannot go on (a non-finite loss, say); the message says why and what to do."""


@dataclass
class TrainConfig:
    data: str = "data/stdlib"          # a prepared data folder (see gpt.prepare)
    out: str = "runs/gpt"
    preset: str = "tiny"
    n_layer: int | None = None
    n_head: int | None = None
    d_model: int | None = None
    block_size: int | None = None
    dropout: float = 0.0
    bias: bool = True
    norm_first: bool = True
    positional: str = "learned"
    tie_weights: bool = True
    batch_size: int = 16
    grad_accum: int = 1
    max_steps: int = 2000
    lr: float = 2e-3
    min_lr: float = 2e-4
    warmup_steps: int | None = None    # default: min(50, max_steps // 10)
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    eval_interval: int = 500
    eval_steps: int = 20
    log_interval: int = 10
    ckpt_interval: int | None = None   # default: every eval
    seed: int = 1337
    device: str = "cpu"
    dtype: str = "float32"
    resume: bool = False
    skip_nonfinite: bool = False
    samples: int = 3
    sample_tokens: int = 120
    progress: bool = True

    def model_config(self, vocab_size: int) -> GPTConfig:
        if self.preset not in PRESETS:
            raise ConfigError(f"unknown preset {self.preset!r}; choose from {sorted(PRESETS)}")
        base = dict(PRESETS[self.preset])
        for k in ("n_layer", "n_head", "d_model", "block_size"):
            if getattr(self, k) is not None:
                base[k] = getattr(self, k)
        return GPTConfig(vocab_size=vocab_size, dropout=self.dropout, bias=self.bias,
                         norm_first=self.norm_first, positional=self.positional,
                         tie_weights=self.tie_weights, **base)

    def validate(self):
        ints = dict(batch_size=1, grad_accum=1, max_steps=1, eval_interval=1, eval_steps=1,
                    log_interval=1)
        for k, lo in ints.items():
            v = getattr(self, k)
            if not isinstance(v, int) or v < lo:
                raise ConfigError(f"--{k.replace('_', '-')} must be an integer >= {lo}, got {v!r}")
        if self.warmup_steps is None:
            self.warmup_steps = min(50, self.max_steps // 10)
        if self.warmup_steps < 0 or self.warmup_steps > self.max_steps:
            raise ConfigError(f"--warmup-steps {self.warmup_steps} must be between 0 and "
                              f"--max-steps {self.max_steps}")
        if not self.lr > 0 or self.min_lr < 0 or self.min_lr > self.lr:
            raise ConfigError(f"need 0 <= --min-lr ({self.min_lr}) <= --lr ({self.lr}) and lr > 0")
        for k in ("beta1", "beta2"):
            if not 0.0 <= getattr(self, k) < 1.0:
                raise ConfigError(f"--{k} must be in [0, 1), got {getattr(self, k)}")
        if self.dtype not in ("float32", "float64", "float16"):
            raise ConfigError(f"--dtype must be float32, float64 or float16, got {self.dtype!r}")
        tl.backend.parse_device(self.device)
        if tl.backend.parse_device(self.device)[0] == "cuda" and not tl.cuda_available():
            raise ConfigError(f"--device {self.device}: {tl.cuda_unavailable_reason()}; "
                              "use --device cpu")

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown training option(s) {unknown}")
        return cls(**d)


# ------------------------------------------------------------------------------ helpers
def param_groups(model: nn.Module, weight_decay: float):
    """Weight decay on matrices (linear weights, embeddings); none on biases and norm gains,
    which have no scale to regularise."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        (decay if p.ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def measure_gemm_peak(device: str = "cpu", dtype=np.float32, n: int = 1024, reps: int = 5) -> float:
    """Best-of-``reps`` FLOP/s of one n x n x n matrix product: the ceiling MFU is measured
    against (what this machine's BLAS can do right now, on all of tensorlite's threads)."""
    xp = tl.backend.array_module(device)
    a = xp.asarray(np.random.default_rng(0).standard_normal((n, n)).astype(dtype))
    b = a.copy()
    matmul = tl.cpu.matmul if xp is np else xp.matmul
    matmul(a, b)
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        c = matmul(a, b)
        if xp is not np:  # pragma: no cover - GPU only
            xp.cuda.Stream.null.synchronize()
        best = min(best, time.perf_counter() - t)
    del c
    return 2 * n ** 3 / best


def unigram_baseline(train_tokens: np.ndarray, val_tokens: np.ndarray, vocab_size: int) -> float:
    """Cross-entropy (nats/token) on the validation tokens of predicting every token by its
    training frequency alone (add-one smoothed): what a model that ignores context scores, so
    the validation loss of a model that learnt anything is far below it."""
    counts = np.bincount(np.asarray(train_tokens, dtype=np.int64), minlength=vocab_size)
    logp = np.log((counts + 1.0) / (counts.sum() + vocab_size))
    val_counts = np.bincount(np.asarray(val_tokens, dtype=np.int64), minlength=vocab_size)
    return float(-(val_counts * logp).sum() / max(val_counts.sum(), 1))


def _atomic_json(path: Path, obj) -> None:
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def plot_losses(log_path: Path, png_path: Path, baseline: float | None = None) -> None:
    """The loss curve (train and validation) as a PNG, written atomically."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    train, val = [], []
    for line in log_path.read_text().splitlines():
        r = json.loads(line)
        if "loss" in r:
            train.append((r["step"], r["loss"]))
        if "val_loss" in r:
            val.append((r["step"], r["val_loss"]))
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), label="train loss", lw=1)
    if val:
        ax.plot(*zip(*val), "o-", label="validation loss")
    if baseline is not None:
        ax.axhline(baseline, ls="--", color="gray", label="unigram baseline")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = png_path.with_name(png_path.stem + f".tmp-{os.getpid()}.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, png_path)


@tl.no_grad()
def evaluate(model: GPT, loader: BatchLoader, steps: int) -> float:
    """Mean validation loss over the first ``steps`` sequential batches (the same batches
    every time, so evaluations are comparable)."""
    was = model.training
    model.eval()
    losses = [model(*loader.get_batch(i))[1].item() for i in range(steps)]
    model.train(was)
    return float(np.mean(losses))


class _Log:
    """log.jsonl: one JSON record per line, flushed as written."""

    def __init__(self, path: Path, truncate_from_step: int | None):
        self.path = path
        if truncate_from_step is not None and path.exists():
            # a resumed run rewrites the steps after its checkpoint, so the log reads as
            # one uninterrupted run
            keep = [ln for ln in path.read_text().splitlines()
                    if ln.strip() and json.loads(ln).get("step", -1) < truncate_from_step]
            path.write_text("".join(k + "\n" for k in keep))
        elif truncate_from_step is None:
            path.write_text("")
        self.f = open(path, "a")

    def write(self, rec: dict) -> None:
        self.f.write(json.dumps(rec) + "\n")
        self.f.flush()

    def close(self):
        self.f.close()


# ------------------------------------------------------------------------------ training
class Trainer:
    def __init__(self, cfg: TrainConfig, say=print):
        from .prepare import load_prepared
        cfg.validate()
        self.cfg, self.say = cfg, say
        self.out = Path(cfg.out)
        self.meta, self.tokenizer, train_path, val_path = load_prepared(cfg.data)
        vocab = self.tokenizer.vocab_size
        self.model_cfg = cfg.model_config(vocab)
        tl.manual_seed(cfg.seed)
        self.model = GPT(self.model_cfg).to(cfg.device, cfg.dtype)
        self.opt = AdamW(param_groups(self.model, cfg.weight_decay), lr=cfg.lr,
                         betas=(cfg.beta1, cfg.beta2), eps=1e-8)
        bs = self.model_cfg.block_size
        self.train_loader = BatchLoader(train_path, cfg.batch_size, bs, seed=cfg.seed)
        self.val_loader = BatchLoader(val_path, cfg.batch_size, bs, mode="sequential")
        self.eval_steps = min(cfg.eval_steps, self.val_loader.steps_per_epoch)
        self.step = 0
        self.best_val = float("inf")
        self.baseline = None

    # -- checkpoints -------------------------------------------------------------------------
    def _state(self) -> dict:
        return {"step": self.step, "best_val": self.best_val,
                "loader": self.train_loader.state_dict(),
                "rng": tl.default_generator.get_state(),
                "train_config": asdict(self.cfg), "data_meta": self.meta}

    def save(self, name: str) -> Path:
        path = self.out / "ckpt" / name
        ckpt.save_checkpoint(path, model=self.model, optimizer=self.opt,
                             config=self.model_cfg.to_dict(), extra=self._state())
        return path

    def try_resume(self) -> bool:
        path = self.out / "ckpt" / "latest"
        if ckpt.latest_checkpoint(path) is None:
            return False
        meta = ckpt.load_checkpoint(path)  # meta only: nothing loaded yet
        saved_cfg = GPTConfig.from_dict(meta["config"])
        if saved_cfg != self.model_cfg:
            raise ConfigError(f"--resume: the checkpoint in {path} is for a different model "
                              f"({_diff(saved_cfg.to_dict(), self.model_cfg.to_dict())}); use the "
                              "same options or another --out")
        meta = ckpt.load_checkpoint(path, model=self.model, optimizer=self.opt)
        extra = meta["extra"]
        self.step, self.best_val = int(extra["step"]), float(extra["best_val"])
        self.train_loader.load_state_dict(extra["loader"])
        tl.default_generator.set_state(extra["rng"])
        return True

    # -- the loop ------------------------------------------------------------------------------
    def train_step(self) -> tuple[float, float]:
        """One optimizer step over grad_accum micro-batches -> (loss, grad norm)."""
        cfg, model = self.cfg, self.model
        lr = warmup_cosine(self.step, cfg.lr, cfg.warmup_steps, cfg.max_steps, cfg.min_lr)
        for g in self.opt.param_groups:
            g["lr"] = lr
        total = 0.0
        for _ in range(cfg.grad_accum):
            x, y = self.train_loader.next_batch()
            _, loss = model(tl.tensor(x, device=cfg.device), tl.tensor(y, device=cfg.device))
            (loss / cfg.grad_accum).backward()
            total += loss.item() / cfg.grad_accum
        if not math.isfinite(total):
            self.opt.zero_grad()
            return total, float("nan")
        norm = clip_grad_norm_(model.parameters(), cfg.grad_clip) if cfg.grad_clip > 0 else 0.0
        self.opt.step()
        self.opt.zero_grad()
        return total, norm

    def run(self) -> dict:
        cfg = self.cfg
        self.out.mkdir(parents=True, exist_ok=True)
        from .tokenizer import tokenizer_filename
        self.tokenizer.save(self.out / tokenizer_filename(self.tokenizer.kind))  # for sample
        resumed = cfg.resume and self.try_resume()
        if cfg.resume and not resumed:
            self.say(f"--resume: no checkpoint in {self.out / 'ckpt' / 'latest'}; starting fresh")
        log = _Log(self.out / LOG_NAME, self.step if resumed else None)
        self.baseline = unigram_baseline(np.asarray(self.train_loader._tokens()),
                                         np.asarray(self.val_loader._tokens()),
                                         self.tokenizer.vocab_size)
        peak = measure_gemm_peak(cfg.device)
        tokens_per_step = cfg.batch_size * cfg.grad_accum * self.model_cfg.block_size
        flops_per_step = self.model.flops_per_token() * tokens_per_step
        self.say(f"model: {self.model.num_parameters():,} parameters "
                 f"({self.model_cfg.n_layer} layers, {self.model_cfg.n_head} heads, "
                 f"{self.model_cfg.d_model} wide, block {self.model_cfg.block_size}); "
                 f"{tokens_per_step} tokens/step; unigram baseline {self.baseline:.3f} nats"
                 + (f"; resumed at step {self.step}" if resumed else ""))
        bar = _progress(cfg.progress, self.step, cfg.max_steps)
        interrupted, stopped = False, None
        ckpt_every = cfg.ckpt_interval or cfg.eval_interval
        kill_at = int(os.environ.get("TENSORLITE_TEST_KILL_AT_STEP", "-1"))  # tests: SIGKILL here
        t_last, window_tokens = time.perf_counter(), 0
        try:
            while self.step < cfg.max_steps:
                if self.step == kill_at:
                    os.kill(os.getpid(), signal.SIGKILL)
                loss, norm = self.train_step()
                if not math.isfinite(loss):
                    if not cfg.skip_nonfinite:
                        stopped = (f"non-finite loss ({loss}) at step {self.step}: stopping; the last "
                                   f"good checkpoint is in {self.out / 'ckpt' / 'latest'} (lower "
                                   "--lr, or pass --skip-nonfinite to skip such steps)")
                        break
                    log.write({"step": self.step, "skipped": True, "loss": None})
                self.step += 1
                window_tokens += tokens_per_step
                lr = self.opt.param_groups[0]["lr"]
                if self.step % cfg.log_interval == 0 or self.step == cfg.max_steps:
                    now = time.perf_counter()
                    tps = window_tokens / max(now - t_last, 1e-9)
                    mfu = tps * self.model.flops_per_token() / peak
                    t_last, window_tokens = now, 0
                    if math.isfinite(loss):
                        log.write({"step": self.step - 1, "loss": round(loss, 6),
                                   "lr": lr, "grad_norm": round(norm, 5),
                                   "tokens_per_s": round(tps, 1), "mfu": round(mfu, 4)})
                    bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.1e}", tok_s=f"{tps:,.0f}",
                                    mfu=f"{100 * mfu:.0f}%")
                bar.update(1)
                if self.step % cfg.eval_interval == 0 or self.step == cfg.max_steps:
                    self._evaluate(log)
                if self.step % ckpt_every == 0 or self.step == cfg.max_steps:
                    self.save("latest")
                if self.step % cfg.eval_interval == 0 or self.step % ckpt_every == 0:
                    t_last, window_tokens = time.perf_counter(), 0  # tokens/s of training only
        except KeyboardInterrupt:
            interrupted = True
            self.save("latest")
            self.say(f"\ninterrupted: saved step {self.step} to {self.out / 'ckpt' / 'latest'}; "
                     "continue with --resume")
        finally:
            bar.close()
            log.close()
        if stopped:
            raise TrainingError(stopped)
        summary = {"step": self.step, "best_val_loss": self.best_val,
                   "unigram_baseline": self.baseline, "interrupted": interrupted,
                   "out": str(self.out)}
        _atomic_json(self.out / "summary.json", summary)
        return summary

    def _evaluate(self, log: _Log) -> None:
        val = evaluate(self.model, self.val_loader, self.eval_steps)
        log.write({"step": self.step - 1, "val_loss": round(val, 6),
                   "val_ppl": round(math.exp(min(val, 50)), 3)})
        if val < self.best_val:
            self.best_val = val
            self.save("best")
        plot_losses(self.out / LOG_NAME, self.out / "loss.png", self.baseline)
        self.say(f"step {self.step}: validation loss {val:.4f} (perplexity "
                 f"{math.exp(min(val, 50)):.1f}; unigram baseline {self.baseline:.3f})")

    def sample(self, n: int, max_new_tokens: int, temperature=0.8, top_k=None, seed=0) -> list:
        """``n`` continuations of the start of validation documents."""
        out = []
        x, _ = self.val_loader.get_batch(0)
        for i in range(min(n, x.shape[0])):
            prompt = x[i, :16]
            ids = self.model.generate(prompt[None], max_new_tokens, temperature=temperature,
                                      top_k=top_k, seed=seed + i)
            out.append((self.tokenizer.decode(prompt.tolist()),
                        self.tokenizer.decode(ids[0, 16:].tolist())))
        return out


def _diff(a: dict, b: dict) -> str:
    return ", ".join(f"{k}: {a.get(k)!r} vs {b.get(k)!r}" for k in sorted(set(a) | set(b))
                     if a.get(k) != b.get(k))


def _progress(enabled: bool, initial: int, total: int):
    if enabled:
        from tqdm import tqdm
        return tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True)

    class _Null:
        def set_postfix(self, **k): pass
        def update(self, n): pass
        def close(self): pass
    return _Null()


def train(cfg: TrainConfig, say=print) -> dict:
    trainer = Trainer(cfg, say)
    summary = trainer.run()
    if cfg.samples and not summary["interrupted"]:
        say("\nsamples (prompt | continuation):")
        for prompt, cont in trainer.sample(cfg.samples, cfg.sample_tokens):
            say("-" * 72 + f"\n{prompt}|{cont}")
    return summary
