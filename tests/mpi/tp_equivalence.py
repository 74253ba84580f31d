"""Under ``mpiexec -n N`` (every rank one tensor-parallel group of N): a tensor-parallel GPT
computes what the dense GPT with the same weights computes.

For three configurations (tied head and learned positions; tied head, rotary positions and
a vocabulary of 11 that no degree > 1 here divides (padded); untied head, post-LN and
sinusoidal positions, vocabulary 11), in float64 and float32, every rank builds the dense
reference and a TP model from a different initialisation per rank (so the cut is only right
if tensor_parallel_ broadcast TP rank 0's weights), then loads the reference's weights into
it (load_dense_state_dict) and checks:

- the logits (gathered from every rank's vocabulary columns) and the loss (also with some
  targets ignored), and every gradient gathered to its dense shape;
- 5 AdamW steps with clipping that binds: loss, gradient norm and every parameter after
  every step; the replicated parameters bit-identical on every rank;
- the padded vocabulary's rows: zero gradient, still zero after the steps;
- the optimizer state gathered to dense shapes is the dense AdamW's; a checkpoint's worth of
  state (model + optimizer) gathered after 3 steps and resumed by the dense model for 2
  more lands on the reference's step 5, and the other way round;
- greedy generation, with and without the KV cache (each rank caches its own heads), gives
  the dense model's tokens;
- all-reduces per forward and backward of the whole model: 2 per block + 3 forward
  (embedding, the loss's max and its sums), 2 per block + 1 backward (the head's f).

float64: every element within 1e-10. float32: each tensor within 1e-5 in relative L2 norm,
with AdamW's eps at 1e-5. Adam's step on an element is lr * g / (|g| + eps), so where |g| is
near eps the step follows g's last bits, which any change of float32 summation order moves
(tests/mpi/dp_equivalence.py measures it for data parallelism); f's all-reduces change the
order. The sensitive tensor here is the value bias of the last block, whose gradient is
W_proj^T times a sum over every token of the residual gradient (mostly cancelling): measured
worst tensor after 5 steps, eps 1e-6: 1.35e-5 (2 ranks); eps 1e-5: 2.9e-6 (2 ranks), 2.3e-6
(4). Gradients before Adam: 5e-7.

Then, with dropout: TP ranks seeded with tensor_parallel.manual_seed keep their replicated
parameters bit-identical through a step (the same masks outside the regions), while the
attention-dropout masks inside them differ by rank.
Rank 0 prints one JSON line; a failed check raises (and ends every rank).
"""
import json
import sys

import numpy as np

import parallel
import tensorlite as tl
from gpt.model import GPT, GPTConfig
from gpt.train import param_groups
from nn.optim import AdamW, clip_grad_norm_
from parallel import tensor_parallel as tp
from checks import Counting, close as _close


def close(a, b, dtype, what):
    return _close(a, b, dtype, what, where=f"rank {rank}")


state = parallel.init_parallel(tp=parallel.world_group().size)
group = state.tp
rank, size = group.rank, group.size

STEPS, CLIP, LR, BATCH = 5, 0.25, 3e-3, 4
EPS = {"float64": 1e-8, "float32": 1e-5}
BASE = dict(block_size=16, n_layer=2, n_head=4, d_model=32)
CONFIGS = {
    "tied": GPTConfig(vocab_size=64, **BASE),
    "tied-rope-vocab11": GPTConfig(vocab_size=11, positional="rope", **BASE),
    "untied-postln-vocab11": GPTConfig(vocab_size=11, tie_weights=False, norm_first=False,
                                       positional="sinusoidal", **BASE),
}


def new_model(cfg, dtype, seed):
    tl.manual_seed(seed)
    return GPT(cfg).to(tl.as_dtype(dtype))


def new_opt(model, dtype):
    return AdamW(param_groups(model, 0.1), lr=LR, betas=(0.9, 0.95), eps=EPS[dtype])


def same_on_every_rank(arrays, what):
    flat = np.concatenate([np.ascontiguousarray(a).reshape(-1) for a in arrays]).view(np.uint8)
    everyone = np.empty(flat.size * size, np.uint8)
    group.all_gather(flat, everyone)
    rows = everyone.reshape(size, -1)
    if not all(np.array_equal(rows[0], r) for r in rows[1:]):
        raise AssertionError(f"{what}: not bit-identical across TP ranks")


def batch(cfg, step):
    rng = np.random.default_rng(100 + step)
    x = rng.integers(0, cfg.vocab_size, (BATCH, cfg.block_size))
    y = rng.integers(0, cfg.vocab_size, (BATCH, cfg.block_size))
    return tl.tensor(x), tl.tensor(y)


def train(model, opt, cfg, steps, first=0, is_tp=False):
    """-> [(loss, norm, {name: dense parameter array})] after each step."""
    out = []
    for s in range(first, first + steps):
        x, y = batch(cfg, s)
        _, loss = model(x, y)
        loss.backward()
        norm = tp.clip_grad_norm_(model, CLIP, group) if is_tp else \
            clip_grad_norm_(model.parameters(), CLIP)
        opt.step()
        opt.zero_grad()
        params = tp.gather_state_dict(model, group) if is_tp else model.state_dict()
        out.append((loss.item(), norm, {k: np.array(v.data) for k, v in params.items()}))
    return out


results = {"ranks": size}
for cname, cfg in CONFIGS.items():
    for dtype in ("float64", "float32"):
        r = results[f"{cname} {dtype}"] = {}
        ref = new_model(cfg, dtype, 0)
        counting = Counting(group)
        model = tp.tensor_parallel_(new_model(cfg, dtype, 1 + rank), counting)
        # the cut came from TP rank 0's model (seed 1), whatever each rank built
        rank0 = new_model(cfg, dtype, 1).state_dict()
        for k, v in tp.gather_state_dict(model, group).items():
            if not np.array_equal(v.data, rank0[k].data):
                raise AssertionError(f"{cname} {dtype}: {k} is not TP rank 0's weight")
        tp.load_dense_state_dict(model, ref.state_dict(), group)
        vl = model.wte.weight.shape[0]
        assert vl == -(-cfg.vocab_size // size), (vl, cfg.vocab_size)

        # -- forward: logits, loss; gradients ----------------------------------------------
        x, y = batch(cfg, 99)
        want_logits, _ = ref(x)
        got_logits, _ = model(x)
        r["logits"] = close(got_logits.data, want_logits.data, dtype, "logits")
        _, want = ref(x, y)
        counting.count = 0
        _, got = model(x, y)
        fwd = counting.count
        r["loss"] = close(got.item(), want.item(), dtype, "loss")
        want.backward()
        got.backward()
        r["all_reduces"] = [fwd, counting.count - fwd]
        assert r["all_reduces"] == [2 * cfg.n_layer + 3, 2 * cfg.n_layer + 1], r["all_reduces"]
        grads = tp.gather_grads(model, group)
        r["grads"] = max(close(grads[k], p.grad.data, dtype, f"gradient of {k}")
                         for k, p in ref.named_parameters())
        if rank == size - 1 and vl * size > cfg.vocab_size:      # the padded rows
            pad = cfg.vocab_size - rank * vl
            heads = [model.wte.weight] + ([model.lm_head.weight] if model.lm_head else [])
            assert all(np.all(h.grad.data[pad:] == 0) for h in heads), "padding got a gradient"
        ref.zero_grad()
        model.zero_grad()
        y_ign = y.data.copy()
        y_ign[:, ::3] = -100                                     # ignored targets
        _, want = ref(x, tl.tensor(y_ign))
        _, got = model(x, tl.tensor(y_ign))
        r["loss_ignore_index"] = close(got.item(), want.item(), dtype, "loss with ignored targets")
        ref.zero_grad()
        model.zero_grad()

        # -- 5 AdamW steps, clipped ----------------------------------------------------------
        ref_opt, opt = new_opt(ref, dtype), new_opt(model, dtype)
        ref_run = train(ref, ref_opt, cfg, STEPS)
        tp_run = train(model, opt, cfg, STEPS, is_tp=True)
        r["steps"] = r["steps_loss"] = 0.0
        for s, ((l0, n0, p0), (l1, n1, p1)) in enumerate(zip(ref_run, tp_run)):
            assert n0 > CLIP, f"clipping must bind to be tested: norm {n0} <= {CLIP}"
            r["steps_loss"] = max(r["steps_loss"], close(l1, l0, dtype, f"step {s} loss"),
                                  close(n1, n0, dtype, f"step {s} gradient norm"))
            r["steps"] = max([r["steps"]] + [close(p1[k], p0[k], dtype, f"step {s}: {k}")
                                              for k in p0])
        shards = tp.sharded_parameters(model)
        same_on_every_rank([p.data for k, p in model.named_parameters() if k not in shards],
                           f"{cname} {dtype}: replicated parameters")
        if rank == size - 1 and vl * size > cfg.vocab_size:
            assert np.all(model.wte.weight.data[cfg.vocab_size - rank * vl:] == 0)

        # -- optimizer state, and resuming across degrees --------------------------------------
        full = tp.gather_optimizer_state_dict(opt, model, group)
        want_state = ref_opt.state_dict()
        assert full["param_groups"] == want_state["param_groups"]
        r["optimizer_state"] = max(close(full["state"][i][k], st[k], dtype, f"AdamW {i} {k}")
                                   for i, st in want_state["state"].items()
                                   for k in ("exp_avg", "exp_avg_sq"))
        # TP trains 3 steps, its gathered state goes to the dense model for 2: == reference
        m3 = tp.tensor_parallel_(new_model(cfg, dtype, 7), group)
        tp.load_dense_state_dict(m3, new_model(cfg, dtype, 0).state_dict(), group)
        o3 = new_opt(m3, dtype)
        train(m3, o3, cfg, 3, is_tp=True)
        dense = new_model(cfg, dtype, 8)
        dense.load_state_dict(tp.gather_state_dict(m3, group))
        o_dense = new_opt(dense, dtype)
        o_dense.load_state_dict(tp.gather_optimizer_state_dict(o3, m3, group))
        end = train(dense, o_dense, cfg, 2, first=3)[-1][2]
        r["resume_tp_to_dense"] = max(close(end[k], ref_run[-1][2][k], dtype, f"resumed {k}")
                                      for k in end)
        # ... and the dense model's 3-step state resumed under TP for 2
        d3 = new_model(cfg, dtype, 0)
        od3 = new_opt(d3, dtype)
        train(d3, od3, cfg, 3)
        m2 = tp.tensor_parallel_(new_model(cfg, dtype, 9), group)
        tp.load_dense_state_dict(m2, d3.state_dict(), group)
        o2 = new_opt(m2, dtype)
        tp.load_dense_optimizer_state_dict(o2, m2, od3.state_dict(), group)
        end = train(m2, o2, cfg, 2, first=3, is_tp=True)[-1][2]
        r["resume_dense_to_tp"] = max(close(end[k], ref_run[-1][2][k], dtype, f"resumed {k}")
                                      for k in end)

        # -- generation, greedy and sampled, with and without the KV cache ---------------------
        if dtype == "float64":
            # weights far from GPT-2's small init, so that greedy decoding does not just
            # repeat one token
            gen_ref = new_model(cfg, dtype, 11)
            with tl.no_grad():
                for p in gen_ref.parameters():
                    if p.ndim == 2:
                        p.normal_(0.0, 0.3)
            gen = tp.tensor_parallel_(new_model(cfg, dtype, 12), group)
            tp.load_dense_state_dict(gen, gen_ref.state_dict(), group)
            prompt = np.random.default_rng(3).integers(0, cfg.vocab_size, (2, 3))
            r["generate"] = {}
            for how, kw in (("greedy", dict(temperature=0)),
                            ("sampled", dict(temperature=1.0, seed=5))):
                want_ids = gen_ref.generate(prompt, 12, **kw)
                assert len(set(want_ids[:, 3:].reshape(-1).tolist())) > 1, want_ids
                for cache in (True, False):
                    got_ids = gen.generate(prompt, 12, use_cache=cache, **kw)
                    assert np.array_equal(got_ids, want_ids), (how, cache, got_ids, want_ids)
                r["generate"][how] = want_ids[:, 3:].tolist()

# -- dropout: the same masks outside TP regions, each rank's own inside ----------------------------
cfg = GPTConfig(vocab_size=64, dropout=0.2, **BASE)
model = tp.tensor_parallel_(new_model(cfg, "float64", 0), group)
opt = new_opt(model, "float64")
tp.manual_seed(1234, group)
x, y = batch(cfg, 0)
region_before = json.dumps(tp.region_generator().get_state())
_, loss = model(x, y)
# attention-weight dropout (inside the region) drew from the region generator
assert json.dumps(tp.region_generator().get_state()) != region_before, \
    "attention dropout did not use the region generator"
loss.backward()
opt.step()
shards = tp.sharded_parameters(model)
same_on_every_rank([p.data for k, p in model.named_parameters() if k not in shards],
                   "with dropout: replicated parameters")
draw = tp.region_generator().np.random(4)
everyone = np.empty(4 * size)
group.all_gather(draw, everyone)
assert len({tuple(row) for row in everyone.reshape(size, 4)}) == size, "region seeds agree"
results["dropout"] = "ok"

if rank == 0:
    print("RESULT " + json.dumps(results), flush=True)
sys.exit(0)
