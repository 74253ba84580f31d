"""Under ``mpiexec -n N``: a pipeline of N stages takes the same steps as one process.

Every rank builds the same small GPT (seed 0) twice: once whole, trained alone on the whole
global batch (the reference, run on every rank), and once cut into N stages of which it
keeps its own (parallel.build_stage), trained by parallel.PipelineExecutor with GPipe and
with 1F1B over M micro-batches. For STEPS AdamW steps, with clipping that binds, float64 and
float32, each stage checks against the reference:

* the loss of the global batch (on every stage) and the gradient norm;
* the gradient of every weight it holds, before clipping (the tied token embedding on the
  first and the last stage: both hold the full gradient after ReduceTiedGrads);
* every weight after the step;

and the stages together check that they compared every weight of the model once, that
the two copies of the tied embedding are bit-identical after the steps, and that no
activation outlives its step. Each stage reports the most micro-batches whose activations
it held (the executor's live-output count). Rank 0 prints one JSON line; any failed check
raises, and the abort handler ends every rank with the message.
"""
import json
import sys

import numpy as np

import parallel
import tensorlite as tl
from gpt.model import GPT, GPTConfig
from gpt.train import param_groups
from nn.optim import AdamW, clip_grad_norm_
from pp_gpt import gpt_pieces
from checks import close as _close


def close(a, b, dtype, what):
    return _close(a, b, dtype, what, where=f"stage {stage_id} of {stages}")


STEPS, BATCH, M, CLIP, LR = 3, 16, 8, 0.25, 3e-3
CFG = GPTConfig(vocab_size=64, block_size=16, n_layer=4, n_head=2, d_model=32)
# float64: every element within 1e-10. float32: each tensor within 1e-5 in relative L2, and
# AdamW's eps 1e-6: tests/mpi/dp_equivalence.py measures why (a per-element bound on float32
# AdamW updates only holds far above eps; a re-split batch moves the last bits of g)
EPS = {"float64": 1e-8, "float32": 1e-6}

state = parallel.init_parallel(pp=parallel.world_group().size)
pp = state.pp
stage_id, stages = pp.rank, pp.size


def new_model(dtype):
    tl.manual_seed(0)
    return GPT(CFG).to(tl.as_dtype(dtype))


def new_opt(module, dtype):
    return AdamW(param_groups(module, 0.1), lr=LR, betas=(0.9, 0.95), eps=EPS[dtype])


def batches():
    rng = np.random.default_rng(5)
    shape = (BATCH, CFG.block_size)
    return [(rng.integers(0, CFG.vocab_size, shape), rng.integers(0, CFG.vocab_size, shape))
            for _ in range(STEPS)]


def reference(dtype):
    """One process, the whole batch: [(loss, norm, {name: grad}, {name: weight after})]."""
    model = new_model(dtype)
    opt = new_opt(model, dtype)
    out = []
    for x, y in batches():
        _, loss = model(tl.tensor(x), tl.tensor(y))
        loss.backward()
        grads = {n: p.grad.data.copy() for n, p in model.named_parameters()}
        norm = clip_grad_norm_(model.parameters(), CLIP)
        opt.step()
        opt.zero_grad()
        out.append((loss.item(), norm, grads,
                    {n: p.data.copy() for n, p in model.named_parameters()}))
    return out, model.num_parameters()


def pipelined(dtype, schedule, ref):
    model = new_model(dtype)
    first, blocks, last, tied = gpt_pieces(model)
    stage = parallel.build_stage(first, blocks, last, stage_id, stages)
    pipe = parallel.PipelineExecutor(stage, pp, schedule, num_micro_batches=M, tied=tied)
    opt = new_opt(stage, dtype)
    name = {id(p): n for n, p in model.named_parameters()}      # the whole model's names
    errs = dict(loss=0.0, norm=0.0, grads=0.0, weights=0.0)
    peak = 0
    for step, ((x, y), (l0, n0, g0, w0)) in enumerate(zip(batches(), ref)):
        assert n0 > CLIP, f"clipping must bind to be tested: norm {n0} <= {CLIP}"
        # every stage is handed the whole batch; the first reads x, the last y
        loss = pipe.forward_backward(x, y)
        assert len(pipe._live) == 0, "activations outlived the step"
        peak = max(peak, pipe.peak_in_flight)
        errs["loss"] = max(errs["loss"], close(loss, l0, dtype, f"step {step}: loss"))
        for p in stage.parameters():
            errs["grads"] = max(errs["grads"], close(p.grad.data, g0[name[id(p)]], dtype,
                                                     f"step {step}: gradient of {name[id(p)]}"))
        norm = pipe.clip_grad_norm_(CLIP)
        errs["norm"] = max(errs["norm"], close(norm, n0, dtype, f"step {step}: gradient norm"))
        opt.step()
        opt.zero_grad()
        for p in stage.parameters():
            errs["weights"] = max(errs["weights"], close(p.data, w0[name[id(p)]], dtype,
                                                         f"step {step}: {name[id(p)]}"))
    # the whole model, once: the stages' weights without the tied copies add up to it
    compared = pp.all_reduce_scalar(sum(p.numel() for p in pipe.owned_parameters()))
    # the two copies of the tied embedding: bit-identical after the steps
    if stages > 1 and stage_id in (0, stages - 1):
        w = tied[0].data
        if stage_id == stages - 1:
            pp.send(np.ascontiguousarray(w), 0, tag=99)
        else:
            other = np.empty_like(w)
            pp.recv(other, stages - 1, tag=99)
            assert np.array_equal(other, w), f"{dtype} {schedule}: the tied copies differ"
    peaks = np.empty(stages, np.int64)
    pp.all_gather(np.array([peak], np.int64), peaks)
    # the worst error of any stage
    for k in errs:
        errs[k] = pp.all_reduce_scalar(errs[k], "max")
    return dict(errs, peak_in_flight=peaks.tolist(), compared=int(compared))


results = {"stages": stages, "micro_batches": M}
for dtype in ("float64", "float32"):
    ref, n_params = reference(dtype)
    results[dtype] = {"params": n_params}
    for schedule in ("gpipe", "1f1b"):
        results[dtype][schedule] = pipelined(dtype, schedule, ref)

if stage_id == 0:
    print("RESULT " + json.dumps(results), flush=True)
sys.exit(0)
