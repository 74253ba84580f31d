"""nn: layers, attention, transformer blocks, optimizers and checkpoints on top of tensorlite."""
from . import functional, reference
from .attention import KVCache, MultiHeadAttention
from .layers import GELU, Dropout, Embedding, Identity, LayerNorm, Linear, ReLU, RMSNorm, SiLU
from .module import Module, ModuleList, Parameter, Sequential
from .positional import LearnedPositionalEmbedding, RotaryEmbedding, SinusoidalPositionalEncoding
from .transformer import FeedForward, TransformerBlock
from .checkpoint import (CheckpointCorruptError, CheckpointError, CheckpointNotFoundError,
                         latest_checkpoint, load_checkpoint, load_state_dict_file, read_metadata,
                         save_checkpoint, save_state_dict, verify_checkpoint)
from .optim import SGD, Adam, AdamW, Optimizer, clip_grad_norm_
from .schedule import LambdaLR, LRScheduler, WarmupCosine, constant_lr, warmup_cosine
