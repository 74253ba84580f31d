"""GPT training and generation speed: tensorlite vs PyTorch eager, side by side (issue 6).

    python -m bench.gpt_bench [--config micro|tiny|small|all] [--mode train|gen|all] [--steps N]
                              [--warmup N] [--repeats R] [--json out.json] [--no-torch] [--jit]
                              [--threads N] [--unset-openblas-env] [--wait-quiet S] [--profile]

For each config, the same GPT-2 model (learned positions, pre-LN, GELU tanh, tied head,
biases, no dropout) in tensorlite and, when ``import torch`` works, in PyTorch eager with
written-out attention ("torch manual") and with F.scaled_dot_product_attention ("torch
sdpa"):

- train: forward + cross-entropy, backward, AdamW(lr 3e-4) step on random tokens. Median
  step time and its forward / backward / optimizer parts, tokens/s (of the median step),
  achieved GFLOP/s with FLOPs/token = 6N + 12 L T d, MFU against a NumPy float32 GEMM
  peak measured in the same run, peak RSS.
- gen: batch 1, greedy, block_size - 1 new tokens from a one-token prompt, with and without
  the KV cache: tokens/s, and ms per token near position block/4 and near the end of the
  block (with the cache the two should be about equal; without it the cost grows).

Every measurement runs in its own subprocess (``--worker``), so ru_maxrss is that run's
own peak and nothing one library allocates or warms up leaks into the other's numbers. A
run during which other processes kept more than 0.15 cores busy is marked ``*``.
See bench/README.md.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from bench.benchutil import CpuMonitor, numba_missing, peak_rss_mb, wait_for_quiet

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = {  # the shared reference's configs (../shared/bench/README.md)
    # micro: nanoGPT's laptop recipe shape (shakespeare_char on a CPU)
    "micro": dict(vocab_size=65, n_layer=4, n_head=4, d_model=128, block_size=64, batch_size=12),
    "tiny": dict(vocab_size=256, n_layer=4, n_head=4, d_model=128, block_size=128, batch_size=16),
    "small": dict(vocab_size=4096, n_layer=6, n_head=6, d_model=384, block_size=256, batch_size=8),
}
LIBS = ("tensorlite", "tensorlite-jit", "torch-manual", "torch-sdpa")


def _is_tl(lib) -> bool:
    """tensorlite on NumPy, or with its opt-in numba kernels (``--jit``)."""
    return bool(lib) and lib.startswith("tensorlite")
OPENBLAS_VARS = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")
CONTENDED = 0.15          # other processes' load (cores) above which a run is marked
LR = 3e-4


# ------------------------------------------------------------------------------ BLAS info
def blas_info() -> dict:
    """numpy's BLAS: library, version, kernel (architecture) and threads, from threadpoolctl
    when it is installed, else asked of OpenBLAS itself through ctypes."""
    try:
        from threadpoolctl import threadpool_info
        for d in threadpool_info():
            if d.get("user_api") == "blas":
                return {"lib": d.get("internal_api"), "version": d.get("version"),
                        "kernel": d.get("architecture"), "threads": d.get("num_threads"),
                        "via": "threadpoolctl"}
    except ImportError:
        pass
    import ctypes
    try:
        with open("/proc/self/maps") as f:
            paths = {ln.split()[-1] for ln in f if "openblas" in ln.lower() and "/" in ln}
        for path in paths:
            lib = ctypes.CDLL(path)
            for pre, suf in (("", ""), ("scipy_", "64_"), ("scipy_", "")):
                core = getattr(lib, f"{pre}openblas_get_corename{suf}", None)
                conf = getattr(lib, f"{pre}openblas_get_config{suf}", None)
                nth = getattr(lib, f"{pre}openblas_get_num_threads{suf}", None)
                if core and conf and nth:
                    core.restype = conf.restype = ctypes.c_char_p
                    version = conf().decode().split()[1]      # "OpenBLAS 0.3.31 ..."
                    return {"lib": "openblas", "version": version, "kernel": core().decode(),
                            "threads": nth(), "via": "ctypes"}
    except OSError:
        pass
    return {"lib": "unknown", "version": None, "kernel": None, "threads": os.cpu_count(),
            "via": "none (pip install threadpoolctl)"}


def gemm_peak(sizes=(1024, 2048), reps=5) -> dict:
    """Best float32 GFLOP/s of numpy n x n x n products (the MFU ceiling), per size and max."""
    rng = np.random.default_rng(0)
    out = {}
    for n in sizes:
        a = rng.standard_normal((n, n), dtype=np.float32)
        b = rng.standard_normal((n, n), dtype=np.float32)
        c = a @ b
        best = float("inf")
        for _ in range(reps):
            t = time.perf_counter()
            np.matmul(a, b, out=c)
            best = min(best, time.perf_counter() - t)
        out[str(n)] = 2 * n ** 3 / best / 1e9
    out["peak"] = max(out.values())
    return out


# ------------------------------------------------------------------------------ workers
def _timed_train(fwd, bwd, opt_step, cfg, steps, warmup, profile=False) -> dict:
    """Run warmup + steps training steps on random tokens; medians of the timed ones."""
    b, t, v = cfg["batch_size"], cfg["block_size"], cfg["vocab_size"]
    data = np.random.default_rng(0).integers(0, v, (steps + warmup, b, t + 1), dtype=np.int64)
    times, losses = {"fwd": [], "bwd": [], "opt": [], "step": []}, []
    prof = None
    for i in range(steps + warmup):
        if i == warmup:
            mon = CpuMonitor().__enter__()
            if profile:
                import cProfile
                prof = cProfile.Profile()
                prof.enable()
        x, y = data[i, :, :-1], data[i, :, 1:]
        t0 = time.perf_counter()
        loss = fwd(x, y)
        t1 = time.perf_counter()
        bwd(loss)
        t2 = time.perf_counter()
        opt_step()
        t3 = time.perf_counter()
        if i >= warmup:
            for k, d in (("fwd", t1 - t0), ("bwd", t2 - t1), ("opt", t3 - t2), ("step", t3 - t0)):
                times[k].append(d)
            losses.append(float(loss.item()))
    mon.__exit__(None, None, None)
    if prof is not None:
        import pstats
        prof.disable()
        print(f"# cProfile of {steps} tensorlite training steps (timings above are inflated "
              "by the profiler), top 25 by own time:")
        pstats.Stats(prof, stream=sys.stdout).sort_stats("tottime").print_stats(25)
    med = {k: statistics.median(d) for k, d in times.items()}
    return {"step_ms": 1e3 * med["step"], "fwd_ms": 1e3 * med["fwd"], "bwd_ms": 1e3 * med["bwd"],
            "opt_ms": 1e3 * med["opt"], "step_ms_min": 1e3 * min(times["step"]),
            "step_ms_max": 1e3 * max(times["step"]), "tokens_per_s": b * t / med["step"],
            "loss_first": losses[0], "loss_last": losses[-1], "other_cores": mon.other_cores}


def train_tensorlite(cfg: dict, steps: int, warmup: int, profile=False) -> dict:
    """tensorlite's GPT (gpt.model) and AdamW (nn.optim) with the same settings as torch."""
    import tensorlite as tl
    from gpt.model import GPT, GPTConfig
    from nn.optim import AdamW
    tl.manual_seed(0)
    model = GPT(GPTConfig(**{k: v for k, v in cfg.items() if k != "batch_size"}, dropout=0.0))
    opt = AdamW(model.parameters(), lr=LR)

    def bwd(loss):
        opt.zero_grad()
        loss.backward()

    r = _timed_train(lambda x, y: model(x, y)[1], bwd, opt.step, cfg, steps, warmup, profile)
    r.update(params=model.num_parameters(), flops_per_token=model.flops_per_token(),
             threads_used=tl.get_num_threads())
    return r


def train_torch(cfg: dict, attn: str, steps: int, warmup: int, threads: int) -> dict:
    from bench import torch_ref
    import torch
    model, fwd, bwd, opt_step = torch_ref.make_train(cfg, attn, threads)
    r = _timed_train(fwd, bwd, opt_step, cfg, steps, warmup)
    r.update(params=model.num_parameters(), flops_per_token=model.flops_per_token(),
             threads_used=torch.get_num_threads())
    return r


def gen_tensorlite(cfg: dict, n_new: int, use_cache: bool):
    """Seconds per new token of GPT.generate_stream (greedy, batch 1, one-token prompt)."""
    import tensorlite as tl
    from gpt.model import GPT, GPTConfig
    tl.manual_seed(0)
    model = GPT(GPTConfig(**{k: v for k, v in cfg.items() if k != "batch_size"}, dropout=0.0))
    prompt = np.zeros((1, 1), dtype=np.int64)
    times, toks, t = [], [0], time.perf_counter()
    for tok in model.generate_stream(prompt, n_new, temperature=0, use_cache=use_cache):
        now = time.perf_counter()
        times.append(now - t)
        toks.append(int(tok[0]))
        t = now
    return times, toks


def _gen_summary(times, block_size) -> dict:
    """tokens/s over all new tokens, and median ms/token of ~16 tokens around position
    block/4 and of the last 16 (new token i attends to i + 1 positions)."""
    q, w = block_size // 4, 8
    quarter = statistics.median(times[max(1, q - w):q + w])
    end = statistics.median(times[-2 * w:])
    return {"tokens_per_s": len(times) / sum(times), "ms_quarter": 1e3 * quarter,
            "ms_end": 1e3 * end, "pos_quarter": q, "pos_end": len(times) - w}


def run_gen(lib: str, cfg: dict, threads: int) -> dict:
    n_new = cfg["block_size"] - 1      # prompt + new tokens fill the block exactly
    if _is_tl(lib):
        gen = lambda n, c: gen_tensorlite(cfg, n, c)  # noqa: E731
    else:
        from bench import torch_ref
        gen = lambda n, c: torch_ref.generate_timed(cfg, lib[6:], threads, n, c)  # noqa: E731
    out = {"gen_tokens": n_new}
    for use_cache in (True, False):
        gen(8, use_cache)                                        # warm up
        with CpuMonitor() as mon:
            times, toks = gen(n_new, use_cache)
        key = "kv" if use_cache else "nocache"
        out.update({f"{key}_{k}": v for k, v in _gen_summary(times, cfg["block_size"]).items()})
        out[f"{key}_other_cores"] = mon.other_cores
        out[f"{key}_head"] = toks[:12]
    out["other_cores"] = max(out["kv_other_cores"], out["nocache_other_cores"])
    if _is_tl(lib):
        import tensorlite as tl
        out["threads_used"] = tl.get_num_threads()
    else:
        import torch
        out["threads_used"] = torch.get_num_threads()
    out["cache_matches_nocache"] = out["kv_head"] == out["nocache_head"]
    return out


def info_worker() -> dict:
    """What the runs in this environment get: BLAS kernel, GEMM peak, torch or why not."""
    r = {"python": sys.version.split()[0], "numpy": np.__version__, "blas": blas_info(),
         "env": {k: os.environ.get(k) for k in OPENBLAS_VARS}}
    with CpuMonitor() as mon:
        r["gemm_gflops"] = gemm_peak()
    r["gemm_other_cores"] = mon.other_cores
    try:
        import torch
        r["torch"] = {"version": torch.__version__,
                      "cpu_capability": torch.backends.cpu.get_cpu_capability()}
    except Exception as e:  # noqa: BLE001 - any failure to import means "no torch"
        r["torch"] = {"error": f"{type(e).__name__}: {e}"}
    return r


def worker(job: dict) -> dict:
    kind, lib = job["kind"], job.get("lib")
    if kind == "info":
        return info_worker()
    cfg, threads = CONFIGS[job["config"]], job["threads"]
    if _is_tl(lib):     # its own pool (BLAS runs single-threaded inside it)
        import tensorlite as tl
        tl.set_num_threads(threads)
        tl.jit.enable(lib == "tensorlite-jit")     # the opt-in numba kernels, or NumPy only
    if kind == "train":
        if _is_tl(lib):
            r = train_tensorlite(cfg, job["steps"], job["warmup"], job.get("profile", False))
        else:
            r = train_torch(cfg, lib[6:], job["steps"], job["warmup"], threads)
    else:
        r = run_gen(lib, cfg, threads)
    r.update(job, peak_rss_mb=peak_rss_mb())
    if _is_tl(lib):  # what its first op set process-wide (BLAS threads, malloc)
        import tensorlite as tl
        r["tensorlite_cpu"] = tl.cpu.configure()
    if kind == "train":     # after the run, so it cannot change its RSS or its warm caches
        r["gemm_gflops"] = gemm_peak(sizes=(1024,), reps=5)["peak"]
    return r


# ------------------------------------------------------------------------------ driver
def run_job(job: dict, env: dict) -> dict:
    """Run one job in a fresh interpreter; its last stdout line is 'JSON {...}'."""
    cmd = [sys.executable, "-m", "bench.gpt_bench", "--worker", json.dumps(job)]
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    lines = p.stdout.splitlines()
    payload = [ln for ln in lines if ln.startswith("JSON ")]
    if p.returncode != 0 or not payload:
        raise RuntimeError(f"worker {job} failed (exit {p.returncode}):\n{p.stdout}{p.stderr}")
    for ln in lines:
        if not ln.startswith("JSON "):
            print(ln)
    return json.loads(payload[-1][5:])


def code_version() -> str:
    """The commit measured, and whether the engine's files differ from it."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                              capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "tensorlite", "nn", "gpt"],
                               cwd=ROOT, capture_output=True, text=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    return head + (" + uncommitted changes in tensorlite/nn/gpt" if dirty else "")


def worker_env(unset_openblas: bool, threads: int | None = None, lib: str | None = None) -> dict:
    """The environment of a run. ``--threads N`` goes to the BLAS/OpenMP variables (torch's
    OpenMP pool; the info run's BLAS), except in a tensorlite run: there it sizes tensorlite's
    own pool only, and tensorlite puts NumPy's BLAS on one thread itself, as it does for its
    users (a BLAS variable would count as the user's choice and keep BLAS's own threads)."""
    env = dict(os.environ)
    if threads:
        names = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")
        for k in ("TENSORLITE_NUM_THREADS",) + (() if _is_tl(lib) else names):
            env[k] = str(threads)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in [env.get("PYTHONPATH")] if p])
    if unset_openblas:
        for k in OPENBLAS_VARS:
            env.pop(k, None)
    return env


def _med(rs: list[dict]) -> dict:
    """Per-key median over repeats of a run (numbers only; the rest from the first)."""
    out = dict(rs[0])
    for k, v in rs[0].items():
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            out[k] = statistics.median(r[k] for r in rs)
    out["repeats"] = len(rs)
    out["other_cores"] = max(r["other_cores"] for r in rs)
    return out


# ------------------------------------------------------------------------------ report
def _fmt(v, digits=1):
    if v is None:
        return "-"
    if isinstance(v, str):
        return v
    if abs(v) >= 1000:
        return f"{v:,.0f}"
    return f"{v:.{digits}f}" if abs(v) >= 10 or digits == 0 else f"{v:.{max(digits, 2)}f}"


def table(cfg_name: str, res: dict, libs: list[str], peak: float) -> str:
    """Markdown table of one config: a row per metric, a column per library and the
    tensorlite / torch ratios (> 1 means tensorlite has more of it)."""
    train = {lib: res.get(("train", cfg_name, lib)) for lib in libs}
    gen = {lib: res.get(("gen", cfg_name, lib)) for lib in libs}
    tl_train = train.get("tensorlite")
    if tl_train:
        # same model in every lib: use tensorlite's count (the torch side is checked equal)
        fpt = tl_train["flops_per_token"]
    else:
        fpt = next((r["flops_per_token"] for r in train.values() if r), None)

    def mark(r):
        return "*" if r and r["other_cores"] > CONTENDED else ""

    def threads(lib):
        used = {r["threads_used"] for r in (train[lib], gen[lib]) if r and "threads_used" in r}
        return "/".join(str(n) for n in sorted(used)) or None

    rows = [("threads", threads)]
    if any(train.values()):
        rows += [
            ("train tokens/s", lambda lib: train[lib] and train[lib]["tokens_per_s"]),
            ("step ms", lambda lib: train[lib] and train[lib]["step_ms"]),
            ("  forward ms", lambda lib: train[lib] and train[lib]["fwd_ms"]),
            ("  backward ms", lambda lib: train[lib] and train[lib]["bwd_ms"]),
            ("  optimizer ms", lambda lib: train[lib] and train[lib]["opt_ms"]),
            ("GFLOP/s", lambda lib: train[lib] and fpt * train[lib]["tokens_per_s"] / 1e9),
            ("MFU %", lambda lib: train[lib] and 100 * fpt * train[lib]["tokens_per_s"] / 1e9 / peak),
            ("train peak RSS MB", lambda lib: train[lib] and train[lib]["peak_rss_mb"]),
        ]
    if any(gen.values()):
        g0 = next(r for r in gen.values() if r)
        rows += [
            ("gen KV-cache tokens/s", lambda lib: gen[lib] and gen[lib]["kv_tokens_per_s"]),
            ("gen no-cache tokens/s", lambda lib: gen[lib] and gen[lib]["nocache_tokens_per_s"]),
            (f"KV ms/token @pos ~{g0['kv_pos_quarter']}",
             lambda lib: gen[lib] and gen[lib]["kv_ms_quarter"]),
            (f"KV ms/token @pos ~{g0['kv_pos_end']}",
             lambda lib: gen[lib] and gen[lib]["kv_ms_end"]),
            ("KV end / quarter", lambda lib: gen[lib] and gen[lib]["kv_ms_end"] / gen[lib]["kv_ms_quarter"]),
            ("no-cache end / quarter",
             lambda lib: gen[lib] and gen[lib]["nocache_ms_end"] / gen[lib]["nocache_ms_quarter"]),
        ]
    tls = [lib for lib in libs if _is_tl(lib)]
    others = [lib for lib in libs if not _is_tl(lib)]
    pairs = [(a, b) for a in tls for b in others]        # a ratio column per (tensorlite, torch)
    head = ["metric"] + [lib.replace("-", " ") for lib in libs]
    head += [f"{'tl' + a[10:]} / {b[6:]}" for a, b in pairs]
    out = ["| " + " | ".join(head) + " |", "|---" + "|---:" * (len(head) - 1) + "|"]
    for name, get in rows:
        vals = {lib: get(lib) for lib in libs}
        src = gen if name.startswith(("gen", "KV", "no-cache")) else train
        cells = [name] + [_fmt(vals[lib]) + ("" if name == "threads" else mark(src[lib]))
                          for lib in libs]
        cells += ["-" if not (vals[a] and vals[b]) or name.endswith("/ quarter")
                  or name == "threads" else f"{vals[a] / vals[b]:.2f}" for a, b in pairs]
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


# issue 14's goals, each checked against the same run's numbers by ``goals``
GOAL_TRAIN_RATIO = 1.3      # training tokens/s, tensorlite / torch sdpa, every config
GOAL_SMALL_MFU = 75.0       # % of the run's NumPy float32 GEMM peak, on small
GOAL_GEN_KV_RATIO = 1.3     # KV-cache generation tokens/s / torch sdpa
GOAL_GEN_NOCACHE_RATIO = 1.0


def goals(res: dict, configs: list[str], peak: float, ref: str = "torch-sdpa",
          lib: str = "tensorlite") -> str:
    """Lines saying, for each of issue 14's goals, what this run measured and whether it is
    met (``ok`` / ``short``), so the bench itself reports them."""
    def check(value, goal, unit=""):
        if value is None:
            return "-"
        return f"{value:.2f}{unit} ({'ok' if value >= goal else 'short'})"

    def ratio(kind, c, key):
        a, b = res.get((kind, c, lib)), res.get((kind, c, ref))
        return a[key] / b[key] if a and b and b[key] else None
    out = [f"| goal | " + " | ".join(configs) + " |", "|---" + "|---:" * len(configs) + "|"]
    out.append(f"| train tokens/s >= {GOAL_TRAIN_RATIO}x {ref} | " + " | ".join(
        check(ratio("train", c, "tokens_per_s"), GOAL_TRAIN_RATIO, "x") for c in configs) + " |")
    mfu = []
    for c in configs:
        r = res.get(("train", c, lib))
        mfu.append(check(100 * r["flops_per_token"] * r["tokens_per_s"] / 1e9 / peak,
                         GOAL_SMALL_MFU, " %") if r and c == "small" else "-")
    out.append(f"| MFU on small >= {GOAL_SMALL_MFU:.0f} % | " + " | ".join(mfu) + " |")
    out.append(f"| gen KV cache >= {GOAL_GEN_KV_RATIO}x {ref} | " + " | ".join(
        check(ratio("gen", c, "kv_tokens_per_s"), GOAL_GEN_KV_RATIO, "x") for c in configs) + " |")
    out.append(f"| gen no cache >= {GOAL_GEN_NOCACHE_RATIO}x {ref} | " + " | ".join(
        check(ratio("gen", c, "nocache_tokens_per_s"), GOAL_GEN_NOCACHE_RATIO, "x")
        for c in configs) + " |")
    return "\n".join(out)


def header(info: dict, other_info: dict | None, unset: bool,
           threads: int | None = None) -> list[str]:
    b = info["blas"]
    threads = threads or b["threads"] or os.cpu_count()
    env = ", ".join(f"{k}={v}" for k, v in info["env"].items() if v) or "none set"
    lines = [f"# python {info['python']}, numpy {info['numpy']}, BLAS {b['lib']} {b['version'] or ''} "
             f"kernel {b['kernel']} ({b['threads']} threads, via {b['via']})",
             f"# OpenBLAS env in the runs: {env}"
             + ("  (--unset-openblas-env: dropped)" if unset else "")]
    g = info["gemm_gflops"]
    lines.append("# NumPy float32 GEMM at the start: " + ", ".join(
        f"{k}^3 {v:.0f}" for k, v in g.items() if k != "peak") + f" -> {g['peak']:.0f} GFLOP/s")
    if other_info:
        o, ob = other_info["gemm_gflops"], other_info["blas"]
        lines.append(f"#   (for comparison, {'with' if unset else 'without'} "
                     f"{'/'.join(OPENBLAS_VARS)}: kernel {ob['kernel']}, peak {o['peak']:.0f} "
                     f"GFLOP/s{'' if unset else '; rerun with --unset-openblas-env to use it'})")
    t = info["torch"]
    lines.append(f"# torch {t['version']} (cpu capability {t['cpu_capability']})" if "version" in t
                 else f"# PyTorch: not importable here ({t['error']}); tensorlite only "
                 "(see bench/README.md to set up ~/.bench-venv)")
    lines.append(f"# threads: tensorlite {threads} (tl.set_num_threads; its BLAS calls "
                 f"single-threaded inside its pool)"
                 + (f", torch {threads} (torch.set_num_threads)" if "version" in t else ""))
    return lines


# ------------------------------------------------------------------------------ main
def parse_args(argv):
    ap = argparse.ArgumentParser(prog="python -m bench.gpt_bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", choices=[*CONFIGS, "all"], default="all")
    ap.add_argument("--mode", choices=["train", "gen", "all"], default="all")
    ap.add_argument("--steps", type=int, default=10, help="timed training steps (default 10)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first (default 2)")
    ap.add_argument("--repeats", type=int, default=1,
                    help="training runs per (config, library), each its own process; the "
                         "table shows the median (default 1)")
    ap.add_argument("--json", help="write all results here")
    ap.add_argument("--no-torch", action="store_true", help="tensorlite only")
    ap.add_argument("--jit", action="store_true",
                    help="also run tensorlite with its opt-in numba kernels (tensorlite-jit; "
                         "needs numba: pip install 'tensorlite[jit]')")
    ap.add_argument("--unset-openblas-env", action="store_true",
                    help=f"run the measurements without {' and '.join(OPENBLAS_VARS)} "
                         "(which make OpenBLAS use a slower kernel)")
    ap.add_argument("--threads", type=int, default=None,
                    help="threads for both libraries: tensorlite's pool (tl.set_num_threads) "
                         "and torch.set_num_threads, and the BLAS/OpenMP variables (default: "
                         "NumPy's BLAS default, i.e. all cores)")
    ap.add_argument("--wait-quiet", type=float, default=10, metavar="S",
                    help="before each run, wait up to S seconds for other processes to go "
                         "quiet (default 10; 0: don't look)")
    ap.add_argument("--profile", action="store_true",
                    help="also print a cProfile of tensorlite's training steps")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.steps < 1 or args.warmup < 0 or args.repeats < 1 or (args.threads or 1) < 1:
        ap.error("need --steps >= 1, --warmup >= 0, --repeats >= 1, --threads >= 1")
    return args


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        args = parse_args(argv)
    except SystemExit as e:        # --help, or a usage error (argparse printed it)
        return int(e.code or 0)
    if args.worker:
        print("JSON " + json.dumps(worker(json.loads(args.worker))), flush=True)
        return 0
    t_start = time.perf_counter()
    env = worker_env(args.unset_openblas_env, args.threads)
    tl_env = worker_env(args.unset_openblas_env, args.threads, lib="tensorlite")
    try:
        info = run_job({"kind": "info"}, env)
        other = None
        if any(os.environ.get(k) for k in OPENBLAS_VARS):     # the other setting, for reference
            other = run_job({"kind": "info"}, worker_env(not args.unset_openblas_env, args.threads))
    except RuntimeError as e:
        print(e, file=sys.stderr)
        return 1
    libs = ["tensorlite"]
    if args.jit:
        if numba_missing():
            return 2
        libs.append("tensorlite-jit")
    if not args.no_torch and "version" in info["torch"]:
        libs += ["torch-manual", "torch-sdpa"]
    info["code"] = code_version()
    print(f"# tensorlite at {info['code']}")
    threads = info["blas"]["threads"] or os.cpu_count()   # --threads N, else NumPy BLAS's
    for ln in header(info, other, args.unset_openblas_env, threads):
        print(ln, flush=True)
    if args.no_torch:
        print("# --no-torch: tensorlite only")
    configs = list(CONFIGS) if args.config == "all" else [args.config]
    modes = ["train", "gen"] if args.mode == "all" else [args.mode]

    jobs = []                       # repeats interleaved, so slow drifts hit every library
    if "train" in modes:
        for rep in range(args.repeats):
            for c in configs:
                for lib in libs:
                    jobs.append({"kind": "train", "config": c, "lib": lib, "steps": args.steps,
                                 "warmup": args.warmup, "threads": threads,
                                 "profile": args.profile and _is_tl(lib) and rep == 0})
    if "gen" in modes:
        jobs += [{"kind": "gen", "config": c, "lib": lib, "threads": threads}
                 for c in configs for lib in libs]
    runs: dict = {}
    for job in jobs:
        if args.wait_quiet > 0:
            wait_for_quiet(CONTENDED, max_wait=args.wait_quiet)
        t0 = time.perf_counter()
        try:
            r = run_job(job, tl_env if _is_tl(job["lib"]) else env)
        except RuntimeError as e:
            print(e, file=sys.stderr)
            return 1
        key = (job["kind"], job["config"], job["lib"])
        runs.setdefault(key, []).append(r)
        what = (f"{r['tokens_per_s']:,.0f} tokens/s" if job["kind"] == "train" else
                f"KV {r['kv_tokens_per_s']:,.0f} / no-cache {r['nocache_tokens_per_s']:,.0f} tokens/s")
        print(f"  {job['kind']:5s} {job['config']:5s} {job['lib']:12s} {what}  "
              f"({time.perf_counter() - t0:.0f} s, other load {r['other_cores']:.2f} cores"
              f"{', CONTENDED' if r['other_cores'] > CONTENDED else ''})", flush=True)
    res = {k: _med(v) for k, v in runs.items()}
    # MFU ceiling: the best GEMM rate seen in this run (at the start, and after each training
    # run), so one measurement taken while the machine was busy cannot inflate every MFU
    peak = max([info["gemm_gflops"]["peak"]] +
               [r["gemm_gflops"] for rs in runs.values() for r in rs if "gemm_gflops" in r])

    for (kind, c, lib), r in res.items():
        if kind == "gen" and not r["cache_matches_nocache"]:
            print(f"# WARNING: {lib} {c}: greedy tokens with the KV cache {r['kv_head']} differ "
                  f"from those without it {r['nocache_head']}")
    for c in configs:
        tr = [res[k] for k in res if k[0] == "train" and k[1] == c]
        if len({r["params"] for r in tr}) > 1:
            print(f"# WARNING: parameter counts differ between libraries: "
                  f"{ {r['lib']: r['params'] for r in tr} }")
        p = tr[0] if tr else None
        cfg = CONFIGS[c]
        print(f"\n### {c}: vocab {cfg['vocab_size']}, {cfg['n_layer']} layers, {cfg['n_head']} "
              f"heads, d {cfg['d_model']}, block {cfg['block_size']}, batch {cfg['batch_size']}"
              + (f"; {p['params']:,} params, {p['flops_per_token'] / 1e6:.1f} MFLOP/token" if p else "")
              + "\n")
        print(table(c, res, libs, peak))
    if others := [lib for lib in libs if not _is_tl(lib)]:
        for lib in [lib for lib in libs if _is_tl(lib)]:
            print(f"\n### issue 14's goals, {lib} (bench/README.md)\n")
            print(goals(res, configs, peak, lib=lib))
    wall = time.perf_counter() - t_start
    print(f"\nmedians of {args.steps} timed steps after {args.warmup} warmup, {args.repeats} "
          f"run(s) each; {'ratios are tensorlite / torch; ' if any(not _is_tl(lib) for lib in libs) else ''}"
          f"* = other processes used > "
          f"{CONTENDED} cores during that run; MFU vs {peak:.0f} GFLOP/s, the best NumPy "
          f"float32 GEMM rate seen in this run; total {wall:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"info": info, "other_openblas_setting": other, "args": vars(args),
                       "gemm_peak_gflops": peak,
                       "wall_s": wall, "results": [r for rs in runs.values() for r in rs]},
                      f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
