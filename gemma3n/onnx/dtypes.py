"""The other dtypes of an exported session, made from its float32 file with onnxruntime's own tools.

| dtype | file suffix | how |
|---|---|---|
| fp32 | '' | the traced graph (export.py) |
| fp16 | _fp16 | onnxruntime.transformers.float16, inputs and outputs kept float32 |
| q8 | _quantized | onnxruntime.quantization.quantize_dynamic: int8 MatMul weights, uint8 Gather tables |
| q4 | _q4 | MatMulNBits (4-bit, blocks of 32) for MatMul weights; Gather tables as in q8 |
| q4f16 | _q4f16 | the fp16 graph with the q4 treatment |

The suffixes are transformers.js's (DEFAULT_DTYPE_SUFFIX_MAPPING); a dtype is always made from the float32
graph, never from another quantised one.
"""
from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from pathlib import Path

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
    with _quiet():
        if dtype == "q8":
            _q8(float_path, out_path)
        elif dtype == "fp16":
            _save(_fp16(onnx.load(str(float_path))), out_path)
        elif dtype in ("q4", "q4f16"):
            model = onnx.load(str(float_path))
            if dtype == "q4f16":
                model = _fp16(model)
            _save(_q4(model), out_path)
        else:
            raise ValueError(f"unknown ONNX dtype {dtype!r}")
    return out_path


def _fp16(model):
    from onnxruntime.transformers.float16 import convert_float_to_float16
    return convert_float_to_float16(model, keep_io_types=True)


def _q8(float_path: Path, out_path: Path) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic
    quantize_dynamic(str(float_path), str(out_path), op_types_to_quantize=["MatMul", "Gather"],
                     weight_type=QuantType.QInt8, per_channel=False, reduce_range=False,
                     use_external_data_format=_is_large(float_path),
                     extra_options={"EnableSubgraph": False, "MatMulConstBOnly": True})
    if _is_large(float_path):
        _move_data(out_path)


def _q4(model):
    """MatMul weights as MatMulNBits (symmetric 4-bit blocks); then the Gather tables as 8-bit (q8's way)."""
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer
    config = DefaultWeightOnlyQuantConfig(block_size=Q4_BLOCK, is_symmetric=True, op_types_to_quantize=("MatMul",))
    quantizer = MatMulNBitsQuantizer(model, block_size=Q4_BLOCK, is_symmetric=True, algo_config=config,
                                     op_types_to_quantize=("MatMul",))
    quantizer.process()
    model = quantizer.model.model
    if not any(n.op_type == "Gather" and _constant_input(model, n.input[0]) for n in model.graph.node):
        return model
    with tempfile.TemporaryDirectory() as tmp:
        source, target = Path(tmp) / "in.onnx", Path(tmp) / "out.onnx"
        _save(model, source)
        from onnxruntime.quantization import QuantType, quantize_dynamic
        quantize_dynamic(str(source), str(target), op_types_to_quantize=["Gather"], weight_type=QuantType.QUInt8,
                         use_external_data_format=True)
        import onnx
        return onnx.load(str(target))


def _constant_input(model, name: str) -> bool:
    return any(init.name == name for init in model.graph.initializer)


def _is_large(path: Path) -> bool:
    return (path.parent / (path.name + "_data")).exists()


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


def _move_data(out_path: Path) -> None:
    """quantize_dynamic names its external data <file>.data; transformers.js looks for <file>_data."""
    import onnx
    model = onnx.load(str(out_path))
    _save_external(model, out_path)


def _save_external(model, out_path: Path) -> None:
    import onnx
    stale = [p for p in out_path.parent.iterdir() if p.name.startswith(out_path.name) and p != out_path]
    onnx.save_model(model, str(out_path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=out_path.name + "_data", size_threshold=1024)
    for p in stale:
        if p.name != out_path.name + "_data" and p.exists():
            p.unlink()


@contextlib.contextmanager
def _quiet():
    """onnxruntime's quantisers log every node at INFO; keep the console for the export's progress lines."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        with open(os.devnull, "w") as null, contextlib.redirect_stdout(null):
            yield
    finally:
        root.setLevel(level)
