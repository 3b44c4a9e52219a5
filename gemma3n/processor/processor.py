"""Chat messages with images, audio and video -> the model's inputs (HF names), as `Gemma3nProcessor` builds them.

Media parts are gathered in message order (a video part becomes its frames, as image parts, then its sound track as
an audio part); the chat template writes one placeholder per part, each placeholder is expanded to its soft-token
run, and the media are decoded and preprocessed into `pixel_values` / `input_features` in the same order.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any, Mapping

import torch

from ..config import ModelConfig
from .chat import AUDIO_TOKEN, IMAGE_TOKEN, expand_placeholders, render_chat, validate_messages

SAMPLE_RATE = 16_000
MAX_CLIP_SECONDS = 30  # the reference truncates each clip at 30 s (480,000 samples); we split instead
GEMMA3_PAN_AND_SCAN = dict(min_crop_size=256, max_crops=4, min_ratio=1.2)  # Gemma3Processor.images_kwargs
MEDIA_KEYS = {"image": ("image", "url", "path"), "audio": ("audio", "url", "path"), "video": ("video", "url", "path")}


class Processor:
    """`processor(messages)` -> {"input_ids", "attention_mask", and "pixel_values" / "input_features" /
    "input_features_mask" when the messages hold images / sound}."""

    def __init__(self, tokenizer, config: ModelConfig, preprocessor: Mapping[str, Any] | None = None):
        self.tokenizer, self.config = tokenizer, config
        self.preprocessor = dict(preprocessor or {})
        self._image_processor = self._audio_extractor = None
        self.rendered_text: str | None = None

    @classmethod
    def from_checkpoint(cls, tokenizer, config: ModelConfig, folder: Path | None) -> "Processor":
        return cls(tokenizer, config, read_preprocessor_config(folder))

    # -- the call --------------------------------------------------------------------------------------------------

    def __call__(self, messages, add_generation_prompt: bool = True, allow_network: bool = False,
                 device: torch.device | str = "cpu",
                 pan_and_scan: bool | Mapping | None = None) -> dict[str, torch.Tensor]:
        """`pan_and_scan` (Gemma 3 only): True also gives each elongated image as crops (256 px at least, up to 4,
        from an aspect ratio of 1.2), a dict sets min_crop_size / max_crops / min_ratio; off by default, as in
        Gemma3Processor."""
        validate_messages(messages)
        messages, images, clips = self.gather_media(messages, allow_network)
        tok, cfg = self.tokenizer, self.config
        text = render_chat(messages, tok.chat_template, add_generation_prompt=add_generation_prompt,
                           bos_token=tok.bos_token or "<bos>", eos_token=tok.eos_token or "<eos>")
        if cfg.family == "gemma3":
            return {k: v.to(device) for k, v in self.gemma3_inputs(text, images, clips, pan_and_scan).items()}
        if pan_and_scan:
            raise ValueError("pan & scan is a Gemma 3 option; this checkpoint is Gemma 3n")
        if images or clips:
            self._check_media_tokens(bool(images), bool(clips))
            text = expand_placeholders(text, cfg.vision_soft_tokens_per_image, cfg.audio_soft_tokens_per_image,
                                       num_images=len(images), num_audios=len(clips))
        ids = torch.tensor([tok.encode(text, add_special_tokens=False)], dtype=torch.long)  # the template writes <bos>
        out = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        if images:
            out["pixel_values"] = self.image_processor(images)
        if clips:
            out["input_features"], out["input_features_mask"] = self.audio_extractor(clips)
        return {k: v.to(device) for k, v in out.items()}

    def gemma3_inputs(self, text: str, images: list, clips: list, pan_and_scan: bool | Mapping | None = None
                      ) -> dict[str, torch.Tensor]:
        """Gemma3Processor's expansion: each <start_of_image> the template wrote becomes the image's run (and its
        crops' with pan & scan); pixel_values hold each image followed by its crops."""
        from .gemma3_image import expand_images
        if clips:
            raise ValueError("Gemma 3 takes images and text, not audio; use a Gemma 3n checkpoint for audio")
        out: dict[str, torch.Tensor] = {}
        crops: list[int] = []
        if images:
            self._check_media_tokens(True, False)
            processor = self.gemma3_image_processor()
            if isinstance(pan_and_scan, Mapping):
                processor = processor.with_pan_and_scan(True, **pan_and_scan)
            elif pan_and_scan:
                processor = processor.with_pan_and_scan(True)
            out["pixel_values"], crops = processor(images)
            # (a text-only prompt is left as written, as the tokenizer's own chat template would give it)
            text = expand_images(text, crops, self.config.vision_soft_tokens_per_image)
        ids = torch.tensor([self.tokenizer.encode(text, add_special_tokens=False)], dtype=torch.long)
        self.rendered_text = text  # what was tokenised, for inspection (Gemma3Processor's expanded text)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), **out}

    def gemma3_image_processor(self):
        if self._image_processor is None:
            from ..siglip_config import SiglipConfig
            from .gemma3_image import Gemma3ImageProcessor
            size = SiglipConfig.from_dict(self.config.vision).image_size if self.config.vision else 896
            # Gemma3Processor passes its own pan & scan defaults (off, 256 px, 4 crops, ratio 1.2) to the image
            # processor on every call, so preprocessor_config.json's pan & scan keys never take effect there
            self._image_processor = Gemma3ImageProcessor.from_config(
                self.preprocessor.get("image_processor"), size).with_pan_and_scan(False, **GEMMA3_PAN_AND_SCAN)
        return self._image_processor

    def _check_media_tokens(self, images: bool, clips: bool) -> None:
        """The tokenizer must spell the placeholders as the ids the model expects, or the media would be lost."""
        cfg = self.config
        for wanted, token, token_id in ((images, IMAGE_TOKEN, cfg.image_token_id),
                                        (clips, AUDIO_TOKEN, cfg.audio_token_id)):
            found = self.tokenizer.token_to_id(token) if wanted else token_id
            if found != token_id:
                raise ValueError(f"this checkpoint's tokenizer maps {token} to {found}, but config.json expects id "
                                 f"{token_id}; use the tokenizer that ships with the checkpoint")

    def gather_media(self, messages, allow_network: bool = False) -> tuple[list[dict], list, list]:
        """Decode every media part, in order; returns the messages rewritten so that each remaining media part is
        one image or one clip of at most 30 s, the decoded images, and the clips (float32 mono 16 kHz)."""
        rewritten, images, clips = [], [], []
        for message in messages:
            content = message.get("content")
            if not isinstance(content, (list, tuple)):
                rewritten.append(message)
                continue
            parts = []
            for part in content:
                parts += self._decode_part(part, images, clips, allow_network)
            rewritten.append({**message, "content": parts})
        return rewritten, images, clips

    def _decode_part(self, part: Mapping, images: list, clips: list, allow_network: bool) -> list[dict]:
        kind = part.get("type")
        if kind == "text":
            return [part]
        source = media_source(part)
        if kind == "image":
            from .image import decode_for_processor  # in-memory images skip load_image, as in the reference
            images.append(decode_for_processor(source, allow_network=allow_network))
            return [{"type": "image"}]
        if kind == "audio":
            from .audio import load_audio
            windows = split_long_audio(load_audio(source, allow_network=allow_network), describe(source))
            clips.extend(windows)
            return [{"type": "audio"} for _ in windows]
        from .video import video_parts  # a video is its frames (image parts) and its sound track (an audio part)
        out = []
        for sub in video_parts(source, self.preprocessor, allow_network=allow_network):
            out += self._decode_part(sub, images, clips, allow_network)
        return out

    # -- preprocessors (built on first use) ------------------------------------------------------------------------

    def image_processor(self, images: list) -> torch.Tensor:
        if self._image_processor is None:
            from .image import ImageProcessor
            self._image_processor = ImageProcessor.from_config(self.preprocessor.get("image_processor"))
        return self._image_processor(images)

    def audio_extractor(self, clips: list) -> tuple[torch.Tensor, torch.Tensor]:
        if self._audio_extractor is None:
            from .audio import AudioFeatureExtractor
            self._audio_extractor = AudioFeatureExtractor.from_config(self.preprocessor.get("feature_extractor"))
        features, mask = self._audio_extractor(clips)
        return torch.as_tensor(features), torch.as_tensor(mask).bool()


def media_source(part: Mapping) -> Any:
    """The payload of an HF media part: {"type": "image", "image" | "url" | "path": ...} (audio, video alike)."""
    for key in MEDIA_KEYS[part["type"]]:
        if part.get(key) is not None:
            return part[key]
    raise ValueError(f"a {part['type']} part needs one of the keys {', '.join(MEDIA_KEYS[part['type']])}")


def has_media(messages) -> bool:
    """Whether any message holds an image, audio or video part."""
    return any(isinstance(m, Mapping) and isinstance(m.get("content"), (list, tuple))
               and any(isinstance(p, Mapping) and p.get("type") in MEDIA_KEYS for p in m["content"])
               for m in messages)


def split_long_audio(wave, name: str = "audio") -> list:
    """A clip longer than 30 s becomes consecutive windows of at most 30 s, cut in pauses, each read as its own
    clip (the reference would silently drop everything after 30 s). Says so with a warning."""
    from .audio_windows import split_windows
    if len(wave) <= MAX_CLIP_SECONDS * SAMPLE_RATE:
        return [wave]
    pieces = [wave[a:b] for a, b in split_windows(wave, SAMPLE_RATE, MAX_CLIP_SECONDS)]
    warnings.warn(f"{name} is {len(wave) / SAMPLE_RATE:.1f} s long; the model hears at most {MAX_CLIP_SECONDS} s per "
                  f"clip, so it is given as {len(pieces)} consecutive clips (for a transcript of a long recording "
                  "use `gemma3n transcribe`)", stacklevel=3)
    return pieces


def describe(source: Any) -> str:
    """A short name for a media source, for messages."""
    if isinstance(source, (str, Path)):
        text = str(source)
        return text if len(text) < 80 else text[:77] + "..."
    return f"a {type(source).__name__} audio input"


def read_preprocessor_config(folder: Path | None) -> dict[str, Any]:
    """{"image_processor": {...}, "feature_extractor": {...}} from the checkpoint's processor files, if any.

    transformers writes either one flat `preprocessor_config.json` (image and audio keys side by side) or a
    `processor_config.json` with nested sections; each preprocessor reads only its own keys from what it gets."""
    if folder is None or not Path(folder).is_dir():
        return {}
    merged: dict[str, Any] = {}
    for name in ("preprocessor_config.json", "processor_config.json"):
        path = Path(folder) / name
        if not path.exists():
            continue
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path}: not valid JSON ({e}); fix or delete the file") from None
        if isinstance(data, dict):
            # flat keys may be dicts too (the released files' "size": {"height": 768, "width": 768})
            merged.update({k: v for k, v in data.items() if k not in ("image_processor", "feature_extractor")})
            for section in ("image_processor", "feature_extractor"):
                if isinstance(data.get(section), dict):
                    merged.setdefault(section, {}).update(data[section])
    if not merged:
        return {}
    flat = {k: v for k, v in merged.items() if k not in ("image_processor", "feature_extractor")}
    return {"image_processor": {**flat, **merged.get("image_processor", {})},
            "feature_extractor": {**flat, **merged.get("feature_extractor", {})}}
