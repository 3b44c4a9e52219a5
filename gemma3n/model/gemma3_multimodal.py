"""Gemma 3 with images (`Gemma3ForConditionalGeneration`): the projector, the SigLIP tower loaded on first use, the
soft-token merge and the decoder wrapper that makes each image's tokens attend to each other.

The merge: every `image_token_id` position of the prompt (256 per image in a "\\n\\n<start_of_image>...
<end_of_image>\\n\\n" run) is overwritten, in order, by that image's projected tower tokens; all other positions keep
their scaled token embeddings (Gemma 3 has no separate media vocabulary).

The mask rule (transformers' `create_masks_for_vision_model`): a maximal run of consecutive image tokens is one
block, and a token of a block may also attend to the *later* tokens of its own block. Global layers: causal OR
same block; sliding layers: (causal OR same block) AND within the window. Text never sees ahead, and an image
never sees a later image. A block must therefore be fed in one forward call: `chunk_end` moves a prefill chunk's
end past any block it would split.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ..config import ModelConfig
from .multimodal import LazyTowers, scatter_soft_tokens
from .siglip import MultiModalProjector, SiglipConfig


class Gemma3Multimodal(LazyTowers):
    """The projector (always loaded: a few MB) and the SigLIP tower (loaded when a prompt first holds an image)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.vision_config = SiglipConfig.from_dict(config.vision, config.source)
        self.multi_modal_projector = MultiModalProjector(self.vision_config, config.text.hidden_size,
                                                         config.vision_soft_tokens_per_image, config.source)

    def wrap(self, lm: nn.Module) -> nn.Module:
        """What the engine drives: the decoder with the image-block mask rule."""
        return Gemma3MultimodalLM(lm, self.config.image_token_id)

    def has_media_ids(self, ids: Tensor) -> bool:
        """Gemma 3 has no media vocabulary: ids alone never need the merge (their mask rule is the wrapper's)."""
        return False

    def image_embeddings(self, pixel_values: Tensor) -> Tensor:
        """(N, 3, S, S) -> (N, mm_tokens_per_image, D), in the tower's dtype as the reference."""
        tower = self.tower("vision")
        dtype = next((p.dtype for p in tower.parameters() if p.is_floating_point()), torch.float32)
        return self.multi_modal_projector(tower(pixel_values.to(dtype)).to(
            self.multi_modal_projector.mm_input_projection_weight.dtype))

    def embed_inputs(self, text_model: nn.Module, input_ids: Tensor, pixel_values: Tensor | None = None,
                     input_features: Tensor | None = None, input_features_mask: Tensor | None = None) -> Tensor:
        """ids (B, T) plus images -> inputs_embeds (B, T, D) for the decoder."""
        if input_features is not None:
            raise ValueError("Gemma 3 takes images and text, not audio; use a Gemma 3n checkpoint for audio")
        embeds = text_model.embed(_in_vocab(input_ids, self.config))
        if pixel_values is not None:
            images = self.image_embeddings(pixel_values)
            embeds = scatter_soft_tokens(embeds, input_ids == self.config.image_token_id, images, "image")
        return embeds


def _in_vocab(ids: Tensor, config: ModelConfig) -> Tensor:
    """The reference embeds an image token id that lies outside the text vocabulary as id 0 (pad)."""
    if config.image_token_id < config.text.vocab_size:
        return ids
    return ids.masked_fill(ids == config.image_token_id, 0)


def image_blocks(input_ids: Tensor, image_token_id: int) -> Tensor:
    """(B, T) -> block id of each image token (0, 1, ... per row, one per run of consecutive image tokens), -1
    elsewhere (transformers' get_block_sequence_ids_for_mask)."""
    is_image = input_ids == image_token_id
    previous = torch.nn.functional.pad(is_image, (1, 0), value=False)[:, :-1]
    groups = torch.cumsum((is_image & ~previous).long(), dim=1) - 1
    return torch.where(is_image, groups, torch.full_like(groups, -1))


def block_lookahead(blocks: Tensor) -> Tensor:
    """(B, T) block ids -> (B, 1, T, T) bool: query i may also see key j > i of its own block (what the rule adds to
    the causal masks; earlier keys of the block are causal already, and the sliding window still applies to them)."""
    t = blocks.shape[1]
    later = torch.ones(t, t, dtype=torch.bool, device=blocks.device).triu(1)
    same = (blocks[:, :, None] == blocks[:, None, :]) & (blocks[:, :, None] >= 0)
    return (same & later)[:, None]


class Gemma3MultimodalLM(nn.Module):
    """The Gemma 3 causal LM as the engine drives it when a prompt may hold images: the same interface, and a call
    whose ids hold image tokens gets their bidirectional blocks added to its masks."""

    def __init__(self, lm: nn.Module, image_token_id: int):
        super().__init__()
        self.lm, self.config, self.image_token_id = lm, lm.config, image_token_id

    def new_cache(self, *args, **kwargs):
        return self.lm.new_cache(*args, **kwargs)

    def chunk_end(self, input_ids: Tensor, start: int, end: int) -> int:
        """The end of a prefill chunk [start, end) moved right, when needed, so that no image block is split."""
        t = input_ids.shape[1]
        if end >= t:
            return t
        is_image = input_ids == self.image_token_id
        while end < t and bool((is_image[:, end - 1] & is_image[:, end]).any()):
            end += 1
        return end

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, cache=None, last_only: bool = False,
                inputs_embeds: Tensor | None = None) -> Tensor:
        lookahead = None
        if input_ids.shape[1] > 1 and bool((input_ids == self.image_token_id).any()):
            lookahead = block_lookahead(image_blocks(input_ids, self.image_token_id))
        hidden = self.lm.model(input_ids, attention_mask, cache, inputs_embeds, last_only=last_only,
                               lookahead=lookahead)
        return self.lm.head(hidden[:, -1:] if last_only else hidden)
