"""A .gguf file -> (config, language model, None): GGUF models are text-only (llama.cpp keeps the towers in a
separate mmproj file, which is not read).

Tensors the native kernels compute from directly (quantised and 16-bit linears, the token embedding) stay the
file's blocks; the rest are dequantised one at a time; the per-layer table stays in the file (rows dequantised per
lookup). With `quantize`, each planned weight is dequantised and re-quantised on its own, never the whole model."""
from __future__ import annotations

import torch
from torch import nn

from ..checkpoint.skeleton import uninitialised_meta
from ..checkpoint.gguf import PLE_NAME, GGUFRowEmbedding, read_gguf
from ..checkpoint.gguf_file import GGUFFile
from ..checkpoint.weights import assemble, text_key_map
from ..model.families import text_model_class
from ..quant import apply_plan, deferred_tensors, plan_for
from ..quant.gguf_modules import GGUFEmbedding, GGUFLinear, raw_rows, supported
from .folder import first_shared_layer


def load_gguf(file: GGUFFile, dtype: torch.dtype | None, quantize=None, device: str = "cpu"):
    """`file` is the parsed .gguf (checkpoint/gguf_file.py), which the tokenizer also reads."""
    path = file.path
    config, tensors = read_gguf(file, dtype)
    keys = text_key_map(list(tensors), first_shared_layer(config))
    cls = text_model_class(config)
    chosen, scheme = plan_for(lambda: cls(config.text), quantize)
    deferred = {keys.source(p + ".weight"): p for p in chosen}
    if PLE_NAME in tensors:
        deferred[PLE_NAME] = "model.embed_tokens_per_layer"
    # the native kernels read the file's blocks on the CPU; elsewhere (and with quantize=) tensors are dequantised
    kept = {} if chosen or device != "cpu" else kept_as_stored(meta_skeleton(cls, config), tensors, keys)
    deferred.update({keys.source(p + ".weight"): p for p in kept})
    lm = assemble(lambda: cls(config.text), deferred_tensors(tensors, deferred), keys, dtype, lambda name: str(path))
    if PLE_NAME in tensors:
        lm.model.embed_tokens_per_layer = GGUFRowEmbedding(tensors.row_table(PLE_NAME))
    swap_in_gguf_modules(lm, kept, tensors.dtype)
    if chosen:
        apply_plan(lm, chosen, scheme.group_size, weights=lambda p: tensors[keys.source(p + ".weight")])
    lm.quant_scheme = scheme
    return config, lm, None


def meta_skeleton(cls, config) -> nn.Module:
    with uninitialised_meta():
        return cls(config.text)


def kept_as_stored(skeleton: nn.Module, tensors, keys) -> dict[str, tuple]:
    """Module path -> (GGML type, stored rows) for the linears and the token embedding that the native kernels
    compute from the file's blocks directly (quantised and 16-bit types; float32 tensors load as they are)."""
    kept = {}
    for path, module in skeleton.named_modules():
        if path == "model.embed_tokens_per_layer" or not (
                (type(module) is nn.Linear and module.bias is None) or type(module) is nn.Embedding):
            continue
        stored = tensors.stored(keys.source(path + ".weight"))
        if stored is not None and stored[0] != 0 and supported(stored[0], module.weight.shape[1]):
            kept[path] = stored
    return kept


def swap_in_gguf_modules(lm: nn.Module, kept: dict, dtype: torch.dtype) -> None:
    for path, (ggml_type, data) in kept.items():
        parent, _, name = path.rpartition(".")
        old = lm.get_submodule(path)
        cls = GGUFEmbedding if isinstance(old, nn.Embedding) else GGUFLinear
        setattr(lm.get_submodule(parent), name, cls(raw_rows(data), ggml_type, old.weight.shape[1], dtype))
