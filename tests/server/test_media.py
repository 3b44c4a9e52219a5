"""Images and audio through the official `openai` client, on a tiny multimodal checkpoint (vision and audio towers,
a word-level tokenizer, the Gemma 3n chat template): every answer equals the same request run through
`gemma3n.load(folder).generate(messages)` (greedy) with the same media bytes; broken media get a 400 that says what
was wrong, and the server keeps serving."""
from __future__ import annotations

import base64
import io
import json

import httpx
import numpy as np
import pytest
import torch

import gemma3n
from gemma3n.server import ServerSettings
from gemma3n.server.generation import INSTRUCTIONS

from ..processor.audio_samples import encode, synthetic_speech
from ..reference.tiny import build_reference, save_reference, write_tiny_tokenizer
from .conftest import RunningServer

NEW = 8
MAX_SECONDS = 3.0
SETTINGS = dict(model_name="tiny-mm", max_body_bytes=1 << 20, max_tokens=NEW, max_audio_seconds=MAX_SECONDS)
QUESTION = "w17 w18 w19"  # words of the tiny vocabulary, so the text part is real tokens, not <unk>


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    torch.manual_seed(0)
    path = save_reference(build_reference("multimodal", seed=33, scale=0.1), tmp_path_factory.mktemp("mm_served"))
    write_tiny_tokenizer(path)
    # 256 px instead of the released 768 keeps the vision tower quick; it also makes both sides read the
    # checkpoint's preprocessor_config.json.
    (path / "preprocessor_config.json").write_text(json.dumps(
        {"size": {"height": 256, "width": 256}, "resample": 2, "do_normalize": False}))
    return path


@pytest.fixture(scope="module")
def direct(folder):
    """The same checkpoint loaded again, away from the server: the answers' oracle."""
    return gemma3n.load(folder)


@pytest.fixture(scope="module")
def mm_server(folder):
    running = RunningServer(gemma3n.load(folder), ServerSettings(**SETTINGS))
    yield running
    running.close()


@pytest.fixture(scope="module")
def mm_client(mm_server):
    import openai
    return openai.OpenAI(base_url=mm_server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def png(seed: int, size=(60, 80)) -> bytes:
    from PIL import Image
    pixels = np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def plain_png(size=(60, 80)) -> bytes:
    """A smooth picture: a bright horizontal ramp."""
    from PIL import Image
    ramp = np.broadcast_to(np.linspace(128, 255, size[1], dtype=np.uint8)[None, :, None], (*size, 3))
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(ramp)).save(buffer, format="PNG")
    return buffer.getvalue()


def sound(seconds: float = 2.0, fmt: str = "wav") -> bytes:
    return encode(synthetic_speech(16_000, seconds), 16_000, fmt)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def image_part(data: bytes) -> dict:
    return {"type": "image_url", "image_url": {"url": "data:image/png;base64," + b64(data)}}


def audio_part(data: bytes, fmt: str = "wav") -> dict:
    return {"type": "input_audio", "input_audio": {"data": b64(data), "format": fmt}}


def ask(client, *parts, **kw):
    content = [*parts, {"type": "text", "text": QUESTION}]
    return client.chat.completions.create(model="tiny-mm", messages=[{"role": "user", "content": content}],
                                          max_tokens=NEW, temperature=0, **kw)


def expected(direct, *media: dict, text: str = QUESTION) -> str:
    """The direct answer for one user turn [media..., text]."""
    return direct.generate([{"role": "user", "content": [*media, {"type": "text", "text": text}]}],
                           max_new_tokens=NEW, temperature=0)


def test_image_url_part_equals_direct_generation(mm_client, direct):
    reply = ask(mm_client, image_part(png(1)))
    want = expected(direct, {"type": "image", "image": png(1)})
    assert reply.choices[0].message.content == want and len(want.split()) >= 2
    prompt = direct.processor([{"role": "user", "content": [{"type": "image", "image": png(1)},
                                                            {"type": "text", "text": QUESTION}]}])["input_ids"]
    assert reply.usage.prompt_tokens == prompt.shape[1] > direct.config.vision_soft_tokens_per_image
    # Another picture: the server still answers as the direct call does, and the picture is seen (the logits move;
    # the tiny test model's greedy words need not, its tower being well conditioned).
    other = ask(mm_client, image_part(plain_png())).choices[0].message.content
    assert other == expected(direct, {"type": "image", "image": plain_png()})
    seen = [direct.logits(**{k: v for k, v in direct.processor([{"role": "user", "content": [
        {"type": "image", "image": picture}, {"type": "text", "text": QUESTION}]}]).items() if k != "attention_mask"})
        for picture in (png(1), plain_png())]
    assert float((seen[0] - seen[1]).abs().max()) > 1e-4 * float(seen[0].abs().max())


@pytest.mark.parametrize("fmt", ["wav", "mp3"])
def test_input_audio_part_equals_direct_generation(mm_client, direct, fmt):
    clip = sound(2.0, fmt)
    reply = ask(mm_client, audio_part(clip, fmt))
    want = expected(direct, {"type": "audio", "audio": clip})
    assert reply.choices[0].message.content == want and len(want.split()) >= 2
    assert want != expected(direct)  # the sound changes the answer


def test_image_and_audio_streamed_together(mm_client, direct):
    picture, clip = png(3), sound(1.5)
    chunks = list(ask(mm_client, image_part(picture), audio_part(clip), stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected(direct, {"type": "image", "image": picture}, {"type": "audio", "audio": clip})


@pytest.mark.filterwarnings("ignore:deprecated:DeprecationWarning")  # the openai client marks translations so
@pytest.mark.parametrize("translate", [False, True])
def test_transcription_and_translation_uploads(mm_client, direct, translate):
    clip = sound(2.5)
    endpoint = mm_client.audio.translations if translate else mm_client.audio.transcriptions
    result = endpoint.create(model="tiny-mm", file=("clip.wav", clip, "audio/wav"))
    instruction = INSTRUCTIONS[translate].format(language="")
    want = expected(direct, {"type": "audio", "audio": clip}, text=instruction)
    assert result.text == want and len(want.split()) >= 2
    as_text = endpoint.create(model="tiny-mm", file=("clip.wav", clip, "audio/wav"), response_format="text")
    assert as_text.strip() == want


def test_transcription_language_and_prompt_reach_the_instruction(mm_client, direct):
    clip = sound(2.0)
    result = mm_client.audio.transcriptions.create(model="tiny-mm", file=("clip.wav", clip), language="fr",
                                                   prompt="w40 w41")
    instruction = INSTRUCTIONS[False].format(language=" (the speech is in fr)") + "\nContext: w40 w41"
    assert result.text == expected(direct, {"type": "audio", "audio": clip}, text=instruction)


def _post_chat(server, *parts) -> httpx.Response:
    body = {"model": "tiny-mm", "max_tokens": 4,
            "messages": [{"role": "user", "content": [*parts, {"type": "text", "text": QUESTION}]}]}
    return httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60)


BAD_MEDIA = {
    "bad base64 image": ({"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBOR*w0K"}},
                         "messages[0].content[0]: data:image/png;base64,... (31 characters): invalid base64 image"),
    "text sent as an image": (image_part(b"these bytes are words, not pixels"),
                              "messages[0].content[0]: the data is not a readable image"),
    "truncated PNG": (image_part(png(4)[:200]), "messages[0].content[0]: the data is not a readable image"),
    "percent-encoded data: URL of no image": ({"type": "image_url", "image_url": {"url": "data:image/png," + "x" * 8}},
                                               "messages[0].content[0]: the data is not a readable image"),
    "audio too long": (audio_part(sound(MAX_SECONDS + 1)), f"at most {MAX_SECONDS:g} s per clip"),
    "noise sent as audio": (audio_part(b"RIFF....WAVEnot really"), "the data is not readable audio"),
    "empty audio": (audio_part(b""), "messages[0].content[0]: data:audio;base64,... (18 characters): the audio data is empty"),
}


@pytest.mark.parametrize("case", BAD_MEDIA)
def test_broken_media_get_a_clear_400_and_the_server_keeps_serving(mm_server, mm_client, direct, case):
    part, message = BAD_MEDIA[case]
    response = _post_chat(mm_server, part)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert message in error["message"] and error["type"] == "invalid_request_error", error
    assert "object at 0x" not in error["message"]  # no Python object reprs from the decoders
    assert ask(mm_client, image_part(png(1))).choices[0].message.content == \
        expected(direct, {"type": "image", "image": png(1)})


def test_transcription_of_too_long_or_unreadable_audio_is_refused(mm_server):
    url = mm_server.url + "/v1/audio/transcriptions"
    long = httpx.post(url, data={"model": "tiny-mm"}, files={"file": ("long.wav", sound(MAX_SECONDS + 1))})
    assert long.status_code == 400 and f"at most {MAX_SECONDS:g} s" in long.json()["error"]["message"]
    junk = httpx.post(url, data={"model": "tiny-mm"}, files={"file": ("a.png", png(5), "image/png")})
    assert junk.status_code == 400 and "not readable audio" in junk.json()["error"]["message"]
    assert "object at 0x" not in junk.json()["error"]["message"]


def test_prefix_cache_keys_media_by_their_content(mm_client, direct):
    """The ids of two images are the same placeholders: a prompt resumes only from one with the same media."""
    first = ask(mm_client, image_part(png(6)), audio_part(sound(1.0)))
    again = ask(mm_client, image_part(png(6)), audio_part(sound(1.0)))
    other = ask(mm_client, image_part(png(7)), audio_part(sound(1.0)))
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    assert again.usage.prompt_tokens_details.cached_tokens == again.usage.prompt_tokens - 1
    assert other.usage.prompt_tokens_details.cached_tokens == 0
    assert again.choices[0].message.content == first.choices[0].message.content
    assert other.choices[0].message.content == expected(direct, {"type": "image", "image": png(7)},
                                                        {"type": "audio", "audio": sound(1.0)})
