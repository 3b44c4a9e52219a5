"""The other dtypes of an exported session, made from its float32 file with onnxruntime's own tools.

| dtype | file suffix | how |
|---|---|---|
| fp32 | '' | the traced graph (export.py) |
| fp16 | _fp16 | onnxruntime.transformers.float16, inputs and outputs kept float32 (float16.py: block-wise values) |
| q8 | _quantized | onnxruntime.quantization.quantize_dynamic's graph and values: int8 MatMul weights, uint8 Gather tables (int8.py: block-wise) |
| q4 | _q4 | MatMulNBits (4-bit, blocks of 32) for MatMul weights; Gather tables as in q8 |
| q4f16 | _q4f16 | the fp16 graph with the q4 treatment |

The suffixes are transformers.js's (DEFAULT_DTYPE_SUFFIX_MAPPING); a dtype is always made from the float32
graph, never from another quantised one.

Gather tables (the token embeddings, E2B's 8 GB per-layer table) are quantised here rather than by
quantize_dynamic, which holds the whole float graph plus several float temporaries of each table (~30 GB for
E2B's embed_tokens): the table is read from its memory-mapped external data a block of rows at a time into one
uint8 array, with quantize_dynamic's own uint8 scheme (one scale and zero point per table, range widened to
include 0) and its graph form (Gather of the uint8 table, then DequantizeLinear).
"""
from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from pathlib import Path

from .float16 import write_fp16
from .int8 import register_quantized, write_q8

SUFFIXES = {"fp32": "", "fp16": "_fp16", "q8": "_quantized", "q4": "_q4", "q4f16": "_q4f16"}
SMALLEST_FIRST = ("q4", "q4f16", "q8", "fp16", "fp32")  # the default when a folder holds several (by file size)
Q4_BLOCK = 32


def parse_dtypes(values) -> list[str]:
    """'q4', 'fp32,q8' or a list of those -> the dtypes in a stable order; unknown names raise."""
    if isinstance(values, str):
        values = [values]
    names = [v.strip() for value in values for v in str(value).split(",") if v.strip()]
    unknown = [n for n in names if n not in SUFFIXES]
    if unknown or not names:
        raise ValueError(f"unknown ONNX dtype {', '.join(unknown) or '(none)'}; choose from {', '.join(SUFFIXES)}")
    return [d for d in SUFFIXES if d in names]


def convert(float_path: Path, dtype: str, out_path: Path) -> Path:
    """Write `dtype`'s version of the float32 session at `float_path` to `out_path`."""
    import onnx
    if dtype == "fp32":
        raise ValueError("fp32 is the exported graph itself")
    if dtype not in SUFFIXES:
        raise ValueError(f"unknown ONNX dtype {dtype!r}")
    with _quiet():
        if dtype == "fp16":
            return write_fp16(float_path, out_path)
        with tempfile.TemporaryDirectory(dir=out_path.parent) as tmp:
            source = quantize_gather_tables(float_path, Path(tmp) / "gathers.onnx") or float_path
            if dtype == "q8":
                write_q8(source, out_path)
            else:
                if dtype == "q4f16":  # the 4-bit quantiser then holds the float16 graph, half the float32 one
                    source = write_fp16(source, Path(tmp) / "fp16.onnx")
                _save(_q4(onnx.load(str(source))), out_path)
    return out_path


def _q4(model):
    """MatMul weights as MatMulNBits (symmetric 4-bit blocks); the Gather tables are uint8 already."""
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer
    config = DefaultWeightOnlyQuantConfig(block_size=Q4_BLOCK, is_symmetric=True, op_types_to_quantize=("MatMul",))
    quantizer = MatMulNBitsQuantizer(model, block_size=Q4_BLOCK, is_symmetric=True, algo_config=config,
                                     op_types_to_quantize=("MatMul",))
    del model
    quantizer.process()
    return quantizer.model.model


GATHER_BLOCK_VALUES = 1 << 26  # float values of a table read at a time (256 MiB)


def quantize_gather_tables(float_path: Path, out_path: Path) -> Path | None:
    """Every Gather whose table is a float32 initializer -> Gather of a uint8 table + DequantizeLinear, written
    to `out_path` (other weights copied as they are); None when the graph has no such Gather."""
    import onnx_ir as ir
    model = ir.load(str(float_path))
    graph = model.graph
    gathers = [n for n in graph if n.op_type == "Gather" and n.domain in ("", "ai.onnx")
               and n.inputs[0] is not None and n.inputs[0].is_initializer()
               and n.inputs[0].const_value is not None and n.inputs[0].const_value.dtype == ir.DataType.FLOAT]
    if not gathers:
        return None
    quantized: dict[str, tuple] = {}  # table name -> (uint8 table, scale, zero point) values, shared by its Gathers
    for node in gathers:
        table = node.inputs[0]
        if table.name not in quantized:
            quantized[table.name] = register_quantized(graph, table.name, *_uint8_table(table.const_value.numpy()))
        q_table, scale, zero = quantized[table.name]
        gather = ir.node("Gather", [q_table, node.inputs[1]], attributes={"axis": node.attributes.get_int("axis", 0)},
                         name=f"{node.name}_quantized")
        dequantize = ir.node("DequantizeLinear", [gather.outputs[0], scale, zero], name=f"{node.name}_dequantize")
        ir.convenience.replace_nodes_and_values(graph, node, [node], [gather, dequantize], node.outputs,
                                                dequantize.outputs)
    for name in quantized:
        if not graph.initializers[name].uses():
            graph.initializers.pop(name)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    ir.save(model, str(out_path), external_data=out_path.name + "_data")
    return out_path


def _uint8_table(table):
    """quantize_dynamic's asymmetric uint8 weights, one block of rows at a time: scale = (max - min) / 255 over
    the range widened to include 0, zero point = round(-min / scale), q = clip(round(x / scale) + zero point)."""
    import numpy as np
    rows = max(1, GATHER_BLOCK_VALUES // max(1, table[0].size)) if table.ndim else 1
    low = high = 0.0
    for i in range(0, len(table), rows):
        block = table[i:i + rows]
        low, high = min(low, float(block.min())), max(high, float(block.max()))
    scale = np.float32((high - low) / 255.0) if high > low else np.float32(1.0)
    zero = int(np.clip(round(-low / float(scale)), 0, 255))
    out = np.empty(table.shape, np.uint8)
    for i in range(0, len(table), rows):
        block = np.rint(table[i:i + rows] / scale) + np.float32(zero)
        out[i:i + rows] = np.clip(block, 0, 255)
    return out, scale, zero


def _save(model, out_path: Path) -> None:
    """Save inline when it fits in one protobuf file comfortably, else with `<file>_data` beside it."""
    import onnx
    out_path.parent.mkdir(parents=True, exist_ok=True)
    data = out_path.parent / (out_path.name + "_data")
    if data.exists():
        data.unlink()
    size = sum(len(t.raw_data) for t in model.graph.initializer)
    if size > (1 << 30):
        onnx.save_model(model, str(out_path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data.name, size_threshold=1024)
    else:
        onnx.save_model(model, str(out_path))


@contextlib.contextmanager
def _quiet():
    """onnxruntime's quantisers log every node at INFO; keep the console for the export's progress lines."""
    # the root logger and onnxruntime's own (the 4-bit quantiser sets INFO on its module logger when imported)
    import onnxruntime.quantization.matmul_nbits_quantizer  # noqa: F401
    loggers = [logging.getLogger()] + [logging.getLogger(name) for name in list(logging.root.manager.loggerDict)
                                       if name.startswith("onnxruntime")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with open(os.devnull, "w") as null, contextlib.redirect_stdout(null):
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)
