"""Images in: decoding from many sources (`load_image`) and Gemma 3n's pixel preprocessing (`ImageProcessor`).

Two reference behaviours are reproduced on purpose, because Gemma3nProcessor has both:
* a *source* (path, URL, base64 / data: URL) goes through transformers' `load_image` first: EXIF orientation
  applied, then `convert("RGB")`, which drops any alpha channel;
* an in-memory *image* (PIL image, numpy array, tensor) goes straight to the image processor: no EXIF transpose,
  and transparency is composited onto white.
`ImageProcessor.__call__` accepts both kinds and routes each the way Gemma3nProcessor does, so the pixels match."""
from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from ..media import MediaError, MediaPolicy, read_source
from ..media import describe as describe_source


class ImageError(MediaError):
    """An image that cannot be used; the message names the source and says what to do."""


def describe(source: Any) -> str:
    """A short human name for an image source, for error messages."""
    if isinstance(source, np.ndarray):
        return f"numpy array of shape {source.shape} and dtype {source.dtype}"
    return describe_source(source)


def read_image_source(source: Any, allow_network: bool) -> bytes | Path:
    """The encoded bytes (or the file path) behind a source that is not already a decoded image (media/source.py;
    bare base64 text is taken, as transformers' load_image takes it)."""
    try:
        return read_source(source, "image", MediaPolicy(allow_network=allow_network, allow_bare_base64=True))
    except MediaError as e:
        raise ImageError(str(e)) from None


def _open(data: bytes | Path, name: str) -> Image.Image:
    """Decode fully now, so that a truncated or corrupt file fails here with its name, not later."""
    try:
        image = Image.open(data if isinstance(data, Path) else io.BytesIO(data))
        image.load()
        return image
    except UnidentifiedImageError:
        raise ImageError(f"{name} is not an image in a format Pillow can read (PNG, JPEG, WebP, GIF, BMP, TIFF, "
                         "...); check that it is the right file") from None
    except Image.DecompressionBombError as e:
        raise ImageError(f"{name}: the image is too large to decode safely ({e}); downscale it first") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageError(f"{name}: the image cannot be decoded, it may be truncated or corrupt ({e}); "
                         "re-export or re-download it") from None


def load_image(source: Any, allow_network: bool = False) -> Image.Image:
    """An RGB PIL image from a path, bytes, a base64 / data: URL, an http(s) URL (only with allow_network),
    a PIL image or a uint8 numpy array; EXIF orientation applied, then `convert("RGB")` (alpha dropped), exactly
    as transformers' `load_image` does for the sources it accepts."""
    if isinstance(source, Image.Image):
        image = source
    elif isinstance(source, np.ndarray):
        image = Image.fromarray(_as_rgb_array(source, describe(source)))
    else:
        image = _open(read_image_source(source, allow_network), describe(source))
    try:
        return ImageOps.exif_transpose(image).convert("RGB")
    except (OSError, ValueError) as e:
        raise ImageError(f"{describe(source)}: cannot convert the image to RGB ({e})") from None


def decode_for_processor(source: Any, allow_network: bool = False) -> Any:
    """What Gemma3nProcessor hands its image processor for a message's image: an in-memory image (PIL, numpy,
    tensor) as it is; any other source decoded by load_image now (so a bad file fails early, with its name)."""
    if isinstance(source, (Image.Image, np.ndarray, torch.Tensor)):
        return source
    return load_image(source, allow_network)


def _channels_last(array: np.ndarray, name: str) -> np.ndarray:
    """(H, W, C) from (H, W), (C, H, W) or (H, W, C); channels-first wins when ambiguous, as in transformers."""
    if array.ndim == 2:
        return array[..., None]
    if array.ndim == 3 and array.shape[0] in (1, 3, 4):
        return np.moveaxis(array, 0, -1)
    if array.ndim == 3 and array.shape[-1] in (1, 3, 4):
        return array
    raise ImageError(f"{name}: expected an image array of shape (H, W), (H, W, C) or (C, H, W) with C in 1, 3, 4")


def _as_rgb_array(array: np.ndarray, name: str) -> np.ndarray:
    """An (H, W, 3) uint8 array, with the reference image processor's rules for 1 and 4 channels."""
    if array.dtype != np.uint8:
        raise ImageError(f"{name}: image arrays must be uint8 in 0..255; convert with "
                         "(array * 255).round().astype(np.uint8) for floats in [0, 1]")
    array = _channels_last(array, name)
    if array.shape[-1] == 1:
        return np.repeat(array, 3, axis=-1)
    if array.shape[-1] == 4:  # blend onto white, in float64 then rounded (transformers' convert_to_rgb)
        alpha = array[..., 3:4] / 255
        return np.round(alpha * array[..., :3] + (1 - alpha) * 255).astype(np.uint8)
    return np.ascontiguousarray(array)


def pil_to_rgb_array(image: Image.Image) -> np.ndarray:
    """Transparency (an alpha band or a palette/tRNS transparent colour) composited onto white, then RGB."""
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(white, image.convert("RGBA"))
    return np.asarray(image.convert("RGB"))


# What transformers' SiglipImageProcessor uses for a key that preprocessor_config.json leaves out.
_REFERENCE_DEFAULTS = dict(size={"height": 224, "width": 224}, resample=3, do_resize=True, do_rescale=True,
                           rescale_factor=1 / 255, do_normalize=True, image_mean=[0.5] * 3, image_std=[0.5] * 3)
# The values the released Gemma 3n checkpoints write (the conversion script's processor settings).
_RELEASED = dict(_REFERENCE_DEFAULTS, size={"height": 768, "width": 768}, resample=2, do_normalize=False)


@dataclass(frozen=True)
class ImageProcessor:
    """Gemma 3n's image preprocessing: RGB -> resize to height x width -> x rescale_factor [-> normalise].

    Resizing uses Pillow, as transformers' PIL backend (`SiglipImageProcessorPil`) does. AutoImageProcessor picks
    the torchvision backend when torchvision is installed, whose antialiased tensor resize differs from Pillow's
    by up to a few uint8 levels; we match the PIL backend (no torchvision dependency)."""
    height: int = 768
    width: int = 768
    resample: int = 2  # PIL.Image.Resampling.BILINEAR
    do_resize: bool = True
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = False
    image_mean: tuple = (0.5, 0.5, 0.5)
    image_std: tuple = (0.5, 0.5, 0.5)

    @classmethod
    def from_config(cls, config: Mapping[str, Any] | None) -> "ImageProcessor":
        """From preprocessor_config.json's contents (flat, or nested under "image_processor"); None gives the
        settings of the released checkpoints. Keys the file leaves out take the reference class's defaults."""
        if config is None:
            config = _RELEASED
        config = config.get("image_processor", config)
        get = lambda key: config[key] if config.get(key) is not None else _REFERENCE_DEFAULTS[key]  # noqa: E731
        size = get("size")
        if not (isinstance(size, Mapping) and "height" in size and "width" in size):
            raise ValueError(f"preprocessor_config.json: image size {size!r} is not supported; Gemma 3n resizes "
                             'to an exact {"height": H, "width": W}')
        mean, std = get("image_mean"), get("image_std")
        return cls(height=int(size["height"]), width=int(size["width"]), resample=int(get("resample")),
                   do_resize=bool(get("do_resize")), do_rescale=bool(get("do_rescale")),
                   rescale_factor=float(get("rescale_factor")), do_normalize=bool(get("do_normalize")),
                   image_mean=tuple(mean if isinstance(mean, (list, tuple)) else [mean] * 3),
                   image_std=tuple(std if isinstance(std, (list, tuple)) else [std] * 3))

    def __call__(self, images: list, allow_network: bool = False) -> torch.Tensor:
        """(N, 3, height, width) float32 pixel values, equal to the reference processor's `pixel_values`."""
        if not isinstance(images, (list, tuple)):
            images = [images]
        arrays = [self.preprocess(self.to_rgb_array(image, allow_network)) for image in images]
        if not arrays:
            return torch.empty(0, 3, self.height, self.width)
        return torch.from_numpy(np.stack(arrays)).float()

    @staticmethod
    def to_rgb_array(image: Any, allow_network: bool = False) -> np.ndarray:
        """(H, W, 3) uint8: in-memory images as the image processor converts them, sources via load_image."""
        if isinstance(image, torch.Tensor):
            image = image.numpy()
        if isinstance(image, Image.Image):
            try:
                return pil_to_rgb_array(image)
            except (OSError, ValueError) as e:
                raise ImageError(f"PIL image ({image.mode}, {image.size}): cannot convert to RGB ({e})") from None
        if isinstance(image, np.ndarray):
            return _as_rgb_array(image, describe(image))
        # As the reference chains them: load_image, then the processor's own RGB conversion. (A palette image
        # with a transparent index keeps that colour as info["transparency"] through convert("RGB"), and the
        # processor then whitens it.)
        return pil_to_rgb_array(load_image(image, allow_network))

    def preprocess(self, rgb: np.ndarray) -> np.ndarray:  # (H, W, 3) uint8 -> (3, height, width)
        if self.do_resize:
            resized = Image.fromarray(rgb).resize((self.width, self.height), resample=self.resample)
            rgb = np.asarray(resized)
        chw = np.moveaxis(rgb, -1, 0)
        if self.do_rescale:  # float64 product, then float32, as transformers' rescale does
            chw = (chw.astype(np.float64) * self.rescale_factor).astype(np.float32)
        else:
            chw = chw.astype(np.float32)
        if self.do_normalize:
            mean = np.asarray(self.image_mean, dtype=np.float32)[:, None, None]
            std = np.asarray(self.image_std, dtype=np.float32)[:, None, None]
            chw = (chw - mean) / std
        return chw
