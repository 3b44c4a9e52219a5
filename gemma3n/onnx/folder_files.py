"""The JSON and text files beside onnx/ that transformers.js (and gemma3n's own ONNX runtime) read.

transformers.js v4 (`@huggingface/transformers`) fails to load a Gemma 3n folder without: config.json
(model_type "gemma3n", a text_config, architectures[0] ending in ForConditionalGeneration), processor_config.json
(image_seq_length, audio_seq_length), chat_template.jinja, preprocessor_config.json (processor_class, the image
processor type and the audio feature extractor type with its settings) and tokenizer_config.json naming the
image / audio tokens. The values come from the checkpoint's own files where it has them, and otherwise from the
released checkpoints' settings that gemma3n's processor uses.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Mapping

from ..config import ModelConfig
from ..processor.audio_features import AudioFeatureExtractor
from ..processor.image import ImageProcessor
from ..processor.processor import read_preprocessor_config

# tokenizer_config.json key -> (ModelConfig field with the token id, the Gemma 3n token string). transformers.js's
# processor reads all six even for a text-only model, so a vocabulary without them still gets the strings.
MEDIA_TOKENS = {
    "boi_token": ("boi_token_id", "<start_of_image>"), "eoi_token": ("eoi_token_id", "<end_of_image>"),
    "image_token": ("image_token_id", "<image_soft_token>"), "boa_token": ("boa_token_id", "<start_of_audio>"),
    "eoa_token": ("eoa_token_id", "<end_of_audio>"), "audio_token": ("audio_token_id", "<audio_soft_token>"),
}


def model_config_json(source: Mapping[str, Any], external_data: list[str]) -> dict[str, Any]:
    """The checkpoint's config.json for the export: a text-only Gemma 3n config is wrapped as a multimodal one
    without towers (transformers.js then loads just the two text sessions), and large sessions are listed as
    having external data."""
    config = dict(source)
    if config.get("model_type") == "gemma3n_text":
        text = {k: v for k, v in config.items() if k not in ("architectures", "auto_map")}
        config = {"architectures": ["Gemma3nForConditionalGeneration"], "model_type": "gemma3n", "text_config": text,
                  **{k: text[k] for k in ("eos_token_id", "bos_token_id", "pad_token_id") if k in text}}
    else:
        config["architectures"] = ["Gemma3nForConditionalGeneration"]
    js = dict(config.get("transformers.js_config") or {})
    js.pop("use_external_data_format", None)
    if external_data:
        js["use_external_data_format"] = {name: 1 for name in sorted(external_data)}
    if js:
        config["transformers.js_config"] = js
    else:
        config.pop("transformers.js_config", None)
    return config


def preprocessor_json(folder: Path | None) -> dict[str, Any]:
    """One flat preprocessor_config.json with the image processor's and the audio feature extractor's settings
    (the names transformers and transformers.js read), taken from the checkpoint or its processor's defaults."""
    sections = read_preprocessor_config(folder)
    image = ImageProcessor.from_config(sections.get("image_processor"))
    audio = AudioFeatureExtractor.from_config(sections.get("feature_extractor"))
    return {
        "processor_class": "Gemma3nProcessor",
        "image_processor_type": "SiglipImageProcessor",
        "do_resize": image.do_resize, "size": {"height": image.height, "width": image.width},
        "resample": image.resample, "do_rescale": image.do_rescale, "rescale_factor": image.rescale_factor,
        "do_normalize": image.do_normalize, "image_mean": list(image.image_mean), "image_std": list(image.image_std),
        "do_convert_rgb": True,
        "feature_extractor_type": "Gemma3nAudioFeatureExtractor",
        "feature_size": audio.feature_size, "sampling_rate": audio.sampling_rate,
        "frame_length_ms": audio.frame_length_ms, "hop_length_ms": audio.hop_length_ms,
        "frame_length": audio.frame_length, "hop_length": audio.hop_length, "fft_length": audio.fft_length,
        "min_frequency": audio.min_frequency, "max_frequency": audio.max_frequency,
        "preemphasis": audio.preemphasis, "preemphasis_htk_flavor": audio.preemphasis_htk_flavor,
        "fft_overdrive": audio.fft_overdrive, "input_scale_factor": audio.input_scale_factor,
        "mel_floor": audio.mel_floor, "dither": 0.0,
        "per_bin_mean": None if audio.per_bin_mean is None else list(audio.per_bin_mean),
        "per_bin_stddev": None if audio.per_bin_stddev is None else list(audio.per_bin_stddev),
        "padding_value": audio.padding_value, "padding_side": "right", "return_attention_mask": True,
    }


def tokenizer_config_json(source: Path, config: ModelConfig, tokenizer) -> dict[str, Any]:
    """The checkpoint's tokenizer_config.json with the media token strings and ids the processor looks up."""
    path = source / "tokenizer_config.json"
    data = json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
    data.pop("chat_template", None)  # chat_template.jinja carries it
    data.setdefault("tokenizer_class", "GemmaTokenizer")
    data.setdefault("processor_class", "Gemma3nProcessor")
    for key, (field, standard) in MEDIA_TOKENS.items():
        token = tokenizer.id_to_token(getattr(config, field))
        data.setdefault(key, standard if token is None else token)
    data.setdefault("image_token_id", config.image_token_id)
    data.setdefault("audio_token_id", config.audio_token_id)
    return data


def check_folder_sources(source: Path, tokenizer) -> None:
    """What write_folder_files needs from the checkpoint, checked before the (long) export starts."""
    if tokenizer is None or not (Path(source) / "tokenizer.json").exists():
        raise ValueError(f"{source} has no tokenizer.json; transformers.js needs one beside the ONNX files")
    if not tokenizer.chat_template:
        raise ValueError(f"{source} has no chat template; transformers.js's Gemma 3n processor needs "
                         "chat_template.jinja (add chat_template.jinja or tokenizer_config.json's chat_template)")


def write_folder_files(source: Path, out: Path, config: ModelConfig, tokenizer, external_data: list[str]) -> None:
    """Everything beside onnx/: config, generation config, tokenizer, chat template, processor settings."""
    check_folder_sources(source, tokenizer)
    raw = json.loads((source / "config.json").read_text(encoding="utf-8"))
    _write_json(out / "config.json", model_config_json(raw, external_data))
    if (source / "generation_config.json").exists():
        shutil.copyfile(source / "generation_config.json", out / "generation_config.json")
    shutil.copyfile(source / "tokenizer.json", out / "tokenizer.json")
    for extra in ("tokenizer.model", "special_tokens_map.json"):
        if (source / extra).exists():
            shutil.copyfile(source / extra, out / extra)
    _write_json(out / "tokenizer_config.json", tokenizer_config_json(source, config, tokenizer))
    (out / "chat_template.jinja").write_text(tokenizer.chat_template, encoding="utf-8")
    _write_json(out / "preprocessor_config.json", preprocessor_json(source))
    _write_json(out / "processor_config.json", {
        "processor_class": "Gemma3nProcessor", "image_seq_length": config.vision_soft_tokens_per_image,
        "audio_seq_length": config.audio_soft_tokens_per_image})


def _write_json(path: Path, data: Mapping[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
