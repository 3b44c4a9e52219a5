"""Prefill skip: layers that only read another layer's K/V run on the last position when only its logits are
needed; the logits must not change."""
from __future__ import annotations

import torch


def _positions_seen(model, call) -> dict[int, int]:
    """Run `call()` and return, per layer, how many positions its input had."""
    seen, hooks = {}, []
    for i, layer in enumerate(model.model.layers):
        hooks.append(layer.register_forward_pre_hook(lambda m, args, i=i: seen.__setitem__(i, args[0].shape[2])))
    try:
        call()
    finally:
        for h in hooks:
            h.remove()
    return seen


def test_last_only_equals_the_full_forward_and_skips_shared_layers(model, prompt):
    ids = prompt(20, seed=3)
    with torch.no_grad():
        full = model(ids)[:, -1:]
        seen = _positions_seen(model, lambda: model(ids, last_only=True))
        last = model(ids, last_only=True)
    torch.testing.assert_close(last, full, rtol=1e-12, atol=1e-12)
    shared_from = model.config.first_shared_layer
    assert all(seen[i] == 20 for i in range(shared_from)) and all(seen[i] == 1 for i in seen if i >= shared_from)


def test_chunked_cached_prefill_with_padding_unchanged(model, prompt):
    """Left-padded batch, prefill in two chunks through the cache, then decode: equal to full recomputes."""
    a, b = prompt(18, seed=4), prompt(11, seed=5)
    ids = torch.cat([a, torch.cat([torch.zeros(1, 7, dtype=torch.long), b], 1)])
    mask = torch.cat([torch.ones(1, 18), torch.cat([torch.zeros(1, 7), torch.ones(1, 11)], 1)]).long()
    with torch.no_grad():
        cache = model.new_cache(2, 32)
        model(ids[:, :10], mask[:, :10], cache, last_only=True)
        got = model(ids[:, 10:], mask[:, 10:], cache, last_only=True)
        nxt = torch.tensor([[5], [9]])
        step = model(nxt, None, cache, last_only=True)
        for row, alone in enumerate((a, b)):
            torch.testing.assert_close(got[row, -1], model(alone)[0, -1], rtol=1e-10, atol=1e-10)
            seq = torch.cat([alone, nxt[row:row + 1]], 1)
            torch.testing.assert_close(step[row, -1], model(seq)[0, -1], rtol=1e-10, atol=1e-10)
