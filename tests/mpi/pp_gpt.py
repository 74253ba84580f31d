"""A gpt.model.GPT as the three pieces parallel.pipeline cuts into stages (parallel never
imports gpt, so the adapter lives with its users: the pipeline tests and bench/bench_pp.py).

    first(idx) -> h          token embedding + positions + dropout: GPT.forward's first lines
    blocks                   the model's own blocks, unchanged
    last(h, targets) -> loss final norm, LM head (the token embedding's matrix when tied),
                             cross-entropy: GPT.forward's last lines

The pieces hold the model's own modules, so their parameters are the model's (the same
objects): a stage built from them trains the model in place.
"""
import nn
from nn import functional as F


class Embed(nn.Module):
    def __init__(self, gpt):
        super().__init__()
        self.wte, self.wpe, self.drop = gpt.wte, gpt.wpe, gpt.drop

    def forward(self, idx):
        x = self.wte(idx)                                  # (b, T) -> (b, T, C)
        if self.wpe is not None:
            x = x + self.wpe(idx.shape[1])                 # + (T, C)
        return self.drop(x)


class Head(nn.Module):
    def __init__(self, gpt):
        super().__init__()
        self.ln_f = gpt.ln_f
        self.wte = gpt.wte if gpt.lm_head is None else None       # the tied matrix
        self.lm_head = gpt.lm_head

    def forward(self, h, targets):
        w = self.wte.weight if self.lm_head is None else self.lm_head.weight
        logits = F.linear(self.ln_f(h), w)                 # (b, T, C) -> (b, T, V)
        return F.cross_entropy(logits, targets)


def gpt_pieces(gpt):
    """-> (first, blocks, last, tied): what parallel.build_stage and PipelineExecutor take."""
    tied = [gpt.wte.weight] if gpt.lm_head is None else []
    return Embed(gpt), list(gpt.blocks), Head(gpt), tied
