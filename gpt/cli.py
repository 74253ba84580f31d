"""tensorlite-gpt: prepare | train | sample | eval | sft | chat | dpo | export | inspect.

A thin layer over gpt.data.prepare, gpt.train and gpt.model: every option maps to a field of a
config dataclass; a TOML file (--config) may set any of them and the command line overrides
it. User mistakes end in one line on stderr and exit status 2, never a traceback.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from .config import DEFAULT_DATA, dpo_specs, sft_specs, train_specs


class Options:
    """A command's options from the config dataclasses (gpt.config): option -> (type, help)
    for values, switch -> help for booleans, switch -> (field, value it sets)."""

    def __init__(self, specs):
        self.options = {s.name: (s.type, s.help) for s in specs if s.type is not bool}
        self.flags = {s.flag: s.help for s in specs if s.type is bool}
        self.flag_sets = {s.flag: (s.name, not s.default) for s in specs if s.type is bool}

    def add_to(self, parser) -> None:
        for k, (t, h) in self.options.items():
            parser.add_argument(_opt(k), dest=k, type=t, default=None, help=h)
        for k, h in self.flags.items():   # None when absent, so a TOML value is not overridden
            parser.add_argument(_opt(k), dest=k, action="store_const", const=True, default=None,
                                help=h)


TRAIN = Options(train_specs())
SFT = Options(sft_specs())
DPO = Options(dpo_specs())
TRAIN_OPTIONS, TRAIN_FLAGS = TRAIN.options, TRAIN.flags


class UsageError(Exception):
    pass


def _opt(name: str) -> str:
    return "--" + name.replace("_", "-")


def _load_toml(path: str) -> dict:
    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"config file {path} does not exist")
    try:
        d = tomllib.loads(p.read_text())
    except Exception as e:
        raise UsageError(f"config file {path} is not valid TOML: {e}") from None
    return {k.replace("-", "_"): v for k, v in d.items()}


def _merge(args, fields: dict, flags: dict, section: str) -> dict:
    """TOML (top level or [section]) < command line."""
    out = {}
    if getattr(args, "config", None):
        d = _load_toml(args.config)
        tables = sorted(k for k, v in d.items() if isinstance(v, dict))
        unknown_tables = [t for t in tables if t not in ("train", "prepare", "sft", "dpo")]
        if unknown_tables:
            raise UsageError(f"config file {args.config}: unknown table(s) "
                             f"{['[' + t + ']' for t in unknown_tables]}; use [train], "
                             "[prepare], [sft] or [dpo] (or top-level keys)")
        d = {**{k: v for k, v in d.items() if not isinstance(v, dict)}, **d.get(section, {})}
        known = set(fields) | set(flags)
        unknown = sorted(set(d) - known)
        if unknown:
            raise UsageError(f"config file {args.config}: unknown option(s) {unknown} for "
                             f"'{section}'")
        out.update(d)
    for k in fields:
        v = getattr(args, k, None)
        if v is not None:
            out[k] = v
    for k in flags:
        if getattr(args, k, False):
            out[k] = True
    return out


def _train_options(args, opts: Options = TRAIN, section: str = "train") -> dict:
    """The training options given (--config, then the command line), as field -> value; a
    switch (--no-bias) or its TOML key (no_bias = true) sets its field (bias = False), and
    TOML may also name the field itself. TOML values must have the option's type."""
    d = _merge(args, {**opts.options, **{f: None for f, _ in opts.flag_sets.values()}},
               opts.flags, section)
    types = {**{k: t for k, (t, _) in opts.options.items()},
             **{k: bool for k in opts.flags}, **{f: bool for f, _ in opts.flag_sets.values()}}
    for k, v in d.items():
        t = types[k]
        ok = (isinstance(v, bool) if t is bool else
              isinstance(v, (int, float)) and not isinstance(v, bool) if t is float else
              isinstance(v, t) and not isinstance(v, bool))
        if not ok:
            raise UsageError(f"config file {args.config}: {k} = {v!r} must be "
                             f"{'true or false' if t is bool else 'a number' if t is float else 'an integer' if t is int else 'a string'}")
    for flag, (name, value) in opts.flag_sets.items():
        if flag != name and flag in d:
            if d.pop(flag):
                d[name] = value
    return d


def _train_config(args):
    from .config import TrainConfig
    return TrainConfig.from_dict(_train_options(args))


# ------------------------------------------------------------------------------ commands
def cmd_prepare(args) -> int:
    """Prepare into --out; nothing to do when --out is already prepared from the same data
    with the same options (unless --overwrite). What else --out holds is never replaced
    without --overwrite (see gpt.data.prepare.check_out_dir)."""
    from .data.prepare import is_prepared, options_from_flat, prepare
    from .distributed import mpi_world
    d = _merge(args, PREPARE_OPTIONS, PREPARE_FLAGS, "prepare")
    data = d.pop("data", None)
    out = d.pop("out", DEFAULT_DATA)
    overwrite = bool(d.pop("overwrite", False))
    workers = d.pop("workers", None)
    options = options_from_flat(d)
    world = mpi_world()             # under mpiexec every rank prepares its share of the files
    rank = world.rank if world is not None else 0
    if world is not None:
        from parallel.world import install_abort_handler
        install_abort_handler(world)    # a crash on one rank ends them all, never a hang
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
        raise UsageError(f"--workers {workers} must be a positive integer (the processes that read, clean, "
                         f"sign and encode; by default the usable cores)")
    state = "new"
    if not overwrite and rank == 0:
        if is_prepared(out, data, **options):
            state = "done"
        elif is_prepared(out, data, check_fingerprint=False, **options):
            state = "changed"       # same data paths and options, but the files changed since
    if world is not None:
        state = world.comm.bcast(state, root=0)
    if state == "done":
        if rank == 0:
            print(f"{out} is already prepared from this data with these options: nothing to do "
                  f"(--overwrite prepares it again)")
        return 0
    if state == "changed":
        raise UsageError(f"--out {out} was prepared from this data with these options, but the files "
                         f"have changed since (added, removed or edited): a run trained on it would "
                         f"see other data; pass --overwrite to prepare it again, or choose another --out")
    prepare(data=data, out_dir=out, overwrite=overwrite, workers=workers, world=world, **options)
    if rank == 0:
        print(f"prepared data in {out}: train with: tensorlite-gpt train --data {out}")
    return 0


from .data.clean import clean_cli_options as _clean_cli_options  # noqa: E402 (light: no numpy)

PREPARE_OPTIONS = {
    "data": (str, "text file, folder or .jsonl to prepare (default: the Python standard "
                  "library's own sources)"),
    "out": (str, f"output folder (default {DEFAULT_DATA}); what it holds is replaced only "
                 "with --overwrite"),
    "tokenizer": (str, "bpe | unigram | char | byte (default bpe)"),
    "vocab_size": (int, "tokenizer vocabulary size (default 4096; byte: 256+specials)"),
    "seed": (int, "seed for the train/validation split (default 0)"),
    "text_field": (str, "the field holding the text in .jsonl records (default text)"),
    "character_coverage": (float, "share of the characters the bpe/unigram/char tokenizer "
                                  "gives their own pieces, the rest as bytes (default 0.9995)"),
    "workers": (int, "processes that read, clean, deduplicate and encode (default: the usable "
                     "cores, shared among the ranks on a machine under mpiexec); the output is "
                     "the same for any number"),
    **_clean_cli_options(),  # --min-chars, --max-line-chars, ...: gpt.data.clean.CleanConfig
}
PREPARE_FLAGS = {
    "overwrite": "replace what --out holds (a preparation of other data or options, or any "
                 "other files)",
}


def ensure_default_data(data: str, say=print) -> None:
    """The default corpus is prepared on first use (and again when the standard library
    changed), and reused afterwards; a folder the user prepared there is used as it is."""
    from .data.errors import DataError
    from .data.prepare import describe_prepared, is_prepared, prepare, read_meta
    if data != DEFAULT_DATA or is_prepared(data):
        return
    try:
        meta = read_meta(data)
    except DataError:
        meta = None
    if meta is not None and not is_prepared(data, check_fingerprint=False):
        # the user prepared their own data into the default folder: use it, never replace it
        say(f"note: {data} holds data prepared from {describe_prepared(meta)} with other options "
            "than the default; training on it (--data chooses other data)")
        return
    say(f"preparing the default corpus (the Python standard library) into {data} ...")
    prepare(data=None, out_dir=data)


def _train_preflight(args, world, say, cls=None, opts: Options = TRAIN, section="train"):
    """The config to train with (a ``cls``, TrainConfig by default), checked (no data read,
    nothing written)."""
    from .config import RUN_KINDS, TrainConfig, command_of, run_kind
    from .run_folder import check_out, run_train_config
    cls = cls or TrainConfig
    given = _train_options(args, opts, section)
    n = world.size if world is not None else 1
    if n > 1 and "dp" not in given and not given.get("resume"):
        # under mpiexec, the ranks the other degrees leave are data-parallel replicas
        rest = given.get("tp", 1) * given.get("pp", 1)
        if isinstance(rest, int) and rest > 0 and n % rest == 0:
            given["dp"] = n // rest
    for opt in ("pp_schedule", "pp_timetable"):
        if opt in given and given.get("pp", 1) == 1 and not given.get("resume"):
            say(f"note: {_opt(opt)} has no effect without --pp > 1")
    if section in ("sft", "dpo") and "max_chars" in given and given.get("data"):
        say("note: --max-chars applies to the embedded set only; with --data every line is used "
            "(the block's truncation rule still applies)")
    cfg = cls.from_dict(given)
    cfg.validate()
    check_out(cfg)                  # before preparing anything: the run in --out is safe
    saved = run_train_config(cfg.out) if cfg.resume else None
    if saved and run_kind(saved) != command_of(cls):
        kind = run_kind(saved)
        raise UsageError(f"{cfg.out} holds {RUN_KINDS[kind]}, not {RUN_KINDS[command_of(cls)]}: "
                         f"continue it with tensorlite-gpt {kind} --out {cfg.out} --resume"
                         + (f", or start from it with tensorlite-gpt {command_of(cls)} --base "
                            f"{cfg.out} --out ANOTHER_FOLDER" if command_of(cls) != "train"
                            else ""))
    if saved:
        # --resume continues the run as it was started (its data, model, schedule); options
        # given now override, and are named; the parallel layout follows the launcher
        if not any(k in given for k in ("dp", "tp", "pp")):
            given.update(dp=n, tp=1, pp=1)      # the launcher's ranks as data-parallel ones
        else:
            given.setdefault("tp", 1)
            given.setdefault("pp", 1)
            given.setdefault("dp", max(1, n // (given["tp"] * given["pp"])))
        if given["dp"] == 1 and "zero" not in given:
            given["zero"] = 0
        if "data" in given and os.path.abspath(given["data"]) == saved.get("data"):
            given["data"] = saved["data"]
        cfg, changed = cls.for_resume(saved, given)
        cfg.validate()
        if "batch_size" in changed:
            was = changed["batch_size"][0]
            raise UsageError(f"--resume: the run was trained with --batch-size {was}, not "
                             f"{changed['batch_size'][1]}; resume with --batch-size {was} (the "
                             "order of the data depends on it)")
        if changed:
            say("resuming with " + ", ".join(f"{_opt(k)} {now} (the run had {was})"
                                             for k, (was, now) in changed.items())
                + ("; the learning-rate schedule is stretched to the new --max-steps"
                   if "max_steps" in changed else ""))
    return cfg


def cmd_train(args) -> int:
    from nn.checkpoint import CheckpointError

    from .data.errors import DataError
    from .model import ConfigError
    from .distributed import agree_on_errors, mpi_world
    from .run_folder import TrainingError
    from .train import train
    world = mpi_world()
    main_rank = world is None or world.rank == 0
    say = print if main_rank else (lambda *a, **k: None)
    cfg, err = None, None
    try:
        cfg = _train_preflight(args, world, say)
    except (UsageError, ConfigError, DataError, CheckpointError, TrainingError) as e:
        err = e
    agree_on_errors(world, err)     # every rank stops here if any met a mistake
    if main_rank:
        ensure_default_data(cfg.data)
    if world is not None:
        _wait_for_rank0(world)      # the other ranks wait until rank 0 prepared the data
    summary = train(cfg)
    if summary["interrupted"]:
        return 143 if summary["interrupted"] == "SIGTERM" else 130
    best = summary["best_val_loss"]
    say(f"\ndone: step {summary['step']}, best validation loss "
          f"{'none' if best == float('inf') else f'{best:.4f}'} "
          f"(unigram baseline {summary['unigram_baseline']:.4f}); checkpoint, log.jsonl and "
          f"loss.png{' (and internals.png)' if cfg.inspect_interval else ''} in "
          f"{summary['out']}")
    return 0


def cmd_sft(args, dpo: bool = False) -> int:
    from nn.checkpoint import CheckpointError

    from .config import DPOConfig, SFTConfig
    from .data.errors import DataError
    from .distributed import agree_on_errors, mpi_world
    from .model import ConfigError
    from .run_folder import TrainingError
    world = mpi_world()
    main_rank = world is None or world.rank == 0
    say = print if main_rank else (lambda *a, **k: None)
    cfg, err = None, None
    try:
        cfg = (_train_preflight(args, world, say, DPOConfig, DPO, "dpo") if dpo else
               _train_preflight(args, world, say, SFTConfig, SFT, "sft"))
    except (UsageError, ConfigError, DataError, CheckpointError, TrainingError) as e:
        err = e
    agree_on_errors(world, err)
    if dpo:
        from .align.dpo import dpo as run
    else:
        from .align.sft import sft as run
    summary = run(cfg, say)
    if summary["interrupted"]:
        return 143 if summary["interrupted"] == "SIGTERM" else 130
    say(f"\ndone: step {summary['step']}; checkpoint, log.jsonl and loss.png in "
        f"{summary['out']}; talk to it: tensorlite-gpt chat --out {summary['out']}")
    return 0


def cmd_export(args) -> int:
    from .hf import export_run
    folder = export_run(args.out, args.to, args.which, overwrite=args.overwrite,
                        say=lambda m: print(m, file=sys.stderr))
    print(f"wrote {folder} (config.json, model.safetensors and the tokenizer, the Hugging Face "
          f"GPT-2 layout); load it with GPT.from_pretrained({str(folder)!r}) or pass it as --out "
          "to sample, eval and chat, or as --base to sft")
    return 0


def cmd_inspect(args) -> int:
    from .hf import is_hf_folder
    from .inspect import write_report
    if not 1 <= args.top_k <= 20:
        raise UsageError(f"--top-k must be between 1 and 20 (the guesses drawn per position), "
                         f"got {args.top_k}")
    model, tok, _ = _load_run(args.out, args.which, args.device)
    default = (Path(os.path.expanduser(args.out.rstrip("/"))).with_name(
        Path(args.out.rstrip("/")).name + "-inspect") if is_hf_folder(args.out)
        else Path(args.out) / "inspect")     # never inside a model folder others export
    folder = write_report(model, tok, args.prompt or "", args.to or default,
                          overwrite=args.overwrite, k=min(args.top_k, tok.vocab_size), say=print)
    print(f"wrote {folder / 'index.html'}: open it in a browser (attention maps, logit lens, "
          "activation statistics, next-token guesses)")
    return 0


def cmd_dpo(args) -> int:
    return cmd_sft(args, dpo=True)


def cmd_chat(args) -> int:
    from .align.chat import chat_loop
    from .align.template import ChatTokenizer
    _check_sampling(args, ("--max-new-tokens", args.max_new_tokens, 1))
    if args.prompt is not None and not args.prompt.strip():
        raise UsageError("--prompt is empty; give a message, or leave --prompt out to chat")
    model, tok, _ = _load_run(args.out, args.which, args.device, made_by="sft", generate=True)
    if not isinstance(tok, ChatTokenizer):
        raise UsageError(f"{args.out} holds a pretrained model without the chat template (it "
                         f"was not fine-tuned): run tensorlite-gpt sft --base {args.out} first, "
                         f"or continue text with tensorlite-gpt sample --out {args.out}")
    sampling = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                    seed=args.seed)
    chat_loop(model, tok, args.system, args.max_new_tokens, sampling, prompt=args.prompt)
    return 0


def _wait_for_rank0(world) -> None:
    """A barrier that sleeps instead of spinning (preparing the default corpus takes rank 0
    half a minute, and MPICH's barrier would keep the other ranks' cores busy meanwhile)."""
    import time

    import numpy as np
    req = world.all_reduce(np.zeros(1), async_op=True)
    while not req.test():
        time.sleep(0.05)


def _check_device(device: str) -> None:
    import tensorlite as tl
    try:
        kind = tl.backend.parse_device(device)[0]
    except ValueError as e:
        raise UsageError(f"--device {device!r}: {e}") from None
    if kind == "cuda" and not tl.cuda_available():
        raise UsageError(f"--device {device}: {tl.cuda_unavailable_reason()}; use --device cpu")


def _check_sampling(args, *counts) -> None:
    """--temperature, --top-p, --top-k, --seed and the command's own ``counts`` ((option,
    value, least allowed), ...) in range."""
    import math
    if not math.isfinite(args.temperature) or args.temperature < 0:
        raise UsageError(f"--temperature must be a finite number >= 0 (0 = greedy), got "
                         f"{args.temperature}")
    if args.top_p is not None and not 0.0 < args.top_p <= 1.0:
        raise UsageError(f"--top-p must be in (0, 1], got {args.top_p}")
    for name, v, lo in (*counts, ("--top-k", args.top_k, 1), ("--seed", args.seed, 0)):
        if v is not None and v < lo:
            raise UsageError(f"{name} must be >= {lo}, got {v}")


def _load_run(out: str, which: str | None, device: str, made_by: str = "train",
              generate: bool = False):
    """(model, tokenizer, meta) from a run folder written by train, sft or dpo, or a Hugging
    Face folder. ``generate``: the tokenizer must decode every id the model can emit."""
    from .run_folder import load_run
    _check_device(device)
    model, tok, meta = load_run(out, which, device, lambda m: print(m, file=sys.stderr),
                                made_by=made_by)
    if generate and tok.vocab_size < model.config.vocab_size:
        raise UsageError(f"{out}: the model has {model.config.vocab_size} token ids but its "
                         f"tokenizer only {tok.vocab_size}, so it could generate ids the "
                         "tokenizer cannot turn into text; use the model's own tokenizer")
    return model, tok, meta


def cmd_sample(args) -> int:
    import numpy as np
    _check_sampling(args, ("--num-samples", args.num_samples, 1),
                    ("--max-new-tokens", args.max_new_tokens, 0))
    model, tok, _ = _load_run(args.out, args.which, args.device, generate=True)
    prompt = args.prompt if args.prompt is not None else ""
    ids = tok.encode(prompt)
    if not ids:
        ids = [tok.bos_id if tok.bos_id is not None and tok.bos_id >= 0 else tok.encode("\n")[0]]
    bs = model.config.block_size
    if len(ids) > bs:
        print(f"note: the prompt has {len(ids)} tokens; keeping the last {bs} (the block size)",
              file=sys.stderr)
        ids = ids[-bs:]
    for n in range(args.num_samples):
        if n:
            print("\n" + "-" * 72)
        sys.stdout.write(prompt)
        new, shown = [], ""
        for nxt in model.generate_stream(np.array([ids]), args.max_new_tokens,
                                         temperature=args.temperature, top_k=args.top_k,
                                         top_p=args.top_p, seed=args.seed + n):
            new.append(int(nxt[0]))
            text = tok.decode(new)
            if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
                sys.stdout.write(text[len(shown):])
                sys.stdout.flush()
                shown = text
        sys.stdout.write(tok.decode(new)[len(shown):] + "\n")
    return 0


def cmd_eval(args) -> int:
    import math

    from .data.loader import BatchLoader
    from .data.prepare import load_prepared
    from .run_folder import json_safe
    from .train import evaluate
    for name, v in (("--batch-size", args.batch_size), ("--eval-steps", args.eval_steps)):
        if v is not None and v < 1:
            raise UsageError(f"{name} must be >= 1, got {v}")
    model, _, meta = _load_run(args.out, args.which, args.device)
    run_cfg = meta["extra"]["train_config"]
    data = args.data or run_cfg.get("data")
    if not args.data and not run_cfg:
        raise UsageError(f"{args.out} is a Hugging Face model folder, with no data of its own: "
                         "pass --data PREPARED_FOLDER (tensorlite-gpt prepare) to evaluate it")
    if not args.data and "base" in run_cfg:
        raise UsageError(f"{args.out} is a fine-tuned run (sft or dpo) with no prepared data of "
                         "its own: its held-out loss is in its log.jsonl; pass --data "
                         "PREPARED_FOLDER to evaluate it on pretraining data")
    _, data_tok, _, val_path = load_prepared(data)
    if data_tok.vocab_size > model.config.vocab_size:
        raise UsageError(f"--data {data} was tokenized with {data_tok.vocab_size} ids but the "
                         f"model in {args.out} has {model.config.vocab_size}: it was prepared "
                         "with another tokenizer; pass data prepared with the model's")
    loader = BatchLoader(val_path, args.batch_size, model.config.block_size, mode="sequential")
    steps = loader.steps_per_epoch if args.eval_steps is None else min(args.eval_steps,
                                                                        loader.steps_per_epoch)
    loss = evaluate(model, loader, steps)
    print(json.dumps(json_safe({"val_loss": round(loss, 5),
                                "val_ppl": round(math.exp(min(loss, 50)), 3),
                                "batches": steps, "checkpoint": meta["path"]}), allow_nan=False))
    return 0


# ------------------------------------------------------------------------------ parser
def _add_run_args(p) -> None:
    """--out (the run to read) and --which (its checkpoint)."""
    p.add_argument("--out", default="runs/gpt", help="the run (default runs/gpt)")
    p.add_argument("--which", default=None, choices=["best", "latest"],
                   help="checkpoint (default best, else latest)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tensorlite-gpt", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command",
                           metavar="{prepare,train,sample,eval,sft,chat,dpo,export,inspect}")

    pp = sub.add_parser("prepare", help="clean, deduplicate and tokenize a corpus into shards")
    for k, (t, h) in PREPARE_OPTIONS.items():
        pp.add_argument(_opt(k), dest=k, type=t, default=None, help=h)
    for k, h in PREPARE_FLAGS.items():
        pp.add_argument(_opt(k), dest=k, action="store_true", help=h)
    pp.add_argument("--config", help="TOML file with options (a [prepare] table or top level)")
    pp.set_defaults(func=cmd_prepare)

    pt = sub.add_parser("train", help="pretrain a GPT (no arguments: the default corpus and "
                                      "the tiny preset, a few minutes on a laptop CPU)")
    for k, (t, h) in TRAIN_OPTIONS.items():
        pt.add_argument(_opt(k), dest=k, type=t, default=None, help=h)
    for k, h in TRAIN_FLAGS.items():   # None when absent, so a TOML value is not overridden
        pt.add_argument(_opt(k), dest=k, action="store_const", const=True, default=None, help=h)
    pt.add_argument("--config", help="TOML file with options (a [train] table or top level)")
    pt.set_defaults(func=cmd_train)

    pf = sub.add_parser("sft", help="fine-tune a trained run to answer in the chat template "
                                    "(no arguments: runs/gpt on the embedded docstring -> "
                                    "function-body set)")
    SFT.add_to(pf)
    pf.add_argument("--config", help="TOML file with options (an [sft] table or top level)")
    pf.set_defaults(func=cmd_sft)

    pd = sub.add_parser("dpo", help="preference-tune a fine-tuned run with DPO (no arguments: "
                                    "runs/sft on the embedded preference set)")
    DPO.add_to(pd)
    pd.add_argument("--config", help="TOML file with options (a [dpo] table or top level)")
    pd.set_defaults(func=cmd_dpo)

    for name, helptext in (("sample", "generate text from a trained run, streamed"),
                           ("eval", "validation loss of a trained run"),
                           ("chat", "talk to a fine-tuned run (tensorlite-gpt sft), streamed")):
        ps = sub.add_parser(name, help=helptext)
        out = "runs/sft" if name == "chat" else "runs/gpt"
        ps.add_argument("--out", default=out, help=f"run folder (default {out})")
        ps.add_argument("--which", default=None, choices=["best", "latest"],
                        help="checkpoint to load (default best, or latest when the run has no "
                             "best yet; a damaged one falls back to the other with a warning)")
        ps.add_argument("--device", default="cpu")
        if name == "chat":
            ps.add_argument("--prompt", default=None, help="one message: answer it and exit")
            ps.add_argument("--system", default=None, help="a system message first")
            ps.add_argument("--max-new-tokens", type=int, default=200,
                            help="the longest answer, in tokens (default 200)")
            ps.add_argument("--temperature", type=float, default=0.7,
                            help="sampling temperature, 0 = greedy (default 0.7)")
            ps.add_argument("--top-k", type=int, default=None, help="sample from the k likeliest")
            ps.add_argument("--top-p", type=float, default=None, help="nucleus sampling")
            ps.add_argument("--seed", type=int, default=None,
                            help="random seed, for answers that repeat (default: a fresh one)")
            ps.set_defaults(func=cmd_chat)
        elif name == "sample":
            ps.add_argument("--prompt", default=None, help="text to continue")
            ps.add_argument("--max-new-tokens", type=int, default=200)
            ps.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
            ps.add_argument("--top-k", type=int, default=None)
            ps.add_argument("--top-p", type=float, default=None)
            ps.add_argument("--num-samples", type=int, default=1)
            ps.add_argument("--seed", type=int, default=0)
            ps.set_defaults(func=cmd_sample)
        else:
            ps.add_argument("--data", default=None, help="prepared data (default: the run's)")
            ps.add_argument("--batch-size", type=int, default=16)
            ps.add_argument("--eval-steps", type=int, default=None,
                            help="batches (default: the whole validation split)")
            ps.set_defaults(func=cmd_eval)
    pi = sub.add_parser("inspect", help="pictures of what a trained model computes on a prompt "
                                        "(attention, logit lens, activations), in index.html")
    _add_run_args(pi)
    pi.add_argument("--prompt", default=None, help="the text to look at (default: the BOS token)")
    pi.add_argument("--to", default=None, help="the folder to write (default OUT/inspect; for a "
                    "Hugging Face folder OUT-inspect beside it)")
    pi.add_argument("--device", default="cpu")
    pi.add_argument("--top-k", type=int, default=5, help="guesses shown per position, 1-20 "
                    "(default 5)")
    pi.add_argument("--overwrite", action="store_true",
                    help="replace an earlier report in that folder (never other files)")
    pi.set_defaults(func=cmd_inspect)

    px = sub.add_parser("export", help="write a trained run as a Hugging Face GPT-2 folder "
                                       "(config.json, model.safetensors, the tokenizer)")
    _add_run_args(px)
    px.add_argument("--to", required=True, help="the folder to write")
    px.add_argument("--overwrite", action="store_true",
                    help="replace an earlier model folder in --to (never other files)")
    px.set_defaults(func=cmd_export)
    return p


def _user_error(command: str, e: Exception) -> None:
    """One line on stderr. Under MPI, a mistake found before the ranks communicate is agreed
    on by all of them (gpt.train.agree_on_errors): one rank says it and all exit normally. A
    mistake one rank meets later (a full disk) cannot wait for the others: that rank says it,
    with its number (after a moment, in case rank 0 ends the job first), and ends the job
    with MPI_Abort, so no rank waits forever."""
    from .distributed import PeerError, mpi_world
    world = mpi_world()
    if world is None or getattr(e, "agreed", False):
        if not isinstance(e, PeerError):
            print(f"tensorlite-gpt {command}: error: {e}", file=sys.stderr)
        return
    import time
    if world.rank != 0:
        time.sleep(1.0)
    print(f"tensorlite-gpt {command}: error: {e}" + (f" (rank {world.rank})" if world.rank
                                                    else ""), file=sys.stderr, flush=True)
    time.sleep(0.3)             # let the launcher forward the line before the job ends
    world.abort(2)


def _launcher_rank() -> int:
    """This process's rank as the MPI launcher set it in the environment (0 without one)."""
    for k in ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK"):
        if os.environ.get(k, "").isdigit():
            return int(os.environ[k])
    return 0


def _launcher_size() -> int:
    """The number of ranks the MPI launcher started, from the environment (1 without one)."""
    for k in ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "PMIX_SIZE"):
        if os.environ.get(k, "").isdigit():
            return int(os.environ[k])
    return 1


def main(argv=None) -> int:
    from gpt.data.errors import DataError
    from nn.checkpoint import CheckpointError

    from .model import ConfigError
    from .run_folder import TrainingError
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    if _launcher_rank() > 0:
        # under mpiexec every rank parses the same command line: usage, --help and option
        # errors are printed by rank 0 alone
        import contextlib
        import io
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            args = parser.parse_args(argv)
    else:
        args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    if args.command not in ("train", "sft", "dpo", "prepare") and _launcher_size() > 1:
        # one process does it (several would print it N times, or race on the same files)
        if _launcher_rank() == 0:
            print(f"note: {args.command} runs in one process; under mpiexec ranks other than 0 "
                  "do nothing", file=sys.stderr)
        else:
            return 0
    try:
        return args.func(args)
    except (UsageError, ConfigError, DataError, CheckpointError, TrainingError) as e:
        # the project's own error types say what the user can change; anything else is a bug
        # and keeps its traceback
        _user_error(args.command, e)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

