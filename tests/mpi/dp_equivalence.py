"""Under ``mpiexec -n N``: data parallel and ZeRO-1 take the same steps as one process.

Every rank trains the same small GPT three ways for STEPS AdamW steps (global batch BATCH,
ACCUM micro-steps, clipping that binds): alone on the whole batch (the reference, run
on every rank), data parallel on its slice, and ZeRO-1 on its slice; float64 and float32.
The parallel models start from a different initialisation on each rank (seed + rank), so
they only match if rank 0's weights were broadcast. Then ZeRO's gathered state_dict is
compared with the reference AdamW's, resharded both ways, and resumed through an
nn.checkpoint across degrees (N ranks -> one process, one process -> N ranks).

Rank 0 prints one JSON line of measurements; any failed check raises (and, through the
abort handler, ends every rank with the message).
"""
import contextlib
import json
import sys
import tempfile

import numpy as np

import parallel
import tensorlite as tl
from gpt.data.loader import BatchLoader
from gpt.model import GPT, GPTConfig
from gpt.train import param_groups
from nn import checkpoint as ckpt
from nn.optim import AdamW, clip_grad_norm_
from checks import close as _close


def close(a, b, dtype, what):
    return _close(a, b, dtype, what, where=f"rank {rank}")


STEPS, ACCUM, BATCH, CLIP, LR = 5, 2, 8, 0.25, 3e-3
CFG = GPTConfig(vocab_size=64, block_size=16, n_layer=2, n_head=2, d_model=32)
TOKENS = np.random.default_rng(0).integers(0, CFG.vocab_size, size=5000)
# float64: every element within 1e-10. float32: each tensor within 1e-5 in relative L2 norm
# (||a - b|| <= 1e-5 ||b||), with AdamW's eps at 1e-6. Adam's step on an element is
# lr * g / (|g| + eps): where |g| is near eps (a few elements of every tensor) the step
# swings with g's last bits, which any change of float32 summation order moves. Measured
# on this test's model, 5 steps, in ONE process, each micro-batch split in 2 (or 4) with
# the same total: eps 1e-8 -> 3.1e-5 (4.5e-5) of a tensor's norm; eps 1e-6 -> 1.2e-6
# (1.1e-6). Data parallelism on 2 ranks is that same re-split: 3.3e-5 and 1.3e-6. (The
# worst element is often the key bias of attention, whose exact gradient is zero: softmax
# ignores a shift shared by a row's scores, so in float32 it is rounding noise.)
EPS = {"float64": 1e-8, "float32": 1e-6}

state = parallel.init_parallel()
dp_group = state.dp
rank, size = dp_group.rank, dp_group.size


def new_model(dtype, seed):
    tl.manual_seed(seed)
    return GPT(CFG).to(tl.as_dtype(dtype))


def new_opt(model, kind, group):
    groups = param_groups(model, 0.1)
    eps = EPS[str(model.wte.weight.dtype)]
    if kind == "zero":
        return ZeroAdamW(groups, group, lr=LR, betas=(0.9, 0.95), eps=eps)
    return AdamW(groups, lr=LR, betas=(0.9, 0.95), eps=eps)


ZeroAdamW = parallel.ZeroAdamW


def train(model, opt, kind, loader, steps, dp=None):
    """``steps`` optimizer steps; kind: "single", "dp" or "zero".
    -> [(loss, grad norm, parameters after the step, clipped gradients (not for ZeRO))]"""
    group = dp_group if kind != "single" else None
    out = []
    for _ in range(steps):
        total = 0.0
        for i in range(ACCUM):
            x, y = loader.next_batch()
            quiet = dp.no_sync() if dp is not None and i < ACCUM - 1 else contextlib.nullcontext()
            with quiet:
                _, loss = model(tl.tensor(x), tl.tensor(y))
                (loss / ACCUM).backward()
            total += loss.item() / ACCUM
        if dp is not None:
            dp.finish()
        if kind == "zero":
            opt.reduce_gradients()
            norm = opt.clip_grad_norm_(CLIP)
        else:
            norm = clip_grad_norm_(model.parameters(), CLIP)
        if group is not None:
            total = parallel.all_reduce_mean(total, group)
        grads = [p.grad.data.copy() for p in model.parameters()] if kind != "zero" else None
        opt.step()
        opt.zero_grad()
        out.append((total, norm, [p.data.copy() for p in model.parameters()], grads))
    return out


def loader_for(kind):
    if kind == "single":
        return BatchLoader(TOKENS, BATCH, CFG.block_size, seed=3)
    return BatchLoader(TOKENS, BATCH, CFG.block_size, seed=3, rank=rank, world_size=size)


def same_on_every_rank(arrays, what):
    flat = np.concatenate([a.reshape(-1) for a in arrays]).view(np.uint8)   # the bits
    everyone = np.empty(flat.size * size, np.uint8)
    dp_group.all_gather(flat, everyone)
    rows = everyone.reshape(size, -1)
    if not all(np.array_equal(rows[0], r) for r in rows[1:]):
        raise AssertionError(f"{what}: not bit-identical across ranks")


def compare_states(got, want, dtype, what):
    assert got["param_groups"] == want["param_groups"], (what, got["param_groups"])
    assert sorted(got["state"]) == sorted(want["state"]), what
    worst = 0.0
    for i, st in want["state"].items():
        assert got["state"][i]["step"] == st["step"], (what, i)
        for name in ("exp_avg", "exp_avg_sq"):
            assert got["state"][i][name].shape == st[name].shape
            worst = max(worst, close(got["state"][i][name], st[name], dtype, f"{what} {i} {name}"))
    return worst


results = {"ranks": size}
for dtype in ("float64", "float32"):
    r = results[dtype] = {}
    # the reference: one process, the whole batch
    ref_model = new_model(dtype, 0)
    ref_opt = new_opt(ref_model, "single", None)
    ref = train(ref_model, ref_opt, "single", loader_for("single"), STEPS)

    # data parallel; small buckets so that there are several
    dp_model = new_model(dtype, rank)                  # differs per rank until broadcast
    dp = parallel.DataParallel(dp_model, dp_group, bucket_cap_mb=0.02)
    dp_run = train(dp_model, new_opt(dp_model, "dp", None), "dp", loader_for("dp"), STEPS, dp)
    r["buckets"] = len(dp.buckets)
    r["params"] = len(dp.params)
    r["last_stats"] = dp.last_stats

    # ZeRO-1
    z_model = new_model(dtype, rank)
    z_opt = new_opt(z_model, "zero", dp_group)
    z_run = train(z_model, z_opt, "zero", loader_for("zero"), STEPS)

    r["dp_vs_single"] = r["zero_vs_dp"] = r["zero_vs_single"] = r["loss_vs_single"] = 0.0
    for step, ((l0, n0, p0, g0), (l1, n1, p1, g1), (l2, n2, p2, _)) in enumerate(zip(ref, dp_run, z_run)):
        assert n0 > CLIP, f"clipping must bind to be tested: norm {n0} <= {CLIP}"
        r["grads_dp_vs_single"] = max([r.get("grads_dp_vs_single", 0.0)] + [
            close(b, a, dtype, f"step {step}: DP vs one process gradients") for a, b in zip(g0, g1)])
        for a, b, c in zip(p0, p1, p2):
            r["dp_vs_single"] = max(r["dp_vs_single"], close(b, a, dtype, f"step {step}: DP vs one process"))
            r["zero_vs_dp"] = max(r["zero_vs_dp"], close(c, b, dtype, f"step {step}: ZeRO vs DP"))
            r["zero_vs_single"] = max(r["zero_vs_single"], close(c, a, dtype, f"step {step}: ZeRO vs one process"))
        r["loss_vs_single"] = max(r["loss_vs_single"], close(l1, l0, dtype, f"step {step}: loss"),
                                  close(l2, l0, dtype, f"step {step}: ZeRO loss"), close(n1, n0, dtype, "norm"),
                                  close(n2, n0, dtype, "ZeRO norm"))
        same_on_every_rank(p1, f"{dtype} step {step}: DP parameters")
        same_on_every_rank(p2, f"{dtype} step {step}: ZeRO parameters")

    # ZeRO's gathered state is AdamW's state_dict
    want = ref_opt.state_dict()
    r["state_vs_adamw"] = compare_states(z_opt.state_dict(), want, dtype, "ZeRO state_dict vs AdamW")
    full_bytes = sum(v.nbytes for st in ref_opt.state.values() for k, v in st.items() if k != "step")
    r["state_bytes"] = [z_opt.state_nbytes(), full_bytes]
    per_rank = np.empty(size, np.float64)
    dp_group.all_gather(np.array([z_opt.state_nbytes()], np.float64), per_rank)
    assert per_rank.sum() >= full_bytes and per_rank.max() <= full_bytes / size + 64, per_rank
    # resharding: AdamW's state into ZeRO on N ranks and back out, exactly
    z2 = ZeroAdamW(param_groups(z_model, 0.1), dp_group, lr=0.5)
    z2.load_state_dict(want)
    back = z2.state_dict()
    assert back["param_groups"] == want["param_groups"]
    for i, st in want["state"].items():
        for name in ("exp_avg", "exp_avg_sq"):
            assert np.array_equal(back["state"][i][name], st[name]), (i, name)

    # resume across degrees through nn.checkpoint: ZeRO (N ranks) saves after 3 steps, ...
    with tempfile.TemporaryDirectory() as tmp:
        path = f"{tmp}/ckpt"                       # rank 0's folder is the one used
        name = np.frombuffer(path.encode().ljust(256), np.uint8).copy()
        dp_group.broadcast(name, 0)
        path = bytes(name).decode().strip()
        m3 = new_model(dtype, 0)
        o3 = new_opt(m3, "zero", dp_group)
        train(m3, o3, "zero", loader_for("zero"), 3)
        full = o3.unsharded()
        if rank == 0:
            ckpt.save_checkpoint(path, model=m3, optimizer=full)
        dp_group.barrier()
        # ... one process resumes with plain AdamW: equal to the reference at step 5
        m1 = new_model(dtype, 7)
        o1 = new_opt(m1, "single", None)
        ckpt.load_checkpoint(path, model=m1, optimizer=o1)
        loader = loader_for("single")
        loader.step = 3 * ACCUM
        resumed = train(m1, o1, "single", loader, 2)
        r["resume_zero_to_single"] = max(close(a, b, dtype, "ZeRO checkpoint resumed by one process")
                                         for a, b in zip(resumed[-1][2], ref[-1][2]))
        # ... and N ranks resume the one-process state with ZeRO: equal to the reference too
        m2 = new_model(dtype, 11 + rank)
        o2 = new_opt(m2, "zero", dp_group)
        ref3_model = new_model(dtype, 0)
        ref3_opt = new_opt(ref3_model, "single", None)
        train(ref3_model, ref3_opt, "single", loader_for("single"), 3)
        m2.load_state_dict(ref3_model.state_dict())
        o2.load_state_dict(ref3_opt.state_dict())
        loader = loader_for("zero")
        loader.step = 3 * ACCUM
        resumed = train(m2, o2, "zero", loader, 2)
        r["resume_single_to_zero"] = max(close(a, b, dtype, "one-process state resumed by ZeRO")
                                         for a, b in zip(resumed[-1][2], ref[-1][2]))
        dp_group.barrier()                          # rank 0 removes tmp only after all read it

if rank == 0:
    print("RESULT " + json.dumps(results), flush=True)
sys.exit(0)
