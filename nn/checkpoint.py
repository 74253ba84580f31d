"""Checkpoints: safetensors files for arrays, JSON for everything else. Never pickle, so
loading a checkpoint cannot run code.

Layout of a checkpoint folder (``save_checkpoint("runs/ckpt", ...)``)::

    runs/ckpt/
      latest                   "step-00000200" -- written last: the commit point
      step-00000200/
        model.safetensors      the model's state_dict (parameters and persistent buffers)
        optim.safetensors      the optimizer's state arrays, keyed "state.<index>.<name>"
        meta.json              format version, config, extra (step, RNG, loader position...),
                               optimizer type, hyperparameters and state layout, scheduler,
                               and the size and SHA-256 of each file above ("sizes", "sha256")
      .tmp-step-00000300-1a2b/ an interrupted save: never read, removed by the next save

Why a ``latest`` pointer rather than renaming a folder over the old one: POSIX cannot
atomically replace a non-empty directory, so "rename old away, rename new in" leaves a
moment with no checkpoint at the path and needs recovery code in the loader. Here a save
writes a complete new folder under a temporary name, fsyncs every file and the folder,
renames it to its final (new, unique) name, and only then replaces ``latest`` atomically
(temporary file + fsync + ``os.replace``). A crash at any point leaves ``latest`` naming
either the previous complete checkpoint or the new complete one. Older checkpoints
beyond ``keep`` are deleted after the commit. One process writes a given folder (rank 0
under data parallelism).

Damage after the save (a bad disk, an interrupted copy, a file overwritten in place) is
caught on load: ``load_checkpoint`` checks the size and SHA-256 of each file it reads
against meta.json before it changes the model or optimizer, and raises
``CheckpointCorruptError`` naming the file; ``verify_checkpoint`` checks every file
without loading anything (to choose another checkpoint when one is damaged). Checkpoints
written before the hashes were recorded have no "sha256" and are checked by size only.
"""
from __future__ import annotations

import datetime
import hashlib
import json
import os
import re
import secrets
import shutil

import numpy as np
import safetensors.numpy as _stn
from safetensors import SafetensorError, safe_open

from tensorlite import backend
from tensorlite.tensor import Tensor

__all__ = ["CheckpointError", "CheckpointNotFoundError", "CheckpointCorruptError",
           "save_state_dict", "load_state_dict_file", "read_metadata", "save_checkpoint",
           "load_checkpoint", "verify_checkpoint", "latest_checkpoint"]

FORMAT = "tensorlite-checkpoint"
FORMAT_VERSION = 1
MODEL_FILE, OPTIM_FILE, META_FILE, LATEST_FILE = ("model.safetensors", "optim.safetensors",
                                                  "meta.json", "latest")
_TMP_PREFIX = ".tmp-"


class CheckpointError(Exception):
    """A checkpoint that cannot be written or read; the message names the file and a fix."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """No checkpoint at the path (also a FileNotFoundError, for "resume if present" code)."""


class CheckpointCorruptError(CheckpointError):
    """A checkpoint file is missing, or its size or SHA-256 differs from what meta.json
    recorded at save time; the message names the file."""


# ----------------------------------------------------------------------------- durable writes
def _fsync_path(path: str) -> None:
    """Flush a file's (or a folder's entries') data to the disk."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:            # folders cannot be opened on Windows; nothing to sync there
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


fsync_path = _fsync_path  # public: gpt.data.shards makes its renames durable the same way


_HASH_CHUNK = 1 << 20


def _sha256_file(path: str) -> str:
    """The SHA-256 hex digest of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    buf = bytearray(_HASH_CHUNK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while True:
            n = f.readinto(buf)
            if not n:
                break
            h.update(view[:n])
    return h.hexdigest()


def _tmp_name(final: str) -> str:
    d, base = os.path.split(os.path.abspath(final))
    return os.path.join(d, f"{_TMP_PREFIX}{base}-{secrets.token_hex(4)}")


def _save_file(arrays: dict, path: str, metadata) -> None:
    """The one place that calls safetensors to write (tests replace it to simulate a crash)."""
    _stn.save_file(arrays, path, metadata=metadata)
    readable_as_umask(path)


def readable_as_umask(path: str) -> None:
    """safetensors writes files 0600 (through a private temporary file); give them the mode
    any other file gets here (0666 less the umask), so a shared checkpoint is readable."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)


def _write_text_atomic(path: str, text: str) -> None:
    tmp = _tmp_name(path)
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise
    _fsync_path(os.path.dirname(os.path.abspath(path)))


def _remove(path: str) -> None:
    """Best-effort removal of a file or folder we created."""
    try:
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        elif os.path.lexists(path):
            os.unlink(path)
    except OSError:
        pass


# ----------------------------------------------------------------------------- one file
def _host_arrays(state, what: str) -> dict:
    """name -> contiguous NumPy array (CuPy data copied to the host)."""
    out = {}
    for k, v in state.items():
        if not isinstance(k, str):
            raise TypeError(f"{what}: keys must be strings, got {k!r}")
        arr = v.data if isinstance(v, Tensor) else v
        if not (isinstance(arr, np.ndarray) or backend.is_cupy_array(arr)):
            raise TypeError(f"{what}: {k!r} is a {type(v).__name__}, not a Tensor or array")
        out[k] = np.ascontiguousarray(backend.to_numpy(arr))
    return out


def _check_metadata(metadata, what: str):
    if metadata is None:
        return None
    for k, v in metadata.items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise TypeError(f"{what}: safetensors metadata must map str to str; {k!r} -> "
                            f"{type(v).__name__} (json.dumps it first)")
    return dict(metadata)


def _write_safetensors(arrays: dict, path: str, metadata) -> None:
    """Write ``path`` whole and synced (the caller makes it visible atomically)."""
    try:
        _save_file(arrays, path, metadata)
    except SafetensorError as e:
        raise CheckpointError(f"could not write {path}: {e}") from None
    _fsync_path(path)


def save_state_dict(state, file, metadata: dict | None = None) -> str:
    """Write ``{name: Tensor | array}`` to one safetensors file, atomically: a temporary file
    in the same folder, fsync, then ``os.replace``; a crash leaves the old file (or none)."""
    file = os.fspath(file)
    arrays = _host_arrays(state, f"save_state_dict({file!r})")
    metadata = _check_metadata(metadata, f"save_state_dict({file!r})")
    os.makedirs(os.path.dirname(os.path.abspath(file)), exist_ok=True)
    tmp = _tmp_name(file)
    try:
        _write_safetensors(arrays, tmp, metadata)
        os.replace(tmp, file)
    except BaseException:
        _remove(tmp)
        raise
    _fsync_path(os.path.dirname(os.path.abspath(file)))
    return file


def _unreadable(file, e) -> CheckpointError:
    return CheckpointError(
        f"{file} is not a readable safetensors file ({e}). It may be truncated (an interrupted "
        f"copy, a full disk) or another format; copy it again or load an earlier checkpoint")


def load_state_dict_file(file) -> dict:
    """``{name: numpy array}`` from a safetensors file; a missing, truncated or foreign file is
    a ``CheckpointError`` naming it."""
    file = os.fspath(file)
    if not os.path.isfile(file):
        raise CheckpointNotFoundError(f"{file}: no such file" + (
            " (it is a folder: use load_checkpoint for checkpoint folders)"
            if os.path.isdir(file) else ""))
    try:
        return _stn.load_file(file)
    except (SafetensorError, OSError, ValueError, TypeError) as e:
        raise _unreadable(file, e) from None


def read_metadata(file) -> dict:
    """The text metadata stored in a safetensors file's header (without reading the arrays)."""
    file = os.fspath(file)
    if not os.path.isfile(file):
        raise CheckpointNotFoundError(f"{file}: no such file")
    try:
        with safe_open(file, framework="numpy") as f:
            return dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError, TypeError) as e:
        raise _unreadable(file, e) from None


# ----------------------------------------------------------------------------- JSON
def _json_default(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, (np.ndarray, Tensor)) or backend.is_cupy_array(o):
        raise TypeError(f"an array of shape {tuple(o.shape)} is not JSON: use .tolist() for a "
                        "small one, or put it in the model/optimizer state")
    raise TypeError(f"a {type(o).__name__} is not JSON-serialisable")


def _dumps(obj, what: str) -> str:
    try:
        return json.dumps(obj, indent=1, default=_json_default)
    except (TypeError, ValueError) as e:
        bad = _find_unjsonable(obj, what)
        raise TypeError(f"save_checkpoint: {bad or what} cannot go into meta.json: {e}") from None


def _find_unjsonable(obj, path):
    """The path of the first value json cannot encode (for the error message)."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            if not isinstance(k, (str, int, float, bool)) and k is not None:
                return f"{path} key {k!r}"
            r = _find_unjsonable(v, f"{path}[{k!r}]")
            if r:
                return r
        return None
    if isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            r = _find_unjsonable(v, f"{path}[{i}]")
            if r:
                return r
        return None
    try:
        json.dumps(obj, default=_json_default)
    except (TypeError, ValueError):
        return path
    return None


# ----------------------------------------------------------------------------- optimizer layout
def _split_optimizer_state(optimizer, model):
    """Optimizer state_dict -> (arrays for safetensors, JSON-able description)."""
    sd = optimizer.state_dict()
    arrays, state = {}, {}
    for i, entries in sd["state"].items():
        scalars, names = {}, []
        for name, v in entries.items():
            if isinstance(v, np.ndarray) or backend.is_cupy_array(v):
                arrays[f"state.{i}.{name}"] = v
                names.append(name)
            else:
                scalars[name] = v.item() if hasattr(v, "item") else v
        state[str(i)] = {"scalars": scalars, "arrays": names}
    desc = {"type": type(optimizer).__name__, "param_groups": sd["param_groups"], "state": state}
    if model is not None:
        names = {id(p): n for n, p in model.named_parameters()}
        desc["param_names"] = [names.get(id(p)) for g in optimizer.param_groups
                               for p in g["params"]]
    return arrays, desc


def _join_optimizer_state(desc, arrays, file):
    state = {}
    for i, entry in desc["state"].items():
        st = dict(entry["scalars"])
        for name in entry["arrays"]:
            key = f"state.{i}.{name}"
            if key not in arrays:
                raise CheckpointError(f"{file} has no array {key!r} that meta.json lists; the "
                                      "checkpoint is damaged: load an earlier one")
            st[name] = arrays[key]
        state[int(i)] = st
    return {"state": state, "param_groups": desc["param_groups"]}


# ----------------------------------------------------------------------------- checkpoints
_TAG_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+=-]*$")


def _read_meta(folder: str) -> dict:
    path = os.path.join(folder, META_FILE)
    if not os.path.isfile(path):
        raise CheckpointNotFoundError(f"{path}: no such file; {folder} is not a complete "
                                      "checkpoint folder")
    try:
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path} is not readable JSON ({e}); the checkpoint is damaged: "
                              "load an earlier one") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a tensorlite checkpoint (no \"format\": "
                              f"\"{FORMAT}\")")
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(f"{path} has format version {meta.get('format_version')}, newer "
                              f"than this tensorlite reads ({FORMAT_VERSION}); upgrade tensorlite")
    return meta


def latest_checkpoint(root) -> str | None:
    """The folder ``root/latest`` names, or None when ``root`` holds no committed checkpoint."""
    root = os.fspath(root)
    pointer = os.path.join(root, LATEST_FILE)
    if not os.path.isfile(pointer):
        return None
    try:
        with open(pointer, encoding="utf-8") as f:
            name = f.read().strip()
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{pointer} is not readable ({e}); write the folder name of a "
                              "checkpoint in it") from None
    if not _TAG_RE.match(name):
        raise CheckpointError(f"{pointer} names {name!r}, which is not a checkpoint folder name; "
                              "the file is damaged: write the folder name of a checkpoint in it")
    return os.path.join(root, name)


def _committed(root: str) -> list:
    """(seq, name) of the tensorlite checkpoint folders in ``root``."""
    out = []
    for name in os.listdir(root):
        folder = os.path.join(root, name)
        if name.startswith(".") or not os.path.isdir(folder):
            continue
        try:
            meta = _read_meta(folder)
        except CheckpointError:
            continue
        out.append((int(meta.get("seq", 0)), name))
    return sorted(out)


def save_checkpoint(path, model=None, optimizer=None, config: dict | None = None,
                    extra: dict | None = None, scheduler=None, tag: str | None = None,
                    keep: int | None = 1) -> str:
    """Save a model, an optimizer (and a scheduler) as one checkpoint in folder ``path``.

    ``config``: the JSON-able settings that rebuild the model; ``extra``: JSON-able training
    state (``{"step": 1200, "rng": tl.default_generator.get_state(), "loader": ...}``).
    ``tag``: the checkpoint's folder name (default ``step-<extra["step"]>``, else
    ``ckpt-<n>``). ``keep``: how many checkpoints to keep (the newest; None keeps all).
    Returns the new checkpoint's folder. See the module docstring for the crash safety.
    """
    root = os.fspath(path)
    if keep is not None and (isinstance(keep, bool) or not isinstance(keep, int) or keep < 1):
        raise ValueError(f"save_checkpoint: keep must be an int >= 1 or None, got {keep!r}")
    if os.path.isfile(os.path.join(root, META_FILE)):
        raise CheckpointError(f"save_checkpoint: {root} is itself one checkpoint (it holds "
                              f"{META_FILE}); pass the folder that holds checkpoints, e.g. "
                              f"{os.path.dirname(os.path.abspath(root))}")
    if model is None and optimizer is None and config is None and extra is None:
        raise ValueError("save_checkpoint: nothing to save (pass model=, optimizer=, config= "
                         "or extra=)")
    os.makedirs(root, exist_ok=True)

    # gather and check everything before writing anything
    prev = latest_checkpoint(root)
    seq = 1
    if prev is not None and os.path.isdir(prev):
        try:
            seq = int(_read_meta(prev).get("seq", 0)) + 1
        except CheckpointError:
            seq = max([s for s, _ in _committed(root)] + [0]) + 1
    model_arrays = _host_arrays(model.state_dict(), "model state") if model is not None else None
    optim_arrays, optim_desc = (None, None)
    if optimizer is not None:
        optim_arrays, optim_desc = _split_optimizer_state(optimizer, model)
        optim_arrays = _host_arrays(optim_arrays, "optimizer state")
    step = (extra or {}).get("step")
    if tag is None:
        tag = f"step-{int(step):08d}" if isinstance(step, (int, np.integer)) and not isinstance(
            step, bool) and step >= 0 else f"ckpt-{seq:06d}"
    if not _TAG_RE.match(tag) or tag == LATEST_FILE:
        raise ValueError(f"save_checkpoint: tag {tag!r} is not a usable folder name (letters, "
                         "digits and _ . + = -, not starting with a dot, not 'latest')")
    name, k = tag, 1
    while os.path.lexists(os.path.join(root, name)):    # never write over a committed folder
        name, k = f"{tag}-{k}", k + 1
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "seq": seq, "tag": name,
            "saved_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "config": config, "extra": extra, "files": {}, "sizes": {}, "sha256": {},
            "optimizer": optim_desc,
            "scheduler": scheduler.state_dict() if scheduler is not None else None}
    if model is not None:
        meta["model"] = {"class": type(model).__name__, "tensors": len(model_arrays),
                         "parameters": int(sum(a.size for a in model_arrays.values()))}
    _dumps(meta, "meta")                      # a non-JSON config fails here, before any write

    # write a whole new folder under a temporary name
    tmp = os.path.join(root, f"{_TMP_PREFIX}{name}-{secrets.token_hex(4)}")
    final = os.path.join(root, name)
    renamed = False
    try:
        os.mkdir(tmp)
        files = {}
        if model_arrays is not None:
            _write_safetensors(model_arrays, os.path.join(tmp, MODEL_FILE),
                               {"format": FORMAT, "content": "model"})
            files["model"] = MODEL_FILE
        if optim_arrays is not None:
            _write_safetensors(optim_arrays, os.path.join(tmp, OPTIM_FILE),
                               {"format": FORMAT, "content": "optimizer"})
            files["optimizer"] = OPTIM_FILE
        meta["files"] = files
        meta["sizes"] = {f: os.path.getsize(os.path.join(tmp, f)) for f in files.values()}
        meta["sha256"] = {f: _sha256_file(os.path.join(tmp, f)) for f in files.values()}
        with open(os.path.join(tmp, META_FILE), "w", encoding="utf-8") as f:
            f.write(_dumps(meta, "meta"))
            f.flush()
            os.fsync(f.fileno())
        _fsync_path(tmp)
        os.rename(tmp, final)
        renamed = True
        _fsync_path(root)
        _write_text_atomic(os.path.join(root, LATEST_FILE), name + "\n")   # the commit
    except BaseException:
        _remove(final if renamed else tmp)
        raise

    # after the commit: drop interrupted saves and checkpoints beyond `keep` (best effort)
    for entry in os.listdir(root):
        if entry.startswith(_TMP_PREFIX):
            _remove(os.path.join(root, entry))
    if keep is not None:
        older = [n for _, n in _committed(root) if n != name]
        for n in older[:max(0, len(older) - (keep - 1))]:
            _remove(os.path.join(root, n))
    return final


def _resolve(path) -> str:
    """A checkpoint folder from a root (follows ``latest``) or from the folder itself."""
    path = os.fspath(path)
    if os.path.isfile(os.path.join(path, META_FILE)):
        return path
    if not os.path.exists(path):
        raise CheckpointNotFoundError(f"no checkpoint at {path}: the path does not exist")
    if not os.path.isdir(path):
        raise CheckpointError(f"{path} is a file, not a checkpoint folder; for a single "
                              "safetensors file use load_state_dict_file")
    folder = latest_checkpoint(path)
    if folder is None:
        found = [n for _, n in _committed(path)]
        hint = (f"; it holds checkpoint folders {found} but no '{LATEST_FILE}' file (a save that "
                f"did not finish?): pass one of them" if found else "")
        if not found and any(n.endswith(".safetensors") for n in os.listdir(path)):
            hint = ": an interrupted save (its files are incomplete); load an earlier checkpoint"
        raise CheckpointNotFoundError(f"no checkpoint at {path}: no '{LATEST_FILE}' file and no "
                                      f"{META_FILE}{hint}")
    if not os.path.isdir(folder):
        raise CheckpointError(f"{os.path.join(path, LATEST_FILE)} names {os.path.basename(folder)}"
                              f", which is missing; pass an existing checkpoint folder inside "
                              f"{path}")
    return folder


def _check_model_state(model, arrays, file, strict):
    own = model.state_dict()
    missing = [k for k in own if k not in arrays]
    unexpected = [k for k in arrays if k not in own]
    if strict and (missing or unexpected):
        parts = ([f"missing from the file: {missing[:8]}" + (" ..." if len(missing) > 8 else "")]
                 if missing else []) + (
                [f"not in the model: {unexpected[:8]}" + (" ..." if len(unexpected) > 8 else "")]
                if unexpected else [])
        raise CheckpointError(f"{file} does not match {type(model).__name__}: " + "; ".join(parts) +
                              ". Build the model with the checkpoint's config (meta['config']), "
                              "or pass strict=False to load the keys that match")
    bad = [f"{k}: {tuple(arrays[k].shape)} in the file, {tuple(t.shape)} in the model"
           for k, t in own.items() if k in arrays and tuple(arrays[k].shape) != tuple(t.shape)]
    if bad:
        raise CheckpointError(f"{file}: shapes do not match {type(model).__name__} ("
                              + "; ".join(bad[:8]) + (" ..." if len(bad) > 8 else "") +
                              "). Build the model with the checkpoint's config (meta['config'])")


def _check_files(folder: str, meta: dict, hash_only=None) -> None:
    """Check that each file meta.json lists exists with its saved size, and that the files in
    ``hash_only`` (all when None) have their saved SHA-256 (when meta.json records one)."""
    meta_file = os.path.join(folder, META_FILE)
    sizes, hashes = meta.get("sizes", {}), meta.get("sha256", {})
    if not isinstance(sizes, dict) or not isinstance(hashes, dict):
        raise CheckpointError(f"{meta_file}: \"sizes\" and \"sha256\" must be objects; the "
                              "checkpoint is damaged: load an earlier one")
    listed = list(dict.fromkeys([*meta.get("files", {}).values(), *sizes, *hashes]))
    for fname in listed:
        file = os.path.join(folder, fname)
        if not os.path.isfile(file):
            raise CheckpointCorruptError(f"{file} is missing from the checkpoint; load an "
                                         "earlier one")
        size = sizes.get(fname)
        if size is not None and os.path.getsize(file) != size:
            raise CheckpointCorruptError(
                f"{file} has {os.path.getsize(file)} bytes but was saved with {size}: it is "
                "truncated or was replaced; copy it again or load an earlier checkpoint")
    for fname in (listed if hash_only is None else hash_only):
        expected = hashes.get(fname)
        if expected is None:            # saved before hashes were recorded: size only
            continue
        file = os.path.join(folder, fname)
        try:
            actual = _sha256_file(file)
        except OSError as e:
            raise CheckpointCorruptError(f"{file} cannot be read ({e}); copy it again or load "
                                         "an earlier checkpoint") from None
        if actual != str(expected).lower():
            raise CheckpointCorruptError(
                f"{file} is damaged: its content does not match the SHA-256 recorded at save "
                f"time in {META_FILE} (saved {str(expected)[:16]}..., now {actual[:16]}...). "
                "Load an earlier or another checkpoint (or copy this one again from a good "
                "source)")


def verify_checkpoint(path) -> str:
    """Check a checkpoint without loading it: meta.json is readable, and every file it lists
    exists with the size and SHA-256 recorded at save time (size only for checkpoints saved
    without hashes). ``path`` as for ``load_checkpoint``. Returns the checkpoint folder;
    raises ``CheckpointCorruptError`` naming a damaged file, or another ``CheckpointError``
    (``CheckpointNotFoundError`` when there is no checkpoint)."""
    folder = _resolve(path)
    _check_files(folder, _read_meta(folder))
    return folder


def load_checkpoint(path, model=None, optimizer=None, scheduler=None, strict: bool = True) -> dict:
    """Load a checkpoint written by ``save_checkpoint`` into ``model`` / ``optimizer`` /
    ``scheduler`` (each optional) and return its meta dict (``config``, ``extra``, ...,
    ``path``: the folder read). ``path``: the folder given to ``save_checkpoint`` (its
    ``latest`` checkpoint is read) or one checkpoint folder inside it. The model and
    optimizer state are read and checked before either is changed: each file read must
    have the SHA-256 recorded at save time, else ``CheckpointCorruptError`` names it. With
    no model or optimizer only meta.json is read (and file sizes checked), no hashing."""
    folder = _resolve(path)
    meta = _read_meta(folder)
    files = meta.get("files", {})
    for kind, obj in (("model", model), ("optimizer", optimizer)):
        if obj is not None and kind not in files:
            raise CheckpointError(f"{folder} holds no {kind} state (it was saved without "
                                  f"{kind}=); load it with {kind}=None")
    if scheduler is not None and meta.get("scheduler") is None:
        raise CheckpointError(f"{folder} holds no scheduler state; load it with scheduler=None")
    _check_files(folder, meta, hash_only=[files[k] for k, obj in (
        ("model", model), ("optimizer", optimizer)) if obj is not None])

    model_arrays = optim_state = None
    if model is not None:
        file = os.path.join(folder, files["model"])
        model_arrays = load_state_dict_file(file)
        _check_model_state(model, model_arrays, file, strict)
    if optimizer is not None:
        file = os.path.join(folder, files["optimizer"])
        desc = meta["optimizer"]
        if desc["type"] != type(optimizer).__name__:
            raise CheckpointError(f"{file} holds {desc['type']} state but the optimizer is "
                                  f"{type(optimizer).__name__}; build a {desc['type']}")
        if model is not None and desc.get("param_names") is not None:
            names = {id(p): n for n, p in model.named_parameters()}
            now = [names.get(id(p)) for g in optimizer.param_groups for p in g["params"]]
            if len(now) == len(desc["param_names"]):
                diff = [(i, a, b) for i, (a, b) in enumerate(zip(desc["param_names"], now)) if a != b]
                if diff:
                    i, a, b = diff[0]
                    raise CheckpointError(f"{file}: optimizer parameter {i} was {a!r} when saved "
                                          f"but is {b!r} now; build the parameter groups in the "
                                          "same order as when the checkpoint was saved")
        optim_state = _join_optimizer_state(desc, load_state_dict_file(file), file)
        try:
            optimizer.load_state_dict(optim_state)     # checks everything before changing state
        except (ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{file}: {e}") from None
    if model_arrays is not None:
        model.load_state_dict(model_arrays, strict=strict)
    if scheduler is not None:
        try:
            scheduler.load_state_dict(meta["scheduler"])
        except (ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{os.path.join(folder, META_FILE)}: scheduler: {e}") from None
    meta["path"] = folder
    return meta
