"""The per-token row kernels of a prompt's layers (gemma3n/kernels/prompt_rows.c) against independent references.

Gaussian top-k must be ReLU(x - (mean + std * z)) with the row's mean and population std taken exactly (float64)
and rounded once to the dtype, then each operation rounded to the dtype as PyTorch's ops on it round: bit for bit,
in float32, bfloat16 and float16, for rows of any width. AltUp's prediction must be the float64 sum of each
stream's mix rounded to float32, then to the dtype, plus the stream, rounded to the dtype. Beside PyTorch's own
expressions (which sum in float32) both may differ only where that float32 rounding decides a half-precision
rounding: rarely, and by one unit in the last place."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from gemma3n import kernels
from gemma3n.model import layers
from gemma3n.model.text import AltUp

pytestmark = pytest.mark.skipif(kernels.native() is None, reason=f"native kernels unavailable: {kernels.why_not()}")

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def reference_topk(x: torch.Tensor, z: float) -> torch.Tensor:
    xd = x.double()
    mean = xd.mean(-1, keepdim=True)
    std = ((xd - mean) ** 2).mean(-1, keepdim=True).sqrt()
    m, sd = mean.float().to(x.dtype), std.float().to(x.dtype)
    return F.relu(x - (m + sd * torch.tensor(z, dtype=x.dtype)))


def pytorch_topk(x: torch.Tensor, z: float, monkeypatch) -> torch.Tensor:
    with monkeypatch.context() as m:
        m.setattr(kernels, "row_kernels_apply", lambda *t: False)
        return layers.gaussian_topk(x, z)


def gate_rows(rows: int, n: int, seed: int, dtype: torch.dtype) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(rows, n, generator=g) * 3 + torch.randn(rows, 1, generator=g)).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", [8192, 6000, 37, 1])
def test_gaussian_topk_is_the_exact_statistics_rounded_as_pytorch_rounds(dtype, n, monkeypatch):
    z = float(layers.const(layers.normal_quantile(0.95), dtype))
    x = gate_rows(67, n, n, dtype)
    assert kernels.row_kernels_apply(x)
    y = layers.gaussian_topk(x, z)
    assert y.dtype == dtype and y.shape == x.shape
    assert torch.equal(y, reference_topk(x, z))
    assert (y > 0).float().mean() < 0.2 if n > 100 else True  # it keeps the top of each row
    # beside PyTorch's mean and std (float32 sums): a cut-off a few float32 ulps away, which in half precision
    # gives the same values in (nearly) every row
    theirs = pytorch_topk(x, z, monkeypatch)
    assert (theirs.float() - y.float()).abs().max() <= 8 * torch.finfo(torch.float32).eps * x.float().abs().max()
    if dtype != torch.float32:
        rows_equal = (theirs == y).all(-1).float().mean()
        assert rows_equal >= 0.97, f"only {rows_equal:.3f} of the rows equal to PyTorch's expression"


def test_gaussian_topk_takes_strided_batches_and_keeps_nans():
    x = gate_rows(2 * 5 * 2, 300, 3, torch.bfloat16).reshape(2, 5, 2, 300).transpose(1, 2)  # not contiguous
    z = float(layers.const(1.6484375, torch.bfloat16))
    assert torch.equal(layers.gaussian_topk(x, z), reference_topk(x.contiguous(), z))
    x = x.contiguous()
    x[0, 0, 0, 7] = float("nan")
    y = layers.gaussian_topk(x, z)
    assert y[0, 0, 0].isnan().all()  # the row's statistics are NaN, so is every value
    assert torch.equal(y[1], reference_topk(x[1], z))


def test_gaussian_topk_steps_aside_for_autograd_and_tracing():
    x = gate_rows(4, 64, 4, torch.float32).requires_grad_(True)
    assert not kernels.row_kernels_apply(x)
    layers.gaussian_topk(x, 1.6448536).sum().backward()  # PyTorch's ops: a gradient flows
    assert x.grad is not None and x.grad.abs().sum() > 0
    with torch.no_grad():
        assert kernels.row_kernels_apply(x)


def reference_mix(streams: torch.Tensor, coefs: torch.Tensor) -> torch.Tensor:
    s = streams.shape[0]
    x = streams.double()
    mixed = torch.stack([sum(coefs[..., q, p, None].double() * x[p] for p in range(s)) for q in range(s)])
    return mixed.float().to(streams.dtype) + streams


def altup_module(dim: int, dtype: torch.dtype, seed: int) -> AltUp:
    torch.manual_seed(seed)
    altup = AltUp(dim, 4, 1e-6)
    for p in altup.parameters():
        torch.nn.init.normal_(p, 0.0, 0.5)
    return altup.to(dtype).requires_grad_(False)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("dim", [96, 100])  # 8 values a vector, and 4 past the last vector
def test_altup_prediction_is_the_exact_mix_rounded_once(dtype, dim, monkeypatch):
    tokens = 13
    altup = altup_module(dim, dtype, 5)
    streams = (torch.randn(4, 2, tokens, dim, generator=torch.Generator().manual_seed(6)) * 2).to(dtype)
    calls = []
    mix = kernels.altup_mix
    monkeypatch.setattr(kernels, "altup_mix", lambda *a: calls.append(1) or mix(*a))
    out = altup.predict(streams)
    assert calls, "the row kernel did not run"
    coefs = altup.prediction_coefs(altup.route(streams[0])).unflatten(-1, (4, 4))
    assert out.dtype == dtype and out.shape == streams.shape
    assert torch.equal(out, reference_mix(streams, coefs))
    # beside PyTorch's batched float32 matmul: within float32 rounding of what each output adds up, and in half
    # precision the same values but for a rare last-place rounding
    monkeypatch.setattr(kernels, "row_kernels_apply", lambda *t: False)
    theirs = altup.predict(streams)
    magnitude = reference_mix(streams.abs().double(), coefs.abs().double()).float()
    slack = 8 * torch.finfo(torch.float32).eps * magnitude + (out.float().abs() * torch.finfo(dtype).eps)
    assert ((theirs.float() - out.float()).abs() <= slack).all()
    if dtype != torch.float32:
        assert (theirs == out).float().mean() >= 0.99


def test_altup_mix_checks_its_shapes():
    streams = torch.randn(4, 1, 3, 8)
    with pytest.raises(ValueError, match="coefs of shape"):
        kernels.altup_mix(streams, torch.randn(1, 3, 4, 3))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_nonzero_rows_are_torch_nonzero_with_each_rows_offset(dtype):
    g = torch.Generator().manual_seed(9)
    x = torch.where(torch.rand(23, 301, generator=g) < 0.05, torch.randn(23, 301, generator=g), 0.0).to(dtype)
    x[3] = 0.0  # a row with none
    x[4] = 1.0  # a row with all
    x[5, ::7] = -0.0  # negative zeros are zeros
    x[6, 11] = float("nan")  # NaN is not
    rows_at, pair_rows, cols = kernels.nonzero_rows(x)
    tokens, units = x.nonzero(as_tuple=True)
    assert torch.equal(pair_rows, tokens) and torch.equal(cols, units)
    assert torch.equal(rows_at, torch.cat([torch.zeros(1, dtype=torch.int64),
                                           torch.bincount(tokens, minlength=23).cumsum(0)]))
