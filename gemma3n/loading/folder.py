"""A Hugging Face safetensors checkpoint folder -> (config, language model, multimodal part or None).

Float folders, folders written by `gemma3n quantize` (quantised modules built as skeletons and given the stored
tensors), a quantisation chosen at load time (each planned weight quantised on its own from the memory map, so no
float copy of the model is ever resident) and MatFormer slices read from the unsliced files."""
from __future__ import annotations

from pathlib import Path

import torch

from ..checkpoint.safetensors import Checkpoint, CheckpointError
from ..checkpoint.weights import assemble, text_key_map
from ..config import ModelConfig
from ..convert import stored_plan
from ..model.families import text_model_class
from ..quant import apply_plan, deferred_tensors, plan_for
from .towers import load_multimodal


def first_shared_layer(config: ModelConfig) -> int | None:
    return getattr(config.text, "first_shared_layer", None)


def load_folder(folder: Path, dtype: torch.dtype | None, device: str = "cpu", quantize=None, matformer=None):
    if not (folder / "config.json").exists():
        raise CheckpointError(f"{folder}: no config.json here; pass a Hugging Face checkpoint folder or a .gguf file")
    config = ModelConfig.from_file(folder / "config.json")
    tensors = Checkpoint(folder)
    if matformer is not None:  # a MatFormer slice read from the unsliced files (gemma3n/matformer)
        from ..matformer import elastic_view
        config, tensors = elastic_view(folder, tensors, matformer)
    keys = text_key_map(list(tensors), first_shared_layer(config))
    cls = text_model_class(config)
    stored = stored_plan(folder)
    if stored is not None and quantize is not None:
        raise ValueError(f"{folder} is already quantised ({stored[0].to_dict()}); load it without quantize=")
    build = (lambda: cls(config.text)) if stored is None else (
        lambda: apply_plan(cls(config.text), stored[1], stored[0].group_size))
    chosen, scheme = plan_for(build, quantize)
    source = {keys.source(p + ".weight"): p for p in chosen}
    ple_name = keys.source("model.embed_tokens_per_layer.weight")
    row_table = tensors.row_table(ple_name) if matformer is not None and ple_name in tensors else None
    if row_table is not None:  # the kept layers' blocks of the stored table, read per lookup
        source[ple_name] = "model.embed_tokens_per_layer"

    def where(name: str) -> str:
        return str(tensors.file_of(name)) if name in tensors else str(folder)

    lm = assemble(build, deferred_tensors(tensors, source), keys, dtype, where)
    if row_table is not None:
        lm.model.embed_tokens_per_layer = row_table
    if matformer is not None:
        lm.matformer = tensors.plan.spec
    if chosen:
        def weight(path: str) -> torch.Tensor:
            stored_weight = tensors[keys.source(path + ".weight")]
            return stored_weight if dtype is None else stored_weight.to(dtype)
        apply_plan(lm, chosen, scheme.group_size, weights=weight,
                   release=lambda path: tensors.release(keys.source(path + ".weight")))
    # the scheme in force, for encoders loaded later (gemma3n.quant.quantize_module(tower, scheme.vision, ...))
    lm.quant_scheme = stored[0] if stored is not None else scheme
    return config, lm, load_multimodal(config, tensors, dtype, device, where, lm.quant_scheme)
