"""The Gemma 3n multimodal front: vision / audio embedders, towers loaded on first use, the soft-token merge.

The decoder never sees pixels or sound: it receives `inputs_embeds` in which
- ids in the vision range [vision offset, audio offset) and the audio range [audio offset, ...) take their "hard"
  embeddings from `embed_vision` / `embed_audio` (e.g. <end_of_image>, which lives in the vision range);
- each image placeholder run (256 x image_token_id) is overwritten by that image's soft tokens, in order;
- each audio placeholder run (188 x audio_token_id) by that clip's soft tokens, padded to 188 with the embedding of
  the last audio-vocabulary row, as the reference does.
The per-layer (PLE) token part still comes from the ids (ids outside the PLE vocabulary use row 0).
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

import torch
from torch import Tensor, nn

from ..config import ConfigError, ModelConfig
from .layers import RMSNorm

TowerLoader = Callable[[], nn.Module]


class MultimodalEmbedder(nn.Module):
    """Tower features or tower-vocabulary ids -> decoder embeddings: norm, projection, weightless norm."""

    def __init__(self, dim: int, text_dim: int, vocab_offset: int, vocab_size: int, eps: float):
        super().__init__()
        self.vocab_offset, self.vocab_size = vocab_offset, vocab_size
        self.embedding = nn.Embedding(vocab_size, dim)
        self.hard_embedding_norm = RMSNorm(dim, eps)
        self.soft_embedding_norm = RMSNorm(dim, eps)
        self.embedding_projection = nn.Linear(dim, text_dim, bias=False)
        self.embedding_post_projection_norm = RMSNorm(text_dim, eps, with_scale=False)

    def hard(self, ids: Tensor) -> Tensor:  # ids in [offset, offset + vocab) -> (..., text_dim)
        return self._project(self.hard_embedding_norm(self.embedding(ids - self.vocab_offset)))

    def soft(self, features: Tensor) -> Tensor:  # (..., dim) -> (..., text_dim)
        return self._project(self.soft_embedding_norm(features))

    def _project(self, x: Tensor) -> Tensor:
        return self.embedding_post_projection_norm(self.embedding_projection(x))


def _embedder(section: Mapping[str, Any] | None, name: str, text_dim: int, source: str) -> MultimodalEmbedder:
    if not isinstance(section, Mapping):
        raise ConfigError(f"{source}: field '{name}' is missing; a Gemma 3n multimodal checkpoint needs it")
    values = {}
    for key in ("hidden_size", "vocab_offset", "vocab_size", "rms_norm_eps"):
        if key not in section:
            raise ConfigError(f"{source}: field '{name}.{key}' is missing")
        values[key] = section[key]
    return MultimodalEmbedder(int(values["hidden_size"]), text_dim, int(values["vocab_offset"]),
                              int(values["vocab_size"]), float(values["rms_norm_eps"]))


class LazyTowers(nn.Module):
    """Media towers built and loaded from the checkpoint on first use, by the loader set for each kind."""

    def __init__(self):
        super().__init__()
        self._loaders: dict[str, TowerLoader] = {}
        self._towers: dict[str, nn.Module] = {}  # a plain dict: towers are not part of this module's state_dict

    def set_tower_loader(self, kind: str, loader: TowerLoader) -> None:
        self._loaders[kind] = loader

    def tower(self, kind: str) -> nn.Module:
        """The tower of `kind` ("vision", "audio"), loaded the first time it is asked for."""
        if kind not in self._towers:
            if kind not in self._loaders:
                raise ValueError(f"this checkpoint has no {kind} tower, so it cannot take {kind} input")
            self._towers[kind] = self._loaders[kind]()
        return self._towers[kind]

    @property
    def loaded_towers(self) -> list[str]:
        return sorted(self._towers)


class Multimodal(LazyTowers):
    """embed_vision + embed_audio (always loaded: a few MB) and the two towers (loaded when first needed)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        d = config.text.hidden_size
        self.embed_vision = _embedder(config.vision, "vision_config", d, config.source)
        self.embed_audio = _embedder(config.audio, "audio_config", d, config.source)

    def wrap(self, lm: nn.Module) -> nn.Module:
        """What the engine drives: the decoder with hard embeddings for media-vocabulary ids."""
        return MultimodalLM(lm, self)

    def has_media_ids(self, ids: Tensor) -> bool:
        """Whether ids of the vision / audio vocabularies occur (they take their embedders' hard embeddings)."""
        return bool((ids >= self.embed_vision.vocab_offset).any())

    # -- features --------------------------------------------------------------------------------------------------

    def image_embeddings(self, pixel_values: Tensor) -> Tensor:
        """(N, 3, H, W) -> (N, S, D): tower tokens scaled by sqrt(C) (in the tower dtype, as the reference), embedded."""
        tower = self.tower("vision")
        features = tower(pixel_values.to(_dtype_of(tower)))  # (N, S, C)
        features = features * features.shape[-1] ** 0.5
        return self.embed_vision.soft(features.to(self.embed_vision.embedding.weight.dtype))

    def audio_embeddings(self, input_features: Tensor, input_features_mask: Tensor) -> Tensor:
        """(N, T, 128) log-mels + validity mask -> (N, audio_soft_tokens_per_image, D), padded as the reference."""
        tower = self.tower("audio")
        encodings, padding = tower(input_features.to(_dtype_of(tower)), ~input_features_mask.bool())  # (N, T', C)
        embedded = self.embed_audio.soft(encodings.to(self.embed_audio.embedding.weight.dtype))
        # The reference pads with the embedding of id (text vocab - 1), the last row of the audio vocabulary.
        pad_id = torch.tensor([[self.config.text.vocab_size - 1]], device=embedded.device)
        pad = self.embed_audio.hard(pad_id).to(embedded.dtype)  # (1, 1, D)
        embedded = torch.where(padding[..., None], pad, embedded)
        n, length, d = embedded.shape
        want = self.config.audio_soft_tokens_per_image
        if length > want:
            raise ValueError(f"an audio clip gave {length} soft tokens but the prompt holds {want} per clip; "
                             "clips must be at most 30 s (split longer recordings into several clips)")
        return torch.cat((embedded, pad.expand(n, want - length, d)), dim=1)

    # -- the merge -------------------------------------------------------------------------------------------------

    def embed_inputs(self, text_model: nn.Module, input_ids: Tensor, pixel_values: Tensor | None = None,
                     input_features: Tensor | None = None, input_features_mask: Tensor | None = None) -> Tensor:
        """ids (B, T) plus media -> inputs_embeds (B, T, D) for the decoder."""
        embeds = self.hard_embeddings(text_model, input_ids)
        cfg = self.config
        if pixel_values is not None:
            images = self.image_embeddings(pixel_values)
            embeds = scatter_soft_tokens(embeds, input_ids == cfg.image_token_id, images, "image")
        if input_features is not None:
            if input_features_mask is None:
                raise ValueError("input_features needs input_features_mask (True = valid frame)")
            clips = self.audio_embeddings(input_features, input_features_mask)
            embeds = scatter_soft_tokens(embeds, input_ids == cfg.audio_token_id, clips, "audio")
        # Placeholders without media keep their hard embeddings, as in the reference (a teacher-forced text may
        # contain them); the processor never builds such a prompt.
        return embeds

    def hard_embeddings(self, text_model: nn.Module, input_ids: Tensor) -> Tensor:
        """Text embeddings, with ids of the vision / audio vocabularies embedded by their embedders."""
        embeds = text_model.embed(input_ids)
        vision, audio = self.embed_vision, self.embed_audio
        for embedder, in_range in (
                (vision, (input_ids >= vision.vocab_offset) & (input_ids < audio.vocab_offset)),
                (audio, input_ids >= audio.vocab_offset)):
            if bool(in_range.any()):  # embeds is a fresh tensor, so writing into it is safe
                embeds[in_range] = embedder.hard(input_ids[in_range]).to(embeds.dtype)
        return embeds


def scatter_soft_tokens(embeds: Tensor, positions: Tensor, soft: Tensor, kind: str) -> Tensor:
    """Write soft tokens (N, S, D), in order, into the placeholder positions (B, T) of embeds (B, T, D)."""
    n_slots, n_soft = int(positions.sum()), soft.shape[0] * soft.shape[1]
    if n_slots != n_soft:
        raise ValueError(f"the prompt has {n_slots} {kind} placeholder tokens but the {kind} inputs give {n_soft} "
                         f"soft tokens ({soft.shape[0]} x {soft.shape[1]}); give one {kind} per placeholder")
    out = embeds.clone()
    out[positions] = soft.reshape(-1, soft.shape[-1]).to(out.dtype)
    return out


def _dtype_of(module: nn.Module) -> torch.dtype:
    for p in module.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


class MultimodalLM(nn.Module):
    """The decoder as the engine drives it for a multimodal checkpoint: same interface as the causal LM, but ids
    of the vision / audio vocabularies (a prompt's <end_of_image>, or a generated one) get their hard embeddings,
    as the reference does on every forward."""

    def __init__(self, lm: nn.Module, multimodal: Multimodal):
        super().__init__()
        self.lm, self.multimodal, self.config = lm, multimodal, lm.config

    def new_cache(self, *args, **kwargs):
        return self.lm.new_cache(*args, **kwargs)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, cache=None, last_only: bool = False,
                inputs_embeds: Tensor | None = None) -> Tensor:
        if inputs_embeds is None and bool((input_ids >= self.multimodal.embed_vision.vocab_offset).any()):
            inputs_embeds = self.multimodal.hard_embeddings(self.lm.model, input_ids)
        return self.lm(input_ids, attention_mask, cache, last_only, inputs_embeds)
