"""Gemma 3's image preprocessing (transformers' `Gemma3ImageProcessor`, PIL backend) with pan & scan, and the prompt
text `Gemma3Processor` writes for each image.

Every image is resized (Pillow bilinear) to exactly the tower's size (896 x 896 for the released models; aspect
ratio not kept), rescaled by 1/255 and normalised with mean = std = 0.5 to [-1, 1]. With pan & scan, an image whose
aspect ratio reaches `min_ratio` is also cut along its long side into 2..`max_crops` equal crops (about one per unit
of aspect ratio, each at least `min_crop_size` px), which follow the image in `pixel_values`, each one an image of
its own; the prompt then introduces them ("Here is the original image ... and here are some crops to help you see
better ...").
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, replace
from typing import Any, Mapping

import numpy as np
import torch

from .chat import BOI_TOKEN, EOI_TOKEN, IMAGE_TOKEN
from .image import ImageProcessor

# Gemma3Processor's defaults for what preprocessor_config.json leaves null (the released files do).
PAN_AND_SCAN_DEFAULTS = dict(do_pan_and_scan=False, pan_and_scan_min_crop_size=256, pan_and_scan_max_num_crops=4,
                             pan_and_scan_min_ratio_to_activate=1.2)


@dataclass(frozen=True)
class Gemma3ImageProcessor:
    """`processor(images) -> (pixel_values (N, 3, size, size) float32, crops per input image)`."""
    pixels: ImageProcessor = ImageProcessor(height=896, width=896, resample=2, do_normalize=True)
    do_pan_and_scan: bool = False
    min_crop_size: int = 256
    max_crops: int = 4
    min_ratio: float = 1.2

    @classmethod
    def from_config(cls, config: Mapping[str, Any] | None, image_size: int = 896) -> "Gemma3ImageProcessor":
        """From preprocessor_config.json's contents; absent keys take the released checkpoints' values, with the
        tower's `image_size`."""
        config = dict((config or {}).get("image_processor", config or {}))
        base = {"size": {"height": image_size, "width": image_size}, "resample": 2, "do_normalize": True,
                "image_mean": [0.5] * 3, "image_std": [0.5] * 3, "do_resize": True, "do_rescale": True,
                "rescale_factor": 1 / 255}
        pixels = ImageProcessor.from_config({**base, **{k: v for k, v in config.items() if v is not None}})
        get = lambda key: config[key] if config.get(key) is not None else PAN_AND_SCAN_DEFAULTS[key]  # noqa: E731
        return cls(pixels, bool(get("do_pan_and_scan")), int(get("pan_and_scan_min_crop_size")),
                   int(get("pan_and_scan_max_num_crops")), float(get("pan_and_scan_min_ratio_to_activate")))

    def with_pan_and_scan(self, enabled: bool = True, **settings) -> "Gemma3ImageProcessor":
        """A copy with pan & scan on or off; settings: min_crop_size, max_crops, min_ratio."""
        allowed = {"min_crop_size": int, "max_crops": int, "min_ratio": (int, float)}
        for key, value in settings.items():
            if key not in allowed:
                raise ValueError(f"pan & scan setting {key!r} is unknown; use {', '.join(allowed)}")
            if isinstance(value, bool) or not isinstance(value, allowed[key]) or value <= 0:
                raise ValueError(f"pan & scan setting {key} must be a positive number, got {value!r}")
        return replace(self, do_pan_and_scan=bool(enabled), **settings)

    def __call__(self, images: list, allow_network: bool = False) -> tuple[torch.Tensor, list[int]]:
        if not isinstance(images, (list, tuple)):
            images = [images]
        arrays, crops = [], []
        for image in images:
            rgb = ImageProcessor.to_rgb_array(image, allow_network)
            pieces = self.pan_and_scan(rgb) if self.do_pan_and_scan else []
            crops.append(len(pieces))
            arrays += [self.pixels.preprocess(np.ascontiguousarray(a)) for a in [rgb, *pieces]]
        if not arrays:
            return torch.empty(0, 3, self.pixels.height, self.pixels.width), []
        return torch.from_numpy(np.stack(arrays)).float(), crops

    def pan_and_scan(self, rgb: np.ndarray) -> list[np.ndarray]:
        """The crops of one (H, W, 3) image (none when it is not elongated enough or the crops would be too small),
        row-major, as the reference cuts them."""
        height, width = rgb.shape[:2]
        long_side, short_side = (width, height) if width >= height else (height, width)
        if long_side / short_side < self.min_ratio:
            return []
        count = int(math.floor(long_side / short_side + 0.5))  # round half up
        count = min(int(math.floor(long_side / self.min_crop_size)), count)
        count = min(self.max_crops, max(2, count))
        across, down = (count, 1) if width >= height else (1, count)
        crop_w, crop_h = int(math.ceil(width / across)), int(math.ceil(height / down))
        if min(crop_w, crop_h) < self.min_crop_size:
            return []
        return [rgb[top:top + crop_h, left:left + crop_w]
                for top, left in itertools.product(range(0, crop_h * down, crop_h), range(0, crop_w * across, crop_w))]


def image_sequence(tokens_per_image: int) -> str:
    """One image's run in the prompt: "\\n\\n<start_of_image>" + N x "<image_soft_token>" + "<end_of_image>\\n\\n"."""
    return f"\n\n{BOI_TOKEN}{IMAGE_TOKEN * tokens_per_image}{EOI_TOKEN}\n\n"


def expand_images(text: str, crops: list[int], tokens_per_image: int) -> str:
    """Replace the i-th "<start_of_image>" the chat template wrote by image i's run, or, when pan & scan cut it into
    crops, by the sentence that introduces the original and its crops (Gemma3Processor.replace_image_token)."""
    found = text.count(BOI_TOKEN)
    if found != len(crops):
        raise ValueError(f"the prompt has {found} {BOI_TOKEN} placeholders but {len(crops)} images were given")
    run = image_sequence(tokens_per_image)
    pieces = text.split(BOI_TOKEN)
    out = [pieces[0]]
    for n, rest in zip(crops, pieces[1:]):
        out.append(run if not n else f"Here is the original image {run} and here are some crops to help you see "
                                     "better " + " ".join([run] * n))
        out.append(rest)
    return "".join(out)
