"""A MatFormer slice of a Gemma 3n checkpoint: the spec (layers skipped + one FFN width per kept layer), its checks
against the checkpoint's own config, the rewritten config and the parameter counts.

Every number comes from the config being sliced, never from E4B's: the reserved layers are the producers that the
KV-shared layers read (the last non-shared layer of each attention type), the sparse layers are those of the
config's `activation_sparsity_pattern`, the shared-layer count is recounted from the layers kept.
"""
from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from ..checkpoint.skeleton import uninitialised_meta
from ..config import ConfigError, ModelConfig, TextConfig
from .published import PUBLISHED, Published, find


class MatformerError(ValueError):
    """A slice that cannot be made of this checkpoint (one line, saying why)."""


@dataclass(frozen=True)
class SliceSpec:
    """Which layers to drop (original indices) and the FFN width of each kept layer (None: keep their widths)."""

    layers_skipped: tuple[int, ...] = ()
    ffn_hidden_dims: tuple[int, ...] | None = None
    name: str | None = None  # the published configuration it came from, if any

    def to_dict(self) -> dict:
        out: dict[str, Any] = {"layers_skipped": list(self.layers_skipped)}
        if self.ffn_hidden_dims is not None:
            out["ffn_hidden_dims"] = list(self.ffn_hidden_dims)
        if self.name:
            out["name"] = self.name
        return out


def parse_spec(value) -> SliceSpec:
    """A published name or alias ("Config for E2.54B (layer-level)", "E2B", "E2.98B-block"), a JSON object string,
    a dict {"layers_skipped": [...], "ffn_hidden_dims": [...]} (either may be left out), or a SliceSpec."""
    if isinstance(value, SliceSpec):
        return value
    if isinstance(value, Published):
        return SliceSpec(tuple(value.layers_skipped), tuple(value.ffn_hidden_dims), value.name)
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("{"):
            try:
                value = json.loads(text)
            except json.JSONDecodeError as e:
                raise MatformerError(f"MatFormer spec is not valid JSON ({e.msg} at character {e.pos})") from None
        else:
            row = find(text)
            if row is None:
                raise MatformerError(f"unknown MatFormer configuration {value!r}; `gemma3n slice --list` shows the "
                                     f"published ones, or give {{\"layers_skipped\": [...], \"ffn_hidden_dims\": "
                                     f"[...]}}")
            return parse_spec(row)
    if not isinstance(value, Mapping):
        raise MatformerError(f"a MatFormer spec is a configuration name or a dict, not {type(value).__name__}")
    unknown = sorted(set(value) - {"layers_skipped", "ffn_hidden_dims", "name"})
    if unknown:
        raise MatformerError(f"MatFormer spec: unknown field(s) {unknown}; expected 'layers_skipped' and "
                             f"'ffn_hidden_dims'")
    skipped = _int_list(value.get("layers_skipped") or [], "layers_skipped")
    widths = value.get("ffn_hidden_dims")
    return SliceSpec(tuple(skipped), None if widths is None else tuple(_int_list(widths, "ffn_hidden_dims")),
                     value.get("name"))


def parse_int_list(text: str, field: str) -> list[int]:
    """"20,21,22" (the command line's form) -> [20, 21, 22]; "" -> []."""
    parts = [p.strip() for p in text.replace(" ", ",").split(",") if p.strip()]
    try:
        return [int(p.replace("_", "")) for p in parts]
    except ValueError:
        raise MatformerError(f"{field}: expected comma-separated integers, got {text!r}") from None


def _int_list(value, field: str) -> list[int]:
    if isinstance(value, str):
        return parse_int_list(value, field)
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise MatformerError(f"MatFormer spec: '{field}' must be a list of integers, got {value!r}")
    return list(value)


@dataclass(frozen=True)
class SlicePlan:
    """A checked slice of one text config: which layers stay (original indices, in order) and how wide."""

    spec: SliceSpec
    source: TextConfig
    kept: tuple[int, ...]
    widths: tuple[int, ...]
    text: TextConfig  # the sliced decoder's config

    @property
    def identity(self) -> bool:
        return len(self.kept) == self.source.num_hidden_layers and self.widths == self.source.intermediate_size

    def runs(self) -> list[tuple[int, int]]:
        """The kept layers as runs [a, b) of consecutive original indices."""
        runs: list[tuple[int, int]] = []
        for i in self.kept:
            if runs and runs[-1][1] == i:
                runs[-1] = (runs[-1][0], i + 1)
            else:
                runs.append((i, i + 1))
        return runs

    def new_index(self) -> dict[int, int]:
        return {old: new for new, old in enumerate(self.kept)}

    def text_fields(self) -> dict[str, Any]:
        """The config.json text fields the slice changes."""
        t = self.text
        return {"num_hidden_layers": t.num_hidden_layers, "intermediate_size": list(t.intermediate_size),
                "layer_types": list(t.layer_types), "num_kv_shared_layers": t.num_kv_shared_layers,
                "activation_sparsity_pattern": list(t.activation_sparsity_pattern)}


def reserved_layers(text: TextConfig) -> dict[int, list[int]]:
    """Layer -> the KV-shared layers that read its K/V: the layers a slice must keep."""
    readers: dict[int, list[int]] = {}
    for i in range(text.first_shared_layer, text.num_hidden_layers):
        readers.setdefault(text.kv_producer[i], []).append(i)
    return readers


def plan_slice(config: ModelConfig | TextConfig, spec) -> SlicePlan:
    """Check `spec` against the config and return the plan; MatformerError (one line) when it cannot be made."""
    spec = parse_spec(spec)
    text = config.text if isinstance(config, ModelConfig) else config
    if isinstance(config, ModelConfig) and config.family != "gemma3n":
        raise MatformerError(f"MatFormer slicing applies to Gemma 3n checkpoints; {config.source} is a "
                             f"{config.model_type} model")
    n = text.num_hidden_layers
    where = f" ({spec.name})" if spec.name else ""
    skipped = list(spec.layers_skipped)
    bad = [i for i in skipped if not 0 <= i < n]
    if bad:
        raise MatformerError(f"layers_skipped{where}: layer {bad[0]} is out of range: this checkpoint has {n} layers "
                             f"(0-{n - 1})" + _published_hint(spec, n))
    dupes = sorted({i for i in skipped if skipped.count(i) > 1})
    if dupes:
        raise MatformerError(f"layers_skipped{where}: layer {dupes[0]} is listed twice")
    readers = reserved_layers(text)
    for i in sorted(skipped):
        if i in readers:
            r = readers[i]
            raise MatformerError(
                f"layers_skipped{where}: layer {i} cannot be skipped: it is the last non-shared "
                f"{text.layer_types[i]} layer, whose K/V the shared layers {_span(r)} read (reserved layers: "
                f"{', '.join(map(str, sorted(readers)))})")
    kept = tuple(i for i in range(n) if i not in set(skipped))
    if not kept:
        raise MatformerError(f"layers_skipped{where}: every layer is skipped; at least one must remain")
    widths = tuple(text.intermediate_size[i] for i in kept) if spec.ffn_hidden_dims is None else spec.ffn_hidden_dims
    if len(widths) != len(kept):
        raise MatformerError(
            f"ffn_hidden_dims{where}: {len(widths)} widths given but {len(kept)} layers are kept ({n} - "
            f"{len(skipped)} skipped); give one width per kept layer, in order" + _published_hint(spec, n))
    for new, (old, w) in enumerate(zip(kept, widths)):
        if w <= 0:
            raise MatformerError(f"ffn_hidden_dims{where}: width {w} (kept layer {new}, layer {old} of the checkpoint) "
                                 f"must be positive")
        if w > text.intermediate_size[old]:
            raise MatformerError(
                f"ffn_hidden_dims{where}: width {w} for kept layer {new} (layer {old} of the checkpoint) is larger than "
                f"that layer's width {text.intermediate_size[old]}; a slice can only narrow a layer"
                + _published_hint(spec, n))
    shared_skipped = sum(1 for i in skipped if i >= text.first_shared_layer)
    try:
        sliced = TextConfig(**{**_fields(text), "num_hidden_layers": len(kept), "intermediate_size": tuple(widths),
                               "layer_types": tuple(text.layer_types[i] for i in kept),
                               "activation_sparsity_pattern": tuple(text.activation_sparsity_pattern[i] for i in kept),
                               "num_kv_shared_layers": text.num_kv_shared_layers - shared_skipped})
    except ConfigError as e:  # not expected after the checks above; keep the message
        raise MatformerError(f"the sliced config is not valid: {e}") from None
    # the shared layers that remain must still read the same producers (renumbered)
    index = {old: new for new, old in enumerate(kept)}
    for new, old in enumerate(kept):
        if sliced.kv_producer[new] != index[text.kv_producer[old]]:
            raise MatformerError(f"layers_skipped{where}: layer {old} would read another layer's K/V after slicing")
    return SlicePlan(spec, text, kept, tuple(widths), sliced)


def _fields(text: TextConfig) -> dict:
    from dataclasses import fields
    return {f.name: getattr(text, f.name) for f in fields(text)}


def _span(layers: list[int]) -> str:
    return f"{layers[0]}-{layers[-1]}" if len(layers) > 1 and layers[-1] - layers[0] == len(layers) - 1 \
        else ", ".join(map(str, layers))


def _published_hint(spec: SliceSpec, n: int) -> str:
    row = find(spec.name) if spec.name else None
    if row is None:
        return ""
    return (f"; the published configurations are for Gemma 3n E4B (35 layers, FFN 16384), and this checkpoint "
            f"has {n} layers")


# -- config.json -------------------------------------------------------------------------------------------------

def text_section(data: dict) -> dict:
    """The decoder's part of a config.json dict (nested under text_config for the multimodal layout)."""
    return data["text_config"] if isinstance(data.get("text_config"), dict) else data


def sliced_config_dict(data: Mapping[str, Any], plan: SlicePlan) -> dict:
    """The config.json of the slice: the source's, with the sliced decoder fields and a record of the slice."""
    out = copy.deepcopy(dict(data))
    text_section(out).update(plan.text_fields())
    record = {"layers_skipped": sorted(plan.spec.layers_skipped), "ffn_hidden_dims": list(plan.widths)}
    if plan.spec.name:
        record["name"] = plan.spec.name
    out["matformer_slice"] = record
    return out


def load_config_dict(folder: Path) -> dict:
    try:
        return json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{folder}: no config.json here; pass a Gemma 3n checkpoint folder") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{folder / 'config.json'}: not valid JSON ({e})") from None


# -- parameter counts --------------------------------------------------------------------------------------------

def parameter_counts(config: ModelConfig) -> dict[str, int | None]:
    """Parameters of a Gemma 3n model as its config describes it, counted as Google counts them in the MatFormer
    Lab notebook (transformers' `num_parameters`):

    - text: the decoder, including the K/V projections and k_norm that the KV-shared layers carry in the released
      files (transformers 4.53 built them; gemma3n never reads them), the tied LM head once;
    - effective: text without the token embedding table and the per-layer table (`num_parameters(
      exclude_embeddings=True)` drops every embedding table);
    - total: text + the vision and audio towers and their embedders, each tied table once.
    Also the parts: embed_tokens, per_layer_table, shared_kv (the unused K/V above), vision, audio (towers with
    their embedders; None for a text-only config)."""
    from ..model.text import CausalLM
    text = config.text
    with uninitialised_meta():
        lm = CausalLM(text)
    loaded = sum(p.numel() for p in lm.parameters())
    kv = text.num_key_value_heads * text.head_dim
    shared_kv = text.num_kv_shared_layers * (2 * kv * text.hidden_size + text.head_dim)
    text_total = loaded + shared_kv
    embed = text.vocab_size * text.hidden_size
    ple = text.vocab_size_per_layer_input * text.num_hidden_layers * text.hidden_size_per_layer_input
    vision = audio = None
    if config.vision is not None and config.audio is not None:
        vision, audio = _tower_counts(config)
    total = text_total + (vision or 0) + (audio or 0)
    return {"total": total, "text": text_total, "effective": text_total - embed - ple, "embed_tokens": embed,
            "per_layer_table": ple, "shared_kv": shared_kv, "vision": vision, "audio": audio}


def _tower_counts(config: ModelConfig) -> tuple[int | None, int | None]:
    from ..model.multimodal import Multimodal
    counts = []
    with uninitialised_meta():
        try:
            mm = Multimodal(config)
        except (ConfigError, ValueError, KeyError, TypeError):
            return None, None
        for kind in ("vision", "audio"):
            embedder = sum(p.numel() for p in getattr(mm, f"embed_{kind}").parameters())
            try:
                if kind == "vision":
                    from ..model.vision import build_vision_tower
                    tower = build_vision_tower(dict(config.vision))
                else:
                    from ..model.audio import build_audio_tower
                    tower = build_audio_tower(dict(config.audio))
            except (ConfigError, ValueError, KeyError, TypeError):
                counts.append(None)
                continue
            counts.append(embedder + sum(p.numel() for p in tower.parameters()))
    return counts[0], counts[1]


def describe(plan: SlicePlan, config: ModelConfig) -> dict:
    """The dry-run summary: the spec, the sliced config fields and the parameter counts before and after."""
    from dataclasses import replace
    after = parameter_counts(replace(config, text=plan.text))
    before = parameter_counts(config)
    return {"spec": plan.spec.to_dict() | {"ffn_hidden_dims": list(plan.widths)},
            "kept_layers": list(plan.kept), "config": plan.text_fields(), "parameters": after,
            "source_parameters": before}


__all__ = ["MatformerError", "PUBLISHED", "SlicePlan", "SliceSpec", "describe", "parameter_counts", "parse_spec",
           "plan_slice", "reserved_layers", "sliced_config_dict"]
