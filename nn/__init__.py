"""nn: layers, attention, transformer blocks, optimizers and checkpoints on top of tensorlite."""
from .module import Module, ModuleList, Parameter, Sequential
