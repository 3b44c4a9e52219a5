"""Fixtures of the kernel tests: which code path runs, and the activation precision (restored afterwards)."""
from __future__ import annotations

import pytest

from gemma3n import kernels


@pytest.fixture(params=["avx512", "avx2", "portable"])
def code_path(request, monkeypatch):
    """Runs a test with the vectorised kernels (their 512-bit paths where the CPU has them, then AVX2 alone) and
    again with the portable C."""
    if kernels.native() is None:
        pytest.skip(f"native kernels unavailable: {kernels.why_not()}")
    if request.param != "portable" and not kernels.native().g3n_vectorised():
        pytest.skip("this CPU has no AVX2 + FMA")
    if not kernels.set_avx512(request.param == "avx512") and request.param == "avx512":
        pytest.skip("this CPU has no AVX-512")
    monkeypatch.setattr(kernels, "VECTORISED", request.param != "portable")
    yield request.param
    kernels.set_avx512(True)


@pytest.fixture
def precision():
    """kernels.set_activation_precision, with the setting put back after the test."""
    before = kernels.activation_precision()
    yield kernels.set_activation_precision
    kernels.set_activation_precision(before)
