"""parallel/ on 2 and 4 real ranks: each test launches ``mpiexec -n N`` on a script in
tests/mpi/ (with a timeout, the ranks in their own process group so none outlives it).

Proofs by equivalence (tests/mpi/dp_equivalence.py): data parallel and ZeRO-1 on N ranks
take the same 5 AdamW steps (clipping, 2 micro-steps) as one process on the same global
batch, float64 to 1e-10 per element and float32 to 1e-5 per tensor (relative L2; the
script says why not per element); every rank holds bit-identical parameters;
ZeRO's gathered state is AdamW's state_dict, reshards exactly, and resumes across degrees
through nn.checkpoint. Plus: groups and collectives, unused parameters, the abort path.
"""
import pytest

from mpi_launch import needs_mpi, result_of, run_mpi

pytestmark = needs_mpi


@pytest.fixture(scope="module", params=[2, 4], ids=lambda n: f"{n}ranks")
def equivalence(request):
    return result_of(request.param, "dp_equivalence.py")


# ----------------------------------------------------------------------------- equivalence
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_data_parallel_and_zero_equal_one_process(equivalence, dtype):
    r, tol = equivalence[dtype], {"float64": 1e-10, "float32": 1e-5}[dtype]
    # the script asserted every step and tensor (and bit-identity across ranks); these are
    # the worst errors it saw
    for key in ("dp_vs_single", "grads_dp_vs_single", "zero_vs_dp", "zero_vs_single",
                "loss_vs_single"):
        assert r[key] <= tol, (key, r[key])


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_zero_state_dict_is_adamws_and_resumes_across_degrees(equivalence, dtype):
    r, tol = equivalence[dtype], {"float64": 1e-10, "float32": 1e-5}[dtype]
    assert r["state_vs_adamw"] <= tol
    assert r["resume_zero_to_single"] <= tol and r["resume_single_to_zero"] <= tol


def test_zero_optimizer_state_per_rank_is_one_nth(equivalence):
    n = equivalence["ranks"]
    for dtype in ("float64", "float32"):
        mine, full = equivalence[dtype]["state_bytes"]
        assert full / n <= mine <= full / n + 64, (dtype, mine, full)   # + padding


def test_bucketed_all_reduce_starts_while_backward_runs(equivalence):
    """The first bucket (the last layers' gradients) must start its all-reduce while most
    gradients are still to come: counted in hooks, not timed. (Before tensorlite's backward
    took Kahn's order every hook fired after the whole graph: 27 of 28 here.)"""
    for dtype in ("float64", "float32"):
        r = equivalence[dtype]
        stats = r["last_stats"]
        assert stats["hooks"] == r["params"] and stats["launched_in_hooks"] == r["buckets"] > 2
        assert stats["first_launch_at_hook"] <= r["params"] // 2, stats


# ----------------------------------------------------------------------------- the rest
def test_groups_collectives_threads_and_unused_parameters():
    r = result_of(4, "collectives.py")
    assert r["groups"] == {"dp": [[0, 2], [1, 3]], "tp": [[0, 1], [2, 3]],
                           "pp": [[0], [1], [2], [3]]}
    assert r["unused_parameters"] == "ok"


@pytest.mark.parametrize("how,status,message", [
    ("raise", 1, "rank 1: ValueError: boom on rank 1"),
    ("exit", 2, "rank 1: exited with status 2"),
])
def test_a_failing_rank_ends_every_rank_with_its_message(how, status, message):
    rc, out, err, seconds = run_mpi(4, "abort.py", how, timeout=60)
    assert rc == status, (rc, out, err)
    assert message in err, err
    assert "finished" not in out, out          # no rank carried on past the failure
    assert seconds < 30, seconds               # ended by the abort, not the timeout
