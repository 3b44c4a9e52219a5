"""Vision tower: each MobileNet-V5 block against timm's, and the full 300M tower against transformers' vision tower."""
from __future__ import annotations

from functools import partial

import pytest
import torch
from torch import nn

timm = pytest.importorskip("timm")
transformers = pytest.importorskip("transformers")

from timm.layers import RmsNorm2d, create_conv2d  # noqa: E402
from timm.models._efficientnet_blocks import EdgeResidual as TimmEdgeResidual  # noqa: E402
from timm.models._efficientnet_blocks import MobileAttention as TimmMobileAttention  # noqa: E402
from timm.models._efficientnet_blocks import UniversalInvertedResidual as TimmUIR  # noqa: E402
from timm.models.mobilenetv5 import MobileNetV5MultiScaleFusionAdapter as TimmMSFA  # noqa: E402

from gemma3n.model import vision_blocks as ours  # noqa: E402
from gemma3n.model.vision import ARCHITECTURES, build_vision_tower  # noqa: E402

from ..reference.tiny import randomize  # noqa: E402

RTOL = 1e-4  # fp32, max abs error relative to the largest reference value
GELU = partial(nn.GELU, approximate="tanh")
TIMM_BLOCK = dict(act_layer=GELU, norm_layer=RmsNorm2d)


def assert_matches(ref: nn.Module, mine: nn.Module, *inputs, seed: int = 0):
    """Randomise the reference, copy its weights into ours (strict), compare outputs: ours on the reference's
    NCHW maps (PyTorch ops) and on channels-last maps, as the tower runs them (the fused native norms)."""
    randomize(ref, seed, scale=0.2)
    mine.load_state_dict(ref.state_dict(), strict=True)
    mine.eval()
    with torch.no_grad():
        expected = ref(*inputs)
        for layout in (torch.contiguous_format, torch.channels_last):
            mine = mine.to(memory_format=layout)
            got = mine(*(x.contiguous(memory_format=layout) for x in inputs))
            assert got.shape == expected.shape
            err = ((got - expected).abs().max() / expected.abs().max()).item()
            assert err <= RTOL, (layout, err)


def image(c: int, size: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(2, c, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("size", [15, 16])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("kernel", [3, 5])
@pytest.mark.parametrize("pad", ["same", ""])
def test_conv_padding_matches_timm(pad, kernel, stride, size):
    ref = create_conv2d(4, 6, kernel, stride=stride, padding=pad)
    mine = ours.conv2d(4, 6, kernel, stride, same_padding=pad == "same")
    assert_matches(ref, mine, image(4, size))


def test_rms_norm_2d_matches_timm():
    assert_matches(RmsNorm2d(12), ours.RMSNorm2d(12), image(12, 5))


@pytest.mark.parametrize("in_ch,out_ch,stride,pad", [(8, 16, 2, "same"), (16, 16, 1, "same"), (8, 16, 2, "")])
def test_edge_residual_matches_timm(in_ch, out_ch, stride, pad):
    ref = TimmEdgeResidual(in_ch, out_ch, exp_kernel_size=3, stride=stride, pad_type=pad, exp_ratio=4, **TIMM_BLOCK)
    mine = ours.EdgeResidual(in_ch, out_ch, 3, stride, 4, same_padding=pad == "same")
    assert_matches(ref, mine, image(in_ch, 16))


@pytest.mark.parametrize("start,mid,stride,in_ch,out_ch,pad", [
    (3, 5, 2, 8, 16, "same"),   # stage-opening block: both depthwise convs, stride on the mid one
    (5, 0, 1, 16, 16, "same"),  # start conv only, residual
    (0, 0, 1, 16, 16, "same"),  # 1x1 only (the FFN between attention blocks)
    (5, 0, 2, 8, 16, "same"),   # stride on the start conv when there is no mid conv
    (3, 5, 2, 8, 16, ""),       # symmetric padding (the non-encoder variants)
])
def test_universal_inverted_residual_matches_timm(start, mid, stride, in_ch, out_ch, pad):
    ref = TimmUIR(in_ch, out_ch, dw_kernel_size_start=start, dw_kernel_size_mid=mid, stride=stride, pad_type=pad,
                  exp_ratio=4, layer_scale_init_value=1e-5, **TIMM_BLOCK)
    mine = ours.UniversalInvertedResidual(in_ch, out_ch, start, mid, stride, 4, same_padding=pad == "same")
    assert_matches(ref, mine, image(in_ch, 16))


@pytest.mark.parametrize("kv_stride,size", [(1, 8), (2, 12), (2, 11)])
def test_mobile_multi_query_attention_matches_timm(kv_stride, size):
    ref = TimmMobileAttention(16, 16, dw_kernel_size=3, pad_type="same", num_heads=3, key_dim=8, value_dim=8,
                              use_multi_query=True, kv_stride=kv_stride, layer_scale_init_value=1e-5, **TIMM_BLOCK)
    mine = ours.MobileAttention(16, 16, heads=3, head_dim=8, kernel=3, kv_stride=kv_stride)
    assert_matches(ref, mine, image(16, size))


@pytest.mark.parametrize("high,low,out_res", [(8, 4, 8), (12, 6, 4), (10, 5, 4)])  # as is / avg-pool / bilinear
def test_multi_scale_fusion_adapter_matches_timm(high, low, out_res):
    ref = TimmMSFA(in_chs=[8, 16], out_chs=12, output_resolution=out_res, norm_layer=RmsNorm2d, act_layer=GELU)
    mine = ours.MultiScaleFusionAdapter(24, 12, out_res)
    features = [image(8, high, seed=1), image(16, low, seed=2)]
    randomize(ref, 0, scale=0.2)
    mine.load_state_dict(ref.state_dict(), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(mine(features), ref(features), rtol=RTOL, atol=RTOL)


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_tower_has_timm_keys_and_shapes(name):
    """Every table builds exactly timm's parameter set (names and shapes), on the meta device."""
    ref = timm.create_model(name, pretrained=False, num_classes=0, device="meta")
    with torch.device("meta"):
        mine = build_vision_tower({"architecture": name})
    assert {k: v.shape for k, v in mine.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}


def test_unknown_architecture_and_bad_pixels_are_clear_errors():
    with pytest.raises(ValueError, match="mobilenetv5_300m_enc"):
        build_vision_tower({"architecture": "resnet50"})
    with pytest.raises(ValueError, match="model_args"):
        build_vision_tower({"architecture": "mobilenetv5_base", "model_args": {"drop_rate": 0.1}})
    tower = build_vision_tower({"architecture": "mobilenetv5_base"})
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\).*\(1, 4, 32, 32\)"):
        tower(torch.rand(1, 4, 32, 32))


@pytest.fixture(scope="module")
def full_towers():
    """transformers' vision tower (TimmWrapper around mobilenetv5_300m_enc, as Gemma3nModel builds it), randomised
    with a small scale so 84 blocks stay well-conditioned, and ours loaded from its weights as the runtime does:
    built on the meta device, then load_state_dict(assign=True)."""
    from transformers import AutoModel, Gemma3nVisionConfig
    torch.manual_seed(0)
    ref = randomize(AutoModel.from_config(Gemma3nVisionConfig()), seed=3, scale=0.05)
    with torch.device("meta"):
        mine = build_vision_tower(Gemma3nVisionConfig().to_dict())
    mine.load_state_dict(ref.timm_model.state_dict(), strict=True, assign=True)
    return ref, mine.eval()


def reference_soft_tokens(ref, pixel_values: torch.Tensor) -> torch.Tensor:
    """What Gemma3nModel.get_image_features computes before its scaling and embed_vision."""
    hidden = ref(pixel_values=pixel_values, do_pooling=False, return_dict=True).last_hidden_state
    return hidden.reshape(hidden.shape[0], 2048, 256).permute(0, 2, 1)


def compare_full(full_towers, size: int, batch: int):
    ref, mine = full_towers
    pixels = torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(size))
    with torch.no_grad():
        expected, got = reference_soft_tokens(ref, pixels), mine(pixels)
    assert got.shape == (batch, 256, 2048)
    err = ((got - expected).abs().max() / expected.abs().max()).item()
    assert err <= RTOL, err


def test_full_tower_matches_transformers_at_256(full_towers):
    compare_full(full_towers, 256, batch=2)


@pytest.mark.slow
@pytest.mark.parametrize("size", [512, 768])
def test_full_tower_matches_transformers_at_high_resolution(full_towers, size):
    compare_full(full_towers, size, batch=1)
