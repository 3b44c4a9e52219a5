"""Loading the vision side of a `Gemma3ForConditionalGeneration` checkpoint: the projector now, the SigLIP tower
when a prompt first holds an image. The released checkpoints (transformers 4.5x) keep them under
`vision_tower.vision_model.` and `multi_modal_projector.`; transformers 5 writes `vision_tower.` (and reads either).
Every tensor of the vision side must be claimed by one of the two modules, and every tower tensor must be there
(strict, checked when the checkpoint loads)."""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from ..checkpoint.skeleton import uninitialised_meta
from ..checkpoint.safetensors import CheckpointError
from ..checkpoint.weights import TOWER_PREFIXES, assemble, prefixed_key_map

# Where the tower and the projector may live, most specific first: transformers' in-memory names, the released
# checkpoints' (4.5x), and what transformers 5 writes back (its conversion drops "vision_model.").
TOWER_PREFIXES_G3 = ("model.vision_tower.vision_model.", "vision_tower.vision_model.", "model.vision_tower.",
                     "vision_tower.")
PROJECTOR_PREFIXES = ("model.multi_modal_projector.", "multi_modal_projector.")


def load_gemma3_vision(config, tensors, dtype: torch.dtype | None, device: str, where: Callable[[str], str],
                       scheme=None) -> nn.Module | None:
    """A `Gemma3Multimodal` with its projector loaded and a loader for its tower; None for a text-only checkpoint
    (model_type gemma3_text, or a conditional-generation config whose file holds no vision tensors at all)."""
    names = list(tensors)
    vision_names = [n for n in names if n.startswith(TOWER_PREFIXES)]
    if config.vision is None or not vision_names:
        if vision_names:
            raise CheckpointError(f"{where(vision_names[0])}: tensor '{vision_names[0]}' belongs to a vision tower "
                                  "but config.json has no vision_config; the checkpoint does not match its config")
        return None
    tower_prefix = next((p for p in TOWER_PREFIXES_G3 if p + "embeddings.patch_embedding.weight" in tensors),
                        TOWER_PREFIXES_G3[0])
    projector_prefix = next((p for p in PROJECTOR_PREFIXES if p + "mm_input_projection_weight" in tensors),
                            PROJECTOR_PREFIXES[0])
    stray = [n for n in vision_names if not n.startswith((tower_prefix, projector_prefix))]
    if stray:
        raise CheckpointError(f"{where(stray[0])}: unexpected tensor '{stray[0]}' ({len(stray)} in all); a Gemma 3 "
                              f"checkpoint keeps its vision side under '{tower_prefix}' and '{projector_prefix}'")
    from ..model.gemma3_multimodal import Gemma3Multimodal
    projector_keys = prefixed_key_map(names, projector_prefix)
    projector_keys.mapping = {"multi_modal_projector." + k: v for k, v in projector_keys.mapping.items()}
    mm = assemble(lambda: Gemma3Multimodal(config), tensors, projector_keys, dtype, where).to(device)
    if not any(n.startswith(tower_prefix) for n in names):
        raise CheckpointError(f"{where('')}: no tensor under '{tower_prefix}'; the checkpoint's vision tower is "
                              "missing (config.json has a vision_config)")
    _check_tower_names(config, names, tower_prefix, where)
    mm.set_tower_loader("vision", _tower_loader(config, tensors, tower_prefix, dtype, device, where, scheme))
    return mm


def _check_tower_names(config, names: list[str], prefix: str, where) -> None:
    """The tower's tensors against its skeleton (built on the meta device: free), now rather than at the first
    image, so that a checkpoint that does not match its config fails when it is loaded."""
    from ..model.siglip import build_siglip_tower
    with uninitialised_meta():
        expected = {prefix + k for k in build_siglip_tower(dict(config.vision)).state_dict()}
    stored = {n for n in names if n.startswith(prefix)}
    for kind, found in (("missing", sorted(expected - stored)), ("unexpected", sorted(stored - expected))):
        if found:
            raise CheckpointError(f"{where(found[0] if kind == 'unexpected' else '')}: {kind} tensor '{found[0]}' "
                                  f"({len(found)} {kind} in all); the checkpoint does not match its config.json")


def _tower_loader(config, tensors, prefix: str, dtype, device: str, where, scheme=None):
    def load() -> nn.Module:
        from ..model.siglip import build_siglip_tower
        keys = prefixed_key_map(list(tensors), prefix)
        tower = assemble(lambda: build_siglip_tower(dict(config.vision)), tensors, keys, dtype, where)
        if scheme is not None:  # the scheme in force names a format for the towers ("vision": "int8")
            from ..quant import quantize_module
            tower = quantize_module(tower, scheme.vision, scheme.group_size)
        return tower.to(device)
    return load
