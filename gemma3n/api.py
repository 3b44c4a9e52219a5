"""Public entry points: `load()` and `Model`."""
from __future__ import annotations

import threading
from pathlib import Path

import torch
from torch import nn

from .config import ModelConfig
from .engine import generate as engine
from .engine.sampling import SamplingParams
from .loading import LoadedModel, load_checkpoint


def load(path_or_id: str | Path, dtype=None, device: str = "cpu", quantize=None,
         activations: str | None = None, matformer=None, adapter=None, adapters=None,
         onnx_dtype: str | None = None) -> "Model":
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
    adapters: {name: adapter folder, ...}: LoRA adapters kept beside the weights (never merged), each chosen per
    sequence by name (`gemma3n serve --adapter NAME=DIR` serves each as its own model id, all in one batch);
    `Model.adapters` lists them. May be combined with `adapter`, which then becomes part of the base.
    onnx_dtype: for a folder in the transformers.js ONNX layout (onnx/*.onnx, e.g. from `gemma3n export onnx`),
    which sessions onnxruntime runs: "fp32", "fp16", "q8", "q4" or "q4f16" (default: the smallest present).
    """
    return Model.from_loaded(load_checkpoint(path_or_id, dtype, device, quantize, activations, matformer, adapter,
                                             adapters, onnx_dtype))


def export_onnx(model_or_path, out: str | Path, dtypes="fp32", progress=print) -> list[Path]:
    """Export a Gemma 3n (a loaded float `Model`, in any float dtype, or anything `load` takes) to the
    transformers.js ONNX layout in `out`: onnx/embed_tokens, decoder_model_merged, vision_encoder, audio_encoder
    (the last two when the checkpoint has towers) in each of `dtypes` ("fp32", "fp16", "q8", "q4", "q4f16"), with
    config, tokenizer and processor files. Returns the .onnx files written."""
    from .onnx import export_model
    # a path loads as stored (bf16, memory-mapped): the export makes one session's weights float32 at a time
    model = model_or_path if isinstance(model_or_path, Model) else load(model_or_path)
    if not model.path.is_dir():
        raise ValueError(f"{model.path}: export needs a checkpoint folder (its tokenizer and processor files go "
                         "beside the ONNX files)")
    return export_model(model.lm, model.multimodal, model.config, model.tokenizer, model.path, Path(out), dtypes,
                        progress)


class Model:
    """A loaded model: teacher-forced logits and generation."""

    def __init__(self, lm: nn.Module, config: ModelConfig, path: Path, tokenizer=None,
                 defaults: SamplingParams | None = None, multimodal: nn.Module | None = None, adapters=None):
        self.lm, self.config, self.path, self.tokenizer = lm, config, path, tokenizer
        self.adapters = adapters  # gemma3n.adapters.multi_lora.AdapterSet, or None (`load(..., adapters=)`)
        self.defaults = defaults or SamplingParams(temperature=0.0)
        self.multimodal = multimodal  # gemma3n.model.multimodal.Multimodal, or None for a text-only checkpoint
        self.decoder = lm  # what the engine drives: the LM, wrapped for a multimodal checkpoint
        if multimodal is not None:
            self.decoder = multimodal.wrap(lm)
        self.allow_network = False  # whether media given as http(s) URLs may be fetched
        self.pan_and_scan = None  # Gemma 3: True (or a dict of settings) also gives elongated images as crops
        self._processor = None
        self._grammars = None
        self._grammars_lock = threading.Lock()

    @classmethod
    def from_loaded(cls, loaded: LoadedModel) -> "Model":
        return cls(loaded.language_model, loaded.config, loaded.path, loaded.tokenizer, loaded.defaults,
                   loaded.multimodal, loaded.adapters)

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
                 stream: bool = False, attention_mask=None, *, json_schema=None, regex: str | None = None,
                 grammar: str | None = None, response_format=None, adapter: str | None = None):
        """Continue a prompt.

        - token ids ([B, T] LongTensor) -> the new ids [B, N] (rows that stop early are padded with the pad id
          after their stop id, as transformers does); greedy when temperature is 0;
        - a string or chat messages -> the answer text, or with stream=True an iterator of text pieces.
        Unset sampling arguments come from the checkpoint's generation_config.json (greedy if it has none).
        Structured output (at most one): `json_schema` (a dict), `regex`, `grammar` (llguidance's Lark dialect) or
        OpenAI's `response_format`; every token is then chosen among those the grammar allows, and generation ends
        when the grammar is complete (see `constraint`).
        `adapter`: the name of one of the adapters loaded beside the weights (`load(..., adapters={name: dir})`,
        listed in `self.adapters`) to generate with; None is the base model.
        """
        params = self.sampling_params(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                                      top_p=top_p, min_p=min_p, repetition_penalty=repetition_penalty, seed=seed,
                                      stop=stop, constraint=self.constraint(json_schema=json_schema, regex=regex,
                                                                            grammar=grammar,
                                                                            response_format=response_format))
        if isinstance(inputs, (str, list)) and not _is_id_list(inputs):
            ids, embeds = self.prepare(inputs)
            run = engine.stream if stream else engine.generate
            result = run(self.decoder, ids, params, self.tokenizer, self.stop_ids(), inputs_embeds=embeds,
                         adapters=self.adapters, adapter=adapter)
            return result if stream else result.text
        ids = _as_ids(inputs, self.device)
        self._check_ids(ids)
        mask = None if attention_mask is None else torch.as_tensor(attention_mask, device=self.device)
        rows = engine.generate_ids(self.decoder, ids, params, self.stop_ids(), attention_mask=mask,
                                   tokenizer=self.tokenizer, include_stop_ids=True, adapters=self.adapters,
                                   adapter=adapter)
        width = max(map(len, rows), default=0)
        pad = self.config.text.pad_token_id
        return torch.tensor([r + [pad] * (width - len(r)) for r in rows], dtype=torch.long).reshape(len(rows), width)

    def complete(self, prompt, adapter: str | None = None, **sampling) -> "engine.Generation":
        """Like generate() for text, but returns the full record: text, token counts, finish reason, timings.
        Takes generate()'s structured-output arguments and `adapter` too."""
        params = self.sampling_params(**self._with_constraint(sampling))
        ids, embeds = self.prepare(prompt)
        return engine.generate(self.decoder, ids, params, self.tokenizer, self.stop_ids(), inputs_embeds=embeds,
                               adapters=self.adapters, adapter=adapter)

    def stream(self, prompt, adapter: str | None = None, **sampling) -> "engine.TextIterator":
        """Text pieces as they are generated; afterwards `.generation` holds the full record."""
        params = self.sampling_params(**self._with_constraint(sampling))
        ids, embeds = self.prepare(prompt)
        return engine.stream(self.decoder, ids, params, self.tokenizer, self.stop_ids(), inputs_embeds=embeds,
                             adapters=self.adapters, adapter=adapter)

    def sampling_params(self, **overrides) -> SamplingParams:
        """The checkpoint's defaults with the given (non-None) settings applied."""
        from dataclasses import replace
        chosen = {k: (tuple([v] if isinstance(v, str) else v) if k == "stop" else v)
                  for k, v in overrides.items() if v is not None}
        return replace(self.defaults, **chosen)

    @property
    def grammars(self):
        """The grammar compiler for this model's tokenizer (gemma3n.structured.GrammarCompiler), built on first use
        (reading Gemma's 262k-token vocabulary into llguidance takes a few seconds) and shared by every request."""
        with self._grammars_lock:
            if self._grammars is None:
                from .structured import GrammarCompiler
                self._grammars = GrammarCompiler(self._require_tokenizer(), self.config.text.vocab_size)
            return self._grammars

    def constraint(self, *, json_schema=None, regex: str | None = None, grammar: str | None = None,
                   response_format=None):
        """The compiled grammar (cached per text) for at most one of: a JSON schema, a regex, a Lark grammar, or
        OpenAI's response_format; None when none is given. Raises gemma3n.structured.GrammarError (a ValueError)
        naming what is not supported."""
        if json_schema is None and regex is None and grammar is None and response_format is None:
            return None
        from .structured import constraint_for
        return constraint_for(self.grammars, response_format=response_format, json_schema=json_schema, regex=regex,
                              grammar=grammar)

    def _with_constraint(self, sampling: dict) -> dict:
        keys = ("json_schema", "regex", "grammar", "response_format")
        asked = {k: sampling.pop(k) for k in keys if k in sampling}
        constraint = self.constraint(**asked) if asked else None
        return {**sampling, "constraint": constraint} if constraint is not None else sampling

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
