"""Mixed precision (nn/amp.py): float16 compute with float32 masters and dynamic loss scaling,
tested on the CPU with NumPy float16 arrays (the same code runs on CuPy)."""
import math

import numpy as np
import pytest

import nn
import tensorlite as tl
from gpt.model import GPT, GPTConfig
from nn import functional as F
from nn.amp import AmpStep, GradScaler, MixedPrecision, half_dtype

CFG = GPTConfig(vocab_size=32, block_size=16, n_layer=2, n_head=2, d_model=32)


def _data():
    """8 sequences of 17 tokens: shifts of one repeating 8-token pattern (learnable, so the
    loss falls from ln 32 = 3.47 to ~0.1 within 60 steps)."""
    base = np.random.default_rng(0).integers(0, CFG.vocab_size, 8)
    return np.stack([np.roll(np.tile(base, 3), -s)[:17] for s in range(8)])


def _train(amp: bool, steps: int, lr=3e-3, scaler=None, device="cpu"):
    """Train a tiny GPT; returns (losses, model, mp or None, optimizer, [AmpStep])."""
    tl.manual_seed(0)
    model = GPT(CFG).to(device)
    mp = None
    if amp:
        mp = MixedPrecision(model, "float16", scaler=scaler)
        opt = nn.AdamW(mp.parameters(), lr=lr)
    else:
        opt = nn.AdamW(model.parameters(), lr=lr)
    data = _data()
    x, y = tl.tensor(data[:, :-1], device=device), tl.tensor(data[:, 1:], device=device)
    losses, infos = [], []
    for _ in range(steps):
        logits, _ = model(x)
        loss = F.cross_entropy(logits.float(), y)          # the loss in float32
        losses.append(loss.item())
        if amp:
            mp.backward(loss)
            infos.append(mp.step(opt, max_norm=1.0))
        else:
            loss.backward()
            nn.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad()
    return np.array(losses), model, mp, opt, infos


def test_amp_tracks_float32_training():
    """60 steps of AdamW (lr 3e-3, clip 1.0) on a tiny GPT, float32 vs float16 + masters.

    Tolerance: float16's unit roundoff is 2^-11 = 4.9e-4. Each forward rounds the
    activations a few times per layer, and the masters keep float32's precision, so the two
    runs should differ by a few roundoffs per step without drifting apart (measured: at most
    7e-4 relative over the whole curve). 1e-2 relative (20 roundoffs) leaves room for another
    BLAS, and still fails for a broken recipe: without the copy from the masters the loss
    stays at ~3.5; float16 AdamW without masters turns the weights to nan within a few steps
    (eps = 1e-8 is 0 in float16); unscaled or doubly scaled gradients change the clipped
    update direction of Adam only slightly but the unclipped norm by 2^16, which the
    grad-norm check below catches."""
    ref, model32, _, _, _ = _train(False, 60)
    amp, model16, mp, _, infos = _train(True, 60)
    assert all(p.dtype == tl.float16 for p in model16.parameters())
    assert all(m.dtype == tl.float32 for m in mp.parameters())
    assert ref[-1] < 0.15 * ref[0]                     # it learns: the comparison means something
    rel = np.abs(amp - ref) / ref
    assert rel.max() < 1e-2, f"AMP loss curve left float32's: worst relative gap {rel.max():.3g}"
    assert rel.max() > 0                               # and it really computed in float16
    assert not any(i.skipped for i in infos)           # 2^16 does not overflow this model
    # the grad norm AMP reports is of the *unscaled* gradients: step 0's equals float32's
    tl.manual_seed(0)
    m = GPT(CFG)
    data = _data()
    m(data[:, :-1], data[:, 1:])[1].backward()
    norm32 = nn.clip_grad_norm_(m.parameters(), 1e9)
    assert infos[0].grad_norm == pytest.approx(norm32, rel=1e-2)
    # the masters and the float16 model agree to float16 rounding
    for w, mst in zip(model16.parameters(), mp.parameters()):
        np.testing.assert_array_equal(w.numpy(), mst.numpy().astype(np.float16))


def test_float16_without_masters_breaks():
    """Why the masters exist (the failure the recipe prevents, measured here so the claim in
    the docstring stays true): AdamW stepping float16 weights directly goes non-finite."""
    tl.manual_seed(0)
    model = GPT(CFG).to(tl.float16)
    opt = nn.AdamW(model.parameters(), lr=3e-3)
    data = _data()
    with np.errstate(all="ignore"):
        for _ in range(5):
            _, loss = model(data[:, :-1], data[:, 1:])
            loss.backward()
            opt.step()
            opt.zero_grad()
    assert not all(np.isfinite(p.numpy()).all() for p in model.parameters())


def _overflow_step(scaler: GradScaler, what="inf"):
    """One MixedPrecision step whose gradients hold an injected inf (or nan). Asserts that it
    was skipped: masters, working weights and optimizer state unchanged, the scale halved,
    the working grads cleared. Returns nothing; raises AssertionError when it was not."""
    tl.manual_seed(0)
    model = GPT(CFG)
    mp = MixedPrecision(model, "float16", scaler=scaler)
    opt = nn.AdamW(mp.parameters(), lr=1e-3)
    data = _data()
    # one good step first, so the optimizer has state that a wrong step would change
    mp.backward(F.cross_entropy(model(data[:, :-1])[0].float(), data[:, 1:]))
    assert not mp.step(opt).skipped
    before_m = [m.numpy().copy() for m in mp.parameters()]
    before_w = [w.numpy().copy() for w in model.parameters()]
    before_opt = {k: {n: (v.copy() if hasattr(v, "copy") else v) for n, v in s.items()}
                  for k, s in opt.state_dict()["state"].items()}
    scale = scaler.get_scale()
    mp.backward(F.cross_entropy(model(data[:, :-1])[0].float(), data[:, 1:]))
    w = model.blocks[1].mlp.fc.weight
    w.grad.data[3, 1] = np.inf if what == "inf" else np.nan
    with np.errstate(all="ignore"):
        info = mp.step(opt, max_norm=1.0)
    assert info.skipped, "a step with an inf/nan gradient was taken"
    assert info.grad_norm == math.inf
    assert scaler.get_scale() == scale * 0.5, "the scale was not halved after an overflow"
    for a, b in zip(before_m, mp.parameters()):
        np.testing.assert_array_equal(b.numpy(), a, err_msg="a master weight changed")
    for a, b in zip(before_w, model.parameters()):
        np.testing.assert_array_equal(b.numpy(), a, err_msg="a working weight changed")
    after_opt = opt.state_dict()["state"]
    for k, s in before_opt.items():
        for n, v in s.items():
            np.testing.assert_array_equal(after_opt[k][n], v, err_msg=f"optimizer {n} changed")
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("what", ["inf", "nan"])
def test_overflow_skips_step_and_halves_scale(what):
    _overflow_step(GradScaler(init_scale=2.0 ** 10), what)


class _NeverSkips(GradScaler):
    """A planted bug: a scaler that never notices an overflow."""

    def unscale_(self, opt):
        super().unscale_(opt)
        self._found_inf = False
        return True


def test_overflow_check_catches_a_scaler_that_never_skips():
    with pytest.raises(AssertionError):
        _overflow_step(_NeverSkips(init_scale=2.0 ** 10))


def test_too_large_scale_backs_off_then_trains():
    """From 2^40 the float16 gradients overflow; each overflow skips the step and halves the
    scale until the gradients fit, and then training proceeds as from a sane scale."""
    losses, _, _, _, infos = _train(True, 40, scaler=GradScaler(init_scale=2.0 ** 40))
    skipped = [i.skipped for i in infos]
    n = skipped.index(False)
    assert n >= 10 and not any(skipped[n:]), skipped          # skips first, then none
    assert [i.scale for i in infos[:n + 1]] == [2.0 ** (40 - k) for k in range(n + 1)]
    assert np.all(losses[:n + 1] == losses[0])                # nothing moved while skipping
    assert losses[-1] < 0.5 * losses[0]


def test_scale_grows_after_growth_interval_clean_steps():
    s = GradScaler(init_scale=8.0, growth_interval=3)
    p = tl.tensor([1.0, 2.0], requires_grad=True)
    opt = nn.SGD([p], lr=0.0)

    def it(bad=False):
        p.grad = tl.tensor([np.inf if bad else 1.0, 1.0])
        s.step(opt)
        s.update()
        return s.get_scale()

    assert [it() for _ in range(7)] == [8, 8, 16, 16, 16, 32, 32]
    assert it(bad=True) == 16                                  # halved, tracker reset
    assert [it() for _ in range(3)] == [16, 16, 32]
    assert s.state_dict()["_growth_tracker"] == 0


def test_grad_scaler_on_float32_is_exactly_plain_training():
    """PyTorch's usage on a float32 model: a power-of-two scale commutes with rounding, so
    scale -> backward -> unscale gives bit-identical gradients and weights."""
    def run(use_scaler):
        tl.manual_seed(0)
        model = GPT(CFG)
        opt = nn.AdamW(model.parameters(), lr=3e-3)
        scaler = GradScaler(enabled=use_scaler)
        data = _data()
        for _ in range(3):
            _, loss = model(data[:, :-1], data[:, 1:])
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
            nn.clip_grad_norm_(model.parameters(), 1.0)
            scaler.step(opt)
            scaler.update()
            opt.zero_grad()
        return [p.numpy().copy() for p in model.parameters()]

    for a, b in zip(run(False), run(True)):
        np.testing.assert_array_equal(a, b)


def test_state_round_trip_resumes_exactly():
    """Save after 3 steps (growth tracker mid-way: interval 2), resume in fresh objects, run
    4 more: losses, scales and masters are bit-identical to the uninterrupted run. Without
    the scaler's state the scale sequence differs (the test checks that too)."""
    def setup():
        tl.manual_seed(0)
        model = GPT(CFG)
        mp = MixedPrecision(model, "float16", scaler=GradScaler(init_scale=2.0 ** 8,
                                                                growth_interval=2))
        return model, mp, nn.AdamW(mp.parameters(), lr=3e-3)

    data = _data()

    def steps(model, mp, opt, n):
        out = []
        for _ in range(n):
            loss = F.cross_entropy(model(data[:, :-1])[0].float(), data[:, 1:])
            mp.backward(loss)
            out.append((loss.item(), mp.step(opt, max_norm=1.0).scale))
        return out

    model, mp, opt = setup()
    steps(model, mp, opt, 3)
    saved_mp = mp.state_dict()
    saved_opt = opt.state_dict()
    saved_opt = {"state": {k: {n: (v.copy() if hasattr(v, "copy") else v) for n, v in s.items()}
                           for k, s in saved_opt["state"].items()},
                 "param_groups": saved_opt["param_groups"]}
    assert saved_mp["scaler"]["_growth_tracker"] == 1
    ref = steps(model, mp, opt, 4)
    ref_masters = [m.numpy().copy() for m in mp.parameters()]

    model2, mp2, opt2 = setup()
    mp2.load_state_dict(saved_mp)
    opt2.load_state_dict(saved_opt)
    got = steps(model2, mp2, opt2, 4)
    assert got == ref
    for a, b in zip(ref_masters, mp2.parameters()):
        np.testing.assert_array_equal(b.numpy(), a)

    model3, mp3, opt3 = setup()                     # the same without the scaler's state
    mp3.load_state_dict({"master": saved_mp["master"], "scaler": GradScaler().state_dict()})
    opt3.load_state_dict(saved_opt)
    assert [s for _, s in steps(model3, mp3, opt3, 4)] != [s for _, s in ref]


def test_bfloat16_is_refused_on_numpy():
    with pytest.raises(TypeError, match="bfloat16.*numpy has no bfloat16"):
        MixedPrecision(GPT(CFG), "bfloat16")
    with pytest.raises(TypeError, match="must be float16"):
        half_dtype("float32")
    assert half_dtype("half") == tl.float16


def test_misuse_is_a_clear_error():
    s = GradScaler()
    with pytest.raises(RuntimeError, match="no gradients were unscaled"):
        s.update()
    p = tl.tensor([1.0], requires_grad=True)
    p.grad = tl.tensor([1.0])
    opt = nn.SGD([p], lr=0.1)
    s.unscale_(opt)
    with pytest.raises(RuntimeError, match="already called"):
        s.unscale_(opt)
    with pytest.raises(ValueError, match="growth_factor must be > 1"):
        GradScaler(growth_factor=0.5)
    model = GPT(CFG)
    mp = MixedPrecision(model)
    with pytest.raises(ValueError, match="not the float32 masters"):
        mp.step(nn.AdamW(model.parameters()))
    assert isinstance(AmpStep(False, 1.0, None), AmpStep)
    off = GradScaler(enabled=False)
    loss = tl.tensor(2.0, requires_grad=True)
    assert off.scale(loss) is loss and off.get_scale() == 1.0 and off.state_dict() == {}


def test_float16_cross_entropy_mean_does_not_overflow():
    x = np.zeros((4096, 16))
    x[:, 0] = -20.0
    t = np.zeros(4096, dtype=np.int64)
    with np.errstate(all="ignore"):
        loss16 = F.cross_entropy(tl.tensor(x, dtype=tl.float16), t).item()
    loss32 = F.cross_entropy(tl.tensor(x, dtype=tl.float32), t).item()
    assert loss16 == pytest.approx(loss32, rel=1e-3)


@pytest.mark.gpu
def test_amp_on_gpu_tracks_float32_on_cpu():
    """The same recipe with CuPy float16 (tensor cores): tracks the CPU's float32 curve."""
    ref, *_ = _train(False, 30)
    amp, *_ = _train(True, 30, device="cuda")
    rel = np.abs(amp - ref) / ref
    assert rel.max() < 1e-2, rel.max()
