"""The Gemma 3n text decoder: AltUp streams, LAuReL, per-layer embeddings, KV sharing, sparse MLPs.

Module and parameter names are the Hugging Face checkpoint names, so a state dict loads with a prefix strip.
Equations and their sources: shared/docs/gemma3n-architecture.md section 2.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ..config import SLIDING, TextConfig
from .cache import KVCache, Step, ephemeral_step
from .. import kernels
from . import native_decode
from .blocks import Block, LayerContext, run_eager
from .causal_lm import TiedCausalLM
from .layers import RMSNorm, RotaryEmbedding, additive_mask, const, gaussian_topk, gelu_tanh, normal_quantile, \
    rms_norm_no_scale, rotate, scalar_operand

_INV_SQRT2 = 2.0 ** -0.5


class Laurel(nn.Module):
    """Low-rank augmented residual: x + norm(right(left(x)))."""

    def __init__(self, dim: int, rank: int, eps: float):
        super().__init__()
        self.linear_left = nn.Linear(dim, rank, bias=False)
        self.linear_right = nn.Linear(rank, dim, bias=False)
        self.post_laurel_norm = RMSNorm(dim, eps)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.post_laurel_norm(self.linear_right(self.linear_left(x)))


class MLP(nn.Module):
    """GELU-gated MLP; sparse layers keep only gate activations above mean + z*std (Gaussian top-k)."""

    SPARSE_MAX_TOKENS = 8  # beyond this many tokens per call the union of active units is no longer small
    # From this many tokens on (a prompt), the up projection runs per token on its own active units (`pairs_product`):
    # past the kernels' row limit every dense product takes float32 activations, as the per-token one does.
    PER_TOKEN_MIN_TOKENS = kernels.MAX_ROWS + 1

    def __init__(self, dim: int, hidden: int, sparsity: float):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)
        self.sparsity = sparsity
        self.z = normal_quantile(sparsity) if sparsity > 0 else 0.0
        self.sparse_decode = False  # set by enable_sparse_decode(), which also lays the weights out for it

    def forward(self, x: Tensor) -> Tensor:
        gate = self.gate_proj(x)
        if self.sparsity > 0:
            gate = gaussian_topk(gate, self.z)
            tokens = x.shape[:-1].numel()
            if self.sparse_decode and tokens <= self.SPARSE_MAX_TOKENS:
                return self.sparse_forward(x, gelu_tanh(gate))
            if self.sparse_decode and tokens >= self.PER_TOKEN_MIN_TOKENS:
                out = self.per_token_forward(x, gate)
                return self.down_proj(gelu_tanh(gate) * self.up_proj(x)) if out is None else out
        return self.down_proj(gelu_tanh(gate) * self.up_proj(x))

    def sparse_forward(self, x: Tensor, act: Tensor) -> Tensor:
        """Only the units some token activates: their up-projection rows and down-projection columns. The other
        units contribute exact zeros to the dense result. Float weights are gathered (down_proj stored
        transposed, so each column is one contiguous row); quantised ones read only those rows / columns where
        their layout allows it (`forward_rows`, `forward_sparse_inputs`), and compute densely where it does not."""
        active = (act != 0).reshape(-1, act.shape[-1]).any(0).nonzero().squeeze(1)
        if active.numel() * 2 > act.shape[-1]:  # not sparse enough to pay for the gathers
            return self.down_proj(act * self.up_proj(x))
        hidden = act.index_select(-1, active) * rows_product(self.up_proj, x, active)
        return sparse_inputs_product(self.down_proj, hidden, active, act)

    def per_token_forward(self, x: Tensor, gate: Tensor) -> Tensor | None:
        """A prompt's tokens each activate their own ~5% of the units, so their union is most of them; instead each
        token's up projection computes only its own active units (`pairs_product`), and its down projection reads
        only their columns where the layout allows it (`per_row_sparse_inputs_product`; elsewhere the library's
        dense GEMM skips the inputs that are zero across its row panels). The inactive units' products would have
        been multiplied by exact zeros, so the result is the dense one up to the order of the float32 additions.
        `gate` is the top-k's output before GELU: GELU is taken on the active units alone (`gelu_of_active`).
        None where the up projection has no such path (or too many units are active to gain): the caller computes
        densely."""
        flat = gate.reshape(-1, gate.shape[-1])
        offsets, tokens, units = active_pairs(flat)  # sorted by token, as the kernels like it
        if units.numel() * 2 > flat.numel():
            return None
        act = gelu_of_active(flat[tokens, units])
        live = act != 0  # a gate so small that its GELU rounds to zero is inactive too, as the dense product has it
        if not bool(live.all()):
            tokens, units, act = tokens[live], units[live], act[live]
            offsets = token_offsets(tokens, flat.shape[0])
        up = pairs_product(self.up_proj, x.reshape(-1, x.shape[-1]), tokens, units)
        if up is None:
            return None
        hidden = torch.zeros_like(flat).index_put_((tokens, units), act * up.to(flat.dtype))
        out = per_row_sparse_inputs_product(self.down_proj, hidden, offsets, units)
        return self.down_proj(hidden.reshape(gate.shape)) if out is None else out.reshape(*gate.shape[:-1], -1)


def active_pairs(flat: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(offsets, tokens, units): the non-zero entries of a [tokens, units] activation in torch.nonzero's order, and
    where each token's entries begin (offsets, tokens + 1). The library counts them in one pass per row where it
    applies; nonzero, bincount and cumsum otherwise."""
    if kernels.row_kernels_apply(flat):
        return kernels.nonzero_rows(flat)
    tokens, units = flat.nonzero(as_tuple=True)
    return token_offsets(tokens, flat.shape[0]), tokens, units


def token_offsets(tokens: Tensor, n_tokens: int) -> Tensor:
    """Where each token's entries begin in a list of them sorted by token (n_tokens + 1 offsets)."""
    offsets = torch.zeros(n_tokens + 1, dtype=torch.int64)
    torch.cumsum(torch.bincount(tokens, minlength=n_tokens), 0, out=offsets[1:])
    return offsets


# PyTorch's element-wise CPU loops take two vectors a step and finish with its scalar code, whose float32 tanh can
# differ in the last place: values padded to a multiple of this many take the vector code throughout, as the values
# of a whole activation tensor do (all but its last few where its size is not a multiple of the step).
_VECTOR_STEP = 64


def gelu_of_active(values: Tensor) -> Tensor:
    """GELU of a 1-d run of active units, the same bits GELU over their whole rows gives them (see _VECTOR_STEP)."""
    pad = (-values.numel()) % _VECTOR_STEP
    return gelu_tanh(torch.cat((values, values.new_zeros(pad))))[:values.numel()] if pad else gelu_tanh(values)


def pairs_product(linear: nn.Module, x: Tensor, tokens: Tensor, units: Tensor) -> Tensor | None:
    """linear(x)[tokens[e], units[e]] for each e, computing only those products (quantised linears' `forward_pairs`,
    which read only the rows they need); None where the linear has no such path."""
    forward_pairs = getattr(linear, "forward_pairs", None)
    return None if forward_pairs is None else forward_pairs(x, tokens, units)


def per_row_sparse_inputs_product(linear: nn.Module, hidden: Tensor, offsets: Tensor, units: Tensor) -> Tensor | None:
    """linear(hidden) where row i of `hidden` is zero outside the inputs units[offsets[i]:offsets[i + 1]], each row
    reading only its own inputs' weights (`forward_sparse_inputs_per_row`); None where the linear has no such path."""
    forward = getattr(linear, "forward_sparse_inputs_per_row", None)
    return None if forward is None else forward(hidden, offsets, units)


def rows_product(linear: nn.Module, x: Tensor, active: Tensor) -> Tensor:
    """The output units `active` of a linear of any kind: float weights gathered, quantised ones through their
    `forward_rows` where they have it, else the whole product sliced."""
    if type(linear) is nn.Linear:
        return F.linear(x, linear.weight.index_select(0, active))
    if hasattr(linear, "forward_rows"):
        return linear.forward_rows(x, active)
    return linear(x).index_select(-1, active)


def sparse_inputs_product(linear: nn.Module, hidden: Tensor, active: Tensor, like: Tensor) -> Tensor:
    """A linear of any kind applied to inputs that are zero outside the units `active` (`hidden`: their values;
    `like`: a tensor of the full input shape): a float weight's columns gathered (stored transposed by
    enable_sparse_decode, so each is one contiguous row), quantised ones through `forward_sparse_inputs` where
    they have it, else the dense product of the full input."""
    if type(linear) is nn.Linear:
        return F.linear(hidden, linear.weight.t().index_select(0, active).t())
    full = like.new_zeros(like.shape).index_copy_(-1, active, hidden)
    if hasattr(linear, "forward_sparse_inputs"):
        return linear.forward_sparse_inputs(full, active)
    return linear(full)


def enable_sparse_decode(model: nn.Module) -> int:
    """Turn on the sparse path in every sparse MLP of `model`. A float down_proj.weight is stored transposed (a
    (dim, hidden) view of a contiguous (hidden, dim) tensor: the dense path reads it as before); quantised
    projections are used as they are. Returns how many MLPs were switched. Call after loading; it copies those
    float weights once."""
    switched = 0
    for mlp in model.modules():
        if not isinstance(mlp, MLP) or mlp.sparsity <= 0:
            continue
        if type(mlp.down_proj) is nn.Linear:
            weight = mlp.down_proj.weight
            if weight.device.type == "meta":
                continue
            if not weight.t().is_contiguous():
                mlp.down_proj.weight = nn.Parameter(weight.t().contiguous().t(), requires_grad=False)
        mlp.sparse_decode = True
        switched += 1
    return switched


class AltUp(nn.Module):
    """Alternating updates: predict all streams from the active one, then correct them with the layer's output."""

    def __init__(self, dim: int, streams: int, eps: float):
        super().__init__()
        self.streams = streams
        self.correct_output_scale = nn.Parameter(torch.ones(dim))
        self.correction_coefs = nn.Linear(streams, streams, bias=False)
        self.prediction_coefs = nn.Linear(streams, streams * streams, bias=False)
        self.modality_router = nn.Linear(dim, streams, bias=False)
        self.router_norm = RMSNorm(dim, eps)
        self.router_input_scale = 1.0 / dim  # 1/D, not 1/sqrt(D); the reference holds it in the model dtype

    def route(self, x: Tensor) -> Tensor:
        """(B, T, D) -> (B, T, streams) router weights; tanh in float32 as the reference does."""
        scale = const(self.router_input_scale, x.dtype)  # the same 0-dim tensor, made once
        routed = self.modality_router(self.router_norm(x) * scale)
        r = torch.tanh(routed if routed.dtype == torch.float32 else routed.float())
        return r if r.dtype == x.dtype else r.to(x.dtype)

    def predict(self, x: Tensor) -> Tensor:
        """x (S, B, T, D) -> predictions P_q = X_q + sum_p c[S*q + p] X_p."""
        r = self.route(x[0])
        coefs = self.prediction_coefs(r).unflatten(-1, (self.streams, self.streams))  # (B, T, q, p)
        if kernels.row_kernels_apply(x, coefs):  # the same sums and roundings in one pass over the streams
            mixed = kernels.altup_mix(x, coefs)
            if mixed is not None:
                return mixed
        # (B, T, q, p) @ (B, T, p, D) in float32, rounded once to x's dtype: what the reference's bfloat16 matmul
        # computes (float32 sums, one rounding), as one batched float32 GEMM rather than torch's slow bfloat16
        # path for (D, p) @ (p, q) matrices
        mixed = torch.matmul(coefs.float(), x.permute(1, 2, 0, 3).float()).to(x.dtype)  # (B, T, q, D)
        return mixed.permute(2, 0, 1, 3) + x

    def correct(self, predictions: Tensor, activated: Tensor) -> Tensor:
        """C_q = P_q + (k_q + 1) * (activated - P_0), k from the router on the layer output."""
        k = self.correction_coefs(self.route(activated)) + scalar_operand(1.0, activated.dtype)  # (B, T, S)
        innovation = activated - predictions[0]
        corrected = predictions + k.permute(2, 0, 1)[..., None] * innovation
        return corrected if corrected.dtype == activated.dtype else corrected.to(activated.dtype)


class Attention(nn.Module):
    """GQA attention with q/k/v RMSNorms and scale 1; a shared layer has no K/V projections of its own."""

    scale = 1.0
    normalises_values = True  # a weightless RMSNorm on V (Gemma 3 has none)

    def __init__(self, cfg: TextConfig, layer: int):
        super().__init__()
        d, hd = cfg.hidden_size, cfg.head_dim
        self.heads, self.kv_heads, self.head_dim, self.eps = cfg.num_attention_heads, cfg.num_key_value_heads, hd, \
            cfg.rms_norm_eps
        self.kind = cfg.layer_types[layer]
        self.kv_slot = cfg.kv_producer[layer]  # the layer (cache slot) whose K/V this one attends to
        self.shares_kv = layer >= cfg.first_shared_layer
        self.q_proj = nn.Linear(d, self.heads * hd, bias=False)
        self.q_norm = RMSNorm(hd, cfg.rms_norm_eps)
        if not self.shares_kv:
            self.k_proj = nn.Linear(d, self.kv_heads * hd, bias=False)
            self.v_proj = nn.Linear(d, self.kv_heads * hd, bias=False)
            self.k_norm = RMSNorm(hd, cfg.rms_norm_eps)
        self.o_proj = nn.Linear(self.heads * hd, d, bias=False)

    def project_kv(self, x: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
        """x (B, T, D) -> k, v (B, Hkv, T, hd)."""
        shape = (*x.shape[:2], self.kv_heads, self.head_dim)
        k = self.k_norm(self.k_proj(x).view(shape)).transpose(1, 2)
        v = rms_norm_no_scale(self.v_proj(x).view(shape), self.eps).transpose(1, 2)
        return rotate(k, cos, sin), v

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor, kv: tuple[Tensor, Tensor]) -> Tensor:
        b, t, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(b, t, self.heads, self.head_dim)).transpose(1, 2)  # (B, H, T, hd)
        q = rotate(q, cos, sin)
        k, v = kv
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale, enable_gqa=True)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))


class DecoderLayer(nn.Module):
    """One Gemma 3n layer: AltUp predict -> attention + LAuReL -> MLP -> AltUp correct -> per-layer input."""

    # The order of operations, run by the eager forward and by the native decode plan (blocks.py).
    BLOCKS = (
        Block("altup_predict", ("streams",), "predictions", "altup"),
        Block("first_stream", ("predictions",), "active"),
        Block("rms_norm", ("active",), "normed", "input_layernorm"),
        Block("laurel", ("normed",), "laurel", "laurel"),
        Block("attention", ("normed",), "h", "self_attn"),
        Block("rms_norm", ("h",), "h", "post_attention_layernorm"),
        Block("add", ("active", "h", "laurel"), "x", divisor=math.sqrt(2)),
        Block("rms_norm", ("x",), "h", "pre_feedforward_layernorm"),
        Block("mlp", ("h",), "h", "mlp"),
        Block("rms_norm", ("h",), "h", "post_feedforward_layernorm"),
        Block("add", ("x", "h"), "x"),
        Block("altup_correct", ("predictions", "x"), "streams", "altup"),
        Block("per_layer_input", ("streams",), "streams"),
    )
    STATE = "streams"  # the register carried from layer to layer: the AltUp streams (S, B, T, D)

    def __init__(self, cfg: TextConfig, layer: int):
        super().__init__()
        d, eps = cfg.hidden_size, cfg.rms_norm_eps
        self.layer, self.kind = layer, cfg.layer_types[layer]
        self.self_attn = Attention(cfg, layer)
        self.mlp = MLP(d, cfg.intermediate_size[layer], cfg.activation_sparsity_pattern[layer])
        self.input_layernorm = RMSNorm(d, eps)
        self.post_attention_layernorm = RMSNorm(d, eps)
        self.pre_feedforward_layernorm = RMSNorm(d, eps)
        self.post_feedforward_layernorm = RMSNorm(d, eps)
        self.altup = AltUp(d, cfg.altup_num_inputs, eps)
        self.laurel = Laurel(d, cfg.laurel_rank, eps)
        self.per_layer_input_gate = nn.Linear(d, cfg.hidden_size_per_layer_input, bias=False)
        self.per_layer_projection = nn.Linear(cfg.hidden_size_per_layer_input, d, bias=False)
        self.post_per_layer_input_norm = RMSNorm(d, eps)
        self.correct_scale = cfg.altup_correct_scale

    def forward(self, streams: Tensor, ple: Tensor, rope: tuple[Tensor, Tensor], mask: Tensor,
                kv_source) -> Tensor:
        """streams (S, B, T, D), ple (B, T, P) -> streams. `rope` is the (cos, signed sin) pair of
        `RotaryEmbedding.tables`; `kv_source(normed)` returns this layer's (K, V)."""
        registers = run_eager(self, self.BLOCKS, LayerContext(rope, mask, kv_source, ple), {self.STATE: streams})
        return registers[self.STATE]

    def add_per_layer_input(self, corrected: Tensor, ple: Tensor) -> Tensor:
        """corrected streams (S, B, T, D) -> the streams with norm(proj(gelu(gate(C_0 [* scale])) * ple)) added to
        streams 1.."""
        gate = corrected[0]
        if self.correct_scale:
            gate = gate * self.altup.correct_output_scale
            gate = gate if gate.dtype == corrected.dtype else gate.to(corrected.dtype)
        gate = gelu_tanh(self.per_layer_input_gate(gate)) * ple
        injected = self.post_per_layer_input_norm(self.per_layer_projection(gate))
        # A cat, not an in-place add: `corrected` has the permuted layout of the predictions, and the next layer's
        # reductions over the contiguous copy the cat makes give other bits than over that layout.
        return torch.cat((corrected[:1], corrected[1:] + injected), 0)


def _match_rms(x: Tensor, target_rms: Tensor) -> Tensor:
    """Rescale x to the given per-token RMS (the mean square of x is clamped at 1e-5)."""
    return x * target_rms / torch.sqrt(torch.mean(x ** 2, dim=-1, keepdim=True).clamp(min=1e-5))


class TextModel(nn.Module):
    """Gemma3nTextModel: embeddings, PLE, AltUp stream set-up, the layers, the stream collapse and final norm."""

    # Before the first layer, the AltUp streams from the embeddings; after the last, the streams collapsed to one
    # hidden state, then the final norm. Run by the eager forward, and by the native decode plan around the layers.
    INITIAL_BLOCKS = (Block("altup_expand", ("embeds",), DecoderLayer.STATE),)
    FINAL_BLOCKS = (Block("altup_collapse", (DecoderLayer.STATE,), "hidden"),
                    Block("rms_norm", ("hidden",), "hidden", "norm"))

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.config = cfg
        d, p, n = cfg.hidden_size, cfg.hidden_size_per_layer_input, cfg.num_hidden_layers
        self.embed_tokens = nn.Embedding(cfg.vocab_size, d)
        self.embed_tokens_per_layer = nn.Embedding(cfg.vocab_size_per_layer_input, n * p)
        self.per_layer_model_projection = nn.Linear(d, n * p, bias=False)
        self.per_layer_projection_norm = RMSNorm(p, cfg.rms_norm_eps)
        self.altup_projections = nn.ModuleList(nn.Linear(d, d, bias=False) for _ in range(cfg.altup_num_inputs - 1))
        self.altup_unembed_projections = nn.ModuleList(
            nn.Linear(d, d, bias=False) for _ in range(cfg.altup_num_inputs - 1))
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(n))
        self.norm = RMSNorm(d, cfg.rms_norm_eps)
        self.rope = nn.ModuleDict({
            SLIDING: RotaryEmbedding(cfg.head_dim, cfg.rope_local_base_freq),
            "full_attention": RotaryEmbedding(cfg.head_dim, cfg.rope_theta),
        })

    # -- embeddings ------------------------------------------------------------------------------------------------

    def embed(self, input_ids: Tensor) -> Tensor:
        """Scaled token embeddings; the sqrt(D) scale is rounded to the weight dtype first, as the reference does."""
        rows = self.embed_tokens(input_ids)  # a module call: the table may be quantised (gemma3n.quant)
        return rows * const(math.sqrt(self.config.hidden_size), rows.dtype)  # the same 0-dim tensor, made once

    def per_layer_tokens(self, input_ids: Tensor) -> Tensor:
        """Token part of the per-layer embeddings (B, T, L, P); ids outside the PLE vocabulary use row 0.

        The table (2 B values in E2B) stays in its stored form, memory-mapped: only the rows of these tokens are
        read and converted to the compute dtype, which gives the same values as converting the whole table."""
        cfg = self.config
        ids = torch.where((input_ids >= 0) & (input_ids < cfg.vocab_size_per_layer_input), input_ids, 0)
        rows = self.embed_tokens_per_layer(ids).to(self.norm.weight.dtype)
        rows = rows * const(math.sqrt(cfg.hidden_size_per_layer_input), rows.dtype)
        return rows.unflatten(-1, (cfg.num_hidden_layers, cfg.hidden_size_per_layer_input))

    def per_layer_inputs(self, embeds: Tensor, tokens: Tensor) -> Tensor:
        """(projection of the embeddings, normed per layer slice + token part) / sqrt(2) -> (B, T, L, P)."""
        cfg = self.config
        proj = self.per_layer_model_projection(embeds)
        proj = proj * const(cfg.hidden_size ** -0.5, embeds.dtype)
        proj = self.per_layer_projection_norm(proj.unflatten(-1, (cfg.num_hidden_layers, -1)))
        return (proj + tokens) * const(_INV_SQRT2, embeds.dtype)

    # -- forward ---------------------------------------------------------------------------------------------------

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, cache: KVCache | None = None,
                inputs_embeds: Tensor | None = None, last_only: bool = False) -> Tensor:
        """ids (B, T) -> final hidden states (B, T, D), or (B, 1, D) with `last_only`. `inputs_embeds` replaces the
        token embeddings (multimodal merge) while the per-layer token part still comes from the ids."""
        cfg = self.config
        embeds = self.embed(input_ids) if inputs_embeds is None else inputs_embeds
        ple = self.per_layer_inputs(embeds, self.per_layer_tokens(input_ids))
        b, t = input_ids.shape
        if cache is None:
            step = ephemeral_step(attention_mask, b, t, list(cfg.layer_types), cfg.sliding_window, embeds.device)
        else:
            step = cache.start(attention_mask, t)
        native = native_decode.for_step(self, cache, t, inputs_embeds)
        if native is not None:  # a decode step in one native call (native_decode.py); run_layers stays the reference
            return native.run(embeds, step, cache, ple, reuse_input=True)  # INITIAL_ and FINAL_BLOCKS included
        streams = run_eager(self, self.INITIAL_BLOCKS, None, {"embeds": embeds})[DecoderLayer.STATE]
        streams = self.run_layers(streams, ple, step, cache, last_only)
        return run_eager(self, self.FINAL_BLOCKS, None, {DecoderLayer.STATE: streams})[self.FINAL_BLOCKS[-1].output]

    def expand(self, x0: Tensor) -> Tensor:
        """(B, T, D) -> (S, B, T, D): the embeddings plus projected copies rescaled to their RMS."""
        target = torch.mean(x0 ** 2, dim=-1, keepdim=True) ** 0.5
        return torch.stack([x0] + [_match_rms(proj(x0), target) for proj in self.altup_projections])

    def collapse(self, streams: Tensor) -> Tensor:
        """(S, B, T, D) -> (B, T, D): un-project streams 1.., rescale to stream 0's RMS, average all."""
        target = torch.mean(streams[0] ** 2, dim=-1, keepdim=True) ** 0.5
        parts = [streams[0]] + [_match_rms(proj(streams[i + 1]), target)
                                for i, proj in enumerate(self.altup_unembed_projections)]
        return torch.mean(torch.stack(parts), dim=0)

    def run_layers(self, streams: Tensor, ple: Tensor, step: Step, cache: KVCache | None,
                   last_only: bool = False) -> Tensor:
        """The decoder layers over the AltUp streams (S, B, T, D).

        With `last_only`, the layers that only read another layer's K/V run on the last position alone: nothing
        after them looks at the other positions, and every other part of a layer is position-wise, so the last
        position's output is unchanged while prefill skips most of those layers' work."""
        # Made once per call and shared by the layers: RoPE tables and the masks in SDPA's additive form.
        ropes = {kind: rope.tables(step.positions, streams.dtype) for kind, rope in self.rope.items()}
        masks = {kind: additive_mask(m, streams.dtype) for kind, m in step.masks.items()}
        produced: dict[int, tuple[Tensor, Tensor]] = {}
        producer_of = self.config.kv_producer
        for i, layer in enumerate(self.layers):
            if last_only and producer_of[i] != i and streams.shape[2] > 1:
                streams, ple = streams[:, :, -1:], ple[:, -1:]
                ropes = {kind: (cos[:, :, -1:], sin[:, :, -1:]) for kind, (cos, sin) in ropes.items()}
                masks = {kind: m[:, :, -1:] for kind, m in masks.items()}
            rope = ropes[layer.kind]

            def kv_source(normed: Tensor, i=i, layer=layer, rope=rope):
                if producer_of[i] != i:
                    return produced[producer_of[i]]
                k, v = layer.self_attn.project_kv(normed, *rope)
                kv = cache.update(i, k, v) if cache is not None else (k, v)
                produced[i] = kv
                return kv

            streams = layer(streams, ple[:, :, i], rope, masks[layer.kind], kv_source)
        return streams


class CausalLM(TiedCausalLM):
    """Text model + tied LM head + final soft-cap; the module names follow `Gemma3nForCausalLM`."""

    # Kept in the stored dtype when loading converts the rest; rows are converted as they are gathered.
    stored_dtype_keys = ("model.embed_tokens_per_layer.weight",)

    def __init__(self, cfg: TextConfig):
        super().__init__(cfg, TextModel(cfg))

    def cache_slot_types(self) -> list[str]:
        """Only the layers before the first shared one own a slot; the rest read their producer's."""
        return list(self.config.layer_types[:self.config.num_kv_slots])
