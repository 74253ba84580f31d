"""Pipeline parallelism on one machine: step time, and the bubble measured against
(p - 1) / (m + p - 1).

Run from the repository root (about a minute for the defaults on a quiet machine):

    python -m bench.bench_pp                          # tiny GPT, 2 stages, m = 2, 4, 8
    python -m bench.bench_pp --stages 4 --micro 4 8 16   # 4 ranks: oversubscribed on 2 cores

The driver (this process) runs, each in its own subprocess:

1. one process on the global batch, plain forward + backward + clip + AdamW, with all cores
   and with one rank's share of them (the baselines);
2. ``mpiexec -n P`` ranks, each holding one stage of the same GPT (parallel.build_stage),
   running every (schedule, m) in turn on the same global batch.

Each rank measures, per step, from the executor's trace (`PipelineExecutor.trace`: every
instruction with its start and end), over the schedule's span (first instruction to last):
``busy``, the time in Forward and Backward (and loading a micro-batch), the work one process
would do too; ``wait``, the time blocked in RecvActivation / RecvGrad, and in
ReduceTiedGrads (where the last stage waits while the first drains). The measured bubble
of a rank is 1 - busy / span: the share of the schedule it was not computing (waiting for a
neighbour, and the little that sending costs). The table shows each rank's median over the
timed steps, and the forward-backward and step times of the slowest rank.

A table is printed; ``--json`` keeps the raw numbers.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

CONFIGS = {
    "tiny": dict(vocab_size=256, n_layer=4, n_head=4, d_model=128, block_size=128, batch=16),
    "small": dict(vocab_size=4096, n_layer=6, n_head=6, d_model=384, block_size=256, batch=8),
}
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "mpi"))      # pp_gpt: the GPT as pipeline pieces


# ----------------------------------------------------------------------------- workers
def _model(cfg, seed=0):
    import tensorlite as tl
    from gpt.model import GPT, GPTConfig
    tl.manual_seed(seed)
    return GPT(GPTConfig(**{k: v for k, v in cfg.items() if k != "batch"}))


def _batches(cfg, n, seed=0):
    rng = np.random.default_rng(seed)
    shape = (cfg["batch"], cfg["block_size"])
    return [(rng.integers(0, cfg["vocab_size"], shape), rng.integers(0, cfg["vocab_size"], shape))
            for _ in range(n)]


def worker_single(cfg, steps, warmup, threads) -> dict:
    """One process, the whole global batch: forward + backward, and the whole step."""
    import tensorlite as tl
    from bench.benchutil import time_plain_steps
    tl.set_num_threads(threads)
    fb, step = time_plain_steps(_model(cfg), _batches(cfg, warmup + steps), warmup)
    return {"threads": tl.get_num_threads(), "fb": fb, "step": step}


def worker_pp(cfg, steps, warmup, micro, schedules) -> dict:
    """One stage per rank; every (schedule, m) on the same batches."""
    import parallel
    import tensorlite as tl
    from nn.optim import AdamW
    from parallel.schedule import (Backward, Forward, LoadMicroBatch, RecvActivation, RecvGrad,
                                   ReduceTiedGrads)
    from pp_gpt import gpt_pieces
    state = parallel.init_parallel(pp=parallel.world_group().size)
    pp = state.pp
    out = {"threads": tl.get_num_threads(), "runs": []}
    # waiting for a neighbour: in a receive, or (the last stage, while the first drains) in
    # the tied embedding's all-reduce
    work, recv = (Forward, Backward, LoadMicroBatch), (RecvActivation, RecvGrad, ReduceTiedGrads)
    for schedule in schedules:
        for m in micro:
            model = _model(cfg)
            first, blocks, last, tied = gpt_pieces(model)
            stage = parallel.build_stage(first, blocks, last, pp.rank, pp.size)
            pipe = parallel.PipelineExecutor(stage, pp, schedule, m, tied)
            opt = AdamW(stage.parameters(), lr=1e-4)
            rec = {k: [] for k in ("fb", "step", "idle", "wait", "f", "b")}
            pp.barrier()
            for i, (x, y) in enumerate(_batches(cfg, warmup + steps)):
                t0 = time.perf_counter()
                pipe.forward_backward(x, y)
                t1 = time.perf_counter()
                pipe.clip_grad_norm_(1.0)
                opt.step()
                opt.zero_grad()
                t2 = time.perf_counter()
                if i < warmup:
                    continue
                dur = [(ins, end - start) for ins, start, end in pipe.trace]
                rec["fb"].append(t1 - t0)
                rec["step"].append(t2 - t0)
                fb = pipe.trace[-1][2]                 # the schedule, as the trace saw it
                rec["idle"].append(1 - sum(d for ins, d in dur if isinstance(ins, work)) / fb)
                rec["wait"].append(sum(d for ins, d in dur if isinstance(ins, recv)) / fb)
                rec["f"].append(np.median([d for ins, d in dur if isinstance(ins, Forward)]))
                rec["b"].append(np.median([d for ins, d in dur if isinstance(ins, Backward)]))
            mine = np.array([np.median(rec[k]) for k in ("fb", "step", "idle", "wait", "f", "b")]
                            + [pipe.peak_in_flight], np.float64)
            every = np.empty(mine.size * pp.size, np.float64)
            pp.all_gather(mine, every)
            every = every.reshape(pp.size, -1)
            out["runs"].append({"schedule": schedule, "m": m, **{
                k: every[:, j].tolist() for j, k in enumerate(
                    ("fb", "step", "idle", "wait", "f", "b", "peak"))}})
    return out


# ----------------------------------------------------------------------------- driver
def _run(cmd, wait_quiet=10.0) -> dict:
    """Run one measurement in a subprocess; ``others``: cores other processes kept busy
    meanwhile (the machine is shared: a run with others > 0.3 is not to be trusted)."""
    from bench.benchutil import run_result
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    result, others = run_result(cmd, "bench_pp", env=env, cwd=ROOT, wait_quiet=wait_quiet)
    return {**result, "others": others}


def _mpiexec() -> str:
    local = Path(sys.executable).parent / "mpiexec"
    return str(local) if local.exists() else "mpiexec"


def table(res: dict, cfg: dict) -> str:
    from parallel.schedule import predicted_bubble, schedule_name
    p = res["stages"]
    tokens = cfg["batch"] * cfg["block_size"]
    one, share = res["single_all_cores"], res["single_share"]
    pct = lambda xs: " ".join(f"{100 * v:.0f}" for v in xs)      # noqa: E731
    rows = ["| run | m | threads/rank | fwd+bwd ms | step ms | tokens/s | vs 1 process | "
            "bubble predicted | bubble measured, per stage | of it waiting for a neighbour | "
            "fwd / bwd ms per micro-batch, per stage | activations held | others' load |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---|---|---|---|---:|"]
    for name, r in (("1 process, all cores", one), ("1 process, a rank's share", share)):
        rows.append(f"| {name} | | {r['threads']} | {1e3 * r['fb']:.1f} | {1e3 * r['step']:.1f} "
                    f"| {tokens / r['step']:,.0f} | {one['step'] / r['step']:.2f}x | | | | | "
                    f"| {r['others']:.2f} |")
    pr = res["pp"]
    for run in pr["runs"]:
        m, fb, step = run["m"], run["fb"], max(run["step"])
        idle, wait = run["idle"], run["wait"]
        rows.append(
            f"| {schedule_name(run['schedule'])}, {p} stages | {m} | {pr['threads']} "
            f"| {1e3 * max(fb):.1f} | {1e3 * step:.1f} | {tokens / step:,.0f} "
            f"| {one['step'] / step:.2f}x | {100 * predicted_bubble(p, m):.0f} % "
            f"| {pct(idle)} % | {pct(wait)} % "
            f"| {' '.join(f'{1e3 * f:.1f}/{1e3 * b:.1f}' for f, b in zip(run['f'], run['b']))} "
            f"| {' '.join(str(int(k)) for k in run['peak'])} | {pr['others']:.2f} |")
    return "\n".join(rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--stages", type=int, default=2, help="pipeline stages = MPI ranks (2)")
    ap.add_argument("--config", choices=sorted(CONFIGS), default="tiny")
    ap.add_argument("--micro", type=int, nargs="+", default=[2, 4, 8],
                    help="numbers of micro-batches to run (each must divide the batch)")
    ap.add_argument("--schedules", nargs="+", default=["gpipe", "1f1b"])
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--json", help="write the raw numbers here")
    ap.add_argument("--wait-quiet", type=float, default=10.0,
                    help="before each run wait up to this many seconds for the machine to go "
                         "quiet (0: don't)")
    ap.add_argument("--worker", choices=["single", "pp"], help=argparse.SUPPRESS)
    ap.add_argument("--threads", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    cfg = CONFIGS[args.config]
    bad = [m for m in args.micro if cfg["batch"] % m]
    if bad:
        ap.error(f"--micro {bad}: the {args.config} batch of {cfg['batch']} cannot be cut into "
                 "that many equal micro-batches")
    if args.worker == "single":
        print("RESULT " + json.dumps(worker_single(cfg, args.steps, args.warmup, args.threads)))
        return 0
    if args.worker == "pp":
        r = worker_pp(cfg, args.steps, args.warmup, args.micro, args.schedules)
        if os.environ.get("PMI_RANK", "0") == "0":
            print("RESULT " + json.dumps(r), flush=True)
        return 0

    cores = len(os.sched_getaffinity(0))
    base = [sys.executable, "-m", "bench.bench_pp", "--config", args.config, "--steps",
            str(args.steps), "--warmup", str(args.warmup), "--micro", *map(str, args.micro),
            "--schedules", *args.schedules]
    res = {"config": args.config, "stages": args.stages, "cores": cores,
           "loadavg_before": os.getloadavg()[0]}
    res["single_all_cores"] = _run(base + ["--worker", "single", "--threads", str(cores)],
                                   args.wait_quiet)
    res["single_share"] = _run(base + ["--worker", "single", "--threads",
                                       str(max(1, cores // args.stages))], args.wait_quiet)
    res["pp"] = _run([_mpiexec(), "-n", str(args.stages)] + base + ["--worker", "pp"],
                     args.wait_quiet)
    res["loadavg_after"] = os.getloadavg()[0]
    print(f"{args.config} GPT ({cfg['n_layer']} layers), {args.stages} stages on {cores} cores, "
          f"global batch {cfg['batch']} x {cfg['block_size']} tokens, {args.steps} timed steps, "
          f"load average {res['loadavg_before']:.1f} -> {res['loadavg_after']:.1f}\n")
    print(table(res, cfg))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
