"""The whole ``tensorlite-gpt train`` command against a PyTorch training loop doing the same
work (``bench/torch_train_loop.py``), wall time of each process from start to exit.

    ~/.bench-venv/bin/python -m bench.train_cmd_bench [--config micro|tiny|small]
        [--steps N] [--repeats R] [--threads N] [--wait-quiet S] [--keep DIR]

The data: a synthetic 1.1 MB text of 65 distinct characters (nanoGPT's shakespeare_char
has 65) prepared once with ``tensorlite-gpt prepare --tokenizer char`` (the char
tokenizer adds its byte fallback and specials: vocab 325). Both runs read the same
train.bin/val.bin. Both evaluate every 250 steps over 20 batches, log every step, clip at
1.0, AdamW (0.9, 0.95, wd 0.1 on matrices), warmup + cosine, checkpoint at each evaluation;
the command also draws loss.png after each evaluation and prints its summary.

Shown per run: wall seconds of the process (median over repeats), tokens/s = steps x batch x
block / wall, and tensorlite / torch ratios. Runs are interleaved across libraries; a run
during which other processes kept more than 0.15 cores busy is marked ``*``.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.benchutil import CpuMonitor, numba_missing, wait_for_quiet

ROOT = Path(__file__).resolve().parent.parent
SHAPES = {   # model and batch of each config (vocab: the prepared data's)
    "micro": dict(n_layer=4, n_head=4, d_model=128, block_size=64, batch_size=12),
    "tiny": dict(n_layer=4, n_head=4, d_model=128, block_size=128, batch_size=16),
    "small": dict(n_layer=6, n_head=6, d_model=384, block_size=256, batch_size=8),
}
CONTENDED = 0.15


def make_text(path: Path, n_chars: int = 1_100_000, seed: int = 0) -> None:
    """Lines of words over a fixed 3000-word lexicon: 65 distinct characters."""
    rng = random.Random(seed)
    chars = "\n !$&',-.3:;?" + "ABCDEFGHIJKLMNOPQRSTUVWXYZ" + "abcdefghijklmnopqrstuvwxyz"
    letters = [c for c in chars if c.isalpha()]
    words = ["".join(rng.choice(letters) for _ in range(rng.randint(1, 8))) for _ in range(3000)]
    punct = list("!$&',-.3:;?")
    out, n = [], 0
    while n < n_chars:
        line = " ".join(rng.choice(words) for _ in range(rng.randint(3, 12))) + \
            rng.choice(punct) + "\n"
        out.append(line)
        n += len(line)
    path.write_text("".join(out))


def cli() -> list[str]:
    """tensorlite-gpt of this interpreter's environment."""
    exe = Path(sys.executable).parent / "tensorlite-gpt"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "gpt.cli"]


def run(cmd: list[str], env: dict) -> dict:
    with CpuMonitor() as mon:
        t0 = time.perf_counter()
        p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - t0
    if p.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}")
    return {"wall_s": wall, "other_cores": mon.other_cores}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.train_cmd_bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", choices=list(SHAPES), default="micro")
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads and "
                    "TENSORLITE_NUM_THREADS (default: each library's own default)")
    ap.add_argument("--attn", nargs="+", default=["sdpa"], choices=["sdpa", "manual"],
                    help="torch attention(s) to run (default sdpa)")
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--jit", action="store_true", help="also run the command with "
                    "TENSORLITE_JIT=1 (tensorlite's opt-in numba kernels)")
    ap.add_argument("--wait-quiet", type=float, default=10)
    ap.add_argument("--keep", help="work in this folder and keep it (default: a temp folder)")
    ap.add_argument("--json", help="write the raw numbers here")
    a = ap.parse_args(argv)
    if a.jit and numba_missing():
        return 2
    shape = SHAPES[a.config]
    work = Path(a.keep) if a.keep else Path(tempfile.mkdtemp(prefix="train_cmd_bench-"))
    work.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in [env.get("PYTHONPATH")] if p])
    if a.threads:
        env["TENSORLITE_NUM_THREADS"] = str(a.threads)
    try:
        data = work / "data"
        if not (data / "meta.json").exists():
            make_text(work / "input.txt")
            subprocess.run(cli() + ["prepare", "--data", str(work / "input.txt"), "--out",
                                    str(data), "--tokenizer", "char", "--overwrite"],
                           cwd=ROOT, env=env, check=True, capture_output=True)
        vocab = json.loads((data / "meta.json").read_text())["vocab_size"]
        common = ["--n-layer", shape["n_layer"], "--n-head", shape["n_head"], "--d-model",
                  shape["d_model"], "--block-size", shape["block_size"], "--batch-size",
                  shape["batch_size"], "--max-steps", a.steps, "--eval-steps", 20,
                  "--eval-interval", 250]
        common = [str(c) for c in common]
        cmds = {"tensorlite": cli() + ["train", "--data", str(data), "--out", str(work / "tl"),
                                       "--overwrite", "--log-interval", "1", "--samples", "0",
                                       "--no-progress", "--ckpt-minutes", "0"] + common}
        envs = {k: env for k in cmds}
        if a.jit:
            cmds["tensorlite-jit"] = [c if c != str(work / "tl") else str(work / "tl-jit")
                                      for c in cmds["tensorlite"]]
            envs["tensorlite-jit"] = {**env, "TENSORLITE_JIT": "1"}
        if not a.no_torch:
            for attn in a.attn:
                cmds[f"torch-{attn}"] = [sys.executable, str(ROOT / "bench" / "torch_train_loop.py"),
                                         "--data", str(data), "--out", str(work / f"torch-{attn}"),
                                         "--attn", attn] + common + (
                    ["--threads", str(a.threads)] if a.threads else [])
                envs[f"torch-{attn}"] = env
        print(f"# {a.config}: {shape}, vocab {vocab}, {a.steps} steps, eval every 250 over 20 "
              f"batches, log every step; {a.repeats} repeat(s), interleaved", flush=True)
        runs: dict = {k: [] for k in cmds}
        for rep in range(a.repeats):
            for name, cmd in cmds.items():
                if a.wait_quiet > 0:
                    wait_for_quiet(CONTENDED, max_wait=a.wait_quiet)
                r = run(cmd, envs[name])
                runs[name].append(r)
                print(f"  {name:15s} {r['wall_s']:7.1f} s  other load {r['other_cores']:.2f}"
                      f"{'  CONTENDED' if r['other_cores'] > CONTENDED else ''}", flush=True)
        tokens = a.steps * shape["batch_size"] * shape["block_size"]
        med = {k: statistics.median(r["wall_s"] for r in v) for k, v in runs.items()}
        star = {k: "*" if max(r["other_cores"] for r in v) > CONTENDED else "" for k, v in runs.items()}
        tls = [k for k in cmds if k.startswith("tensorlite")]
        print(f"\n| whole command, {a.config} | wall s | tokens/s | "
              + " | ".join(f"{t} speed / this" for t in tls) + " |")
        print("|---|---:|---:|" + "---:|" * len(tls))
        for k in cmds:
            ratios = " | ".join(f"{med[k] / med[t]:.2f}x" for t in tls)
            print(f"| {k}{star[k]} | {med[k]:.1f} | {tokens / med[k]:,.0f} | {ratios} |")
        if a.json:
            with open(a.json, "w") as f:
                json.dump({"args": vars(a), "vocab": vocab, "runs": runs}, f, indent=1)
    finally:
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
