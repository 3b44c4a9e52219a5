"""Quantisation schemes reach Gemma 3's SigLIP tower: its biased linears become int8 / int4 products plus the float
bias (the position table int8), its output stays close to the float tower's, and `load(..., quantize=)` quantises the
tower when the first image loads it."""
from __future__ import annotations

import copy

import torch
from torch import nn

import gemma3n
from gemma3n.model.siglip import build_siglip_tower
from gemma3n.quant import Int4Linear, Int8Linear, quantize_module
from gemma3n.quant.modules import BiasedLinear

from ..reference.tiny import randomize

TOWER = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4, image_size=64,
             patch_size=8)


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want).norm() / want.norm()).item()


def test_tower_int8_and_int4():
    torch.set_num_threads(1)
    tower = randomize(build_siglip_tower(TOWER), 0, scale=0.05)
    pixels = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        want = tower(pixels)
        for fmt, kind, bound in (("int8", Int8Linear, 0.02), ("int4", Int4Linear, 0.2)):
            quantised = quantize_module(copy.deepcopy(tower), fmt, 64)
            linears = [m for m in quantised.modules() if isinstance(m, BiasedLinear)]
            assert len(linears) == 6 * TOWER["num_hidden_layers"]  # q, k, v, out, fc1, fc2
            assert all(isinstance(m.linear, kind) for m in linears)
            assert not any(type(m) is nn.Linear for m in quantised.modules())
            layer = quantised.encoder.layers[0].self_attn.q_proj
            torch.testing.assert_close(layer.bias, tower.encoder.layers[0].self_attn.q_proj.bias)
            error = relative_error(quantised(pixels), want)
            assert 0 < error < bound, (fmt, error)


def test_load_with_quantize_quantises_the_tower_on_first_use(tmp_path):
    torch.set_num_threads(1)
    from ..reference.tiny_gemma3 import build_gemma3_reference, image_run
    ref = build_gemma3_reference(seed=4, vision=dict(TOWER, layer_norm_eps=1e-6, vision_use_head=False))
    ref.save_pretrained(tmp_path)
    ids = torch.tensor([[2, 31, *image_run(), 13, 44]])
    pixels = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(2)) * 2 - 1
    exact = gemma3n.load(tmp_path).logits(ids, pixel_values=pixels)
    model = gemma3n.load(tmp_path, quantize="int8")
    assert model.multimodal.loaded_towers == []
    got = model.logits(ids, pixel_values=pixels)
    tower = model.multimodal.tower("vision")
    assert isinstance(tower.encoder.layers[0].mlp.fc1, BiasedLinear)
    assert isinstance(tower.encoder.layers[0].mlp.fc1.linear, Int8Linear)
    assert relative_error(got, exact) < 0.05


def test_quantised_checkpoint_keeps_the_vision_side(tmp_path):
    """`gemma3n quantize` copies the tower and projector; the quantised folder loads and takes images."""
    torch.set_num_threads(1)
    from gemma3n.convert import quantize_checkpoint

    from ..reference.tiny_gemma3 import build_gemma3_reference, image_run
    src, dst = tmp_path / "src", tmp_path / "dst"
    build_gemma3_reference(seed=5, vision=dict(TOWER, layer_norm_eps=1e-6, vision_use_head=False)).save_pretrained(src)
    quantize_checkpoint(src, dst, "int8")
    ids = torch.tensor([[2, 31, *image_run(), 13, 44]])
    pixels = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(3)) * 2 - 1
    exact = gemma3n.load(src).logits(ids, pixel_values=pixels)
    model = gemma3n.load(dst)
    got = model.logits(ids, pixel_values=pixels)
    assert isinstance(model.multimodal.tower("vision").encoder.layers[1].self_attn.k_proj.linear, Int8Linear)
    assert relative_error(got, exact) < 0.05
