"""Every parallel layout of `tensorlite-gpt train` on one machine: step time, and where each
rank's step goes: blocked in communication, idle in the pipeline bubble, computing.

Run from the repository root (about two minutes for the defaults on a quiet machine):

    python bench/bench_layouts.py                      # 1 process, then 2 and 4 ranks
    python bench/bench_layouts.py --ranks 2 --steps 6 --json layouts.json

What runs is what the command runs: each layout builds `gpt.train.Trainer` from a
`TrainConfig` (the same model, seed and global batch, on a small data folder prepared in a
temporary directory with the byte tokenizer) and calls its ``train_step()``: forward_backward,
reduce_gradients, clip, optimizer_step, the layout's own versions of each. The driver (this
process) runs, each in its own subprocess:

1. one process with tensorlite's default threads (all cores), and with one thread;
2. for each --ranks R, ``mpiexec -n R`` running every layout of R ranks in turn (a new
   Trainer each), each rank's thread pool sized as the command sizes it (cores / local ranks,
   unless --threads or TENSORLITE_NUM_THREADS says otherwise).

Each rank measures every timed step (a barrier first, so the ranks start it together):

* the step's wall time (``train_step``) and its four parts;
* ``comm``: the seconds the rank was blocked in communication (`parallel.record_comm`: the
  blocking collectives and receives, and the waits and tests of non-blocking ones, not the
  part of them that overlapped the rank's own work), per kind, with the calls and the bytes
  handed to MPI;
* pipeline layouts, from the executor's trace (`PipelineExecutor.trace`): ``busy``, the time in
  Forward, Backward and LoadMicroBatch instructions, and the schedule's span (first
  instruction to last). The measured bubble is 1 - busy / span, the share of the schedule the
  stage was not computing, set next to the predicted (p - 1) / (m + p - 1) (m = --grad-accum).

So that the shares of a step add up, each second is counted once: **bubble** = span - busy
(the stage waits for a neighbour in a receive, or in the tied embedding's all-reduce, while it
is idle); **comm** = the communication outside that idle time (data-parallel all-reduces,
ZeRO's reduce-scatter and all-gather, the gradient norm's all-reduces, tensor parallelism's
all-reduces inside Forward and Backward, the loss broadcast); **compute** = the rest. Each
share is a rank's median over the steps; the table gives the max and mean over ranks of the
communication share, and means over ranks of the others.

``others' load``: the cores other processes kept busy meanwhile (`bench.benchutil.CpuMonitor`):
on a 2-core machine a run with more than ~0.15 is not to be trusted. With ``--repeats R``
everything runs R times, interleaved, and the medians are over the timed steps of the repeats
during which others used under 0.15 cores (all of them if none was that quiet; the table says
how many were kept). A markdown table is printed; ``--json`` keeps every rank's every step.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:                 # run as a script: bench/ is not a package then
    sys.path.insert(0, str(ROOT))

# ranks -> the layouts of `tensorlite-gpt train` on that many ranks (each tested equal to one
# process in tests/test_parallel_train.py); a pipeline without --pp-schedule runs 1F1B
LAYOUTS = {
    1: [{}],
    2: [dict(dp=2), dict(dp=2, zero=1), dict(tp=2), dict(pp=2, pp_schedule="gpipe"),
        dict(pp=2, pp_schedule="1f1b")],
    4: [dict(dp=4), dict(dp=2, tp=2), dict(tp=2, pp=2), dict(dp=2, pp=2),
        dict(dp=2, tp=2, zero=1), dict(dp=2, pp=2, zero=1)],
}
QUIET = 0.15          # other processes' cores below which a run counts as undisturbed
PARTS = ("forward_backward", "reduce_gradients", "clip", "optimizer_step")
CORPUS = ("textwrap.py", "shlex.py", "fnmatch.py", "glob.py", "argparse.py")


def flags(layout: dict) -> str:
    """A layout as the command's options: {'dp': 2, 'zero': 1} -> '--dp 2 --zero 1'."""
    return " ".join(f"--{k.replace('_', '-')} {v}" for k, v in layout.items()) or "1 process"


# ----------------------------------------------------------------------------- workers
def _kinds():
    from parallel.comm import KINDS
    return KINDS


def fields() -> list:
    """What each rank records per timed step, in this order (seconds unless said)."""
    return (["step", *PARTS, "comm", "comm_in_bubble", "busy", "span", "loss"]
            + [f"s_{k}" for k in _kinds()] + [f"bytes_{k}" for k in _kinds()]
            + [f"calls_{k}" for k in _kinds()])


def _pipeline_comm(pipe, stats) -> dict:
    """Wrap the executor's instruction table so that each step tells how much communication
    ran inside the work instructions (tensor parallelism's all-reduces in Forward/Backward)
    and between the schedule's first and last instruction."""
    from parallel.schedule import Backward, Forward, LoadMicroBatch
    acc = {"in_work": 0.0, "first": None, "last": 0.0}

    def counted(run, work):
        def instruction(micro):
            c0 = stats.total_seconds
            if acc["first"] is None:
                acc["first"] = c0
            run(micro)
            acc["last"] = stats.total_seconds
            if work:
                acc["in_work"] += acc["last"] - c0
        return instruction
    work = (Forward, Backward, LoadMicroBatch)
    for kind, run in list(pipe._table.items()):
        pipe._table[kind] = counted(run, kind in work)
    return acc


def measure(trainer, world, warmup: int, steps: int) -> np.ndarray:
    """(steps, fields) of this rank: ``train_step()`` after ``warmup`` untimed ones."""
    from parallel.comm import CommStats, record_comm
    from parallel.schedule import Backward, Forward, LoadMicroBatch
    kinds = _kinds()
    parts = {}

    def timed(name, run):
        def part(*a, **k):
            t0 = time.perf_counter()
            out = run(*a, **k)
            parts[name] = time.perf_counter() - t0
            return out
        return part
    for name in PARTS:                  # the instance's attribute wins over the method
        setattr(trainer, name, timed(name, getattr(trainer, name)))
    stats = CommStats()
    pipe = trainer.pipe
    acc = _pipeline_comm(pipe, stats) if pipe is not None else None
    rows = []
    for i in range(warmup + steps):
        if world is not None:
            world.barrier()
        parts.clear()
        if acc is not None:
            acc.update(in_work=0.0, first=None, last=0.0)
        stats.reset()
        with record_comm(stats):
            t0 = time.perf_counter()
            loss, _ = trainer.train_step()
            step = time.perf_counter() - t0
        trainer.step += 1
        busy = span = in_bubble = 0.0
        if pipe is not None:
            busy = sum(end - start for ins, start, end in pipe.trace
                       if isinstance(ins, (Forward, Backward, LoadMicroBatch)))
            span = pipe.trace[-1][2] - pipe.trace[0][1]
            in_bubble = acc["last"] - acc["first"] - acc["in_work"]
        if i >= warmup:
            rows.append([step, *(parts.get(p, 0.0) for p in PARTS), stats.total_seconds,
                         in_bubble, busy, span, loss, *(stats.seconds[k] for k in kinds),
                         *(stats.bytes[k] for k in kinds), *(stats.calls[k] for k in kinds)])
    return np.array(rows, np.float64)


def worker(args) -> list:
    """Every layout of this world's size, in turn; rank 0 returns the results (others [])."""
    import parallel
    import tensorlite as tl
    from gpt.config import TrainConfig
    from gpt.train import Trainer
    size = args.world
    world = parallel.world_group() if size > 1 else None
    if world is not None and world.size != size:
        raise SystemExit(f"bench_layouts: the worker for {size} ranks was started on {world.size}")
    model = {k: getattr(args, k) for k in ("n_layer", "n_head", "d_model", "block_size")
             if getattr(args, k) is not None}
    out = []
    for i, layout in enumerate(LAYOUTS[size]):
        cfg = TrainConfig.from_dict(dict(
            data=args.data, out=str(Path(args.tmp) / f"run-{size}-{i}"), preset=args.preset,
            batch_size=args.batch_size, grad_accum=args.grad_accum,
            max_steps=args.warmup + args.steps, samples=0, progress=False, ckpt_minutes=0.0,
            seed=1337, dtype="float32", bucket_mb=args.bucket_mb, **model, **layout))
        trainer = Trainer(cfg, say=lambda *a, **k: None)
        rows = measure(trainer, world, args.warmup, args.steps)
        par = trainer.par
        me = np.array(([par.dp.rank, par.tp.rank, par.pp.rank] if par else [0, 0, 0])
                      + [tl.get_num_threads()], np.float64)
        if world is not None:         # every rank's numbers to every rank (buffer-based)
            every = np.empty((size,) + rows.shape, np.float64)
            world.all_gather(rows, every.reshape(-1))
            coords = np.empty((size, me.size), np.float64)
            world.all_gather(me, coords.reshape(-1))
        else:
            every, coords = rows[None], me[None]
        out.append({"layout": flags(layout), "options": layout, "ranks": size,
                    "pp_schedule": cfg.parallel.pp_schedule if cfg.parallel.pp > 1 else None,
                    "coords": coords[:, :3].astype(int).tolist(),
                    "threads": coords[:, 3].astype(int).tolist(),
                    "params": trainer.n_params, "fields": fields(),
                    "per_rank": every.tolist()})
        del trainer
        gc.collect()
    return out if world is None or world.rank == 0 else []


# ----------------------------------------------------------------------------- summary
def summarize(run: dict, grad_accum: int) -> dict:
    """The table's numbers from every rank's every step."""
    from parallel.schedule import predicted_bubble
    f = run["fields"]
    a = np.array(run["per_rank"], np.float64)              # (ranks, steps, fields)
    col = lambda k: a[:, :, f.index(k)]                    # noqa: E731  (ranks, steps)
    step, comm, span = col("step"), col("comm"), col("span")
    idle = np.where(span > 0, span - col("busy"), 0.0)
    comm_out = comm - col("comm_in_bubble")               # communication outside the bubble
    med = lambda x: np.median(x, axis=1)                   # noqa: E731  over steps, per rank
    comm_share, bubble_share = med(comm_out / step), med(idle / step)
    compute_share = med(1.0 - (comm_out + idle) / step)
    s = {"step_ms": 1e3 * float(np.median(step.max(axis=0))),   # the slowest rank's step
         "comm_share": {"max": float(comm_share.max()), "mean": float(comm_share.mean()),
                        "per_rank": comm_share.tolist()},
         "bubble_share_of_step": float(bubble_share.mean()),
         "compute_share": float(compute_share.mean()),
         "parts_ms": {p: 1e3 * float(med(col(p)).mean()) for p in PARTS},
         "comm_ms": {k: 1e3 * float(med(col(f"s_{k}")).mean()) for k in _kinds()},
         "comm_mb": {k: float(med(col(f"bytes_{k}")).mean()) / 1e6 for k in _kinds()},
         "comm_calls": {k: float(med(col(f"calls_{k}")).mean()) for k in _kinds()},
         "loss": float(col("loss")[0, -1])}
    p = run["options"].get("pp", 1)
    if p > 1:
        stage = np.array([c[2] for c in run["coords"]])
        of_schedule = med(idle / span)
        s["bubble"] = {"predicted": predicted_bubble(p, grad_accum),
                       "per_stage": [float(of_schedule[stage == k].mean()) for k in range(p)],
                       "per_rank": of_schedule.tolist()}
    return s


def table(res: dict) -> str:
    tokens = res["tokens_per_step"]
    base = res["runs"][0]["summary"]["step_ms"]
    pct = lambda v: f"{100 * v:.0f} %"                     # noqa: E731
    rows = ["| layout | ranks | threads/rank | step ms | tokens/s | vs 1 process | comm, max / "
            "mean over ranks | bubble predicted | bubble measured, per stage | bubble, of the "
            "step | compute | loss, last step | others' load |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|"]
    for r in res["runs"]:
        s = r["summary"]
        name = r["layout"] + (f" ({r['pp_schedule']})" if r["pp_schedule"] and
                              "pp-schedule" not in r["layout"] else "")
        b = s.get("bubble")
        rows.append(
            f"| {name} | {r['ranks']} | {'/'.join(str(t) for t in sorted(set(r['threads'])))} "
            f"| {s['step_ms']:.1f} | {tokens / s['step_ms'] * 1e3:,.0f} "
            f"| {base / s['step_ms']:.2f}x | {pct(s['comm_share']['max'])} / "
            f"{pct(s['comm_share']['mean'])} "
            f"| {pct(b['predicted']) if b else ''} "
            f"| {' '.join(f'{100 * v:.0f}' for v in b['per_stage']) + ' %' if b else ''} "
            f"| {pct(s['bubble_share_of_step']) if b else ''} | {pct(s['compute_share'])} "
            f"| {s['loss']:.5f} | {r['others']:.2f}"
            + (f" ({r['kept']} of {r['repeats']})" if r.get("repeats", 1) > 1 else "") + " |")
    comm = ["| layout | fwd+bwd ms | reduce ms | clip ms | optimizer ms | blocked in, ms per "
            "step (mean over ranks) | handed to MPI, MB per step |",
            "|---|---:|---:|---:|---:|---|---|"]
    for r in res["runs"]:
        s = r["summary"]
        parts = " | ".join(f"{s['parts_ms'][p]:.1f}" for p in PARTS)
        ms = ", ".join(f"{k} {v:.1f}" for k, v in s["comm_ms"].items() if v >= 0.05)
        mb = ", ".join(f"{k} {v:.2f}" for k, v in s["comm_mb"].items() if v >= 0.005)
        comm.append(f"| {r['layout']} | {parts} | {ms} | {mb} |")
    return "\n".join(rows) + "\n\n" + "\n".join(comm)


# ----------------------------------------------------------------------------- driver
def _env(threads) -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    if threads is not None:
        env["TENSORLITE_NUM_THREADS"] = str(threads)
    return env


def _run(cmd, env, wait_quiet) -> list:
    """One subprocess; every layout it ran, with ``others``: the cores other processes kept
    busy meanwhile (above ~0.3 on this 2-core machine a run is not to be trusted)."""
    from bench.benchutil import run_result
    result, others = run_result(cmd, "bench_layouts", env=env, cwd=ROOT, wait_quiet=wait_quiet)
    return [{**r, "others": others} for r in result]


def pool(runs: list, quiet: float = QUIET) -> dict:
    """One layout's repeats as one run: the timed steps of those during which other processes
    kept fewer than ``quiet`` cores busy (all of them when none was that quiet), side by side.
    ``others``: the most other processes used during a repeat kept; ``repeats_raw``: every
    repeat's own numbers."""
    kept = [r for r in runs if r["others"] < quiet] or runs
    out = dict(runs[0], repeats=len(runs), kept=len(kept), others=max(r["others"] for r in kept),
               repeats_raw=[{"others": r["others"], "per_rank": r["per_rank"]} for r in runs])
    out["per_rank"] = np.concatenate([np.array(r["per_rank"]) for r in kept], axis=1).tolist()
    return out


def _mpiexec() -> str:
    local = Path(sys.executable).parent / "mpiexec"
    return str(local) if local.exists() else "mpiexec"


def prepare_data(folder: Path) -> Path:
    """A small prepared data folder: a few standard-library files, the byte tokenizer."""
    from gpt.data.prepare import prepare
    src = folder / "src"
    src.mkdir(parents=True, exist_ok=True)
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for name in CORPUS:
        (src / name).write_text((stdlib / name).read_text())
    prepare(str(src), folder / "data", tokenizer="byte", progress=False)
    return folder / "data"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ranks", default="2,4",
                    help="comma-separated world sizes to run the layouts of (default 2,4; "
                         "layouts exist for 2 and 4)")
    ap.add_argument("--steps", type=int, default=10, help="timed steps per layout (default 10)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first (default 2)")
    ap.add_argument("--preset", default="tiny", help="model preset (default tiny: 4 layers, "
                                                     "4 heads, d_model 128, block 128)")
    for k in ("n_layer", "n_head", "d_model", "block_size"):
        ap.add_argument(f"--{k.replace('_', '-')}", type=int, default=None,
                        help="override the preset's")
    ap.add_argument("--batch-size", type=int, default=8,
                    help="global micro-batch, as the command's (default 8)")
    ap.add_argument("--grad-accum", type=int, default=4,
                    help="micro-batches per step: the pipeline's m (default 4)")
    ap.add_argument("--bucket-mb", type=float, default=25.0,
                    help="data-parallel bucket size, as the command's (default 25)")
    ap.add_argument("--threads", type=int, default=None,
                    help="TENSORLITE_NUM_THREADS for every run (default: as the command sizes "
                         "it, cores / local ranks)")
    ap.add_argument("--repeats", type=int, default=1,
                    help="run everything this many times, interleaved, and take the medians "
                         "over the timed steps of the quiet repeats (default 1)")
    ap.add_argument("--data", help="a prepared data folder (default: a small one with the byte "
                                   "tokenizer, made in a temporary directory)")
    ap.add_argument("--json", help="write every rank's every step here")
    ap.add_argument("--wait-quiet", type=float, default=10.0,
                    help="before each run wait up to this many seconds for the machine to go "
                         "quiet (0: don't)")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--world", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--tmp", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        out = worker(args)
        if out:
            print("RESULT " + json.dumps(out), flush=True)
        return 0

    for k, lo in (("steps", 1), ("warmup", 0), ("repeats", 1), ("batch_size", 1),
                  ("grad_accum", 1)):
        if getattr(args, k) < lo:
            ap.error(f"--{k.replace('_', '-')} must be >= {lo}, got {getattr(args, k)}")
    try:
        ranks = [int(r) for r in args.ranks.split(",") if r.strip()]
    except ValueError:
        ap.error(f"--ranks {args.ranks!r}: give world sizes separated by commas, e.g. 2,4")
    bad = [r for r in ranks if r not in LAYOUTS or r == 1]
    if bad:
        ap.error(f"--ranks {bad}: layouts exist for {sorted(k for k in LAYOUTS if k > 1)} ranks")
    cores = len(os.sched_getaffinity(0))
    with tempfile.TemporaryDirectory(prefix="bench-layouts-") as tmp:
        data = args.data or str(prepare_data(Path(tmp)))
        base = [sys.executable, str(Path(__file__).resolve()), "--worker", "--tmp", tmp,
                "--data", data, "--steps", str(args.steps), "--warmup", str(args.warmup),
                "--preset", args.preset, "--batch-size", str(args.batch_size), "--grad-accum",
                str(args.grad_accum), "--bucket-mb", str(args.bucket_mb)]
        for k in ("n_layer", "n_head", "d_model", "block_size"):
            if getattr(args, k) is not None:
                base += [f"--{k.replace('_', '-')}", str(getattr(args, k))]
        env = _env(args.threads)
        if args.threads is None:
            env.pop("TENSORLITE_NUM_THREADS", None)
        res = {"cores": cores, "loadavg_before": os.getloadavg()[0],
               "openblas_env": {k: v for k, v in os.environ.items() if k.startswith("OPENBLAS")},
               "options": {k: v for k, v in vars(args).items() if k not in ("worker", "tmp")},
               "runs": []}
        jobs = [(base, env, None), (base, _env(1), "1 process, 1 thread")] + [
            ([_mpiexec(), "-n", str(n)] + base + ["--world", str(n)], env, None) for n in ranks]
        runs: dict = {}                     # layout -> its runs, one per repeat, in order
        for _ in range(args.repeats):       # interleaved: a busy spell spoils one of each
            for cmd, job_env, name in jobs:
                for r in _run(cmd, job_env, args.wait_quiet):
                    runs.setdefault(name or r["layout"], []).append(
                        dict(r, layout=name or r["layout"]))
        res["runs"] = [pool(rs) for rs in runs.values()]
    res["loadavg_after"] = os.getloadavg()[0]
    meta = res["runs"][0]
    res["params"] = meta["params"]
    for r in res["runs"]:
        r["summary"] = summarize(r, args.grad_accum)
    # every layout trains on the same global batch: batch_size x grad_accum sequences
    from gpt.model import PRESETS
    block = args.block_size or PRESETS[args.preset]["block_size"]
    res["tokens_per_step"] = args.batch_size * args.grad_accum * block
    over = [n for n in ranks if n > cores]
    print(f"{args.preset} GPT ({meta['params']:,} parameters), global batch {args.batch_size} x "
          f"{args.grad_accum} micro-batches x {block} tokens, {args.steps} timed steps after "
          f"{args.warmup}" + (f", {args.repeats} repeats" if args.repeats > 1 else "")
          + f", {cores} cores, load average {res['loadavg_before']:.1f} -> "
          f"{res['loadavg_after']:.1f}"
          + (f"; OPENBLAS env: {res['openblas_env']}" if res["openblas_env"] else ""))
    if over:
        print(f"note: {', '.join(map(str, over))} ranks on {cores} cores are oversubscribed: "
              "ranks share cores, and a rank blocked in MPI spins on one (MPICH's receives and "
              "collectives busy-wait), so comm and bubble shares there measure the machine as "
              "much as the layout")
    print()
    print(table(res))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
