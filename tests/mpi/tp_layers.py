"""Under ``mpiexec -n N`` (every rank one tensor-parallel group): each parallel layer alone.

1. The sharded layer equals the dense layer it was cut from (outputs, and the gradients of
   the input and of every weight gathered back to dense shapes), float64, to 1e-12.
2. tl.gradcheck of each layer, the collectives inside the function, on every rank at once.
   gradcheck perturbs one element at a time, in the same order on every rank, and each rank
   measures L = sum(w * out) of its own copy of the (replicated) output, w the same on every
   rank. An input that is replicated (the same on every rank) is perturbed on every rank
   together: that is one element of the model. A shard differs per rank, so its elements are
   checked one rank at a time: on rank k gradcheck perturbs k's shard; the other ranks run
   gradcheck on a same-shaped dummy that the function ignores (so every rank runs the same
   evaluations, hence the same collectives) and disregard its verdict: their outputs move
   with k's perturbation, which their dummy's zero gradient cannot know.
3. All-reduces counted: one forward and one backward for attention, one each for the MLP.

``--quick`` (for 4 ranks on a small machine, where each collective costs a context switch,
~1 ms): one gradcheck, of the loss on a vocabulary that leaves a rank no real id; every
layer is still compared with its dense self.
Rank 0 prints one JSON line; a failed check raises (and ends every rank).
"""
import json
import sys

import numpy as np

import nn
import parallel
import tensorlite as tl
from parallel import tensor_parallel as tp
from checks import Counting

state = parallel.init_parallel(tp=parallel.world_group().size)
group = state.tp
rank, size = group.rank, group.size
quick = "--quick" in sys.argv
out = {"ranks": size, "gradchecked": [], "compared": {}}
F64 = tl.float64


def arr(t):
    return np.asarray(t.data)


def rand(*shape, seed=0):
    """The same values on every rank (a replicated input)."""
    return tl.tensor(np.random.default_rng(seed).standard_normal(shape), dtype=F64,
                     requires_grad=True)


def compare(name, got, want, tol=1e-12):
    err = float(np.max(np.abs(np.asarray(got) - np.asarray(want))))
    if not err <= tol:
        raise AssertionError(f"rank {rank}: {name}: sharded vs dense differ by {err:.3g}")
    out["compared"][name] = max(out["compared"].get(name, 0.0), err)


def gradcheck_tp(name, fn, replicated, sharded):
    """tl.gradcheck of ``fn`` (-> a replicated output) w.r.t. replicated inputs (together)
    and each shard (one rank at a time), as the module docstring says."""
    if replicated:
        tl.gradcheck(lambda *_: fn(), replicated)
    for p in sharded:
        for k in range(size):
            if rank == k:
                tl.gradcheck(lambda _: fn(), [p])
            else:
                tl.gradcheck(lambda _: fn(), [tl.zeros(*p.shape, dtype=F64, requires_grad=True)],
                             raise_exception=False)
    out["gradchecked"].append(name)


def dense_grads(module):
    return {n: arr(p.grad) for n, p in module.named_parameters()}


def compare_with_dense(name, dense, sharded, run, x, part=...):
    """run(module, x) -> output, for x (the same values) into each; outputs and gradients
    equal: the input's (``part`` of it: what a sharded input feeds this rank) and every
    weight's, gathered to dense shapes."""
    for m in (dense, sharded):
        m.zero_grad()
    xd, xs = (tl.tensor(np.asarray(x), requires_grad=x.dtype.kind == "f") for _ in range(2))
    yd, ys = run(dense, xd), run(sharded, xs)
    compare(f"{name} output", arr(ys), arr(yd))
    w = tl.tensor(np.random.default_rng(5).standard_normal(yd.shape), dtype=F64)
    yd.backward(w)
    ys.backward(w)
    if xd.requires_grad:
        compare(f"{name} grad input", arr(xs.grad)[part], arr(xd.grad)[part])
    got = tp.gather_grads(sharded, group)
    for n, g in dense_grads(dense).items():
        compare(f"{name} grad {n}", got[n], g)


# -- f and g, and the gather -----------------------------------------------------------------
c = float(rank + 1)                               # a different branch on every rank
x = rand(2, 3)
y = tl.tensor(np.random.default_rng(10 + rank).standard_normal((2, 3)), dtype=F64,
              requires_grad=True)                 # a shard: different on every rank
if not quick:
    # sum_r c_r x: f's backward must add every rank's branch
    gradcheck_tp("f (copy_to_tp) and g (reduce_from_tp)",
                 lambda: tp.reduce_from_tp(tp.copy_to_tp(x, group) * c, group), [x], [])
    gradcheck_tp("g of a shard", lambda: tp.reduce_from_tp(y * y, group), [], [y])
    gradcheck_tp("gather_from_tp", lambda: tp.gather_from_tp(y.tanh(), group), [], [y])
full = tp.gather_from_tp(y, group)
everyone = np.empty((size, 2, 3))
group.all_gather(arr(y).reshape(-1).copy(), everyone.reshape(-1))
compare("gather_from_tp", arr(full), np.concatenate(list(everyone), axis=-1))

# -- column- and row-parallel linears (a column's output gathered; a row fed a shard) -----------
tl.manual_seed(1)
dense = nn.Linear(4, 2 * size).double()
col = tp.ColumnParallelLinear.from_dense(dense, group)
xin = rand(2, 3, 4, seed=1)
compare_with_dense("ColumnParallelLinear", dense, col,
                   lambda m, x: m(x) if m is dense else tp.gather_from_tp(m(x), group), arr(xin))
if not quick:
    gradcheck_tp("ColumnParallelLinear", lambda: tp.gather_from_tp(col(xin), group),
                 [xin], [col.weight, col.bias])
dense = nn.Linear(2 * size, 3).double()
row = tp.RowParallelLinear.from_dense(dense, group)
xrow = rand(2, 3, 2 * size, seed=2)
mine = slice(2 * rank, 2 * rank + 2)
compare_with_dense("RowParallelLinear", dense, row,
                   lambda m, x: m(x) if m is dense else m(x[..., mine]), arr(xrow),
                   part=(..., mine))
if not quick:
    xshard = tl.tensor(arr(xrow)[..., mine].copy(), requires_grad=True)
    gradcheck_tp("RowParallelLinear", lambda: row(xshard), [row.bias], [row.weight, xshard])

# -- attention (causal, rotary) and the MLP, each alone ------------------------------------------
heads, d_model = 2 * size, 8 if size <= 2 else 16
tl.manual_seed(2)
rot = nn.RotaryEmbedding(d_model // heads, 16, dtype=F64)
dense = nn.MultiHeadAttention(d_model, heads, rotary=rot).double()
attn = tp.ParallelAttention.from_dense(dense, group)
xa = rand(2, 3, d_model, seed=3)
compare_with_dense("ParallelAttention", dense, attn, lambda m, x: m(x), arr(xa))
mask = np.random.default_rng(4).random((2, heads, 3, 3)) < 0.7     # a per-head bool mask
mask[..., 0] = True
compare_with_dense("ParallelAttention with a per-head mask", dense, attn,
                   lambda m, x: m(x, attn_mask=mask), arr(xa))
if not quick:
    gradcheck_tp("ParallelAttention", lambda: attn(xa), [xa, attn.proj.bias],
                 [attn.qkv.weight, attn.qkv.bias, attn.proj.weight])
# the same initial draws, the one kept dense, the other cut
tl.manual_seed(3)
dense = nn.FeedForward(d_model, 2 * d_model).double()
tl.manual_seed(3)
mlp = tp.parallel_mlp_(nn.FeedForward(d_model, 2 * d_model).double(), group)
compare_with_dense("parallel MLP", dense, mlp, lambda m, x: m(x), arr(xa))
if not quick:
    gradcheck_tp("parallel MLP", lambda: mlp(xa), [xa, mlp.proj.bias],
                 [mlp.fc.weight, mlp.fc.bias, mlp.proj.weight])

# -- the vocabulary: a size the degree does not divide, and one that leaves a rank no real id --
for vocab in (4 * size + 3, 2 * size - 3) if size > 2 else (4 * size + 1,):
    shape = (1, 4) if quick else (2, 7)
    tl.manual_seed(4)
    dense = nn.Embedding(vocab, 5).double()
    emb = tp.VocabParallelEmbedding.from_dense(dense, group)
    ids = np.random.default_rng(6).integers(0, vocab, shape)
    ids[0, :2] = (0, vocab - 1)
    compare_with_dense(f"VocabParallelEmbedding (vocab {vocab})", dense, emb,
                       lambda m, x: m(x), ids)
    if not quick:
        gradcheck_tp(f"VocabParallelEmbedding (vocab {vocab})", lambda: emb(ids), [],
                     [emb.weight])
    # the loss from this rank's logit columns: equal to F.cross_entropy of all of them
    vl = -(-vocab // size)
    logits_full = np.random.default_rng(7).standard_normal(shape + (vl * size,))
    targets = np.random.default_rng(8).integers(0, vocab, shape)
    targets[-1, 3] = -100                                              # ignored
    targets[0, :2] = (0, vocab - 1)
    full_t = tl.tensor(logits_full[..., :vocab], requires_grad=True)
    want = nn.functional.cross_entropy(full_t, targets)
    want.backward()
    local = tl.tensor(logits_full[..., rank * vl:(rank + 1) * vl].copy(), requires_grad=True)
    got = tp.vocab_parallel_cross_entropy(local, targets, group, vocab)
    got.backward()
    compare(f"vocab-parallel cross-entropy (vocab {vocab})", got.item(), want.item())
    gfull = np.zeros(shape + (vl * size,))
    gfull[..., :vocab] = arr(full_t.grad)
    compare(f"vocab-parallel cross-entropy grad (vocab {vocab})", arr(local.grad),
            gfull[..., rank * vl:(rank + 1) * vl])
    if rank == size - 1 and vl * size > vocab:
        assert np.all(arr(local.grad)[..., vocab - rank * vl:] == 0), "padding got a gradient"
    if not quick or vl * (size - 1) >= vocab:                         # a rank with no real id
        gradcheck_tp(f"vocab-parallel cross-entropy (vocab {vocab})",
                     lambda: tp.vocab_parallel_cross_entropy(local, targets, group, vocab),
                     [], [local])

# -- all-reduces per block ------------------------------------------------------------------------
counting = Counting(group)
tl.manual_seed(5)
block = nn.TransformerBlock(d_model, heads, 2 * d_model).double()
blocks = nn.ModuleList([block])                   # tensor_parallel_ swaps a model's children
tp.tensor_parallel_(blocks, counting)
assert isinstance(block.attn, tp.ParallelAttention)
assert isinstance(block.mlp.fc, tp.ColumnParallelLinear)
assert isinstance(block.mlp.proj, tp.RowParallelLinear)
xb = rand(2, 3, d_model, seed=9)
counting.count = 0
yb = block(xb)
forward = counting.count
yb.sum().backward()
out["block_all_reduces"] = {"forward": forward, "backward": counting.count - forward}
assert out["block_all_reduces"] == {"forward": 2, "backward": 2}, out["block_all_reduces"]

if rank == 0:
    print("RESULT " + json.dumps(out), flush=True)
