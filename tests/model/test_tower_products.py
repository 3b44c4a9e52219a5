"""The encoder towers' float32 products through the library's GEMM (layers.linear_forward for linear layers)
against PyTorch's own modules on the same inputs and the GEMM's own output. The towers as a whole are compared with transformers' in
tests/reference/test_audio_encoder.py and tests/model/test_vision.py, at sizes where these paths run."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from gemma3n import kernels
from gemma3n.model.layers import linear_forward


def randn(*shape: int, seed: int, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


@pytest.mark.parametrize("bias", [False, True])
def test_linear_forward_is_the_gemm_above_its_thresholds_and_the_module_below(bias):
    layer = nn.Linear(768, 1024, bias=bias)
    with torch.no_grad():
        layer.weight.copy_(randn(1024, 768, seed=12, scale=0.05))
        if bias:
            layer.bias.copy_(randn(1024, seed=13))
        x = randn(2, 40, 768, seed=14)  # 80 rows
        y = linear_forward(layer, x)
        assert y.shape == (2, 40, 1024)
        torch.testing.assert_close(y, layer(x), atol=1e-5, rtol=1e-5)
        if kernels.f32_gemm_applies(layer.weight, x):
            gemm = kernels.f32_gemm(layer.weight, x).view(2, 40, 1024)
            assert torch.equal(y, gemm + layer.bias if bias else gemm)
        assert torch.equal(linear_forward(layer, x[:, :20]), layer(x[:, :20]))  # 40 rows: the module itself


def test_linear_forward_leaves_other_modules_to_themselves():
    """A quantised or adapted layer is not a plain nn.Linear: it is called as it is."""
    calls = []

    class Wrapped(nn.Linear):
        def forward(self, x):
            calls.append(x.shape)
            return super().forward(x)

    layer = Wrapped(512, 1024, bias=False)
    with torch.no_grad():
        x = randn(100, 512, seed=15)
        assert torch.equal(linear_forward(layer, x), layer(x))
    assert len(calls) == 2
