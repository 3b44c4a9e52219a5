"""A sparse MLP over a prompt (text.MLP.per_token_forward): each token's up projection computes only its own active
units and, for int4, its down projection reads only their columns. The result must be the dense MLP's, computed in
float64 from the same (dequantised) weights, to float32 rounding; and the path must actually run where it applies,
and step aside where it does not."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from gemma3n import kernels
from gemma3n.model.layers import gaussian_topk
from gemma3n.model.text import MLP, enable_sparse_decode
from gemma3n.quant import Int4Linear, Int8Linear
from gemma3n.quant.gguf_modules import GGUFLinear, raw_rows

pytestmark = pytest.mark.skipif(kernels.native() is None, reason=f"native kernels unavailable: {kernels.why_not()}")

DIM, HIDDEN = 256, 1024


def quantised(kind: str, weight: torch.Tensor) -> tuple[nn.Module, torch.Tensor]:
    """(the linear of `kind` holding `weight`, its dequantised weight in float64)"""
    if kind == "int4":
        lin = Int4Linear.from_weight(weight, 64)
    elif kind == "int8":
        lin = Int8Linear.from_weight(weight)
    elif kind == "gguf":
        gguf = pytest.importorskip("gguf")
        q8 = gguf.GGMLQuantizationType.Q8_0
        blocks = gguf.quants.quantize(weight.numpy(), q8)
        lin = GGUFLinear(raw_rows(blocks), q8, weight.shape[1], torch.float32)
        return lin, torch.from_numpy(np.array(gguf.quants.dequantize(blocks, q8), dtype=np.float64))
    else:
        return nn.Linear(weight.shape[1], weight.shape[0], bias=False).requires_grad_(False), weight.double()
    return lin, lin.dequantize().double()


def mlps(kind: str) -> tuple[MLP, MLP]:
    """(an MLP whose up / down projections are `kind`, with its sparse paths on; the same MLP in float64, dense)"""
    g = torch.Generator().manual_seed(0)
    mlp = MLP(DIM, HIDDEN, 0.95)
    for lin in (mlp.gate_proj, mlp.up_proj, mlp.down_proj):
        lin.weight.requires_grad_(False).copy_(torch.randn(lin.weight.shape, generator=g) * 0.05)
    ref = copy.deepcopy(mlp).double()
    for name in ("up_proj", "down_proj"):
        lin, w = quantised(kind, getattr(mlp, name).weight.detach().clone())
        if kind == "float":
            lin.weight.copy_(w)
        setattr(mlp, name, lin)
        getattr(ref, name).weight.copy_(w)
    assert enable_sparse_decode(mlp) == 1
    return mlp, ref


def spy(monkeypatch, module: nn.Module, method: str) -> list:
    calls = []
    original = getattr(type(module), method)

    def counted(self, *args):
        calls.append(args[0].shape)
        return original(self, *args)
    monkeypatch.setattr(type(module), method, counted)
    return calls


@pytest.fixture(params=["avx512", "avx2"])
def vector_width(request):
    """With the kernels' 512-bit paths (where the CPU has them: the int4 down projection then takes the GEMM,
    which skips zero inputs, instead of per-row columns) and without."""
    if not kernels.set_avx512(request.param == "avx512") and request.param == "avx512":
        pytest.skip("this CPU has no AVX-512")
    yield request.param
    kernels.set_avx512(True)


@pytest.mark.parametrize("kind", ["int4", "int8", "gguf", "float"])
def test_prompt_through_a_sparse_mlp_is_the_dense_product(kind, monkeypatch, vector_width):
    mlp, ref = mlps(kind)
    x = torch.randn(2, 24, DIM, generator=torch.Generator().manual_seed(1))
    up_calls = spy(monkeypatch, mlp.up_proj, "forward_pairs") if kind != "float" else []
    down_calls = spy(monkeypatch, mlp.down_proj, "forward_sparse_inputs_per_row") if kind == "int4" else []
    with torch.inference_mode():
        y = mlp(x).double()
        exact = ref(x.double())
        active = (gaussian_topk(ref.gate_proj(x.double()), ref.z) != 0).double().mean()
    assert 0.02 < float(active) < 0.5  # the Gaussian top-k kept a few percent of the units
    assert len(up_calls) == (kind != "float") and len(down_calls) == (kind == "int4")
    # float32 sums of 256 and 1024 terms, and a float32 gate whose threshold moves the kept values by its rounding
    assert float((y - exact).abs().max() / exact.abs().max()) < 2e-5


def test_short_prompts_and_decode_do_not_take_the_per_token_path(monkeypatch):
    """Up to kernels.MAX_ROWS tokens the dense products may take int8 activations (an opt-in), which the per-token
    products never do: those calls keep the union path or the dense one."""
    mlp, ref = mlps("int4")
    calls = spy(monkeypatch, mlp.up_proj, "forward_pairs")
    g = torch.Generator().manual_seed(2)
    with torch.inference_mode():
        for tokens in (1, MLP.SPARSE_MAX_TOKENS + 1, kernels.MAX_ROWS):
            x = torch.randn(1, tokens, DIM, generator=g)
            exact = ref(x.double())
            assert float((mlp(x).double() - exact).abs().max() / exact.abs().max()) < 2e-5
    assert calls == []
