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
from gemma3n.model.layers import gaussian_topk, gelu_tanh
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


def per_token_with_gelu_over_every_unit(mlp: MLP, x: torch.Tensor) -> torch.Tensor:
    """The per-token path as it was first written: GELU over the whole activation, then torch.nonzero, bincount and
    cumsum for the pairs and each token's offsets."""
    act = gelu_tanh(gaussian_topk(mlp.gate_proj(x), mlp.z))
    flat = act.reshape(-1, act.shape[-1])
    tokens, units = flat.nonzero(as_tuple=True)
    up = mlp.up_proj.forward_pairs(x.reshape(-1, x.shape[-1]), tokens, units)
    hidden = torch.zeros_like(flat).index_put_((tokens, units), flat[tokens, units] * up.to(flat.dtype))
    offsets = torch.zeros(flat.shape[0] + 1, dtype=torch.int64)
    torch.cumsum(torch.bincount(tokens, minlength=flat.shape[0]), 0, out=offsets[1:])
    out = mlp.down_proj.forward_sparse_inputs_per_row(hidden, offsets, units)
    return mlp.down_proj(hidden.reshape(act.shape)) if out is None else out.reshape(*act.shape[:-1], -1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_gelu_of_the_active_units_alone_gives_the_same_bits(dtype):
    """The per-token path takes GELU of the active units only, and their pairs from the library's row counts: the
    same activations, pairs and offsets as GELU over every unit and torch.nonzero, so the same output bits (float32
    GELU included, whose scalar tail code rounds differently from its vector code)."""
    mlp, _ = mlps("int4")
    mlp = mlp.to(dtype)
    with torch.inference_mode():
        for tokens in (kernels.MAX_ROWS + 1, 37, 64):
            x = torch.randn(1, tokens, DIM, generator=torch.Generator().manual_seed(tokens)).to(dtype)
            assert torch.equal(mlp(x), per_token_with_gelu_over_every_unit(mlp, x))
