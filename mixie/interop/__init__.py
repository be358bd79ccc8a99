"""Interoperability with the PyTorch world: experts out as PEFT LoRA adapters, PEFT adapters in."""

from mixie.interop.export import *  # noqa: F401,F403  (until the split into modules)
from mixie.interop.export import EXPERT_JSON, FORMAT  # noqa: F401
