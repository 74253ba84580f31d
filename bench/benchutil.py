"""Helpers for benchmarking on a small shared machine (Linux only; from the team's
../shared/bench/benchutil.py).

The machine has 2 cores and other sessions may run work on it at the same time, which
silently halves a 2-thread benchmark. CpuMonitor measures how much CPU *other* processes
used while a benchmark ran (system-wide busy time from /proc/stat minus this process's own
CPU time), so a contaminated run can be flagged instead of trusted.
"""
import os
import resource
import sys
import time

_HZ = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _proc_stat():
    """(busy CPU-seconds, stolen CPU-seconds) machine-wide since boot; zeros off Linux."""
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
    except OSError:
        return 0.0, 0.0
    # user nice system idle iowait irq softirq steal guest guest_nice
    idle = v[3] + v[4]
    steal = v[7] if len(v) > 7 else 0
    return (sum(v[:8]) - idle - steal) / _HZ, steal / _HZ


def _own_cpu():
    s = resource.getrusage(resource.RUSAGE_SELF)
    c = resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime


class CpuMonitor:
    """with CpuMonitor() as m: ...; then m.other_cores = average number of cores kept busy
    by other processes during the block (0 = quiet, 1 = one of two cores was taken)."""

    def __enter__(self):
        self.t0 = time.perf_counter()
        self.busy0, self.steal0 = _proc_stat()
        self.own0 = _own_cpu()
        return self

    def __exit__(self, *exc):
        self.wall = max(time.perf_counter() - self.t0, 1e-9)
        busy1, steal1 = _proc_stat()
        own1 = _own_cpu()
        self.other_cores = max(0.0, (busy1 - self.busy0) - (own1 - self.own0)) / self.wall
        self.steal_cores = (steal1 - self.steal0) / self.wall
        self.own_cores = (own1 - self.own0) / self.wall
        return False


def wait_for_quiet(threshold=0.15, window=1.0, max_wait=120.0):
    """Block until other processes use < threshold cores over `window` seconds (or max_wait
    passes). Returns the last measured other-process load."""
    t_end = time.perf_counter() + max_wait
    while True:
        with CpuMonitor() as m:
            time.sleep(window)
        if m.other_cores < threshold or time.perf_counter() > t_end:
            return m.other_cores


def peak_rss_mb() -> float:
    """This process's peak resident set size so far (ru_maxrss is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def time_plain_steps(model, batches, warmup: int) -> tuple[float, float]:
    """One process's baseline for the parallel benchmarks: median seconds of forward +
    backward and of the whole step (clip, AdamW) over ``batches`` of (x, y) arrays, after
    ``warmup`` untimed steps."""
    import numpy as np

    import tensorlite as tl
    from nn.optim import AdamW, clip_grad_norm_
    opt = AdamW(model.parameters(), lr=1e-4)
    fb, step = [], []
    for i, (x, y) in enumerate(batches):
        t0 = time.perf_counter()
        _, loss = model(tl.tensor(x), tl.tensor(y))
        loss.backward()
        t1 = time.perf_counter()
        clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        t2 = time.perf_counter()
        if i >= warmup:
            fb.append(t1 - t0)
            step.append(t2 - t0)
    return float(np.median(fb)), float(np.median(step))


def run_result(cmd, name: str, env=None, cwd=None, wait_quiet: float = 10.0):
    """Run one measurement ``cmd`` in a subprocess (after waiting up to ``wait_quiet`` s for
    the machine to go quiet) and return (the JSON its ``RESULT `` line printed, the cores
    other processes kept busy meanwhile: above ~0.3 on a 2-core machine, not to be trusted).
    A failed run ends the benchmark with its output."""
    import json
    import subprocess
    if wait_quiet > 0:
        wait_for_quiet(0.15, max_wait=wait_quiet)
    with CpuMonitor() as mon:
        p = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, env=env, timeout=1800)
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
    if p.returncode != 0 or not lines:
        raise SystemExit(f"{name}: {' '.join(cmd)} failed ({p.returncode}):\n{p.stdout}\n"
                         f"{p.stderr}")
    return json.loads(lines[0][len("RESULT "):]), mon.other_cores


def numba_missing(flag: str = "--jit") -> bool:
    """True (after saying so on stderr) when ``flag`` asks for tensorlite's compiled kernels
    and numba is not importable here."""
    from tensorlite import jit
    if jit.available():
        return False
    print(f"{flag}: numba is not installed here (pip install 'tensorlite[jit]')", file=sys.stderr)
    return True
