"""Local self-attention of the USM conformer: each frame sees itself, `left - 1` past frames and `right` future
frames, with a learned per-dimension query scale, a relative-position term from projected sinusoids, and a logit
soft-cap.

Computed by chunks, for speed: the queries of a chunk of `chunk` frames meet the `chunk + W - 1` frames around
it in one matmul (W = past + 1 + future, the band width); the band of W keys each query may see is then read
out of that score block with a strided view, so no "relative shift" is needed: the position term for band slot
j is simply q . R[past - j]. The result is exact for every valid query; queries on padded frames (which see no
valid key) get other arbitrary values than in the reference, and the conformer block zeroes them right after.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from gemma3n.model.layers import linear_forward


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

    def __init__(self, hidden_size: int, num_heads: int, chunk: int, context_left: int, context_right: int,
                 logit_cap: float):
        super().__init__()
        self.num_heads, self.head_dim, self.chunk = num_heads, hidden_size // num_heads, chunk
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
        q = linear_forward(self.q_proj, x).view(heads) * q_scale * F.softplus(self.per_dim_scale)
        k, v = linear_forward(self.k_proj, x).view(heads), linear_forward(self.v_proj, x).view(heads)
        # ceil(t / chunk) written without a negative floor division: exporters turn // into ONNX's integer Div,
        # which truncates, so -(-t // chunk) would come out as floor(t / chunk) in an exported graph
        width, chunks = self.past + self.future + 1, (t + self.chunk - 1) // self.chunk
        q_blocks = self._contexts(q, chunks, self.chunk, 0).permute(0, 2, 1, 4, 3)  # (B, N, U, c, H)
        k_ctx = self._contexts(k, chunks, self.chunk + width - 1, self.past).permute(0, 2, 1, 3, 4)  # (B,N,U,H,L)
        v_ctx = self._contexts(v, chunks, self.chunk + width - 1, self.past).permute(0, 2, 1, 4, 3)  # (B,N,U,L,H)
        # Band slot j of query i is context frame i + j: distance d = past - j.
        distances = torch.arange(self.past, -self.future - 1, -1, device=x.device)
        bias = self.relative_position_embedding(distances, q.dtype).permute(1, 2, 0)[:, None]  # (N, 1, H, W)
        # Content and position terms are rounded apart and then added, as in the reference (matters in bf16).
        logits = _band(q_blocks @ k_ctx, width) + q_blocks @ bias  # (B, N, U, c, W)
        logits = torch.tanh(logits / self.logit_cap) * self.logit_cap  # capped before masking
        logits = logits.masked_fill(~self._key_valid(padding_mask, chunks, width), torch.finfo(logits.dtype).min)
        probs = torch.softmax(logits, dim=-1, dtype=torch.float32).to(v.dtype)
        banded = _unband(probs, self.chunk + width - 1)
        out = banded @ v_ctx  # (B, N, U, c, H)
        return out.permute(0, 2, 3, 1, 4).reshape(b, chunks * self.chunk, -1)[:, :t]

    def _contexts(self, z: Tensor, chunks: int, length: int, before: int) -> Tensor:
        """(B, T, ...) -> (B, U, ..., length): frames [u * chunk - before, u * chunk - before + length), zero-padded."""
        after = chunks * self.chunk + length - self.chunk - before - z.shape[1]
        pad = [0, 0] * (z.dim() - 2) + [before, after]
        return _windows(F.pad(z, pad), length, self.chunk)

    def _key_valid(self, padding_mask: Tensor, chunks: int, width: int) -> Tensor:
        """(B, T) True = pad -> (B, 1, U, c, W): band slot j of query t holds a real frame."""
        valid = F.pad(~padding_mask, (self.past, self.future + chunks * self.chunk - padding_mask.shape[1]),
                      value=False)
        return _windows(valid, width, 1).reshape(padding_mask.shape[0], 1, chunks, self.chunk, width)


# The band and window helpers below gather and scatter by index rather than viewing memory with new strides
# (as_strided, unfold): the values are the same, and the index form is what graph exporters (torch.onnx) can trace
# with a symbolic number of frames.

def _band_index(rows: int, width: int, device) -> Tensor:
    """(rows, width) index of the entries (i, i + j)."""
    return torch.arange(rows, device=device)[:, None] + torch.arange(width, device=device)[None, :]


def _band(scores: Tensor, width: int) -> Tensor:
    """(..., c, c + width - 1) -> (..., c, width): the entries (i, i + j)."""
    index = _band_index(scores.shape[-2], width, scores.device)
    return scores.gather(-1, index.expand(*scores.shape[:-1], width))


def _unband(band: Tensor, cols: int) -> Tensor:
    """(..., c, width) -> (..., c, cols) with entry (i, i + j) = band (i, j) and zeros elsewhere."""
    index = _band_index(band.shape[-2], band.shape[-1], band.device).expand(band.shape)
    return band.new_zeros(*band.shape[:-1], cols).scatter(-1, index, band)


def _windows(z: Tensor, length: int, step: int) -> Tensor:
    """`z.unfold(1, length, step)`: (B, T, ...) -> (B, U, ..., length), window u = frames [u * step, + length)."""
    count = (z.shape[1] - length) // step + 1
    index = (torch.arange(count, device=z.device)[:, None] * step
             + torch.arange(length, device=z.device)[None, :]).reshape(-1)
    frames = z.index_select(1, index).unflatten(1, (count, length))  # (B, U, length, ...)
    return frames.movedim(2, -1)
