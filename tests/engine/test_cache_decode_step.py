"""KVCache.start's one-token fast path builds the same positions, masks and ring layout as the general path."""
from __future__ import annotations

import copy

import pytest
import torch

from gemma3n.model.cache import KVCache


@pytest.mark.parametrize("max_len, window, prompt", [(20, 8, 5), (40, 8, 13), (12, 16, 3), (30, 4, 1)])
def test_decode_start_equals_general_start(max_len, window, prompt):
    fast = KVCache(["sliding_attention", "full_attention"], 2, max_len, 1, 4, window, torch.float32)
    mask = torch.ones(2, prompt, dtype=torch.long)
    mask[1, :min(2, prompt - 1)] = 0  # a left-padded row
    fast.start(mask, prompt)
    general = copy.deepcopy(fast)
    for _ in range(max_len - prompt):
        a, b = fast.start(None, 1), general.start(torch.ones(2, 1, dtype=torch.long), 1)  # a mask: general path
        assert torch.equal(a.positions, b.positions)
        assert a.masks.keys() == b.masks.keys()
        for kind in a.masks:
            assert torch.equal(a.masks[kind], b.masks[kind]), kind
        assert torch.equal(fast.ring_index, general.ring_index)
        assert torch.equal(fast.next_position, general.next_position) and fast.length == general.length
