"""GGUF checkpoints (llama.cpp's format) for Gemma 3 and Gemma 3n text decoders.

`read_gguf(path)` rebuilds an HF-style config from the GGUF metadata and returns the tensors under the names of
transformers' `Gemma3ForCausalLM` / `Gemma3nForCausalLM`, so the same modules load GGUF and safetensors files.
Every GGUF -> HF name goes through `NAME_TABLE`. What llama.cpp's converter (convert_hf_to_gguf.py,
conversion/gemma.py) does to a checkpoint, and how it is undone here:

* GGUF lists dimensions fastest-first ([in, out] for a Linear); PyTorch order is the reverse.
* Gemma 3 norm weights are stored with +1 added (the converter bakes in Gemma3RMSNorm's 1 + w); we subtract it.
  Gemma 3n norms scale by w itself and are stored unchanged.
* The LM head is tied to the token embeddings and is not stored (`output.weight` appears only if untied).
* Gemma 3 embeddings are cut to the tokenizer's vocabulary (the 4B-27B configs declare 262 208 rows, more than
  there are tokens); vocab_size is the stored row count, so logits cover exactly the tokens that exist.
* Gemma 3n: the three `altup_projections` / `altup_unembed_projections` are stacked into one [3, D, D] tensor each;
  `altup.correct_output_scale` (a bare parameter) gains a `.weight` suffix; the per-layer embedding table is padded
  with zero rows from vocab_size_per_layer_input up to vocab_size (the converter says they are for vision/audio
  ids), so vocab_size_per_layer_input is recovered as the table's rows minus its trailing all-zero rows.
* Gemma 3n files from the official checkpoints carry k_proj / v_proj / k_norm for the KV-sharing layers, which
  transformers ignores and our model does not have; they are dropped. Files converted from a transformers
  `save_pretrained` folder do not carry them at all.
* Metadata the converter does not write is filled with llama.cpp's own rules: the sliding pattern (every 6th layer
  global for Gemma 3, every 5th for Gemma 3n), the attention scale (hidden / heads on the 62-layer 27B, head_dim
  otherwise), sliding-layer RoPE theta 10 000, and KV sharing from layer 20 on for Gemma 3n.
"""
from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Mapping

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as Q
from torch import Tensor

from ..config import FULL, SLIDING, ModelConfig
from .gguf_file import GGUFFile, GGUFFormatError


class GGUFError(ValueError):
    """A GGUF file that cannot be read as a Gemma 3 / Gemma 3n checkpoint."""


G3, G3N = "gemma3", "gemma3n"
_BOTH = (G3, G3N)

# GGUF tensor name -> (HF name, architectures whose files hold it). "{i}" is the layer index; "{j}" marks a GGUF
# tensor that stacks several HF tensors along its first (PyTorch) dimension.
NAME_TABLE: dict[str, tuple[str, tuple[str, ...]]] = {
    "token_embd.weight": ("model.embed_tokens.weight", _BOTH),
    "output_norm.weight": ("model.norm.weight", _BOTH),
    "output.weight": ("lm_head.weight", _BOTH),  # optional: absent when tied to token_embd (always, for Gemma)
    "blk.{i}.attn_norm.weight": ("model.layers.{i}.input_layernorm.weight", _BOTH),
    "blk.{i}.attn_q.weight": ("model.layers.{i}.self_attn.q_proj.weight", _BOTH),
    "blk.{i}.attn_k.weight": ("model.layers.{i}.self_attn.k_proj.weight", _BOTH),  # not on 3n shared-KV layers
    "blk.{i}.attn_v.weight": ("model.layers.{i}.self_attn.v_proj.weight", _BOTH),  # not on 3n shared-KV layers
    "blk.{i}.attn_output.weight": ("model.layers.{i}.self_attn.o_proj.weight", _BOTH),
    "blk.{i}.attn_q_norm.weight": ("model.layers.{i}.self_attn.q_norm.weight", _BOTH),
    "blk.{i}.attn_k_norm.weight": ("model.layers.{i}.self_attn.k_norm.weight", _BOTH),  # not on 3n shared-KV
    "blk.{i}.post_attention_norm.weight": ("model.layers.{i}.post_attention_layernorm.weight", _BOTH),
    "blk.{i}.ffn_norm.weight": ("model.layers.{i}.pre_feedforward_layernorm.weight", _BOTH),
    "blk.{i}.ffn_gate.weight": ("model.layers.{i}.mlp.gate_proj.weight", _BOTH),
    "blk.{i}.ffn_up.weight": ("model.layers.{i}.mlp.up_proj.weight", _BOTH),
    "blk.{i}.ffn_down.weight": ("model.layers.{i}.mlp.down_proj.weight", _BOTH),
    "blk.{i}.post_ffw_norm.weight": ("model.layers.{i}.post_feedforward_layernorm.weight", _BOTH),
    # Gemma 3n only: per-layer embeddings (PLE), AltUp, LAuReL.
    "per_layer_token_embd.weight": ("model.embed_tokens_per_layer.weight", (G3N,)),  # zero-padded to vocab_size
    "per_layer_model_proj.weight": ("model.per_layer_model_projection.weight", (G3N,)),
    "per_layer_proj_norm.weight": ("model.per_layer_projection_norm.weight", (G3N,)),
    "altup_proj.weight": ("model.altup_projections.{j}.weight", (G3N,)),  # stacked [3, D, D]
    "altup_unembd_proj.weight": ("model.altup_unembed_projections.{j}.weight", (G3N,)),  # stacked [3, D, D]
    "blk.{i}.inp_gate.weight": ("model.layers.{i}.per_layer_input_gate.weight", (G3N,)),
    "blk.{i}.proj.weight": ("model.layers.{i}.per_layer_projection.weight", (G3N,)),
    "blk.{i}.post_norm.weight": ("model.layers.{i}.post_per_layer_input_norm.weight", (G3N,)),
    "blk.{i}.altup_correct_coef.weight": ("model.layers.{i}.altup.correction_coefs.weight", (G3N,)),
    "blk.{i}.altup_correct_scale.weight": ("model.layers.{i}.altup.correct_output_scale", (G3N,)),  # bare param
    "blk.{i}.altup_predict_coef.weight": ("model.layers.{i}.altup.prediction_coefs.weight", (G3N,)),
    "blk.{i}.altup_router.weight": ("model.layers.{i}.altup.modality_router.weight", (G3N,)),
    "blk.{i}.altup_router_norm.weight": ("model.layers.{i}.altup.router_norm.weight", (G3N,)),
    "blk.{i}.laurel_l.weight": ("model.layers.{i}.laurel.linear_left.weight", (G3N,)),
    "blk.{i}.laurel_r.weight": ("model.layers.{i}.laurel.linear_right.weight", (G3N,)),
    "blk.{i}.laurel_post_norm.weight": ("model.layers.{i}.laurel.post_laurel_norm.weight", (G3N,)),
}

_OPTIONAL = {"output.weight"}
_SHARED_KV_ONLY = {"blk.{i}.attn_k.weight", "blk.{i}.attn_v.weight", "blk.{i}.attn_k_norm.weight"}
# What the converter added to every tensor whose HF name ends in "norm.weight" (its own rule, mirrored).
_NORM_SHIFT = {G3: 1.0, G3N: 0.0}
_LAYER = re.compile(r"^blk\.(\d+)\.(.+)$")
_FLOAT_TYPES = {Q.F32: torch.float32, Q.F16: torch.float16, Q.BF16: torch.bfloat16}
_CHUNK_ELEMENTS = 1 << 24  # dequantise at most this many values (64 MiB of float32) at a time


# -- public API --------------------------------------------------------------------------------------------------

def read_gguf(source: str | Path | GGUFFile, dtype: torch.dtype | None = None) -> tuple[ModelConfig, dict[str, Tensor]]:
    """(config, state dict under HF names) of a Gemma 3 / 3n GGUF file (a path, or the file already parsed), one
    tensor dequantised at a time.

    dtype: None gives float32 for a file holding quantised tensors, else the float type the file's weights are
    stored in (see `_default_dtype`)."""
    reader = source if isinstance(source, GGUFFile) else open_gguf(Path(source))
    path = reader.path
    meta = _Metadata(reader, path)
    arch = meta.arch
    dtype = dtype or _default_dtype(reader)
    if not dtype.is_floating_point:
        raise GGUFError(f"{path}: dtype must be a floating point type, got {dtype}")
    layers = meta.get("block_count")
    shared = _shared_kv_layers(meta, layers) if arch == G3N else set()
    entries = [(t, *_table_key(t.name, arch, layers, path)) for t in reader.tensors]
    _check_complete({key.replace("{i}", str(i)) for _, key, i in entries}, arch, layers, shared, path)
    state = GGUFTensors(entries, arch, shared, dtype)
    return ModelConfig.from_dict(_config_dict(meta, state, shared), source=str(path)), state


# -- the file ----------------------------------------------------------------------------------------------------

def open_gguf(path: Path) -> GGUFFile:
    """The parsed file, or a GGUFError that names it."""
    if not path.is_file():
        raise GGUFError(f"{path}: no such file")
    try:
        return GGUFFile(path)
    except GGUFFormatError as e:
        raise GGUFError(str(e)) from None


class _Metadata:
    """Typed access to the key/value metadata; `get` reads `<arch>.<key>`, a missing required key is an error."""

    def __init__(self, reader: GGUFFile, path: Path):
        self.fields, self.path = reader.metadata, path  # key -> plain Python value
        arch = self.raw("general.architecture", None)
        if arch not in (G3, G3N):
            raise GGUFError(f"{path}: architecture {arch!r} is not supported (supported: {G3}, {G3N})")
        self.arch: str = arch

    def raw(self, key: str, default: Any = ...) -> Any:
        value = self.fields.get(key)
        if value is None:
            if default is ...:
                raise GGUFError(f"{self.path}: metadata key '{key}' is missing")
            return default
        return value

    def get(self, key: str, default: Any = ...) -> Any:
        return self.raw(f"{self.arch}.{key}", default)

    def get_float(self, key: str, default: Any = None) -> float | None:
        """A float32 metadata value as the shortest decimal that rounds to it (1e-6, not 9.99999997e-07)."""
        value = self.get(key, ... if default is ... else None)
        return default if value is None else float(str(np.float32(value)))


def _default_dtype(reader: GGUFFile) -> torch.dtype:
    """float32 if anything is quantised, else the type of the largest tensor: the converter keeps norms and tiny
    matrices (AltUp coefficients) in F32 whatever the requested type."""
    if any(t.tensor_type not in _FLOAT_TYPES for t in reader.tensors):
        return torch.float32
    return _FLOAT_TYPES[max(reader.tensors, key=lambda t: int(t.n_elements)).tensor_type]


# -- tensors -----------------------------------------------------------------------------------------------------

def _table_key(name: str, arch: str, layers: int, path: Path) -> tuple[str, int | None]:
    """GGUF name -> (NAME_TABLE key, layer index or None); a name outside the table is an error."""
    m = _LAYER.match(name)
    key, layer = (f"blk.{{i}}.{m.group(2)}", int(m.group(1))) if m else (name, None)
    if key not in NAME_TABLE or arch not in NAME_TABLE[key][1] or (layer is not None and layer >= layers):
        raise GGUFError(f"{path}: unexpected tensor '{name}' for a {layers}-layer {arch} model (not in the "
                        "name table)")
    return key, layer


PLE_NAME = "model.embed_tokens_per_layer.weight"


class GGUFTensors(Mapping[str, Tensor]):
    """The file's tensors under HF names, dequantised (a chunk of rows at a time) only when one is asked for, so
    a loader holds at most the tensors it has taken. The per-layer embedding table is also available as a
    `GGUFRows` (`row_table`), which dequantises only the rows of the tokens being processed."""

    def __init__(self, entries: list, arch: str, shared: set[int], dtype: torch.dtype):
        self.dtype = dtype
        self._source: dict[str, tuple[Any, float, int | None]] = {}  # HF name -> (tensor, shift, stacked index)
        for t, key, layer in entries:
            if layer in shared and key in _SHARED_KV_ONLY:
                continue  # K/V of a layer that reads another layer's cache: unused, as in transformers
            hf = NAME_TABLE[key][0].replace("{i}", str(layer))
            shift = _NORM_SHIFT[arch] if hf.endswith("norm.weight") else 0.0
            if "{j}" in hf:  # one stacked GGUF tensor -> separate HF tensors
                for j in range(int(t.shape[-1])):
                    self._source[hf.replace("{j}", str(j))] = (t, shift, j)
            else:
                self._source[hf] = (t, shift, None)
        self._rows = GGUFRows(self._source[PLE_NAME][0], dtype, self._vocab()) if PLE_NAME in self._source else None

    def _vocab(self) -> int:
        t = self._source["model.embed_tokens.weight"][0]
        return int(t.shape[-1])

    def __contains__(self, name) -> bool:  # (Mapping's would dequantise the tensor: the per-layer table is GBs)
        return name in self._source

    def __getitem__(self, name: str) -> Tensor:
        if name == PLE_NAME and self._rows is not None:
            return self._rows.materialise()
        t, shift, j = self._source[name]
        tensor = _dequantize(t, self.dtype, shift)
        return tensor if j is None else tensor[j].clone()  # its own storage, not a view of the stack

    def shape(self, name: str) -> tuple[int, ...]:
        if name == PLE_NAME and self._rows is not None:
            return self._rows.shape
        t, _, j = self._source[name]
        shape = tuple(int(d) for d in reversed(t.shape))
        return shape if j is None else shape[1:]

    def stored(self, name: str) -> tuple[int, np.ndarray] | None:
        """(GGML type, stored rows [out, bytes or values per row]) of a 2-D tensor kept as the file has it (a view
        of the map, one slice of a stacked tensor); None for tensors that are shifted or not matrices."""
        if name == PLE_NAME or name not in self._source:
            return None
        t, shift, j = self._source[name]
        shape = self.shape(name)
        if shift or len(shape) != 2:
            return None
        raw = np.asarray(t.data)
        raw = raw.reshape(-1, raw.shape[-1]) if raw.ndim > 1 else raw.reshape(1, -1)
        if j is not None:
            raw = raw[j * shape[0]:(j + 1) * shape[0]]
        return int(t.tensor_type), raw

    def row_table(self, name: str) -> "GGUFRows":
        if name != PLE_NAME or self._rows is None:
            raise KeyError(f"{name} is not a row-gathered table")
        return self._rows

    def __iter__(self):
        return iter(self._source)

    def __len__(self) -> int:
        return len(self._source)


class GGUFRows:
    """A [rows, width] GGUF table read row by row from the memory map, in whatever type it is stored (F16, Q8_0,
    Q4_K, ...): `gather(ids)` dequantises just those rows. Trailing all-zero rows that the converter appended (see
    the module docstring) are not part of the table."""

    def __init__(self, t, dtype: torch.dtype, vocab_size: int):
        self.tensor_type, self.dtype = t.tensor_type, dtype
        raw = np.asarray(t.data)
        self.raw = raw.reshape(raw.shape[0], -1)  # (rows, stored bytes or values per row), a view of the map
        self.width = int(t.shape[0])
        self.shape = (_unpadded_rows(self, vocab_size), self.width)

    def rows(self, start: int, stop: int) -> Tensor:
        values = gguf.quants.dequantize(self.raw[start:stop], self.tensor_type)
        return torch.from_numpy(np.array(values, dtype=np.float32)).reshape(-1, self.width).to(self.dtype)

    def gather(self, ids: Tensor) -> Tensor:
        """ids (any shape) -> rows (*ids.shape, width), dequantising each distinct row once."""
        unique, inverse = torch.unique(ids.reshape(-1), return_inverse=True)
        picked = gguf.quants.dequantize(self.raw[unique.numpy()], self.tensor_type)
        rows = torch.from_numpy(np.array(picked, dtype=np.float32)).reshape(-1, self.width).to(self.dtype)
        return rows[inverse].reshape(*ids.shape, self.width)

    def materialise(self) -> Tensor:
        """The whole table (for tests and conversions; the model never calls this)."""
        out = torch.empty(self.shape, dtype=self.dtype)
        step = max(1, _CHUNK_ELEMENTS // self.width)
        for start in range(0, self.shape[0], step):
            out[start:start + step] = self.rows(start, min(start + step, self.shape[0]))
        return out


def _dequantize(t, dtype: torch.dtype, shift: float) -> Tensor:
    """One tensor in PyTorch dimension order: dequantised to float32 a chunk of rows at a time, `shift`
    subtracted, cast to `dtype`. The float32 detour is exact for F16 / BF16 and what transformers does."""
    shape = tuple(int(d) for d in reversed(t.shape))
    raw = np.asarray(t.data)
    raw = raw.reshape(-1, raw.shape[-1]) if raw.ndim > 1 else raw.reshape(1, -1)  # (rows, stored row)
    out = torch.empty((raw.shape[0], int(np.prod(shape)) // raw.shape[0]), dtype=dtype)
    step = max(1, _CHUNK_ELEMENTS // max(1, out.shape[1]))
    for start in range(0, raw.shape[0], step):
        values = gguf.quants.dequantize(raw[start:start + step], t.tensor_type)
        if not values.flags.writeable:  # an F32 tensor comes back as a read-only view of the file
            values = values.copy()
        chunk = torch.from_numpy(values).reshape(-1, out.shape[1])
        out[start:start + step] = (chunk - shift if shift else chunk).to(dtype)
    return out.reshape(shape)


def _check_complete(found: set[str], arch: str, layers: int, shared: set[int], path: Path) -> None:
    missing = []
    for key, (hf, archs) in NAME_TABLE.items():
        if arch not in archs or key in _OPTIONAL:
            continue
        indices = [None] if "{i}" not in key else [
            i for i in range(layers) if not (i in shared and key in _SHARED_KV_ONLY)]
        for i in indices:
            name = key if i is None else key.replace("{i}", str(i))
            if name not in found:
                missing.append(f"'{name}' ({hf.replace('{i}', str(i))})")
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise GGUFError(f"{path}: tensor {missing[0]}{more} is missing; the file is incomplete or not a {arch} model")


class GGUFRowEmbedding(torch.nn.Module):
    """An embedding whose table stays in the GGUF file; a lookup dequantises only the rows it returns."""

    def __init__(self, table: GGUFRows):
        super().__init__()
        self.table = table
        self.num_embeddings, self.embedding_dim = table.shape

    def forward(self, ids: Tensor) -> Tensor:
        return self.table.gather(ids.cpu()).to(ids.device)


def _unpadded_rows(table: GGUFRows, vocab_size: int) -> int:
    """Rows of the per-layer table without the all-zero rows the converter appended to reach vocab_size.

    A table shorter than vocab_size was not padded (older converters) and is kept whole. Scans from the end in
    blocks so that only the padded tail is read."""
    end = table.raw.shape[0]
    if end != vocab_size:
        return end
    while end > 0:
        block = table.rows(max(0, end - 1024), end)
        nonzero = block.ne(0).any(dim=1).nonzero()
        if nonzero.numel():
            return end - block.shape[0] + int(nonzero[-1]) + 1
        end -= block.shape[0]
    return end


def _shared_kv_layers(meta: _Metadata, layers: int) -> set[int]:
    """Gemma 3n layers that reuse another layer's K/V; llama.cpp itself assumes the first 20 layers own theirs."""
    count = meta.get("attention.shared_kv_layers", max(0, layers - 20))
    return set(range(layers - count, layers))


# -- config ------------------------------------------------------------------------------------------------------

def _config_dict(meta: _Metadata, state: GGUFTensors, shared: set[int]) -> dict[str, Any]:
    """An HF config.json-style dict (model_type gemma3_text / gemma3n_text) from metadata and tensor shapes."""
    layers = meta.get("block_count")
    heads = meta.get("attention.head_count")
    hidden = meta.get("embedding_length")
    head_dim = meta.get("attention.key_length", hidden // heads)
    window = meta.get("attention.sliding_window", 0)
    cfg: dict[str, Any] = dict(
        vocab_size=state.shape("model.embed_tokens.weight")[0],
        hidden_size=hidden,
        num_hidden_layers=layers,
        intermediate_size=meta.get("feed_forward_length"),
        num_attention_heads=heads,
        num_key_value_heads=meta.get("attention.head_count_kv", heads),
        head_dim=head_dim,
        layer_types=_layer_types(meta, layers, window),
        rms_norm_eps=meta.get_float("attention.layer_norm_rms_epsilon", 1e-6),
        max_position_embeddings=meta.get("context_length"),
        final_logit_softcapping=meta.get_float("final_logit_softcapping"),
        rope_parameters=_rope_parameters(meta),
        tie_word_embeddings="lm_head.weight" not in state,
        **_token_ids(meta),
    )
    if window:
        cfg["sliding_window"] = window
    if meta.arch == G3:
        cfg.update(model_type="gemma3_text", attn_logit_softcapping=meta.get_float("attn_logit_softcapping"),
                   # llama.cpp's rule (after gemma_pytorch): only the 27B scales by hidden / heads.
                   query_pre_attn_scalar=hidden // heads if layers == 62 else head_dim)
    else:
        cfg.update(_gemma3n_fields(meta, state, len(shared)))
    return cfg


def _gemma3n_fields(meta: _Metadata, state: GGUFTensors, shared: int) -> dict[str, Any]:
    # The converter stores each layer's sparsity as the normal quantile z = icdf(p) (-inf for p = 0); invert it,
    # rounded to 6 decimals because z went through float32 (0.95 comes back as 0.9499999997).
    sparsity = [0.0 if math.isinf(z) else round(0.5 * math.erfc(-z / math.sqrt(2)), 6)
                for z in meta.get("activation_sparsity_scale")]
    return dict(
        model_type="gemma3n_text",
        vocab_size_per_layer_input=state.shape(PLE_NAME)[0],
        hidden_size_per_layer_input=meta.get("embedding_length_per_layer_input"),
        num_kv_shared_layers=shared,
        activation_sparsity_pattern=sparsity,
        laurel_rank=state.shape("model.layers.0.laurel.linear_left.weight")[0],
        altup_num_inputs=meta.get("altup.num_inputs"),
        altup_active_idx=meta.get("altup.active_idx", 0),
        altup_correct_scale="model.layers.0.altup.correct_output_scale" in state,
    )


def _layer_types(meta: _Metadata, layers: int, window: int) -> list[str]:
    """Per-layer attention type: an explicit bool array, a period, or llama.cpp's per-architecture default."""
    if meta.arch == G3 and not window:
        return [FULL] * layers  # llama.cpp: no sliding window key means no sliding layers
    pattern = meta.get("attention.sliding_window_pattern", 6 if meta.arch == G3 else 5)
    if isinstance(pattern, list):
        if len(pattern) != layers:
            raise GGUFError(f"{meta.path}: sliding_window_pattern has {len(pattern)} entries for {layers} layers")
        return [SLIDING if s else FULL for s in pattern]
    return [FULL if (i + 1) % pattern == 0 else SLIDING for i in range(layers)]


def _rope_parameters(meta: _Metadata) -> dict[str, dict[str, Any]]:
    """transformers' per-type rope_parameters; linear scaling applies to the global layers only (as in both
    transformers and llama.cpp, whose sliding layers keep scale 1)."""
    full: dict[str, Any] = {"rope_type": "default", "rope_theta": meta.get_float("rope.freq_base", 1_000_000.0)}
    kind = meta.get("rope.scaling.type", "none")
    if kind == "linear":
        full = {**full, "rope_type": "linear", "factor": meta.get_float("rope.scaling.factor", ...)}
    elif kind != "none":
        raise GGUFError(f"{meta.path}: RoPE scaling type '{kind}' is not supported (Gemma uses only 'linear')")
    sliding = {"rope_type": "default", "rope_theta": meta.get_float("rope.freq_base_swa", 10_000.0)}
    return {FULL: full, SLIDING: sliding}


def _token_ids(meta: _Metadata) -> dict[str, Any]:
    """bos / eos / pad ids. Some published Gemma GGUFs (the 270M Q4_K_M one among them) say bos = pad = 1, which
    is <eos>; when the vocabulary has Gemma's own <bos> / <eos> / <pad> pieces, the piece wins."""
    tokens = meta.fields.get("tokenizer.ggml.tokens")
    ids = {}
    for name, key, piece in (("bos_token_id", "bos_token_id", "<bos>"), ("eos_token_id", "eos_token_id", "<eos>"),
                             ("pad_token_id", "padding_token_id", "<pad>")):
        ids[name] = _piece_id(tokens, meta.raw(f"tokenizer.ggml.{key}", None), piece)
    eot = meta.raw("tokenizer.ggml.eot_token_id", None)
    if eot is not None and ids["eos_token_id"] is not None and eot != ids["eos_token_id"]:
        ids["eos_token_id"] = [ids["eos_token_id"], eot]  # llama.cpp stops on end-of-turn as well
    return {k: v for k, v in ids.items() if v is not None}


def _piece_id(tokens, stated: int | None, piece: str) -> int | None:
    if tokens is None or (stated is not None and stated < len(tokens) and tokens[stated] == piece):
        return stated
    for i in range(min(len(tokens), 1024)):  # Gemma's special pieces sit at the start of the vocabulary
        if tokens[i] == piece:
            return i
    return stated
