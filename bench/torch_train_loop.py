"""What ``tensorlite-gpt train`` does, as a PyTorch eager training loop (nanoGPT's train.py
shape): the baseline of ``bench/train_cmd_bench.py``. Imported nowhere; run by the driver in
~/.bench-venv (torch is never a project dependency).

    python bench/torch_train_loop.py --data DIR --out DIR --n-layer 4 --n-head 4 --d-model 128
        --block-size 64 --batch-size 12 --max-steps 2000 [--attn sdpa|manual] [--threads N]

The same work per run as the command with ``--eval-interval 250 --eval-steps 20
--log-interval 1``: random batches sliced from the memory-mapped train.bin (re-opened per
batch, as nanoGPT and tensorlite's loader do), forward + cross-entropy, backward,
global-norm clipping (1.0), AdamW (betas 0.9/0.95, weight decay 0.1 on matrices only) with
warmup + cosine learning rate, one JSON log line per step (loss.item()), an evaluation
every 250 steps (and at the end) over the first 20 sequential validation batches, a
checkpoint (model + optimizer) after each evaluation. What it does not do that the command
does: draw loss.png after each evaluation.
"""
import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from torch_ref import GPT  # noqa: E402

HEADER_SIZE = 64          # gpt/data/shards.py: a 64-byte header, then the tokens


def tokens(path: Path, dtype) -> np.memmap:
    n = (path.stat().st_size - HEADER_SIZE) // np.dtype(dtype).itemsize
    return np.memmap(path, dtype=dtype, mode="r", offset=HEADER_SIZE, shape=(n,))


def main():
    ap = argparse.ArgumentParser()
    for k, v in (("n-layer", 4), ("n-head", 4), ("d-model", 128), ("block-size", 64),
                 ("batch-size", 12), ("max-steps", 2000), ("eval-interval", 250),
                 ("eval-steps", 20), ("warmup-steps", 50), ("threads", 0), ("seed", 1337)):
        ap.add_argument(f"--{k}", type=int, default=v)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--min-lr", type=float, default=2e-4)
    ap.add_argument("--data", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--attn", default="sdpa", choices=["sdpa", "manual"])
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    data, out = Path(a.data), Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = json.loads((data / "meta.json").read_text())
    vocab = int(meta.get("vocab_size") or meta["tokenizer"]["vocab_size"])
    dtype = np.uint16 if vocab <= 65536 else np.uint32
    cfg = dict(vocab_size=vocab, n_layer=a.n_layer, n_head=a.n_head, d_model=a.d_model,
               block_size=a.block_size)
    model = GPT(cfg, a.attn)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=a.lr, betas=(0.9, 0.95))
    b, t = a.batch_size, a.block_size
    rng = np.random.default_rng(a.seed)

    def batch(split, starts):
        toks = tokens(data / f"{split}.bin", dtype)         # re-opened: nothing stays mapped
        rows = np.stack([toks[s:s + t + 1].astype(np.int64) for s in starts])
        return torch.from_numpy(rows[:, :-1]), torch.from_numpy(rows[:, 1:])

    n_train = tokens(data / "train.bin", dtype).shape[0]
    n_val = tokens(data / "val.bin", dtype).shape[0]

    def lr_at(step):
        if step < a.warmup_steps:
            return a.lr * (step + 1) / (a.warmup_steps + 1)
        r = (step - a.warmup_steps) / max(1, a.max_steps - a.warmup_steps)
        return a.min_lr + (a.lr - a.min_lr) * 0.5 * (1.0 + math.cos(math.pi * r))

    @torch.no_grad()
    def evaluate():
        model.eval()
        losses = []
        for i in range(a.eval_steps):
            starts = [(i * b + r) * t % max(1, n_val - t - 1) for r in range(b)]
            losses.append(model(*batch("val", starts))[1].item())
        model.train()
        return float(np.mean(losses))

    log = open(out / "log.jsonl", "w")
    t_last = time.perf_counter()
    for step in range(a.max_steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        x, y = batch("train", rng.integers(0, n_train - t - 1, b))
        loss = model(x, y)[1]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        now = time.perf_counter()
        log.write(json.dumps({"step": step + 1, "loss": loss.item(), "lr": lr_at(step),
                              "grad_norm": round(float(norm), 5),
                              "tokens_per_s": round(b * t / (now - t_last), 1)}) + "\n")
        log.flush()
        t_last = now
        if (step + 1) % a.eval_interval == 0 or step + 1 == a.max_steps:
            val = evaluate()
            log.write(json.dumps({"step": step + 1, "val_loss": val}) + "\n")
            tmp = out / "ckpt.pt.tmp"
            torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "step": step + 1},
                       tmp)
            os.replace(tmp, out / "ckpt.pt")
            print(f"step {step + 1}: validation loss {val:.4f}", flush=True)
    log.close()


if __name__ == "__main__":
    main()
