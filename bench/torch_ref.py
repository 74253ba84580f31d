"""The benchmark's GPT in PyTorch eager: what a user would run instead of tensorlite.

The same GPT-2 architecture and init as gpt.model.GPT with its defaults (and as the team's
reference ../shared/bench/torch_gpt.py): token + learned position embeddings, pre-LN blocks
(causal self-attention, GELU-tanh MLP 4x), final LayerNorm, LM head tied to the token
embedding, biases in Linear/LayerNorm, no dropout. Attention is either written out
("manual": matmul, mask, softmax, matmul) or F.scaled_dot_product_attention ("sdpa").

Imported only by bench.gpt_bench's worker processes when ``import torch`` works: torch is
never a dependency of the project.
"""
import math
import time

import torch
import torch.nn as nn
import torch.nn.functional as F


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg, attn):
        super().__init__()
        self.n_head, self.d = cfg["n_head"], cfg["d_model"]
        self.qkv = nn.Linear(self.d, 3 * self.d)
        self.proj = nn.Linear(self.d, self.d)
        self.attn = attn
        bs = cfg["block_size"]
        self.register_buffer("mask", torch.tril(torch.ones(bs, bs, dtype=torch.bool)),
                             persistent=False)

    def forward(self, x, cache=None):
        """x (B, T, d). cache: None or a dict with 'k', 'v' (B, H, T_past, hd), extended in
        place: the new queries sit at positions past .. past + T - 1."""
        b, t, _ = x.shape
        hd = self.d // self.n_head
        q, k, v = (z.view(b, t, self.n_head, hd).transpose(1, 2)
                   for z in self.qkv(x).split(self.d, dim=2))
        past = 0
        if cache is not None:
            if "k" in cache:
                past = cache["k"].shape[2]
                k = torch.cat([cache["k"], k], dim=2)
                v = torch.cat([cache["v"], v], dim=2)
            cache["k"], cache["v"] = k, v
        mask = self.mask[past:past + t, :k.shape[2]]
        if self.attn == "sdpa":
            y = (F.scaled_dot_product_attention(q, k, v, is_causal=True) if past == 0 else
                 F.scaled_dot_product_attention(q, k, v, attn_mask=mask))
        else:
            att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(hd))
            y = F.softmax(att.masked_fill(~mask, float("-inf")), dim=-1) @ v
        return self.proj(y.transpose(1, 2).contiguous().view(b, t, self.d))


class Block(nn.Module):
    def __init__(self, cfg, attn):
        super().__init__()
        d = cfg["d_model"]
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = CausalSelfAttention(cfg, attn)
        self.fc, self.fc_proj = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x, cache=None):
        x = x + self.attn(self.ln1(x), cache)
        return x + self.fc_proj(F.gelu(self.fc(self.ln2(x)), approximate="tanh"))


class GPT(nn.Module):
    def __init__(self, cfg, attn="manual"):
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg["vocab_size"], cfg["d_model"])
        self.wpe = nn.Embedding(cfg["block_size"], cfg["d_model"])
        self.blocks = nn.ModuleList(Block(cfg, attn) for _ in range(cfg["n_layer"]))
        self.ln_f = nn.LayerNorm(cfg["d_model"])
        for name, p in self.named_parameters():      # GPT-2 init, as gpt.model.GPT
            if name.endswith("bias"):
                nn.init.zeros_(p)
            elif ".ln" in name or name.startswith("ln_f"):
                nn.init.ones_(p)
            elif name.endswith("proj.weight"):
                nn.init.normal_(p, 0.0, 0.02 / math.sqrt(2 * cfg["n_layer"]))
            else:
                nn.init.normal_(p, 0.0, 0.02)

    def forward(self, idx, targets=None, caches=None, pos0=0):
        t = idx.shape[1]
        x = self.wte(idx) + self.wpe(torch.arange(pos0, pos0 + t))
        for i, blk in enumerate(self.blocks):
            x = blk(x, None if caches is None else caches[i])
        logits = self.ln_f(x) @ self.wte.weight.t()          # tied LM head
        if targets is None:
            return logits, None
        return logits, F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))

    def num_parameters(self, non_embedding=False):
        n = sum(p.numel() for p in self.parameters())
        return n - self.wpe.weight.numel() if non_embedding else n

    def flops_per_token(self):
        """6N + 12 L T d, as gpt.model.GPT.flops_per_token (N without the position table)."""
        c = self.cfg
        return 6 * self.num_parameters(True) + 12 * c["n_layer"] * c["block_size"] * c["d_model"]


def make_train(cfg, attn, threads):
    """(model, fwd(x, y) -> loss, bwd(loss), opt_step()) for one training step in three
    timed phases. AdamW(lr 3e-4) with PyTorch's defaults, as tensorlite's AdamW."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = GPT(cfg, attn)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4)

    def fwd(x, y):
        return model(torch.from_numpy(x), torch.from_numpy(y))[1]

    def bwd(loss):
        opt.zero_grad(set_to_none=True)
        loss.backward()

    return model, fwd, bwd, opt.step


@torch.inference_mode()
def generate_timed(cfg, attn, threads, n_new, use_cache):
    """Greedy batch-1 generation of n_new tokens from a one-token prompt (prompt + n_new
    <= block_size, so the cache never has to be rebuilt); returns the seconds each new
    token took, in order."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = GPT(cfg, attn).eval()
    idx = torch.zeros((1, 1), dtype=torch.long)
    caches = [dict() for _ in model.blocks] if use_cache else None
    times, t = [], time.perf_counter()
    for i in range(n_new):
        if use_cache:
            logits, _ = model(idx if i == 0 else idx[:, -1:], caches=caches,
                              pos0=0 if i == 0 else idx.shape[1] - 1)
        else:
            logits, _ = model(idx)
        idx = torch.cat([idx, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
        now = time.perf_counter()
        times.append(now - t)
        t = now
    return times, idx[0].tolist()
