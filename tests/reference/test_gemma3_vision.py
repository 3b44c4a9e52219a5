"""Gemma 3 with images against transformers' Gemma3ForConditionalGeneration: a tiny seeded checkpoint (tiny text
decoder, small SigLIP) written by save_pretrained; prompts and pixels made by our Processor from chat messages with
one and several images, with and without pan & scan; the reference gets the same ids and pixels (and the
token_type_ids Gemma3Processor gives it, which switch on its image-block mask). Logits <= 1e-4 relative in fp32,
greedy generations identical, prefill chunks that would split an image change nothing. Also a SigLIP tower of the
released width at 896 px against transformers' SiglipVisionModel (all 27 layers: slow)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import gemma3n
from gemma3n.engine import generate as engine
from gemma3n.engine.sampling import SamplingParams

from .tiny_gemma3 import MEDIA, TOKENS_PER_IMAGE, build_gemma3_reference, image_run, write_gemma3_tokenizer

pytest.importorskip("transformers")
RTOL = 1e-4


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    torch.set_num_threads(1)
    ref = build_gemma3_reference(seed=3)
    folder = tmp_path_factory.mktemp("gemma3_vision")
    ref.save_pretrained(folder)
    write_gemma3_tokenizer(folder, image_size=64)
    return ref, gemma3n.load(folder)


def picture(h: int, w: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 255, w)[None, :, None] * np.linspace(0.2, 1, h)[:, None, None]
    return Image.fromarray(np.clip(ramp * 0.7 + rng.integers(0, 77, (h, w, 3)), 0, 255).astype(np.uint8))


def messages(*images: Image.Image) -> list[dict]:
    return [{"role": "user", "content": [{"type": "text", "text": "w17 w18"},
                                         *[{"type": "image", "image": im} for im in images],
                                         {"type": "text", "text": "w40 w41 w42"}]}]


def reference_logits(ref, ids, pixels):
    with torch.no_grad():
        return ref(input_ids=ids, pixel_values=pixels,
                   token_type_ids=(ids == MEDIA["image_token_index"]).long()).logits.float()


def rel(got, want) -> float:
    return ((got - want).abs().max() / want.abs().max()).item()


# one image; three (with the pan & scan settings below: a wide one cut in 2 crops, a tall one in 4)
PROMPTS = {"one": [(80, 60, 1)], "several": [(300, 700, 2), (50, 50, 3), (900, 250, 4)]}


@pytest.mark.parametrize("pan_and_scan", [None, {"min_crop_size": 64}], ids=["plain", "pan_and_scan"])
@pytest.mark.parametrize("prompt", sorted(PROMPTS))
def test_logits_equal_the_reference(pair, prompt, pan_and_scan):
    ref, ours = pair
    ours.pan_and_scan = pan_and_scan
    try:
        inputs = ours.processor(messages(*[picture(*spec) for spec in PROMPTS[prompt]]))
    finally:
        ours.pan_and_scan = None
    ids, pixels = inputs["input_ids"], inputs["pixel_values"]
    images = pixels.shape[0]
    assert int((ids == MEDIA["image_token_index"]).sum()) == images * TOKENS_PER_IMAGE
    if pan_and_scan and prompt == "several":
        assert images == 3 + 2 + 4  # the crops are images of their own (2 and 4 here)
    want = reference_logits(ref, ids, pixels)
    got = ours.logits(ids, pixel_values=pixels)
    assert ours.multimodal.loaded_towers == ["vision"]
    assert torch.isfinite(want).all()
    assert rel(got, want) <= RTOL


def test_the_image_block_rule_matters(pair):
    """Without token_type_ids the reference masks images causally: its logits differ from ours and the rule's."""
    ref, ours = pair
    ids = torch.tensor([[2, 31, 7, *image_run(), 99, *image_run(), 13, 44]])
    pixels = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        causal = ref(input_ids=ids, pixel_values=pixels).logits.float()
    want = reference_logits(ref, ids, pixels)
    got = ours.logits(ids, pixel_values=pixels)
    assert rel(got, want) <= RTOL
    assert rel(causal, want) > 1e-2
    # the images matter: swapped, the logits after the first image change
    assert rel(ours.logits(ids, pixel_values=pixels.flip(0))[:, 20:], got[:, 20:]) > 1e-2


def test_greedy_generation_equals_the_reference(pair):
    ref, ours = pair
    ours.pan_and_scan = {"min_crop_size": 64}
    try:
        ids, embeds = ours.prepare(messages(picture(300, 700, 2), picture(60, 70, 5)))
        pixels = ours.processor(messages(picture(300, 700, 2), picture(60, 70, 5)))["pixel_values"]
    finally:
        ours.pan_and_scan = None
    with torch.no_grad():
        want = ref.generate(input_ids=ids, pixel_values=pixels,
                            token_type_ids=(ids == MEDIA["image_token_index"]).long(),
                            attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False,
                            eos_token_id=None, pad_token_id=0)[0, ids.shape[1]:].tolist()
    params = SamplingParams(temperature=0.0, max_new_tokens=12)
    got = engine.generate_ids(ours.decoder, ids, params, (), inputs_embeds=embeds)[0]
    assert got == want
    # prefill chunks of 7 columns would cut every image block: the chunks are widened, nothing changes
    chunked = engine.generate_ids(ours.decoder, ids, params, (), inputs_embeds=embeds, chunk_size=7)[0]
    assert chunked == want
    # the prefill with images runs the eager layers, the decode steps the native step (where it is built)
    from gemma3n import kernels
    from gemma3n.engine.batch import ContinuousBatch
    loop = ContinuousBatch(ours.decoder)
    loop.add(ids, params, (), inputs_embeds=embeds)
    loop.step()  # the prompt (one chunk) and the first token
    loop.step()  # the first decode step
    if kernels.native() is not None:
        assert loop.groups[0].cache.native_decoder[1] is not None


def test_chat_generation_runs_through_the_model_api(pair):
    _, ours = pair
    record = ours.complete(messages(picture(100, 90, 6)), max_new_tokens=5, temperature=0)
    assert record.new_tokens == 5 or record.finish_reason == "stop"
    assert record.prompt_tokens > TOKENS_PER_IMAGE


def test_text_only_gemma3_refuses_images(tmp_path):
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    from .tiny_gemma3 import TEXT
    torch.manual_seed(0)
    Gemma3ForCausalLM(Gemma3TextConfig(**TEXT)).save_pretrained(tmp_path)
    write_gemma3_tokenizer(tmp_path)
    model = gemma3n.load(tmp_path)
    assert model.multimodal is None
    with pytest.raises(ValueError, match="text-only"):
        model.generate(messages(picture(40, 40, 1)), max_new_tokens=2)


def real_size_pair(layers: int, image_size: int = 896):
    """transformers' SiglipVisionModel of the released Gemma 3 tower's width (So400m/14; 896 px, 27 layers) with
    `layers` encoder layers at `image_size`, random weights, and ours built from its state dict."""
    from transformers import SiglipVisionConfig, SiglipVisionModel

    from gemma3n.model.siglip import build_siglip_tower
    from .tiny import randomize
    config = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=layers, num_attention_heads=16,
                  image_size=image_size, patch_size=14, vision_use_head=False)
    torch.manual_seed(0)
    ref = randomize(SiglipVisionModel(SiglipVisionConfig(**config, attn_implementation="eager")), 0, scale=0.02)
    with torch.device("meta"):
        ours = build_siglip_tower(config)
    state = {k.removeprefix("vision_model."): v for k, v in ref.state_dict().items() if "position_ids" not in k}
    ours.load_state_dict(state, strict=True, assign=True)
    return ref, ours.eval()


def check_real_size(layers: int, image_size: int = 896) -> None:
    torch.set_num_threads(2)
    ref, ours = real_size_pair(layers, image_size)
    pixels = torch.rand(1, 3, image_size, image_size, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        want = ref(pixel_values=pixels).last_hidden_state
        got = ours(pixels)
    assert got.shape == (1, (image_size // 14) ** 2, 1152)
    assert rel(got, want) <= RTOL


def test_real_width_tower():
    check_real_size(layers=1, image_size=448)  # quick: the full tower at 896 px is the slow test below


@pytest.mark.slow
def test_real_size_tower_at_896_px():
    check_real_size(layers=27)


def test_released_layout_sharded_loads_strictly(pair, tmp_path):
    """The released checkpoints' names (vision_tower.vision_model., language_model.model.), in several shards with
    an index, load to the same logits; a stray vision tensor or a missing one is refused with its name."""
    import json

    from safetensors.torch import load_file, save_file
    ref, ours = pair
    tensors = load_file(str(ours.path / "model.safetensors"))
    renamed = {("vision_tower.vision_model." + k[len("vision_tower."):] if k.startswith("vision_tower.") else k): v
               for k, v in tensors.items()}
    names = sorted(renamed)
    shards = {f"model-0000{i + 1}-of-00003.safetensors": names[i::3] for i in range(3)}
    folder = tmp_path / "released"
    folder.mkdir()
    for file, part in shards.items():
        save_file({k: renamed[k].contiguous() for k in part}, str(folder / file), metadata={"format": "pt"})
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: f for f, part in shards.items() for k in part}}))
    (folder / "config.json").write_text((ours.path / "config.json").read_text())
    ids = torch.tensor([[2, 31, *image_run(), 13]])
    pixels = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(4)) * 2 - 1
    assert rel(gemma3n.load(folder).logits(ids, pixel_values=pixels), reference_logits(ref, ids, pixels)) <= RTOL

    from gemma3n.checkpoint.safetensors import CheckpointError
    first = next(iter(shards))
    part = {k: renamed[k].contiguous() for k in shards[first]}
    save_file({**part, "vision_tower.vision_model.head.probe.weight": torch.zeros(3)}, str(folder / first),
              metadata={"format": "pt"})
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    index["weight_map"]["vision_tower.vision_model.head.probe.weight"] = first
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="unexpected tensor 'vision_tower.vision_model.head.probe.weight'"):
        gemma3n.load(folder)  # checked when the checkpoint loads, not at the first image
