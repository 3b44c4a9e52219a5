"""fp16 sessions made without holding the float32 graph in memory.

onnxruntime's converter (onnxruntime.transformers.float16) decides the graph: which values become float16, where
Casts go, which initializers stay float32 because only blocked ops read them. Given a graph loaded without its
external data, it flips an external initializer's data type and leaves its values alone; those values are then
written here a block at a time from the memory-mapped float32 data, rounded as the converter rounds them. E2B's
embed_tokens carries an 8 GB per-layer table: the converter holding it whole, with its temporaries, needed more
than the 24 GiB of the machine the export is meant to run on.
"""
from __future__ import annotations

import contextlib
from pathlib import Path

# the converter's defaults: nonzero values nearer 0 than float16's smallest subnormal are raised to it, finite
# values beyond its range are clamped to it; 0, infinities and NaN are kept
MIN_POSITIVE = 5.96e-08
MAX_FINITE = 65504.0
BLOCK_VALUES = 1 << 24  # float32 values converted at a time (64 MiB)
ALIGNMENT = 4096  # external tensors start on a page, so that onnxruntime may map them


def write_fp16(float_path: Path, out_path: Path) -> Path:
    """onnxruntime's fp16 conversion of the session at `float_path` (graph inputs and outputs kept float32),
    written to `out_path`, with `<file>_data` beside it where the source keeps its weights outside the graph."""
    import onnx
    from onnxruntime.transformers import float16 as converter
    float_path, out_path = Path(float_path), Path(out_path)
    model = onnx.load(str(float_path), load_external_data=False)
    stored_types = {_place(t): t.data_type for t in _external_tensors(model)}
    with _shapes_from_dims(converter):
        model = converter.convert_float_to_float16(model, keep_io_types=True)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    data_path = out_path.parent / (out_path.name + "_data")
    external = _external_tensors(model)
    if data_path.exists():
        data_path.unlink()
    if external:
        with open(data_path, "wb") as data:
            for tensor in external:
                _write_values(tensor, stored_types[_place(tensor)], float_path.parent, data, data_path.name)
    onnx.save_model(model, str(out_path))
    return out_path


@contextlib.contextmanager
def _shapes_from_dims(converter):
    """The converter reads a converted initializer's whole value only to learn its shape (for the value_info it
    adds): a value left outside the graph cannot be read that way, and E2B's table would be 8 GB of it. The shape
    is the tensor's dims; the converter's function is put back afterwards."""
    from onnx import helper
    reads_values = converter.make_value_info_from_tensor
    converter.make_value_info_from_tensor = lambda tensor: helper.make_tensor_value_info(
        tensor.name, tensor.data_type, list(tensor.dims))
    try:
        yield
    finally:
        converter.make_value_info_from_tensor = reads_values


def float16_values(values):
    """The converter's rounding of a float32 array to float16 (onnxruntime's convert_np_to_float16)."""
    import numpy as np
    values = np.array(values, dtype=np.float32)
    values[(values > 0) & (values < MIN_POSITIVE)] = MIN_POSITIVE
    values[(values < 0) & (values > -MIN_POSITIVE)] = -MIN_POSITIVE
    values[(values > MAX_FINITE) & (values < np.inf)] = MAX_FINITE
    values[(values < -MAX_FINITE) & (values > -np.inf)] = -MAX_FINITE
    return values.astype(np.float16)


def _write_values(tensor, stored_type: int, source_dir: Path, data, data_name: str) -> None:
    """Append the tensor's values (float16 where the converter made it float16) and point it at them."""
    import numpy as np
    import onnx
    place = dict(_place(tensor))
    source = np.memmap(source_dir / place["location"], dtype=np.uint8, mode="r",
                       offset=int(place.get("offset", 0)), shape=(int(place["length"]),))
    data.write(b"\0" * (-data.tell() % ALIGNMENT))
    offset = data.tell()
    halve = stored_type == onnx.TensorProto.FLOAT and tensor.data_type == onnx.TensorProto.FLOAT16
    if halve:
        floats = source.view(np.float32)
        for start in range(0, floats.size, BLOCK_VALUES):
            data.write(float16_values(floats[start:start + BLOCK_VALUES]).tobytes())
    else:
        for start in range(0, source.size, BLOCK_VALUES):
            data.write(source[start:start + BLOCK_VALUES].tobytes())
    del source
    del tensor.external_data[:]
    for key, value in (("location", data_name), ("offset", str(offset)), ("length", str(data.tell() - offset))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value


def _place(tensor) -> tuple:
    """Where an external tensor's bytes are: its (key, value) pairs, location / offset / length."""
    return tuple((e.key, e.value) for e in tensor.external_data if e.key in ("location", "offset", "length"))


def _external_tensors(model) -> list:
    """Every tensor of the model (initializers and attribute tensors, subgraphs included) stored outside it."""
    import onnx
    found = []

    def visit(graph):
        found.extend(graph.initializer)
        for node in graph.node:
            for attribute in node.attribute:
                found.extend([attribute.t] if attribute.HasField("t") else [])
                found.extend(attribute.tensors)
                for subgraph in ([attribute.g] if attribute.HasField("g") else []) + list(attribute.graphs):
                    visit(subgraph)

    visit(model.graph)
    return [t for t in found if t.data_location == onnx.TensorProto.EXTERNAL]
