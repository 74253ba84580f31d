"""Pipeline schedules as data: what each stage does, in which order, for one training step.

A schedule is a generator of small instruction records for one stage of a pipeline of
``num_stages`` stages that runs ``num_micro_batches`` micro-batches through it (DeepSpeed's
``runtime/pipe/schedule.py``, ShallowSpeed's ``pipe.py``). Nothing here touches a model or
MPI: `parallel.pipeline.PipelineExecutor` runs the records through a table from instruction
to method, and the same records are printed as a timetable (`timetable`) and checked by
running them against simulated message passing (`simulate`), with no model at all.

The records, with what the executor does for each on stage ``s`` of ``p``:

    LoadMicroBatch(i)   stage 0 takes micro-batch i's inputs, stage p-1 its targets
    RecvActivation(i)   the output of stage s-1 on micro-batch i, the input of this stage
    Forward(i)          run this stage's layers on it; keep what backward needs
    SendActivation(i)   the output to stage s+1
    RecvGrad(i)         from stage s+1: the gradient of the loss with respect to that output
    Backward(i)         backward through this stage's layers; frees micro-batch i's activations
    SendGrad(i)         the gradient with respect to this stage's input, to stage s-1
    ReduceTiedGrads()   sum the gradients of weights that two stages hold (the token embedding,
                        which the first stage uses as the embedding and the last as the LM head)

The clipping and the optimizer step are not in the schedule: in this project a training step
is forward-backward, gradient reduction, clipping, optimizer step, and pipeline parallelism
replaces only the first part (DESIGN.md, "How it plugs in").

Two schedules, shown by `timetable` for 4 stages and 8 micro-batches:

* GPipe (Huang et al. 2019): every micro-batch forward, then every one backward. Simple, but
  each stage holds the activations of all m micro-batches at the turn.
* 1F1B (PipeDream-Flush, Narayanan et al. 2021; Megatron-LM's default): stage s runs
  p - s - 1 warm-up forwards, then alternates one forward and one backward, then finishes
  the backwards. The same bubble as GPipe, but a micro-batch's activations are freed as
  soon as its backward is done, so stage s holds at most p - s of them, whatever m is.

The bubble, the share of the step a stage idles while the pipeline fills and drains, is the
same for both when a forward takes f and a backward b: the step takes (m + p - 1)(f + b),
of which m(f + b) is work, so the idle share is (p - 1) / (m + p - 1). More micro-batches
shrink it; more stages grow it.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import ClassVar, Iterator


# ----------------------------------------------------------------------------- instructions
@dataclass(frozen=True)
class Instruction:
    """One thing a stage does. ``micro``: the micro-batch it is about (None: the whole step)."""
    micro: int | None = None
    short: ClassVar[str] = "?"

    def __str__(self):
        return self.short if self.micro is None else f"{self.short}{self.micro}"


class LoadMicroBatch(Instruction):
    short = "L"


class Forward(Instruction):
    short = "F"


class Backward(Instruction):
    short = "B"


class SendActivation(Instruction):
    short = "SA"


class RecvActivation(Instruction):
    short = "RA"


class SendGrad(Instruction):
    short = "SG"


class RecvGrad(Instruction):
    short = "RG"


class ReduceTiedGrads(Instruction):
    short = "TIED"


# ----------------------------------------------------------------------------- the schedules
def _check(stage: int, num_stages: int, num_micro_batches: int) -> None:
    for name, v in (("num_stages", num_stages), ("num_micro_batches", num_micro_batches)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"schedule: {name} must be an integer >= 1, got {v!r}")
    if not 0 <= stage < num_stages:
        raise ValueError(f"schedule: stage {stage} is outside 0..{num_stages - 1}")


def _forward(i: int, stage: int, num_stages: int) -> Iterator[Instruction]:
    """Micro-batch i through one stage, forward: its input arrives, its output leaves."""
    first, last = stage == 0, stage == num_stages - 1
    if first or last:
        yield LoadMicroBatch(i)          # inputs on the first stage, targets on the last
    if not first:
        yield RecvActivation(i)
    yield Forward(i)
    if not last:
        yield SendActivation(i)


def _backward(i: int, stage: int, num_stages: int) -> Iterator[Instruction]:
    """Micro-batch i through one stage, backward: the output's gradient arrives (the last
    stage starts from its own loss), the input's gradient leaves."""
    if stage != num_stages - 1:
        yield RecvGrad(i)
    yield Backward(i)
    if stage != 0:
        yield SendGrad(i)


def gpipe(stage: int, num_stages: int, num_micro_batches: int) -> Iterator[Instruction]:
    """All forwards, then all backwards (in reverse order, as the last stage finishes them)."""
    _check(stage, num_stages, num_micro_batches)
    for i in range(num_micro_batches):
        yield from _forward(i, stage, num_stages)
    for i in reversed(range(num_micro_batches)):
        yield from _backward(i, stage, num_stages)
    yield ReduceTiedGrads()


def one_f_one_b(stage: int, num_stages: int, num_micro_batches: int) -> Iterator[Instruction]:
    """Warm-up forwards, then one forward and one backward in turn, then the last backwards.

    Stage s starts p - s - 1 forwards ahead: exactly enough that the first micro-batch's
    gradient comes back from the last stage just as s could start another forward. From then
    on each backward frees the oldest micro-batch, so at most p - s are held at once."""
    _check(stage, num_stages, num_micro_batches)
    m = num_micro_batches
    warmup = min(num_stages - stage - 1, m)
    for i in range(warmup):
        yield from _forward(i, stage, num_stages)
    for i in range(m - warmup):                       # steady state: F(i + warmup), B(i)
        yield from _forward(i + warmup, stage, num_stages)
        yield from _backward(i, stage, num_stages)
    for i in range(m - warmup, m):                    # cool-down
        yield from _backward(i, stage, num_stages)
    yield ReduceTiedGrads()


gpipe.label, one_f_one_b.label = "GPipe", "1F1B"
SCHEDULES = {"gpipe": gpipe, "1f1b": one_f_one_b}


def schedule_name(schedule) -> str:
    fn = get_schedule(schedule)
    return getattr(fn, "label", getattr(fn, "__name__", str(fn)))


def get_schedule(schedule):
    """A schedule function, from itself or its name ("gpipe", "1f1b")."""
    if callable(schedule):
        return schedule
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown pipeline schedule {schedule!r}; choose from {sorted(SCHEDULES)}")
    return SCHEDULES[schedule]


def predicted_bubble(num_stages: int, num_micro_batches: int) -> float:
    """The share of a step each stage idles: (p - 1) / (m + p - 1)."""
    return (num_stages - 1) / (num_micro_batches + num_stages - 1)


# ----------------------------------------------------------------------------- simulation
class ScheduleError(RuntimeError):
    """A schedule that cannot run: a deadlock, or an instruction whose input is missing."""


@dataclass
class Simulation:
    """What `simulate` saw. ``spans[s]``: (start, end, instruction) of every Forward and
    Backward of stage s, in simulated time; ``peak_in_flight[s]``: the most micro-batches
    stage s held forwarded but not yet backwarded; ``messages``: (src, dst, kind, micro) in
    the order they were sent."""
    num_stages: int
    num_micro_batches: int
    spans: list
    peak_in_flight: list
    messages: list

    @property
    def makespan(self) -> float:
        return max(end for spans in self.spans for _, end, _ in spans)

    def idle(self, stage: int) -> float:
        """The share of the step (first start to last end, over all stages) that ``stage``
        did no Forward or Backward."""
        busy = sum(end - start for start, end, _ in self.spans[stage])
        return 1.0 - busy / self.makespan


def simulate(schedule, num_stages: int, num_micro_batches: int, forward_time: float = 1.0,
             backward_time: float = 1.0, blocking_sends: bool = False) -> Simulation:
    """Run every stage's instructions against simulated point-to-point messages, and check
    each one as the executor would need it:

    * a Forward has its micro-batch's input (loaded on stage 0, received elsewhere), and the
      last stage its targets; a Backward follows its Forward and has the output's gradient
      (the last stage's comes from its loss); a send sends something computed;
    * a receive gets the message it names: messages between two neighbours travel in order
      (as MPI's do, per sender, receiver and tag), so a receive that finds another
      micro-batch at the head of its channel is an error;
    * every stage runs to its end: none waits for a message that never comes (deadlock),
      none leaves a message unreceived, each micro-batch is forwarded and backwarded
      exactly once per stage.

    Time: a Forward takes ``forward_time``, a Backward ``backward_time``, messages are free
    and a receive waits until its message was sent, so the spans are the timetable of an
    ideal machine. ``blocking_sends``: a send completes only when the receiver is at the
    matching receive (MPI_Send of a large message, rendezvous); otherwise sends are buffered
    (MPI_Isend, waited for later), which is what `PipelineExecutor` does. Any violation
    raises `ScheduleError` naming the stage and the instruction."""
    fn = get_schedule(schedule)
    p, m = num_stages, num_micro_batches
    name = schedule_name(fn)
    progs = [list(fn(s, p, m)) for s in range(p)]
    pc = [0] * p                                  # next instruction of each stage
    clock = [0.0] * p                             # when each stage is free again
    channels: dict = {}                           # (src, dst, kind) -> deque of (micro, sent at)
    state = [dict(loaded=set(), inputs=set(), forwarded=set(), grads=set(), backwarded=set(),
                  sent_act=set(), sent_grad=set()) for _ in range(p)]
    spans = [[] for _ in range(p)]
    in_flight, peak = [0] * p, [0] * p
    messages = []

    def fail(s, ins, why):
        raise ScheduleError(f"{name}, {p} stages, {m} micro-batches: stage {s} at instruction "
                            f"{pc[s]} ({ins}): {why}")

    def channel(src, dst, kind):
        return channels.setdefault((src, dst, kind), deque())

    def peer_of(s, ins):
        """(peer, kind) of a send or receive."""
        return {SendActivation: (s + 1, "act"), RecvActivation: (s - 1, "act"),
                SendGrad: (s - 1, "grad"), RecvGrad: (s + 1, "grad")}[type(ins)]

    def at_matching_recv(s, ins):
        peer, kind = peer_of(s, ins)
        if not 0 <= peer < p or pc[peer] >= len(progs[peer]):
            return False
        other = progs[peer][pc[peer]]
        want = RecvActivation if kind == "act" else RecvGrad
        # the receiver waits for exactly this message, and nothing is queued before it
        return (type(other) is want and other.micro == ins.micro
                and not channel(s, peer, kind))

    def step(s) -> bool:
        """Run stage s's next instruction if it can run now; False if it must wait."""
        ins = progs[s][pc[s]]
        st, i = state[s], ins.micro
        if isinstance(ins, (SendActivation, SendGrad, RecvActivation, RecvGrad)):
            peer, kind = peer_of(s, ins)
            if not 0 <= peer < p:
                fail(s, ins, f"there is no stage {peer} to talk to")
        if isinstance(ins, (LoadMicroBatch, Forward, Backward, SendActivation, SendGrad,
                            RecvActivation, RecvGrad)) and not 0 <= i < m:
            fail(s, ins, f"micro-batch {i} is outside 0..{m - 1}")
        if isinstance(ins, LoadMicroBatch):
            if s not in (0, p - 1):
                fail(s, ins, "only the first and the last stage load data")
            st["loaded"].add(i)
            if s == 0:
                st["inputs"].add(i)
        elif isinstance(ins, (RecvActivation, RecvGrad)):
            q = channel(peer, s, kind)
            if not q:
                return False                       # wait for the message
            got, sent_at = q[0]
            if got != i:
                fail(s, ins, f"the next {kind} message from stage {peer} is for micro-batch "
                             f"{got}, not {i} (messages between two stages arrive in order)")
            q.popleft()
            clock[s] = max(clock[s], sent_at)
            (st["inputs"] if kind == "act" else st["grads"]).add(i)
        elif isinstance(ins, Forward):
            if i not in st["inputs"]:
                fail(s, ins, f"micro-batch {i}'s input is not here (not loaded or received)")
            if s == p - 1 and i not in st["loaded"]:
                fail(s, ins, f"the last stage has not loaded micro-batch {i}'s targets")
            if i in st["forwarded"]:
                fail(s, ins, f"micro-batch {i} was already forwarded")
            st["forwarded"].add(i)
            spans[s].append((clock[s], clock[s] + forward_time, ins))
            clock[s] += forward_time
            in_flight[s] += 1
            peak[s] = max(peak[s], in_flight[s])
        elif isinstance(ins, Backward):
            if i not in st["forwarded"]:
                fail(s, ins, f"micro-batch {i} was not forwarded")
            if i in st["backwarded"]:
                fail(s, ins, f"micro-batch {i} was already backwarded")
            if s != p - 1 and i not in st["grads"]:
                fail(s, ins, f"the gradient of micro-batch {i}'s output has not arrived")
            st["backwarded"].add(i)
            spans[s].append((clock[s], clock[s] + backward_time, ins))
            clock[s] += backward_time
            in_flight[s] -= 1
        elif isinstance(ins, (SendActivation, SendGrad)):
            done, sent = ("forwarded", "sent_act") if kind == "act" else ("backwarded", "sent_grad")
            if i not in st[done]:
                what = "output" if kind == "act" else "input gradient"
                fail(s, ins, f"micro-batch {i} has no {what} to send yet")
            if i in st[sent]:
                fail(s, ins, f"micro-batch {i}'s {kind} was already sent")
            if blocking_sends and not at_matching_recv(s, ins):
                return False                       # wait for the receiver
            st[sent].add(i)
            channel(s, peer, kind).append((i, clock[s]))
            messages.append((s, peer, kind, i))
        elif not isinstance(ins, ReduceTiedGrads):
            fail(s, ins, f"unknown instruction {type(ins).__name__}")
        pc[s] += 1
        return True

    while True:
        moved = False
        for s in range(p):
            while pc[s] < len(progs[s]) and step(s):
                moved = True
        if all(pc[s] == len(progs[s]) for s in range(p)):
            break
        if not moved:
            waiting = ", ".join(f"stage {s} at {progs[s][pc[s]]}" for s in range(p)
                                if pc[s] < len(progs[s]))
            raise ScheduleError(f"{name}, {p} stages, {m} micro-batches: deadlock ("
                                f"{'blocking' if blocking_sends else 'buffered'} sends): "
                                f"{waiting}")
    for s in range(p):
        st, every = state[s], set(range(m))
        if st["forwarded"] != every or st["backwarded"] != every:
            raise ScheduleError(f"{name}, {p} stages, {m} micro-batches: stage {s} forwarded "
                                f"{sorted(st['forwarded'])} and backwarded "
                                f"{sorted(st['backwarded'])}, not every micro-batch once")
    left = {k: list(q) for k, q in channels.items() if q}
    if left:
        raise ScheduleError(f"{name}, {p} stages, {m} micro-batches: messages sent but never "
                            f"received: {left}")
    return Simulation(p, m, spans, peak, messages)


# ----------------------------------------------------------------------------- the timetable
def timetable(schedule, num_stages: int, num_micro_batches: int, forward_time: int = 1,
              backward_time: int = 1) -> str:
    """Which stage (rank) works on which micro-batch when, as text: one row per stage, one
    column per time unit, ``F3`` a forward and ``B3`` a backward of micro-batch 3 (a
    backward of 2 units shows as ``B3 B3``), ``.`` while the stage waits. Then the bubble
    predicted by (p - 1) / (m + p - 1) and each stage's idle share in this timetable, and
    the most micro-batches each stage holds activations for."""
    fn = get_schedule(schedule)
    sim = simulate(fn, num_stages, num_micro_batches, forward_time, backward_time)
    width = int(round(sim.makespan))
    cell = max(3, len(str(num_micro_batches - 1)) + 2)
    head = "time     " + "".join(f"{t:<{cell}}" for t in range(width))
    rows = [f"{schedule_name(fn)}: {num_stages} stages, {num_micro_batches} "
            f"micro-batches (forward {forward_time}, backward {backward_time} time unit"
            f"{'s' if backward_time != 1 else ''})", head.rstrip()]
    for s in range(num_stages):
        cells = ["."] * width
        for start, end, ins in sim.spans[s]:
            for t in range(int(start), int(end)):
                cells[t] = str(ins)
        rows.append(f"stage {s:<3}" + "".join(f"{c:<{cell}}" for c in cells).rstrip())
    p, m = num_stages, num_micro_batches
    rows.append(f"bubble: predicted (p-1)/(m+p-1) = {p - 1}/{m + p - 1} = "
                f"{predicted_bubble(p, m):.1%}; idle per stage here: "
                + " ".join(f"{sim.idle(s):.1%}" for s in range(p)))
    rows.append("activations held at most (micro-batches) per stage: "
                + " ".join(str(k) for k in sim.peak_in_flight))
    return "\n".join(rows)
