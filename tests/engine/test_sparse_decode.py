"""Activation sparsity as a real skip: the sparse MLP path equals the dense one."""
from __future__ import annotations

import copy

import torch

from gemma3n.model.layers import gaussian_topk
from gemma3n.model.text import MLP, enable_sparse_decode


def _mlp(dtype=torch.float64) -> MLP:
    torch.manual_seed(0)
    mlp = MLP(48, 256, 0.95).to(dtype)
    with torch.no_grad():
        for p in mlp.parameters():
            p.normal_(0, 0.2)
    return mlp.eval()


def test_sparse_path_equals_dense_and_skips_the_dense_products():
    dense = _mlp()
    sparse = copy.deepcopy(dense)
    assert enable_sparse_decode(sparse) == 1 and sparse.down_proj.weight.t().is_contiguous()
    dense_calls = []  # the sparse path never calls the up / down modules (it multiplies gathered rows itself)
    for proj in (sparse.up_proj, sparse.down_proj):
        proj.register_forward_hook(lambda *a: dense_calls.append(1))
    for shape in [(1, 1, 48), (3, 1, 48), (1, 4, 48)]:
        x = torch.randn(shape, dtype=torch.float64)
        with torch.no_grad():
            torch.testing.assert_close(sparse(x), dense(x), rtol=1e-12, atol=1e-12)
            kept = int((gaussian_topk(dense.gate_proj(x), dense.z) != 0).any(0).any(0).sum())
        assert 0 < kept < 256 // 2
    assert dense_calls == []
    with torch.no_grad():
        x = torch.randn(1, 16, 48, dtype=torch.float64)  # a prefill-sized call takes the dense path
        torch.testing.assert_close(sparse(x), dense(x), rtol=1e-12, atol=1e-12)
    assert dense_calls


def test_long_inputs_and_dense_layers_use_the_dense_path(model, prompt):
    """Prefill (many tokens) stays dense; a whole model with the sparse path decodes the same tokens."""
    sparse_model = copy.deepcopy(model)
    assert enable_sparse_decode(sparse_model) == sum(1 for m in model.modules() if isinstance(m, MLP) and m.sparsity > 0)
    ids = prompt(12, seed=9)
    with torch.no_grad():
        cache_a, cache_b = model.new_cache(1, 20), sparse_model.new_cache(1, 20)
        a = model(ids, cache=cache_a, last_only=True)
        b = sparse_model(ids, cache=cache_b, last_only=True)
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        for _ in range(6):
            nxt = a[:, -1].argmax(-1, keepdim=True)
            a, b = model(nxt, cache=cache_a, last_only=True), sparse_model(nxt, cache=cache_b, last_only=True)
            torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-12)
