"""Fixtures of the kernel tests: which code path runs, and the activation precision (restored afterwards)."""
from __future__ import annotations

import pytest

from gemma3n import kernels


@pytest.fixture(params=["avx2", "portable"])
def code_path(request, monkeypatch):
    """Runs a test with the AVX2 kernels and again with the portable C."""
    if kernels.native() is None:
        pytest.skip(f"native kernels unavailable: {kernels.why_not()}")
    if request.param == "avx2" and not kernels.native().g3n_vectorised():
        pytest.skip("this CPU has no AVX2 + FMA")
    monkeypatch.setattr(kernels, "VECTORISED", request.param == "avx2")
    return request.param


@pytest.fixture
def precision():
    """kernels.set_activation_precision, with the setting put back after the test."""
    before = kernels.activation_precision()
    yield kernels.set_activation_precision
    kernels.set_activation_precision(before)
