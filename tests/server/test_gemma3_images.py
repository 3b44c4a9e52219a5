"""Gemma 3 images end to end through the two front doors a person uses: the installed console script
(`gemma3n run --image --pan-and-scan`) and the OpenAI-compatible server (`image_url`). The tiny
Gemma3ForConditionalGeneration's greedy answer is computed by transformers from the ids and pixels of our
processor (which tests/processor/test_gemma3_processor.py holds equal to Gemma3Processor's)."""
from __future__ import annotations

import base64
import json

import numpy as np
import pytest
import torch
from PIL import Image

import gemma3n
from gemma3n.server import ServerSettings

from ..console import gemma3n as run_console
from ..reference.tiny_gemma3 import MEDIA, build_gemma3_reference, write_gemma3_tokenizer
from .conftest import RunningServer

pytest.importorskip("transformers")
NEW = 6
QUESTION = "w17 w18 w19"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    ref = build_gemma3_reference(seed=8)
    folder = tmp_path_factory.mktemp("gemma3_served")
    ref.save_pretrained(folder)
    write_gemma3_tokenizer(folder, image_size=64)
    picture = tmp_path_factory.mktemp("pictures") / "wide.png"
    rng = np.random.default_rng(3)
    Image.fromarray(rng.integers(0, 256, (300, 700, 3), dtype=np.uint8)).save(picture)
    return ref, folder, picture


def reference_answer(ref, folder, picture, pan_and_scan=None) -> str:
    """transformers' greedy continuation of the prompt the CLI builds (image, then the question)."""
    ours = gemma3n.load(folder)
    ours.pan_and_scan = pan_and_scan
    messages = [{"role": "user", "content": [{"type": "image", "path": str(picture)},
                                             {"type": "text", "text": QUESTION}]}]
    inputs = ours.processor(messages)
    ids = inputs["input_ids"]
    with torch.no_grad():
        out = ref.generate(input_ids=ids, pixel_values=inputs["pixel_values"], attention_mask=torch.ones_like(ids),
                           token_type_ids=(ids == MEDIA["image_token_index"]).long(), max_new_tokens=NEW,
                           do_sample=False, pad_token_id=0)[0, ids.shape[1]:].tolist()
    stops = ours.stop_ids()
    kept = []
    for t in out:
        if t in stops:
            break
        kept.append(t)
    return ours.tokenizer.decode(kept), len(inputs["pixel_values"])


def test_cli_image_answer_equals_the_reference(checkpoint, pan_and_scan=True):
    """One console run (each costs a process start): --image with --pan-and-scan; the plain prompt is the server's
    test below."""
    ref, folder, picture = checkpoint
    want, images = reference_answer(ref, folder, picture, True if pan_and_scan else None)
    assert want.strip()  # a real answer, not an immediate stop
    assert images == (3 if pan_and_scan else 1)  # 700 x 300: the image and 2 crops
    args = ["run", "--model", str(folder), "--image", str(picture), "--temperature", "0", "--max-new-tokens",
            str(NEW), "--json", QUESTION] + (["--pan-and-scan"] if pan_and_scan else [])
    done = run_console(*args)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["text"] == want


def test_server_image_url_answer_equals_the_reference(checkpoint):
    import openai
    ref, folder, picture = checkpoint
    want, _ = reference_answer(ref, folder, picture)
    running = RunningServer(gemma3n.load(folder), ServerSettings(model_name="tiny-g3", max_tokens=NEW))
    try:
        client = openai.OpenAI(base_url=running.url + "/v1", api_key="unused", max_retries=0, timeout=60)
        data = base64.b64encode(picture.read_bytes()).decode()
        reply = client.chat.completions.create(model="tiny-g3", max_tokens=NEW, temperature=0, messages=[
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": f"data:image/png;base64,{data}"}},
                                         {"type": "text", "text": QUESTION}]}])
    finally:
        running.close()
    assert reply.choices[0].message.content == want
