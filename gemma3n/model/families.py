"""The model family a config names -> its decoder class. A new family adds its class here (and its config parsing
in gemma3n/config.py); loading, quantisation and slicing find the class through this one table."""
from __future__ import annotations

from ..config import ModelConfig


def text_model_class(config: ModelConfig):
    """The decoder (causal LM) class for a config's family."""
    if config.family == "gemma3n":
        from .text import CausalLM
        return CausalLM
    from .gemma3 import Gemma3CausalLM
    return Gemma3CausalLM
