"""nn: layers, attention, transformer blocks, optimizers and checkpoints on top of tensorlite."""
from . import functional, reference
from .attention import KVCache, MultiHeadAttention
from .layers import GELU, Dropout, Embedding, Identity, LayerNorm, Linear, ReLU, RMSNorm, SiLU
from .module import Module, ModuleList, Parameter, Sequential
from .positional import LearnedPositionalEmbedding, RotaryEmbedding, SinusoidalPositionalEncoding
from .transformer import FeedForward, TransformerBlock
