"""From checkpoint tensor names to a built model: key layouts, strict checks, dtype, meta-device assembly.

The model is constructed on the meta device (no memory, no random init) and its parameters are then *assigned*
the checkpoint tensors: views of the memory map when the stored dtype is kept, one converted copy otherwise.
So loading never holds a checkpoint twice in RAM.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Mapping

import torch
from torch import nn

from .skeleton import uninitialised_meta
from .safetensors import CheckpointError

# Text decoder prefixes of the two Hugging Face layouts, most specific first:
# Gemma3n/Gemma3ForConditionalGeneration ("model.language_model."), *ForCausalLM ("model."), a bare text model ("").
_TEXT_PREFIXES = ("model.language_model.", "language_model.model.", "model.", "")
# Parts of a multimodal checkpoint that the text decoder does not own (their encoders load them on demand).
TOWER_PREFIXES = ("model.vision_tower.", "model.audio_tower.", "model.embed_vision.", "model.embed_audio.",
                  "model.multi_modal_projector.", "vision_tower.", "multi_modal_projector.")
# K/V weights that layers sharing another layer's cache still carry in the released files; never used.
_SHARED_KV = re.compile(r"layers\.(\d+)\.self_attn\.(k_proj|v_proj|k_norm|v_norm)\.weight$")

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def resolve_dtype(dtype) -> torch.dtype | None:
    """None (keep the stored dtype), a torch dtype, or one of the names in DTYPES."""
    if dtype is None or isinstance(dtype, torch.dtype):
        if dtype not in (None, torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"dtype {dtype} is not supported; use float32, bfloat16 or float16")
        return dtype
    if isinstance(dtype, str) and dtype.lower() in DTYPES:
        return DTYPES[dtype.lower()]
    raise ValueError(f"dtype {dtype!r} is not supported; use one of {sorted(DTYPES)}")


@dataclass
class KeyMap:
    """Module state-dict key -> checkpoint tensor name, for one checkpoint layout."""

    mapping: dict[str, str]
    prefix: str  # checkpoint prefix of the text decoder, e.g. "model.language_model."
    unknown: list[str]  # names that belong to nothing we know

    def source(self, module_key: str) -> str:
        return self.mapping.get(module_key) or self.prefix + module_key.removeprefix("model.")


def text_key_map(names: list[str], first_shared_layer: int | None) -> KeyMap:
    """Map checkpoint names to the text model's state-dict names ("model.<rest>").

    Tower weights, the tied `lm_head.weight` and the unused K/V of shared layers are neither mapped nor unknown.
    """
    text_names = [n for n in names if not n.startswith(TOWER_PREFIXES) and n != "lm_head.weight"]
    prefix = next(p for p in _TEXT_PREFIXES if p == "" or any(n.startswith(p + "embed_tokens.") for n in text_names))
    mapping, unknown = {}, []
    for name in text_names:
        if not name.startswith(prefix):
            unknown.append(name)
            continue
        rest = name[len(prefix):]
        shared = _SHARED_KV.match(rest)
        if shared and first_shared_layer is not None and int(shared.group(1)) >= first_shared_layer:
            continue
        mapping["model." + rest] = name
    return KeyMap(mapping, prefix, unknown)


def assemble(build: Callable[[], nn.Module], tensors: Mapping[str, torch.Tensor], keys: KeyMap,
             dtype: torch.dtype | None, where: Callable[[str], str]) -> nn.Module:
    """Build a module on the meta device and assign it the mapped checkpoint tensors, strictly.

    `where(checkpoint_key)` names the file a tensor comes from, for error messages.
    """
    with uninitialised_meta():
        module = build()
    expected, key_map = module.state_dict(), keys.mapping
    missing = [k for k in expected if k not in key_map]
    if missing:
        raise CheckpointError(f"{where('')}: tensor '{keys.source(missing[0])}' is missing "
                              f"({len(missing)} missing in all); the checkpoint does not match its config.json")
    unexpected = keys.unknown + [key_map[k] for k in key_map if k not in expected]
    if unexpected:
        raise CheckpointError(f"{where(unexpected[0])}: unexpected tensor '{unexpected[0]}' "
                              f"({len(unexpected)} in all); the checkpoint does not match its config.json")
    state = {}
    keep_stored = set(getattr(module, "stored_dtype_keys", ()))  # tables read row by row (see their module)
    for key, param in expected.items():
        tensor = tensors[key_map[key]]
        if tuple(tensor.shape) != tuple(param.shape):
            raise CheckpointError(f"{where(key_map[key])}: tensor '{key_map[key]}' has shape {tuple(tensor.shape)}, "
                                  f"but config.json implies {tuple(param.shape)}")
        if not param.is_floating_point():  # quantised weights (gemma3n.quant): the stored integer type exactly
            if tensor.dtype != param.dtype:
                raise CheckpointError(f"{where(key_map[key])}: tensor '{key_map[key]}' is {tensor.dtype}, "
                                      f"expected {param.dtype} for a quantised weight")
            state[key] = tensor
            continue
        if not tensor.is_floating_point():
            raise CheckpointError(f"{where(key_map[key])}: tensor '{key_map[key]}' is {tensor.dtype}, not floating point")
        state[key] = tensor.to(dtype) if dtype is not None and key not in keep_stored else tensor
    module.load_state_dict(state, strict=True, assign=True)
    return module.eval().requires_grad_(False)


def prefixed_key_map(names: list[str], prefix: str) -> KeyMap:
    """Key map of one sub-model stored under `prefix` (a tower, an embedder): a plain prefix strip."""
    return KeyMap({n[len(prefix):]: n for n in names if n.startswith(prefix)}, prefix, [])
