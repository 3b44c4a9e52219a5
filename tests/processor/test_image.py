"""Image loading and preprocessing equal transformers' (PIL backend: SiglipImageProcessorPil, what AutoImageProcessor
maps gemma3n to without torchvision) for generated images of several sizes, modes and EXIF orientations."""
from __future__ import annotations

import base64
import io

import numpy as np
import pytest
import torch
from PIL import Image

transformers = pytest.importorskip("transformers")

from transformers.image_utils import load_image as reference_load_image  # noqa: E402
from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil  # noqa: E402

from gemma3n.processor.image import ImageError, ImageProcessor, load_image  # noqa: E402

# What the released Gemma 3n checkpoints' preprocessor_config.json holds (image part).
RELEASED = {"size": {"height": 768, "width": 768}, "resample": 2, "do_resize": True, "do_rescale": True,
            "rescale_factor": 1 / 255, "do_normalize": False, "image_mean": [0.5] * 3, "image_std": [0.5] * 3,
            "do_convert_rgb": True}


def pixels(h: int, w: int, channels: int, seed: int) -> np.ndarray:
    """Noise on a gradient: smooth and sharp content, so resampling differences would show."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 255, w)[None, :, None] * np.linspace(0.2, 1, h)[:, None, None]
    return np.clip(ramp * 0.7 + rng.integers(0, 77, (h, w, channels)), 0, 255).astype(np.uint8)


def make_image(mode: str, h: int = 180, w: int = 260, seed: int = 0) -> Image.Image:
    rgba = pixels(h, w, 4, seed)
    if mode == "RGBA":
        return Image.fromarray(rgba, "RGBA")
    if mode == "LA":
        return Image.fromarray(rgba, "RGBA").convert("LA")
    if mode == "P":  # palette with a transparent index (tRNS)
        image = Image.fromarray(rgba[..., :3]).quantize(colors=16)
        image.info["transparency"] = 3
        return image
    if mode == "I;16":
        image = Image.fromarray(rgba[..., 0].astype(np.uint16) * 257)
        assert image.mode == "I;16"
        return image
    return Image.fromarray(rgba[..., :3]).convert(mode)  # RGB, L, CMYK


def reference(images, config=RELEASED) -> torch.Tensor:
    return SiglipImageProcessorPil(**config)(images=images, return_tensors="pt")["pixel_values"]


def ours(images, config=RELEASED) -> torch.Tensor:
    return ImageProcessor.from_config(config)(images)


@pytest.mark.parametrize("mode", ["RGB", "L", "RGBA", "LA", "P", "CMYK", "I;16"])
def test_pil_images_match_reference(mode):
    image = make_image(mode)
    got = ours([image])
    assert got.dtype == torch.float32 and got.shape == (1, 3, 768, 768)
    torch.testing.assert_close(got, reference([image]), rtol=0, atol=0)


@pytest.mark.parametrize("h,w", [(37, 1000), (768, 768), (1100, 900)])  # up, same, down; aspect ratio not kept
def test_sizes_and_batches_match_reference(h, w):
    images = [make_image("RGB", h, w, seed=1), make_image("RGB", 50, 60, seed=2)]
    torch.testing.assert_close(ours(images), reference(images), rtol=0, atol=0)


@pytest.mark.parametrize("layout", ["hwc3", "hwc4", "chw3", "hwc1"])
def test_numpy_arrays_match_reference(layout):
    array = pixels(90, 140, int(layout[-1]), seed=3)
    if layout.startswith("chw"):
        array = np.ascontiguousarray(np.moveaxis(array, -1, 0))
    torch.testing.assert_close(ours([array]), reference([array]), rtol=0, atol=0)


def test_other_config_values_are_honoured():
    config = {"size": {"height": 224, "width": 320}, "resample": 3, "do_normalize": True,
              "image_mean": [0.4, 0.5, 0.6], "image_std": [0.2, 0.3, 0.25], "rescale_factor": 1 / 255}
    image = make_image("RGB")
    got = ours([image], config)
    assert got.shape == (1, 3, 224, 320)
    torch.testing.assert_close(got, reference([image], config), rtol=0, atol=0)


def test_default_config_is_the_released_one():
    assert ImageProcessor.from_config(None) == ImageProcessor.from_config(RELEASED)
    assert ImageProcessor.from_config({"image_processor": RELEASED}) == ImageProcessor.from_config(RELEASED)


@pytest.fixture
def files(tmp_path):
    """Image files on disk: PNG in several modes, JPEG, CMYK JPEG, and a JPEG whose EXIF says rotate 90."""
    out = {}
    for mode in ["RGB", "L", "RGBA", "P", "I;16"]:
        out[mode] = tmp_path / f"{mode.replace(';', '')}.png"
        make_image(mode).save(out[mode])
    out["jpeg"] = tmp_path / "photo.jpg"
    make_image("RGB").save(out["jpeg"], quality=90)
    out["cmyk"] = tmp_path / "cmyk.jpg"
    make_image("CMYK").save(out["cmyk"])
    for orientation in (3, 6, 8):
        exif = Image.Exif()
        exif[0x0112] = orientation
        out[f"exif{orientation}"] = tmp_path / f"rotated{orientation}.jpg"
        make_image("RGB", 120, 200).save(out[f"exif{orientation}"], exif=exif)
    return out


def test_files_match_reference_load_image_then_processor(files):
    """A path goes through the reference's load_image (EXIF transpose, convert RGB) and then the processor."""
    for name, path in files.items():
        expected = reference([reference_load_image(str(path))])
        torch.testing.assert_close(ours([str(path)]), expected, rtol=0, atol=0, msg=name)
        assert np.array_equal(np.asarray(load_image(path)), np.asarray(reference_load_image(str(path)))), name
        # An already-open PIL image goes to the processor as is (the reference applies no EXIF transpose there).
        torch.testing.assert_close(ours([Image.open(path)]), reference([Image.open(path)]), rtol=0, atol=0,
                                   msg=f"{name} (PIL)")


def test_exif_orientation_is_applied(files):
    upright = load_image(files["exif6"])
    assert upright.size == (120, 200)  # stored 200 wide x 120 high; orientation 6 = rotate 90 clockwise
    assert load_image(files["exif3"]).size == (200, 120)


def test_all_sources_decode_to_the_same_image(files):
    path = files["jpeg"]
    data = path.read_bytes()
    b64 = base64.b64encode(data).decode()
    expected = np.asarray(load_image(path))
    for source in [str(path), data, bytearray(data), f"data:image/jpeg;base64,{b64}", b64,
                   Image.open(path), np.asarray(Image.open(path))]:
        assert np.array_equal(np.asarray(load_image(source)), expected), type(source)
        assert load_image(source).mode == "RGB"


@pytest.mark.parametrize("make_source,message", [
    (lambda p: p / "missing.png", "not found"),
    (lambda p: p, "not a file"),
    (lambda p: b"", "empty"),
    (lambda p: (p / "notes.txt").write_text("hello, not an image") and p / "notes.txt", "not an image"),
    (lambda p: b"GIF89a not really", "not an image"),
    (lambda p: "data:image/png;base64,@@@@", "invalid base64"),
    (lambda p: "https://example.com/cat.png", "network"),
    (lambda p: np.zeros((4, 4, 3), np.float32), "uint8"),
    (lambda p: np.zeros((5, 5, 7), np.uint8), "shape"),
    (lambda p: 12345, "cannot read an image from a int"),
])
def test_bad_input_is_a_clear_error(tmp_path, make_source, message):
    with pytest.raises(ImageError, match=message):
        load_image(make_source(tmp_path))


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_file_is_a_clear_error_naming_it(tmp_path, fmt):
    buffer = io.BytesIO()
    make_image("RGB").save(buffer, fmt)
    path = tmp_path / f"cut.{fmt.lower()}"
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    with pytest.raises(ImageError, match=f"{path.name}.*(truncated|corrupt)"):
        ImageProcessor()([str(path)])


def test_error_is_a_value_error_with_a_short_trace(tmp_path):
    with pytest.raises(ValueError) as info:
        load_image(tmp_path / "nope.jpg")
    assert info.value.__cause__ is None and "nope.jpg" in str(info.value)
