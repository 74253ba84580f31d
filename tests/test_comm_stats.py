"""parallel.comm's accounting (CommStats, record_comm): the seconds a rank spends blocked in
communication, per kind, with calls and bytes. In one process over communicators that take
a known time (SlowComm), and on 2 real ranks under mpiexec (tests/mpi/comm_stats.py), where
one rank makes the other wait a known time."""
import time

import numpy as np
import pytest

from mpi_launch import needs_mpi, result_of
from parallel import comm as comm_mod
from parallel.comm import KINDS, CommStats, Group, SelfComm, comm_stats, record_comm

DELAY = 0.05


class SlowComm(SelfComm):
    """One rank whose every blocking call takes DELAY seconds, whose non-blocking calls
    complete DELAY seconds after they start (as if the network moved the data meanwhile),
    and whose point-to-point calls talk to itself."""

    def __init__(self):
        self.sent = []

    def _slow(self):
        time.sleep(DELAY)

    def Allreduce(self, sendbuf, recvbuf, op=SelfComm.SUM):
        self._slow()

    def Reduce_scatter_block(self, sendbuf, recvbuf, op=SelfComm.SUM):
        self._slow()
        recvbuf[...] = sendbuf[:recvbuf.size]

    def Allgather(self, sendbuf, recvbuf):
        self._slow()
        recvbuf[:sendbuf.size] = sendbuf

    def Bcast(self, buf, root=0):
        self._slow()

    def Barrier(self):
        self._slow()

    def Send(self, buf, dest, tag=0):
        self._slow()
        self.sent.append(buf.copy())

    def Recv(self, buf, source, tag=0):
        self._slow()
        buf[...] = self.sent.pop(0)

    def _later(self):
        done_at = time.perf_counter() + DELAY

        class Later:
            def Wait(self):
                time.sleep(max(0.0, done_at - time.perf_counter()))

            def Test(self):
                time.sleep(0.002)                  # MPI's progress engine at work
                return time.perf_counter() >= done_at
        return Later()

    def Iallreduce(self, sendbuf, recvbuf, op=SelfComm.SUM):
        return self._later()

    def Isend(self, buf, dest, tag=0):
        self.sent.append(buf.copy())
        return self._later()


def slow_group():
    return Group(SlowComm(), "slow", mpi=SelfComm)


# ----------------------------------------------------------------------------- off by default
def test_recording_is_off_by_default_and_times_nothing(monkeypatch):
    class NoClock:
        @staticmethod
        def perf_counter():
            raise AssertionError("a Group timed a call while recording was off")
    monkeypatch.setattr(comm_mod, "time", NoClock)
    assert comm_stats() is None
    g = Group(SelfComm(), "self")
    a = np.arange(4.0)
    g.all_reduce(a)
    g.all_reduce(a, async_op=True).wait()
    assert g.all_reduce(a, async_op=True).test()
    g.broadcast(a)
    g.all_gather(a, np.empty(4))
    g.reduce_scatter(a, np.empty(4))
    g.barrier()
    assert comm_stats() is None


# ----------------------------------------------------------------------------- what it records
def test_every_kind_is_counted_with_its_calls_and_bytes():
    g = slow_group()
    a = np.zeros(10, np.float64)                            # 80 bytes
    with record_comm() as st:
        g.all_reduce(a)
        g.all_reduce_scalar(1.0)                            # 8 bytes more
        g.reduce_scatter(np.zeros(6, np.float32), np.empty(6, np.float32))
        g.all_gather(np.zeros(3, np.int64), np.empty(3, np.int64))
        g.broadcast(a)
        g.barrier()
        g.send(np.ones(5, np.float32), dest=0)
        got = np.empty(5, np.float32)
        g.recv(got, source=0)
    assert np.all(got == 1)
    assert st.calls == {"all_reduce": 2, "reduce_scatter": 1, "all_gather": 1, "broadcast": 1,
                        "send": 1, "recv": 1, "barrier": 1, "wait": 0}
    assert st.bytes == {"all_reduce": 88, "reduce_scatter": 24, "all_gather": 24,
                        "broadcast": 80, "send": 20, "recv": 20, "barrier": 0, "wait": 0}
    for kind, n in st.calls.items():
        assert n * DELAY <= st.seconds[kind] < n * DELAY + 0.25, (kind, st.seconds[kind])
    assert st.total_seconds == pytest.approx(sum(st.seconds.values()))
    d = st.as_dict()
    assert set(d["seconds"]) == set(KINDS) and d["total_seconds"] == st.total_seconds
    assert "all_reduce" in repr(st) and "wait" not in repr(st)
    st.reset()
    assert st.total_seconds == 0 and not any(st.calls.values())


def test_a_non_blocking_operation_counts_only_the_wait_it_did_not_hide():
    g = slow_group()
    a = np.zeros(100, np.float32)
    with record_comm() as waited_at_once:
        g.all_reduce(a, async_op=True).wait()
    with record_comm() as hidden:
        req = g.all_reduce(a, async_op=True)
        time.sleep(DELAY + 0.03)                            # compute while MPI moves it
        req.wait()
    for st in (waited_at_once, hidden):
        assert st.calls["all_reduce"] == 1 and st.bytes["all_reduce"] == 400
        assert st.seconds["all_reduce"] < 0.02              # starting it returns at once
        assert st.calls["wait"] == 1
    assert waited_at_once.seconds["wait"] >= DELAY - 0.005
    assert hidden.seconds["wait"] < 0.02                    # it was done when waited for
    assert hidden.total_seconds < waited_at_once.total_seconds


def test_polling_with_test_is_time_in_communication():
    g = slow_group()
    with record_comm() as st:
        req = g.all_reduce(np.zeros(3), async_op=True)
        polls = 0
        while not req.test():
            polls += 1
        polls += 1
        req.wait()                                         # done already: not a call
        assert req.test()                                  # nor is this
    assert st.calls["wait"] == polls
    assert st.seconds["wait"] >= DELAY - 0.005


def test_isend_counts_its_bytes_when_started_and_its_wait_when_waited():
    g = slow_group()
    with record_comm() as st:
        req = g.isend(np.ones(8, np.float64), dest=0)
        req.wait()
    assert st.calls["send"] == 1 and st.bytes["send"] == 64 and st.seconds["send"] < 0.02
    assert st.calls["wait"] == 1 and st.seconds["wait"] >= DELAY - 0.005


# ----------------------------------------------------------------------------- scope
def test_split_groups_report_into_the_same_stats():
    g = slow_group()
    sub = g.split(0, 0, "sub")
    subsub = sub.split(0, 0, "subsub")
    with record_comm() as st:
        g.all_reduce(np.zeros(2))
        sub.all_reduce(np.zeros(2))
        subsub.broadcast(np.zeros(2))
    assert st.calls["all_reduce"] == 2 and st.calls["broadcast"] == 1


def test_blocks_nest_restore_and_a_given_stats_keeps_adding():
    g = slow_group()
    mine = CommStats()
    with record_comm(mine) as st:
        assert st is mine and comm_stats() is mine
        g.barrier()
        with record_comm() as inner:
            g.barrier()
            g.barrier()
        assert comm_stats() is mine
        g.barrier()
    assert comm_stats() is None
    g.barrier()                                            # recorded nowhere
    with record_comm(mine):
        g.barrier()
    assert mine.calls["barrier"] == 3 and inner.calls["barrier"] == 2
    with pytest.raises(RuntimeError):
        with record_comm():
            raise RuntimeError("boom")
    assert comm_stats() is None


# ----------------------------------------------------------------------------- 2 ranks
@needs_mpi
def test_on_two_ranks_the_rank_that_waits_for_its_partner_is_the_one_charged():
    """Rank 1 sleeps before each operation: rank 0 waits that long in the all-reduce, the
    receive and the wait on a non-blocking all-reduce; rank 1, arriving last, hardly at all."""
    r = result_of(2, "comm_stats.py")
    late = r["late"]                       # how long rank 1 made rank 0 wait, each time
    first, last = r["ranks"]
    for kind in ("all_reduce", "recv", "wait"):
        assert first["seconds"][kind] >= 0.8 * late, (kind, first)
        assert last["seconds"][kind] < 0.5 * late, (kind, last)
    assert first["bytes"]["recv"] == last["bytes"]["send"] == 8 * 2 ** 17
    # 3 all-reduces (one started non-blocking), the first on a group split from the world
    assert first["calls"]["all_reduce"] == last["calls"]["all_reduce"] == 3
    assert first["bytes"]["all_reduce"] == 3 * 8000
