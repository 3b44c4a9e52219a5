"""The encoder towers' float32 products through the library's GEMM (layers.linear_forward for linear layers,
vision_blocks.apply_conv for 1x1 convs) and the vision norms written over temporary maps, against PyTorch's own
modules on the same inputs and the GEMM's own output. The towers as a whole are compared with transformers' in
tests/reference/test_audio_encoder.py and tests/model/test_vision.py, at sizes where these paths run."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from gemma3n import kernels
from gemma3n.model.audio import CumulativeGroupNorm, SSCPConvBlock
from gemma3n.model.layers import linear_forward
from gemma3n.model.vision_blocks import RMSNorm2d, SameConv2d, apply_conv, conv2d


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


@pytest.mark.parametrize("bias", [False, True])
def test_a_1x1_conv_of_a_channels_last_map_is_its_pixels_product(bias):
    conv = nn.Conv2d(640, 1024, 1, bias=bias).to(memory_format=torch.channels_last)
    with torch.no_grad():
        conv.weight.copy_(randn(1024, 640, 1, 1, seed=16, scale=0.05))
        x = randn(2, 640, 6, 7, seed=17).contiguous(memory_format=torch.channels_last)  # 84 pixels
        y = apply_conv(conv, x)
        assert y.shape == (2, 1024, 6, 7) and y.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(y, conv(x), atol=1e-5, rtol=1e-5)
        pixels = x.permute(0, 2, 3, 1).reshape(-1, 640)
        if kernels.f32_gemm_applies(conv.weight.reshape(1024, 640), pixels):
            gemm = kernels.f32_gemm(conv.weight.reshape(1024, 640), pixels)
            expected = (gemm + conv.bias if bias else gemm).view(2, 6, 7, 1024).permute(0, 3, 1, 2)
            assert torch.equal(y, expected)
        nchw = x.contiguous()  # not channels-last, a strided conv, a 3x3 conv: the conv itself
        assert torch.equal(apply_conv(conv, nchw), conv(nchw))
        for other in (nn.Conv2d(640, 1024, 1, stride=2, bias=bias), nn.Conv2d(640, 1024, 3, padding=1, bias=bias)):
            assert torch.equal(apply_conv(other, x), other(x))


def test_the_norm_of_a_temporary_map_is_written_over_it():
    """RMSNorm2d(x_is_temporary=True) on a float32 channels-last map writes into x (no new map) the values the
    norm gives into a new map; without the flag, or where the fused pass does not apply, x is left as it was."""
    norm = RMSNorm2d(24, act=True)
    with torch.no_grad():
        norm.weight.copy_(randn(24, seed=18))
        gamma, x = randn(24, seed=19), randn(2, 24, 5, 6, seed=20).contiguous(memory_format=torch.channels_last)
        residual = randn(2, 24, 5, 6, seed=21).contiguous(memory_format=torch.channels_last)
        kept = x.clone()
        expected = norm(x, gamma, residual)
        assert torch.equal(x, kept)
        got = norm(x, gamma, residual, x_is_temporary=True)
        assert torch.equal(got, expected)
        if kernels.map_kernels_apply(kept, residual, norm.weight, gamma):
            assert got.data_ptr() == x.data_ptr()
        nchw = kept.contiguous()
        assert torch.equal(norm(nchw, x_is_temporary=True), norm(kept.contiguous()))
        assert torch.equal(nchw, kept)  # the PyTorch path never writes over its input


def test_the_audio_subsampler_norm_of_its_conv_output_is_written_over_it():
    """CumulativeGroupNorm(x_is_temporary=True) gives the bits of the out-of-place expression, in x's own memory;
    the SSCP block built on it gives the same output as with a norm that never writes over its input; where
    autograd needs x, x is left alone and gradients flow."""
    norm = CumulativeGroupNorm(6, 1e-3)
    with torch.no_grad():
        norm.weight.copy_(randn(6, seed=30))
    x = randn(2, 7, 5, 6, seed=31) * 3 + 1
    expected = norm(x)
    temporary = x.clone()
    got = norm(temporary, x_is_temporary=True)
    assert torch.equal(got, expected) and got.data_ptr() == temporary.data_ptr()
    block = SSCPConvBlock(1, 6, (3, 3), (2, 2), 1e-3)
    features = randn(2, 1, 16, 12, seed=32)
    plain = SSCPConvBlock(1, 6, (3, 3), (2, 2), 1e-3)
    plain.load_state_dict(block.state_dict())
    plain.norm.forward = lambda t, x_is_temporary=False: CumulativeGroupNorm.forward(plain.norm, t)
    with torch.no_grad():
        assert torch.equal(block(features), plain(features))
    leaf = x.clone().requires_grad_(True)
    out = norm(leaf, x_is_temporary=True)
    assert torch.equal(leaf.detach(), x) and torch.equal(out.detach(), expected)
    out.sum().backward()
    assert leaf.grad is not None and torch.isfinite(leaf.grad).all()



@pytest.mark.parametrize("kernel, stride, size, same", [(3, 2, 16, True), (5, 2, 16, True), (5, 2, 15, True),
                                                        (3, 1, 9, True), (5, 1, 8, False), (3, 2, 11, False)])
@pytest.mark.parametrize("channels", [44, 72])
def test_a_depthwise_conv_reads_the_map_with_its_padding_implicit(kernel, stride, size, same, channels, monkeypatch):
    """The library's depthwise conv against PyTorch's on the same (channels-last) map, "SAME" padding (one more
    pixel right and bottom than left and top on an even map) and symmetric; channels past a multiple of 8 and of
    the 32 a pass keeps; with and without bias. The portable loop and the vector one give the same bits."""
    conv = conv2d(channels, channels, kernel, stride, groups=channels, bias=True, same_padding=same)
    conv = conv.to(memory_format=torch.channels_last)
    with torch.no_grad():
        conv.weight.copy_(randn(channels, 1, kernel, kernel, seed=kernel))
        conv.bias.copy_(randn(channels, seed=channels))
        x = randn(2, channels, size, size + 1, seed=size).contiguous(memory_format=torch.channels_last)
        for with_bias in (True, False):
            if not with_bias:
                conv.bias = None
            expected, got = conv(x), apply_conv(conv, x)
            assert got.shape == expected.shape and got.is_contiguous(memory_format=torch.channels_last)
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
            if kernels.native() is None:
                continue
            dynamic = isinstance(conv, SameConv2d)  # else PyTorch's own symmetric padding
            left, _, top, _ = conv.same_pads(x) if dynamic else [conv.padding[1], 0, conv.padding[0], 0]
            by_library = kernels.depthwise_conv(x, conv.weight, conv.bias, conv.stride, top, left,
                                                tuple(expected.shape[-2:]))
            torch.testing.assert_close(by_library, expected, atol=1e-5, rtol=1e-5)
            if kernels.native().g3n_vectorised():
                assert torch.equal(got, by_library)  # the layer took the library's path
                monkeypatch.setattr(kernels, "VECTORISED", False)
                assert torch.equal(kernels.depthwise_conv(x, conv.weight, conv.bias, conv.stride, top, left,
                                                          tuple(expected.shape[-2:])), by_library)
                monkeypatch.setattr(kernels, "VECTORISED", True)
