"""The decode-overhead rewrites of layers.py give the same bits as the plain expressions they replace."""
from __future__ import annotations

import math

import pytest
import torch
from torch.nn import functional as F

from gemma3n.model.layers import RMSNorm, RotaryEmbedding, additive_mask, apply_rope, const, rms_norm_no_scale, \
    rotate, scalar_operand, softcap


def _plain_rms_norm(x, weight, eps, offset):
    h = x.float()
    h = h * torch.pow(h.pow(2).mean(-1, keepdim=True) + eps, -0.5)
    if weight is not None:
        h = h * (weight.float() + offset)
    return h.type_as(x)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("offset", [0.0, 1.0])
def test_rms_norm_same_bits_as_plain(dtype, offset):
    g = torch.Generator().manual_seed(0)
    norm = RMSNorm(96, 1e-6, offset=offset).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(96, generator=g))
    for shape in [(1, 1, 96), (2, 5, 96), (3, 2, 4, 96)]:
        x = (torch.randn(shape, generator=g) * 3).to(dtype)
        assert torch.equal(norm(x), _plain_rms_norm(x, norm.weight, 1e-6, offset))
        assert torch.equal(rms_norm_no_scale(x, 1e-6), _plain_rms_norm(x, None, 1e-6, 0.0))
    strided = (torch.randn(96, 4, generator=g).to(dtype)).t()[:1, None]  # a non-contiguous last dimension
    assert torch.equal(norm(strided), _plain_rms_norm(strided, norm.weight, 1e-6, offset))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_rotate_same_bits_as_apply_rope(dtype):
    g = torch.Generator().manual_seed(1)
    rope = RotaryEmbedding(64, 10_000.0)
    positions = torch.tensor([[0, 5, 17], [3, 4, 2000]])
    cos, sin = rope(positions, dtype)
    x = torch.randn(2, 4, 3, 64, generator=g).to(dtype)
    assert torch.equal(rotate(x, *rope.tables(positions, dtype)), apply_rope(x, cos, sin))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_additive_mask_same_attention_as_boolean(dtype):
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(2, 4, s, 32, generator=g).to(dtype) for s in (3, 7, 7))
    allowed = torch.rand(2, 1, 3, 7, generator=g) > 0.4
    allowed[..., 0] = True
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=1.0)
    assert torch.equal(F.scaled_dot_product_attention(q, k, v, attn_mask=additive_mask(allowed, dtype), scale=1.0),
                       ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_scalar_operands_same_bits_as_python_floats(dtype):
    x = (torch.randn(4, 33, generator=torch.Generator().manual_seed(3)) * 5).to(dtype)
    for value in (math.sqrt(2), 1.0, 1e-6, 1 / 2048, math.sqrt(2048)):
        assert torch.equal(x / scalar_operand(value, dtype), x / value)
        assert torch.equal(x + scalar_operand(value, dtype), x + value)
        assert torch.equal(x * const(value, dtype), x * torch.tensor(value, dtype=dtype))


def test_softcap_over_a_temporary_same_bits_and_autograd_kept():
    """The head's cap written over its fresh logits gives the plain expression's bits; where autograd needs the
    input (fine-tuning), the input is left alone and gradients flow."""
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 3, 1000, generator=g) * 40
    plain = torch.tanh(logits / 30.0) * 30.0
    temporary = logits.clone()
    out = softcap(temporary, 30.0, x_is_temporary=True)
    assert torch.equal(out, plain) and out.data_ptr() == temporary.data_ptr()
    leaf = logits.clone().requires_grad_(True)
    out = softcap(leaf, 30.0, x_is_temporary=True)
    assert torch.equal(leaf.detach(), logits) and torch.equal(out.detach(), plain)
    out.sum().backward()
    assert torch.allclose(leaf.grad, 1 - torch.tanh(logits / 30.0) ** 2, atol=1e-6)
    assert softcap(logits, None, x_is_temporary=True) is logits
