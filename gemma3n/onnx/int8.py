"""q8 sessions made without holding the float32 graph in memory.

The graph is onnxruntime's dynamic quantisation (`quantize_dynamic`, MatMul only, constant weights only, per
tensor, int8 weights, no reduced range), node for node and name for name: each MatMul whose weight is a float32
initializer becomes

    DynamicQuantizeLinear(A) -> MatMulInteger(A_q, W_q, A_zero, W_zero) -> Cast(float)
    -> Mul(that, A_scale * W_scale)

with the DynamicQuantizeLinear shared by every MatMul reading the same A. The weight's scale and zero point come
from onnxruntime's own functions (`compute_data_quant_params`, symmetric for signed weights as its quantiser
decides), given the range read a block at a time, and the values are rounded by its `quantize_nparray` a block of
rows at a time from the memory-mapped float32 data. quantize_dynamic holds the whole float graph, its int8 copy
and float temporaries of each weight: E2B's 9.2 GB decoder went past the 24 GiB this export is meant to run in.
"""
from __future__ import annotations

from pathlib import Path

BLOCK_VALUES = 1 << 24  # float32 values quantised at a time (64 MiB)
INLINE_LIMIT = 1 << 30  # weights kept inside the .onnx file below this (protobuf's own limit is 2 GiB)


def write_q8(float_path: Path, out_path: Path) -> Path:
    """quantize_dynamic's int8 MatMul version of the session at `float_path`, written to `out_path` (weights in
    `<file>_data` beside it when they pass INLINE_LIMIT); other weights are copied as they are."""
    import onnx_ir as ir
    model = ir.load(str(float_path))
    graph = model.graph
    activations: dict[str, tuple] = {}  # A's name -> (quantized, scale, zero point) values of its DynamicQuantizeLinear
    weights: dict[str, tuple] = {}  # W's name -> (quantized, scale, zero point) initializer values
    scale_products: dict[str, object] = {}  # scales-Mul node name -> its output value
    for node in [n for n in graph if _quantizable(n)]:
        a, w = node.inputs[0], node.inputs[1]
        new_nodes = []
        if a.name not in activations:
            dql = ir.node("DynamicQuantizeLinear", [a], name=f"{a.name}_QuantizeLinear",
                          outputs=[ir.Value(name=f"{a.name}_quantized"), ir.Value(name=f"{a.name}_scale"),
                                   ir.Value(name=f"{a.name}_zero_point")])
            activations[a.name] = tuple(dql.outputs)
            new_nodes.append(dql)
        if w.name not in weights:
            weights[w.name] = register_quantized(graph, w.name, *int8_weight(w.const_value.numpy()))
        a_q, a_scale, a_zero = activations[a.name]
        w_q, w_scale, w_zero = weights[w.name]
        out = node.outputs[0]
        integer_name = f"{node.name}_quant" if node.name else ""
        integer = ir.node("MatMulInteger", [a_q, w_q, a_zero, w_zero], name=integer_name,
                          outputs=[ir.Value(name=f"{out.name}_output_quantized")])
        cast = ir.node("Cast", integer.outputs, attributes={"to": ir.DataType.FLOAT},
                       name=f"{out.name}_output_quantized_cast",
                       outputs=[ir.Value(name=f"{out.name}_output_quantized_cast_output")])
        new_nodes += [integer, cast]
        scales_name = f"{integer_name}_scales_mul" if integer_name else f"{a_scale.name}_{w_scale.name}_mul"
        if scales_name not in scale_products:
            scales = ir.node("Mul", [a_scale, w_scale], name=scales_name, outputs=[ir.Value(name=f"{scales_name}:0")])
            scale_products[scales_name] = scales.outputs[0]
            new_nodes.append(scales)
        result = ir.node("Mul", [cast.outputs[0], scale_products[scales_name]],
                         name=f"{integer_name}_output_scale_mul" if integer_name else "",
                         outputs=[ir.Value(name=out.name)])
        new_nodes.append(result)
        ir.convenience.replace_nodes_and_values(graph, node, [node], new_nodes, node.outputs, result.outputs)
    for name in weights:
        if not graph.initializers[name].uses():
            graph.initializers.pop(name)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    data = out_path.parent / (out_path.name + "_data")
    if data.exists():
        data.unlink()
    stored = sum(v.const_value.nbytes for v in graph.initializers.values() if v.const_value is not None)
    if stored > INLINE_LIMIT:
        ir.save(model, str(out_path), external_data=data.name)
    else:  # values still in the source's external data are read in, so the file stands alone
        ir.save(ir.external_data.load_to_model(model), str(out_path))
    return out_path


def _quantizable(node) -> bool:
    """quantize_dynamic's test with MatMulConstBOnly: a top-level MatMul whose B is a float32 initializer. An A
    that is itself an initializer (a product torch would have folded) is left float."""
    import onnx_ir as ir
    if node.op_type != "MatMul" or node.domain not in ("", "ai.onnx"):
        return False
    a, w = node.inputs[0], node.inputs[1]
    return (a is not None and w is not None and not a.is_initializer() and w.is_initializer()
            and w.const_value is not None and w.const_value.dtype == ir.DataType.FLOAT)


def register_quantized(graph, name: str, q, scale, zero) -> tuple:
    """`name`_quantized, _scale (float32) and _zero_point (q's dtype) as initializers of `graph`, onnxruntime's
    names for a quantised weight; returns their values."""
    import numpy as np
    import onnx_ir as ir
    values = (ir.Value(name=f"{name}_quantized", const_value=ir.tensor(q)),
              ir.Value(name=f"{name}_scale", const_value=ir.tensor(np.array(scale, np.float32))),
              ir.Value(name=f"{name}_zero_point", const_value=ir.tensor(np.array(zero, q.dtype))))
    for value in values:
        graph.register_initializer(value)
    return values


def int8_weight(weight):
    """(int8 values, scale, zero point) of a float32 weight as quantize_dynamic computes them for QInt8, read a
    block of rows at a time."""
    import numpy as np
    from onnx import TensorProto
    from onnxruntime.quantization.quant_utils import compute_data_quant_params, quantize_nparray
    flat_rows = weight.reshape(-1, weight.shape[-1]) if weight.ndim > 1 else weight.reshape(1, -1)
    rows = max(1, BLOCK_VALUES // max(1, flat_rows.shape[1]))
    low = high = None
    for i in range(0, len(flat_rows), rows):
        block = flat_rows[i:i + rows]
        if block.size:
            low = block.min() if low is None else min(low, block.min())
            high = block.max() if high is None else max(high, block.max())
    sample = np.zeros(1 if low is not None else 0, np.float32)
    zero, scale = compute_data_quant_params(sample, TensorProto.INT8, True, reduce_range=False,
                                            rmin_override=low, rmax_override=high)
    out = np.empty(flat_rows.shape, np.int8)
    for i in range(0, len(flat_rows), rows):
        out[i:i + rows] = quantize_nparray(TensorProto.INT8, flat_rows[i:i + rows], scale, zero)
    return out.reshape(weight.shape), np.float32(scale), np.int8(zero)
