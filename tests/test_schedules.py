"""Pipeline schedules as data (parallel/schedule.py), tested without a model or MPI.

Each property is checked on the instruction lists themselves where it can be, and by
`simulate` (every stage's instructions run against simulated messages) where it needs the
stages together: every micro-batch once forward and once backward per stage, sends matching
receives in order between neighbours, no deadlock, the activations each stage holds, and the
bubble (p - 1) / (m + p - 1). The simulator is itself tested on broken schedules.
"""
import pytest

from parallel.schedule import (SCHEDULES, Backward, Forward, LoadMicroBatch, RecvActivation,
                               RecvGrad, ReduceTiedGrads, ScheduleError, SendActivation,
                               SendGrad, get_schedule, gpipe, one_f_one_b, predicted_bubble,
                               simulate, timetable)

SIZES = [(p, m) for p in range(1, 7) for m in range(1, 11)]


def program(name, s, p, m):
    return list(get_schedule(name)(s, p, m))


def micros(prog, kind):
    return [ins.micro for ins in prog if type(ins) is kind]


@pytest.mark.parametrize("name", SCHEDULES)
def test_every_micro_batch_forwarded_and_backwarded_once_per_stage(name):
    for p, m in SIZES:
        for s in range(p):
            prog = program(name, s, p, m)
            assert sorted(micros(prog, Forward)) == list(range(m)), (name, s, p, m)
            assert sorted(micros(prog, Backward)) == list(range(m)), (name, s, p, m)
            where = {str(ins): k for k, ins in enumerate(prog)}
            for i in range(m):
                assert where[f"F{i}"] < where[f"B{i}"]
                if s > 0:                           # input received before it is used
                    assert where[f"RA{i}"] < where[f"F{i}"] < where[f"SA{i}"] if s < p - 1 \
                        else where[f"RA{i}"] < where[f"F{i}"]
                if s < p - 1:                       # output gradient received before backward
                    assert where[f"RG{i}"] < where[f"B{i}"]
            # data only where it is read: inputs on the first stage, targets on the last
            assert micros(prog, LoadMicroBatch) == (micros(prog, Forward) if s in (0, p - 1)
                                                    else [])
            assert prog[-1] == ReduceTiedGrads() and prog.count(ReduceTiedGrads()) == 1


@pytest.mark.parametrize("name", SCHEDULES)
def test_sends_match_receives_between_neighbours_in_order_and_never_deadlock(name):
    for p, m in SIZES:
        progs = [program(name, s, p, m) for s in range(p)]
        assert not micros(progs[0], RecvActivation) and not micros(progs[0], SendGrad)
        assert not micros(progs[-1], SendActivation) and not micros(progs[-1], RecvGrad)
        for s in range(p - 1):                      # what s sends, s + 1 receives, in order
            assert micros(progs[s], SendActivation) == micros(progs[s + 1], RecvActivation)
            assert micros(progs[s + 1], SendGrad) == micros(progs[s], RecvGrad)
        sim = simulate(name, p, m)                  # runs to the end: no deadlock
        assert len(sim.messages) == 2 * m * (p - 1)


def test_1f1b_deadlocks_with_blocking_sends_so_the_executor_sends_without_blocking():
    """Why PipelineExecutor uses MPI_Isend: with a send that waits for its receiver (what
    MPI_Send does for a large message) 1F1B deadlocks at the first turn. Stage 0 sends
    micro-batch 1's activation while stage 1, done with micro-batch 0, sends its gradient
    back: each waits for the other to receive. GPipe has no such turn. (Megatron-LM pairs
    the two into one send-and-receive; buffered sends are the simpler cure.)"""
    for p, m in SIZES:
        simulate(gpipe, p, m, blocking_sends=True)
        if p >= 2 and m >= 2:
            with pytest.raises(ScheduleError, match="deadlock .blocking sends.*stage 0 at"):
                simulate(one_f_one_b, p, m, blocking_sends=True)
        else:
            simulate(one_f_one_b, p, m, blocking_sends=True)


@pytest.mark.parametrize("name", SCHEDULES)
def test_activations_held_per_stage(name):
    """GPipe holds every micro-batch at the turn; 1F1B at most p - s on stage s, whatever m
    (counted from the instruction order, which is the executor's, and by the simulator)."""
    for p, m in SIZES:
        sim = simulate(name, p, m)
        for s in range(p):
            held, peak = 0, 0
            for ins in program(name, s, p, m):
                held += {Forward: 1, Backward: -1}.get(type(ins), 0)
                peak = max(peak, held)
            want = m if name == "gpipe" else min(p - s, m)
            assert peak == sim.peak_in_flight[s] == want, (name, p, m, s, peak)
            assert peak <= (m if name == "gpipe" else p)


@pytest.mark.parametrize("name", SCHEDULES)
@pytest.mark.parametrize("forward_time,backward_time", [(1, 1), (1, 2), (2, 3)])
def test_bubble_is_p_minus_1_over_m_plus_p_minus_1(name, forward_time, backward_time):
    """On an ideal machine the step takes (m + p - 1)(f + b): every stage idles exactly the
    predicted share, for any forward and backward cost."""
    for p, m in SIZES:
        sim = simulate(name, p, m, forward_time, backward_time)
        assert sim.makespan == (m + p - 1) * (forward_time + backward_time)
        for s in range(p):
            assert sim.idle(s) == pytest.approx(predicted_bubble(p, m), abs=1e-12)


def test_timetable_shows_who_does_what_when():
    assert timetable("1f1b", 3, 4) == "\n".join([
        "1F1B: 3 stages, 4 micro-batches (forward 1, backward 1 time unit)",
        "time     0  1  2  3  4  5  6  7  8  9  10 11",
        "stage 0  F0 F1 F2 .  .  B0 F3 B1 .  B2 .  B3",
        "stage 1  .  F0 F1 .  B0 F2 B1 F3 B2 .  B3 .",
        "stage 2  .  .  F0 B0 F1 B1 F2 B2 F3 B3 .  .",
        "bubble: predicted (p-1)/(m+p-1) = 2/6 = 33.3%; idle per stage here: 33.3% 33.3% 33.3%",
        "activations held at most (micro-batches) per stage: 3 2 1",
    ])
    g = timetable("gpipe", 2, 2, backward_time=2).splitlines()
    assert g[2:4] == ["stage 0  F0 F1 .  .  .  B1 B1 B0 B0", "stage 1  .  F0 F1 B1 B1 B0 B0 .  ."]


# ----------------------------------------------------------------------------- the checker
def mutant(change):
    """GPipe with ``change(stage, instructions) -> instructions`` applied to every stage."""
    def schedule(s, p, m):
        return iter(change(s, list(gpipe(s, p, m))))
    return schedule


@pytest.mark.parametrize("change,message", [
    # stage 1 receives micro-batch 1 first: messages between two stages arrive in order
    (lambda s, prog: ([RecvActivation(1), RecvActivation(0)]
                      + [i for i in prog if type(i) is not RecvActivation] if s == 1 else prog),
     "is for micro-batch 0, not 1"),
    # a gradient never sent: its receiver waits forever
    (lambda s, prog: [i for i in prog if i != SendGrad(0)], "deadlock"),
    # a backward before the output's gradient arrived
    (lambda s, prog: [i for i in prog if i != RecvGrad(2)] + [RecvGrad(2)] if s == 0 else prog,
     "gradient of micro-batch 2's output has not arrived"),
    # a micro-batch forwarded twice
    (lambda s, prog: prog + [Forward(0)], "already forwarded"),
    # an activation sent and never received
    (lambda s, prog: [i for i in prog if i != RecvActivation(3)] if s == 1 else prog,
     "input is not here"),
    # a middle stage loading data
    (lambda s, prog: [LoadMicroBatch(0)] + prog if s == 1 else prog, "only the first and"),
])
def test_the_simulator_rejects_broken_schedules(change, message):
    with pytest.raises(ScheduleError, match=message):
        simulate(mutant(change), 3, 4)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="unknown pipeline schedule 'pipedream'.*1f1b"):
        get_schedule("pipedream")
    with pytest.raises(ValueError, match="num_micro_batches must be an integer >= 1, got 0"):
        list(one_f_one_b(0, 2, 0))
    with pytest.raises(ValueError, match="stage 2 is outside 0..1"):
        list(gpipe(2, 2, 4))
