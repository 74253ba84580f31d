"""Checkpoints: exact round trip, exact resume, clear errors, crash safety."""
import json
import os
from pathlib import Path

import numpy as np
import pytest

import tensorlite as tl
from nn import checkpoint as ck
from nn.checkpoint import (CheckpointCorruptError, CheckpointError, CheckpointNotFoundError,
                           latest_checkpoint, load_checkpoint, load_state_dict_file, read_metadata,
                           save_checkpoint, save_state_dict, verify_checkpoint)
from nn.module import Module, Parameter
from nn.optim import SGD, AdamW
from nn.schedule import WarmupCosine


class Block(Module):
    def __init__(self, d_in, d_out):
        super().__init__()
        self.w = Parameter(tl.randn(d_in, d_out) * 0.5)
        self.b = Parameter(tl.zeros(d_out))

    def forward(self, x):
        return (x @ self.w + self.b).tanh()


class Net(Module):
    def __init__(self, d=4, h=6):
        super().__init__()
        self.l1 = Block(d, h)
        self.l2 = Block(h, 1)
        self.register_buffer("scale", tl.tensor([2.0]))

    def forward(self, x):
        return self.l2(self.l1(x)) * self.scale


def train(model, opt, batches, sched=None):
    for x, y in batches:
        opt.zero_grad()
        loss = ((model(tl.tensor(x)) - tl.tensor(y)) ** 2).mean()
        loss.backward()
        opt.step()
        if sched is not None:
            sched.step()


def batches(seed, n):
    r = np.random.default_rng(seed)
    return [(r.standard_normal((8, 4)).astype(np.float32),
             r.standard_normal((8, 1)).astype(np.float32)) for _ in range(n)]


def make_opt(model):
    decay = [model.l1.w, model.l2.w]
    return AdamW([{"params": decay, "weight_decay": 0.1},
                  {"params": [model.l1.b, model.l2.b], "weight_decay": 0.0}], lr=0.01)


def params_of(model):
    return {k: v.data.copy() for k, v in model.state_dict().items()}


def assert_same(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


# ----------------------------------------------------------------------------- round trip
def test_round_trip_and_exact_resume(tmp_path):
    tl.manual_seed(1)
    model = Net()
    opt = make_opt(model)
    sched = WarmupCosine(opt, warmup_steps=2, max_steps=10, min_lr=1e-3)
    data = batches(0, 6)
    train(model, opt, data[:3], sched)
    rng_state = tl.default_generator.get_state()
    folder = save_checkpoint(tmp_path / "ckpt", model, opt, config={"d": 4, "h": 6},
                             extra={"step": 3, "rng": rng_state}, scheduler=sched)
    assert os.path.basename(folder) == "step-00000003"
    assert sorted(os.listdir(folder)) == ["meta.json", "model.safetensors", "optim.safetensors"]
    assert latest_checkpoint(tmp_path / "ckpt") == folder

    tl.manual_seed(99)                       # a fresh model with other weights
    model2 = Net()
    opt2 = make_opt(model2)
    sched2 = WarmupCosine(opt2, warmup_steps=2, max_steps=10, min_lr=1e-3)
    assert not np.array_equal(model2.l1.w.data, model.l1.w.data)
    meta = load_checkpoint(tmp_path / "ckpt", model2, opt2, sched2)
    assert meta["config"] == {"d": 4, "h": 6} and meta["extra"]["step"] == 3
    assert meta["extra"]["rng"] == rng_state and meta["path"] == folder
    assert_same(params_of(model2), params_of(model))
    assert sched2.get_last_lr() == sched.get_last_lr()

    train(model, opt, data[3:], sched)       # both continue identically, bit for bit
    train(model2, opt2, data[3:], sched2)
    assert_same(params_of(model2), params_of(model))
    assert opt2.state[model2.l1.w]["step"] == 6


def test_model_only_and_specific_folder(tmp_path):
    model = Net()
    folder = save_checkpoint(tmp_path, model, config={"d": 4})
    assert os.path.basename(folder) == "ckpt-000001"
    m2 = Net()
    load_checkpoint(folder, m2)              # the folder itself, not the root
    assert_same(params_of(m2), params_of(model))
    with pytest.raises(CheckpointError, match="holds no optimizer state"):
        load_checkpoint(tmp_path, m2, make_opt(m2))


def test_keep_and_unique_names(tmp_path):
    model = Net()
    opt = make_opt(model)
    for step in (1, 2, 2, 3):
        save_checkpoint(tmp_path, model, opt, extra={"step": step}, keep=2)
    names = sorted(n for n in os.listdir(tmp_path) if n != "latest")
    assert names == ["step-00000002-1", "step-00000003"]
    assert json.loads((tmp_path / "step-00000003" / "meta.json").read_text())["seq"] == 4
    save_checkpoint(tmp_path, model, opt, extra={"step": 4})    # keep=1
    assert sorted(os.listdir(tmp_path)) == ["latest", "step-00000004"]


def test_save_state_dict_file(tmp_path):
    model = Net()
    f = save_state_dict(model.state_dict(), tmp_path / "w.safetensors", metadata={"note": "hi"})
    got = load_state_dict_file(f)
    assert_same(got, params_of(model))
    assert got["l1.w"].dtype == np.float32
    assert read_metadata(f) == {"note": "hi"}
    assert os.listdir(tmp_path) == ["w.safetensors"]
    with pytest.raises(TypeError, match="str to str; 'n' -> int"):
        save_state_dict({"a": np.zeros(2)}, tmp_path / "x.safetensors", metadata={"n": 1})
    with pytest.raises(TypeError, match="'a' is a list"):
        save_state_dict({"a": [1, 2]}, tmp_path / "x.safetensors")


# ----------------------------------------------------------------------------- damaged files
def test_truncated_and_foreign_files_are_clear_errors(tmp_path):
    model = Net()
    f = save_state_dict(model.state_dict(), tmp_path / "w.safetensors")
    data = Path(f).read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[:-10])
    (tmp_path / "text.safetensors").write_bytes(b"this is not a safetensors file at all")
    (tmp_path / "empty.safetensors").write_bytes(b"")
    for name in ("cut", "text", "empty"):
        path = str(tmp_path / f"{name}.safetensors")
        with pytest.raises(CheckpointError, match="is not a readable safetensors file") as e:
            load_state_dict_file(path)
        assert path in str(e.value) and "earlier checkpoint" in str(e.value)
        assert e.value.__cause__ is None and e.value.__suppress_context__
    with pytest.raises(CheckpointNotFoundError, match="nope.safetensors: no such file"):
        load_state_dict_file(tmp_path / "nope.safetensors")
    with pytest.raises(FileNotFoundError):       # resume-if-present code can catch this
        load_checkpoint(tmp_path / "no-such-run")


def test_truncated_checkpoint_file(tmp_path):
    model = Net()
    opt = make_opt(model)
    folder = save_checkpoint(tmp_path, model, opt)
    f = os.path.join(folder, "optim.safetensors")
    data = Path(f).read_bytes()
    Path(f).write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"optim.safetensors has \d+ bytes but was saved "
                                              r"with \d+: it is truncated"):
        load_checkpoint(tmp_path, Net(), make_opt(Net()))
    Path(folder, "meta.json").write_text('{"format": "tensorlite-che')
    with pytest.raises(CheckpointError, match="meta.json is not readable JSON"):
        load_checkpoint(tmp_path, Net())



# ----------------------------------------------------------------------------- content hashes
def _big_trained(d=128, h=256):
    """A model whose model.safetensors and optim.safetensors exceed 64 KiB, trained a step so
    the optimizer has state."""
    tl.manual_seed(3)
    model = Net(d=d, h=h)
    opt = make_opt(model)
    r = np.random.default_rng(0)
    train(model, opt, [(r.standard_normal((8, d)).astype(np.float32),
                        r.standard_normal((8, 1)).astype(np.float32))])
    return model, opt


def _overwrite_middle(file, data: bytes):
    """Write ``data`` over the middle of ``file`` in place: the size does not change."""
    size = os.path.getsize(file)
    assert size > len(data) + 1024
    with open(file, "r+b") as f:
        f.seek((size - len(data)) // 2)
        f.write(data)
    assert os.path.getsize(file) == size


def test_meta_records_sha256_of_each_file(tmp_path):
    import hashlib
    model, opt = _big_trained(d=4, h=6)
    folder = save_checkpoint(tmp_path, model, opt)
    meta = json.loads(Path(folder, "meta.json").read_text())
    assert sorted(meta["sha256"]) == ["model.safetensors", "optim.safetensors"]
    for f, digest in meta["sha256"].items():
        assert digest == hashlib.sha256(Path(folder, f).read_bytes()).hexdigest()


def test_corrupt_model_file_of_same_size_is_detected(tmp_path):
    model, opt = _big_trained()
    folder = save_checkpoint(tmp_path, model, opt)
    file = os.path.join(folder, "model.safetensors")
    _overwrite_middle(file, b"\xff" * 65536)
    tl.manual_seed(7)
    m2, _ = _big_trained()
    before = params_of(m2)
    with pytest.raises(CheckpointCorruptError, match="does not match the SHA-256 recorded at "
                                                     "save time") as e:
        load_checkpoint(tmp_path, m2)
    assert file in str(e.value) and "earlier or another checkpoint" in str(e.value)
    assert isinstance(e.value, CheckpointError)
    assert_same(params_of(m2), before)            # nothing was changed
    assert load_checkpoint(tmp_path)["path"] == folder    # meta only: no hashing, still loads


def test_corrupt_optimizer_file_of_same_size_is_detected(tmp_path):
    model, opt = _big_trained()
    folder = save_checkpoint(tmp_path, model, opt)
    file = os.path.join(folder, "optim.safetensors")
    _overwrite_middle(file, b"\xff" * 65536)
    m2, o2 = _big_trained()
    before_p = params_of(m2)
    before_o = {k: v.copy() for k, v in o2.state[m2.l1.w].items() if isinstance(v, np.ndarray)}
    for kwargs in ({"optimizer": o2}, {"model": m2, "optimizer": o2}):
        with pytest.raises(CheckpointCorruptError, match="optim.safetensors is damaged") as e:
            load_checkpoint(tmp_path, **kwargs)
        assert file in str(e.value)
        assert_same(params_of(m2), before_p)
        assert_same({k: v for k, v in o2.state[m2.l1.w].items() if k in before_o}, before_o)
    load_checkpoint(tmp_path, model=Net(d=128, h=256))    # the model file is intact


def test_single_flipped_byte_is_detected(tmp_path):
    model, opt = _big_trained(d=4, h=6)
    folder = save_checkpoint(tmp_path, model, opt)
    file = Path(folder, "model.safetensors")
    data = bytearray(file.read_bytes())
    data[len(data) - 3] ^= 0x01                    # one bit of one float in the last tensor
    file.write_bytes(bytes(data))
    with pytest.raises(CheckpointCorruptError, match="model.safetensors is damaged"):
        load_checkpoint(tmp_path, Net())


def test_verify_checkpoint(tmp_path):
    model, opt = _big_trained()
    first = save_checkpoint(tmp_path, model, opt, extra={"step": 1}, keep=None)
    second = save_checkpoint(tmp_path, model, opt, extra={"step": 2}, keep=None)
    assert verify_checkpoint(tmp_path) == second          # the root follows `latest`
    assert verify_checkpoint(first) == first
    _overwrite_middle(os.path.join(second, "optim.safetensors"), b"\xff" * 65536)
    with pytest.raises(CheckpointCorruptError, match="optim.safetensors is damaged"):
        verify_checkpoint(tmp_path)
    assert verify_checkpoint(first) == first              # a fallback is still good
    Path(first, "model.safetensors").write_bytes(b"\x00" * 10)
    with pytest.raises(CheckpointCorruptError, match="model.safetensors has 10 bytes"):
        verify_checkpoint(first)
    os.remove(os.path.join(first, "model.safetensors"))
    with pytest.raises(CheckpointCorruptError, match="model.safetensors is missing"):
        verify_checkpoint(first)
    with pytest.raises(CheckpointNotFoundError):
        verify_checkpoint(tmp_path / "no-such-run")


def test_checkpoint_without_hashes_still_loads(tmp_path):
    """Checkpoints saved before the hashes were recorded load (checked by size only)."""
    model, opt = _big_trained(d=4, h=6)
    folder = save_checkpoint(tmp_path, model, opt)
    meta_file = Path(folder, "meta.json")
    meta = json.loads(meta_file.read_text())
    del meta["sha256"]
    meta_file.write_text(json.dumps(meta))
    m2 = Net()
    o2 = make_opt(m2)
    load_checkpoint(tmp_path, m2, o2)
    assert_same(params_of(m2), params_of(model))
    assert verify_checkpoint(tmp_path) == folder


def test_wrong_shapes_and_keys_are_clear_errors(tmp_path):
    model = Net(d=4, h=6)
    save_checkpoint(tmp_path, model, make_opt(model), config={"d": 4, "h": 6})
    other = Net(d=4, h=5)
    before = params_of(other)
    with pytest.raises(CheckpointError, match=r"model.safetensors: shapes do not match Net "
                                              r"\(l1.w: \(4, 6\) in the file, \(4, 5\) in the model"):
        load_checkpoint(tmp_path, other, make_opt(other))
    assert_same(params_of(other), before)     # nothing was changed

    class Other(Module):
        def __init__(self):
            super().__init__()
            self.w = Parameter(tl.zeros(3))

    with pytest.raises(CheckpointError, match=r"missing from the file: \['w'\]; not in the "
                                              r"model: \['l1.b', 'l1.w'"):
        load_checkpoint(tmp_path, Other())
    with pytest.raises(CheckpointError, match="holds AdamW state but the optimizer is SGD"):
        load_checkpoint(tmp_path, Net(), SGD(Net().parameters(), lr=0.1))
    m = Net()
    swapped = AdamW([{"params": [m.l2.w, m.l1.w], "weight_decay": 0.1},
                     {"params": [m.l1.b, m.l2.b], "weight_decay": 0.0}])
    with pytest.raises(CheckpointError, match="optimizer parameter 0 was 'l1.w' when saved but "
                                              "is 'l2.w' now"):
        load_checkpoint(tmp_path, m, swapped)


def test_bad_inputs_to_save(tmp_path):
    model = Net()
    with pytest.raises(TypeError, match=r"meta\['extra'\]\['rng'\] cannot go into meta.json"):
        save_checkpoint(tmp_path, model, extra={"rng": np.zeros(3)})
    assert os.listdir(tmp_path) == []           # nothing written
    folder = save_checkpoint(tmp_path, model)
    with pytest.raises(CheckpointError, match="is itself one checkpoint"):
        save_checkpoint(folder, model)
    with pytest.raises(ValueError, match="tag '../x' is not a usable folder name"):
        save_checkpoint(tmp_path, model, tag="../x")
    with pytest.raises(ValueError, match="nothing to save"):
        save_checkpoint(tmp_path)


# ----------------------------------------------------------------------------- crashes
def _fail_after_half(monkeypatch, fail_on: str):
    """Make the safetensors write of ``fail_on`` write half its bytes and then raise, as a
    process killed (or a disk filling up) in the middle of the write."""
    real = ck._save_file

    def flaky(arrays, path, metadata):
        real(arrays, path, metadata)
        if os.path.basename(path) == fail_on:
            data = Path(path).read_bytes()
            Path(path).write_bytes(data[: len(data) // 2])
            raise OSError(28, "No space left on device")

    monkeypatch.setattr(ck, "_save_file", flaky)


def test_crash_mid_write_keeps_previous_checkpoint(tmp_path, monkeypatch):
    model = Net()
    opt = make_opt(model)
    train(model, opt, batches(0, 2))
    good = save_checkpoint(tmp_path, model, opt, extra={"step": 2})
    saved = params_of(model)
    train(model, opt, batches(1, 2))

    _fail_after_half(monkeypatch, "optim.safetensors")
    with pytest.raises(OSError, match="No space left"):
        save_checkpoint(tmp_path, model, opt, extra={"step": 4})
    # the interrupted save left nothing behind, and `latest` still names the good checkpoint
    assert sorted(os.listdir(tmp_path)) == ["latest", "step-00000002"]
    m2 = Net()
    o2 = make_opt(m2)
    meta = load_checkpoint(tmp_path, m2, o2)
    assert meta["path"] == good and meta["extra"]["step"] == 2
    assert_same(params_of(m2), saved)


def test_hard_crash_leftovers_are_ignored_then_removed(tmp_path, monkeypatch):
    """A killed process runs no cleanup: the half-written folder stays, under a temporary
    name that the loader never reads; the next save removes it."""
    model = Net()
    good = save_checkpoint(tmp_path, model, make_opt(model), extra={"step": 1})
    _fail_after_half(monkeypatch, "model.safetensors")
    monkeypatch.setattr(ck, "_remove", lambda path: None)          # no cleanup runs
    with pytest.raises(OSError):
        save_checkpoint(tmp_path, model, make_opt(model), extra={"step": 2})
    left = [n for n in os.listdir(tmp_path) if n.startswith(".tmp-")]
    assert len(left) == 1 and not os.path.exists(tmp_path / left[0] / "meta.json")
    assert load_checkpoint(tmp_path, Net())["path"] == good
    with pytest.raises(CheckpointNotFoundError, match="no meta.json: an interrupted save"):
        load_checkpoint(tmp_path / left[0], Net())
    monkeypatch.undo()
    save_checkpoint(tmp_path, model, make_opt(model), extra={"step": 2})
    assert sorted(os.listdir(tmp_path)) == ["latest", "step-00000002"]


def test_crash_before_commit_keeps_previous(tmp_path, monkeypatch):
    """The new folder is complete and renamed, but `latest` was not replaced yet."""
    model = Net()
    good = save_checkpoint(tmp_path, model, extra={"step": 1})
    saved = params_of(model)
    with tl.no_grad():
        model.l1.w += 1.0
    real_replace = os.replace

    def crash_on_pointer(src, dst):
        if os.path.basename(dst) == "latest":
            raise KeyboardInterrupt("killed")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", crash_on_pointer)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path, model, extra={"step": 2})
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == ["latest", "step-00000001"]
    m2 = Net()
    assert load_checkpoint(tmp_path, m2)["path"] == good
    assert_same(params_of(m2), saved)


def test_crash_in_single_file_write_keeps_old_file(tmp_path, monkeypatch):
    model = Net()
    f = save_state_dict(model.state_dict(), tmp_path / "w.safetensors")
    saved = params_of(model)

    def flaky(arrays, path, metadata):
        Path(path).write_bytes(b"\x00" * 100)          # a partial write, then the failure
        raise OSError(5, "I/O error")

    monkeypatch.setattr(ck, "_save_file", flaky)
    with tl.no_grad():
        model.l1.w += 1.0
    with pytest.raises(OSError, match="I/O error"):
        save_state_dict(model.state_dict(), f)
    assert os.listdir(tmp_path) == ["w.safetensors"]
    assert_same(load_state_dict_file(f), saved)
