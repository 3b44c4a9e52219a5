"""Which module gets which format, and the module swap that applies it.

A scheme names a format per component, like the ONNX release's dtype map: {"embeddings": "int8",
"decoder": "int4", "audio": "int8", "vision": "float16"}. The string "int4" means int4 for the decoder's linear
layers and int8 for everything else (the embedding doubles as the LM head, whose errors reach every logit
directly); "int8" means int8 everywhere. Tiny matrices (AltUp coefficients and router, under 64 rows or columns)
stay in float: quantising them saves nothing and they steer every token.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Callable, Mapping

import torch
from torch import nn

from ..checkpoint.skeleton import uninitialised_meta
from .formats import GROUP_SIZES, int4_supported
from .modules import BiasedLinear, Int4Embedding, Int4Linear, Int8Embedding, Int8Linear

INT8, INT4, KEEP = "int8", "int4", "none"
FLOATS = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
MIN_FEATURES = 64  # linears with fewer input or output features stay in float
DEFAULT_GROUP_SIZE = 64


@dataclass(frozen=True)
class QuantScheme:
    """Format per component: "int8", "int4" (linears only), a float dtype name (towers only) or "none"."""

    embeddings: str = INT8
    decoder: str = INT4
    audio: str = INT8
    vision: str = INT8
    group_size: int = DEFAULT_GROUP_SIZE

    def __post_init__(self):
        allowed = {"embeddings": {INT8, INT4, KEEP}, "decoder": {INT8, INT4, KEEP},
                   "audio": {INT8, INT4, KEEP, *FLOATS}, "vision": {INT8, INT4, KEEP, *FLOATS}}
        for name, options in allowed.items():
            if getattr(self, name) not in options:
                raise ValueError(f"quantization scheme: {name}={getattr(self, name)!r} is not supported; "
                                 f"use one of {sorted(options)}")
        if self.group_size not in GROUP_SIZES:
            raise ValueError(f"quantization scheme: group_size {self.group_size} is not supported; use one of "
                             f"{GROUP_SIZES}")

    def to_dict(self) -> dict:
        return asdict(self)


def parse_scheme(value) -> QuantScheme:
    """"int8", "int4", "int4-g32" (group size), a dict of components (+ "group_size"), or a QuantScheme."""
    if isinstance(value, QuantScheme):
        return value
    if isinstance(value, dict):
        known = {f.name for f in fields(QuantScheme)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise ValueError(f"quantization scheme: unknown component(s) {unknown}; known: {sorted(known)}")
        return QuantScheme(**value)
    if isinstance(value, str):
        name, _, group = value.lower().partition("-g")
        group_size = int(group) if group.isdigit() else DEFAULT_GROUP_SIZE
        if name == INT8 and not group:
            return QuantScheme(INT8, INT8, INT8, INT8)
        if name == INT4 and (not group or group.isdigit()):
            return QuantScheme(INT8, INT4, INT8, INT8, group_size)
    raise ValueError(f"quantization scheme {value!r} is not supported; use 'int8', 'int4', 'int4-g32' "
                     f"(group size 32/64/128/256) or a dict like {{'decoder': 'int4', 'embeddings': 'int8'}}")


# Module path prefixes -> component, most specific first. Paths are those of the loaded modules: the text
# decoder's ("model.embed_tokens", "model.layers.3.mlp.up_proj") and, when present, the towers'.
_COMPONENTS = (("model.embed_tokens_per_layer", None),  # PLE rows are gathered from the file, never resident
               ("model.embed_tokens", "embeddings"), ("model.vision_tower", "vision"), ("vision_tower", "vision"),
               ("model.embed_vision", "vision"), ("model.audio_tower", "audio"), ("audio_tower", "audio"),
               ("model.embed_audio", "audio"), ("model", "decoder"))


def component_of(path: str) -> str | None:
    """The scheme component a module path belongs to (None: never quantised)."""
    for prefix, component in _COMPONENTS:
        if path == prefix or path.startswith(prefix + "."):
            return component
    return None


def plan(model: nn.Module, scheme: QuantScheme) -> dict[str, str]:
    """Module path -> "int8" / "int4" for every module the scheme quantises."""
    chosen = {}
    for path, module in model.named_modules():
        component = component_of(path)
        fmt = getattr(scheme, component) if component else KEEP
        kind = module_format(module, fmt, scheme.group_size)
        if kind is not None:
            chosen[path] = kind
    return chosen


def module_format(module: nn.Module, fmt: str, group_size: int) -> str | None:
    """The format one module gets under a component format (None: left as it is)."""
    if fmt not in (INT8, INT4):
        return None
    if isinstance(module, nn.Embedding):
        fits = int4_supported(module.num_embeddings, module.embedding_dim, group_size)
        return INT4 if fmt == INT4 and fits else INT8
    if type(module) is not nn.Linear or module.bias is not None:
        return None
    if min(module.in_features, module.out_features) < MIN_FEATURES:
        return None
    if fmt == INT4 and int4_supported(module.out_features, module.in_features, group_size):
        return INT4
    return INT8  # int4 asked but the shape does not fit its layout: int8 is the nearest that does


def apply_plan(model: nn.Module, chosen: dict[str, str], group_size: int,
               release: Callable[[str], None] | None = None,
               weights: Callable[[str], torch.Tensor] | None = None) -> nn.Module:
    """Replace each planned module by its quantised version, quantising its current weight.

    A module on the meta device gets an empty quantised skeleton of the right shapes (for loading a quantised
    checkpoint by assignment), unless `weights(path)` supplies its float weight (a loader that produces weights
    one at a time). `release(path)` is told when a module's float weight is no longer needed."""
    for path, kind in chosen.items():
        old = model.get_submodule(path)
        weight = old.weight if weights is None else weights(path)
        if weight.is_meta:
            new = _skeleton(old, kind, group_size, weight.dtype)
        elif isinstance(old, nn.Embedding):
            new = (Int4Embedding.from_weight(weight.detach(), group_size) if kind == INT4
                   else Int8Embedding.from_weight(weight.detach()))
        else:
            new = (Int4Linear.from_weight(weight.detach(), group_size) if kind == INT4
                   else Int8Linear.from_weight(weight.detach()))
        _set_submodule(model, path, new)
        if release is not None and not weight.is_meta:
            release(path)
    return model


def plan_for(build: Callable[[], nn.Module], scheme) -> tuple[dict[str, str], QuantScheme | None]:
    """The plan a scheme gives a model, computed on a skeleton built on the meta device ({} for no scheme)."""
    if scheme is None:
        return {}, None
    scheme = parse_scheme(scheme)
    with uninitialised_meta():
        return plan(build(), scheme), scheme


def deferred_tensors(tensors, deferred: dict[str, str]):
    """A view of a checkpoint mapping in which the `deferred` names are meta placeholders of the right shape:
    the loader assigns them nothing, and they are produced one at a time later (quantised, or row-gathered)."""
    return _Deferred(tensors, deferred)


class _Deferred(Mapping):
    def __init__(self, tensors, deferred):
        self.tensors, self.deferred = tensors, deferred

    def __getitem__(self, name):
        if name in self.deferred:  # the placeholder's dtype does not matter: it is replaced, never read
            return torch.empty(self.tensors.shape(name), device="meta")
        return self.tensors[name]

    def __contains__(self, name) -> bool:  # (Mapping's would produce the tensor)
        return name in self.tensors

    def __iter__(self):
        return iter(self.tensors)

    def __len__(self):
        return len(self.tensors)


def quantize_model(model: nn.Module, scheme, release: Callable[[str], None] | None = None) -> nn.Module:
    """Swap the model's layers for quantised ones under `scheme` (see parse_scheme). In place; returns it."""
    scheme = parse_scheme(scheme)
    return apply_plan(model, plan(model, scheme), scheme.group_size, release)


def quantize_module(module: nn.Module, fmt: str, group_size: int = DEFAULT_GROUP_SIZE) -> nn.Module:
    """Quantise any module (an encoder tower): every nn.Linear of at least 64x64 becomes int8 / int4 (a biased one
    keeps its bias in float around the quantised product); a float format name converts the module instead
    ("none" leaves it)."""
    if fmt in FLOATS:
        return module.to(FLOATS[fmt])
    if fmt in (INT8, INT4):
        for path, m in list(module.named_modules()):
            if path and type(m) is nn.Linear and m.bias is not None and \
                    min(m.in_features, m.out_features) >= MIN_FEATURES:
                _set_submodule(module, path, BiasedLinear.split(m))
    chosen = {path: kind for path, m in module.named_modules()
              if path and (kind := module_format(m, fmt, group_size)) is not None}
    return apply_plan(module, chosen, group_size)


def _skeleton(old: nn.Module, kind: str, group_size: int, dtype: torch.dtype) -> nn.Module:
    with uninitialised_meta():
        if isinstance(old, nn.Embedding):
            if kind == INT4:
                return Int4Embedding(old.num_embeddings, old.embedding_dim, group_size, dtype)
            return Int8Embedding(old.num_embeddings, old.embedding_dim, dtype)
        if kind == INT4:
            return Int4Linear(old.in_features, old.out_features, group_size, dtype)
        return Int8Linear(old.in_features, old.out_features, dtype)


def _set_submodule(model: nn.Module, path: str, new: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, name, new)
