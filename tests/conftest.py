"""Suite-wide settings.

The parity tests compare gemma3n with the reference (transformers, gguf, PyTorch's own products) to float32
rounding, so every test runs the native kernels with float32 activations: the exact dequantised weights times x.
The default int8-activation path (gemma3n.kernels) is tested where it is named: tests/quant/test_kernels.py checks
it against its definition and tests/quant/test_fast_decode.py measures how far it is from the exact path."""
import pytest

from gemma3n import kernels


@pytest.fixture(autouse=True)
def float_activations():
    before = kernels.activation_precision()
    kernels.set_activation_precision("float32")
    yield
    kernels.set_activation_precision(before)
