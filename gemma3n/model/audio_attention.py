"""Local self-attention of the USM conformer: each frame sees itself, `left - 1` past frames and `right` future
frames, with a learned per-dimension query scale, a relative-position term from projected sinusoids, and a logit
soft-cap.

The reference computes this blockwise (queries in chunks of 12, keys as 24-frame contexts, a "relative shift"
to line up the distance embeddings). Only the visibility rule matters for the result, so this computes the band
directly: for each of the `left + right` distances d, logit[t, d] = q_t . (k_{t-d} + R[d]). It is exact for every
valid query; queries on padded frames differ (they see no valid key at all), and the conformer block zeroes those
frames right after attention, as the reference does.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn import functional as F


def timing_signal(distances: Tensor, channels: int, dtype: torch.dtype) -> Tensor:
    """(D,) distances -> (D, channels) sinusoids: sin half then cos half, timescales 1 .. 1e4, float32 then cast."""
    n = channels // 2
    step = math.log(1.0e4) / max(n - 1, 1)
    inv_timescales = torch.exp(torch.arange(n, device=distances.device) * -step).float()
    angles = distances.float().unsqueeze(-1) * inv_timescales
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=-1).to(dtype)


class RelativePositionEmbedding(nn.Module):
    """Distance d -> per-head bias vectors R[d] = pos_proj(sinusoid(d)), shape (D, heads, head_dim)."""

    def __init__(self, hidden_size: int, num_heads: int):
        super().__init__()
        self.hidden_size, self.num_heads = hidden_size, num_heads
        self.pos_proj = nn.Linear(hidden_size, hidden_size, bias=False)

    def forward(self, distances: Tensor, dtype: torch.dtype) -> Tensor:
        projected = self.pos_proj(timing_signal(distances, self.hidden_size, dtype))
        return projected.view(len(distances), self.num_heads, self.hidden_size // self.num_heads)


class LocalRelativeAttention(nn.Module):
    """Banded multi-head attention with relative positions and soft-capped logits (Gemma3nAudioAttention)."""

    def __init__(self, hidden_size: int, num_heads: int, context_left: int, context_right: int, logit_cap: float):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, hidden_size // num_heads
        self.past = max(0, context_left - 1)  # the reference's "max past horizon": left context counts the frame
        self.future = context_right
        self.logit_cap = logit_cap
        # Constant part of the query scale: head_dim^-1/2 / softplus(0); the learned part is softplus(per_dim_scale).
        self.q_scale = self.head_dim ** -0.5 / math.log(2.0)
        self.q_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        self.k_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        self.v_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        self.per_dim_scale = nn.Parameter(torch.zeros(self.head_dim))
        self.relative_position_embedding = RelativePositionEmbedding(hidden_size, num_heads)

    def forward(self, x: Tensor, padding_mask: Tensor) -> Tensor:  # (B, T, C), (B, T) True = pad -> (B, T, C)
        b, t, _ = x.shape
        heads = (b, t, self.num_heads, self.head_dim)
        # q_scale is a float32 buffer in the reference: rounded to the activation dtype (0.104003906 in bf16).
        q_scale = torch.tensor(self.q_scale, dtype=torch.float32).to(x.dtype)
        q = self.q_proj(x).view(heads) * q_scale * F.softplus(self.per_dim_scale)
        k, v = self.k_proj(x).view(heads), self.v_proj(x).view(heads)
        width = self.past + self.future + 1
        # Window slot j holds key frame t + j - past, i.e. distance d = past - j (past .. -future).
        distances = torch.arange(self.past, -self.future - 1, -1, device=x.device)
        bias = self.relative_position_embedding(distances, q.dtype)  # (W, N, H)
        # The dot products accumulate in float32 and are rounded once, as the reference's matmuls do in bf16;
        # content and position terms are rounded separately and then added, as there.
        q32, k_padded = q.float(), F.pad(k, (0, 0, 0, 0, self.past, self.future)).float()  # (B, T + W - 1, N, H)
        content = torch.stack([(q32 * k_padded[:, j: j + t]).sum(-1) for j in range(width)], -1).to(q.dtype)
        position = torch.einsum("btnh,wnh->btnw", q32, bias.float()).to(q.dtype)
        logits = content + position  # (B, T, N, W)
        logits = torch.tanh(logits / self.logit_cap) * self.logit_cap  # capped before masking
        key_valid = F.pad(~padding_mask, (self.past, self.future), value=False).unfold(1, width, 1)  # (B, T, W)
        logits = logits.masked_fill(~key_valid[:, :, None, :], torch.finfo(logits.dtype).min)
        probs = torch.softmax(logits.float(), dim=-1).to(v.dtype).float()
        v_padded = F.pad(v, (0, 0, 0, 0, self.past, self.future)).float()
        out = sum(probs[..., j, None] * v_padded[:, j: j + t] for j in range(width))  # (B, T, N, H)
        return out.to(v.dtype).reshape(b, t, -1)
