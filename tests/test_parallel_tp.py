"""Tensor parallelism (parallel/tensor_parallel.py), proven by equivalence on 2 and 4 real
ranks: each test launches ``mpiexec -n N`` on a script in tests/mpi/ (with a timeout, the
ranks in their own process group so none outlives it; this checkout first on PYTHONPATH).

tests/mpi/tp_equivalence.py: a TP GPT (three configurations: tied, rotary with a padded
vocabulary of 11, untied post-LN with the padded vocabulary) gives the dense GPT's logits,
loss and gradients, and takes the same 5 clipped AdamW steps (float64 1e-10 per element,
float32 1e-5 per tensor in relative L2); its state (model and AdamW) gathers to the dense
one's and resumes across degrees; greedy and sampled generation with the KV cache give the
dense tokens; dropout seeds agree outside TP regions and differ inside.
tests/mpi/tp_layers.py: every parallel layer equals its dense self and passes tl.gradcheck
with its collectives inside; one all-reduce forward and one backward per attention and MLP.
The rest runs in one process (a group of one) without MPI.
"""
import functools
import json

import numpy as np
import pytest

import nn
import tensorlite as tl
from parallel import Group, SelfComm
from parallel import tensor_parallel as tp



from mpi_launch import needs_mpi, result_of  # noqa: E402


@functools.lru_cache(maxsize=None)
def _run_once(n: int, script: str, *args) -> str:
    # pytest rebuilds a parametrized module fixture whenever the order of tests switches
    # between its parameters: each launch is made once and its result reused
    return json.dumps(result_of(n, script, *args))


@pytest.fixture(scope="module", params=[2, 4], ids=lambda n: f"tp{n}")
def equivalence(request):
    return json.loads(_run_once(request.param, "tp_equivalence.py"))


@pytest.fixture(scope="module", params=[2, 4], ids=lambda n: f"tp{n}")
def layers(request):
    # 4 ranks on a small machine: ~1 ms a collective, so the full gradchecks run on 2
    return json.loads(_run_once(request.param, "tp_layers.py",
                                *(["--quick"] if request.param > 2 else [])))


TOL = {"float64": 1e-10, "float32": 1e-5}
CONFIGS = ("tied", "tied-rope-vocab11", "untied-postln-vocab11")


# ----------------------------------------------------------------------------- a whole GPT
@needs_mpi
@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("config", CONFIGS)
def test_tensor_parallel_gpt_equals_dense(equivalence, config, dtype):
    """Logits (gathered), loss (also with ignored targets), gradients (gathered to dense
    shapes) and 5 clipped AdamW steps: the script asserted each; these are the worst errors."""
    r = equivalence[f"{config} {dtype}"]
    for key in ("logits", "loss", "loss_ignore_index", "grads", "steps", "steps_loss"):
        assert r[key] <= TOL[dtype], (key, r[key])


@needs_mpi
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_tensor_parallel_state_gathers_to_dense_and_resumes_across_degrees(equivalence, dtype):
    for config in CONFIGS:
        r = equivalence[f"{config} {dtype}"]
        for key in ("optimizer_state", "resume_tp_to_dense", "resume_dense_to_tp"):
            assert r[key] <= TOL[dtype], (config, key, r[key])


@needs_mpi
def test_tensor_parallel_generation_with_kv_cache_equals_dense(equivalence):
    for config in CONFIGS:
        gen = equivalence[f"{config} float64"]["generate"]      # asserted equal in the script
        assert len(gen["greedy"][0]) == len(gen["sampled"][0]) == 12


@needs_mpi
def test_vocab_padding_leaves_the_loss_unchanged(equivalence):
    """Vocabulary 11 on 2 ranks (6 + 6) and 4 (3 + 3 + 3 + 3): the padded logits count for
    nothing, the padded rows get no gradient (both asserted in the script)."""
    for config in CONFIGS[1:]:
        for dtype in ("float64", "float32"):
            r = equivalence[f"{config} {dtype}"]
            assert r["loss"] <= TOL[dtype] and r["grads"] <= TOL[dtype], (config, dtype, r)


@needs_mpi
def test_all_reduces_per_block(layers):
    """One all-reduce forward and one backward for attention, one each for the MLP."""
    assert layers["block_all_reduces"] == {"forward": 2, "backward": 2}


@needs_mpi
def test_all_reduces_per_gpt_step(equivalence):
    """2 per block, + the embedding's and the loss's two forward, + the head's f backward."""
    for config in CONFIGS:
        n_layer = 2
        assert equivalence[f"{config} float64"]["all_reduces"] == [2 * n_layer + 3,
                                                                   2 * n_layer + 1]


@needs_mpi
def test_dropout_same_outside_tp_regions_own_inside(equivalence):
    assert equivalence["dropout"] == "ok"


# ----------------------------------------------------------------------------- each layer
@needs_mpi
def test_each_parallel_layer_equals_its_dense_self_and_gradchecks(layers):
    worst = max(layers["compared"].values())
    assert worst <= 1e-12, layers["compared"]
    names = " ".join(layers["compared"])
    for layer in ("gather_from_tp", "ColumnParallelLinear", "RowParallelLinear",
                  "ParallelAttention", "ParallelAttention with a per-head mask", "parallel MLP",
                  "VocabParallelEmbedding", "vocab-parallel cross-entropy"):
        assert layer in names, layer
    if layers["ranks"] == 2:
        assert layers["gradchecked"] == [
            "f (copy_to_tp) and g (reduce_from_tp)", "g of a shard", "gather_from_tp",
            "ColumnParallelLinear", "RowParallelLinear", "ParallelAttention", "parallel MLP",
            "VocabParallelEmbedding (vocab 9)", "vocab-parallel cross-entropy (vocab 9)"]
    else:           # a vocabulary of 5 on 4 ranks: [0 1] [2 3] [4 pad] [pad pad]
        assert layers["gradchecked"] == ["vocab-parallel cross-entropy (vocab 5)"]


# ----------------------------------------------------------------------------- one process
def test_split_cuts_and_joins_back():
    """Split.take for every rank, stacked, then join: the dense array again (qkv's three
    blocks; a padded vocabulary; a cut along columns)."""
    rng = np.random.default_rng(0)
    cases = [(tp.Split(0, 12, chunks=3), (12, 5), 2), (tp.Split(0, 11), (11, 3), 4),
             (tp.Split(1, 8), (3, 8), 4), (tp.Split(0, 5), (5,), 4)]
    for split, shape, n in cases:
        full = rng.standard_normal(shape)
        parts = np.stack([split.take(full, r, n) for r in range(n)])
        assert np.array_equal(split.join(parts), full), split
    q, k, v = (np.full((4, 2), i) for i in range(3))               # 2 heads of 2, 2 ranks
    rank1 = tp.Split(0, 12, chunks=3).take(np.concatenate([q, k, v]), 1, 2)
    assert rank1[:, 0].tolist() == [0, 0, 1, 1, 2, 2]              # its q, k and v rows
    padded = tp.Split(0, 11).take(np.ones((11, 2)), 3, 4)          # rows 9, 10 and padding
    assert padded.tolist() == [[1, 1], [1, 1], [0, 0]]


def test_a_group_of_one_is_the_dense_model():
    """tp = 1: nothing is cut or communicated; the layers and the loss are the dense ones."""
    one = Group(SelfComm(), "tp")
    tl.manual_seed(0)
    lin = nn.Linear(4, 6).double()
    x = tl.randn(2, 4, dtype=tl.float64)
    col = tp.ColumnParallelLinear.from_dense(lin, one)
    row = tp.RowParallelLinear.from_dense(lin, one)
    assert np.array_equal(col(x).data, lin(x).data) and np.allclose(row(x).data, lin(x).data)
    logits = tl.randn(3, 7, dtype=tl.float64)
    t = np.array([0, 6, -100])
    assert np.isclose(tp.vocab_parallel_cross_entropy(logits, t, one, 7).item(),
                      nn.functional.cross_entropy(logits, t).item(), rtol=0, atol=1e-15)
    block = nn.ModuleList([nn.TransformerBlock(8, 2)])
    before = dict(block.state_dict())
    assert tp.tensor_parallel_(block, one) is block
    assert isinstance(block[0].attn, nn.MultiHeadAttention) and block.state_dict().keys() == \
        before.keys()


def test_shapes_the_degree_cannot_cut_are_refused():
    class Two:                                   # only what the constructors read
        rank, size = 0, 2
    with pytest.raises(ValueError, match="3 heads cannot be cut into 2"):
        tp.ParallelAttention.from_dense(nn.MultiHeadAttention(6, 3), Two())
    with pytest.raises(ValueError, match="cannot be cut into 2 equal parts"):
        tp.RowParallelLinear.from_dense(nn.Linear(5, 4), Two())
    mlp = nn.FeedForward(4, 8)
    mlp.fc = tp.ColumnParallelLinear.from_dense(mlp.fc, Two())
    with pytest.raises(TypeError, match="already tensor-parallel"):
        tp.parallel_mlp_(mlp, Two())
