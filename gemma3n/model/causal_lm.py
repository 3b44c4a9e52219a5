"""The part every Gemma decoder shares: tied LM head, final soft-cap, cache creation, the engine's interface."""
from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .cache import KVCache
from .layers import softcap


class TiedCausalLM(nn.Module):
    """A decoder stack (`self.model`, with `embed_tokens`) plus the LM head tied to the embeddings.

    Subclasses set `self.model`; `cache_slot_types` says which layers own a KV slot (all, unless K/V is shared).
    """

    def __init__(self, cfg, model: nn.Module):
        super().__init__()
        self.config = cfg
        self.model = model

    def cache_slot_types(self) -> list[str]:
        return list(self.config.layer_types)

    def new_cache(self, batch: int, max_len: int, dtype: torch.dtype | None = None) -> KVCache:
        cfg, w = self.config, self.model.norm.weight  # the norm: float in the compute dtype even when quantised
        return KVCache(self.cache_slot_types(), batch, max_len, cfg.num_key_value_heads, cfg.head_dim,
                       cfg.sliding_window, dtype or w.dtype, w.device)

    def head(self, hidden: Tensor) -> Tensor:
        """Final hidden (B, T, D) -> float32 logits, soft-capped when the config asks.

        Deliberate deviation: the reference soft-caps in the model dtype; we cap in float32 (identical in fp32,
        slightly more precise in bf16, where the reference's tanh rounds to 8 mantissa bits)."""
        table = self.model.embed_tokens
        # a quantised table (gemma3n.quant.Int8Embedding) is its own head: one copy serves both directions
        logits = table.linear(hidden) if hasattr(table, "linear") else F.linear(hidden, table.weight)
        # the product's output is a fresh tensor of ours: the cap may write over it
        return softcap(logits if logits.dtype == torch.float32 else logits.float(), self.config.final_logit_softcapping,
                       x_is_temporary=True)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, cache: KVCache | None = None,
                last_only: bool = False, inputs_embeds: Tensor | None = None) -> Tensor:
        """ids (B, T) -> float32 logits; `inputs_embeds` (B, T, D), when given, replaces the token embeddings
        (the multimodal merge), while the ids still give the per-layer token embeddings."""
        hidden = self.model(input_ids, attention_mask, cache, inputs_embeds, last_only=last_only)
        return self.head(hidden[:, -1:] if last_only else hidden)
