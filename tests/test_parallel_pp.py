"""Pipeline parallelism (parallel/pipeline.py) equals one process.

On 2 and 4 real ranks (``mpiexec -n N tests/mpi/pp_equivalence.py``, with a timeout, the
ranks in their own process group): a small GPT cut into N stages, run by GPipe and by 1F1B
over 8 micro-batches, gives the loss, the gradients of every weight and, after 3 AdamW steps
with clipping, the weights of one process on the whole global batch (float64 to 1e-10 per
element, float32 to 1e-5 per tensor in relative L2; the script says why); the tied embedding's
two copies stay bit-identical, and 1F1B holds at most N - s micro-batches of activations on
stage s (GPipe: all 8). In one process: a one-stage pipeline is plain micro-batched
backward, stages cut the model into disjoint pieces, and mistakes are named.
"""
import sys
from pathlib import Path

import numpy as np
import pytest

import parallel
import tensorlite as tl
from gpt.model import GPT, GPTConfig
from parallel.comm import Group, SelfComm

HERE = Path(__file__).parent
SCRIPTS = HERE / "mpi"
sys.path.insert(0, str(SCRIPTS))
from pp_gpt import gpt_pieces  # noqa: E402


from mpi_launch import needs_mpi, result_of  # noqa: E402


@pytest.fixture(scope="module", params=[2, 4], ids=lambda n: f"{n}stages")
def pipelined(request):
    return result_of(request.param, "pp_equivalence.py")


# ----------------------------------------------------------------------------- on N ranks
@needs_mpi
@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_pipeline_takes_the_steps_of_one_process(pipelined, dtype, schedule):
    r, tol = pipelined[dtype][schedule], {"float64": 1e-10, "float32": 1e-5}[dtype]
    # the script asserted every step and weight on every stage; these are the worst errors
    for key in ("loss", "grads", "norm", "weights"):
        assert r[key] <= tol, (key, r[key])
    # ... and between them the stages compared every weight of the model once
    assert r["compared"] == pipelined[dtype]["params"]


@needs_mpi
def test_1f1b_holds_at_most_stages_minus_stage_micro_batches(pipelined):
    p, m = pipelined["stages"], pipelined["micro_batches"]
    assert m > p                                   # else the two schedules hold the same
    for dtype in ("float64", "float32"):
        assert pipelined[dtype]["1f1b"]["peak_in_flight"] == [min(p - s, m) for s in range(p)]
        assert pipelined[dtype]["gpipe"]["peak_in_flight"] == [m] * p


# ----------------------------------------------------------------------------- one process
CFG = GPTConfig(vocab_size=32, block_size=8, n_layer=3, n_head=2, d_model=16)


def gpt(dtype="float64"):
    tl.manual_seed(0)
    return GPT(CFG).to(tl.as_dtype(dtype))


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
@pytest.mark.parametrize("micro", [1, 3, 6])
def test_one_stage_pipeline_is_micro_batched_backward(schedule, micro):
    rng = np.random.default_rng(0)
    x, y = (rng.integers(0, CFG.vocab_size, (6, CFG.block_size)) for _ in range(2))
    ref = gpt()
    _, loss = ref(tl.tensor(x), tl.tensor(y))
    loss.backward()
    model = gpt()
    first, blocks, last, tied = gpt_pieces(model)
    stage = parallel.build_stage(first, blocks, last, 0, 1)
    pipe = parallel.PipelineExecutor(stage, Group(SelfComm()), schedule, micro, tied)
    assert pipe.forward_backward(x, y) == pytest.approx(loss.item(), abs=1e-12)
    assert pipe.peak_in_flight == (micro if schedule == "gpipe" else 1)
    assert len(list(stage.parameters())) == len(list(model.parameters()))
    for p, q in zip(model.parameters(), ref.parameters()):
        np.testing.assert_allclose(p.grad.data, q.grad.data, rtol=0, atol=1e-12)


def test_stages_cut_the_model_into_its_pieces():
    assert parallel.partition(7, 3) == [(0, 3), (3, 5), (5, 7)]
    model = gpt()
    first, blocks, last, tied = gpt_pieces(model)
    stages = [parallel.build_stage(first, blocks, last, s, 3) for s in range(3)]
    ids = [{id(p) for p in st.parameters()} for st in stages]
    wte = id(model.wte.weight)
    assert wte in ids[0] and wte in ids[2] and wte not in ids[1]      # tied: both ends
    assert not (ids[0] & ids[1]) and not (ids[1] & ids[2]) and ids[0] & ids[2] == {wte}
    assert set.union(*ids) == {id(p) for p in model.parameters()}
    assert [list(st.blocks) for st in stages] == [[blocks[0]], [blocks[1]], [blocks[2]]]
    assert "stage 1 of 3, blocks 1..1" in repr(stages[1])


def test_mistakes_are_named():
    model = gpt()
    first, blocks, last, tied = gpt_pieces(model)
    with pytest.raises(ValueError, match="3 blocks cannot be cut into 4 stages"):
        parallel.build_stage(first, blocks, last, 0, 4)
    one = Group(SelfComm())
    with pytest.raises(ValueError, match="the stage is 1 of 2, but this rank is 0 of 1"):
        parallel.PipelineExecutor(parallel.build_stage(first, blocks, last, 1, 2), one)
    pipe = parallel.PipelineExecutor(parallel.build_stage(first, blocks, last, 0, 1), one,
                                     "1f1b", 4, tied)
    x = np.zeros((6, CFG.block_size), np.int64)
    with pytest.raises(ValueError, match="a batch of 6 cannot be cut into 4 equal micro-batches"):
        pipe.forward_backward(x, x)
    with pytest.raises(ValueError, match="needs the batch's targets on this stage"):
        pipe.forward_backward(x[:4])
