"""The block-wise fp16 conversion (gemma3n/onnx/float16.py) against onnxruntime's own converter holding the whole
graph: same graph, same values, for sessions whose weights live in external data (as E2B's do) or inline."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime
import pytest
from onnx import numpy_helper
from onnxruntime.transformers.float16 import convert_float_to_float16, convert_np_to_float16

from gemma3n.onnx import float16

from .conftest import stored_with_external_data

pytestmark = pytest.mark.slow  # the `exported` fixture traces the tiny model's four graphs


def test_rounding_is_the_converters():
    edges = np.array([0.0, -0.0, 1e-9, -1e-9, 5.96e-8, 6e-8, -6e-8, 1e-5, 65504.0, 65519.0, 7e4, -7e4, 1e30, -1e30,
                      np.inf, -np.inf, np.nan, 1.0, -3.14159, 2.0 ** -20], np.float32)
    scales = 10.0 ** np.random.default_rng(1).integers(-9, 6, 4096)
    values = np.concatenate([edges, (np.random.default_rng(0).standard_normal(4096) * scales).astype(np.float32)])
    got, want = float16.float16_values(values), convert_np_to_float16(values)
    assert got.dtype == want.dtype == np.float16
    assert got.view(np.uint16).tolist() == want.view(np.uint16).tolist()


@pytest.mark.parametrize("session", ["embed_tokens", "decoder_model_merged"])
@pytest.mark.parametrize("external", [True, False], ids=["external-data", "inline"])
def test_fp16_session_equals_onnxruntime_converter(exported, tmp_path, monkeypatch, session, external):
    source = exported / "onnx" / f"{session}.onnx"
    if external:
        source = stored_with_external_data(source, tmp_path / "float")
        monkeypatch.setattr(float16, "BLOCK_VALUES", 1000)  # many blocks per tensor, partial last ones
    want = convert_float_to_float16(onnx.load(str(source)), keep_io_types=True)
    out = float16.write_fp16(source, tmp_path / "fp16" / f"{session}_fp16.onnx")
    assert (out.parent / (out.name + "_data")).exists() == external
    got = onnx.load(str(out))

    assert [n.SerializeToString() for n in got.graph.node] == [n.SerializeToString() for n in want.graph.node]
    assert [(v.name, v.type) for v in got.graph.input] == [(v.name, v.type) for v in want.graph.input]
    assert [(v.name, v.type) for v in got.graph.output] == [(v.name, v.type) for v in want.graph.output]
    got_values = {t.name: numpy_helper.to_array(t) for t in got.graph.initializer}
    want_values = {t.name: numpy_helper.to_array(t) for t in want.graph.initializer}
    assert got_values.keys() == want_values.keys()
    assert any(v.dtype == np.float16 for v in got_values.values())
    for name, value in want_values.items():
        assert got_values[name].dtype == value.dtype and got_values[name].shape == value.shape, name
        assert got_values[name].tobytes() == value.tobytes(), name
    onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])  # and onnxruntime loads it
