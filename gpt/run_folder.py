"""The run folder (--out) of `tensorlite-gpt train`: what it holds, the checks that keep a
user's run from being overwritten, and how its files are written (log.jsonl as strict JSON,
summary.json atomically, an OSError named with the path and what to do).

    runs/gpt/  ckpt/latest, ckpt/best   nn.checkpoint folders (the commit point: `latest`)
               log.jsonl                 one record per logged step and per evaluation
               loss.png, summary.json    the plot; the outcome (strict JSON)
               tokenizer.model|json      the data's tokenizer, for sample/eval
               chat_template.json        after SFT: the chat tokens added to it
"""
from __future__ import annotations

import contextlib
import errno
import json
import math
import os
from pathlib import Path

from nn import checkpoint as ckpt

from .config import TrainConfig

LOG_NAME = "log.jsonl"


class TrainingError(RuntimeError):
    """Training cannot go on (a non-finite loss, say); the message says why and what to do."""


def atomic_json(path: Path, obj) -> None:
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


class RunLog:
    """log.jsonl: one JSON record per line, flushed as written."""

    def __init__(self, path: Path, truncate_from_step: int | None):
        self.path = path
        if truncate_from_step is not None and path.exists():
            # a resumed run rewrites the steps after its checkpoint, so the log reads as
            # one uninterrupted run
            keep = [ln for ln in path.read_text().splitlines()
                    if ln.strip() and json.loads(ln).get("step", -1) <= truncate_from_step]
            path.write_text("".join(k + "\n" for k in keep))
        elif truncate_from_step is None:
            path.write_text("")
        self.f = open(path, "a")

    def write(self, rec: dict) -> None:
        self.f.write(json.dumps(json_safe(rec), allow_nan=False) + "\n")
        self.f.flush()

    def close(self):
        self.f.close()


class NoLog:
    """Ranks other than 0 write no log."""

    def write(self, rec: dict) -> None:
        pass

    def close(self) -> None:
        pass


def json_safe(obj):
    """``obj`` with non-finite floats as None: JSON has no NaN or Infinity, and a file with
    them is not JSON that other tools can read."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


# What `train` writes into --out; an existing folder holding any of them holds a run.
RUN_FILES = ("ckpt", LOG_NAME, "loss.png", "summary.json", "tokenizer.model", "tokenizer.json",
             "chat_template.json", "samples.json", "internals.png")


def run_status(out: str | os.PathLike) -> str | None:
    """What the run in ``out`` has reached ("a checkpoint at step 2000 of 2000, best validation
    loss 3.4900"), or None when ``out`` holds no run."""
    out = Path(out)
    found = [n for n in RUN_FILES if (out / n).exists()]
    if not found:
        return None
    for which in ("latest", "best"):
        try:
            meta = ckpt.load_checkpoint(out / "ckpt" / which)   # meta.json only
        except ckpt.CheckpointError:
            continue
        extra = meta.get("extra") or {}
        total = (extra.get("train_config") or {}).get("max_steps")
        best = extra.get("best_val")
        return (f"a checkpoint at step {extra.get('step')}" + (f" of {total}" if total else "")
                + (f", best validation loss {best:.4f}" if isinstance(best, (int, float))
                   and math.isfinite(best) else ""))
    steps = []
    if (out / LOG_NAME).is_file():
        for line in (out / LOG_NAME).read_text(errors="replace").splitlines():
            try:
                steps.append(int(json.loads(line)["step"]))
            except (ValueError, KeyError, TypeError):
                pass
    if steps:
        return f"a log up to step {max(steps)} and no checkpoint"
    return f"{', '.join(found)} and no checkpoint"


def resumable(out: str | os.PathLike) -> bool:
    """True when ``out`` holds a committed checkpoint (latest or best) to resume from."""
    root = Path(out) / "ckpt"
    for which in ("latest", "best"):
        try:
            if ckpt.latest_checkpoint(root / which) is not None:
                return True
        except ckpt.CheckpointError:
            continue
    return False


def run_train_config(out: str | os.PathLike) -> dict | None:
    """The training options a run in ``out`` was started with (from its checkpoint), or None."""
    for which in ("latest", "best"):
        try:
            meta = ckpt.load_checkpoint(Path(out) / "ckpt" / which)   # meta.json only
        except ckpt.CheckpointError:
            continue
        return (meta.get("extra") or {}).get("train_config")
    return None


LOCK_NAME = ".lock"


class RunLock:
    """While a process trains into a run folder it holds an exclusive lock on ``out/.lock``
    (``fcntl.flock``): a second command into the same folder (a --resume, an --overwrite)
    sees it and stops instead of writing beside it. The operating system releases the lock
    when the process ends in any way, kill -9 included, so it never goes stale. (Where flock
    is missing, as on Windows, there is no lock.)"""

    def __init__(self, out: str | os.PathLike):
        self.path = Path(out) / LOCK_NAME
        self.f = None

    def acquire(self, record: bool = True) -> None:
        """Take the lock (``record``: write who holds it into the file), or raise
        TrainingError saying who does."""
        try:
            import fcntl
        except ImportError:                   # pragma: no cover - not on POSIX
            return
        import time
        f = open(self.path, "a+")
        # a process that was just killed may take a moment to be gone (an MPI launcher can
        # return before every rank has exited): wait up to 3 s before calling the run busy
        deadline = time.monotonic() + 3.0
        while not _try_flock(f, fcntl) and time.monotonic() < deadline:
            time.sleep(0.1)
        if not _try_flock(f, fcntl):
            f.seek(0)
            who = f.read().strip().split("\n")[0] or "another process"
            f.close()
            raise TrainingError(f"{self.path.parent} is being trained right now ({who}): wait "
                                "for that run to end, or choose another --out") from None
        self.f = f
        if not record:
            return
        import socket
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {socket.gethostname()}, since "
                f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        f.flush()

    def release(self) -> None:
        if self.f is not None:
            self.f.close()                    # closing the file releases the flock
            self.f = None


def _try_flock(f, fcntl) -> bool:
    """Take the exclusive flock on ``f`` if free (True; again once held: a no-op)."""
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError:
        return False


def check_not_locked(out: str | os.PathLike) -> None:
    """Refuse a folder another process is training into (see RunLock)."""
    if (Path(out) / LOCK_NAME).is_file():
        probe = RunLock(out)
        probe.acquire(record=False)
        probe.release()


def check_out(cfg: TrainConfig) -> None:
    """Every check on --out that needs no data and writes nothing: a file in the way, a folder
    that cannot be written, a run that would be overwritten without --overwrite."""
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise TrainingError(f"--out {out} is a file, not a folder: pass a folder for the run "
                            "(it is created if needed)")
    parent = out
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise TrainingError(f"--out {out}: {parent} is a file, so the folder cannot be created; "
                            "choose another --out")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise TrainingError(f"--out {out}: no permission to write in {parent}; choose a folder "
                            "you can write")
    from gpt.data.prepare import looks_prepared
    if looks_prepared(out):
        raise TrainingError(f"--out {out} is a prepared data folder (it holds meta.json and "
                            "its train shards), not a run: pass it as --data, and choose another "
                            "--out for the run")
    if out.is_dir():
        check_not_locked(out)
    status = run_status(out) if out.is_dir() else None
    if status is None or cfg.overwrite:
        return
    if not resumable(out):
        raise TrainingError(f"{out} holds {status}: there is nothing to resume from; pass "
                            "--overwrite to start that run again, or another --out")
    if cfg.resume:
        return
    raise TrainingError(f"{out} already holds a run ({status}): pass --resume to continue it, "
                        "--overwrite to replace it, or another --out")


@contextlib.contextmanager
def writing(path):
    """An OSError while writing the run (permissions, a full disk) is the user's to fix: say
    where, and stop; checkpoints already committed stay valid."""
    try:
        yield
    except OSError as e:
        advice = ("free some space or choose another --out" if e.errno == errno.ENOSPC else
                  "choose another --out")
        raise TrainingError(f"could not write {getattr(e, 'filename', None) or path}: "
                            f"{e.strerror or e}; {advice}") from None




# ------------------------------------------------------------------------------ reading a run
def pick_checkpoint(out: str | os.PathLike, which: str | None = None, say=print,
                    what: str = "--out", made_by: str = "train") -> Path:
    """The checkpoint folder of the run in ``out`` to load: ``which`` (best | latest), or
    best (else latest) by default; a damaged one is skipped for the other with a warning."""
    out = Path(os.path.expanduser(str(out)))
    root = out / "ckpt"
    order = [which, "latest" if which == "best" else "best"] if which else ["best", "latest"]
    damaged = []
    for name in order:
        try:
            ckpt.verify_checkpoint(root / name)
        except ckpt.CheckpointNotFoundError:
            continue
        except ckpt.CheckpointError as e:
            damaged.append(str(e))
            continue
        if damaged:
            say(f"warning: {damaged[0]}\nusing {root / name} instead")
        elif which and name != which:
            say(f"note: {out} has no ckpt/{which} yet; using ckpt/{name}")
        return root / name
    if damaged:
        raise TrainingError(" ".join(damaged))
    if not out.exists():
        raise TrainingError(f"{what} {out} does not exist: pass the folder of a run "
                            f"(the --out of tensorlite-gpt {made_by})")
    from gpt.data.prepare import looks_prepared
    if looks_prepared(out):
        raise TrainingError(f"{what} {out} is a prepared data folder, not a run: pass the "
                            "--out of a training run")
    if (out / "model.safetensors").is_file():
        raise TrainingError(f"{what} {out} holds model.safetensors but no config.json: a "
                            "Hugging Face model folder needs both (config.json says what the "
                            "weights are)")
    raise TrainingError(f"no checkpoint at {root}: {what} must be a trained run (train first: "
                        f"tensorlite-gpt {made_by} --out {out})")


def load_tokenizer_of(out: str | os.PathLike):
    """The tokenizer a run in ``out`` was trained with (with its chat tokens after SFT)."""
    from .align.template import load_chat_tokenizer
    from .data.tokenizer import load_tokenizer
    files = [Path(out) / n for n in ("tokenizer.model", "tokenizer.json")]
    base = load_tokenizer(next((f for f in files if f.exists()), files[0]))
    return load_chat_tokenizer(out, base) or base


def load_run(out: str | os.PathLike, which: str | None = None, device: str = "cpu",
             say=print, what: str = "--out", made_by: str = "train"):
    """(model, tokenizer, meta) of the run in ``out``: its checkpoint (see pick_checkpoint)
    into a GPT on ``device``, and its tokenizer; or of a Hugging Face GPT-2 folder
    (gpt.hf: config.json, model.safetensors, the tokenizer)."""
    from .hf import is_hf_folder, load_hf_folder
    from .model import GPT, GPTConfig
    out = os.path.expanduser(str(out))
    if is_hf_folder(out):           # a Hugging Face GPT-2 folder (config.json, safetensors)
        model, tok = load_hf_folder(out, device)      # (in eval mode, as from_pretrained)
        return model, tok, {"config": model.config.to_dict(), "path": str(out),
                            "extra": {"train_config": {}}}
    path = pick_checkpoint(out, which, say, what, made_by)
    meta = ckpt.load_checkpoint(path)
    model = GPT(GPTConfig.from_dict(meta["config"])).to(device)
    ckpt.load_checkpoint(path, model=model)
    model.eval()                    # for inference: no dropout (train() turns it back on)
    tok = load_tokenizer_of(out)
    if tok.vocab_size != model.config.vocab_size:
        raise TrainingError(f"the tokenizer in {out} has {tok.vocab_size} ids but the model in "
                            f"{path} has {model.config.vocab_size}; the run folder is "
                            "inconsistent (was a file replaced?)")
    return model, tok, meta
