"""What every generation checks and sizes before it starts: the prompt's shape, its left padding, its merged
embeddings, the room left in the context, and how the prefill is cut into chunks."""
from __future__ import annotations

import torch
from torch import Tensor

DEFAULT_CHUNK = 1024  # prompt columns per prefill forward: bounds the activations of long prompts


class ContextLengthError(ValueError):
    """The prompt leaves no room for a new token in the model's context."""


def chunk_end(model, input_ids: Tensor, start: int, chunk_size: int) -> int:
    """The end of the prefill chunk that starts at `start`: `chunk_size` columns, or more where the model must see
    a block of columns in one call (`model.chunk_end`, e.g. Gemma 3's bidirectional image blocks)."""
    end = min(start + chunk_size, input_ids.shape[1])
    widen = getattr(model, "chunk_end", None)
    return end if widen is None else widen(input_ids, start, end)


def device_of(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except (AttributeError, StopIteration):
        return torch.device("cpu")


def check_inputs(input_ids, attention_mask, device) -> tuple[Tensor, Tensor | None]:
    """(B, T) long ids (a 1-D prompt is one row) and the matching mask, which must be left padding."""
    ids = torch.as_tensor(input_ids)
    ids = ids[None] if ids.dim() == 1 else ids
    if ids.dim() != 2 or ids.shape[1] == 0 or ids.is_floating_point() or ids.is_complex():
        raise ValueError(f"input_ids must be integer ids of shape (batch, length >= 1), got {tuple(ids.shape)} "
                         f"{ids.dtype}")
    ids = ids.to(device=device, dtype=torch.long)
    if attention_mask is None:
        return ids, None
    mask = torch.as_tensor(attention_mask)
    mask = mask[None] if mask.dim() == 1 else mask
    if mask.shape != ids.shape:
        raise ValueError(f"attention_mask has shape {tuple(mask.shape)} but input_ids has {tuple(ids.shape)}")
    mask = mask.to(device=device, dtype=torch.long)
    if not bool(mask[:, -1].all()):
        raise ValueError("attention_mask: every row must end with a real token; pad batches on the left")
    return ids, mask


def check_embeds(embeds, ids: Tensor) -> Tensor | None:
    if embeds is None:
        return None
    if embeds.dim() != 3 or tuple(embeds.shape[:2]) != tuple(ids.shape):
        raise ValueError(f"inputs_embeds must have shape (batch, length, hidden) matching input_ids {tuple(ids.shape)}, "
                         f"got {tuple(embeds.shape)}")
    return embeds.to(ids.device)


def token_budget(model, prompt_len: int, max_new_tokens: int) -> int:
    """New tokens allowed: max_new_tokens, capped so that prompt + new tokens fit the context."""
    context = model.config.max_position_embeddings
    if prompt_len + 1 > context:
        raise ContextLengthError(
            f"the prompt is {prompt_len} tokens but the model's context holds {context}, so no token can be "
            f"generated; shorten the prompt to at most {context - 1} tokens")
    return min(max_new_tokens, context - prompt_len)
