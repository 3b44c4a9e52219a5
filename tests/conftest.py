"""Suite-wide settings.

The parity tests compare gemma3n with the reference (transformers, gguf, PyTorch's own products) to float32
rounding, which is what the default computes: the native kernels take float32 activations (the exact dequantised
weights times x) unless int8 activations are asked for. The int8-activation path is tested where it is named:
tests/quant/test_kernels.py checks it against its definition and tests/quant/test_fast_decode.py measures how far
it is from the exact path. Those tests switch the process-wide setting; every test gets back the one it started
with, so none leaks into the next."""
import pytest

from gemma3n import kernels


@pytest.fixture(autouse=True)
def restore_activation_precision():
    before = kernels.activation_precision()
    yield
    kernels.set_activation_precision(before)
