"""Images in: decoding from many sources (`load_image`) and Gemma 3n's pixel preprocessing (`ImageProcessor`).

Two reference behaviours are reproduced on purpose, because Gemma3nProcessor has both:
* a *source* (path, URL, base64 / data: URL) goes through transformers' `load_image` first: EXIF orientation
  applied, then `convert("RGB")`, which drops any alpha channel;
* an in-memory *image* (PIL image, numpy array, tensor) goes straight to the image processor: no EXIF transpose,
  and transparency is composited onto white.
`ImageProcessor.__call__` accepts both kinds and routes each the way Gemma3nProcessor does, so the pixels match."""
from __future__ import annotations

import base64
import binascii
import io
import os
import re
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError


class ImageError(ValueError):
    """An image that cannot be used; the message names the source and says what to do."""


_BASE64 = re.compile(r"^[A-Za-z0-9+/=\s]{64,}$")


def describe(source: Any) -> str:
    """A short human name for an image source, for error messages."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        return f"<{len(source)} bytes>"
    if isinstance(source, str) and source.startswith("data:"):
        return f"data: URL ({len(source)} characters)"
    if isinstance(source, str) and len(source) > 200:
        return f"{source[:60]}... ({len(source)} characters)"
    if isinstance(source, np.ndarray):
        return f"numpy array of shape {source.shape} and dtype {source.dtype}"
    return str(source) if isinstance(source, (str, os.PathLike)) else type(source).__name__


def _read_source(source: Any, allow_network: bool) -> bytes | Path:
    """The encoded bytes (or the file path) behind a source that is not already a decoded image."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        if len(source) == 0:
            raise ImageError("image bytes are empty: pass the contents of an image file (PNG, JPEG, ...)")
        return bytes(source)
    if not isinstance(source, (str, os.PathLike)):
        raise ImageError(f"cannot read an image from a {type(source).__name__}: pass a path, URL, bytes, "
                         "a PIL image or a uint8 numpy array")
    text = os.fspath(source)
    if isinstance(text, str) and text.startswith("data:"):
        return _decode_data_url(text)
    if isinstance(text, str) and text.startswith(("http://", "https://")):
        return _download(text, allow_network)
    path = Path(text)
    try:
        if path.is_file():
            return path
    except OSError:  # e.g. a name too long to be a path: maybe base64 text
        pass
    if isinstance(text, str) and _BASE64.match(text):  # transformers also takes bare base64 text
        return _decode_base64(text, describe(text))
    if path.exists():
        raise ImageError(f"image path {text} is not a file: pass the path of an image file")
    raise ImageError(f"image file not found: {text} (check the path)")


def _decode_base64(text: str, name: str) -> bytes:
    try:
        data = base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError) as e:
        raise ImageError(f"{name}: invalid base64 image data ({e}); encode the file's bytes with base64") from None
    if not data:
        raise ImageError(f"{name}: the base64 image data is empty")
    return data


def _decode_data_url(url: str) -> bytes:
    header, comma, payload = url.partition(",")
    if not comma:
        raise ImageError(f"{describe(url)}: malformed data: URL (no ','); expected data:image/png;base64,....")
    if header.endswith(";base64"):
        return _decode_base64(payload, describe(url))
    data = urllib.parse.unquote_to_bytes(payload)
    if not data:
        raise ImageError(f"{describe(url)}: the data: URL holds no image data")
    return data


def _download(url: str, allow_network: bool) -> bytes:
    if not allow_network:
        raise ImageError(f"{url}: reading images from the network is off; download the file and pass its path, "
                         "or allow network access (allow_network=True)")
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            data = response.read()
    except OSError as e:
        raise ImageError(f"{url}: download failed ({e}); check the URL or download the file yourself") from None
    if not data:
        raise ImageError(f"{url}: the server returned no data")
    return data


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
        image = _open(_read_source(source, allow_network), describe(source))
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
