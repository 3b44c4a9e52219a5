"""LoRA beside every linear kind: the frozen base's forward is its own (quantised kernels), and its gradient with
respect to the input is that of x W^T with W the dequantised weight, computed by autograd as the reference."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from gemma3n.adapters.lora import LoRALinear, frozen_linear, inject, make_differentiable, merge_into
from gemma3n.quant.gguf_modules import GGUFLinear, raw_rows, supported
from gemma3n.quant.modules import Int4Linear, Int8Linear

IN, OUT = 256, 192


def weight() -> torch.Tensor:
    return torch.randn(OUT, IN, generator=torch.Generator().manual_seed(0)) * 0.05


def gguf_q8_0() -> GGUFLinear:
    gguf = pytest.importorskip("gguf")
    q8 = gguf.GGMLQuantizationType.Q8_0
    if not supported(int(q8), IN):
        pytest.skip("the native GGUF kernels are not built here")
    blocks = gguf.quants.quantize(weight().numpy(), q8)
    return GGUFLinear(raw_rows(np.ascontiguousarray(blocks)), int(q8), IN, torch.float32)


KINDS = {
    "float": lambda: torch.nn.Linear(IN, OUT, bias=False).requires_grad_(False),
    "int8": lambda: Int8Linear.from_weight(weight()),
    "int4": lambda: Int4Linear.from_weight(weight(), 32),
    "gguf-q8_0": gguf_q8_0,
}


def dense(module) -> torch.Tensor:
    return module.weight if isinstance(module, torch.nn.Linear) else module.dequantize().float()


@pytest.mark.parametrize("rows", [3, 40])  # the native kernels' regime and the blockwise one
@pytest.mark.parametrize("kind", sorted(KINDS))
def test_frozen_base_gradient_is_that_of_the_dequantised_weight(kind, rows):
    base = KINDS[kind]()
    x = torch.randn(2, rows, IN, generator=torch.Generator().manual_seed(1), requires_grad=True)
    upstream = torch.randn(2, rows, OUT, generator=torch.Generator().manual_seed(2))
    out = frozen_linear(base, x)
    (out * upstream).sum().backward()
    w = dense(base).detach()
    x_ref = x.detach().clone().requires_grad_(True)
    reference = F.linear(x_ref, w)
    (reference * upstream).sum().backward()
    assert torch.allclose(out.float(), reference, rtol=1e-3, atol=1e-4)
    assert torch.allclose(x.grad, x_ref.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_lora_beside_a_base_adds_scaled_b_a(kind):
    base = KINDS[kind]()
    lora = LoRALinear(base, rank=4, alpha=16)
    torch.nn.init.normal_(lora.lora_B.weight, std=0.1)
    x = torch.randn(5, IN, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = base(x).float() + F.linear(x, lora.delta_weight())
        got = lora(x).float()
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-5)
    assert lora.scaling == 4.0


def test_adapter_trains_through_an_untargeted_quantised_layer():
    """Gradients reach an adapter that sits before a quantised layer it does not target."""
    net = torch.nn.Sequential()
    net.add_module("model", torch.nn.Sequential(torch.nn.Linear(IN, IN, bias=False).requires_grad_(False),
                                                Int8Linear.from_weight(weight())))
    wrapped = inject(net, ["model.0"], rank=2, alpha=2)["model.0"]
    torch.nn.init.normal_(wrapped.lora_B.weight, std=0.1)
    wrapped.lora_A.weight.requires_grad_(True)
    make_differentiable(net)
    net(torch.randn(3, IN)).pow(2).sum().backward()
    assert wrapped.lora_A.weight.grad is not None and wrapped.lora_A.weight.grad.abs().sum() > 0


def test_merging_folds_the_adapter_into_a_float_weight_only():
    for kind, merged in (("float", True), ("int8", False)):
        net = torch.nn.Module()
        net.proj = KINDS[kind]()
        lora = inject(net, ["proj"], rank=2, alpha=4)["proj"]
        torch.nn.init.normal_(lora.lora_B.weight, std=0.1)
        x = torch.randn(3, IN)
        with torch.no_grad():
            before = net.proj(x)
            assert merge_into(net, "proj", lora) is merged
            assert torch.allclose(net.proj(x), before, rtol=1e-5, atol=1e-6)
        assert isinstance(net.proj, LoRALinear) is not merged


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_sixteen_bit_base_trains_in_float32_products(dtype):
    """A 16-bit float base on the CPU: forward and input gradient are the float32 products of its 16-bit values
    rounded once to the 16-bit dtype (what a 16-bit GEMM with float32 sums gives), also through FrozenLinear."""
    net = torch.nn.Sequential()
    net.add_module("model", torch.nn.Sequential(torch.nn.Linear(IN, OUT, bias=False)))
    net.model[0].weight = torch.nn.Parameter(weight().to(dtype), requires_grad=False)
    w = net.model[0].weight.float()
    assert make_differentiable(net) == ["model.0"]
    x = torch.randn(2, 40, IN, generator=torch.Generator().manual_seed(1)).to(dtype).requires_grad_(True)
    upstream = torch.randn(2, 40, OUT, generator=torch.Generator().manual_seed(2)).to(dtype)
    out = net(x)
    (out * upstream).sum().backward()
    want = F.linear(x.detach().float(), w)
    assert out.dtype == dtype and torch.equal(out, want.to(dtype))
    assert torch.equal(x.grad, (upstream.float().reshape(-1, OUT) @ w).reshape(x.shape).to(dtype))
