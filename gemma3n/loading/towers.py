"""The multimodal part of a checkpoint: the embedders (small) at load time, each tower when a prompt first needs
it (a text-only conversation never pays for the towers)."""
from __future__ import annotations

import torch
from torch import nn

from ..checkpoint.weights import KeyMap, assemble, prefixed_key_map
from ..config import ModelConfig

# Where each part of a Gemma 3n multimodal checkpoint lives.
EMBEDDER_PREFIXES = ("model.embed_vision.", "model.embed_audio.")
TOWER_WEIGHTS = {"vision": "model.vision_tower.timm_model.", "audio": "model.audio_tower."}


def load_multimodal(config: ModelConfig, tensors, dtype, device: str, where, scheme=None) -> nn.Module | None:
    """Gemma 3n's `Multimodal` or Gemma 3's `Gemma3Multimodal` with loaders for their towers; None for a text-only
    checkpoint."""
    names = list(tensors)
    if config.family == "gemma3":  # Gemma 3's SigLIP tower and projector
        from .gemma3_vision import load_gemma3_vision
        return load_gemma3_vision(config, tensors, dtype, device, where, scheme)
    if config.family != "gemma3n" or not any(n.startswith(EMBEDDER_PREFIXES) for n in names):
        return None
    from ..model.multimodal import Multimodal
    embedder_names = [n for n in names if n.startswith(EMBEDDER_PREFIXES)]
    mm = assemble(lambda: Multimodal(config), tensors, prefixed_key_map(embedder_names, "model."), dtype, where)
    mm = mm.to(device)
    for kind, prefix in TOWER_WEIGHTS.items():
        if any(n.startswith(prefix) for n in names):
            mm.set_tower_loader(kind, tower_loader(kind, config, tensors, prefix, dtype, device, where, scheme))
    return mm


def tower_loader(kind: str, config: ModelConfig, tensors, prefix: str, dtype, device: str, where, scheme=None):
    """A function that builds the `kind` ("vision", "audio") tower from `tensors` under `prefix` when called."""
    def load() -> nn.Module:
        if kind == "vision":
            from ..model.vision import build_vision_tower as build
            section = config.vision
        else:
            from ..model.audio import build_audio_tower as build
            section = config.audio
        keys: KeyMap = prefixed_key_map(list(tensors), prefix)
        tower = assemble(lambda: build(dict(section)), tensors, keys, dtype, where)
        if scheme is not None:  # the quantisation scheme in force names a format per tower ("vision": "int8")
            from ..quant import quantize_module
            tower = quantize_module(tower, getattr(scheme, kind), scheme.group_size)
        # 4-D conv weights channels-last, as the vision tower's maps are: oneDNN then never reorders them per call.
        return tower.to(device, memory_format=torch.channels_last) if kind == "vision" else tower.to(device)
    return load
