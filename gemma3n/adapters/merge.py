"""`gemma3n merge BASE ADAPTER DST`: a float checkpoint folder with a LoRA adapter folded into its weights.

Streamed: each tensor is read from the base's memory map and written (adapted ones as W + scaling * B A, computed in
float32 and rounded once to the stored dtype, as PEFT's merge_and_unload does), so the base is never resident
whole. The result is a plain checkpoint folder, loadable by gemma3n and by transformers.
"""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import torch

from ..checkpoint.safetensors import Checkpoint
from ..checkpoint.weights import text_key_map
from ..checkpoint.writer import new_folder, write_checkpoint
from ..config import ModelConfig
from ..convert.quantized import copy_side_files, stored_plan
from .peft_format import adapter_layers, is_unused_shared_kv


def merge_adapter(base: str | Path, adapter: str | Path, destination: str | Path) -> dict:
    base, destination = Path(base).expanduser(), Path(destination).expanduser()
    if base.suffix.lower() == ".gguf":
        raise ValueError(f"{base} is a GGUF file, whose weights are quantised blocks: merging would change them. "
                         f"Use the adapter beside it instead (--adapter {adapter}), or merge into the float "
                         f"checkpoint folder it was made from")
    if not (base / "config.json").is_file():
        raise FileNotFoundError(f"{base}: not a checkpoint folder (no config.json)")
    if stored_plan(base) is not None:
        raise ValueError(f"{base} is quantised (written by `gemma3n quantize`); merge into the float checkpoint, then "
                         f"quantise the merged one, or use the adapter beside it (--adapter {adapter})")
    if destination.exists() and (not destination.is_dir() or any(destination.iterdir())):
        raise FileExistsError(f"{destination} exists and is not empty; choose a new folder")
    config = ModelConfig.from_file(base / "config.json")
    tensors = Checkpoint(base)
    keys = text_key_map(list(tensors), getattr(config.text, "first_shared_layer", None))
    deltas = {}
    for name, path, a, b, rank, alpha, rslora in adapter_layers(adapter):
        stored = keys.source(path + ".weight")
        if stored not in tensors:
            if is_unused_shared_kv(path):
                continue
            raise ValueError(f"{adapter}: the adapter targets {name!r}, which {base} does not have")
        scaling = alpha / math.sqrt(rank) if rslora else alpha / rank
        if tuple(tensors.shape(stored)) != (b.shape[0], a.shape[1]):
            raise ValueError(f"{adapter}: {name} is [{b.shape[0]}, {a.shape[1]}] but {stored} is "
                             f"{list(tensors.shape(stored))}; the adapter does not fit this base model")
        deltas[stored] = (a, b, scaling)

    def produce(name: str):
        def make() -> torch.Tensor:
            weight = tensors[name]
            if name not in deltas:
                return weight
            a, b, scaling = deltas[name]
            return (weight.float() + (b.float() @ a.float()) * scaling).to(weight.dtype)
        return make

    entries = [(n, tuple(tensors.shape(n)), tensors[n].dtype, produce(n)) for n in sorted(tensors)]
    with new_folder(destination) as work:
        write_checkpoint(work, entries)
        shutil.copy2(base / "config.json", work / "config.json")
        copy_side_files(base, work)
        (work / "merged_adapter.json").write_text(json.dumps({"base": str(base), "adapter": str(adapter),
                                                              "merged_layers": len(deltas)}, indent=2) + "\n")
    return {"merged_layers": len(deltas), "tensors": len(entries), "destination": str(destination)}
