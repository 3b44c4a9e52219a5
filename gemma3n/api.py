"""Public entry points: `load()` and `Model`."""
from __future__ import annotations

from pathlib import Path
import torch
from torch import nn

from .checkpoint.hub import looks_like_hub_id, resolve_cached
from .checkpoint.safetensors import Checkpoint, CheckpointError
from .checkpoint.weights import KeyMap, assemble, prefixed_key_map, resolve_dtype, text_key_map
from .config import ModelConfig
from .engine import generate as engine
from .engine.heap import return_freed_heap
from .engine.sampling import SamplingParams


def text_model_class(config: ModelConfig):
    """The decoder class for a config's family."""
    if config.family == "gemma3n":
        from .model.text import CausalLM
        return CausalLM
    from .model.gemma3 import Gemma3CausalLM
    return Gemma3CausalLM


def _first_shared(config: ModelConfig) -> int | None:
    return getattr(config.text, "first_shared_layer", None)


def _load_folder(folder: Path, dtype: torch.dtype | None, device: str = "cpu", quantize=None, matformer=None):
    if not (folder / "config.json").exists():
        raise CheckpointError(f"{folder}: no config.json here; pass a Hugging Face checkpoint folder or a .gguf file")
    from .quant import apply_plan, deferred_tensors, plan_for, stored_plan
    config = ModelConfig.from_file(folder / "config.json")
    tensors = Checkpoint(folder)
    if matformer is not None:  # a MatFormer slice read from the unsliced files (gemma3n/matformer)
        from .matformer import elastic_view
        config, tensors = elastic_view(folder, tensors, matformer)
    keys = text_key_map(list(tensors), _first_shared(config))
    cls = text_model_class(config)
    stored = stored_plan(folder)
    if stored is not None and quantize is not None:
        raise ValueError(f"{folder} is already quantised ({stored[0].to_dict()}); load it without quantize=")
    # a quantised checkpoint: the quantised modules are built as empty skeletons and assigned the stored tensors
    build = (lambda: cls(config.text)) if stored is None else (
        lambda: apply_plan(cls(config.text), stored[1], stored[0].group_size))
    # quantize=: planned weights are left out of the assembly, then quantised one at a time from the map, and
    # each one's file pages are dropped once it is done, so no float copy of the model is ever resident
    chosen, scheme = plan_for(build, quantize)
    source = {keys.source(p + ".weight"): p for p in chosen}
    ple_name = keys.source("model.embed_tokens_per_layer.weight")
    row_table = tensors.row_table(ple_name) if matformer is not None and ple_name in tensors else None
    if row_table is not None:  # the kept layers' blocks of the stored table, read per lookup
        source[ple_name] = "model.embed_tokens_per_layer"

    def where(name: str) -> str:
        return str(tensors.file_of(name)) if name in tensors else str(folder)

    lm = assemble(build, deferred_tensors(tensors, source), keys, dtype, where)
    if row_table is not None:
        lm.model.embed_tokens_per_layer = row_table
    if matformer is not None:
        lm.matformer = tensors.plan.spec
    if chosen:
        def weight(path: str) -> torch.Tensor:
            stored_weight = tensors[keys.source(path + ".weight")]
            return stored_weight if dtype is None else stored_weight.to(dtype)
        apply_plan(lm, chosen, scheme.group_size, weights=weight,
                   release=lambda path: tensors.release(keys.source(path + ".weight")))
    # the scheme in force, for encoders loaded later (gemma3n.quant.quantize_module(tower, scheme.vision, ...))
    lm.quant_scheme = stored[0] if stored is not None else scheme
    return config, lm, _load_multimodal(config, tensors, dtype, device, where, lm.quant_scheme)


# Where each part of a Gemma 3n multimodal checkpoint lives.
EMBEDDER_PREFIXES = ("model.embed_vision.", "model.embed_audio.")
TOWER_WEIGHTS = {"vision": "model.vision_tower.timm_model.", "audio": "model.audio_tower."}


def _load_multimodal(config: ModelConfig, tensors, dtype, device: str, where, scheme=None):
    """The embedders (small) now; each tower's loader, run the first time a prompt needs that tower."""
    names = list(tensors)
    if config.family == "gemma3":  # Gemma 3's SigLIP tower and projector (checkpoint/gemma3_vision.py)
        from .checkpoint.gemma3_vision import load_gemma3_vision
        return load_gemma3_vision(config, tensors, dtype, device, where, scheme)
    if config.family != "gemma3n" or not any(n.startswith(EMBEDDER_PREFIXES) for n in names):
        return None
    from .model.multimodal import Multimodal
    embedder_names = [n for n in names if n.startswith(EMBEDDER_PREFIXES)]
    mm = assemble(lambda: Multimodal(config), tensors, prefixed_key_map(embedder_names, "model."), dtype, where)
    mm = mm.to(device)
    for kind, prefix in TOWER_WEIGHTS.items():
        if any(n.startswith(prefix) for n in names):
            mm.set_tower_loader(kind, _tower_loader(kind, config, tensors, prefix, dtype, device, where, scheme))
    return mm


def _tower_loader(kind: str, config: ModelConfig, tensors, prefix: str, dtype, device: str, where, scheme=None):
    def load() -> nn.Module:
        if kind == "vision":
            from .model.vision import build_vision_tower as build
            section = config.vision
        else:
            from .model.audio import build_audio_tower as build
            section = config.audio
        keys: KeyMap = prefixed_key_map(list(tensors), prefix)
        tower = assemble(lambda: build(dict(section)), tensors, keys, dtype, where)
        if scheme is not None:  # the quantisation scheme in force names a format per tower ("vision": "int8")
            from .quant import quantize_module
            tower = quantize_module(tower, getattr(scheme, kind), scheme.group_size)
        return tower.to(device)
    return load


def _load_gguf(path: Path, dtype: torch.dtype | None, quantize=None, device: str = "cpu"):
    """Tensors are dequantised one at a time; the per-layer table stays in the file (rows dequantised per lookup);
    with `quantize`, each planned weight is dequantised and re-quantised on its own, never the whole model."""
    from .checkpoint.gguf import PLE_NAME, GGUFRowEmbedding, read_gguf
    from .quant import deferred_tensors, plan_for
    config, tensors = read_gguf(path, dtype)
    keys = text_key_map(list(tensors), _first_shared(config))
    cls = text_model_class(config)
    chosen, scheme = plan_for(lambda: cls(config.text), quantize)
    deferred = {keys.source(p + ".weight"): p for p in chosen}
    if PLE_NAME in tensors:
        deferred[PLE_NAME] = "model.embed_tokens_per_layer"
    # the native kernels read the file's blocks on the CPU; elsewhere (and with quantize=) tensors are dequantised
    kept = {} if chosen or device != "cpu" else _gguf_kept_as_stored(_skeleton(cls, config), tensors, keys)
    deferred.update({keys.source(p + ".weight"): p for p in kept})
    lm = assemble(lambda: cls(config.text), deferred_tensors(tensors, deferred), keys, dtype, lambda name: str(path))
    if PLE_NAME in tensors:
        lm.model.embed_tokens_per_layer = GGUFRowEmbedding(tensors.row_table(PLE_NAME))
    _swap_in_gguf_modules(lm, kept, tensors.dtype)
    if chosen:
        from .quant import apply_plan
        apply_plan(lm, chosen, scheme.group_size, weights=lambda p: tensors[keys.source(p + ".weight")])
    lm.quant_scheme = scheme
    # llama.cpp keeps the towers in a separate mmproj file, which is not supported: GGUF models are text-only.
    return config, lm, None


def _skeleton(cls, config) -> nn.Module:
    with torch.device("meta"):
        return cls(config.text)


def _gguf_kept_as_stored(skeleton: nn.Module, tensors, keys) -> dict[str, tuple[int, "np.ndarray"]]:
    """Module path -> (GGML type, stored rows) for the linears and the token embedding that the native kernels
    compute from the file's blocks directly (quantised and 16-bit types; float32 tensors load as they are)."""
    from .quant.gguf_modules import supported
    kept = {}
    for path, module in skeleton.named_modules():
        if path == "model.embed_tokens_per_layer" or not (
                (type(module) is nn.Linear and module.bias is None) or type(module) is nn.Embedding):
            continue
        stored = tensors.stored(keys.source(path + ".weight"))
        if stored is not None and stored[0] != 0 and supported(stored[0], module.weight.shape[1]):
            kept[path] = stored
    return kept


def _swap_in_gguf_modules(lm: nn.Module, kept: dict, dtype: torch.dtype) -> None:
    from .quant.gguf_modules import GGUFEmbedding, GGUFLinear, raw_rows
    for path, (ggml_type, data) in kept.items():
        parent, _, name = path.rpartition(".")
        old = lm.get_submodule(path)
        cls = GGUFEmbedding if isinstance(old, nn.Embedding) else GGUFLinear
        setattr(lm.get_submodule(parent), name, cls(raw_rows(data), ggml_type, old.weight.shape[1], dtype))


def load(path_or_id: str | Path, dtype=None, device: str = "cpu", quantize=None,
         activations: str | None = None, matformer=None, adapter=None) -> "Model":
    """Load a Hugging Face checkpoint folder, a .gguf file, or a Hub id found in the local cache.

    dtype: None keeps the stored dtype (memory-mapped, no copy); "float32", "bfloat16" or "float16" converts.
    quantize: None, "int8", "int4", "int4-g32" or a dict scheme (gemma3n.quant.parse_scheme): weight-only
    quantisation after loading. A folder written by `gemma3n quantize` loads quantised without it.
    activations: None keeps the process setting (exact "float32" unless GEMMA3N_ACTIVATIONS says otherwise);
    "int8" opts in to llama.cpp-style int8 activations in the native quantised products (faster, approximate; see
    gemma3n.kernels). It is process-wide: it applies to every model in this process.
    matformer: None, a published MatFormer configuration ("Config for E2.54B (layer-level)", "E2B", ...; see
    gemma3n.matformer.PUBLISHED) or {"layers_skipped": [...], "ffn_hidden_dims": [...]}: load that slice of a
    Gemma 3n safetensors folder, reading only the kept layers, rows and columns (the same model as the folder
    `gemma3n slice` writes).
    adapter: a PEFT LoRA adapter folder (`gemma3n finetune` writes one): merged into float weights, applied beside
    quantised ones (int8 / int4 / GGUF blocks stay as stored).
    """
    if activations is not None:
        from . import kernels
        kernels.set_activation_precision(activations)  # checked before any loading work
    dtype = resolve_dtype(dtype)
    path = Path(path_or_id).expanduser()
    if not path.exists():
        if isinstance(path_or_id, str) and looks_like_hub_id(path_or_id):
            path = resolve_cached(path_or_id)
        else:
            raise FileNotFoundError(f"{path}: no such file or folder; pass a checkpoint folder, a .gguf file "
                                    f"or a Hugging Face model id that is in the local cache")
    if path.is_dir():
        config, lm, multimodal = _load_folder(path, dtype, device, quantize, matformer)
    elif matformer is not None:
        raise ValueError(f"{path}: MatFormer slicing at load time needs a Gemma 3n safetensors checkpoint folder "
                         f"(not a .gguf file)")
    elif path.suffix.lower() == ".gguf":
        config, lm, multimodal = _load_gguf(path, dtype, quantize, device)
    else:
        raise CheckpointError(f"{path}: not a checkpoint folder or a .gguf file")
    # -- LoRA adapter (gemma3n/adapters): before the device move and the sparse layout, which see merged weights
    if adapter is not None:
        from .adapters.peft_format import apply_adapter
        apply_adapter(lm, adapter, config)
    # -- end LoRA adapter
    if device != "cpu":
        lm = lm.to(device)
    if config.family == "gemma3n":
        from .model.text import enable_sparse_decode
        enable_sparse_decode(lm)
    model = Model(lm, config, path, _load_tokenizer(path), _generation_defaults(path), multimodal)
    return_freed_heap()  # parsing a 262k-entry tokenizer.json leaves ~200 MB of freed heap resident
    if config.family == "gemma3n":
        _prefetch_per_layer_table(lm)  # last: its reads would queue ahead of the loading's own
    return model


def _prefetch_per_layer_table(lm) -> None:
    """The per-layer table stays in the file and each token reads a row of it: read its pages ahead now
    (checkpoint/prefetch.py), so that a decode step does not wait on the disk for a row."""
    from .checkpoint.prefetch import prefetch_table
    table = lm.model.embed_tokens_per_layer
    stored = getattr(table, "table", None)  # a GGUF table (checkpoint/gguf.py GGUFRowEmbedding)
    weight = stored.raw if stored is not None else getattr(table, "weight", None)
    if weight is None:  # a MatFormer slice's view of the stored table (matformer/tensors.py SlicedRowEmbedding)
        weight = getattr(table, "source", None)
    if isinstance(weight, torch.Tensor) and weight.device.type != "cpu":
        return
    if weight is not None:  # a tensor, or a GGUF table's numpy view of the map
        prefetch_table(weight)


def _load_tokenizer(path: Path):
    """The checkpoint's tokenizer, or None for a folder that ships none (ids in, ids out still work)."""
    from .processor.tokenizer import Tokenizer
    if path.is_dir():
        return Tokenizer.from_pretrained_dir(path) if (path / "tokenizer.json").exists() else None
    return Tokenizer.from_gguf(path)


def _generation_defaults(path: Path) -> SamplingParams:
    """generation_config.json when the checkpoint has one; otherwise greedy, as transformers does."""
    config = path / "generation_config.json" if path.is_dir() else None
    if config is not None and config.exists():
        return SamplingParams.from_generation_config(config)
    return SamplingParams(temperature=0.0)


class Model:
    """A loaded model: teacher-forced logits and generation."""

    def __init__(self, lm: nn.Module, config: ModelConfig, path: Path, tokenizer=None,
                 defaults: SamplingParams | None = None, multimodal: nn.Module | None = None):
        self.lm, self.config, self.path, self.tokenizer = lm, config, path, tokenizer
        self.defaults = defaults or SamplingParams(temperature=0.0)
        self.multimodal = multimodal  # gemma3n.model.multimodal.Multimodal, or None for a text-only checkpoint
        self.decoder = lm  # what the engine drives: the LM, wrapped for a multimodal checkpoint
        if multimodal is not None:
            self.decoder = multimodal.wrap(lm)
        self.allow_network = False  # whether media given as http(s) URLs may be fetched
        self.pan_and_scan = None  # Gemma 3: True (or a dict of settings) also gives elongated images as crops
        self._processor = None

    @property
    def dtype(self) -> torch.dtype:
        return self.lm.model.norm.weight.dtype  # float even when weights are quantised

    @property
    def device(self) -> torch.device:
        return self.lm.model.norm.weight.device

    @torch.inference_mode()
    def logits(self, input_ids, attention_mask=None, pixel_values=None, input_features=None,
               input_features_mask=None) -> torch.Tensor:
        """Teacher-forced forward: float32 [B, T, vocab] after the soft-cap.

        With left padding (attention_mask 0 on the left), positions count only the real tokens, so a padded
        row's logits equal those of the same sequence alone. Images ([N, 3, H, W] in [0, 1]) and audio
        ([N, T, 128] log-mels, mask True = valid) fill the placeholder runs of the ids in order.
        """
        ids = _as_ids(input_ids, self.device)
        mask = None if attention_mask is None else torch.as_tensor(attention_mask, device=self.device)
        self._check_ids(ids)
        embeds = self.embed_media(ids, pixel_values, input_features, input_features_mask)
        return self.decoder(ids, mask, inputs_embeds=embeds)

    def embed_media(self, ids: torch.Tensor, pixel_values=None, input_features=None,
                    input_features_mask=None) -> torch.Tensor | None:
        """The merged input embeddings for a prompt with media (or with ids of the media vocabularies); None when
        the plain token embeddings are exact."""
        media = (pixel_values, input_features, input_features_mask)
        if self.multimodal is None:
            if any(m is not None for m in media):
                raise ValueError(f"{self.path} is a text-only checkpoint; it cannot take images or audio "
                                 "(use a Gemma 3n, or a Gemma 3 4B/12B/27B, checkpoint folder with its towers)")
            return None
        if all(m is None for m in media) and not self.multimodal.has_media_ids(ids):
            return None
        to = lambda t: None if t is None else torch.as_tensor(t, device=self.device)  # noqa: E731
        with torch.inference_mode():
            return self.multimodal.embed_inputs(self.lm.model, ids, to(pixel_values), to(input_features),
                                                to(input_features_mask))

    @torch.inference_mode()
    def generate(self, inputs, max_new_tokens: int | None = None, temperature: float | None = None,
                 top_k: int | None = None, top_p: float | None = None, min_p: float | None = None,
                 repetition_penalty: float | None = None, seed: int | None = None, stop=None,
                 stream: bool = False, attention_mask=None):
        """Continue a prompt.

        - token ids ([B, T] LongTensor) -> the new ids [B, N] (rows that stop early are padded with the pad id
          after their stop id, as transformers does); greedy when temperature is 0;
        - a string or chat messages -> the answer text, or with stream=True an iterator of text pieces.
        Unset sampling arguments come from the checkpoint's generation_config.json (greedy if it has none).
        """
        params = self.sampling_params(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                                      top_p=top_p, min_p=min_p, repetition_penalty=repetition_penalty, seed=seed,
                                      stop=stop)
        if isinstance(inputs, (str, list)) and not _is_id_list(inputs):
            ids, embeds = self.prepare(inputs)
            if stream:
                return engine.stream(self.decoder, ids, params, self.tokenizer, self.stop_ids(), inputs_embeds=embeds)
            return engine.generate(self.decoder, ids, params, self.tokenizer, self.stop_ids(), inputs_embeds=embeds).text
        ids = _as_ids(inputs, self.device)
        self._check_ids(ids)
        mask = None if attention_mask is None else torch.as_tensor(attention_mask, device=self.device)
        rows = engine.generate_ids(self.decoder, ids, params, self.stop_ids(), attention_mask=mask,
                                   tokenizer=self.tokenizer, include_stop_ids=True)
        width = max(map(len, rows), default=0)
        pad = self.config.text.pad_token_id
        return torch.tensor([r + [pad] * (width - len(r)) for r in rows], dtype=torch.long).reshape(len(rows), width)

    def complete(self, prompt, **sampling) -> "engine.Generation":
        """Like generate() for text, but returns the full record: text, token counts, finish reason, timings."""
        params = self.sampling_params(**sampling)
        ids, embeds = self.prepare(prompt)
        return engine.generate(self.decoder, ids, params, self.tokenizer, self.stop_ids(), inputs_embeds=embeds)

    def stream(self, prompt, **sampling) -> "engine.TextIterator":
        """Text pieces as they are generated; afterwards `.generation` holds the full record."""
        params = self.sampling_params(**sampling)
        ids, embeds = self.prepare(prompt)
        return engine.stream(self.decoder, ids, params, self.tokenizer, self.stop_ids(), inputs_embeds=embeds)

    def sampling_params(self, **overrides) -> SamplingParams:
        """The checkpoint's defaults with the given (non-None) settings applied."""
        from dataclasses import replace
        chosen = {k: (tuple([v] if isinstance(v, str) else v) if k == "stop" else v)
                  for k, v in overrides.items() if v is not None}
        return replace(self.defaults, **chosen)

    def stop_ids(self) -> set[int]:
        """End-of-sequence ids from the config and generation config, plus <end_of_turn> for chat models."""
        ids = set(self.config.eos_token_id) | set(self.defaults.stop_token_ids)
        if self.tokenizer is not None and self.tokenizer.chat_template:
            end_of_turn = self.tokenizer.token_to_id("<end_of_turn>")
            if end_of_turn is not None:
                ids.add(end_of_turn)
        return ids

    # -- prompts ---------------------------------------------------------------------------------------------------

    def processor(self, messages, add_generation_prompt: bool = True) -> dict[str, torch.Tensor]:
        """HF-format chat messages -> {"input_ids", "attention_mask"} ([1, T]) plus "pixel_values",
        "input_features", "input_features_mask" when the messages hold images, audio or video."""
        if self._processor is None:
            from .processor.processor import Processor
            self._processor = Processor.from_checkpoint(self._require_tokenizer(), self.config,
                                                        self.path if self.path.is_dir() else None)
        return self._processor(messages, add_generation_prompt, allow_network=self.allow_network, device=self.device,
                               pan_and_scan=self.pan_and_scan)

    def prepare(self, prompt, add_generation_prompt: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """A string or messages -> ([1, T] ids, merged input embeddings or None when there are no media)."""
        from .processor.processor import has_media
        if isinstance(prompt, (list, tuple)) and has_media(prompt):
            if self.multimodal is None:
                raise ValueError(f"{self.path} is a text-only checkpoint; it cannot take images, audio or video "
                                 "(use a Gemma 3n, or a Gemma 3 4B/12B/27B, checkpoint folder with its towers)")
            inputs = self.processor(prompt, add_generation_prompt)
            ids = inputs.pop("input_ids")
            inputs.pop("attention_mask")
            self._check_ids(ids)
            return ids, self.embed_media(ids, **inputs)
        ids = self.encode_prompt(prompt, add_generation_prompt)
        return ids, self.embed_media(ids)

    def encode_prompt(self, prompt, add_generation_prompt: bool = True) -> torch.Tensor:
        """A string or chat messages -> [1, T] ids. A string is wrapped as one user turn when the checkpoint has a
        chat template, and completed as raw text (after BOS) when it has none."""
        tok = self._require_tokenizer()
        if isinstance(prompt, str) and not tok.chat_template:
            return torch.tensor([tok.encode(prompt, add_special_tokens=True)], dtype=torch.long, device=self.device)
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        return self.processor(messages, add_generation_prompt)["input_ids"]

    def _require_tokenizer(self):
        if self.tokenizer is None:
            raise ValueError(f"{self.path} has no tokenizer.json, so text prompts cannot be encoded; pass token ids")
        return self.tokenizer

    def _check_ids(self, ids: torch.Tensor) -> None:
        vocab = self.config.text.vocab_size
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
            raise ValueError(f"token ids must lie in [0, {vocab}); got {int(ids.min())}..{int(ids.max())}")


def _is_id_list(value) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, int) for v in value)


def _as_ids(input_ids, device) -> torch.Tensor:
    ids = torch.as_tensor(input_ids, device=device)
    if ids.dim() == 1:
        ids = ids[None]
    if ids.dim() != 2 or ids.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"input_ids must be integer ids of shape [B, T]; got {tuple(ids.shape)} {ids.dtype}")
    return ids.long()
