"""Offline slicing (`slice_checkpoint`, `gemma3n slice`) and the elastic view used by `gemma3n.load(...,
matformer=...)`.

The offline slice is written tensor by tensor (a large one a block of rows at a time) into a temporary folder
beside the destination, which is renamed to the destination only when everything is written: an error (a bad
spec, a corrupt source, a full disk, Ctrl-C) leaves no destination folder behind.
"""
from __future__ import annotations

import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from ..checkpoint.hub import looks_like_hub_id, resolve_cached
from ..checkpoint.safetensors import INDEX_NAME, SINGLE_NAME, Checkpoint, CheckpointError
from ..checkpoint.writer import new_folder, write_checkpoint
from ..config import ModelConfig
from .plan import MatformerError, SlicePlan, describe, load_config_dict, plan_slice, sliced_config_dict
from .tensors import SlicedTensors


def _source(folder: Path) -> tuple[dict, ModelConfig]:
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such checkpoint folder (MatFormer slicing reads a Hugging Face "
                                f"safetensors folder, not a .gguf file)")
    data = load_config_dict(folder)
    config = ModelConfig.from_dict(data, str(folder / "config.json"))
    if config.family != "gemma3n":
        raise MatformerError(f"MatFormer slicing applies to Gemma 3n checkpoints; {folder} is a {config.model_type} "
                             f"model")
    if data.get("quantization") is not None:
        raise MatformerError(f"{folder} is quantised; slice the float checkpoint (`gemma3n slice --quantize` "
                             f"quantises the slice in the same pass)")
    return data, config


def _has_weights(folder: Path) -> bool:
    return (folder / INDEX_NAME).exists() or (folder / SINGLE_NAME).exists() or any(folder.glob("*.safetensors"))


def elastic_view(folder: Path, tensors: Checkpoint, spec) -> tuple[ModelConfig, SlicedTensors]:
    """(the sliced config, the slice's tensors read from `tensors`, the checkpoint of `folder`) for loading a
    slice without writing it."""
    _, config = _source(Path(folder))
    plan = plan_slice(config, spec)
    return replace(config, text=plan.text), SlicedTensors(tensors, plan)


def slice_checkpoint(src: str | Path, dst: str | Path | None, spec, quantize=None, dry_run: bool = False,
                     progress: bool = False, shard_bytes: int = 2 << 30) -> dict:
    """Write the MatFormer slice `spec` of the Gemma 3n checkpoint folder `src` into the new folder `dst`.

    spec: a published configuration's name ("Config for E2.54B (layer-level)", "E2B", ...) or {"layers_skipped":
    [...], "ffn_hidden_dims": [...]}. quantize: None or a scheme ("int4", "int8", a dict; see gemma3n.quant):
    the slice is written quantised in the same pass. dry_run: check and count only (a folder holding only a
    config.json is enough), write nothing. Returns the summary: the spec, the sliced config fields, the parameter
    counts after and before, and what was written."""
    src = Path(src).expanduser()
    if not src.exists() and looks_like_hub_id(str(src)):
        src = resolve_cached(str(src))  # a Hub id already in the local cache
    data, config = _source(src)
    plan = plan_slice(config, spec)
    summary = describe(plan, config)
    scheme = None
    if quantize is not None:
        from ..quant import parse_scheme
        scheme = parse_scheme(quantize)
        summary["quantization"] = scheme.to_dict()
    tensors = SlicedTensors(Checkpoint(src), plan) if _has_weights(src) else None
    if tensors is not None and scheme is None:
        summary["bytes"] = sum(tensors.dtype(n).itemsize * _count(tensors.shape(n)) for n in tensors)
    if dry_run:
        return summary
    if tensors is None:
        raise CheckpointError(f"{src}: no .safetensors weights found; only --dry-run works on a config alone")
    if dst is None:
        raise ValueError("a destination folder is needed (or --dry-run)")
    dst = Path(dst).expanduser()
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise FileExistsError(f"{dst} exists and is not empty; choose a new folder")
    if dst.resolve() == src.resolve():
        raise ValueError("the destination must be a new folder, not the source")
    started = time.perf_counter()
    with new_folder(dst) as partial:
        files, written_tensors = _write(tensors, plan, config, data, partial, scheme, progress, shard_bytes)
        from ..convert.quantized import copy_side_files
        copy_side_files(src, partial)
    summary.update({"destination": str(dst), "tensors": written_tensors,
                    "bytes": sum((dst / f.name).stat().st_size for f in files),
                    "seconds": round(time.perf_counter() - started, 1)})
    return summary


def _write(tensors: SlicedTensors, plan: SlicePlan, config: ModelConfig, data: dict, folder: Path, scheme,
           progress: bool, shard_bytes: int) -> tuple[list[Path], int]:
    sliced = replace(config, text=plan.text)
    out = sliced_config_dict(data, plan)
    if scheme is None:
        entries = [(name, tensors.shape(name), tensors.dtype(name), lambda name=name: tensors.chunks(name))
                   for name in sorted(tensors)]
    else:
        from ..convert.quantized import quantization_block, quantized_entries
        entries, chosen = quantized_entries(tensors, sliced, scheme)
        # tensors copied as stored stream a block of rows at a time (the per-layer table is GBs)
        entries = [(n, s, d, (lambda n=n: tensors.chunks(n)) if n in tensors and d == tensors.dtype(n) else p)
                   for n, s, d, p in entries]
        out["quantization"] = quantization_block(scheme, chosen)
    bar = Progress(sum(d.itemsize * _count(s) for _, s, d, _ in entries), "slicing" if scheme is None else
                   "slicing + quantising", enabled=progress)
    entries = [(n, s, d, (lambda p=p: bar.through(p()))) for n, s, d, p in entries]
    files = write_checkpoint(folder, entries, shard_bytes)
    (folder / "config.json").write_text(json.dumps(out, indent=2) + "\n", encoding="utf-8")
    bar.done()
    return files, len(entries)


class Progress:
    """Bytes written, on stderr: a bar redrawn in place on a terminal, a line per 10% otherwise."""

    def __init__(self, total: int, label: str, enabled: bool = True, stream=None):
        self.total, self.label, self.enabled = max(1, total), label, enabled
        self.stream = stream or sys.stderr
        self.tty = self.enabled and self.stream.isatty()
        self.done_bytes, self.last_draw, self.last_tenth = 0, 0.0, -1

    def through(self, produced):
        chunks = [produced] if isinstance(produced, torch.Tensor) else produced
        for chunk in chunks:
            yield chunk
            self.add(chunk.numel() * chunk.element_size())

    def add(self, nbytes: int) -> None:
        self.done_bytes += nbytes
        if not self.enabled:
            return
        fraction = min(1.0, self.done_bytes / self.total)
        if self.tty:
            now = time.monotonic()
            if now - self.last_draw >= 0.2 or fraction >= 1.0:
                self.last_draw = now
                filled = int(fraction * 30)
                self.stream.write(f"\r{self.label} [{'#' * filled}{'.' * (30 - filled)}] {fraction:6.1%} "
                                  f"{_size(self.done_bytes)} of {_size(self.total)}")
                self.stream.flush()
        elif int(fraction * 10) > self.last_tenth:
            self.last_tenth = int(fraction * 10)
            print(f"{self.label}: {fraction:.0%} ({_size(self.done_bytes)} of {_size(self.total)})",
                  file=self.stream, flush=True)

    def done(self) -> None:
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()


def _size(nbytes: int) -> str:
    return f"{nbytes / 1e9:.2f} GB" if nbytes >= 1e9 else f"{nbytes / 1e6:.1f} MB"


def _count(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
