"""A decode step of the whole decoder stack in one native call (kernels/decode_step.c).

A decode step of the eager layers is ~1,500 (Gemma 3 270M) to ~4,500 (Gemma 3n E2B) small PyTorch ops, and on a
laptop CPU their dispatch costs as much as the matrix products themselves. For a step of one new token per row,
`NativeDecoder` runs every layer in C instead: the same equations, the products on the weights as stored (the
kernels the eager modules call), the rest in float32. The embeddings, the per-layer inputs, the AltUp stream
set-up and collapse, the final norm and the head stay the eager code, and so do prefill and everything the native
step does not describe (another device, a float16 cache, a module kind it does not know): those run the eager
layers, which stay the reference (tests/model/test_native_decode.py compares the two).

Turn it off with GEMMA3N_NATIVE_DECODE=0 or `set_enabled(False)`; it is also off without the native library.
"""
from __future__ import annotations

import ctypes
import os

import torch
from torch import Tensor, nn

from .. import kernels
from ..config import SLIDING, Gemma3TextConfig, TextConfig
from .batch_cache import BatchCache
from .cache import KVCache, Step
from ..quant.gguf_modules import GGUFLinear
from ..quant.modules import Int4Linear, Int8Linear

_enabled = os.environ.get("GEMMA3N_NATIVE_DECODE", "1") != "0"

L_NONE, L_GGUF, L_INT8, L_INT4, L_FLOAT_T = range(5)
_FLOAT_TYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 30}  # GGUF type ids of float rows
_CACHE_TYPES = {torch.float32: 0, torch.bfloat16: 2}  # the scale-type ids decode_step.c reads caches with
_c_void_p = ctypes.c_void_p


def set_enabled(enabled: bool) -> None:
    """Use (True, the default) or bypass the native decode step for the next caches."""
    global _enabled
    _enabled = bool(enabled)


def enabled() -> bool:
    return _enabled


class _Lin(ctypes.Structure):
    _fields_ = [("kind", ctypes.c_int32), ("type", ctypes.c_int32), ("w", _c_void_p), ("s", _c_void_p),
                ("n", ctypes.c_int64), ("k", ctypes.c_int64), ("g", ctypes.c_int64), ("group", ctypes.c_int32)]


# what a step's profile (NativeDecoder.profile) adds up: the products by group, attention, the whole native call
PROFILE = ("attention projections", "MLP", "AltUp, LAuReL, per-layer input", "attention over the cache",
           "native call")
_GROUP = {"q": 0, "k": 0, "v": 0, "o": 0, "gate": 1, "up": 1, "down": 1}


_LINS = ("q", "k", "v", "o", "gate", "up", "down", "laurel_left", "laurel_right", "router", "pred", "corr",
         "ple_gate", "ple_proj")
_NORMS = ("in_norm", "post_attn_norm", "pre_ffw_norm", "post_ffw_norm", "q_norm", "k_norm", "laurel_norm",
          "router_norm", "out_scale", "ple_norm")


class _Layer(ctypes.Structure):
    _fields_ = [(name, _Lin) for name in _LINS] + [(name, _c_void_p) for name in _NORMS] + [
        ("kind", ctypes.c_int32), ("slot", ctypes.c_int32), ("writes", ctypes.c_int32), ("sparse", ctypes.c_int32),
        ("sparse_skip", ctypes.c_int32), ("z", ctypes.c_float)]


class _Model(ctypes.Structure):
    _fields_ = [(name, ctypes.c_int32) for name in ("arch", "n_layers", "d", "heads", "kv_heads", "hd", "streams",
                                                     "ple_dim")] + \
               [("eps", ctypes.c_float), ("attn_scale", ctypes.c_float), ("router_scale", ctypes.c_float),
                ("layers", ctypes.POINTER(_Layer))]


class _Step(ctypes.Structure):
    _fields_ = [("batch", ctypes.c_int64), ("x", _c_void_p), ("ple", _c_void_p),
                ("cos", _c_void_p * 2), ("sin", _c_void_p * 2), ("mask", _c_void_p * 2),
                ("tk", ctypes.c_int64 * 2), ("cell", _c_void_p * 2),
                ("k", _c_void_p), ("v", _c_void_p), ("cap", _c_void_p),
                ("cache_type", ctypes.c_int32), ("threads", ctypes.c_int32), ("q8", ctypes.c_int32),
                ("vec", ctypes.c_int32), ("prof", _c_void_p)]


class Unsupported(Exception):
    """Something in the model that the native step does not describe; the eager layers run instead."""


class NativeDecoder:
    """The native description of one model's layers (for one cache, made at its first decode step: `for_step`);
    `bind` points it at the cache's tensors, `run` does a step. It is taken from the modules as they are at that
    step: weights changed in place are seen, modules replaced (or hooks added) later in the same cache's life are
    not, and the next cache describes the model afresh."""

    def __init__(self, text_model: nn.Module):
        self.keep: list[Tensor] = []  # every tensor a pointer below refers to stays alive with this object
        cfg = text_model.config
        # the decoder is told apart by its config (importing the decoders here would make an import circle)
        offset = text_model.norm.offset  # Gemma 3 multiplies by 1 + w, Gemma 3n by w
        if type(cfg) is TextConfig:
            arch, streams, ple_dim = 4, cfg.altup_num_inputs, cfg.hidden_size_per_layer_input
            producer_of = cfg.kv_producer
            attn_scale = 1.0
            router_scale = _as_model_dtype(1.0 / cfg.hidden_size, text_model.norm.weight.dtype)
        elif type(cfg) is Gemma3TextConfig:
            arch, streams, ple_dim = 3, 1, 0
            producer_of = list(range(cfg.num_hidden_layers))
            attn_scale, router_scale = cfg.query_pre_attn_scalar ** -0.5, 0.0
        else:
            raise Unsupported(f"{type(text_model).__name__}")
        if cfg.head_dim > 1024 or cfg.head_dim % 2 or streams > 16:  # decode_step.c's fixed-size buffers
            raise Unsupported(f"head_dim {cfg.head_dim} / {streams} AltUp streams")
        dtype = text_model.norm.weight.dtype
        layers = (_Layer * cfg.num_hidden_layers)()
        for i, layer in enumerate(text_model.layers):
            attn, mlp, desc = layer.self_attn, layer.mlp, layers[i]
            desc.kind, desc.slot, desc.writes = _kind(layer.kind), producer_of[i], int(producer_of[i] == i)
            desc.q, desc.o = self._lin(attn.q_proj), self._lin(attn.o_proj)
            desc.q_norm = self._norm(attn.q_norm, offset)
            if desc.writes:
                desc.k, desc.v, desc.k_norm = self._lin(attn.k_proj), self._lin(attn.v_proj), \
                    self._norm(attn.k_norm, offset)
            desc.gate, desc.up, desc.down = self._lin(mlp.gate_proj), self._lin(mlp.up_proj), self._lin(mlp.down_proj)
            if desc.down.kind == L_FLOAT_T and not (mlp.sparsity > 0 and mlp.sparse_decode):
                raise Unsupported("a transposed down projection outside a sparse MLP")
            desc.sparse = int(mlp.sparsity > 0)
            desc.sparse_skip = mlp.SPARSE_MAX_TOKENS if mlp.sparsity > 0 and mlp.sparse_decode else 0
            desc.z = _as_model_dtype(mlp.z, dtype)
            desc.in_norm = self._norm(layer.input_layernorm, offset)
            desc.post_attn_norm = self._norm(layer.post_attention_layernorm, offset)
            desc.pre_ffw_norm = self._norm(layer.pre_feedforward_layernorm, offset)
            desc.post_ffw_norm = self._norm(layer.post_feedforward_layernorm, offset)
            if arch == 4:
                desc.laurel_left, desc.laurel_right = self._lin(layer.laurel.linear_left), \
                    self._lin(layer.laurel.linear_right)
                desc.laurel_norm = self._norm(layer.laurel.post_laurel_norm, 0.0)
                desc.router, desc.router_norm = self._lin(layer.altup.modality_router), \
                    self._norm(layer.altup.router_norm, 0.0)
                desc.pred, desc.corr = self._lin(layer.altup.prediction_coefs), self._lin(layer.altup.correction_coefs)
                desc.out_scale = self._vector(layer.altup.correct_output_scale) if layer.correct_scale else None
                desc.ple_gate, desc.ple_proj = self._lin(layer.per_layer_input_gate), \
                    self._lin(layer.per_layer_projection)
                desc.ple_norm = self._norm(layer.post_per_layer_input_norm, 0.0)
        self.layers = layers
        self.model = _Model(arch=arch, n_layers=cfg.num_hidden_layers, d=cfg.hidden_size,
                            heads=cfg.num_attention_heads, kv_heads=cfg.num_key_value_heads, hd=cfg.head_dim,
                            streams=streams, ple_dim=ple_dim, eps=cfg.rms_norm_eps, attn_scale=attn_scale,
                            router_scale=router_scale, layers=layers)
        for desc in layers:
            for name in _LINS:
                getattr(desc, name).group = _GROUP.get(name, 2)
        self.text_model = text_model
        self.bound: tuple | None = None
        self.profile: Tensor | None = None  # set to torch.zeros(len(PROFILE), dtype=float64) to collect seconds

    def bind(self, cache) -> bool:
        """Point the step at the cache's K/V tensors as they are now (a BatchCache replaces them when rows join or
        leave); False when their dtype, device or layout is not one the native step writes."""
        slots = cache.slot_tensors()
        if any(t.dtype not in _CACHE_TYPES or t.device.type != "cpu" or not t.is_contiguous()
               or t.dtype != slots[0][0].dtype for pair in slots for t in pair):
            return False
        n = len(slots)  # (the cache itself is not held: it holds this object, and must be freed when it ends)
        self.bound = ((_c_void_p * n)(*[k.data_ptr() for k, _ in slots]),
                      (_c_void_p * n)(*[v.data_ptr() for _, v in slots]),
                      (ctypes.c_int64 * n)(*[k.shape[2] for k, _ in slots]), _CACHE_TYPES[slots[0][0].dtype])
        return True

    # -- descriptions ----------------------------------------------------------------------------------------------

    def _hold(self, t: Tensor) -> int:
        if t.device.type != "cpu" or not t.is_contiguous():  # the C code reads plain row-major memory
            raise Unsupported(f"a {'non-contiguous ' if t.device.type == 'cpu' else ''}tensor on {t.device}")
        self.keep.append(t)
        return t.data_ptr()

    def _lin(self, m: nn.Module) -> _Lin:
        if type(m) is nn.Linear and m.bias is None and m.weight.dtype in _FLOAT_TYPES:
            w = m.weight
            n, k = w.shape
            if w.is_contiguous():
                return _Lin(L_GGUF, _FLOAT_TYPES[w.dtype], self._hold(w), None, n, k, 0)
            if w.t().is_contiguous():  # enable_sparse_decode's transposed down projection
                return _Lin(L_FLOAT_T, _FLOAT_TYPES[w.dtype], self._hold(w.t()), None, n, k, 0)
        elif type(m) is GGUFLinear:
            return _Lin(L_GGUF, m.ggml_type, self._hold(m.raw), None, m.raw.shape[0], m.in_features, 0)
        elif type(m) is Int8Linear and m.scales.dtype in kernels.SCALE_TYPES:
            return _Lin(L_INT8, kernels.SCALE_TYPES[m.scales.dtype], self._hold(m.qweight), self._hold(m.scales),
                        m.out_features, m.in_features, 0)
        elif type(m) is Int4Linear and m.scales_and_zeros.dtype in kernels.SCALE_TYPES and m.out_features % 64 == 0:
            return _Lin(L_INT4, kernels.SCALE_TYPES[m.scales_and_zeros.dtype], self._hold(m.qweight),
                        self._hold(m.scales_and_zeros), m.out_features, m.in_features, m.group_size)
        raise Unsupported(f"linear module {m!r}")

    def _norm(self, norm: nn.Module, offset: float) -> int:
        """The scale RMSNorm multiplies by, in float32: w + offset, added as the eager norm adds it."""
        w = norm.weight.float()
        return self._hold((w + torch.tensor(offset, dtype=torch.float32) if offset else w).contiguous())

    def _vector(self, w: Tensor) -> int:
        return self._hold(w.detach().float().contiguous())

    # -- a step ----------------------------------------------------------------------------------------------------

    def run(self, x: Tensor, step: Step, cache, ple: Tensor | None = None) -> Tensor:
        """x: Gemma 3 hidden (B, 1, D) or Gemma 3n streams (S, B, 1, D); ple (B, 1, L, P) -> the same shape, after
        every layer, in x's dtype. `step` is this call's `cache.start(...)`, on the cache `for_step` bound."""
        k_ptrs, v_ptrs, caps, cache_type = self.bound
        b = cache.batch
        work = x.to(torch.float32).contiguous()
        if work.data_ptr() == x.data_ptr():
            work = work.clone()  # computed in place: never write into the caller's tensor
        s = _Step(batch=b, x=work.data_ptr(), k=ctypes.cast(k_ptrs, _c_void_p), v=ctypes.cast(v_ptrs, _c_void_p),
                  cap=ctypes.cast(caps, _c_void_p), cache_type=cache_type, threads=torch.get_num_threads(),
                  q8=int(kernels.activation_precision() == "int8" and kernels.VECTORISED),
                  vec=int(kernels.VECTORISED))
        if self.profile is not None:
            if self.profile.dtype != torch.float64 or self.profile.numel() < len(PROFILE) \
                    or not self.profile.is_contiguous():
                raise ValueError(f"profile must be torch.zeros({len(PROFILE)}, dtype=torch.float64)")
            s.prof = self.profile.data_ptr()
        keep = [work]
        if ple is not None:
            ple = ple.to(torch.float32).contiguous()
            keep.append(ple)
            s.ple = ple.data_ptr()
        cells = cache.write_cells()
        for kind, allowed in step.masks.items():  # the attention types the layers have
            i = _kind(kind)
            cos, sin = self.text_model.rope[kind].tables(step.positions, x.dtype)
            cos, sin = cos.reshape(b, -1).float().contiguous(), sin.reshape(b, -1).float().contiguous()
            mask = allowed.reshape(b, -1).contiguous()
            keep += [cos, sin, mask, cells[i]]
            s.cos[i], s.sin[i], s.mask[i], s.tk[i] = cos.data_ptr(), sin.data_ptr(), mask.data_ptr(), mask.shape[1]
            s.cell[i] = cells[i].data_ptr()
        rc = kernels.native().g3n_decode_step(ctypes.byref(self.model), ctypes.byref(s))
        if rc:
            raise RuntimeError(f"native decode step failed (code {rc})")
        return work if work.dtype == x.dtype else work.to(x.dtype)


def for_step(text_model: nn.Module, cache: KVCache | None, new_tokens: int,
             inputs_embeds: Tensor | None) -> NativeDecoder | None:
    """The native decoder for this forward call, or None where the eager layers run: no cache (or a cache that is
    neither a KVCache nor the server's BatchCache), more than one new column, a multimodal merge, a batch wider
    than the native kernels take, autograd on, the step disabled, or a model it does not describe. Built once per
    cache (at its first decode step) and kept on it."""
    if not _enabled or type(cache) not in (KVCache, BatchCache) or new_tokens != 1 or inputs_embeds is not None \
            or cache.batch > kernels.MAX_ROWS or torch.is_grad_enabled() or kernels.native() is None:
        return None
    held = getattr(cache, "native_decoder", None)
    if held is None or held[0] is not text_model:
        try:
            decoder = NativeDecoder(text_model)
        except Unsupported:
            decoder = None
        held = cache.native_decoder = (text_model, decoder)
    decoder = held[1]
    return decoder if decoder is not None and decoder.bind(cache) else None


def _kind(kind: str) -> int:
    return 0 if kind == SLIDING else 1


def _as_model_dtype(value: float, dtype: torch.dtype) -> float:
    """A Python float constant as the eager code holds it: rounded to the compute dtype."""
    return float(torch.tensor(value, dtype=dtype))
