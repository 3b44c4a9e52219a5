"""Trace the session modules of graphs.py with torch.onnx (the dynamo exporter) into float32 ONNX files.

The exporter sees the model's own code; the only things done around it here are the ones tracing needs:
- the model stays as stored (e.g. bf16, memory-mapped) and only the weights of the session being traced are
  converted to float32, and put back after its file is written: E2B in float32 is ~22 GB, its largest session
  (embed_tokens with the per-layer table) ~10 GB;
- every wrapper runs once eagerly before it is traced, so that the model's cached constants (model.layers.const)
  are made as real tensors, never as the tracer's fake ones;
- the sparse MLPs' decode-time gather path is switched off while tracing: its choice depends on the token count,
  and the dense path computes the same values;
- the exporter's automatic dimension names (s10, s29, ...) are renamed to the names transformers.js and Optimum
  use (batch_size, sequence_length, past_sequence_length, total_sequence_length).
"""
from __future__ import annotations

import contextlib
import gc
import itertools
import logging
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import nn

from .graphs import AudioEncoder, Decoder, EmbedTokens, VisionEncoder

# Sessions whose weights go to a `<file>_data` file beside the .onnx when they pass this size: protobuf caps one
# file at 2 GB, and transformers.js finds `<file>_data` through config.json's use_external_data_format.
EXTERNAL_DATA_BYTES = 512 << 20

TEXT_SESSIONS = ("embed_tokens", "decoder_model_merged")
MEDIA_SESSIONS = ("vision_encoder", "audio_encoder")


@dataclass
class Traced:
    """One session to export: its module, sample inputs, names and the symbolic name of each dynamic axis."""
    name: str
    module: nn.Module
    args: tuple
    input_names: list[str]
    output_names: list[str]
    axes: dict[str, dict[int, str]]  # value name -> {axis: symbolic name}
    weights: tuple[nn.Module, ...] = ()  # the modules whose weights the session reads (made float32 while traced)
    skip: tuple[nn.Module, ...] = ()  # modules inside `weights` the session does not read


def kv_names(lm: nn.Module, prefix: str) -> list[str]:
    """past_key_values.{i}.key / .value (or present.*) for every layer that owns K/V."""
    return [f"{prefix}.{i}.{kind}" for i in range(lm.config.num_kv_slots) for kind in ("key", "value")]


def text_sessions(lm: nn.Module, multimodal: nn.Module | None) -> list[Traced]:
    cfg = lm.config
    batch, length, past = 2, 5, 3  # sizes >= 2, so that the tracer keeps every axis symbolic
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (batch, length), generator=g)
    embed = EmbedTokens(lm, multimodal).eval()
    # float32 samples of embed_tokens' outputs (the decoder's trace does not depend on their values)
    embeds = torch.randn(batch, length, cfg.hidden_size, generator=g)
    ple = torch.randn(batch, length, cfg.num_hidden_layers, cfg.hidden_size_per_layer_input, generator=g)
    tokens = {0: "batch_size", 1: "sequence_length"}
    past_names, present_names = kv_names(lm, "past_key_values"), kv_names(lm, "present")
    kv = tuple(torch.randn(batch, cfg.num_key_value_heads, past, cfg.head_dim, generator=g) for _ in past_names)
    mask = torch.ones(batch, past + length, dtype=torch.int64)
    positions = torch.arange(past, past + length).expand(batch, length).contiguous()
    keep = torch.tensor(1, dtype=torch.int64)
    decoder_axes = {"inputs_embeds": tokens, "per_layer_inputs": tokens, "position_ids": tokens,
                    "attention_mask": {0: "batch_size", 1: "total_sequence_length"},
                    "logits": {0: "batch_size", 1: "num_logits"}}
    decoder_axes.update({n: {0: "batch_size", 2: "past_sequence_length"} for n in past_names})
    decoder_axes.update({n: {0: "batch_size", 2: "total_sequence_length"} for n in present_names})
    text = lm.model
    embed_weights = (text.embed_tokens, text.norm)  # the norm's dtype is the compute dtype of the per-layer rows
    if multimodal is not None:
        embed_weights += (multimodal.embed_vision, multimodal.embed_audio)
    return [
        Traced("embed_tokens", embed, (ids,), ["input_ids"], ["inputs_embeds", "per_layer_inputs"],
               {"input_ids": tokens, "inputs_embeds": tokens, "per_layer_inputs": tokens}, embed_weights),
        Traced("decoder_model_merged", Decoder(lm).eval(), (embeds, ple, mask, positions, keep, *kv),
               ["inputs_embeds", "per_layer_inputs", "attention_mask", "position_ids", "num_logits_to_keep",
                *past_names], ["logits", *present_names], decoder_axes, (lm,), (text.embed_tokens_per_layer,)),
    ]


def media_sessions(multimodal: nn.Module, image_size: tuple[int, int], audio_frames: int) -> list[Traced]:
    """The towers: images at the processor's fixed size, audio of any length (frames are a dynamic axis)."""
    g = torch.Generator().manual_seed(0)
    pixels = torch.rand(2, 3, *image_size, generator=g)
    features = torch.randn(1, audio_frames, 128, generator=g)
    frames_mask = torch.ones(1, audio_frames, dtype=torch.bool)
    frames_mask[:, audio_frames * 3 // 4:] = False  # a padded tail, as the feature extractor gives
    return [
        Traced("vision_encoder", VisionEncoder(multimodal).eval(), (pixels,), ["pixel_values"], ["image_features"],
               {"pixel_values": {0: "num_images"}, "image_features": {0: "num_images"}},
               (multimodal.tower("vision"), multimodal.embed_vision)),
        Traced("audio_encoder", AudioEncoder(multimodal).eval(), (features, frames_mask),
               ["input_features", "input_features_mask"], ["audio_features"],
               {"input_features": {0: "batch_size", 1: "num_frames"},
                "input_features_mask": {0: "batch_size", 1: "num_frames"}, "audio_features": {0: "batch_size"}},
               (multimodal.tower("audio"), multimodal.embed_audio)),
    ]


@contextlib.contextmanager
def float32_weights(modules: Sequence[nn.Module], skip: Sequence[nn.Module] = ()):
    """The floating weights and buffers of `modules` (except those of `skip`) as float32 copies while inside;
    the stored tensors (memory-mapped bf16, say) come back on exit and the copies are freed. The tensors keep
    their identity (only .data changes), so tied weights stay tied."""
    def tensors(roots):
        return itertools.chain.from_iterable(itertools.chain(m.parameters(), m.buffers()) for m in roots)
    skipped = {id(t) for t in tensors(skip)}
    stored, seen = [], set()
    for t in tensors(modules):
        if id(t) in seen or id(t) in skipped:
            continue
        seen.add(id(t))
        if t.is_floating_point() and t.dtype != torch.float32:
            copy = t.data.float()
            stored.append((t, t.data, copy))
            t.data = copy
    try:
        yield
    finally:
        for t, data, copy in stored:
            t.data = data
            free_storage(copy)
        del stored
        gc.collect()


def free_storage(t: torch.Tensor) -> None:
    """Release a float32 copy made for one export. torch.export / torch.onnx keep references to the traced
    module's tensors after the export returns (8 GB for E2B's per-layer table), so dropping ours would not free
    them; emptying the storage does (anything still holding it would fail loudly, never read stale values)."""
    storage = t.untyped_storage()
    if storage.resizable():  # (a storage the exporter swapped in from outside torch cannot be; its owner frees it)
        storage.resize_(0)


@contextlib.contextmanager
def float_per_layer_table(lm: nn.Module, chunk: int = 8192):
    """The per-layer embedding table as one float32 nn.Embedding while exporting.

    The runtime keeps that table in its stored form (bf16, a MatFormer slice's strided blocks, GGUF rows) and
    converts the rows it reads; an exported graph would then carry a bfloat16 table and a Cast, which the fp16
    converter and the quantisers leave alone. As one float32 matrix it is exported like every other weight and
    quantised with them (uint8 in q8 / q4). The rows are the ones the runtime reads, converted as it converts."""
    model = lm.model
    table = model.embed_tokens_per_layer
    weight = getattr(table, "weight", None)
    if type(table) is nn.Embedding and weight is not None and weight.dtype == torch.float32:
        yield
        return
    count = model.config.vocab_size_per_layer_input
    rows = torch.empty(count, model.config.num_hidden_layers * model.config.hidden_size_per_layer_input)
    for i in range(0, count, chunk):  # filled in place: one float32 table (8 GB in E2B), never a second copy
        rows[i:i + chunk] = table(torch.arange(i, min(i + chunk, count))).float()
    model.embed_tokens_per_layer = nn.Embedding.from_pretrained(rows, freeze=True)
    try:
        yield
    finally:
        model.embed_tokens_per_layer = table
        free_storage(rows)
        gc.collect()


@contextlib.contextmanager
def dense_mlps(module: nn.Module):
    """The sparse MLPs' gather path off while tracing (its choice depends on the token count)."""
    switched = [m for m in module.modules() if getattr(m, "sparse_decode", False)]
    for m in switched:
        m.sparse_decode = False
    try:
        yield
    finally:
        for m in switched:
            m.sparse_decode = True


def export_session(session: Traced, path: Path) -> Path:
    """Trace one session into `path` (float32); returns the path."""
    import onnx_ir as ir
    with torch.no_grad(), dense_mlps(session.module):
        session.module(*session.args)  # the model's cached constants become real tensors before tracing
        auto = torch.export.Dim.AUTO
        shapes = [{axis: auto for axis in session.axes.get(name, {})} or None for name in session.input_names]
        dynamic = _dynamic_shapes(session, shapes)
        with _quiet():
            program = torch.onnx.export(session.module, session.args, dynamo=True, input_names=session.input_names,
                                        output_names=session.output_names, dynamic_shapes=dynamic,
                                        optimize=True, verbose=False)
    model = program.model
    del program
    reduced = sorted({str(v.const_value.dtype) for v in model.graph.initializers.values()
                      if v.const_value is not None and v.const_value.dtype in (ir.DataType.BFLOAT16,
                                                                                ir.DataType.FLOAT16)})
    if reduced:  # a weight the session reads was not in Traced.weights, so it stayed in its stored dtype
        raise RuntimeError(f"{session.name}: the traced graph holds {', '.join(reduced)} weights; the float32 "
                           "export must convert every weight the session reads (Traced.weights)")
    _name_axes(model, session.axes, ir)
    model.producer_name = "gemma3n"
    path.parent.mkdir(parents=True, exist_ok=True)
    size = sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)
    data = path.name + "_data"
    if (path.parent / data).exists():
        (path.parent / data).unlink()
    if size > EXTERNAL_DATA_BYTES:
        ir.save(model, path, external_data=data)
    else:
        ir.save(model, path)
    return path


def _dynamic_shapes(session: Traced, shapes: list) -> tuple:
    """The dynamic_shapes structure torch.export wants: one entry per forward argument, with the varargs of the
    decoder (the past K/V) as one tuple."""
    import inspect
    params = list(inspect.signature(session.module.forward).parameters.values())
    fixed = sum(1 for p in params if p.kind is not p.VAR_POSITIONAL)
    if fixed == len(params):
        return tuple(shapes)
    return (*shapes[:fixed], tuple(shapes[fixed:]))


def _name_axes(model, axes: dict[str, dict[int, str]], ir) -> None:
    for value in list(model.graph.inputs) + list(model.graph.outputs):
        names = axes.get(value.name)
        if not names or value.shape is None:
            continue
        dims = [ir.SymbolicDim(names[i]) if i in names else d for i, d in enumerate(value.shape.dims)]
        value.shape = ir.Shape(dims)


@contextlib.contextmanager
def _quiet():
    """The exporter prints its steps and warns about things that do not apply here; keep the user's console
    for our own progress lines."""
    level = logging.getLogger("torch.onnx").level
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    with warnings.catch_warnings(), open(os.devnull, "w") as null, contextlib.redirect_stdout(null):
        warnings.simplefilter("ignore")
        try:
            yield
        finally:
            logging.getLogger("torch.onnx").setLevel(level)


def export_float_sessions(lm: nn.Module, multimodal: nn.Module | None, onnx_dir: Path,
                          image_size: tuple[int, int] | None, audio_frames: int,
                          progress: Callable[[str], None] = lambda line: None,
                          only: Sequence[str] | None = None) -> list[Path]:
    """Every session this model has, in float32, into onnx_dir/<session>.onnx; returns the files written.

    One session at a time holds float32 weights: its own, converted from the stored ones just before it is
    traced and dropped once its file is written (peak memory: the largest session, not the model)."""
    sessions = text_sessions(lm, multimodal)
    if multimodal is not None:
        sessions += media_sessions(multimodal, image_size, audio_frames)
    written = []
    for session in sessions:
        if only is not None and session.name not in only:
            continue
        started = time.perf_counter()
        progress(f"tracing {session.name}")
        table = float_per_layer_table(lm) if session.name == "embed_tokens" else contextlib.nullcontext()
        with float32_weights(session.weights, session.skip), table:
            path = export_session(session, onnx_dir / f"{session.name}.onnx")
        gc.collect()
        size = sum(f.stat().st_size for f in path.parent.glob(path.name + "*"))
        progress(f"wrote {path.name} ({size / 2 ** 20:.0f} MiB, {time.perf_counter() - started:.0f} s)")
        written.append(path)
    return written
