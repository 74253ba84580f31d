"""AdamW step on a ~10M-parameter GPT-shaped model: tensorlite's AdamW vs alternatives.

Run from the repo root: ``python -m bench.bench_optim`` (a few seconds). It compares nn.optim's
AdamW (updates in cache-sized blocks, the default) with the same update on whole arrays, a
textbook NumPy version, and a flat-buffer "fused" variant, and checks that blocked and
whole-array updates give bit-identical parameters. It reaches into nn.optim's internals
(``_CPU_BLOCK``, ``_adam_update``) on purpose: update it when those change.
"""
import time
import numpy as np
import tensorlite as tl
from nn.module import Parameter
import nn.optim as optim_mod
from nn.optim import AdamW, _adam_update

d, V, T, L = 384, 8192, 256, 4
shapes = [(V, d), (T, d)]
for _ in range(L):
    shapes += [(d,), (d,), (d, 3 * d), (3 * d,), (d, d), (d,), (d,), (d,), (d, 4 * d), (4 * d,), (4 * d, d), (d,)]
shapes += [(d,), (d,)]
rng = np.random.default_rng(0)
params = [Parameter(tl.tensor(rng.standard_normal(s).astype(np.float32) * 0.02)) for s in shapes]
for p in params:
    p.grad = tl.tensor(rng.standard_normal(p.shape).astype(np.float32) * 1e-3)
n = sum(p.numel() for p in params)
lr, b1, b2, eps, wd = 1e-3, 0.9, 0.999, 1e-8, 0.1

opt = AdamW(params, lr=lr, weight_decay=wd)
params2 = [Parameter(tl.tensor(p.data.copy())) for p in params]
for p, q in zip(params, params2):
    q.grad = tl.tensor(p.grad.data.copy())
opt_plain = AdamW(params2, lr=lr, weight_decay=wd)

def plain_step():                  # the same optimizer with blocking switched off
    old, optim_mod._CPU_BLOCK = optim_mod._CPU_BLOCK, 1 << 62
    try:
        opt_plain.step()
    finally:
        optim_mod._CPU_BLOCK = old

P = [p.data.copy() for p in params]; G = [p.grad.data for p in params]
M = [np.zeros_like(x) for x in P]; Vv = [np.zeros_like(x) for x in P]
state = {"t": 0}

def naive():                       # the equations as written, every temporary allocated
    state["t"] += 1; t = state["t"]
    for i, (g) in enumerate(G):
        P[i] = P[i] - lr * wd * P[i]
        M[i] = b1 * M[i] + (1 - b1) * g
        Vv[i] = b2 * Vv[i] + (1 - b2) * g * g
        P[i] = P[i] - lr * (M[i] / (1 - b1 ** t)) / (np.sqrt(Vv[i] / (1 - b2 ** t)) + eps)

FP = np.concatenate([x.ravel() for x in P]); FG = np.empty(n, np.float32)
FM = np.zeros(n, np.float32); FV = np.zeros(n, np.float32)
offs = np.cumsum([0] + [x.size for x in P])
fstate = {"t": 0}

def flat():                        # one flat buffer per group: grads copied in, one update
    fstate["t"] += 1
    for i, g in enumerate(G):
        FG[offs[i]:offs[i + 1]] = g.reshape(-1)
    _adam_update(FP, FG, FM, FV, fstate["t"], lr, b1, b2, eps, wd)

CH = 1 << 17
def flat_chunked():                # ... and processed in cache-sized blocks
    fstate["t"] += 1
    for i, g in enumerate(G):
        FG[offs[i]:offs[i + 1]] = g.reshape(-1)
    for s in range(0, n, CH):
        e = min(n, s + CH)
        _adam_update(FP[s:e], FG[s:e], FM[s:e], FV[s:e], fstate["t"], lr, b1, b2, eps, wd)

def bench(f, reps=15):
    f(); f()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter(); f(); ts.append(time.perf_counter() - t0)
    return np.median(ts) * 1e3, min(ts) * 1e3

print(f"AdamW step, {len(shapes)} tensors, {n/1e6:.1f}M float32 parameters")
base = None
for name, f in [("AdamW.step (blocked, default)", opt.step),
                ("AdamW.step plain (whole arrays)", plain_step), ("naive textbook NumPy", naive),
                ("flat buffer (fused group)", flat), ("flat buffer + 128K blocks", flat_chunked)]:
    med, mn = bench(f)
    base = base or med
    print(f"{name:34s} median {med:7.1f} ms  min {mn:7.1f} ms  x{med/base:4.2f}")


assert all(np.array_equal(p.data, q.data) for p, q in zip(params, params2)), "blocked != plain"
print("blocked and plain AdamW gave bit-identical parameters")
