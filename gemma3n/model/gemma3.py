"""The Gemma 3 text decoder (`Gemma3ForCausalLM`): a plain pre/post-norm transformer.

What differs from Gemma 3n (text.py): norms scale by (1 + weight), attention logits are scaled by
query_pre_attn_scalar**-0.5, global layers may scale RoPE positions linearly, values are not normed, and there is no
AltUp, LAuReL, per-layer embedding, activation sparsity or KV sharing. Module and parameter names are the Hugging
Face names, so a checkpoint loads with `load_state_dict` after stripping nothing but `lm_head.weight` (tied).
"""
from __future__ import annotations

import math

from torch import Tensor, nn
from torch.nn import functional as F

from ..config import FULL, SLIDING, Gemma3TextConfig
from .cache import KVCache, ephemeral_step
from . import native_decode
from .blocks import Block, LayerContext, run_eager
from .causal_lm import TiedCausalLM
from .layers import RMSNorm, RotaryEmbedding, additive_mask, const, rotate
from .text import MLP

# Gemma 3 checkpoints store norm weights as (scale - 1); RMSNorm adds this offset back.
NORM_OFFSET = 1.0


class Attention(nn.Module):
    """GQA attention with q/k RMSNorms (1 + w) and scale query_pre_attn_scalar**-0.5.

    `attn_logit_softcapping` is deliberately not applied: Gemma 3 replaced it by the q/k norms, transformers'
    Gemma3Attention ignores the field and llama.cpp's converter rejects it, so honouring it would break parity.
    """

    normalises_values = False  # (Gemma 3n norms V)
    shares_kv = False  # every layer computes its own K/V

    def __init__(self, cfg: Gemma3TextConfig, layer: int):
        super().__init__()
        d, hd = cfg.hidden_size, cfg.head_dim
        self.heads, self.kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, hd
        self.kind, self.kv_slot = cfg.layer_types[layer], layer  # every layer has its own K/V
        self.scale = cfg.query_pre_attn_scalar ** -0.5
        self.q_proj = nn.Linear(d, self.heads * hd, bias=False)
        self.k_proj = nn.Linear(d, self.kv_heads * hd, bias=False)
        self.v_proj = nn.Linear(d, self.kv_heads * hd, bias=False)
        self.o_proj = nn.Linear(self.heads * hd, d, bias=False)
        self.q_norm = RMSNorm(hd, cfg.rms_norm_eps, offset=NORM_OFFSET)
        self.k_norm = RMSNorm(hd, cfg.rms_norm_eps, offset=NORM_OFFSET)

    def project_kv(self, x: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
        """x (B, T, D) -> k (rotated), v (B, Hkv, T, hd)."""
        b, t, _ = x.shape
        k = self.k_norm(self.k_proj(x).view(b, t, self.kv_heads, self.head_dim)).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, T, hd)
        return rotate(k, cos, sin), v

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor, kv: tuple[Tensor, Tensor]) -> Tensor:
        """x (B, T, D) -> (B, T, D), attending to `kv` (what the cache holds after this call's K/V)."""
        b, t, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(b, t, self.heads, self.head_dim)).transpose(1, 2)  # (B, H, T, hd)
        q = rotate(q, cos, sin)
        k, v = kv
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale, enable_gqa=True)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))


class DecoderLayer(nn.Module):
    """x + post_norm(attn(pre_norm(x))), then the same around the MLP."""

    # The order of operations, run by the eager forward and by the native decode plan (blocks.py).
    BLOCKS = (
        Block("rms_norm", ("x",), "h", "input_layernorm"),
        Block("attention", ("h",), "h", "self_attn"),
        Block("rms_norm", ("h",), "h", "post_attention_layernorm"),
        Block("add", ("x", "h"), "x"),
        Block("rms_norm", ("x",), "h", "pre_feedforward_layernorm"),
        Block("mlp", ("h",), "h", "mlp"),
        Block("rms_norm", ("h",), "h", "post_feedforward_layernorm"),
        Block("add", ("x", "h"), "x"),
    )
    STATE = "x"  # the register carried from layer to layer: the hidden states (B, T, D)

    def __init__(self, cfg: Gemma3TextConfig, layer: int):
        super().__init__()
        d, eps = cfg.hidden_size, cfg.rms_norm_eps
        self.kind = cfg.layer_types[layer]
        self.self_attn = Attention(cfg, layer)
        self.mlp = MLP(d, cfg.intermediate_size, sparsity=0.0)
        self.input_layernorm = RMSNorm(d, eps, offset=NORM_OFFSET)
        self.post_attention_layernorm = RMSNorm(d, eps, offset=NORM_OFFSET)
        self.pre_feedforward_layernorm = RMSNorm(d, eps, offset=NORM_OFFSET)
        self.post_feedforward_layernorm = RMSNorm(d, eps, offset=NORM_OFFSET)

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor], mask: Tensor, kv_source) -> Tensor:
        """x (B, T, D) -> (B, T, D); `kv_source(normed)` stores this call's K/V and returns what to attend to."""
        return run_eager(self, self.BLOCKS, LayerContext(rope, mask, kv_source), {self.STATE: x})[self.STATE]


class TextModel(nn.Module):
    """Gemma3TextModel: scaled token embeddings, the layers, the final norm."""

    # After the last layer, on its state: run by the eager forward, and by the native decode plan after the layers.
    FINAL_BLOCKS = (Block("rms_norm", (DecoderLayer.STATE,), DecoderLayer.STATE, "norm"),)

    def __init__(self, cfg: Gemma3TextConfig):
        super().__init__()
        if cfg.hidden_activation != "gelu_pytorch_tanh":
            raise ValueError(f"config: hidden_activation {cfg.hidden_activation!r} is not supported for Gemma 3 "
                             "(every released checkpoint uses 'gelu_pytorch_tanh')")
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, offset=NORM_OFFSET)
        # Linear RoPE scaling applies to the global layers only (transformers' rope_parameters[full_attention]).
        self.rope = nn.ModuleDict({
            SLIDING: RotaryEmbedding(cfg.head_dim, cfg.rope_local_base_freq),
            FULL: RotaryEmbedding(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling_factor),
        })

    def embed(self, input_ids: Tensor) -> Tensor:
        """Token embeddings times sqrt(D), the scale rounded to the weight dtype first as the reference does."""
        rows = self.embed_tokens(input_ids)  # a module call: the table may be quantised (gemma3n.quant)
        return rows * const(math.sqrt(self.config.hidden_size), rows.dtype)  # the same 0-dim tensor, made once

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, cache: KVCache | None = None,
                inputs_embeds: Tensor | None = None, last_only: bool = False,
                lookahead: Tensor | None = None) -> Tensor:
        """ids (B, T) -> final hidden states (B, T, D), or (B, 1, D) with `last_only`; `inputs_embeds` replaces the
        token embeddings. `lookahead` (B, 1, T, T) bool, when given, lets query i also attend to this call's key j
        (Gemma 3's bidirectional image blocks; gemma3_multimodal.py), in every layer type."""
        cfg = self.config
        x = self.embed(input_ids) if inputs_embeds is None else inputs_embeds
        b, t = x.shape[:2]
        if cache is None:
            step = ephemeral_step(attention_mask, b, t, list(cfg.layer_types), cfg.sliding_window, x.device)
        else:
            step = cache.start(attention_mask, t)
        native = native_decode.for_step(self, cache, t, inputs_embeds)
        if native is not None:  # a decode step in one native call (native_decode.py); these layers stay the reference
            return native.run(x, step, cache, reuse_input=True)  # the final norm included
        # Made once per call and shared by the layers: RoPE tables and the masks in SDPA's additive form.
        ropes = {kind: rope.tables(step.positions, x.dtype) for kind, rope in self.rope.items()}
        allowed = step.masks if lookahead is None else {kind: _with_lookahead(m, lookahead)
                                                        for kind, m in step.masks.items()}
        masks = {kind: additive_mask(m, x.dtype) for kind, m in allowed.items()}
        for i, layer in enumerate(self.layers):
            rope = ropes[layer.kind]

            def kv_source(normed: Tensor, i: int = i, layer=layer, rope=rope) -> tuple[Tensor, Tensor]:
                k, v = layer.self_attn.project_kv(normed, *rope)
                return cache.update(i, k, v) if cache is not None else (k, v)

            x = layer(x, rope, masks[layer.kind], kv_source)
        x = x[:, -1:] if last_only else x
        return run_eager(self, self.FINAL_BLOCKS, None, {DecoderLayer.STATE: x})[self.FINAL_BLOCKS[-1].output]


def _with_lookahead(mask: Tensor, lookahead: Tensor) -> Tensor:
    """mask (B, 1, T, Tk) with `lookahead` (B, 1, T, T) OR-ed into its last T key columns, which are this call's
    keys in every layout the cache returns (prefill appends them after the cached ones)."""
    t = lookahead.shape[-1]
    mask = mask.expand(lookahead.shape[0], *mask.shape[1:]).clone()
    mask[..., -t:] |= lookahead
    return mask


class Gemma3CausalLM(TiedCausalLM):
    """Text model + tied LM head + optional final soft-cap; one KV slot per layer."""

    def __init__(self, cfg: Gemma3TextConfig):
        super().__init__(cfg, TextModel(cfg))
