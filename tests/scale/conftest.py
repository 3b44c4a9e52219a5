"""A tiny multimodal checkpoint (vision and audio towers, a word-level tokenizer, the Gemma 3n chat template) and a
mixed batch over it: text chats, text completions, an image, an audio clip, and broken rows."""
from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("fastapi", reason="batch jobs run the server's app: the 'serve' extra")

import gemma3n  # noqa: E402

from ..processor.audio_samples import encode, synthetic_speech  # noqa: E402
from ..reference.tiny import build_reference, save_reference, write_tiny_tokenizer  # noqa: E402

NEW = 6
MODEL = "tiny-mm"


@pytest.fixture(scope="package", autouse=True)
def one_thread():
    """A 64-wide model gains nothing from intra-op threads (as in tests/server); restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="package")
def folder(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    path = save_reference(build_reference("multimodal", seed=33, scale=0.1), tmp_path_factory.mktemp("mm_batch"))
    write_tiny_tokenizer(path)
    # 256 px keeps the vision tower quick; both sides read the checkpoint's preprocessor_config.json.
    (path / "preprocessor_config.json").write_text(json.dumps(
        {"size": {"height": 256, "width": 256}, "resample": 2, "do_normalize": False}))
    return path


@pytest.fixture(scope="package")
def direct(folder):
    """The checkpoint loaded on its own: the oracle each row is compared with (`generate`, greedy)."""
    return gemma3n.load(folder)


def png(seed: int, size=(40, 56)) -> bytes:
    from PIL import Image
    pixels = np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def wav(seconds: float = 1.5) -> bytes:
    return encode(synthetic_speech(16_000, seconds), 16_000, "wav")


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def words(i: int) -> str:
    """A prompt of the tiny vocabulary's words ("w17" is one token), different for each i."""
    return f"w{10 + 3 * i % 90} w{20 + 7 * i % 97} w{30 + i % 13}"


def mixed_rows(n: int = 40) -> list[dict]:
    """n Batch API lines: chats and completions of words, one image, one audio clip, one broken image file."""
    rows = []
    for i in range(n):
        body: dict = {"model": MODEL, "max_tokens": NEW, "temperature": 0}
        if i == 5:
            content = [{"type": "image_url", "image_url": {"url": "data:image/png;base64," + b64(png(1))}},
                       {"type": "text", "text": words(i)}]
            url, body["messages"] = "/v1/chat/completions", [{"role": "user", "content": content}]
        elif i == 11:
            content = [{"type": "input_audio", "input_audio": {"data": b64(wav()), "format": "wav"}},
                       {"type": "text", "text": words(i)}]
            url, body["messages"] = "/v1/chat/completions", [{"role": "user", "content": content}]
        elif i == 17:  # a truncated PNG: the server's 400, and the job goes on
            content = [{"type": "image_url", "image_url": {"url": "data:image/png;base64," + b64(png(2)[:150])}},
                       {"type": "text", "text": words(i)}]
            url, body["messages"] = "/v1/chat/completions", [{"role": "user", "content": content}]
        elif i % 4 == 3:
            url, body["prompt"] = "/v1/completions", words(i)
        else:
            url, body["messages"] = "/v1/chat/completions", [{"role": "user", "content": words(i)}]
        rows.append({"custom_id": f"row-{i}", "method": "POST", "url": url, "body": body})
    return rows


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def expected_text(direct, row: dict) -> str:
    """What `generate` answers for the row's request, the media given as the same bytes."""
    body = row["body"]
    if row["url"] == "/v1/completions":
        from gemma3n.engine.generate import generate  # a raw-text prompt: the engine's generate, as in tests/server
        ids = torch.tensor([direct.tokenizer.encode(body["prompt"], add_special_tokens=True)])
        params = direct.sampling_params(max_new_tokens=body["max_tokens"], temperature=0)
        return generate(direct.decoder, ids, params, direct.tokenizer, direct.stop_ids()).text
    messages = []
    for m in body["messages"]:
        content = m["content"]
        if isinstance(content, list):
            content = [_hf_part(p) for p in content]
        messages.append({"role": m["role"], "content": content})
    return direct.generate(messages, max_new_tokens=body["max_tokens"], temperature=0)


def _hf_part(part: dict) -> dict:
    if part["type"] == "image_url":
        return {"type": "image", "image": base64.b64decode(part["image_url"]["url"].split(",", 1)[1])}
    if part["type"] == "input_audio":
        return {"type": "audio", "audio": base64.b64decode(part["input_audio"]["data"])}
    return part


def answers(path: Path) -> list[tuple]:
    """(custom_id, status, text or error message) of each output line: what must agree between runs (ids and
    timestamps differ)."""
    out = []
    for line in path.read_text().splitlines():
        row = json.loads(line)
        response = row["response"]
        body = response["body"]
        text = (body["error"]["message"] if response["status_code"] != 200 else
                body["choices"][0].get("message", {}).get("content", body["choices"][0].get("text")))
        out.append((row["custom_id"], response["status_code"], text))
    return out


@pytest.fixture(scope="package")
def mixed_local(tmp_path_factory, folder):
    """The 40 mixed rows answered once by the local runner: (input rows, input path, output path, summary)."""
    from gemma3n.scale.batch_job import BatchInput
    from gemma3n.scale.job import run_batch
    tmp = tmp_path_factory.mktemp("batch")
    rows = mixed_rows(40)
    source = write_jsonl(tmp / "requests.jsonl", rows)
    summary = run_batch(BatchInput(source), tmp / "answers.jsonl", batch_spec(folder), progress=False)
    return rows, source, tmp / "answers.jsonl", summary


def batch_settings():
    from gemma3n.server import ServerSettings
    return ServerSettings(model_name=MODEL, max_tokens=NEW, max_audio_seconds=3.0, max_batch=8)


def batch_spec(folder: Path):
    from gemma3n.scale.engine import EngineSpec
    return EngineSpec(model=str(folder), settings=batch_settings())


# The same limits as flags of the console script.
LIMIT_FLAGS = ["--served-model-name", MODEL, "--max-tokens", str(NEW), "--default-max-tokens", str(NEW),
               "--max-audio-seconds", "3", "--max-batch", "8"]
