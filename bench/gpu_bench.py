"""GPT training throughput on one NVIDIA GPU: tensorlite (CuPy) vs PyTorch eager (issue 16).

    python -m bench.gpu_bench [--config small|gpt2|all] [--steps N] [--warmup N]
                              [--batch-gpt2 B] [--budget S] [--json out.json] [--no-torch]

For each config, the same GPT-2 model (learned positions, pre-LN, GELU tanh, tied head,
biases, no dropout, float32) trained on random tokens with AdamW(lr 3e-4):

- ``tensorlite``: gpt.model.GPT moved to "cuda" (CuPy arrays), nn.optim.AdamW;
- ``torch-manual`` / ``torch-sdpa``: bench/torch_ref.py's GPT on "cuda" (attention written
  out, or F.scaled_dot_product_attention), torch.optim.AdamW with its defaults.

Reported per run: median ms/step (and its forward / backward / optimizer parts, each timed
between device synchronisations), tokens/s, achieved TFLOP/s with FLOPs/token = 6N + 12 L T d
(``GPT.flops_per_token()``), MFU = that / the best float32 CuPy matmul rate measured in the
same run (4096^3 and 8192^3, CUDA events; TF32 off, as in both libraries' defaults), and the
device memory the run held at its peak. A float16 matmul peak is measured too, for reference
(what mixed precision could reach).

Configs: ``small`` (the CPU bench's: 6 layers, 6 heads, 384 wide, block 256, vocab 4096,
batch 8) and ``gpt2`` (GPT-2 124M: 12 layers, 12 heads, 768 wide, block 1024, vocab 50257,
batch 8 = 8192 tokens a step).

Every measurement runs in its own subprocess with a timeout (``--run-timeout``, default 150 s,
and ``--budget`` seconds for everything, default 420): a run that would start with under
30 s left is skipped and says so. The order: tensorlite and torch-sdpa on small, then on
gpt2, then torch-manual on both (the least important last).
Without a usable GPU it prints why, writes that to ``--json`` and exits 0.
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

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = {
    "small": dict(vocab_size=4096, n_layer=6, n_head=6, d_model=384, block_size=256, batch_size=8),
    "gpt2": dict(vocab_size=50257, n_layer=12, n_head=12, d_model=768, block_size=1024,
                 batch_size=8),
}
LIBS = ("tensorlite", "torch-sdpa", "torch-manual")
LR = 3e-4


# ------------------------------------------------------------------------------ workers
def gpu_info() -> dict:
    import tensorlite as tl
    info = {"cuda_available": tl.cuda_available(), "reason": tl.cuda_unavailable_reason()}
    if info["cuda_available"]:
        import cupy
        dev = cupy.cuda.Device(0)
        props = cupy.cuda.runtime.getDeviceProperties(0)
        info.update(name=props["name"].decode() if isinstance(props["name"], bytes)
                    else str(props["name"]), total_mem_gib=dev.mem_info[1] / 2 ** 30,
                    cupy=cupy.__version__, cuda_runtime=cupy.cuda.runtime.runtimeGetVersion(),
                    compute_capability=dev.compute_capability,
                    cupy_tf32=os.environ.get("CUPY_TF32", "0"))
    info["numpy"] = np.__version__
    try:
        import torch
        info["torch"] = torch.__version__
        info["torch_cuda"] = torch.cuda.is_available()
        info["torch_tf32_matmul"] = torch.backends.cuda.matmul.allow_tf32
    except Exception as e:             # noqa: BLE001 - report, do not fail
        info["torch"] = f"not importable: {e}"
    return info


def matmul_peak(sizes=(4096, 8192), reps=10) -> dict:
    """Best CuPy matmul TFLOP/s per dtype and size (CUDA events around ``reps`` products)."""
    import cupy
    out = {}
    for dt in ("float32", "float16"):
        best = 0.0
        for n in sizes:
            a = cupy.random.standard_normal((n, n), dtype=cupy.float32).astype(dt)
            b = cupy.random.standard_normal((n, n), dtype=cupy.float32).astype(dt)
            c = a @ b                                   # warm-up (cuBLAS handle, heuristics)
            start, stop = cupy.cuda.Event(), cupy.cuda.Event()
            for _ in range(3):
                start.record()
                for _ in range(reps):
                    cupy.matmul(a, b, out=c)
                stop.record()
                stop.synchronize()
                s = cupy.cuda.get_elapsed_time(start, stop) / 1e3 / reps
                best = max(best, 2 * n ** 3 / s / 1e12)
                out[f"{dt}_{n}"] = max(out.get(f"{dt}_{n}", 0.0), 2 * n ** 3 / s / 1e12)
            del a, b, c
            cupy.get_default_memory_pool().free_all_blocks()
        out[f"{dt}_peak"] = best
    return out


def _timed(step_parts, sync, cfg, steps, warmup) -> dict:
    """step_parts(x, y) runs fwd, bwd, opt via the three callables; timings between syncs."""
    fwd, bwd, opt = step_parts
    b, t, v = cfg["batch_size"], cfg["block_size"], cfg["vocab_size"]
    data = np.random.default_rng(0).integers(0, v, (steps + warmup, b, t + 1), dtype=np.int64)
    times = {"fwd": [], "bwd": [], "opt": [], "step": []}
    losses, first_warm = [], None
    for i in range(steps + warmup):
        x, y = data[i, :, :-1], data[i, :, 1:]
        sync()
        t0 = time.perf_counter()
        loss = fwd(x, y)
        sync()
        t1 = time.perf_counter()
        bwd(loss)
        sync()
        t2 = time.perf_counter()
        opt()
        sync()
        t3 = time.perf_counter()
        if i == 0:
            first_warm = t3 - t0
        if i >= warmup:
            for k, d in (("fwd", t1 - t0), ("bwd", t2 - t1), ("opt", t3 - t2), ("step", t3 - t0)):
                times[k].append(d)
        losses.append(float(loss.item()))
    med = {k: statistics.median(d) for k, d in times.items()}
    return {"step_ms": 1e3 * med["step"], "fwd_ms": 1e3 * med["fwd"], "bwd_ms": 1e3 * med["bwd"],
            "opt_ms": 1e3 * med["opt"], "step_ms_min": 1e3 * min(times["step"]),
            "step_ms_max": 1e3 * max(times["step"]), "first_step_s": first_warm,
            "tokens_per_s": b * t / med["step"], "loss_first": losses[0],
            "loss_last": losses[-1], "steps": steps, "warmup": warmup}


def train_tensorlite(cfg: dict, steps: int, warmup: int) -> dict:
    import cupy

    import tensorlite as tl
    from gpt.model import GPT, GPTConfig
    from nn.optim import AdamW
    tl.manual_seed(0)
    model = GPT(GPTConfig(**{k: v for k, v in cfg.items() if k != "batch_size"},
                          dropout=0.0)).to("cuda")
    opt = AdamW(model.parameters(), lr=LR)

    def fwd(x, y):
        return model(tl.tensor(x, device="cuda"), tl.tensor(y, device="cuda"))[1]

    def bwd(loss):
        opt.zero_grad()
        loss.backward()

    r = _timed((fwd, bwd, opt.step), cupy.cuda.Device().synchronize, cfg, steps, warmup)
    pool = cupy.get_default_memory_pool()
    r.update(params=model.num_parameters(), flops_per_token=model.flops_per_token(),
             mem_gib=pool.total_bytes() / 2 ** 30)
    return r


def train_torch(cfg: dict, attn: str, steps: int, warmup: int) -> dict:
    import torch

    from bench import torch_ref
    # torch_ref.GPT.forward builds its positions with torch.arange(...) and no device:
    # make "cuda" the default device so that they, and the model, live on the GPU
    torch.set_default_device("cuda")
    torch.manual_seed(0)
    model = torch_ref.GPT(cfg, attn).to("cuda")
    opt = torch.optim.AdamW(model.parameters(), lr=LR)

    def fwd(x, y):
        return model(torch.from_numpy(x).to("cuda"), torch.from_numpy(y).to("cuda"))[1]

    def bwd(loss):
        opt.zero_grad(set_to_none=True)
        loss.backward()

    torch.cuda.reset_peak_memory_stats()
    r = _timed((fwd, bwd, opt.step), torch.cuda.synchronize, cfg, steps, warmup)
    r.update(params=model.num_parameters(), flops_per_token=model.flops_per_token(),
             mem_gib=torch.cuda.max_memory_reserved() / 2 ** 30)
    return r


def worker(job: dict) -> dict:
    kind = job["kind"]
    if kind == "info":
        return gpu_info()
    if kind == "peak":
        return matmul_peak()
    cfg = dict(CONFIGS[job["config"]])
    if job.get("batch"):
        cfg["batch_size"] = job["batch"]
    if job["lib"] == "tensorlite":
        return train_tensorlite(cfg, job["steps"], job["warmup"])
    return train_torch(cfg, job["lib"].split("-")[1], job["steps"], job["warmup"])


# ------------------------------------------------------------------------------ driver
def run_job(job: dict, timeout: float) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    t0 = time.perf_counter()
    try:
        p = subprocess.run([sys.executable, "-m", "bench.gpu_bench", "--worker", json.dumps(job)],
                           cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        tail = (p.stderr or p.stdout).strip().splitlines()[-8:]
        return {"error": f"exit {p.returncode}: " + " | ".join(tail), "wall_s": wall}
    try:
        r = json.loads(p.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return {"error": f"no result (stdout: {p.stdout[-300:]!r})", "wall_s": wall}
    r["wall_s"] = wall
    return r


def _f(v, d=1):
    return "-" if v is None else f"{v:,.{d}f}"


def table(name: str, cfg: dict, res: dict, peak: float) -> str:
    lines = [f"### {name}: {cfg['n_layer']} layers, {cfg['n_head']} heads, d={cfg['d_model']}, "
             f"block {cfg['block_size']}, vocab {cfg['vocab_size']}, batch {cfg['batch_size']}",
             "",
             "| library | ms/step | fwd | bwd | opt | tokens/s | TFLOP/s | MFU | mem GiB | "
             "loss first -> last | tokens/s vs tensorlite |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|"]
    base = res.get("tensorlite", {}).get("tokens_per_s")
    for lib, r in res.items():
        if "error" in r or "skipped" in r:
            lines.append(f"| {lib} | {r.get('error') or r.get('skipped')} |||||||||| ")
            continue
        tflops = r["tokens_per_s"] * r["flops_per_token"] / 1e12
        rel = f"{r['tokens_per_s'] / base:.2f}x" if base else "-"
        lines.append(f"| {lib} | {_f(r['step_ms'])} | {_f(r['fwd_ms'])} | {_f(r['bwd_ms'])} | "
                     f"{_f(r['opt_ms'])} | {_f(r['tokens_per_s'], 0)} | {tflops:.2f} | "
                     f"{100 * tflops / peak:.1f}% | {_f(r.get('mem_gib'), 2)} | "
                     f"{r['loss_first']:.3f} -> {r['loss_last']:.3f} | {rel} |")
    return "\n".join(lines)


def parse_args(argv):
    ap = argparse.ArgumentParser(prog="python -m bench.gpu_bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", choices=[*CONFIGS, "all"], default="all")
    ap.add_argument("--steps", type=int, default=10, help="timed steps (default 10)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps first (default 3: "
                    "CuPy compiles each elementwise kernel on first use)")
    ap.add_argument("--batch-gpt2", type=int, default=None, help="batch of the gpt2 config "
                    "(default 8)")
    ap.add_argument("--budget", type=float, default=420.0, help="seconds for everything")
    ap.add_argument("--run-timeout", type=float, default=150.0,
                    help="seconds for one training run at most (default 150)")
    ap.add_argument("--json", help="write every result here")
    ap.add_argument("--no-torch", action="store_true", help="tensorlite only")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0
    t_end = time.monotonic() + args.budget
    left = lambda: t_end - time.monotonic()          # noqa: E731
    info = run_job({"kind": "info"}, timeout=max(10.0, min(120.0, left())))
    out = {"info": info, "results": {}, "args": vars(args)}

    def save():
        if args.json:
            Path(args.json).write_text(json.dumps(out, indent=1, default=str))

    if not info.get("cuda_available"):
        why = info.get("reason") or info.get("error") or "unknown"
        print(f"gpu_bench: no usable GPU ({why}); nothing measured")
        out["skipped"] = why
        save()
        return 0
    print(f"# gpu_bench: {info.get('name')} ({info.get('total_mem_gib', 0):.0f} GiB), "
          f"CuPy {info.get('cupy')}, torch {info.get('torch')}, NumPy {info.get('numpy')}")
    peak = run_job({"kind": "peak"}, timeout=max(10.0, min(90.0, left() - 30)))
    out["peak"] = peak
    p32 = peak.get("float32_peak")
    if not p32:
        print(f"gpu_bench: the matmul peak failed: {peak.get('error')}")
        save()
        return 1
    print(f"# CuPy matmul peak: float32 {p32:.1f} TFLOP/s, float16 "
          f"{peak.get('float16_peak', 0):.1f} TFLOP/s (MFU below is against float32)\n")
    configs = list(CONFIGS) if args.config == "all" else [args.config]
    libs = [lib for lib in LIBS if not (args.no_torch and lib.startswith("torch"))]
    torch_ok = bool(info.get("torch_cuda"))
    # tensorlite and torch-sdpa on every config first; the written-out torch attention last
    order = sorted(((c, lib) for c in configs for lib in libs),
                   key=lambda cl: (cl[1] == "torch-manual", configs.index(cl[0]),
                                   libs.index(cl[1])))
    for c, lib in order:
        res = out["results"].setdefault(c, {})
        if lib.startswith("torch") and not torch_ok:
            res[lib] = {"skipped": f"torch on cuda unavailable ({info.get('torch')})"}
            continue
        if left() < 30:
            res[lib] = {"skipped": f"out of time budget ({args.budget:.0f} s)"}
            continue
        job = {"kind": "train", "config": c, "lib": lib, "steps": args.steps,
               "warmup": args.warmup, "batch": args.batch_gpt2 if c == "gpt2" else None}
        r = run_job(job, timeout=min(args.run_timeout, left() - 5))
        res[lib] = r
        brief = r.get("error") or f"{r['step_ms']:.1f} ms/step, {r['tokens_per_s']:,.0f} tok/s"
        print(f"# {c} {lib}: {brief} ({r.get('wall_s', 0):.0f} s)", flush=True)
        save()
    print()
    for c in configs:
        cfg = dict(CONFIGS[c])
        if c == "gpt2" and args.batch_gpt2:
            cfg["batch_size"] = args.batch_gpt2
        ordered = {lib: out["results"][c][lib] for lib in libs if lib in out["results"].get(c, {})}
        print(table(c, cfg, ordered, p32) + "\n")
    save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
