"""ONNX in the transformers.js layout: export (any Gemma 3n gemma3n loads -> onnx/*.onnx plus the folder's JSON
files) and the runtime that runs such folders with onnxruntime behind the engine's model interface.

- graphs.py: the sessions as thin modules over gemma3n.model's own modules;
- export.py: tracing them with torch.onnx into float32 files;
- dtypes.py: fp16 / q8 / q4 / q4f16 made from those with onnxruntime's tools;
- folder_files.py: config.json, tokenizer, chat template and processor files transformers.js reads;
- runtime.py: onnxruntime sessions as the engine's decoder (gemma3n.load recognises the folder).
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Callable

from torch import nn

from ..processor.image import ImageProcessor
from ..processor.processor import read_preprocessor_config
from .dtypes import SUFFIXES, convert, parse_dtypes
from .export import MEDIA_SESSIONS, TEXT_SESSIONS, export_float_sessions
from .folder_files import check_folder_sources, write_folder_files
from .runtime import OnnxFolderError, is_onnx_folder, load_onnx_folder

AUDIO_SAMPLE_FRAMES = 300  # 3 s of log-mel frames to trace the audio tower with (the frame count stays symbolic)


def export_model(lm: nn.Module, multimodal: nn.Module | None, config, tokenizer, source: Path, out: Path,
                 dtypes="fp32", progress: Callable[[str], None] = print) -> list[Path]:
    """Write `out/onnx/<session><suffix>.onnx` for every session and dtype, and the files beside onnx/.

    `lm` / `multimodal` are a loaded Gemma 3n's float modules (as stored: gemma3n.load(path); the sessions are
    traced in float32 one at a time); `source` is its checkpoint folder (config, tokenizer, processor settings).
    Returns the .onnx files written."""
    if config.family != "gemma3n":
        raise ValueError(f"ONNX export supports Gemma 3n checkpoints; {source} is {config.model_type}")
    if any(getattr(m, "weight", None) is not None and not m.weight.is_floating_point() for m in lm.modules()):
        raise ValueError("export needs float weights: load the checkpoint without quantize= (int8 / int4 / GGUF "
                         "weights are not exported; pick --dtype q8 or q4 for ONNX's own quantisation)")
    wanted = parse_dtypes(dtypes)
    check_folder_sources(Path(source), tokenizer)  # before the export, not after (E2B: 25 minutes)
    out = Path(out)
    onnx_dir = out / "onnx"
    onnx_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    image_size = None
    if multimodal is not None:
        processor = ImageProcessor.from_config(read_preprocessor_config(source).get("image_processor"))
        image_size = (processor.height, processor.width)
    written: list[Path] = []
    with tempfile.TemporaryDirectory(dir=out) as tmp:
        float_dir = onnx_dir if "fp32" in wanted else Path(tmp)
        floats = export_float_sessions(lm, multimodal, float_dir, image_size, AUDIO_SAMPLE_FRAMES,
                                       progress=lambda line: progress(f"[{time.perf_counter() - started:6.1f}s] "
                                                                      f"{line}"))
        if "fp32" in wanted:
            written += floats
        for dtype in wanted:
            if dtype == "fp32":
                continue
            for path in floats:
                target = onnx_dir / f"{path.stem}{SUFFIXES[dtype]}.onnx"
                progress(f"[{time.perf_counter() - started:6.1f}s] {dtype}: {target.name}")
                written.append(convert(path, dtype, target))
    external = [p.name for p in written if (p.parent / (p.name + "_data")).exists()]
    write_folder_files(Path(source), out, config, tokenizer, external)
    progress(f"[{time.perf_counter() - started:6.1f}s] wrote {len(written)} sessions to {onnx_dir}")
    return written


__all__ = ["MEDIA_SESSIONS", "OnnxFolderError", "SUFFIXES", "TEXT_SESSIONS", "export_model", "is_onnx_folder",
           "load_onnx_folder", "parse_dtypes"]
