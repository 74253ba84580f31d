"""Data parallelism on one machine: what it costs and what it hides.

Run from the repository root (a few tens of seconds for tiny):

    python -m bench.bench_dp                       # 2 ranks, the tiny GPT
    python -m bench.bench_dp --ranks 2 --config small --steps 6

The driver (this process) runs, each in its own subprocess so nothing is shared:

1. one process on the per-rank batch, with all cores and with one rank's share of them;
2. ``mpiexec -n R`` ranks, each on that batch (the global batch is R times larger), with
   MPICH's default progress (a non-blocking collective advances only inside MPI calls)
   and with ``MPIR_CVAR_ASYNC_PROGRESS=1`` (a progress thread in each rank).

Each rank measures, medians over the timed steps, the slowest rank's value:

* ``fb``: forward + backward alone (no communication: every micro-step in no_sync), the
  compute the communication could hide behind;
* the data-parallel step: forward + backward with the hooks (``poll_in_hooks`` off, then
  on), ``finish()``, clipping and the AdamW step;
* the bucketed all-reduce alone: every hook fired with no compute between, then finish(),
  and the buckets' ``MPI_Iallreduce`` alone on the filled buffers; both compared with one
  raw ``MPI_Allreduce`` of the same bytes (best of 30 repetitions each);
* hidden: 1 - (what is left of the all-reduce after the last rank's backward returns) /
  (the bucketed all-reduce alone), medians both: the share of the communication backward
  hid;
* a progress probe: one 32 MB ``MPI_Iallreduce`` started before 200 matrix products and
  waited for after them, with and without an ``MPI_Test`` between products: does MPI move
  it forward while the rank computes?

A table is printed; ``--json`` keeps the raw numbers.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

CONFIGS = {
    "tiny": dict(vocab_size=256, n_layer=4, n_head=4, d_model=128, block_size=128, batch=16),
    "small": dict(vocab_size=4096, n_layer=6, n_head=6, d_model=384, block_size=256, batch=8),
}
ROOT = Path(__file__).resolve().parent.parent


# ----------------------------------------------------------------------------- workers
def _model(cfg, seed=0):
    import tensorlite as tl
    from gpt.model import GPT, GPTConfig
    tl.manual_seed(seed)
    return GPT(GPTConfig(**{k: v for k, v in cfg.items() if k != "batch"}))


def _batches(cfg, n, seed):
    rng = np.random.default_rng(seed)
    shape = (cfg["batch"], cfg["block_size"])
    return [rng.integers(0, cfg["vocab_size"], shape) for _ in range(n)]


def worker_single(cfg, steps, warmup, threads) -> dict:
    """One process, the per-rank batch: forward + backward, and the whole step."""
    import tensorlite as tl
    from bench.benchutil import time_plain_steps
    tl.set_num_threads(threads)
    batches = ((x, x) for x in _batches(cfg, warmup + steps, 0))
    fb, step = time_plain_steps(_model(cfg), batches, warmup)
    return {"threads": threads, "fb": fb, "step": step}


def worker_dp(cfg, steps, warmup, bucket_mb) -> dict:
    import parallel
    import tensorlite as tl
    from nn.optim import AdamW, clip_grad_norm_
    state = parallel.init_parallel()
    g = state.dp
    model = _model(cfg)
    opt = AdamW(model.parameters(), lr=1e-4)
    dp = parallel.DataParallel(model, g, bucket_cap_mb=bucket_mb)
    batches = _batches(cfg, warmup + steps, 1 + g.rank)

    def slowest(xs, stat=np.median):   # over steps on each rank, then the slowest rank
        return g.all_reduce_scalar(float(stat(xs)), "max")

    # communication alone takes ~1 ms here, a scheduler hiccup as much: many repetitions,
    # and the best of them (what the machine can do), for the raw and the bucketed alike
    comm_reps = max(30, steps)

    def forward_backward(x):
        _, loss = model(tl.tensor(x), tl.tensor(x))
        loss.backward()

    out = {"ranks": g.size, "threads": tl.get_num_threads(), "buckets": len(dp.buckets),
           "grad_bytes": int(sum(p.data.nbytes for p in dp.params))}
    # compute alone: no hooks act inside no_sync
    times = []
    for i, x in enumerate(batches):
        g.barrier()
        t0 = time.perf_counter()
        with dp.no_sync():
            forward_backward(x)
        times.append(time.perf_counter() - t0)
        opt.zero_grad()
    out["fb"] = slowest(times[warmup:])
    # the data-parallel step, the hooks polling MPI or not. perf_counter is CLOCK_MONOTONIC,
    # one clock for every process on the machine, so ranks' timestamps compare directly.
    for poll in (False, True):
        dp.poll_in_hooks = poll
        fb, step, exposed, launched = [], [], [], []
        for i, x in enumerate(batches):
            g.barrier()
            t0 = time.perf_counter()
            forward_backward(x)
            t1 = time.perf_counter()
            dp.finish()
            t2 = time.perf_counter()
            clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad()
            t3 = time.perf_counter()
            # the all-reduce cannot end before the last rank's backward does: what is left
            # of it after that moment is what backward did not hide
            last_bwd, last_fin = g.all_reduce_scalar(t1, "max"), g.all_reduce_scalar(t2, "max")
            if i >= warmup:
                fb.append(t1 - t0)
                step.append(t3 - t0)
                exposed.append(last_fin - last_bwd)
                launched.append(dp.last_stats["first_launch_at_hook"])
        key = "poll" if poll else "nopoll"
        out[key] = {"fb": slowest(fb), "step": slowest(step), "exposed": slowest(exposed),
                    "first_launch_at_hook": int(np.median(launched)), "hooks": len(dp.params)}
    # the bucketed all-reduce alone: every hook at once (copy in, launch), wait, copy out
    dp.poll_in_hooks = False
    with dp.no_sync():
        forward_backward(batches[0])
    hooks, wait, copy_out = [], [], []
    for i in range(warmup + comm_reps):
        g.barrier()
        t0 = time.perf_counter()
        for p in reversed(dp.params):
            dp._on_grad(p)                 # what backward's hooks do, with no compute between
        t1 = time.perf_counter()
        for b in dp.buckets:
            b.request.wait()
        t2 = time.perf_counter()
        dp.finish()                        # only the averaging copy into .grad is left
        t3 = time.perf_counter()
        hooks.append(t1 - t0)
        wait.append(t2 - t1)
        copy_out.append(t3 - t2)
    totals = np.add(np.add(hooks, wait), copy_out)[warmup:]
    best = int(np.argmin(totals))                  # the best repetition, and its parts
    out["alone"] = {k: slowest([v[warmup + best]]) for k, v in
                    (("hooks", hooks), ("wait", wait), ("copy_out", copy_out))}
    out["alone_median"] = slowest(totals)      # what "left after backward" is compared with
    # the buckets' all-reduces alone, on the filled buffers: MPI's part of the above
    mpi_only = []
    for i in range(warmup + comm_reps):
        g.barrier()
        t0 = time.perf_counter()
        for r in [g.all_reduce(b.flat, async_op=True) for b in dp.buckets]:
            r.wait()
        mpi_only.append(time.perf_counter() - t0)
    out["buckets_iallreduce"] = slowest(mpi_only[warmup:], np.min)
    # one raw MPI_Allreduce of the same bytes, in place
    flat = np.zeros(out["grad_bytes"] // dp.params[0].data.itemsize, dp.params[0].dtype)
    raw = []
    for i in range(warmup + comm_reps):
        g.barrier()
        t0 = time.perf_counter()
        g.all_reduce(flat)
        raw.append(time.perf_counter() - t0)
    out["raw_allreduce"] = slowest(raw[warmup:], np.min)
    out["probe"] = progress_probe(g, warmup)
    return out


def progress_probe(g, warmup, mb=32, chunks=200, reps=5) -> dict:
    """Does a non-blocking all-reduce advance while the rank computes? Start an
    MPI_Iallreduce of ``mb`` MB, run ``chunks`` matrix products (no MPI calls; or, with
    polling, one MPI_Test after each), then wait: the wait is what computing did not hide.
    Compared with the same all-reduce waited for at once, and the same compute alone."""
    buf = np.ones(mb * 2 ** 20 // 4, np.float32)
    a = np.random.default_rng(0).standard_normal((256, 256)).astype(np.float32)

    def compute(req=None):
        for _ in range(chunks):
            a @ a
            if req is not None:
                req.test()

    def median(f):
        ts = []
        for i in range(warmup + reps):
            g.barrier()
            ts.append(f())
        return g.all_reduce_scalar(float(np.median(ts[warmup:])), "max")

    def timed(f):
        t0 = time.perf_counter()
        f()
        return time.perf_counter() - t0

    out = {"mb": mb, "compute": median(lambda: timed(compute)),
           "alone": median(lambda: timed(lambda: g.all_reduce(buf, async_op=True).wait()))}
    for poll in (False, True):
        comp, left = [], []
        for i in range(warmup + reps):
            g.barrier()
            t0 = time.perf_counter()
            req = g.all_reduce(buf, async_op=True)
            compute(req if poll else None)
            t1 = time.perf_counter()
            req.wait()
            t2 = time.perf_counter()
            comp.append(t1 - t0)
            # left after the last rank stopped computing (one clock for the machine's ranks)
            left.append(g.all_reduce_scalar(t2, "max") - g.all_reduce_scalar(t1, "max"))
        k = "poll" if poll else "nopoll"
        out[k] = {"compute": g.all_reduce_scalar(float(np.median(comp[warmup:])), "max"),
                  "wait": g.all_reduce_scalar(float(np.median(left[warmup:])), "max")}
    return out


# ----------------------------------------------------------------------------- driver
def _run(cmd, env=None, wait_quiet=10.0) -> dict:
    """Run one measurement in a subprocess; ``others``: cores other processes kept busy
    meanwhile (the machine is shared: a run with others > 0.3 is not to be trusted)."""
    from bench.benchutil import CpuMonitor, wait_for_quiet
    if wait_quiet > 0:
        wait_for_quiet(0.15, max_wait=wait_quiet)
    with CpuMonitor() as mon:
        p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT,
                           env={**os.environ, **(env or {})}, timeout=1800)
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
    if p.returncode != 0 or not lines:
        raise SystemExit(f"bench_dp: {' '.join(cmd)} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}")
    return {**json.loads(lines[0][len("RESULT "):]), "others": mon.other_cores}


def _mpiexec() -> str:
    local = Path(sys.executable).parent / "mpiexec"
    return str(local) if local.exists() else "mpiexec"


def table(res: dict, cfg: dict, ranks: int) -> str:
    tokens = cfg["batch"] * cfg["block_size"]
    one, share = res["single_all_cores"], res["single_share"]
    rows = ["| run | threads/rank | fwd+bwd ms | step ms | tokens/s | vs 1 process | all-reduce "
            "left after backward ms | hidden | first launch at hook | others' load |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in (("1 process, all cores", one), ("1 process, a rank's share", share)):
        rows.append(f"| {name} | {r['threads']} | {1e3 * r['fb']:.1f} | {1e3 * r['step']:.1f} "
                    f"| {tokens / r['step']:,.0f} | {one['step'] / r['step']:.2f}x | | | "
                    f"| {r['others']:.2f} |")
    for label, key in (("default progress", "dp"), ("ASYNC_PROGRESS=1", "dp_async")):
        d = res[key]
        alone = d["alone_median"]                  # medians against medians
        for poll in ("nopoll", "poll"):
            s = d[poll]
            rows.append(
                f"| DP {ranks} ranks, {label}, {'poll in hooks' if poll == 'poll' else 'no poll'} "
                f"| {d['threads']} | {1e3 * s['fb']:.1f} | {1e3 * s['step']:.1f} "
                f"| {ranks * tokens / s['step']:,.0f} | {one['step'] * ranks / s['step']:.2f}x "
                f"| {1e3 * s['exposed']:.2f} of {1e3 * alone:.2f} "
                f"| {100 * (1 - s['exposed'] / alone):.0f} % "
                f"| {s['first_launch_at_hook']} of {s['hooks']} | {d['others']:.2f} |")
    comm = ["| all-reduce of the gradients | buckets | MB | ms | GB/s (algbw) | vs raw |",
            "|---|---:|---:|---:|---:|---:|"]
    for label, key in (("default progress", "dp"), ("ASYNC_PROGRESS=1", "dp_async")):
        d, a = res[key], res[key]["alone"]
        mb = d["grad_bytes"] / 1e6
        for what, t in (("one raw MPI_Allreduce of the same bytes", d["raw_allreduce"]),
                        ("the buckets' MPI_Iallreduce + wait", d["buckets_iallreduce"]),
                        ("DataParallel: hooks (copy / N in), wait, finish",
                         a["hooks"] + a["wait"] + a["copy_out"])):
            comm.append(f"| {what}, {label} | {1 if 'raw' in what else d['buckets']} "
                        f"| {mb:.1f} | {1e3 * t:.2f} | {mb / 1e3 / t:.2f} "
                        f"| {100 * d['raw_allreduce'] / t:.0f} % |")
    probe = ["| progress probe: Iallreduce, then compute, then wait | MB | all-reduce alone ms "
             "| compute alone ms | compute with it in flight ms | wait after ms | hidden |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for label, key in (("default progress", "dp"), ("ASYNC_PROGRESS=1", "dp_async")):
        p = res[key]["probe"]
        for poll in ("nopoll", "poll"):
            q = p[poll]
            probe.append(f"| {label}, {'MPI_Test after each product' if poll == 'poll' else 'no MPI calls'} "
                         f"| {p['mb']} | {1e3 * p['alone']:.2f} | {1e3 * p['compute']:.1f} "
                         f"| {1e3 * q['compute']:.1f} | {1e3 * q['wait']:.2f} "
                         f"| {100 * (1 - q['wait'] / p['alone']):.0f} % |")
    return "\n".join(rows) + "\n\n" + "\n".join(comm) + "\n\n" + "\n".join(probe)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ranks", type=int, default=2, help="data-parallel ranks (default 2)")
    ap.add_argument("--config", choices=sorted(CONFIGS), default="tiny",
                    help="model size (default tiny)")
    ap.add_argument("--steps", type=int, default=10, help="timed steps per run (default 10)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first (default 2)")
    ap.add_argument("--bucket-mb", type=float, default=None,
                    help="bucket_cap_mb (default: 1 for tiny, 25 for small)")
    ap.add_argument("--json", help="write the raw numbers here")
    ap.add_argument("--wait-quiet", type=float, default=10.0,
                    help="before each run wait up to this many seconds for the machine to go "
                         "quiet (0: don't)")
    ap.add_argument("--worker", choices=["single", "dp"], help=argparse.SUPPRESS)
    ap.add_argument("--threads", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    cfg = CONFIGS[args.config]
    bucket_mb = args.bucket_mb or (1.0 if args.config == "tiny" else 25.0)
    if args.worker == "single":
        print("RESULT " + json.dumps(worker_single(cfg, args.steps, args.warmup, args.threads)))
        return 0
    if args.worker == "dp":
        r = worker_dp(cfg, args.steps, args.warmup, bucket_mb)
        if "PMI_RANK" not in os.environ or os.environ["PMI_RANK"] == "0":
            print("RESULT " + json.dumps(r), flush=True)
        return 0

    cores = len(os.sched_getaffinity(0))
    base = [sys.executable, "-m", "bench.bench_dp", "--config", args.config, "--steps",
            str(args.steps), "--warmup", str(args.warmup), "--bucket-mb", str(bucket_mb)]
    res = {"config": args.config, "ranks": args.ranks, "bucket_mb": bucket_mb,
           "cores": cores, "loadavg_before": os.getloadavg()[0]}
    res["single_all_cores"] = _run(base + ["--worker", "single", "--threads", str(cores)],
                                   wait_quiet=args.wait_quiet)
    res["single_share"] = _run(base + ["--worker", "single", "--threads",
                                       str(max(1, cores // args.ranks))], wait_quiet=args.wait_quiet)
    mpi = [_mpiexec(), "-n", str(args.ranks)]
    for key, env in (("dp", {}), ("dp_async", {"MPIR_CVAR_ASYNC_PROGRESS": "1"})):
        res[key] = _run(mpi + base + ["--worker", "dp"], env, args.wait_quiet)
    res["loadavg_after"] = os.getloadavg()[0]
    print(f"{args.config} GPT, {args.ranks} ranks on {cores} cores, per-rank batch "
          f"{cfg['batch']} x {cfg['block_size']} tokens, bucket_cap_mb {bucket_mb}, "
          f"load average {res['loadavg_before']:.1f} -> {res['loadavg_after']:.1f}\n")
    print(table(res, cfg, args.ranks))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
