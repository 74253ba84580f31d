"""Training configuration: one dataclass that contains the model's and the parallel layout's.

Every option exists once, as a dataclass field whose metadata carries its help text: the
CLI (`tensorlite-gpt train --help`), TOML files (`--config`) and checkpoints are all derived
from these fields, so a new option is added here and nowhere else.

    TrainConfig            data, optimisation, evaluation, checkpoints, device
      .model: GPTConfig    the architecture (gpt.model); vocab_size comes from the tokenizer
      .parallel: ParallelConfig   data-parallel degree, ZeRO stage, bucket size

Flat dicts (the command line, a TOML [train] table) name fields of any of the three; the
model's size fields default to the chosen ``preset``'s values.
"""
from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import asdict, dataclass, field, fields

import tensorlite as tl

from .model import PRESETS, ConfigError, GPTConfig

DEFAULT_DATA = "data/stdlib"


def option(default=None, help: str = "", *, flag: str | None = None, cli: bool = True,
           default_text: str | None = None, factory=None):
    """A config field with its CLI help. ``flag``: for a bool that defaults to True, the
    name of the switch that turns it off (``bias`` -> ``--no-bias``). ``default_text``: how
    the default reads in --help when the value alone would not say it."""
    md = {"help": help, "cli": cli, "flag": flag, "default_text": default_text}
    if factory is not None:
        return field(default_factory=factory, metadata=md)
    return field(default=default, metadata=md)


@dataclass
class ParallelConfig:
    dp: int = option(1, "data-parallel degree: the global batch is split over this many "
                        "replicas; dp x tp x pp = the MPI ranks (mpiexec -n N)",
                     default_text="the ranks / (tp x pp)")
    tp: int = option(1, "tensor-parallel degree: each block's heads, MLP and the vocabulary "
                        "split over this many adjacent ranks (Megatron-LM); dp x tp x pp = ranks")
    pp: int = option(1, "pipeline-parallel degree: the blocks split into this many stages, "
                        "one a rank; --grad-accum micro-batches flow through them")
    pp_schedule: str = option("1f1b", "pipeline schedule: gpipe | 1f1b")
    pp_timetable: bool = option(False, "print the pipeline schedule's timetable (which stage "
                                       "runs which micro-batch when, and the bubble) at the start")
    zero: int = option(0, "ZeRO stage: 0 = off, 1 = shard the optimizer state over the "
                          "data-parallel ranks")
    bucket_mb: float = option(25.0, "gradient all-reduce bucket size in MB")

    def validate(self) -> None:
        for k in ("dp", "tp", "pp"):
            if not isinstance(getattr(self, k), int) or getattr(self, k) < 1:
                raise ConfigError(f"--{k} must be an integer >= 1, got {getattr(self, k)!r}")
        if self.pp_schedule not in ("gpipe", "1f1b"):
            raise ConfigError(f"--pp-schedule must be gpipe or 1f1b, got {self.pp_schedule!r}")
        if self.zero not in (0, 1):
            raise ConfigError(f"--zero must be 0 or 1, got {self.zero!r}")
        if not (isinstance(self.bucket_mb, (int, float)) and math.isfinite(self.bucket_mb)
                and self.bucket_mb > 0):
            raise ConfigError(f"--bucket-mb must be a number > 0, got {self.bucket_mb!r}")


@dataclass
class TrainConfig:
    data: str = option(DEFAULT_DATA, "prepared data folder (the default is the Python standard "
                                     "library, prepared on first use; with --resume, the run's "
                                     "own data)")
    out: str = option("runs/gpt", "run folder for checkpoints, log.jsonl, loss.png")
    preset: str = option("tiny", f"model size: {' | '.join(PRESETS)}; sets n_layer, n_head, "
                                 "d_model, block_size (each overridable)")
    model: GPTConfig = option(help="the architecture", cli=False, factory=GPTConfig)
    parallel: ParallelConfig = option(help="the parallel layout", cli=False,
                                      factory=ParallelConfig)
    batch_size: int = option(16, "sequences per micro-batch (the global one: split over "
                                 "data-parallel ranks)")
    grad_accum: int = option(1, "micro-batches per optimizer step")
    max_steps: int = option(2000, "optimizer steps")
    lr: float = option(2e-3, "peak learning rate")
    min_lr: float = option(2e-4, "final learning rate of the cosine decay")
    warmup_steps: int | None = option(None, "linear warmup steps",
                                      default_text="min(50, max_steps / 10)")
    weight_decay: float = option(0.1, "AdamW decoupled weight decay on matrices")
    beta1: float = option(0.9, "AdamW beta1")
    beta2: float = option(0.95, "AdamW beta2")
    grad_clip: float = option(1.0, "clip the global gradient norm to this, 0 = off")
    eval_interval: int = option(500, "steps between evaluations")
    eval_steps: int = option(20, "validation batches per evaluation")
    log_interval: int = option(10, "steps between log records")
    ckpt_interval: int | None = option(None, "steps between checkpoints",
                                       default_text="every evaluation")
    ckpt_minutes: float = option(5.0, "also save ckpt/latest every this many minutes, so a "
                                      "killed run loses minutes, not the run; 0 = off")
    inspect_interval: int = option(0, "every this many steps, log per-layer gradient norms, "
                                      "update/weight ratios and activation statistics and plot "
                                      "internals.png (gpt/inspect.py); 0 = off")
    seed: int = option(1337, "random seed")
    device: str = option("cpu", "cpu | cuda | cuda:N")
    dtype: str = option("float32", "float32 | float64 | float16 (mixed precision: float16 "
                                   "compute, float32 master weights, dynamic loss scaling)")
    samples: int = option(3, "samples printed at the end")
    sample_tokens: int = option(120, "tokens per sample")
    resume: bool = option(False, "continue from the latest checkpoint in --out, exactly")
    overwrite: bool = option(False, "replace the run already in --out (its checkpoints, log "
                                    "and plots are deleted when training starts)")
    skip_nonfinite: bool = option(False, "skip steps whose loss is inf/nan instead of stopping")
    progress: bool = option(True, "no progress bar", flag="no_progress")

    # -- building one ----------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        """From a flat dict of fields of TrainConfig, GPTConfig and ParallelConfig (the
        command line, TOML), or a nested one (``asdict`` of a TrainConfig). The model's size
        fields not given take the preset's values."""
        d = dict(d)
        model = dict(d.pop("model", None) or {})
        parallel = dict(d.pop("parallel", None) or {})
        own = {f.name for f in fields(cls)} - {"model", "parallel"}
        model_keys = {s.name for s in specs(GPTConfig)}
        parallel_keys = {s.name for s in specs(ParallelConfig)}
        for k in list(d):
            if k in model_keys:
                model[k] = d.pop(k)
            elif k in parallel_keys:
                parallel[k] = d.pop(k)
        unknown = sorted(set(d) - own)
        if unknown:
            raise ConfigError(f"unknown training option(s) {unknown}")
        preset = d.get("preset", cls.preset)
        if preset not in PRESETS:
            raise ConfigError(f"unknown preset {preset!r}; choose from {sorted(PRESETS)}")
        model = {**PRESETS[preset], **model}
        try:
            parallel_cfg = ParallelConfig(**parallel)
            model_cfg = GPTConfig(**model)
        except TypeError as e:
            raise ConfigError(f"training options: {e}") from None
        return cls(model=model_cfg, parallel=parallel_cfg, **d)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def for_resume(cls, saved: dict, given: dict) -> tuple["TrainConfig", dict]:
        """The config of a resumed run: the options it was started with (``saved``, from its
        checkpoint), overridden by those given now. Returns it and ``{option: (was, now)}``
        for what the given options change, so the caller can say so."""
        base = _flat(saved)
        for k in ("resume", "overwrite", "progress"):   # how to run now, not what the run is
            base.pop(k, None)
        changed = {k: (base[k], v) for k, v in given.items()
                   if k in base and base[k] != v and k not in ("resume", "overwrite")}
        return cls.from_dict({**base, **given, "resume": True}), changed

    # -- checking one ----------------------------------------------------------------------
    def validate(self, model: bool = True) -> None:
        """Every value in range, before anything is read or written (the CLI prints the
        ConfigError as one line). ``model``: also the layout against the model's shape."""
        ints = dict(batch_size=1, grad_accum=1, max_steps=1, eval_interval=1, eval_steps=1,
                    log_interval=1, ckpt_interval=1, samples=0, sample_tokens=0, seed=0,
                    inspect_interval=0)
        for k, lo in ints.items():
            v = getattr(self, k)
            if k == "ckpt_interval" and v is None:
                continue
            if not isinstance(v, int) or isinstance(v, bool) or v < lo:
                raise ConfigError(f"{cli_name(k)} must be an integer >= {lo}, got {v!r}")
        for k in ("lr", "min_lr", "weight_decay", "beta1", "beta2", "grad_clip", "ckpt_minutes"):
            v = getattr(self, k)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ConfigError(f"{cli_name(k)} must be a finite number, got {v!r}")
        for k in ("weight_decay", "grad_clip", "ckpt_minutes"):
            if getattr(self, k) < 0:
                raise ConfigError(f"{cli_name(k)} must be >= 0 (0 turns it off), got "
                                  f"{getattr(self, k)}")
        if self.resume and self.overwrite:
            raise ConfigError("--resume and --overwrite contradict each other: --resume continues "
                              "the run in --out, --overwrite replaces it; pass one")
        if self.warmup_steps is None:
            self.warmup_steps = min(50, self.max_steps // 10)
        if self.warmup_steps < 0 or self.warmup_steps > self.max_steps:
            raise ConfigError(f"--warmup-steps {self.warmup_steps} must be between 0 and "
                              f"--max-steps {self.max_steps}" + (
                                  " (a resumed run keeps its warmup: pass --warmup-steps too)"
                                  if self.resume else ""))
        if not self.lr > 0 or self.min_lr < 0 or self.min_lr > self.lr:
            raise ConfigError(f"need 0 <= --min-lr ({self.min_lr}) <= --lr ({self.lr}) and lr > 0")
        for k in ("beta1", "beta2"):
            if not 0.0 <= getattr(self, k) < 1.0:
                raise ConfigError(f"--{k} must be in [0, 1), got {getattr(self, k)}")
        if self.dtype not in ("float32", "float64", "float16"):
            raise ConfigError(f"--dtype must be float32, float64 or float16 (mixed precision), "
                              f"got {self.dtype!r}")
        try:
            kind = tl.backend.parse_device(self.device)[0]
        except ValueError as e:
            raise ConfigError(f"--device {self.device!r}: {e}") from None
        if kind == "cuda" and not tl.cuda_available():
            raise ConfigError(f"--device {self.device}: {tl.cuda_unavailable_reason()}; "
                              "use --device cpu")
        self.parallel.validate()
        p = self.parallel
        if self.inspect_interval > self.max_steps and not self.resume:
            raise ConfigError(f"--inspect-interval {self.inspect_interval} is more than "
                              f"--max-steps {self.max_steps}: nothing would be inspected; pass "
                              "a smaller interval")
        if self.dtype == "float16" and (p.dp > 1 or p.tp > 1 or p.pp > 1 or p.zero or
                                        self.inspect_interval):
            raise ConfigError("--dtype float16 (mixed precision) runs in one process for now, "
                              "without --inspect-interval: leave out --dp/--tp/--pp/--zero and "
                              "--inspect-interval, or use --dtype float32")
        if self.inspect_interval and (p.tp > 1 or p.pp > 1 or p.zero):
            raise ConfigError("--inspect-interval reads every weight's gradient and change on "
                              "one rank: it works in one process and with --dp, not with --tp, "
                              "--pp or --zero 1 (a rank holds only part of them)")
        if self.batch_size % self.parallel.dp:
            raise ConfigError(f"--batch-size {self.batch_size} is the global micro-batch, split "
                              f"over --dp {self.parallel.dp} ranks: pick a multiple of "
                              f"{self.parallel.dp}")
        if model:
            self.validate_layout()

    def validate_layout(self) -> None:
        """The parallel layout against the model's shape."""
        if self.parallel.pp > self.model.n_layer:
            raise ConfigError(f"--pp {self.parallel.pp} stages need at least as many blocks; "
                              f"--n-layer is {self.model.n_layer}")
        tp = self.parallel.tp
        if self.model.n_head % tp or (4 * self.model.d_model) % tp:
            raise ConfigError(f"--tp {tp} must divide --n-head {self.model.n_head} and the MLP "
                              f"width 4 x {self.model.d_model} (each rank holds whole heads)")


@dataclass
class SFTConfig(TrainConfig):
    """`tensorlite-gpt sft`: the trainer's options (a fine-tuning's defaults), the base run,
    and the data. The architecture is the base run's (only --dropout may change)."""
    base: str = option("runs/gpt", "the pretrained run to start from (the --out of "
                                    "tensorlite-gpt train)")
    data: str | None = option(None, "JSONL of {\"prompt\", \"response\"} or {\"messages\": "
                                    "[{\"role\", \"content\"}]} lines", default_text="the "
                              "embedded set: stdlib docstrings -> function bodies")
    out: str = option("runs/sft", "run folder for checkpoints, log.jsonl, loss.png")
    pack: bool = option(False, "pack whole conversations into rows instead of one per row")
    strict: bool = option(False, "stop at the first malformed JSONL line instead of skipping it")
    max_chars: int = option(400, "embedded set: the longest function kept (prompt + body, in "
                                 "characters)")
    heldout_percent: int = option(10, "held out for evaluation: this percent of the source "
                                      "files (embedded set) or of the lines (--data)")
    max_steps: int = option(300, "optimizer steps")
    lr: float = option(5e-4, "peak learning rate")
    min_lr: float = option(5e-5, "final learning rate of the cosine decay")
    eval_interval: int = option(50, "steps between evaluations")
    eval_steps: int = option(100, "held-out batches per evaluation (all of them when fewer)")
    samples: int = option(3, "held-out docstrings shown at the end with the base model's and "
                             "the tuned model's completions")
    sample_tokens: int = option(100, "tokens per completion")

    def validate(self, model: bool = False) -> None:
        """As TrainConfig's; the layout is checked against the model once the base run's
        shape is known (``model=True``)."""
        super().validate(model)
        if not isinstance(self.max_chars, int) or isinstance(self.max_chars, bool) or \
                self.max_chars < 20:
            raise ConfigError(f"--max-chars must be an integer >= 20, got {self.max_chars!r}")
        import os
        if os.path.realpath(self.out) == os.path.realpath(self.base):
            raise ConfigError(f"--out {self.out} is the --base run: fine-tuning into it would "
                              "replace the model it starts from; choose another --out")
        if not isinstance(self.heldout_percent, int) or not 1 <= self.heldout_percent <= 50:
            raise ConfigError(f"--heldout-percent must be an integer in 1..50, got "
                              f"{self.heldout_percent!r}")


@dataclass
class DPOConfig(SFTConfig):
    """`tensorlite-gpt dpo`: SFT's options with preference pairs, ``beta``, and the SFT run as
    the base (the policy's start and the frozen reference)."""
    base: str = option("runs/sft", "the fine-tuned run to start from, also the frozen "
                                    "reference (the --out of tensorlite-gpt sft)")
    data: str | None = option(None, "JSONL of {\"prompt\", \"chosen\", \"rejected\"} lines",
                              default_text="the embedded set: stdlib docstrings -> the true "
                              "body (chosen) vs another function's or one with a statement "
                              "dropped (rejected)")
    out: str = option("runs/dpo", "run folder for checkpoints, log.jsonl, loss.png")
    beta: float = option(0.1, "DPO's beta: how far the policy may move from the reference "
                              "(the implicit reward is beta x the log-probability ratio)")
    max_steps: int = option(200, "optimizer steps")
    lr: float = option(1e-4, "peak learning rate")
    min_lr: float = option(1e-5, "final learning rate of the cosine decay")
    samples: int = option(0, "unused by dpo", cli=False)

    def validate(self, model: bool = False) -> None:
        super().validate(model)
        if isinstance(self.beta, bool) or not isinstance(self.beta, (int, float)) or \
                not math.isfinite(self.beta) or self.beta <= 0:
            raise ConfigError(f"--beta must be a finite number > 0, got {self.beta!r}")
        if self.parallel.tp > 1 or self.parallel.pp > 1:
            raise ConfigError("dpo runs in one process or data-parallel (--dp N, with --zero 1 "
                              "if you like): its per-answer log-probabilities need the whole "
                              "vocabulary's logits on each rank, so --tp and --pp are not "
                              "offered")


RUN_KINDS = {"train": "a pretraining run (tensorlite-gpt train)",
             "sft": "a fine-tuning run (tensorlite-gpt sft)",
             "dpo": "a preference-tuning run (tensorlite-gpt dpo)"}


def command_of(cls) -> str:
    """The command a config class belongs to."""
    return {"DPOConfig": "dpo", "SFTConfig": "sft"}.get(cls.__name__, "train")


def run_kind(saved: dict) -> str:
    """Which command trained a run, from its saved train_config."""
    return "dpo" if "beta" in saved else "sft" if "base" in saved else "train"


def _flat(saved: dict) -> dict:
    """A saved train_config (nested, or flat as written before the model config was nested)
    as one flat dict of option values."""
    flat = {k: v for k, v in saved.items() if k not in ("model", "parallel")}
    for part in ("model", "parallel"):
        flat.update(saved.get(part) or {})
    for k in ("vocab_size", "extra"):
        flat.pop(k, None)
    return {k: v for k, v in flat.items() if v is not None or k in ("warmup_steps",
                                                                     "ckpt_interval")}


# ------------------------------------------------------------------------------ CLI specs
@dataclass(frozen=True)
class Spec:
    """One command-line option derived from a config field."""
    name: str            # the field name (and the TOML key)
    type: type
    default: object
    help: str
    flag: str | None     # bool fields: the switch's name (no_bias, post_ln, resume, ...)
    owner: type


def specs(cls) -> list[Spec]:
    """The CLI options of a config dataclass, in field order."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in fields(cls):
        md = f.metadata
        if md.get("cli", True) is False:
            continue
        t = hints[f.name]
        args = [a for a in typing.get_args(t) if a is not type(None)]
        if args:                         # int | None -> int
            t = args[0]
        default = f.default if f.default is not dataclasses.MISSING else None
        text = md.get("default_text")
        helptext = md.get("help", "")
        if t is bool:
            flag = md.get("flag") or f.name
            helptext += " (off by default)"
        else:
            flag = None
            helptext += f" (default {text if text is not None else default})"
        out.append(Spec(f.name, t, default, helptext, flag, cls))
    return out


def train_specs() -> list[Spec]:
    """Every option of `tensorlite-gpt train`: the trainer's, then the model's (whose size
    fields default to the preset), then the parallel layout's."""
    model = []
    for s in specs(GPTConfig):
        if s.name in PRESETS["tiny"]:
            s = dataclasses.replace(
                s, help=s.help.rsplit(" (default", 1)[0] + " (default: the preset's; tiny: "
                f"{PRESETS['tiny'][s.name]})")
        model.append(s)
    return specs(TrainConfig) + model + specs(ParallelConfig)


def sft_specs() -> list[Spec]:
    """Every option of `tensorlite-gpt sft`: the trainer's (without --preset: the model is
    the base run's), --dropout, then the parallel layout's."""
    dropout = [s for s in specs(GPTConfig) if s.name == "dropout"]
    return [s for s in specs(SFTConfig) if s.name != "preset"] + dropout + specs(ParallelConfig)


def dpo_specs() -> list[Spec]:
    """Every option of `tensorlite-gpt dpo`: SFT's, less --pack (a pair is two rows)."""
    return [s for s in specs(DPOConfig) if s.name not in ("preset", "pack")] + \
        [s for s in specs(GPTConfig) if s.name == "dropout"] + \
        [s for s in specs(ParallelConfig) if s.name in ("dp", "zero", "bucket_mb")]


def cli_name(name: str) -> str:
    return "--" + name.replace("_", "-")
