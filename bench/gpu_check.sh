#!/usr/bin/env bash
# The GPU check (issue 16), one script for a lent GPU machine: it installs nothing (no network
# there) and runs the project from this source tree with PYTHONPATH.
#
#   bash bench/gpu_check.sh            # writes under $OUT (default ./gpu_out)
#
#   0. environment: nvidia-smi, versions, whether tensorlite sees a GPU   (env.json)
#      -> no GPU: says why, writes summary.txt / summary.json, exits 0 within seconds
#   1. the GPU tests: tests/test_gpu.py, tests/test_devices.py (cpu and cuda halves),
#      tests/test_amp.py                                       (pytest.txt, pytest.xml)
#   2. throughput: bench/gpu_bench.py, tensorlite vs PyTorch eager on the same GPU, configs
#      small and gpt2 (GPT-2 124M, block 1024, batch 8): ms/step, tokens/s, MFU against a
#      measured CuPy float32 matmul peak                      (bench.md, bench.json)
#
# Everything finishes within 8 minutes: each part runs under `timeout`, and the benchmark
# gets what the tests left of the budget. GPU_CHECK_FORCE=1 runs every part without a GPU
# (the cuda tests then skip and count as a failure; the benchmark says why it measured
# nothing): a way to test this script on a CPU machine. Exit status: 0 when the tests passed (or there is
# no GPU), 1 when a test failed or timed out. The summary is always written.
set -u
cd "$(dirname "$0")/.."
ROOT=$(pwd)
OUT=${OUT:-./gpu_out}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python}
command -v "$PY" >/dev/null 2>&1 || PY=python3
BUDGET=${GPU_CHECK_BUDGET:-470}          # seconds in all (8 min = 480)
TESTS_MAX=${GPU_CHECK_TESTS_MAX:-200}    # seconds for the tests at most
START=$(date +%s)
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"

say() { echo "$*" | tee -a "$SUMMARY"; }
left() { echo $(( BUDGET - ($(date +%s) - START) )); }
finish() {   # finish STATUS GPU WHY: summary.json, then exit
    "$PY" - "$OUT" "$1" "$2" "$3" "$(( $(date +%s) - START ))" <<'EOF'
import json, sys
out, status, gpu, why, secs = sys.argv[1:6]
json.dump({"status": status, "gpu": gpu == "1", "why": why, "seconds": int(secs),
           "files": sorted(__import__("os").listdir(out))},
          open(f"{out}/summary.json", "w"), indent=1)
EOF
    say "done in $(( $(date +%s) - START )) s: $1 (files in $OUT)"
    [ "$1" = "pass" ] || [ "$1" = "no-gpu" ] && exit 0
    exit 1
}

say "# tensorlite GPU check, $(date -u +%Y-%m-%dT%H:%M:%SZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"

# 0. environment --------------------------------------------------------------------------
timeout 30 nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || echo "(nvidia-smi unavailable)" >> "$OUT/nvidia-smi.txt"
timeout 120 "$PY" - > "$OUT/env.json" 2> "$OUT/env.err" <<'EOF'
import json, platform, sys
import numpy as np
import tensorlite as tl
env = {"python": sys.version.split()[0], "platform": platform.platform(), "numpy": np.__version__,
       "cuda_available": tl.cuda_available(), "reason": tl.cuda_unavailable_reason()}
for mod in ("cupy", "torch", "pytest", "hypothesis", "mpi4py", "safetensors"):
    try:
        env[mod] = __import__(mod).__version__
    except Exception as e:
        env[mod] = f"missing ({type(e).__name__})"
if env["cuda_available"]:
    import cupy
    p = cupy.cuda.runtime.getDeviceProperties(0)
    env["gpu"] = p["name"].decode() if isinstance(p["name"], bytes) else str(p["name"])
    env["gpu_mem_gib"] = round(cupy.cuda.Device(0).mem_info[1] / 2**30, 1)
print(json.dumps(env, indent=1))
EOF
rc=$?
if [ $rc -ne 0 ]; then
    say "environment probe failed (exit $rc): $(tail -3 "$OUT/env.err" | tr '\n' ' ')"
    finish fail 0 "environment probe failed"
fi
gpu=$("$PY" -c "import json,sys; print(int(json.load(open(sys.argv[1]))['cuda_available']))" "$OUT/env.json")
why=$("$PY" -c "import json,sys; print(json.load(open(sys.argv[1]))['reason'])" "$OUT/env.json")
say "environment: $("$PY" -c "import json,sys; e=json.load(open(sys.argv[1])); print(', '.join(f'{k} {e[k]}' for k in ('python','numpy','cupy','torch','gpu') if k in e))" "$OUT/env.json")"
if [ "$gpu" != "1" ] && [ "${GPU_CHECK_FORCE:-0}" = "1" ]; then
    say "no GPU ($why), but GPU_CHECK_FORCE=1: running every part anyway (a test of this script)"
elif [ "$gpu" != "1" ]; then
    say "no GPU: $why"
    say "nothing was run on a GPU (tests skipped, no benchmark); this is the dry run"
    finish no-gpu 0 "$why"
fi
say "GPU: $("$PY" -c "import json,sys; e=json.load(open(sys.argv[1])); print(e.get('gpu'), e.get('gpu_mem_gib'), 'GiB')" "$OUT/env.json")"

# 1. tests --------------------------------------------------------------------------------
status=pass
t=$(( $(left) - 150 ))                  # keep >= 150 s for the benchmark
[ $t -gt "$TESTS_MAX" ] && t=$TESTS_MAX
[ $t -lt 60 ] && t=60
say "tests (timeout ${t} s): tests/test_gpu.py tests/test_devices.py tests/test_amp.py"
timeout -k 10 "$t" "$PY" -m pytest -p no:cacheprovider -rsx \
    tests/test_gpu.py tests/test_devices.py tests/test_amp.py \
    --junitxml "$OUT/pytest.xml" > "$OUT/pytest.txt" 2>&1
rc=$?
say "  exit $rc: $(tail -n 1 "$OUT/pytest.txt")"
if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
    say "  TIMED OUT after ${t} s (see pytest.txt)"; status=fail
elif [ $rc -ne 0 ]; then
    status=fail
    grep -E '^(FAILED|ERROR)' "$OUT/pytest.txt" | head -20 | sed 's/^/  /' | tee -a "$SUMMARY"
fi
cuda_skips=$(awk '/GPU test skipped/ && match($0, /SKIPPED \[[0-9]+\]/) {
    s += substr($0, RSTART + 9, RLENGTH - 10) } END { print s + 0 }' "$OUT/pytest.txt")
[ "$cuda_skips" -gt 0 ] && { say "  $cuda_skips GPU tests were skipped: they did not run on the GPU"; status=fail; }

# 2. benchmark ----------------------------------------------------------------------------
b=$(( $(left) - 10 ))
if [ $b -lt 40 ]; then
    say "benchmark: skipped, only ${b} s left"
else
    say "benchmark (budget ${b} s): python -m bench.gpu_bench"
    timeout -k 10 "$b" "$PY" -m bench.gpu_bench --budget $(( b - 15 )) --json "$OUT/bench.json" \
        > "$OUT/bench.md" 2> "$OUT/bench.err"
    rc=$?
    say "  exit $rc$( [ $rc -eq 124 ] && echo ' (timed out)')"
    cat "$OUT/bench.md" >> "$SUMMARY"
    cat "$OUT/bench.md"
fi
finish "$status" 1 ""
