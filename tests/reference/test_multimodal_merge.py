"""The multimodal merge against the reference `Gemma3nForConditionalGeneration`.

The towers here are the reference's own (wrapped to our tower interface), so these tests pin down the embedders,
the hard-token ranges, the soft-token scatter, the audio padding and the generation path with `inputs_embeds`
independently of our tower implementations (which have their own parity tests).
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

import gemma3n
from gemma3n.engine.generate import generate_ids
from gemma3n.engine.sampling import SamplingParams

from .tiny import TINY_MEDIA_TOKENS as TOK

pytest.importorskip("transformers")


class ReferenceVision(nn.Module):
    """The reference vision tower behind our tower interface: (N, 3, H, W) -> (N, S, C)."""

    def __init__(self, ref):
        super().__init__()
        self.tower = ref.model.vision_tower

    def forward(self, pixel_values):
        out = self.tower(pixel_values=pixel_values, do_pooling=False, return_dict=True).last_hidden_state
        return out.flatten(2).transpose(1, 2)


class ReferenceAudio(nn.Module):
    """The reference audio encoder behind our tower interface (padding mask True = padding)."""

    def __init__(self, ref):
        super().__init__()
        self.tower = ref.model.audio_tower

    def forward(self, features, padding):
        out = self.tower(features, padding, return_dict=True)
        return out.last_hidden_state, out.audio_mel_mask


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    from .tiny import build_reference, save_reference
    torch.manual_seed(0)
    ref = build_reference("multimodal", seed=7, scale=0.1)
    folder = save_reference(ref, tmp_path_factory.mktemp("mm"))
    ours = gemma3n.load(folder)
    ours.multimodal.set_tower_loader("vision", lambda: ReferenceVision(ref))
    ours.multimodal.set_tower_loader("audio", lambda: ReferenceAudio(ref))
    ours.folder = folder
    return ref, ours


def _prompt(images: int, clips: int, seed: int = 0) -> torch.Tensor:
    """Text, then each image run (boi, 256 soft, eoi), then each audio run (boa, 188 soft, eoa), then text."""
    g = torch.Generator().manual_seed(seed)
    ids = [2] + torch.randint(3, 240, (5,), generator=g).tolist()
    for _ in range(images):
        ids += [TOK["boi_token_id"]] + [TOK["image_token_id"]] * 256 + [TOK["eoi_token_id"], 17]
    for _ in range(clips):
        ids += [TOK["boa_token_id"]] + [TOK["audio_token_id"]] * 188 + [TOK["eoa_token_id"], 19]
    ids += torch.randint(3, 240, (4,), generator=g).tolist() + [400, 470]  # two hard media-vocabulary ids
    return torch.tensor([ids])


def _audio(lengths: list[int], frames: int = 240):
    g = torch.Generator().manual_seed(3)
    features = torch.randn(len(lengths), frames, 128, generator=g)
    mask = torch.arange(frames)[None] < torch.tensor(lengths)[:, None]
    return features, mask


def test_embedder_matches_reference(pair):
    ref, ours = pair
    x = torch.randn(3, 5, ref.config.vision_config.hidden_size)
    ids = torch.tensor([[384, 390, 447]])
    for name in ("embed_vision", "embed_audio"):
        ref_e, our_e = getattr(ref.model, name), getattr(ours.multimodal, name)
        dim = ref_e.multimodal_hidden_size
        with torch.no_grad():
            torch.testing.assert_close(our_e.soft(x[..., :dim]), ref_e(inputs_embeds=x[..., :dim]), rtol=1e-5, atol=1e-5)
            hard = ids + (our_e.vocab_offset - 384)
            torch.testing.assert_close(our_e.hard(hard), ref_e(input_ids=hard), rtol=1e-5, atol=1e-5)


def test_two_images_and_two_clips_give_the_reference_logits(pair):
    ref, ours = pair
    ids = _prompt(images=2, clips=2)
    pixels = torch.rand(2, 3, 256, 256, generator=torch.Generator().manual_seed(1))
    features, mask = _audio([240, 150])
    with torch.no_grad():
        want = ref(input_ids=ids, pixel_values=pixels, input_features=features, input_features_mask=mask).logits
    got = ours.logits(ids, pixel_values=pixels, input_features=features, input_features_mask=mask)
    assert torch.isfinite(want).all()
    torch.testing.assert_close(got, want.float(), rtol=1e-4, atol=1e-4)


def test_hard_media_ids_without_media_match_the_reference(pair):
    ref, ours = pair
    ids = torch.tensor([[2, 10, 384, 385, 400, 448, 449, 470, 11]])  # placeholders without media: hard embeddings
    with torch.no_grad():
        want = ref(input_ids=ids).logits
    torch.testing.assert_close(ours.logits(ids), want.float(), rtol=1e-4, atol=1e-4)


def test_greedy_generation_with_media_matches_the_reference(pair):
    """Cached, chunked prefill with inputs_embeds (chunks cut through the soft-token runs) then decode."""
    ref, ours = pair
    ids = _prompt(images=1, clips=1, seed=5)
    pixels = torch.rand(1, 3, 256, 256, generator=torch.Generator().manual_seed(2))
    features, mask = _audio([200])
    with torch.no_grad():
        want = ref.generate(input_ids=ids, pixel_values=pixels, input_features=features, input_features_mask=mask,
                            max_new_tokens=12, do_sample=False)[0, ids.shape[1]:].tolist()
    embeds = ours.embed_media(ids, pixels, features, mask)
    got = generate_ids(ours.decoder, ids, SamplingParams(temperature=0.0, max_new_tokens=12), stop_ids=(),
                       inputs_embeds=embeds, chunk_size=100)[0]
    assert got == want[:len(got)] and len(got) == 12


def test_placeholder_count_mismatch_is_a_clear_error(pair):
    _, ours = pair
    ids = _prompt(images=2, clips=0)
    with pytest.raises(ValueError, match="512 image placeholder tokens but the image inputs give 256"):
        ours.logits(ids, pixel_values=torch.rand(1, 3, 256, 256))


def test_towers_load_only_when_needed(pair):
    _, ours = pair
    fresh = gemma3n.load(ours.folder)
    fresh.logits(torch.tensor([[2, 10, 11, 400]]))
    assert fresh.multimodal.loaded_towers == []  # a text prompt (even with hard media ids) builds no tower


def test_text_only_checkpoint_refuses_media(reference_checkpoint):
    _, folder = reference_checkpoint("mixed")
    model = gemma3n.load(folder)
    with pytest.raises(ValueError, match="text-only checkpoint"):
        model.logits(torch.tensor([[2, 3]]), pixel_values=torch.rand(1, 3, 256, 256))
