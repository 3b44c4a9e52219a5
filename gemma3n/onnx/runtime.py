"""Running a transformers.js-layout ONNX folder (ours or a published one) with onnxruntime, behind the same
interface as the torch decoder, so that gemma3n.load, the engine, the CLI and the server take it unchanged.

The engine's caches (gemma3n.model.cache.KVCache for a prefill, model.batch_cache.BatchCache for the decode
batch) hold the K/V: each call feeds the decoder session the keys a row has so far as `past_key_values.*`, with
an `attention_mask` marking the real columns, and writes the new columns of `present.*` back. The sliding window
is applied inside the graph (from positions), so the caches keep every key ("full_attention" slots).
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from ..config import FULL, ConfigError, ModelConfig
from ..model.batch_cache import BatchCache
from ..model.cache import KVCache
from ..model.multimodal import scatter_soft_tokens
from .dtypes import SUFFIXES

EMBED, DECODER, VISION, AUDIO = "embed_tokens", "decoder_model_merged", "vision_encoder", "audio_encoder"
# What each session must declare (transformers.js feeds exactly these names).
REQUIRED_INPUTS = {EMBED: ("input_ids",), DECODER: ("inputs_embeds", "per_layer_inputs", "attention_mask"),
                   VISION: ("pixel_values",), AUDIO: ("input_features", "input_features_mask")}
REQUIRED_OUTPUTS = {EMBED: ("inputs_embeds", "per_layer_inputs"), DECODER: ("logits",),
                    VISION: ("image_features",), AUDIO: ("audio_features",)}
_PAST = re.compile(r"past_key_values\.(\d+)\.(key|value)$")
_NUMPY_OF_ORT = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64,
                 "tensor(bool)": np.bool_, "tensor(int32)": np.int32}


class OnnxFolderError(ValueError):
    """An ONNX folder that cannot be run: a missing session, unexpected names, an unreadable file."""


def is_onnx_folder(path: Path) -> bool:
    """A folder in the transformers.js layout: onnx/ with a decoder, and no safetensors weights beside it."""
    path = Path(path)
    return (path.is_dir() and (path / "onnx").is_dir() and any((path / "onnx").glob(f"{DECODER}*.onnx"))
            and not any(path.glob("*.safetensors")))


def dtypes_present(onnx_dir: Path) -> dict[str, int]:
    """dtype -> bytes of its two text sessions (with external data), for the dtypes whose text sessions exist."""
    found = {}
    for dtype, suffix in SUFFIXES.items():
        files = [onnx_dir / f"{name}{suffix}.onnx" for name in (EMBED, DECODER)]
        if all(f.exists() for f in files):
            found[dtype] = sum(p.stat().st_size for f in files for p in f.parent.glob(f.name + "*"))
    return found


def choose_dtype(onnx_dir: Path, requested: str | None) -> str:
    present = dtypes_present(onnx_dir)
    if requested is not None:
        if requested not in SUFFIXES:
            raise OnnxFolderError(f"unknown ONNX dtype {requested!r}; choose from {', '.join(SUFFIXES)}")
        if requested not in present:
            raise OnnxFolderError(
                f"{onnx_dir}: no {requested} sessions ({EMBED}{SUFFIXES[requested]}.onnx and "
                f"{DECODER}{SUFFIXES[requested]}.onnx); present: {', '.join(present) or 'none'}")
        return requested
    if not present:
        raise OnnxFolderError(f"{onnx_dir}: no complete set of text sessions ({EMBED}<suffix>.onnx and "
                              f"{DECODER}<suffix>.onnx with the same suffix)")
    return min(present, key=present.get)


def providers() -> list[str]:
    import onnxruntime as ort
    available = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]


class Session:
    """One onnxruntime session, checked against the names transformers.js uses."""

    def __init__(self, onnx_dir: Path, name: str, dtype: str, threads: int | None = None):
        import onnxruntime as ort
        self.name, self.path = name, onnx_dir / f"{name}{SUFFIXES[dtype]}.onnx"
        if not self.path.exists():
            raise OnnxFolderError(f"{self.path}: missing; this folder has no {dtype} {name} session "
                                  f"(re-export with `gemma3n export onnx MODEL OUT --dtype {dtype}`)")
        options = ort.SessionOptions()
        options.log_severity_level = 3
        if threads:
            options.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(str(self.path), options, providers=providers())
        except Exception as e:  # onnxruntime raises its own exception kinds for unreadable files
            raise OnnxFolderError(f"{self.path}: onnxruntime cannot load it ({str(e).strip()[:300]}); the file "
                                  "is corrupt or incomplete: re-export or re-download it") from None
        self.inputs = {i.name: i for i in self.session.get_inputs()}
        self.outputs = [o.name for o in self.session.get_outputs()]
        missing = [n for n in REQUIRED_INPUTS[name] if n not in self.inputs]
        missing += [n for n in REQUIRED_OUTPUTS[name] if n not in self.outputs]
        if missing:
            raise OnnxFolderError(f"{self.path}: does not declare {', '.join(missing)} (it has inputs "
                                  f"{', '.join(self.inputs)}; outputs {', '.join(self.outputs)}); not a Gemma 3n "
                                  f"{name} session in the transformers.js layout")

    def numpy_type(self, input_name: str):
        return _NUMPY_OF_ORT.get(self.inputs[input_name].type, np.float32)

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        feeds = {k: np.ascontiguousarray(v, dtype=self.numpy_type(k)) for k, v in feeds.items() if k in self.inputs}
        return dict(zip(self.outputs, self.session.run(None, feeds)))


class _Norm(nn.Module):
    """Stands where the torch model's final norm is: Model.dtype / Model.device read its weight."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1), requires_grad=False)


class OnnxTextModel(nn.Module):
    """The embed_tokens session as the text model's `embed` (what the multimodal merge starts from)."""

    def __init__(self, embed: Session):
        super().__init__()
        self.session = embed
        self.norm = _Norm()

    def embed_both(self, input_ids: Tensor) -> tuple[np.ndarray, np.ndarray]:
        out = self.session.run({"input_ids": input_ids.cpu().numpy()})
        return out["inputs_embeds"], out["per_layer_inputs"]

    def embed(self, input_ids: Tensor) -> Tensor:
        return torch.from_numpy(np.asarray(self.embed_both(input_ids)[0], dtype=np.float32))


class OnnxCausalLM(nn.Module):
    """The decoder_model_merged session with the engine's model interface (gemma3n.engine.generate)."""

    def __init__(self, config, embed: Session, decoder: Session):
        super().__init__()
        self.config = config
        self.model = OnnxTextModel(embed)
        self.decoder = decoder
        layers = sorted({int(m.group(1)) for n in decoder.inputs if (m := _PAST.match(n))})
        missing = [f"past_key_values.{i}.{kind}" for i in layers for kind in ("key", "value")
                   if f"past_key_values.{i}.{kind}" not in decoder.inputs]
        missing += [f"present.{i}.{kind}" for i in layers for kind in ("key", "value")
                    if f"present.{i}.{kind}" not in decoder.outputs]
        if missing or not layers:
            raise OnnxFolderError(f"{decoder.path}: the cache names do not pair up (missing "
                                  f"{', '.join(missing) or 'every past_key_values.N.key/value input'})")
        self.kv_layers = layers
        self.kv_dtype = torch.from_numpy(np.zeros(0, decoder.numpy_type(f"past_key_values.{layers[0]}.key"))).dtype

    def new_cache(self, batch: int, max_len: int, dtype: torch.dtype | None = None) -> KVCache:
        cfg = self.config
        return KVCache([FULL] * len(self.kv_layers), batch, max_len, cfg.num_key_value_heads, cfg.head_dim, None,
                       dtype or self.kv_dtype, "cpu")

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, cache=None, last_only: bool = False,
                inputs_embeds: Tensor | None = None) -> Tensor:
        embeds, per_layer = self.model.embed_both(input_ids)
        if inputs_embeds is not None:
            embeds = inputs_embeds.float().cpu().numpy()
        b, t = input_ids.shape
        past, mask, positions = self._past(cache, attention_mask, b, t)
        feeds = {"inputs_embeds": embeds, "per_layer_inputs": per_layer, "attention_mask": mask,
                 "position_ids": positions}
        if "num_logits_to_keep" in self.decoder.inputs:  # ours declare it; the published folders do not
            # one row of the 262k-wide head for a prefill that samples, every row for logprobs / scoring
            feeds["num_logits_to_keep"] = np.array(1 if last_only else t, dtype=np.int64)
        if "use_cache_branch" in self.decoder.inputs:
            feeds["use_cache_branch"] = np.array([past[0].shape[2] > 0], dtype=np.bool_)
        for slot, layer in enumerate(self.kv_layers):
            feeds[f"past_key_values.{layer}.key"], feeds[f"past_key_values.{layer}.value"] = past[2 * slot:2 * slot + 2]
        out = self.decoder.run(feeds)
        if cache is not None:
            for slot, layer in enumerate(self.kv_layers):
                k, v = (torch.from_numpy(out[f"present.{layer}.{kind}"][:, :, -t:]) for kind in ("key", "value"))
                cache.update(slot, k.to(self.kv_dtype), v.to(self.kv_dtype))
        logits = torch.from_numpy(np.asarray(out["logits"], dtype=np.float32))
        return logits[:, -1:] if last_only else logits

    def _past(self, cache, attention_mask: Tensor | None, b: int, t: int):
        """(past K/V arrays in slot order, the (B, past + T) mask, the (B, T) positions) for this call."""
        cfg = self.config
        if cache is None:
            mask = torch.ones(b, t, dtype=torch.long) if attention_mask is None else attention_mask.long().cpu()
            positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, -t:]
            empty = np.zeros((b, cfg.num_key_value_heads, 0, cfg.head_dim), dtype=np.float32)
            return [empty] * (2 * len(self.kv_layers)), mask.numpy(), positions.numpy()
        step = cache.start(attention_mask, t)
        if isinstance(cache, BatchCache):
            lengths = step.positions[:, 0]  # each row's keys so far; its new key goes to column lengths[row]
            seen = int(lengths.max()) + 1
            columns = torch.arange(seen)[None]
            mask = (columns < lengths[:, None]) | (columns == seen - 1)
            past = [kv[:, :, :seen - 1] for pair in cache.slot_tensors() for kv in pair]
        else:
            mask = cache.valid[:, :cache.length]
            past = [kv[:, :, :cache.length - t] for pair in cache.slot_tensors() for kv in pair]
        return [p.cpu().numpy() for p in past], mask.long().cpu().numpy(), step.positions.cpu().numpy()


class OnnxMultimodal(nn.Module):
    """The vision / audio encoder sessions (opened on first use) and the soft-token merge."""

    def __init__(self, config: ModelConfig, onnx_dir: Path, dtype: str, lm: OnnxCausalLM):
        super().__init__()
        self.config, self.onnx_dir, self.dtype = config, onnx_dir, dtype
        self.text = lm.model
        self._sessions: dict[str, Session] = {}

    def wrap(self, lm: nn.Module) -> nn.Module:
        return lm  # embed_tokens already gives media-vocabulary ids their embedders' rows

    def has_media_ids(self, ids: Tensor) -> bool:
        return False  # see wrap: nothing to merge unless images or audio are given

    @property
    def loaded_towers(self) -> list[str]:
        return sorted(self._sessions)

    def session(self, name: str) -> Session:
        if name not in self._sessions:
            kind = "vision" if name == VISION else "audio"
            if getattr(self.config, kind) is None:
                raise ValueError(f"this checkpoint has no {kind} tower, so it cannot take {kind} input")
            self._sessions[name] = Session(self.onnx_dir, name, self._tower_dtype(name))
        return self._sessions[name]

    def _tower_dtype(self, name: str) -> str:
        """The folder's dtype when it has that tower in it, else the smallest one present (published folders
        ship towers in fewer dtypes than the decoder)."""
        if (self.onnx_dir / f"{name}{SUFFIXES[self.dtype]}.onnx").exists():
            return self.dtype
        present = [d for d in SUFFIXES if (self.onnx_dir / f"{name}{SUFFIXES[d]}.onnx").exists()]
        if not present:
            raise OnnxFolderError(f"{self.onnx_dir}: no {name} session in any dtype; this folder cannot take "
                                  f"{'images' if name == VISION else 'audio'}")
        return min(present, key=lambda d: (self.onnx_dir / f"{name}{SUFFIXES[d]}.onnx").stat().st_size)

    def embed_inputs(self, text_model, input_ids: Tensor, pixel_values: Tensor | None = None,
                     input_features: Tensor | None = None, input_features_mask: Tensor | None = None) -> Tensor:
        embeds = self.text.embed(input_ids)
        if pixel_values is not None:
            images = self.session(VISION).run({"pixel_values": pixel_values.float().cpu().numpy()})["image_features"]
            embeds = scatter_soft_tokens(embeds, input_ids == self.config.image_token_id,
                                         torch.from_numpy(np.asarray(images, np.float32)), "image")
        if input_features is not None:
            if input_features_mask is None:
                raise ValueError("input_features needs input_features_mask (True = valid frame)")
            clips = self.session(AUDIO).run({"input_features": input_features.float().cpu().numpy(),
                                             "input_features_mask": input_features_mask.bool().cpu().numpy()})
            embeds = scatter_soft_tokens(embeds, input_ids == self.config.audio_token_id,
                                         torch.from_numpy(np.asarray(clips["audio_features"], np.float32)), "audio")
        return embeds


def load_onnx_folder(path: Path, dtype: str | None = None):
    """A transformers.js-layout folder -> (ModelConfig, OnnxCausalLM, OnnxMultimodal or None)."""
    path = Path(path)
    config = ModelConfig.from_file(path / "config.json")
    if config.family != "gemma3n":
        raise ConfigError(f"{path / 'config.json'}: ONNX folders of {config.model_type} are not supported "
                          "(only Gemma 3n)")
    onnx_dir = path / "onnx"
    chosen = choose_dtype(onnx_dir, dtype)
    lm = OnnxCausalLM(config.text, Session(onnx_dir, EMBED, chosen), Session(onnx_dir, DECODER, chosen))
    has_towers = config.vision is not None or config.audio is not None
    multimodal = OnnxMultimodal(config, onnx_dir, chosen, lm) if has_towers else None
    return config, lm, multimodal
