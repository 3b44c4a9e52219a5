"""Adapters in PEFT's on-disk format, both ways: adapter_config.json + adapter_model.safetensors whose keys are PEFT's
names for the base checkpoint's own transformers class, e.g.
`base_model.model.model.language_model.layers.3.self_attn.q_proj.lora_A.weight` (Gemma3nForConditionalGeneration)
or `base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight` (Gemma3ForCausalLM, what a Gemma 3 text GGUF
loads as).

Our decoder's module paths are "model.<rest>" (gemma3n.checkpoint.weights); the transformers class puts the decoder
under "model.language_model." when the checkpoint nests its text config (the multimodal classes) and "model."
otherwise (the *ForCausalLM classes).
"""
from __future__ import annotations

import json
import re
from collections import defaultdict
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..config import ModelConfig
from .lora import LoRALinear, decoder_linears, inject, merge_into

CONFIG_NAME, WEIGHTS_NAME = "adapter_config.json", "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
_NESTED_TYPES = ("gemma3n", "gemma3")  # model_type values whose transformers class is *ForConditionalGeneration
_DECODER_PREFIXES = ("model.language_model.", "language_model.model.", "model.")
_TOWER_PARTS = ("vision_tower", "audio_tower", "embed_vision", "embed_audio", "multi_modal_projector")
# transformers keeps K/V projections in the layers that read another layer's cache; they never run there
_SHARED_KV = re.compile(r"model\.layers\.(\d+)\.self_attn\.(k_proj|v_proj)$")


def transformers_class(config: ModelConfig) -> str:
    """The transformers class a checkpoint of this config loads as (what PEFT's names follow)."""
    family = "Gemma3n" if config.family == "gemma3n" else "Gemma3"
    nested = config.model_type in _NESTED_TYPES
    return f"{family}ForConditionalGeneration" if nested else f"{family}ForCausalLM"


def decoder_prefix(config: ModelConfig) -> str:
    return "model.language_model." if config.model_type in _NESTED_TYPES else "model."


def external_name(config: ModelConfig):
    """Our path -> the module's name in the transformers class."""
    prefix = decoder_prefix(config)
    return lambda path: prefix + path.removeprefix("model.")


def internal_name(name: str) -> str:
    """A module name from a PEFT key (base_model.model. stripped) -> our path; towers are refused."""
    if any(part in name.split(".") for part in _TOWER_PARTS):
        raise ValueError(f"adapter layer {name!r} sits in a vision / audio tower; gemma3n applies adapters to the "
                         f"text decoder only")
    for prefix in _DECODER_PREFIXES:
        if name.startswith(prefix):
            return "model." + name[len(prefix):]
    raise ValueError(f"adapter layer {name!r} is not in the text decoder (expected a name under "
                     f"{' or '.join(_DECODER_PREFIXES)})")


def target_regex(names: list[str]) -> str:
    """A regular expression that matches exactly these module names in full (PEFT fullmatches a string
    target_modules): names that differ only in their layer index share one alternative."""
    groups: dict[tuple[str, str], list[int]] = defaultdict(list)
    singles = []
    for name in names:
        m = re.fullmatch(r"(.*\.layers\.)(\d+)(\..*)", name)
        if m:
            groups[(m.group(1), m.group(3))].append(int(m.group(2)))
        else:
            singles.append(re.escape(name))
    parts = [f"{re.escape(head)}(?:{'|'.join(map(str, sorted(layers)))}){re.escape(tail)}"
             for (head, tail), layers in sorted(groups.items())]
    return "|".join(sorted(singles) + parts)


def save_adapter(folder: str | Path, lm: nn.Module, config: ModelConfig, base_model: str, rank: int, alpha: float,
                 dropout: float, use_rslora: bool = False) -> Path:
    """Write the LoRA wrappers of `lm` as a PEFT adapter folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    name_of = external_name(config)
    tensors, names = {}, []
    for path, module in lm.named_modules():
        if isinstance(module, LoRALinear):
            name = name_of(path)
            names.append(name)
            for part in ("lora_A", "lora_B"):
                weight = getattr(module, part).weight.detach()
                tensors[f"{PEFT_PREFIX}{name}.{part}.weight"] = weight.to("cpu", torch.float32).contiguous()
    if not tensors:
        raise ValueError("the model carries no LoRA layers to save")
    save_file(tensors, str(folder / WEIGHTS_NAME), metadata={"format": "pt"})
    adapter_config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": str(base_model),
        "r": rank, "lora_alpha": alpha, "lora_dropout": dropout, "target_modules": target_regex(names),
        "bias": "none", "fan_in_fan_out": False, "use_rslora": use_rslora, "use_dora": False,
        "init_lora_weights": True, "inference_mode": True, "modules_to_save": None, "layers_to_transform": None,
        "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {},
        "auto_mapping": {"base_model_class": transformers_class(config), "parent_library": "transformers"},
    }
    (folder / CONFIG_NAME).write_text(json.dumps(adapter_config, indent=2) + "\n")
    return folder


def read_adapter(folder: str | Path) -> tuple[dict, dict[str, dict[str, torch.Tensor]]]:
    """(adapter_config, {module name in the transformers class: {"lora_A": A, "lora_B": B}}), checked."""
    folder = Path(folder).expanduser()
    config_file, weights_file = folder / CONFIG_NAME, folder / WEIGHTS_NAME
    if not config_file.exists():
        raise FileNotFoundError(f"{folder}: no {CONFIG_NAME} here; pass a PEFT LoRA adapter folder "
                                f"(as `gemma3n finetune` or PEFT's save_pretrained write it)")
    if not weights_file.exists():
        legacy = folder / "adapter_model.bin"
        hint = " (adapter_model.bin is a pickle; re-save it with safe_serialization=True)" if legacy.exists() else ""
        raise FileNotFoundError(f"{folder}: no {WEIGHTS_NAME}{hint}")
    try:
        cfg = json.loads(config_file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{config_file}: not valid JSON ({e})") from None
    if str(cfg.get("peft_type", "")).upper() != "LORA":
        raise ValueError(f"{config_file}: peft_type {cfg.get('peft_type')!r} is not supported; only LORA adapters are")
    for key, allowed, what in (("use_dora", (False, None), "DoRA"), ("bias", ("none", None), "trained biases"),
                               ("modules_to_save", (None, []), "fully trained modules (modules_to_save)"),
                               ("fan_in_fan_out", (False, None), "fan_in_fan_out")):
        if cfg.get(key) not in allowed:
            raise ValueError(f"{config_file}: {what} ({key}={cfg.get(key)!r}) is not supported; gemma3n applies "
                             f"plain LoRA (A, B, scaling) to linear layers")
    layers: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
    for key, tensor in load_file(str(weights_file)).items():
        m = re.fullmatch(r"base_model\.model\.(.+)\.(lora_A|lora_B)(?:\.[^.]+)?\.weight", key)
        if m is None:
            raise ValueError(f"{weights_file}: tensor {key!r} is not a LoRA A/B weight of a linear layer "
                             f"(embedding adapters and other PEFT methods are not supported)")
        layers[m.group(1)][m.group(2)] = tensor
    for name, pair in layers.items():
        if set(pair) != {"lora_A", "lora_B"}:
            raise ValueError(f"{weights_file}: layer {name!r} has only {', '.join(pair)}")
    if not layers:
        raise ValueError(f"{weights_file}: holds no LoRA weights")
    return cfg, dict(layers)


def _pattern_value(patterns: dict, name: str, default):
    """PEFT's rank_pattern / alpha_pattern: the first key that matches the end of the module name."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?{key}$", name):
            return value
    return default


def adapter_layers(folder: str | Path) -> list[tuple[str, str, torch.Tensor, torch.Tensor, int, float, bool]]:
    """(name in the transformers class, our path, A, B, rank, alpha, use_rslora) of each adapted layer."""
    cfg, layers = read_adapter(folder)
    out = []
    for name, pair in sorted(layers.items()):
        a, b = pair["lora_A"], pair["lora_B"]
        rank = _pattern_value(cfg.get("rank_pattern"), name, cfg.get("r", a.shape[0]))
        alpha = _pattern_value(cfg.get("alpha_pattern"), name, cfg.get("lora_alpha", rank))
        if a.shape[0] != rank or b.shape[1] != rank:
            raise ValueError(f"{folder}: {name} has A {tuple(a.shape)} and B {tuple(b.shape)}, not of rank {rank} "
                             f"as adapter_config.json says")
        out.append((name, internal_name(name), a, b, rank, alpha, bool(cfg.get("use_rslora", False))))
    return out


def is_unused_shared_kv(path: str) -> bool:
    """K/V projections of layers that read another layer's cache: transformers has them, they never run."""
    return _SHARED_KV.fullmatch(path) is not None


def check_fits(folder, name: str, base: nn.Module, a: torch.Tensor, b: torch.Tensor) -> None:
    """Refuse an adapter layer whose A / B do not match the model's linear."""
    if a.shape[1] != base.in_features or b.shape[0] != base.out_features:
        raise ValueError(f"{folder}: {name} has A {tuple(a.shape)} and B {tuple(b.shape)}, but the model's layer "
                         f"is [{base.out_features}, {base.in_features}]; the adapter does not fit this base model")


def fitting_layers(folder: str | Path, linears: dict[str, nn.Module], label):
    """The adapter's layers (PEFT name, our path, A, B, rank, alpha, rslora) that this model runs, each checked
    against its base linear; K/V projections of layers that share another layer's cache are skipped (they exist in
    transformers' modules but never run there either). `label` names the adapter in errors."""
    for name, path, a, b, rank, alpha, rslora in adapter_layers(folder):
        if path not in linears:
            if is_unused_shared_kv(path):
                continue
            raise ValueError(f"{label}: the adapter targets {name!r}, which this model does not have; was it "
                             f"trained for another base model?")
        check_fits(label, name, linears[path], a, b)
        yield name, path, a, b, rank, alpha, rslora


def attach_adapter(lm: nn.Module, folder: str | Path) -> dict[str, LoRALinear]:
    """Wrap the decoder linears that the adapter names in LoRALinear modules holding its weights; returns
    our path -> wrapper. Weights of K/V projections in layers that share another layer's cache are skipped (they
    exist in transformers' modules but never run there either)."""
    wrappers = {}
    for name, path, a, b, rank, alpha, rslora in fitting_layers(folder, decoder_linears(lm), folder):
        wrapper = inject(lm, [path], rank, alpha, 0.0, rslora)[path]
        with torch.no_grad():
            wrapper.lora_A.weight.copy_(a)
            wrapper.lora_B.weight.copy_(b)
        wrappers[path] = wrapper.requires_grad_(False)
    return wrappers


def apply_adapter(lm: nn.Module, folder: str | Path, config: ModelConfig) -> dict[str, str]:
    """Apply a PEFT LoRA adapter to a loaded causal LM: merged into float weights, kept beside quantised ones
    (int8 / int4 / GGUF blocks), so the quantised weights stay as stored. Returns path -> "merged" | "beside".
    The adapter's names may follow the multimodal class or the *ForCausalLM one: both name the same decoder."""
    del config  # the names are resolved from the adapter's own keys; kept so the loader passes what it has
    how = {}
    for path, wrapper in attach_adapter(lm, folder).items():
        how[path] = "merged" if merge_into(lm, path, wrapper) else "beside"
    return how
