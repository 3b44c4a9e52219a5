"""Loading: a checkpoint folder, a .gguf file or a cached Hub id -> a `LoadedModel` record.

Nothing here generates text: the record holds what a runtime needs (config, language model, multimodal part,
tokenizer, the checkpoint's sampling defaults) and gemma3n.api.Model puts a small facade on top of it."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .. import kernels
from ..adapters.multi_lora import AdapterSet, attach_adapters
from ..adapters.peft_format import apply_adapter
from ..checkpoint.gguf import open_gguf
from ..checkpoint.hub import looks_like_hub_id, resolve_cached
from ..checkpoint.prefetch import prefetch_table
from ..checkpoint.safetensors import CheckpointError
from ..checkpoint.weights import resolve_dtype
from ..config import ModelConfig
from ..engine.heap import return_freed_heap
from ..engine.sampling import SamplingParams
from ..onnx.runtime import is_onnx_folder, load_onnx_folder
from ..processor.tokenizer import Tokenizer
from .folder import load_folder
from .gguf_file import load_gguf


@dataclass
class LoadedModel:
    config: ModelConfig
    language_model: nn.Module           # the decoder (causal LM), quantised modules swapped in where asked
    multimodal: nn.Module | None        # embedders + lazily loaded towers; None for a text-only checkpoint
    tokenizer: Tokenizer | None         # None for a folder that ships no tokenizer.json (ids in, ids out)
    defaults: SamplingParams            # generation_config.json, or greedy
    path: Path                          # the folder or file it came from
    adapters: AdapterSet | None = None  # adapters served beside the base, chosen per row (`adapters=`)


def resolve_path(path_or_id: str | Path) -> Path:
    """A folder, a file, or a Hub id found in the local Hugging Face cache -> a local path."""
    path = Path(path_or_id).expanduser()
    if path.exists():
        return path
    if isinstance(path_or_id, str) and looks_like_hub_id(path_or_id):
        return resolve_cached(path_or_id)
    raise FileNotFoundError(f"{path}: no such file or folder; pass a checkpoint folder, a .gguf file "
                            f"or a Hugging Face model id that is in the local cache")


def load_checkpoint(path_or_id: str | Path, dtype=None, device: str = "cpu", quantize=None,
                    activations: str | None = None, matformer=None, adapter=None, adapters=None,
                    onnx_dtype: str | None = None) -> LoadedModel:
    """See gemma3n.load for the arguments."""
    if activations is not None:
        kernels.set_activation_precision(activations)  # checked before any loading work
    path = resolve_path(path_or_id)
    if is_onnx_folder(path):
        return load_onnx(path, dtype, device, quantize, matformer, adapter or adapters, onnx_dtype)
    if onnx_dtype is not None:
        raise ValueError(f"{path}: --onnx-dtype applies to ONNX folders (onnx/*.onnx in the transformers.js "
                         "layout); this is not one")
    dtype = resolve_dtype(dtype)
    if path.is_dir():
        config, lm, multimodal = load_folder(path, dtype, device, quantize, matformer)
        tokenizer = folder_tokenizer(path)
    elif matformer is not None:
        raise ValueError(f"{path}: MatFormer slicing at load time needs a Gemma 3n safetensors checkpoint folder "
                         f"(not a .gguf file)")
    elif path.suffix.lower() == ".gguf":
        gguf = open_gguf(path)  # parsed once: the config, the tensors and the tokenizer all read it
        config, lm, multimodal = load_gguf(gguf, dtype, quantize, device)
        tokenizer = Tokenizer.from_gguf(gguf)
    else:
        raise CheckpointError(f"{path}: not a checkpoint folder or a .gguf file")
    if adapter is not None:  # before the device move and the sparse layout, which then see the merged weights
        apply_adapter(lm, adapter, config)
    if device != "cpu":
        lm = lm.to(device)
    if config.family == "gemma3n":
        from ..model.text import enable_sparse_decode
        enable_sparse_decode(lm)
    # after the sparse layout: the base layers they wrap are then laid out exactly as without adapters
    served = attach_adapters(lm, adapters) if adapters else None
    loaded = LoadedModel(config, lm, multimodal, tokenizer, generation_defaults(path), path, served)
    return_freed_heap()  # parsing a 262k-entry tokenizer.json leaves a lot of freed heap resident
    if config.family == "gemma3n":
        prefetch_per_layer_table(lm)  # last: its reads would queue ahead of the loading's own
    return loaded


def load_onnx(path: Path, dtype, device: str, quantize, matformer, adapter, onnx_dtype: str | None) -> LoadedModel:
    """An ONNX folder, run with onnxruntime (gemma3n/onnx/runtime.py); its weights are what the files hold."""
    given = {"dtype": dtype, "quantize": quantize, "matformer": matformer, "adapter": adapter}
    given = [name for name, value in given.items() if value is not None] + (["device"] if device != "cpu" else [])
    if given:
        raise ValueError(f"{path} is an ONNX folder: {', '.join(given)} do not apply to it (choose its sessions "
                         "with onnx_dtype / --onnx-dtype: fp32, fp16, q8, q4, q4f16)")
    config, lm, multimodal = load_onnx_folder(path, onnx_dtype)
    return LoadedModel(config, lm, multimodal, folder_tokenizer(path), generation_defaults(path), path)


def prefetch_per_layer_table(lm: nn.Module) -> None:
    """The per-layer table stays in the file and each token reads a row of it: read its pages ahead now
    (checkpoint/prefetch.py), so that a decode step does not wait on the disk for a row."""
    table = lm.model.embed_tokens_per_layer
    stored = getattr(table, "table", None)  # a GGUF table (checkpoint/gguf.py GGUFRowEmbedding)
    weight = stored.raw if stored is not None else getattr(table, "weight", None)
    if weight is None:  # a MatFormer slice's view of the stored table (matformer/tensors.py SlicedRowEmbedding)
        weight = getattr(table, "source", None)
    if isinstance(weight, torch.Tensor) and weight.device.type != "cpu":
        return
    if weight is not None:  # a tensor, or a GGUF table's numpy view of the map
        prefetch_table(weight)


def folder_tokenizer(folder: Path) -> Tokenizer | None:
    """A checkpoint folder's tokenizer, or None for a folder that ships none (ids in, ids out still work)."""
    return Tokenizer.from_pretrained_dir(folder) if (folder / "tokenizer.json").exists() else None


def generation_defaults(path: Path) -> SamplingParams:
    """generation_config.json when the checkpoint has one; otherwise greedy, as transformers does."""
    config = path / "generation_config.json" if path.is_dir() else None
    if config is not None and config.exists():
        return SamplingParams.from_generation_config(config)
    return SamplingParams(temperature=0.0)


__all__ = ["LoadedModel", "load_checkpoint", "resolve_path"]
