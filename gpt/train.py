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

import contextlib
import dataclasses
import json
import math
import os
import shutil
import signal
import threading
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

import nn
import tensorlite as tl
from nn import checkpoint as ckpt
from nn.optim import AdamW, clip_grad_norm_
from nn.schedule import warmup_cosine

from .data.errors import DataError
from .data.loader import BatchLoader
from .config import TrainConfig, cli_name
from .distributed import (stage_owners, agree_on_errors, check_same_options, check_world,
                          mpi_world)
from .run_folder import (LOG_NAME, RUN_FILES, TrainingError, atomic_json, RunLog, NoLog,
                         RunLock, writing, check_out, json_safe)
from .model import GPT, ConfigError, GPTConfig


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


def _token_counts(tokens, vocab_size: int, chunk: int = 1 << 24) -> np.ndarray:
    """How often each id occurs in ``tokens`` (an array, or a list of arrays: shards), counted
    in chunks so that a memory-mapped shard is never copied whole (as int64: 8x its size)."""
    parts = tokens if isinstance(tokens, (list, tuple)) else [tokens]
    counts = np.zeros(vocab_size, dtype=np.int64)
    for part in parts:
        for lo in range(0, len(part), chunk):
            c = np.bincount(np.asarray(part[lo:lo + chunk]), minlength=vocab_size)
            counts[:len(c)] += c[:vocab_size]
    return counts


def unigram_baseline(train_tokens, val_tokens, vocab_size: int) -> float:
    """Cross-entropy (nats/token) on the validation tokens of predicting every token by its
    training frequency alone (add-one smoothed): what a model that ignores context scores, so
    the validation loss of a model that learnt anything is far below it. Either side is an
    array of ids or a list of them (shards)."""
    counts = _token_counts(train_tokens, vocab_size)
    logp = np.log((counts + 1.0) / (counts.sum() + vocab_size))
    val_counts = _token_counts(val_tokens, vocab_size)
    return float(-(val_counts * logp).sum() / max(val_counts.sum(), 1))


def plot_losses(log_path: Path, png_path: Path, baseline: float | None = None,
                baseline_label: str = "unigram baseline") -> None:
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
        ax.axhline(baseline, ls="--", color="gray", label=baseline_label)
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


class _Interrupts:
    """Ctrl-C (SIGINT) or SIGTERM (what `timeout`, schedulers and `docker stop` send) asks the
    loop to stop at the next step boundary, where the state is whole, so the checkpoint taken
    there resumes exactly; a second one stops at once, without saving (the last checkpoint
    stays). Only the main thread receives signals."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.requested = False
        self.signum = None
        self._prev = {}

    def _handler(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested, self.signum = True, signum

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._prev = {s: signal.signal(s, self._handler) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc):
        for s, prev in self._prev.items():
            signal.signal(s, prev)
        return False


class _Peak:
    """The matrix-product FLOP/s that MFU is measured against. A peak measured while another
    process held a core is too low and gives an MFU above 100 %: so it is the best of several
    measurements, refreshed at each evaluation and whenever an MFU above 1 appears; what is
    still above 1 after that is logged as 1.0 with ``"mfu_capped": true``."""

    def __init__(self, device: str, ranks: int = 1):
        self.device, self.ranks = device, ranks
        self.flops = 0.0
        self.refresh()

    def refresh(self) -> None:
        # each rank has its share of the machine: the job's peak is the sum of theirs
        self.flops = max(self.flops, self.ranks * measure_gemm_peak(self.device))

    def mfu(self, flops_per_s: float) -> tuple[float, bool]:
        if flops_per_s > self.flops:
            self.refresh()
        mfu = flops_per_s / self.flops
        return min(mfu, 1.0), mfu > 1.0


def estimate_memory(model_cfg: GPTConfig, batch_size: int, dtype: str = "float32") -> int:
    """Bytes one training step needs at its peak: weights, gradients and AdamW's two moments
    (4 copies of N parameters), the activations backward keeps (~24 (B, T, C) arrays and the
    (B, H, T, T) attention probabilities per layer) and the logits with their gradient (2 x
    (B, T, V)). Fitted to tracemalloc's peak on the CPU within ~10 % over (B, T, C, L, H, V)
    grids (tests/test_gpt_train.py holds it to that)."""
    c = model_cfg
    item = np.dtype(dtype).itemsize
    b, t = batch_size, c.block_size
    n_params = (c.vocab_size * c.d_model * (1 if c.tie_weights else 2)
                + (c.block_size * c.d_model if c.positional == "learned" else 0)
                + c.n_layer * (12 * c.d_model ** 2 + 13 * c.d_model) + 2 * c.d_model)
    acts = c.n_layer * (24 * b * t * c.d_model + b * c.n_head * t * t)
    return int(item * (4 * n_params + acts + 2 * b * t * c.vocab_size))


def available_memory(device: str = "cpu") -> int | None:
    """Bytes the process can still allocate without swapping (None when unknown)."""
    if tl.backend.parse_device(device)[0] == "cuda":  # pragma: no cover - GPU only
        free, _ = tl.backend.array_module(device).cuda.Device(
            tl.backend.parse_device(device)[1]).mem_info
        return int(free)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_memory(model_cfg: GPTConfig, cfg: TrainConfig) -> None:
    need = estimate_memory(model_cfg, cfg.batch_size, cfg.dtype)
    have = available_memory(cfg.device)
    if have is not None and need > have:
        gib = 2 ** 30
        raise ConfigError(
            f"this configuration needs about {need / gib:.1f} GiB for a training step (batch "
            f"{cfg.batch_size}, block {model_cfg.block_size}, {model_cfg.n_layer} layers, "
            f"{model_cfg.n_head} heads, {model_cfg.d_model} wide, vocab {model_cfg.vocab_size}) "
            f"but {cfg.device} has {have / gib:.1f} GiB available; lower --batch-size (use "
            f"--grad-accum for the same batch) or --block-size")


# ------------------------------------------------------------------------------ training
class Trainer:
    """One training run. Single process: forward_backward -> clip -> optimizer_step. With
    data parallelism (--dp N under mpiexec) the same loop runs on every rank on its slice of
    the global batch, and only two parts change: reduce_gradients averages the gradients
    (bucketed all-reduces that started during backward; with --zero 1 a reduce-scatter) and
    the loss over the ranks, and the optimizer step of ZeRO-1 updates this rank's shard then
    all-gathers the parameters. Only rank 0 prints and writes files."""

    def __init__(self, cfg: TrainConfig, say=print):
        world = mpi_world()
        self.is_main = world is None or world.rank == 0
        self.cfg, self.say = cfg, (say if self.is_main else (lambda *a, **k: None))
        self.out = Path(cfg.out)
        # 1. every check, on every rank, before the ranks communicate
        err = None
        try:
            self._preflight(world)
        except (ConfigError, DataError, ckpt.CheckpointError, TrainingError) as e:
            err = e
        agree_on_errors(world, err)
        check_same_options(world, cfg)
        # 2. the groups, the model and the optimizer (collectives from here on)
        self.par = self.tp = None
        if world is not None:
            import parallel
            self.par = parallel.init_parallel(tp=cfg.parallel.tp, pp=cfg.parallel.pp)
        tl.manual_seed(cfg.seed)
        amp = cfg.dtype == "float16"                # mixed precision (nn/amp.py)
        self.model = GPT(self.model_cfg).to(cfg.device, "float32" if amp else cfg.dtype)
        self._init_weights()
        self.mp = None
        if amp:     # float32 masters for the optimizer, the model itself cast to float16
            from nn.amp import MixedPrecision
            self.mp = MixedPrecision(self.model, "float16")
        # the whole model's size and FLOPs (a tensor-parallel rank holds only its shards)
        self.n_params, self.flops_per_token = (self.model.num_parameters(),
                                               self.model.flops_per_token())
        if cfg.parallel.tp > 1:
            # the layers change, not the trainer: heads, MLP and vocabulary split over the
            # tensor-parallel group (rank 0's weights copied to the others)
            from parallel import tensor_parallel
            self.tp = tensor_parallel
            tensor_parallel.tensor_parallel_(self.model, self.par.tp)
        self.pipe = None
        trained = self.model
        if cfg.parallel.pp > 1:
            # each rank runs one stage of the blocks (of its TP shards, under --tp too);
            # micro-batches flow through the schedule
            import parallel
            first, blocks, last, tied = self.model.pipeline_pieces()
            stage = parallel.build_stage(first, blocks, last, self.par.pp.rank, self.par.pp.size)
            self.pipe = parallel.PipelineExecutor(stage, self.par.pp, cfg.parallel.pp_schedule,
                                                  num_micro_batches=cfg.grad_accum, tied=tied)
            self._owner = stage_owners(self.model, self.par.pp.size)
            trained = stage
        self.trained = trained                  # what this rank's optimizer steps
        self._norm_groups, self._norm_weight = self._grad_norm_parts()
        groups = param_groups(trained, cfg.weight_decay)
        if self.mp is not None:     # the same groups over the float32 masters
            ms = self.mp.parameters()
            groups = [{"params": [p for p in ms if p.ndim >= 2], "weight_decay": cfg.weight_decay},
                      {"params": [p for p in ms if p.ndim < 2], "weight_decay": 0.0}]
        adam = dict(lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=1e-8)
        self.ddp = None
        if self.par is not None and cfg.parallel.zero:
            import parallel        # the data-parallel group shards what this rank trains
            self.opt = parallel.ZeroAdamW(groups, self.par.dp, **adam)  # broadcasts rank 0's
        else:
            self.opt = AdamW(groups, **adam)
            if self.par is not None and self.par.dp.size > 1 and self.pipe is None:
                import parallel
                self.ddp = parallel.DataParallel(self.model, self.par.dp,
                                                 bucket_cap_mb=cfg.parallel.bucket_mb)
        self.train_loader, self.val_loader = self._make_loaders()
        self.inspected = None
        if cfg.inspect_interval:                  # --inspect-interval (gpt/inspect.py)
            from .inspect import TrainingHealth
            self.health = TrainingHealth(self.model)
            self._probe = self.val_loader.get_batch(0)[0][:1]   # the same sequence each time
        self.eval_steps = min(cfg.eval_steps, self.val_loader.steps_per_epoch)
        self.step = 0
        self.best_val = float("inf")
        self.best_step = None
        self.baseline = None
        self.last_ckpt: Path | None = None     # this run's newest checkpoint
        self.saved_step: int | None = None     # and its step
        # 3. --resume: load what the preflight chose and checked; run() writes only after
        self.resumed_from = self._load_resume_point() if self._resume_point else None

    # -- what a subclass (SFT, DPO) replaces --------------------------------------------------
    baseline_label = "unigram baseline"

    def _init_weights(self) -> None:
        """The model's starting weights: GPT's own initialisation (fine-tuning loads them)."""

    def _make_loaders(self):
        """(train loader, validation loader): each rank reads its slice of the global batch."""
        cfg, bs = self.cfg, self.model_cfg.block_size
        dp = self.par.dp if self.par is not None else None
        train = BatchLoader(self._train_path, cfg.batch_size, bs, seed=cfg.seed,
                            rank=dp.rank if dp else 0, world_size=dp.size if dp else 1)
        return train, BatchLoader(self._val_path, cfg.batch_size, bs, mode="sequential")

    def _baseline(self) -> float:
        """The dashed line of the plot: here the unigram model's validation loss."""
        return unigram_baseline(self.train_loader.token_parts(), self.val_loader.token_parts(),
                                self.tokenizer.vocab_size)

    def _batch_loss(self, batch):
        """The loss of one micro-batch (this rank's rows), a scalar Tensor."""
        x, y = batch
        x, y = tl.tensor(x, device=self.cfg.device), tl.tensor(y, device=self.cfg.device)
        if self.mp is not None:             # float16 logits, the loss in float32
            from nn import functional as F
            return F.cross_entropy(self.model(x)[0].float(), y)
        return self.model(x, y)[1]

    def _micro_weights(self, batches) -> list:
        """The factor of each micro-batch's loss in the step's: its share of the step's
        batch (every micro-batch is full here: 1 / grad_accum each)."""
        return [1.0 / len(batches)] * len(batches)

    def _val_loss(self) -> float:
        return evaluate(self.model, self.val_loader, self.eval_steps)

    loss_is_ce = True           # a cross-entropy (its perplexity is shown)
    rows_per_example = 1        # rows of block_size tokens per example of the batch

    def _val_extra(self) -> dict:
        """More numbers of the last evaluation, logged and printed (name -> value)."""
        return {}

    def _log_extra(self) -> dict:
        """More numbers of the last step for the log record (collective: every rank)."""
        return {"loss_scale": self.mp.scaler.get_scale()} if self.mp is not None else {}

    def _save_tokenizer(self) -> None:
        from .data.tokenizer import tokenizer_filename
        tok_file = self.out / tokenizer_filename(self.tokenizer.kind)
        if self.resumed_from is None or not tok_file.exists():
            self.tokenizer.save(tok_file)   # for sample

    def _preflight(self, world) -> None:
        """Every check that needs no communication: options, the launcher's ranks, --out,
        the data, memory, and under --resume the checkpoint to continue from."""
        from .data.prepare import load_prepared
        cfg = self.cfg
        cfg.validate()
        check_world(cfg, world)
        check_out(cfg)
        self.meta, self.tokenizer, self._train_path, self._val_path = load_prepared(cfg.data)
        self.model_cfg = dataclasses.replace(cfg.model, vocab_size=self.tokenizer.vocab_size)
        check_memory(self.model_cfg, cfg)
        self._resume_point = self._find_resume_point() if cfg.resume else None

    # -- checkpoints -------------------------------------------------------------------------
    def _state(self) -> dict:
        return {"step": self.step, "best_val": self.best_val, "best_step": self.best_step,
                **({"amp": self.mp.scaler.state_dict()} if self.mp is not None else {}),
                "loader": self.train_loader.state_dict(),
                "rng": tl.default_generator.get_state(),
                "train_config": {**asdict(self.cfg), "data": self.cfg.data and
                                 os.path.abspath(self.cfg.data),
                                 "model": self.model_cfg.to_dict()},
                "data_meta": self.meta}

    def save(self, name: str) -> Path:
        """Save a checkpoint (every rank calls this: ZeRO-1 gathers its state from all of
        them, in the unsharded AdamW's format; rank 0 writes)."""
        path = self.out / "ckpt" / name
        model, opt = self.model, (self.opt.unsharded() if hasattr(self.opt, "unsharded")
                                  else self.opt)
        if self.mp is not None:     # the float32 masters are the model's weights
            model = GPT(self.model_cfg).to(self.cfg.device, "float32")
            state = {k: v.data.astype(np.float32) for k, v in self.model.state_dict().items()}
            state.update(self.mp.state_dict()["master"])
            model.load_state_dict(state)
        if self.pipe is not None:   # every stage's weights and moments, on every rank
            opt = self._sync_pipeline(opt)
        if self.tp is not None:     # the dense model's tensors, whatever the degree
            model, opt = self._dense_copy(opt)
        if self.is_main:
            with writing(path):
                ckpt.save_checkpoint(path, model=model, optimizer=opt,
                                     config=self.model_cfg.to_dict(),
                                     extra=json_safe(self._state()))
        if name == "latest":
            self.last_ckpt, self.saved_step = path, self.step
        return path

    def _find_resume_point(self) -> Path | None:
        """The checkpoint --resume continues from, checked (files, model, data, batch size,
        steps) without loading anything: ckpt/latest, or ckpt/best (with a warning) when latest
        is damaged. None when --out holds no run yet."""
        root, damaged = self.out / "ckpt", []
        for which in ("latest", "best"):
            path = root / which
            try:
                ckpt.verify_checkpoint(path)
            except ckpt.CheckpointNotFoundError:
                continue
            except ckpt.CheckpointError as e:
                damaged.append(str(e))
                continue
            meta = ckpt.load_checkpoint(path)           # meta only: nothing loaded yet
            self._check_same_run(path, meta)
            extra = meta["extra"]
            was = (extra.get("loader") or {}).get("batch_size")
            if was is not None and was != self.cfg.batch_size:
                raise ConfigError(f"--resume: the run was trained with --batch-size {was}, not "
                                  f"{self.cfg.batch_size}; resume with --batch-size {was} (the "
                                  "order of the data depends on it)")
            step = int(extra["step"])
            if step >= self.cfg.max_steps:
                raise ConfigError(f"--resume: the run in {self.out} is at step {step} and "
                                  f"--max-steps is {self.cfg.max_steps}: nothing to train; pass a "
                                  "larger --max-steps to continue it")
            if damaged:
                self.say(f"warning: {damaged[0]}\nresuming from {path} (step {step}) instead")
            return path
        if damaged:
            raise TrainingError("--resume: " + " ".join(damaged))
        self.say(f"--resume: no checkpoint in {root}; starting fresh")
        return None

    def _whole_adamw(self) -> AdamW:
        """An AdamW (this run's hyperparameters, no state) over every parameter of this
        rank's model: the whole model, TP shards under --tp, every stage under --pp."""
        return self._adamw_over(self.model)

    def _adamw_over(self, model) -> AdamW:
        return AdamW([dict(h, params=ps) for h, ps in zip(self.opt.param_groups, [
            x["params"] for x in param_groups(model, self.cfg.weight_decay)])])

    def _dense_copy(self, opt):
        """A dense GPT and AdamW holding a tensor-parallel model's gathered state and
        ``opt``'s (an AdamW over the whole TP model), for a checkpoint that loads under any
        degree (collective over the TP group)."""
        sd = self.tp.gather_state_dict(self.model, self.par.tp)
        osd = self.tp.gather_optimizer_state_dict(opt, self.model, self.par.tp)
        dense = GPT(self.model_cfg).to(self.cfg.device, self.cfg.dtype)
        dense.load_state_dict({k: v.data for k, v in sd.items()})
        dense_opt = self._adamw_over(dense)
        dense_opt.load_state_dict(osd)
        return dense, dense_opt

    def _sync_pipeline(self, opt=None):
        """Make every rank's whole model current (each stage trains its own blocks; the
        others are stale): each weight broadcast from the stage that owns it (under --tp,
        each TP rank's shard from its own stage). With ``opt`` (an AdamW over this stage),
        also return an AdamW over the whole model holding every stage's moments, for a
        checkpoint in the one-process format."""
        g = self.par.pp
        full = self._whole_adamw() if opt is not None else None
        for name, p in self.model.named_parameters():
            root = self._owner[name]
            g.broadcast(p.data, root=root)
            if full is None or self.step == 0:
                continue
            mine = opt.state.get(p) if g.rank == root else None
            st = {k: (mine[k] if mine else backend_zeros_like(p.data)) for k in
                  ("exp_avg", "exp_avg_sq")}
            n = np.array([mine["step"] if mine else 0], dtype=np.int64)
            for a in (st["exp_avg"], st["exp_avg_sq"], n):
                g.broadcast(a, root=root)
            full.state[p] = {"step": int(n[0]), **st}
        return full

    def _load_resume_point(self) -> Path:
        path = self._resume_point
        if self.mp is not None:     # float32 weights -> the masters (and the float16 model)
            full = GPT(self.model_cfg).to(self.cfg.device, "float32")
            meta = ckpt.load_checkpoint(path, model=full, optimizer=self.opt)
            scaler = (meta["extra"] or {}).get("amp")    # None: a float32 run resumed in AMP
            self.mp.load_state_dict({"master": {n: p.data for n, p in full.named_parameters()},
                                     **({"scaler": scaler} if scaler else {"scaler": dict(
                                         self.mp.scaler.state_dict())})})
        elif self.tp is None and self.pipe is None and not hasattr(self.opt, "unsharded"):
            meta = ckpt.load_checkpoint(path, model=self.model, optimizer=self.opt)
        else:
            # the dense checkpoint into this rank's whole model (its TP shards under --tp),
            # then this rank's part of the optimizer state (its stage's, its ZeRO shard)
            whole = self._whole_adamw()
            if self.tp is not None:
                dense = GPT(self.model_cfg).to(self.cfg.device, self.cfg.dtype)
                dense_opt = self._adamw_over(dense)
                meta = ckpt.load_checkpoint(path, model=dense, optimizer=dense_opt)
                self.tp.load_dense_state_dict(self.model, dense.state_dict(), self.par.tp)
                self.tp.load_dense_optimizer_state_dict(whole, self.model,
                                                        dense_opt.state_dict(), self.par.tp)
            else:
                meta = ckpt.load_checkpoint(path, model=self.model, optimizer=whole)
            mine = AdamW([dict(g) for g in self.opt.param_groups])
            ids = {id(p) for grp in mine.param_groups for p in grp["params"]}
            mine.state = {p: st for p, st in whole.state.items() if id(p) in ids}
            if hasattr(self.opt, "unsharded"):          # ZeRO-1 keeps its shard of it
                self.opt.load_state_dict(mine.state_dict())
            else:
                self.opt.state = mine.state
        extra = meta["extra"]
        try:
            self.train_loader.load_state_dict(extra["loader"])
        except DataError as e:
            raise ConfigError(f"--resume: {e}") from None
        self.step = int(extra["step"])
        best = extra.get("best_val")
        self.best_val = float("inf") if best is None else float(best)
        self.best_step = extra.get("best_step")
        tl.default_generator.set_state(extra["rng"])
        self.last_ckpt, self.saved_step = path, self.step
        return path

    def _check_same_run(self, path: Path, meta: dict) -> None:
        saved_cfg = GPTConfig.from_dict(meta["config"])
        extra = meta.get("extra") or {}
        saved = extra.get("data_meta") or {}
        keys = ("corpus", "options", "tokenizer", "vocab_size", "train", "val")
        differ = [k for k in keys if saved.get(k) != self.meta.get(k)]
        if differ:
            was = (extra.get("train_config") or {}).get("data")
            opts = {k: (v, (self.meta.get("options") or {}).get(k)) for k, v in
                    (saved.get("options") or {}).items()
                    if (self.meta.get("options") or {}).get(k) != v}
            same = (was is None and self.cfg.data is None) or bool(
                was and self.cfg.data and os.path.abspath(self.cfg.data) == was)
            if same and opts and "options" in differ:   # an option that shapes the data changed
                raise ConfigError("--resume: " + ", ".join(
                    f"{cli_name(k)} {now} (the run had {old})" for k, (old, now) in opts.items())
                    + f" would change what the run learns from; resume {self.out} without "
                    "changing it, "
                    "or start a new run in another --out")
            if was is None and self.cfg.data is None:
                raise ConfigError(f"--resume: the embedded set is not what the run in "
                                  f"{self.out} was trained on (its {', '.join(differ)} differ: "
                                  "another Python's standard library?); start a new run in "
                                  "another --out")
            if was and self.cfg.data and os.path.abspath(self.cfg.data) == was:
                raise ConfigError(f"--resume: the data in {was} changed since the run in "
                                  f"{self.out} started (its {', '.join(differ)} differ); "
                                  "restore it, or train on it into another --out")
            what = lambda d: "the embedded set" if d is None else d     # noqa: E731
            raise ConfigError(f"--resume: the run in {self.out} was trained on {what(was)}, but "
                              f"--data {what(self.cfg.data)} holds other data (its "
                              f"{', '.join(differ)} differ); "
                              + (f"pass --data {was}" if was else "leave out --data")
                              + ", or train into another --out")
        if saved_cfg != self.model_cfg:
            raise ConfigError(f"--resume: the checkpoint in {path} is for a different model "
                              f"({_diff(saved_cfg.to_dict(), self.model_cfg.to_dict())}); use the "
                              "same options or another --out")

    # -- one step ----------------------------------------------------------------------------
    # A step is four parts, each replaceable on its own: forward_backward (the micro-batches),
    # reduce_gradients (nothing for one process), clip (the global gradient norm) and
    # optimizer_step.
    def forward_backward(self) -> float:
        """Sum the gradients of grad_accum micro-batches; the mean loss over them. Under
        data parallelism only the last micro-batch's backward starts the all-reduces."""
        cfg = self.cfg
        batches = [self.train_loader.next_batch() for _ in range(cfg.grad_accum)]
        if self.pipe is not None:     # the whole global batch, as the schedule's micro-batches
            x = np.concatenate([b[0] for b in batches])
            y = np.concatenate([b[1] for b in batches])
            return self.pipe.forward_backward(tl.tensor(x, device=cfg.device),
                                              tl.tensor(y, device=cfg.device),
                                              self._micro_weights(batches))
        weights = self._micro_weights(batches)
        total = 0.0
        for i, (batch, w) in enumerate(zip(batches, weights)):
            sync = self.ddp is None or i == cfg.grad_accum - 1
            with contextlib.nullcontext() if sync else self.ddp.no_sync():
                loss = self._batch_loss(batch)
                if self.mp is not None:
                    self.mp.backward(loss * w)      # scaled by the loss scale
                else:
                    (loss * w).backward()
            total += loss.item() * w
        return total

    def reduce_gradients(self, loss: float) -> float:
        """Average the gradients over the data-parallel ranks (wait for the bucketed
        all-reduces, or ZeRO-1's reduce-scatter) and return the loss of the whole global batch,
        the number one process would log."""
        if self.par is None:
            return loss
        import parallel
        if self.ddp is not None:
            self.ddp.finish()
        elif hasattr(self.opt, "reduce_gradients"):       # ZeRO-1
            self.opt.reduce_gradients()
        elif self.pipe is not None and self.par.dp.size > 1:
            # pipeline replicas: average each stage weight's gradient over the data-parallel
            # group after the schedule (the hooks would fire once per micro-batch)
            dp = self.par.dp
            for grp in self.opt.param_groups:
                for p in grp["params"]:
                    if p.grad is not None:
                        dp.all_reduce(p.grad.data)
                        p.grad.data /= dp.size
        # (tensor parallelism alone: every rank of the group holds the same loss already)
        return parallel.all_reduce_mean(loss, self.par.dp) if self.par.dp.size > 1 else loss

    def _grad_norm_parts(self):
        """The groups over which one model replica is spread (tensor, pipeline) and the share
        of each parameter's squared gradient this rank counts in the global norm (see
        parallel.grad_norm): 1/tp for a TP-replicated tensor, 0 for the last stage's copy of
        the tied embedding. (None, None) when this rank holds the whole model."""
        if self.par is None or (self.tp is None and self.pipe is None):
            return (), None
        tp_w = self.tp.norm_weight(self.model, self.par.tp) if self.tp is not None else None
        pp_w = self.pipe.norm_weight if self.pipe is not None else None

        def weight(p):
            return (tp_w(p) if tp_w else 1.0) * (pp_w(p) if pp_w else 1.0)
        return [g for g, on in ((self.par.tp, self.tp), (self.par.pp, self.pipe)) if on], weight

    def clip(self) -> float:
        """Clip the global gradient norm (the whole model's, as one process computes it)."""
        cfg = self.cfg
        if cfg.grad_clip <= 0:
            return 0.0
        if hasattr(self.opt, "clip_grad_norm_"):      # ZeRO-1: the norm of all the shards
            return self.opt.clip_grad_norm_(cfg.grad_clip, groups=self._norm_groups,
                                            weight=self._norm_weight)
        if self._norm_weight is not None:             # the pieces of one model over ranks
            import parallel
            return parallel.grad_norm.clip_grad_norm_(self.trained.parameters(), cfg.grad_clip,
                                                      self._norm_groups, self._norm_weight)
        return clip_grad_norm_(self.model.parameters(), cfg.grad_clip)

    def optimizer_step(self) -> None:
        self.opt.step()
        self.opt.zero_grad()

    def train_step(self) -> tuple[float, float]:
        """One optimizer step over grad_accum micro-batches -> (loss, grad norm)."""
        cfg = self.cfg
        lr = warmup_cosine(self.step, cfg.lr, cfg.warmup_steps, cfg.max_steps, cfg.min_lr)
        for g in self.opt.param_groups:
            g["lr"] = lr
        if self.par is not None:
            # each data-parallel rank draws its own dropout masks (the same seed on every rank
            # would drop the same units for every slice of the batch), as a function of (seed,
            # rank, step) so that a resumed run draws them again without saving every rank's
            # state; tensor-parallel ranks share it outside their regions (Megatron)
            seed = int(np.random.SeedSequence(
                [cfg.seed, self.par.dp.rank, self.step]).generate_state(1)[0])
            if self.tp is not None:
                self.tp.manual_seed(seed, self.par.tp)
            else:
                tl.manual_seed(seed)
        loss = self.reduce_gradients(self.forward_backward())
        if not math.isfinite(loss):
            self.opt.zero_grad()
            if self.mp is not None:
                self.mp.zero_grad()
            return loss, float("nan")
        if self.mp is not None:     # unscale into the masters, skip on overflow, clip, AdamW
            info = self.mp.step(self.opt, max_norm=cfg.grad_clip or None)
            self.opt.zero_grad()
            return loss, (info.grad_norm if info.grad_norm is not None else 0.0)
        due = cfg.inspect_interval and (self.step + 1) % cfg.inspect_interval == 0
        if due:
            self.health.measure_grads()           # the gradients backward produced
        norm = self.clip()
        if due:
            self.health.snapshot_weights()
        self.optimizer_step()
        if due:                                   # logged by the loop with this step
            self.inspected = self.health.finish(self._probe)
        return loss, norm

    # -- the loop ------------------------------------------------------------------------------
    def _start_writing(self):
        """The first writes of the run (rank 0's): every check has passed."""
        cfg = self.cfg
        if not self.is_main:
            return NoLog()
        with writing(self.out):
            self.out.mkdir(parents=True, exist_ok=True)
            self._lock = RunLock(self.out)      # held until the run ends (or the process)
            self._lock.acquire()
            if cfg.overwrite:
                for name in RUN_FILES:
                    path = self.out / name
                    if path.is_dir() and not path.is_symlink():
                        shutil.rmtree(path)
                    elif path.exists() or path.is_symlink():
                        path.unlink()
            self._save_tokenizer()
            return RunLog(self.out / LOG_NAME, self.step if self.resumed_from else None)

    def run(self) -> dict:
        """Train to max_steps (or a stop); rank 0 holds the run folder's lock meanwhile."""
        self._lock = None
        try:
            return self._run()
        finally:
            if self._lock is not None:
                self._lock.release()

    def _run(self) -> dict:
        cfg = self.cfg
        resumed = self.resumed_from is not None
        log = self._start_writing()
        self.baseline = self._baseline()
        peak = _Peak(cfg.device, ranks=self.par.world.size if self.par else 1)
        tokens_per_step = (cfg.batch_size * cfg.grad_accum * self.model_cfg.block_size
                           * self.rows_per_example)
        layout = (f"; {self.par.dp.size} data-parallel x {self.par.tp.size} tensor-parallel x "
                  f"{self.par.pp.size} pipeline ranks" if self.par is not None else "")
        self.say(f"model: {self.n_params:,} parameters "
                 f"({self.model_cfg.n_layer} layers, {self.model_cfg.n_head} heads, "
                 f"{self.model_cfg.d_model} wide, block {self.model_cfg.block_size}); "
                 f"{tokens_per_step} tokens/step; {self.baseline_label} {self.baseline:.3f} nats"
                 + layout + (f"; resumed at step {self.step}" if resumed else "")
                 + ("; compiled kernels on (TENSORLITE_JIT)" if tl.jit.is_enabled() else ""))
        if self.pipe is not None and cfg.parallel.pp_timetable:
            import parallel
            self.say(parallel.timetable(parallel.get_schedule(cfg.parallel.pp_schedule),
                                        cfg.parallel.pp, cfg.grad_accum))
        bar = _progress(cfg.progress and self.is_main, self.step, cfg.max_steps)
        interrupted, stopped = False, None
        ckpt_every = cfg.ckpt_interval or cfg.eval_interval
        kill_at = int(os.environ.get("TENSORLITE_TEST_KILL_AT_STEP", "-1"))  # tests: SIGKILL here
        t_last, window_tokens = time.perf_counter(), 0
        last_save = time.monotonic()
        try:
            with _Interrupts() as ctrl_c:
                while self.step < cfg.max_steps:
                    if self.step == kill_at:
                        os.kill(os.getpid(), signal.SIGKILL)
                    loss, norm = self.train_step()
                    if not math.isfinite(loss):
                        if not cfg.skip_nonfinite:
                            stopped = self._nonfinite_message(loss)
                            break
                        log.write({"step": self.step + 1, "skipped": True, "loss": None})
                    self.step += 1
                    window_tokens += tokens_per_step
                    if self.inspected is not None:
                        log.write({"step": self.step, "inspect": self.inspected})
                        self.inspected = None
                    lr = self.opt.param_groups[0]["lr"]
                    if self.step % cfg.log_interval == 0 or self.step == cfg.max_steps:
                        more = self._log_extra()
                        now = time.perf_counter()
                        tps = window_tokens / max(now - t_last, 1e-9)
                        mfu, capped = peak.mfu(tps * self.flops_per_token)
                        t_last, window_tokens = time.perf_counter(), 0
                        if math.isfinite(loss):
                            rec = {"step": self.step, "loss": loss, "lr": lr,
                                   "grad_norm": round(norm, 5), "tokens_per_s": round(tps, 1),
                                   "mfu": round(mfu, 4), **more}
                            log.write({**rec, "mfu_capped": True} if capped else rec)
                        bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.1e}", tok_s=f"{tps:,.0f}",
                                        mfu=f"{100 * mfu:.0f}%")
                    bar.update(1)
                    evaluated = saved = False
                    if self.step % cfg.eval_interval == 0 or self.step == cfg.max_steps:
                        val = self._evaluate(log)
                        peak.refresh()
                        evaluated = True
                        if not math.isfinite(val):   # weights that blew up are not saved
                            stopped = self._nonfinite_message(val, "validation loss")
                            break
                    due = bool(cfg.ckpt_minutes) and (time.monotonic() - last_save
                                                      >= 60 * cfg.ckpt_minutes)
                    # every rank must take the same decisions (a save is collective under
                    # ZeRO-1, a signal may reach the ranks at different moments)
                    due, stop, signum = self._agree(due, ctrl_c.requested, ctrl_c.signum or 0)
                    if self.step % ckpt_every == 0 or self.step == cfg.max_steps or due:
                        self.save("latest")
                        last_save, saved = time.monotonic(), True
                    if stop and self.step < cfg.max_steps:
                        interrupted = signal.Signals(signum or signal.SIGINT).name
                        if not saved:
                            self.save("latest")
                        self.say(f"\ninterrupted ({interrupted}): saved step {self.step} to "
                                 f"{self.out / 'ckpt' / 'latest'}; continue with --resume")
                        break
                    if evaluated or saved:
                        t_last, window_tokens = time.perf_counter(), 0  # tokens/s of training only
        except KeyboardInterrupt:
            # a second Ctrl-C (or one outside the main thread): the step was cut short, so its
            # state is not saved; the last checkpoint is a whole step
            interrupted = "SIGINT"
            self.say("\nstopped without saving: " + (
                f"the last checkpoint is {self.last_ckpt}; continue from it with --resume"
                if self.last_ckpt else "no checkpoint of this run exists yet"))
        finally:
            bar.close()
            log.close()
        summary = {"step": self.step, "checkpoint_step": self.saved_step,
                   "best_val_loss": self.best_val, "best_step": self.best_step,
                   ("unigram_baseline" if self.baseline_label == "unigram baseline" else
                    "baseline"): self.baseline, "baseline_label": self.baseline_label,
                   "interrupted": interrupted, "stopped": stopped, "out": str(self.out)}
        if self.is_main:
            with writing(self.out / "summary.json"):
                atomic_json(self.out / "summary.json", json_safe(summary))
        if stopped:
            raise TrainingError(stopped)
        return summary

    def _agree(self, *values: int) -> tuple:
        """Each value the largest over the ranks (flags: true on every rank if on any; one
        process: as given)."""
        if self.par is None:
            return values
        a = np.array(values, dtype=np.int64)
        self.par.world.all_reduce(a, op="max")
        return tuple(int(v) for v in a)

    def _nonfinite_message(self, loss: float, what: str = "loss") -> str:
        where = (f"the last good checkpoint of this run is {self.last_ckpt} (step "
                 f"{self.saved_step})" if self.last_ckpt else "no checkpoint of this run exists yet")
        skip = ", or pass --skip-nonfinite to skip such steps" if what == "loss" else ""
        return f"non-finite {what} ({loss}) at step {self.step}: stopping; {where} (lower --lr{skip})"

    def _evaluate(self, log: RunLog) -> float:
        if self.pipe is not None:        # every rank evaluates the whole, current model
            self._sync_pipeline()
        val = self._val_loss()
        extra = self._val_extra()
        log.write({"step": self.step, "val_loss": val,
                   **({"val_ppl": round(math.exp(min(val, 50)), 3)} if self.loss_is_ce else {}),
                   **extra})
        if not math.isfinite(val):
            return val
        if val < self.best_val:
            self.best_val, self.best_step = val, self.step
            self.save("best")
        if self.is_main:
            with writing(self.out / "loss.png"):
                plot_losses(self.out / LOG_NAME, self.out / "loss.png", self.baseline,
                            self.baseline_label)
            if self.cfg.inspect_interval:
                from .inspect import plot_internals
                with writing(self.out / "internals.png"):
                    plot_internals(self.out / LOG_NAME, self.out / "internals.png")
        ppl = f"perplexity {math.exp(min(val, 50)):.1f}; " if self.loss_is_ce else ""
        more = "".join(f", {k.replace('val_', '').replace('_', ' ')} {v:.4g}"
                       for k, v in extra.items())
        self.say(f"step {self.step}: validation loss {val:.4f}{more} ({ppl}"
                 f"{self.baseline_label} {self.baseline:.3f})")
        return val

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


def backend_zeros_like(a):
    return tl.backend.xp_of(a).zeros_like(a)


def train(cfg: TrainConfig, say=print) -> dict:
    trainer = Trainer(cfg, say)
    summary = trainer.run()
    if trainer.pipe is not None:
        trainer._sync_pipeline()         # the whole model current, for the samples
    if cfg.samples and not summary["interrupted"] and (trainer.is_main or trainer.tp):
        samples = trainer.sample(cfg.samples, cfg.sample_tokens)   # every TP rank generates
        if trainer.is_main:
            say("\nsamples (prompt | continuation):")
            for prompt, cont in samples:
                say("-" * 72 + f"\n{prompt}|{cont}")
    return summary
