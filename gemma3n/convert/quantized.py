"""Quantised checkpoints: `quantize_checkpoint(src, dst, scheme)` writes one; `stored_plan(folder)` reads it back.

The output is an ordinary safetensors folder whose config.json gains a "quantization" block:
    {"format": "gemma3n-weight-only-1", "scheme": {...}, "group_size": 64, "modules": {module path: "int8"|"int4"}}
A quantised linear `X` of the text decoder is stored as `X.qweight` + `X.scales` (int8) or `X.qweight` +
`X.scales_and_zeros` (int4) under the source's own prefix (formats.py describes the layouts); everything else is
copied as stored. The per-layer embedding table stays in its stored dtype: it is never resident (only the rows of
the tokens being processed are read), and quantising it is known to hurt quality (Ollama keeps it F16 in Q4_K
files). Tower tensors are copied (a float scheme converts them): towers are quantised by `quantize_module` when they
are loaded, which costs little next to the decoder. Written tensor by tensor: memory stays at one tensor.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from ..checkpoint.skeleton import uninitialised_meta
from ..checkpoint.safetensors import Checkpoint, CheckpointError
from ..checkpoint.weights import TOWER_PREFIXES, text_key_map
from ..checkpoint.writer import new_folder, write_checkpoint
from ..config import ModelConfig
from ..model.families import text_model_class
from ..quant.formats import int4_quantize, int8_quantize
from ..quant.scheme import FLOATS, INT4, QuantScheme, parse_scheme, plan

FORMAT = "gemma3n-weight-only-1"
_COPIED_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                 "generation_config.json", "chat_template.jinja", "chat_template.json", "preprocessor_config.json",
                 "processor_config.json")


def stored_plan(folder: Path) -> tuple[QuantScheme, dict[str, str]] | None:
    """(scheme, module path -> format) of a quantised checkpoint folder; None for a float one."""
    data = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    block = data.get("quantization")
    if block is None:
        return None
    if not isinstance(block, dict) or block.get("format") != FORMAT or not isinstance(block.get("modules"), dict):
        raise CheckpointError(f"{folder / 'config.json'}: quantization block is not in the {FORMAT} format; "
                              f"write the checkpoint again with `gemma3n quantize`")
    return parse_scheme(block["scheme"]), dict(block["modules"])


def quantize_checkpoint(src: str | Path, dst: str | Path, scheme, shard_bytes: int = 2 << 30) -> dict:
    """Write a quantised copy of the checkpoint folder `src` into `dst` (created); returns a summary."""
    src, dst = Path(src), Path(dst)
    _check_source(src)
    if stored_plan(src) is not None:
        raise ValueError(f"{src} is already quantised; quantise the original float checkpoint")
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise FileExistsError(f"{dst} exists and is not empty (or not a folder); choose a new folder")
    scheme = parse_scheme(scheme)
    with new_folder(dst) as work:
        return _write_quantized(src, work, scheme, shard_bytes)


def _check_source(src: Path) -> None:
    if src.is_dir():
        if not (src / "config.json").is_file():
            raise FileNotFoundError(f"{src} has no config.json; give a Hugging Face checkpoint folder")
        return
    if src.suffix == ".gguf" and src.is_file():
        raise ValueError(f"{src} is a GGUF file, which is already quantised; `gemma3n quantize` takes a float "
                         f"checkpoint folder. Run the GGUF as it is (--model {src}), or re-quantise it as it loads "
                         f"(--quantize int4)")
    raise FileNotFoundError(f"{src} is not a checkpoint folder" + ("" if src.exists() else " (it does not exist)"))


def _write_quantized(src: Path, dst: Path, scheme: QuantScheme, shard_bytes: int) -> dict:
    config = ModelConfig.from_file(src / "config.json")
    entries, chosen = quantized_entries(Checkpoint(src), config, scheme)
    files = write_checkpoint(dst, entries, shard_bytes)
    data = json.loads((src / "config.json").read_text(encoding="utf-8"))
    data["quantization"] = quantization_block(scheme, chosen)
    (dst / "config.json").write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    copy_side_files(src, dst)
    return {"modules": len(chosen), "tensors": len(entries), "bytes": sum(f.stat().st_size for f in files)}


def quantized_entries(tensors, config: ModelConfig, scheme: QuantScheme) -> tuple[list, dict[str, str]]:
    """The writer's entries (checkpoint/writer.py) of the quantised checkpoint of `tensors` (any mapping with
    `shape`: a Checkpoint, or a MatFormer slice of one) under `config`, and the plan (module path -> format)."""
    keys = text_key_map(list(tensors), getattr(config.text, "first_shared_layer", None))
    with uninitialised_meta():
        skeleton = text_model_class(config)(config.text)
    chosen = plan(skeleton, scheme)
    by_name = {keys.source(path + ".weight"): path for path in chosen}
    entries, used = [], set(keys.mapping.values())
    for name in sorted(tensors):
        if name in by_name:
            entries += _quantized_entries(tensors, name, chosen[by_name[name]], scheme.group_size)
        elif name in used or name.startswith(TOWER_PREFIXES):
            entries.append(_copied_entry(tensors, name, _tower_float(name, scheme)))
        # anything else (the unused K/V of KV-sharing layers, a stored tied lm_head) is not needed: dropped
    return entries, chosen


def quantization_block(scheme: QuantScheme, chosen: dict[str, str]) -> dict:
    """config.json's "quantization" block for a checkpoint written with `scheme` and plan `chosen`."""
    return {"format": FORMAT, "scheme": scheme.to_dict(), "group_size": scheme.group_size, "modules": chosen}


def copy_side_files(src: Path, dst: Path) -> None:
    """The tokenizer, processor and generation files, as they are."""
    for extra in _COPIED_FILES:
        if (src / extra).exists():
            shutil.copy2(src / extra, dst / extra)


def _quantized_entries(tensors: Checkpoint, name: str, kind: str, group_size: int) -> list:
    """Two entries (qweight, scales) computed by one quantisation, done when the first is written."""
    base, (n, k) = name.removesuffix(".weight"), tensors.shape(name)
    dtype = _stored_dtype(tensors, name)
    done: dict[str, torch.Tensor] = {}

    def part(i: int):
        if not done:
            weight = tensors[name]
            pair = int4_quantize(weight, group_size, dtype) if kind == INT4 else int8_quantize(weight, dtype)
            done.update(enumerate(pair))
        return done.pop(i)

    if kind == INT4:
        return [(f"{base}.qweight", (n, k // 2), torch.uint8, lambda: part(0)),
                (f"{base}.scales_and_zeros", (k // group_size, n, 2), dtype, lambda: part(1))]
    return [(f"{base}.qweight", (n, k), torch.int8, lambda: part(0)),
            (f"{base}.scales", (n,), dtype, lambda: part(1))]


def _stored_dtype(tensors, name: str) -> torch.dtype:
    """Without producing the tensor where the mapping can say (a MatFormer slice copies some when produced)."""
    return tensors.dtype(name) if hasattr(tensors, "dtype") else tensors[name].dtype


def _copied_entry(tensors: Checkpoint, name: str, dtype: torch.dtype | None):
    stored = _stored_dtype(tensors, name)
    target = dtype if dtype is not None and stored.is_floating_point else stored
    return (name, tensors.shape(name), target, lambda: tensors[name].to(target))


def _tower_float(name: str, scheme: QuantScheme) -> torch.dtype | None:
    """The float dtype a scheme asks for a tower tensor ("vision": "float16"), else None (copied as stored)."""
    if not name.startswith(TOWER_PREFIXES):
        return None
    fmt = scheme.vision if "vision" in name else scheme.audio if "audio" in name else None
    return FLOATS.get(fmt)
