"""The block-wise q8 conversion (gemma3n/onnx/int8.py) against onnxruntime's quantize_dynamic holding the whole
graph: same nodes, same values, same outputs, for sessions whose weights live in external data (as E2B's do) or
inline."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime
import pytest
from onnx import numpy_helper
from onnxruntime.quantization import QuantType, quantize_dynamic

from gemma3n.onnx import int8

from .conftest import stored_with_external_data

pytestmark = pytest.mark.slow  # the `exported` fixture traces the tiny model's four graphs


def _quantize_dynamic(source, out):
    out.parent.mkdir(parents=True, exist_ok=True)
    quantize_dynamic(str(source), str(out), op_types_to_quantize=["MatMul"], weight_type=QuantType.QInt8,
                     per_channel=False, reduce_range=False,
                     extra_options={"EnableSubgraph": False, "MatMulConstBOnly": True})
    return onnx.load(str(out))


def _node(n):
    return (n.op_type, n.domain, n.name, list(n.input), list(n.output),
            sorted((a.name, onnx.helper.get_attribute_value(a)) for a in n.attribute))


@pytest.mark.parametrize("session", ["embed_tokens", "decoder_model_merged"])
@pytest.mark.parametrize("external", [True, False], ids=["external-data", "inline"])
def test_q8_session_equals_quantize_dynamic(exported, tmp_path, monkeypatch, session, external):
    source = exported / "onnx" / f"{session}.onnx"
    if external:
        source = stored_with_external_data(source, tmp_path / "float")
        monkeypatch.setattr(int8, "BLOCK_VALUES", 1000)  # many blocks per tensor, partial last ones
        monkeypatch.setattr(int8, "INLINE_LIMIT", 0)
    want = _quantize_dynamic(source, tmp_path / "reference" / f"{session}_quantized.onnx")
    out = int8.write_q8(source, tmp_path / "q8" / f"{session}_quantized.onnx")
    assert (out.parent / (out.name + "_data")).exists() == external
    got = onnx.load(str(out))

    # quantize_dynamic emits its nodes in another (also topological) order; onnxruntime loading ours checks ours
    assert sorted(map(_node, got.graph.node), key=repr) == sorted(map(_node, want.graph.node), key=repr)
    assert any(n.op_type == "MatMulInteger" for n in got.graph.node)
    got_values = {t.name: numpy_helper.to_array(t) for t in got.graph.initializer}
    want_values = {t.name: numpy_helper.to_array(t) for t in want.graph.initializer}
    assert got_values.keys() == want_values.keys()
    for name, value in want_values.items():
        assert got_values[name].dtype == value.dtype and got_values[name].shape == value.shape, name
        assert got_values[name].tobytes() == value.tobytes(), name

    sessions = [onnxruntime.InferenceSession(str(p), providers=["CPUExecutionProvider"])
                for p in (out, tmp_path / "reference" / out.name)]
    feeds = _feeds(sessions[0])
    for got_out, want_out in zip(*(s.run(None, feeds) for s in sessions)):
        assert np.array_equal(got_out, want_out)


def test_int8_weight_equals_onnxruntime_on_edge_ranges(monkeypatch):
    from onnx import TensorProto
    from onnxruntime.quantization.quant_utils import quantize_data
    monkeypatch.setattr(int8, "BLOCK_VALUES", 7)
    rng = np.random.default_rng(0)
    for weight in (rng.standard_normal((13, 5)).astype(np.float32), np.zeros((4, 3), np.float32),
                   np.abs(rng.standard_normal((6, 4))).astype(np.float32), -np.ones((3, 3), np.float32),
                   rng.standard_normal(17).astype(np.float32)):
        q, scale, zero = int8.int8_weight(weight)
        want_zero, want_scale, want_q = quantize_data(weight.flatten(), TensorProto.INT8, True)
        assert q.tobytes() == np.asarray(want_q, np.int8).tobytes() and q.shape == weight.shape
        assert scale == np.float32(want_scale) and zero == want_zero


def _feeds(session):
    """Inputs for one prefill of 5 tokens with an empty cache, random where the value is free."""
    rng = np.random.default_rng(3)
    feeds = {}
    for i in session.get_inputs():
        shape = [d if isinstance(d, int) else (0 if "past" in i.name and j == 2 else (1 if j == 0 else 5))
                 for j, d in enumerate(i.shape)]
        if i.type == "tensor(int64)":
            if "mask" in i.name:
                feeds[i.name] = np.ones(shape, np.int64)
            else:  # token ids, positions 0.., and 0 logits to keep (all of them)
                feeds[i.name] = (np.arange(int(np.prod(shape)), dtype=np.int64) % 7).reshape(shape)
        elif i.type == "tensor(bool)":
            feeds[i.name] = np.zeros(shape, bool)
        else:
            feeds[i.name] = rng.standard_normal(shape).astype(np.float32)
    return feeds
