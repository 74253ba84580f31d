"""Worker processes for `prepare`: tasks run on every core, results come back in order.

``with Workers(n) as pool: for result in pool.map(fn, tasks): ...`` runs ``fn(task)`` in
``n`` processes and yields the results *in the order of the tasks*, whatever order they
finish in: the consumer sees exactly the sequence one process would produce, so what it
writes is byte-identical for any ``n``. At most ``window`` tasks are in flight (submitted
and not yet consumed), so a slow task holds back at most ``window`` finished results in
memory, not the whole corpus.

``n == 1`` runs the tasks in this process (no pool, no pickling), which is also what a
single task does: a small corpus never pays for starting processes. The processes start
once per `Workers` (before any progress bar's thread) and are reused for every map. They
are forked on Linux (quick, and a user's script needs no ``if __name__ == "__main__"``
guard), and started fresh ("spawn") under MPI, whose state must not be forked, and on
systems without fork.
"""

from __future__ import annotations

import os
from collections import deque
from typing import Callable, Iterable, Iterator


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity), at least 1."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def _ignore_interrupts() -> None:
    """In a worker: Ctrl-C is the main process's to handle (it stops the pool); a worker
    printing its own KeyboardInterrupt traceback would only bury the one-line message."""
    import signal
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class Workers:
    def __init__(self, n: int, window: int | None = None, fork: bool = True):
        self.n = int(n)
        self.window = window or 2 * self.n
        self.fork = fork
        self._pool = None

    def _executor(self):
        if self._pool is None:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            fork = self.fork and "fork" in multiprocessing.get_all_start_methods()
            self._pool = ProcessPoolExecutor(self.n, mp_context=multiprocessing.get_context(
                "fork" if fork else "spawn"), initializer=_ignore_interrupts)
            self._pool.submit(os.getpid).result()  # start the processes now
        return self._pool

    def start(self, n_tasks: int) -> None:
        """Start the processes now if `map` will use them for ``n_tasks`` tasks (call it
        before starting threads: a forked process gets none of them, nor their locks)."""
        if self.n > 1 and n_tasks > 1:
            self._executor()

    def map(self, fn: Callable, tasks: Iterable, n_tasks: int | None = None) -> Iterator:
        """``fn(task)`` for each task, yielded in task order. Several tasks go to the
        processes only when there are several (``n_tasks``, if known, says so up front)."""
        if self.n == 1 or (n_tasks is not None and n_tasks <= 1):
            for task in tasks:
                yield fn(task)
            return
        pool = self._executor()
        pending: deque = deque()
        for task in tasks:
            pending.append(pool.submit(fn, task))
            if len(pending) >= self.window:
                yield pending.popleft().result()  # the oldest first: task order, not finish order
        while pending:
            yield pending.popleft().result()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def __enter__(self) -> "Workers":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
