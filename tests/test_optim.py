"""Optimizers, clipping and schedules against their update equations written out in NumPy."""
import json
import math

import numpy as np
import pytest

import tensorlite as tl
from nn.module import Parameter
from nn.optim import SGD, Adam, AdamW, Optimizer, clip_grad_norm_
from nn.schedule import LambdaLR, WarmupCosine, constant_lr, warmup_cosine


# ----------------------------------------------------------------------------- helpers
def make_params(rng, shapes=((3, 4), (5,)), dtype=np.float64):
    return [Parameter(tl.tensor(rng.standard_normal(s).astype(dtype))) for s in shapes]


def grad_seq(rng, shapes, n, dtype=np.float64):
    return [[rng.standard_normal(s).astype(dtype) for s in shapes] for _ in range(n)]


def set_grads(params, grads):
    for p, g in zip(params, grads):
        p.grad = None if g is None else tl.tensor(g.copy())


def run(opt, params, seq):
    for gs in seq:
        set_grads(params, gs)
        opt.step()


def sgd_ref(p, grads, lr, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False):
    p, buf = p.copy(), None
    for g in grads:
        d = g + weight_decay * p
        if momentum:
            buf = d.copy() if buf is None else momentum * buf + (1 - dampening) * d
            d = d + momentum * buf if nesterov else buf
        p = p - lr * d
    return p


def adam_ref(p, grads, lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, decoupled=False):
    """Algorithm 1 of Kingma & Ba, plus L2 (Adam) or decoupled (AdamW) weight decay."""
    b1, b2 = betas
    p, m, v = p.copy(), np.zeros_like(p), np.zeros_like(p)
    for t, g in enumerate(grads, start=1):
        if decoupled:
            p = p - lr * weight_decay * p
        else:
            g = g + weight_decay * p
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        m_hat, v_hat = m / (1 - b1 ** t), v / (1 - b2 ** t)
        p = p - lr * m_hat / (np.sqrt(v_hat) + eps)
    return p


SHAPES = ((3, 4), (5,))


# ----------------------------------------------------------------------------- SGD
@pytest.mark.parametrize("kw", [
    dict(),
    dict(momentum=0.9),
    dict(momentum=0.9, dampening=0.3),
    dict(momentum=0.8, nesterov=True),
    dict(weight_decay=0.1),
    dict(momentum=0.9, weight_decay=0.05, nesterov=True),
    dict(momentum=0.5, dampening=0.5, weight_decay=0.2),
])
def test_sgd_matches_equations(rng, kw):
    params = make_params(rng, SHAPES)
    init = [p.data.copy() for p in params]
    seq = grad_seq(rng, SHAPES, 4)
    run(SGD(params, lr=0.1, **kw), params, seq)
    for i, p in enumerate(params):
        want = sgd_ref(init[i], [gs[i] for gs in seq], 0.1, **kw)
        np.testing.assert_allclose(p.data, want, rtol=1e-13, atol=1e-14)


def test_sgd_does_not_modify_grad(rng):
    params = make_params(rng, SHAPES)
    seq = grad_seq(rng, SHAPES, 1)
    opt = SGD(params, lr=0.1, momentum=0.9, weight_decay=0.1, nesterov=True)
    set_grads(params, seq[0])
    opt.step()
    for p, g in zip(params, seq[0]):
        np.testing.assert_array_equal(p.grad.data, g)


# ----------------------------------------------------------------------------- Adam / AdamW
@pytest.mark.parametrize("cls,kw", [
    (Adam, dict()),
    (Adam, dict(weight_decay=0.1, eps=1e-3)),
    (Adam, dict(betas=(0.5, 0.9), eps=1e-2)),
    (AdamW, dict()),
    (AdamW, dict(weight_decay=0.3, eps=1e-3)),
    (AdamW, dict(betas=(0.8, 0.95), weight_decay=0.0)),
])
def test_adam_matches_equations(rng, cls, kw):
    params = make_params(rng, SHAPES)
    init = [p.data.copy() for p in params]
    seq = grad_seq(rng, SHAPES, 5)
    opt = cls(params, lr=0.05, **kw)
    run(opt, params, seq)
    full = dict(betas=opt.defaults["betas"], eps=opt.defaults["eps"],
                weight_decay=opt.defaults["weight_decay"])
    for i, p in enumerate(params):
        want = adam_ref(init[i], [gs[i] for gs in seq], 0.05, decoupled=cls is AdamW, **full)
        np.testing.assert_allclose(p.data, want, rtol=1e-12, atol=1e-13)
        assert opt.state[p]["step"] == 5


def test_adam_l2_differs_from_adamw_decoupled(rng):
    """Same hyperparameters, two different decays: each optimizer matches its own equations
    and not the other's."""
    seq = grad_seq(rng, SHAPES, 5)
    results = {}
    for cls in (Adam, AdamW):
        params = make_params(np.random.default_rng(7), SHAPES)
        init = [p.data.copy() for p in params]
        run(cls(params, lr=0.1, weight_decay=0.5), params, seq)
        results[cls] = params[0].data
    g0 = [gs[0] for gs in seq]
    l2 = adam_ref(init[0], g0, 0.1, weight_decay=0.5, decoupled=False)
    dec = adam_ref(init[0], g0, 0.1, weight_decay=0.5, decoupled=True)
    assert np.abs(l2 - dec).max() > 1e-3
    np.testing.assert_allclose(results[Adam], l2, rtol=1e-12)
    np.testing.assert_allclose(results[AdamW], dec, rtol=1e-12)
    # without decay the two are the same optimizer
    a, b = make_params(np.random.default_rng(1), SHAPES), make_params(np.random.default_rng(1), SHAPES)
    run(Adam(a, lr=0.1), a, seq)
    run(AdamW(b, lr=0.1, weight_decay=0.0), b, seq)
    np.testing.assert_array_equal(a[0].data, b[0].data)


def test_adam_l2_does_not_modify_grad(rng):
    params = make_params(rng, SHAPES)
    seq = grad_seq(rng, SHAPES, 1)
    opt = Adam(params, lr=0.1, weight_decay=0.1)
    set_grads(params, seq[0])
    opt.step()
    np.testing.assert_array_equal(params[0].grad.data, seq[0][0])


def test_float32_stays_float32(rng):
    params = make_params(rng, SHAPES, dtype=np.float32)
    init = [p.data.astype(np.float64) for p in params]
    seq = grad_seq(rng, SHAPES, 4, dtype=np.float32)
    for cls, kw in ((AdamW, dict(weight_decay=0.1)), (Adam, dict(weight_decay=0.1)),
                    (SGD, dict(momentum=0.9, weight_decay=0.1))):
        ps = [Parameter(tl.tensor(a.astype(np.float32))) for a in init]
        opt = cls(ps, lr=0.01, **kw)
        run(opt, ps, seq)
        for p in ps:
            assert p.dtype == np.float32
            for name, s in opt.state[p].items():
                if hasattr(s, "dtype"):
                    assert s.dtype == np.float32, (cls.__name__, name, s.dtype)
    # and the float32 result is the float64 equations to float32 accuracy
    ps = [Parameter(tl.tensor(a.astype(np.float32))) for a in init]
    run(AdamW(ps, lr=0.01, weight_decay=0.1), ps, seq)
    want = adam_ref(init[0], [gs[0].astype(np.float64) for gs in seq], 0.01,
                    weight_decay=0.1, decoupled=True)
    np.testing.assert_allclose(ps[0].data, want, rtol=2e-5, atol=1e-6)


# ----------------------------------------------------------------------------- groups, skipping
def test_param_groups_with_own_lr_and_no_decay(rng):
    params = make_params(rng, SHAPES)
    init = [p.data.copy() for p in params]
    seq = grad_seq(rng, SHAPES, 3)
    opt = AdamW([{"params": [params[0]], "weight_decay": 0.2},
                 {"params": [params[1]], "lr": 0.01, "weight_decay": 0.0}], lr=0.1)
    assert opt.param_groups[0]["lr"] == 0.1 and opt.param_groups[1]["lr"] == 0.01
    run(opt, params, seq)
    w0 = adam_ref(init[0], [gs[0] for gs in seq], 0.1, weight_decay=0.2, decoupled=True)
    w1 = adam_ref(init[1], [gs[1] for gs in seq], 0.01, weight_decay=0.0, decoupled=True)
    np.testing.assert_allclose(params[0].data, w0, rtol=1e-12)
    np.testing.assert_allclose(params[1].data, w1, rtol=1e-12)


def test_add_param_group(rng):
    params = make_params(rng, SHAPES)
    opt = SGD([params[0]], lr=0.1, momentum=0.9)
    opt.add_param_group({"params": params[1], "lr": 0.5})
    assert opt.param_groups[1]["momentum"] == 0.9 and opt.param_groups[1]["lr"] == 0.5
    with pytest.raises(ValueError, match="already given in group 0"):
        opt.add_param_group({"params": [params[0]]})


def test_params_without_grad_are_skipped(rng):
    params = make_params(rng, SHAPES)
    init = [p.data.copy() for p in params]
    seq = grad_seq(rng, SHAPES, 3)
    opt = Adam(params, lr=0.1)
    for k, gs in enumerate(seq):                  # params[1] has a grad only at the last step
        set_grads(params, [gs[0], gs[1] if k == 2 else None])
        opt.step()
        if k < 2:
            np.testing.assert_array_equal(params[1].data, init[1])
            assert params[1] not in opt.state
    assert opt.state[params[0]]["step"] == 3 and opt.state[params[1]]["step"] == 1
    np.testing.assert_allclose(params[1].data, adam_ref(init[1], [seq[2][1]], 0.1), rtol=1e-12)


def test_zero_grad(rng):
    params = make_params(rng, SHAPES)
    opt = SGD(params, lr=0.1)
    set_grads(params, grad_seq(rng, SHAPES, 1)[0])
    g = params[0].grad
    opt.zero_grad(set_to_none=False)
    assert params[0].grad is g and not g.data.any()
    opt.zero_grad()
    assert params[0].grad is None and params[1].grad is None


def test_step_with_real_backward_and_closure():
    w = Parameter(tl.tensor([1.0, -2.0]))
    opt = SGD([w], lr=0.25)

    def closure():
        opt.zero_grad()
        loss = (w * w).sum()
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert float(loss) == 5.0
    np.testing.assert_array_equal(w.data, np.float32([0.5, -1.0]))   # w - 0.25 * 2w


# ----------------------------------------------------------------------------- state_dict
@pytest.mark.parametrize("cls,kw", [(SGD, dict(lr=0.1, momentum=0.9, nesterov=True)),
                                    (Adam, dict(lr=0.01, weight_decay=0.1)),
                                    (AdamW, dict(lr=0.01, weight_decay=0.1))])
def test_state_dict_round_trip_continues_bit_for_bit(rng, cls, kw):
    shapes = SHAPES + ((2, 2),)
    seq = grad_seq(rng, shapes, 6, dtype=np.float32)
    a = make_params(np.random.default_rng(3), shapes, dtype=np.float32)
    opt_a = cls([{"params": a[:2]}, {"params": a[2:], "lr": 0.003, "weight_decay": 0.0}], **kw)
    run(opt_a, a, seq[:3])

    sd = opt_a.state_dict()
    assert set(sd["state"]) == {0, 1, 2}
    assert [g["params"] for g in sd["param_groups"]] == [[0, 1], [2]]
    # the hyperparameters survive JSON (as in a checkpoint), the arrays a copy
    sd = {"state": {str(i): {k: (v.copy() if hasattr(v, "shape") else v) for k, v in s.items()}
                    for i, s in sd["state"].items()},
          "param_groups": json.loads(json.dumps(sd["param_groups"]))}

    b = [Parameter(tl.tensor(p.data.copy())) for p in a]
    opt_b = cls([{"params": b[:2]}, {"params": b[2:]}], **kw)
    opt_b.load_state_dict(sd)
    assert opt_b.param_groups[1]["lr"] == 0.003
    for k, v in opt_b.state[b[0]].items():
        if hasattr(v, "shape"):
            assert not np.shares_memory(v, opt_a.state[a[0]][k])
    run(opt_a, a, seq[3:])
    run(opt_b, b, seq[3:])
    for pa, pb in zip(a, b):
        np.testing.assert_array_equal(pa.data, pb.data)
    # and the continuation is not trivially equal: a fresh optimizer would differ
    c = [Parameter(tl.tensor(p.data.copy())) for p in b]
    fresh = cls(c, **kw)
    run(fresh, c, seq[3:4])
    assert not np.array_equal(c[0].data, b[0].data)


def test_load_state_dict_mismatch_errors(rng):
    params = make_params(rng, SHAPES)
    opt = Adam(params)
    run(opt, params, grad_seq(rng, SHAPES, 1))
    sd = opt.state_dict()
    other = Adam([{"params": [params[0]]}, {"params": [params[1]]}])
    with pytest.raises(ValueError, match="2 parameter groups.*has 1|1 parameter groups but this optimizer has 2"):
        other.load_state_dict(sd)
    wrong = make_params(rng, ((4, 3), (5,)))
    with pytest.raises(ValueError, match=r"shape \(3, 4\).*shape \(4, 3\)"):
        Adam(wrong).load_state_dict(sd)
    with pytest.raises(ValueError, match="group 0 has 2 params in the state but 1 here"):
        Adam([params[0]]).load_state_dict(sd)


# ----------------------------------------------------------------------------- errors
def test_hyperparameter_errors(rng):
    ps = make_params(rng, SHAPES)
    with pytest.raises(ValueError, match="lr -0.1"):
        SGD(ps, lr=-0.1)
    with pytest.raises(ValueError, match="does not set 'lr'"):
        SGD(ps)
    with pytest.raises(ValueError, match=r"betas\[0\] 1.0.*< 1.0"):
        Adam(ps, betas=(1.0, 0.999))
    with pytest.raises(ValueError, match=r"betas\[1\] -0.5"):
        AdamW(ps, betas=(0.9, -0.5))
    with pytest.raises(ValueError, match="betas must be a pair"):
        AdamW(ps, betas=(0.9,))
    with pytest.raises(ValueError, match="eps -1"):
        Adam(ps, eps=-1e-8)
    with pytest.raises(ValueError, match="weight_decay nan"):
        AdamW(ps, weight_decay=float("nan"))
    with pytest.raises(ValueError, match="nesterov=True needs momentum > 0"):
        SGD(ps, lr=0.1, nesterov=True)
    with pytest.raises(ValueError, match="lr -1"):
        Adam([{"params": ps[:1], "lr": -1}, {"params": ps[1:]}])
    with pytest.raises(TypeError, match="lr must be a number"):
        Adam(ps, lr="0.1")


def test_param_list_errors(rng):
    ps = make_params(rng, SHAPES)
    with pytest.raises(ValueError, match="empty parameter list"):
        AdamW([])
    with pytest.raises(ValueError, match="empty parameter list"):
        AdamW(p for p in [])
    with pytest.raises(ValueError, match=r"param 2 of shape \(3, 4\) was already given earlier"):
        AdamW([ps[0], ps[1], ps[0]])
    with pytest.raises(ValueError, match="already given in group 0"):
        AdamW([{"params": [ps[0]]}, {"params": [ps[1], ps[0]]}])
    with pytest.raises(TypeError, match="single Tensor"):
        AdamW(ps[0])
    with pytest.raises(TypeError, match="not a Tensor"):
        AdamW([ps[0], np.zeros(3)])
    with pytest.raises(ValueError, match="not a leaf"):
        AdamW([ps[0] * 2])
    assert isinstance(AdamW(iter(ps)), Optimizer)


# ----------------------------------------------------------------------------- clipping
def test_clip_grad_norm_scales_to_max_norm(rng):
    params = make_params(rng, SHAPES + ((2,),))
    seq = grad_seq(rng, SHAPES + ((2,),), 1)[0]
    set_grads(params, [seq[0], seq[1], None])
    total_want = math.sqrt(sum((g ** 2).sum() for g in seq[:2]))
    total = clip_grad_norm_(params, max_norm=0.5)
    assert isinstance(total, float)
    assert total == pytest.approx(total_want, rel=1e-12)
    coef = 0.5 / (total_want + 1e-6)
    for p, g in zip(params[:2], seq[:2]):
        np.testing.assert_allclose(p.grad.data, g * coef, rtol=1e-12)
    assert params[2].grad is None
    new_norm = math.sqrt(sum((p.grad.data ** 2).sum() for p in params[:2]))
    assert new_norm == pytest.approx(0.5, rel=1e-5)


def test_clip_grad_norm_below_max_is_untouched(rng):
    params = make_params(rng, SHAPES, dtype=np.float32)
    seq = grad_seq(rng, SHAPES, 1, dtype=np.float32)[0]
    set_grads(params, seq)
    total = clip_grad_norm_(params, max_norm=1e6)
    assert total == pytest.approx(math.sqrt(sum((g.astype(np.float64) ** 2).sum() for g in seq)),
                                  rel=1e-6)
    for p, g in zip(params, seq):
        np.testing.assert_array_equal(p.grad.data, g)
        assert p.grad.dtype == np.float32


@pytest.mark.parametrize("norm_type", [1.0, 3.0, math.inf])
def test_clip_grad_norm_other_orders(rng, norm_type):
    params = make_params(rng, SHAPES)
    seq = grad_seq(rng, SHAPES, 1)[0]
    set_grads(params, seq)
    flat = np.concatenate([g.ravel() for g in seq])
    want = np.abs(flat).max() if norm_type == math.inf else (np.abs(flat) ** norm_type).sum() ** (1 / norm_type)
    assert clip_grad_norm_(params, 0.1, norm_type=norm_type) == pytest.approx(want, rel=1e-12)
    np.testing.assert_allclose(params[0].grad.data, seq[0] * 0.1 / (want + 1e-6), rtol=1e-12)


def test_clip_grad_norm_nonfinite(rng):
    params = make_params(rng, SHAPES)
    seq = grad_seq(rng, SHAPES, 1)[0]
    seq[1][2] = np.inf
    set_grads(params, seq)
    with pytest.raises(RuntimeError, match=r"non-finite gradients at positions \[1\]"):
        clip_grad_norm_(params, 1.0, error_if_nonfinite=True)
    with np.errstate(invalid="ignore"):       # inf * 0: scaled by the inf norm, as PyTorch
        assert math.isinf(clip_grad_norm_(params, 1.0))
    assert clip_grad_norm_([Parameter(tl.zeros(3))], 1.0) == 0.0
    with pytest.raises(ValueError, match="max_norm -1"):
        clip_grad_norm_(params, -1.0)
    with pytest.raises(ValueError, match="norm_type"):
        clip_grad_norm_(params, 1.0, norm_type=0)


# ----------------------------------------------------------------------------- schedules
def test_warmup_cosine_key_steps():
    kw = dict(max_lr=1.0, warmup_steps=10, max_steps=110, min_lr=0.1)
    assert warmup_cosine(0, **kw) == pytest.approx(1.0 / 11)          # ~0 but not 0
    assert warmup_cosine(9, **kw) == pytest.approx(10.0 / 11)
    assert warmup_cosine(10, **kw) == 1.0                              # end of warmup: max_lr
    assert warmup_cosine(60, **kw) == pytest.approx(0.55)              # middle: (max + min) / 2
    assert warmup_cosine(35, **kw) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 4)))
    assert warmup_cosine(109, **kw) == pytest.approx(0.1, abs=1e-3)
    assert warmup_cosine(110, **kw) == 0.1                             # max_steps: min_lr
    assert warmup_cosine(10_000, **kw) == 0.1                          # beyond
    lrs = [warmup_cosine(s, **kw) for s in range(120)]
    assert all(a < b for a, b in zip(lrs[:10], lrs[1:11]))
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert warmup_cosine(0, 3e-4, 0, 100) == 3e-4                      # no warmup
    assert warmup_cosine(5, 3e-4, 5, 5, 1e-5) == 1e-5                  # warmup == max_steps
    assert constant_lr(123, 0.01) == 0.01


def test_schedule_errors():
    with pytest.raises(ValueError, match="warmup_steps=200 is greater than max_steps=100"):
        warmup_cosine(0, 1.0, 200, 100)
    with pytest.raises(ValueError, match="max_lr must be a finite number >= 0, got -1"):
        warmup_cosine(0, -1.0, 10, 100)
    with pytest.raises(ValueError, match="min_lr=0.5 is greater than max_lr=0.1"):
        warmup_cosine(0, 0.1, 10, 100, 0.5)
    with pytest.raises(ValueError, match="step must be an int >= 0, got -1"):
        warmup_cosine(-1, 0.1, 10, 100)
    with pytest.raises(ValueError, match="lr must be a finite number >= 0, got -0.5"):
        constant_lr(0, -0.5)
    opt = SGD([Parameter(tl.zeros(2))], lr=0.1)
    with pytest.raises(ValueError, match="warmup_steps=5 is greater than max_steps=2"):
        WarmupCosine(opt, 5, 2)
    assert opt.param_groups[0]["lr"] == 0.1     # untouched by the failed constructor


def test_warmup_cosine_scheduler_drives_optimizer_and_resumes():
    p, q = Parameter(tl.zeros(2, dtype=tl.float64)), Parameter(tl.zeros(2, dtype=tl.float64))
    opt = SGD([{"params": [p]}, {"params": [q], "lr": 0.01}], lr=1.0)
    sched = WarmupCosine(opt, warmup_steps=3, max_steps=20, min_lr=[0.1, 0.001])
    seen = []
    for step in range(25):
        seen.append([g["lr"] for g in opt.param_groups])
        assert sched.get_last_lr() == seen[-1]
        p.grad = tl.ones(2, dtype=tl.float64)
        before = p.data.copy()
        opt.step()
        np.testing.assert_allclose(before - p.data, seen[-1][0], rtol=1e-12)  # used this lr
        if step == 9:
            saved = json.loads(json.dumps(sched.state_dict()))
        sched.step()
    for step, (a, b) in enumerate(seen):
        assert a == warmup_cosine(step, 1.0, 3, 20, 0.1)
        assert b == warmup_cosine(step, 0.01, 3, 20, 0.001)
    # a fresh scheduler loaded from the state at step 9 continues with step 10's lr
    opt2 = SGD([{"params": [p]}, {"params": [q], "lr": 0.01}], lr=1.0)
    s2 = WarmupCosine(opt2, 3, 20, [0.1, 0.001])
    s2.load_state_dict(saved)
    s2.step()
    assert s2.get_last_lr() == seen[10]
    assert [g["lr"] for g in opt2.param_groups] == seen[10]
    with pytest.raises(ValueError, match="unknown keys"):
        s2.load_state_dict({"last_step": 1, "gamma": 0.5})


def test_lambda_lr():
    opt = AdamW([Parameter(tl.zeros(2))], lr=0.5)
    s = LambdaLR(opt, lambda step: 0.5 ** step)
    s.step()
    s.step()
    assert s.get_last_lr() == [0.125] and opt.param_groups[0]["lr"] == 0.125
    assert s.state_dict() == {"base_lrs": [0.5], "last_step": 2}


# ----------------------------------------------------------------------------- CPU fast path
@pytest.mark.parametrize("cls", [Adam, AdamW])
def test_blocked_adam_is_bit_identical_to_whole_array_update(rng, monkeypatch, cls):
    """The cache-blocked CPU path (blocks of 7 here, so every parameter has a ragged tail and
    a transposed one takes the whole-array path) equals the plain whole-array update."""
    import nn.optim as optim_mod
    shapes = ((37, 3), (5,), (8, 9))
    seq = grad_seq(rng, shapes, 4, dtype=np.float32)
    init = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    init[2] = init[2].T.copy().T             # a non-contiguous (Fortran-ordered) parameter
    results = []
    for block in (7, 1 << 30):
        monkeypatch.setattr(optim_mod, "_CPU_BLOCK", block)
        ps = [Parameter(tl.tensor(a.copy(order="K"))) for a in init]
        assert not ps[2].data.flags.c_contiguous
        run(cls(ps, lr=0.01, weight_decay=0.1), ps, seq)
        results.append([p.data for p in ps])
    for a, b in zip(*results):
        np.testing.assert_array_equal(a, b)
    want = adam_ref(init[0].astype(np.float64), [gs[0].astype(np.float64) for gs in seq], 0.01,
                    weight_decay=0.1, decoupled=cls is AdamW)
    np.testing.assert_allclose(results[0][0], want, rtol=2e-5, atol=1e-6)
