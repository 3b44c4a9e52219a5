"""The ONNX sessions of the transformers.js layout, as thin modules over the model's own modules.

Nothing here describes the model again: each wrapper calls the modules of gemma3n.model (the embeddings, the
per-layer inputs, the decoder layers with their BLOCKS, the AltUp collapse, the tied head, the towers) and only
replaces the bookkeeping that the runtime keeps in Python (gemma3n.model.cache) with tensor arithmetic the exporter
can trace: the past K/V come in as inputs and go out concatenated with this call's columns, and the masks are
computed from `attention_mask` and the positions.

Sessions and their names, as transformers.js (models/gemma3n) feeds them:
- embed_tokens(input_ids) -> inputs_embeds, per_layer_inputs (the raw per-layer token rows, (B, T, L, P));
- decoder_model_merged(inputs_embeds, per_layer_inputs, attention_mask (B, past + T), position_ids (B, T),
  num_logits_to_keep (int64 scalar: logits for the last k positions only, 0 = all, as transformers' argument),
  past_key_values.{i}.key/.value for the layers that own K/V) -> logits, present.{i}.key/.value;
- vision_encoder(pixel_values) -> image_features; audio_encoder(input_features, input_features_mask) ->
  audio_features.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ..config import SLIDING


class EmbedTokens(nn.Module):
    """input_ids -> (inputs_embeds, per_layer_inputs): text rows, or the media embedders' hard rows for ids of the
    vision / audio vocabularies, and the per-layer token rows (ids outside the per-layer vocabulary use row 0)."""

    def __init__(self, lm: nn.Module, multimodal: nn.Module | None):
        super().__init__()
        self.text, self.multimodal = lm.model, multimodal

    def forward(self, input_ids: Tensor) -> tuple[Tensor, Tensor]:
        embeds = self.text.embed(input_ids)
        if self.multimodal is not None:
            embeds = self.hard_media_rows(input_ids, embeds)
        return embeds, self.text.per_layer_tokens(input_ids)

    def hard_media_rows(self, ids: Tensor, embeds: Tensor) -> Tensor:
        """The multimodal merge's hard embeddings (Multimodal.hard_embeddings) as a select instead of a masked
        write: every id is looked up in every table (clamped into range) and the right row is kept."""
        for embedder, low, high in self.media_ranges():
            inside = (ids >= low) & (ids < high)
            local = torch.clamp(ids, low, high - 1)
            embeds = torch.where(inside[..., None], embedder.hard(local).to(embeds.dtype), embeds)
        return embeds

    def media_ranges(self):
        vision, audio = self.multimodal.embed_vision, self.multimodal.embed_audio
        return ((vision, vision.vocab_offset, audio.vocab_offset),
                (audio, audio.vocab_offset, audio.vocab_offset + audio.vocab_size))


class Decoder(nn.Module):
    """The merged decoder: one graph for the prefill (empty past) and the cached decode steps.

    Keys are ordered by column; a key is attended to when its mask column is 1, its position (the count of real
    columns before it) is not after the query's, and, for sliding layers, within the window of the query's
    position. Every query also sees its own column, as gemma3n.model.cache does, so that a padded query row stays
    finite. Positions rather than column indices define the window: for left padding they give the same keys,
    and they stay right when a runtime leaves empty columns between a row's keys (rows of different lengths)."""

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm
        cfg = lm.config
        self.num_kv = cfg.num_kv_slots
        self.window = cfg.sliding_window

    def forward(self, inputs_embeds: Tensor, per_layer_inputs: Tensor, attention_mask: Tensor, position_ids: Tensor,
                num_logits_to_keep: Tensor, *past: Tensor) -> tuple[Tensor, ...]:
        model, cfg = self.lm.model, self.lm.config
        dtype = inputs_embeds.dtype
        ple = model.per_layer_inputs(inputs_embeds, per_layer_inputs.to(dtype))
        masks = self.masks(attention_mask, position_ids, dtype)
        ropes = {kind: rope.tables(position_ids, dtype) for kind, rope in model.rope.items()}
        streams = model.expand(inputs_embeds)
        produced: dict[int, tuple[Tensor, Tensor]] = {}
        present: list[Tensor] = []
        producer_of = cfg.kv_producer
        for i, layer in enumerate(model.layers):
            rope = ropes[layer.kind]

            def kv_source(normed: Tensor, i=i, layer=layer, rope=rope):
                if producer_of[i] != i:
                    return produced[producer_of[i]]
                k, v = layer.self_attn.project_kv(normed, *rope)
                k = torch.cat((past[2 * i].to(k.dtype), k), 2)
                v = torch.cat((past[2 * i + 1].to(v.dtype), v), 2)
                produced[i] = (k, v)
                present.extend((k, v))
                return k, v

            streams = layer(streams, ple[:, :, i], rope, masks[layer.kind], kv_source)
        hidden = model.norm(model.collapse(streams))
        return (self.lm.head(last_positions(hidden, num_logits_to_keep)), *present)

    def masks(self, attention_mask: Tensor, position_ids: Tensor, dtype: torch.dtype) -> dict[str, Tensor]:
        """(B, past + T) mask and (B, T) positions -> additive masks (B, 1, T, past + T) per attention type."""
        valid = attention_mask > 0
        key_pos = torch.cumsum(attention_mask.to(torch.int64), -1) - 1  # (B, K)
        query_pos = position_ids.to(torch.int64)[:, :, None]  # (B, T, 1)
        keys, queries = attention_mask.shape[1], position_ids.shape[1]
        key_col = torch.arange(keys, device=attention_mask.device)[None, None, :]
        query_col = (torch.arange(queries, device=attention_mask.device) + (keys - queries))[None, :, None]
        causal = valid[:, None, :] & (key_pos[:, None, :] <= query_pos)
        own = key_col == query_col
        zero = torch.zeros((), dtype=dtype)
        ninf = torch.full((), float("-inf"), dtype=dtype)
        out = {}
        for kind in {layer.kind for layer in self.lm.model.layers}:
            allowed = causal
            if kind == SLIDING and self.window:
                allowed = allowed & (key_pos[:, None, :] > query_pos - self.window)
            out[kind] = torch.where((allowed | own)[:, None], zero, ninf)
        return out


def last_positions(hidden: Tensor, keep: Tensor) -> Tensor:
    """hidden (B, T, D) -> its last `keep` positions (all of them when keep is 0 or more than T): a prefill that
    samples one token then computes one row of the 262k-wide head instead of T. The count becomes a symbolic
    size in the graph (the ONNX Slice takes it as a tensor), so one graph serves every k."""
    length = hidden.shape[1]
    start = torch.where(keep > 0, length - keep, 0).clamp(min=0).item()
    torch._check(start >= 0)
    torch._check(start <= length)
    return hidden.narrow(1, start, length - start)


class VisionEncoder(nn.Module):
    """pixel_values (N, 3, H, W) in [0, 1] -> image_features (N, S, text hidden), projected as the merge needs."""

    def __init__(self, multimodal: nn.Module):
        super().__init__()
        self.multimodal = multimodal

    def forward(self, pixel_values: Tensor) -> Tensor:
        return self.multimodal.image_embeddings(pixel_values)


class AudioEncoder(nn.Module):
    """input_features (N, T, 128), input_features_mask (N, T) (true = real frame) -> audio_features
    (N, audio_soft_tokens_per_image, text hidden), padded as the reference pads."""

    def __init__(self, multimodal: nn.Module):
        super().__init__()
        self.multimodal = multimodal

    def forward(self, input_features: Tensor, input_features_mask: Tensor) -> Tensor:
        return self.multimodal.audio_embeddings(input_features, input_features_mask)
