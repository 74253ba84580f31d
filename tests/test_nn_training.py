"""Layers + optimizer together learn: a tiny transformer learns a synthetic sequence task."""
import numpy as np

import nn
import tensorlite as tl
from nn import functional as F


class TinyLM(nn.Module):
    def __init__(self, vocab, d, block):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.pos = nn.LearnedPositionalEmbedding(block, d)
        self.block = nn.TransformerBlock(d, 2)
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab)

    def forward(self, idx):
        x = self.emb(idx) + self.pos(idx.shape[1])
        return self.head(self.ln(self.block(x)))


def test_tiny_transformer_learns_to_copy_with_attention():
    # sequences "a b c d | a b c d": the second half is predictable only by attending back
    tl.manual_seed(0)
    rng = np.random.default_rng(0)
    vocab, half = 8, 6
    model = TinyLM(vocab, 32, 2 * half)
    opt = nn.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    losses = []
    for step in range(150):
        first = rng.integers(0, vocab, (32, half))
        seq = np.concatenate([first, first], axis=1)
        x, y = tl.tensor(seq[:, :-1]), tl.tensor(seq[:, 1:])
        logits = model(x)
        # score only the copied half (positions half-1 .. end predict the repeat)
        y_masked = y.numpy().copy()
        y_masked[:, : half - 1] = -100
        loss = F.cross_entropy(logits, tl.tensor(y_masked))
        opt.zero_grad()
        loss.backward()
        nn.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
    start, end = np.mean(losses[:5]), np.mean(losses[-5:])
    assert start > 1.8                      # ~log(8) = 2.08 at the start
    assert end < start / 10, f"loss fell only from {start:.3f} to {end:.3f}"


def test_mlp_learns_xor_with_sgd_momentum():
    tl.manual_seed(1)
    x = tl.tensor([[0, 0], [0, 1], [1, 0], [1, 1]], dtype=tl.float32)
    y = tl.tensor([0, 1, 1, 0])
    mlp = nn.Sequential(nn.Linear(2, 16), nn.ReLU(), nn.Linear(16, 2))
    opt = nn.SGD(mlp.parameters(), lr=0.1, momentum=0.9)
    first = None
    for _ in range(300):
        loss = F.cross_entropy(mlp(x), y)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < first / 20
    assert (mlp(x).numpy().argmax(-1) == y.numpy()).all()
