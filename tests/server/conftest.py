"""A real server on 127.0.0.1 (ephemeral port, uvicorn in a thread) serving a tiny random checkpoint with a
byte-level tokenizer and the Gemma 3n chat template, loaded through `gemma3n.load` like any checkpoint."""
from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="the server tests need the 'serve' extra (fastapi, uvicorn)")
pytest.importorskip("openai", reason="the server tests need the openai client (test extra)")

import torch  # noqa: E402
import uvicorn  # noqa: E402

import gemma3n  # noqa: E402
from gemma3n.processor.chat import GEMMA3N_CHAT_TEMPLATE  # noqa: E402
from gemma3n.server import ServerSettings, create_app  # noqa: E402

from ..reference.tiny import build_reference  # noqa: E402

VOCAB = 512
SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>", "<image_soft_token>",
            "<audio_soft_token>", "<start_of_image>", "<end_of_image>", "<start_of_audio>", "<end_of_audio>"]
API_KEY = "test-key-123"
LIMITS = dict(max_body_bytes=256 * 1024, max_prompt_tokens=300, max_tokens=64, max_images=2, max_batch=32)


def write_tokenizer(folder: Path) -> None:
    """A byte-level BPE tokenizer filling the tiny model's 512 ids: specials, the 256 bytes, then letter pairs."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    pieces = SPECIALS + alphabet
    letters = "abcdefghijklmnopqrstuvwxyz"
    pairs = [a + b for a in letters for b in letters]
    pieces += pairs[:VOCAB - len(pieces)]
    vocab = {p: i for i, p in enumerate(pieces)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.add_special_tokens(SPECIALS)
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<bos>", "eos_token": "<eos>",
                                                              "pad_token": "<pad>"}))
    (folder / "chat_template.jinja").write_text(GEMMA3N_CHAT_TEMPLATE)


@pytest.fixture(scope="package", autouse=True)
def one_thread():
    """A 64-wide model gains nothing from intra-op threads, and their spinning on a busy machine slowed these
    tests several-fold (as in tests/engine); restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny_served")
    build_reference("mixed", seed=5).save_pretrained(folder)
    write_tokenizer(folder)
    return folder


@pytest.fixture(scope="session")
def model(checkpoint):
    return gemma3n.load(checkpoint)


class RunningServer:
    def __init__(self, model, settings: ServerSettings):
        self.app = create_app(model, settings)
        self.settings = settings
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=0, log_level="warning",
                                                   timeout_graceful_shutdown=2))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            if time.time() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"

    @property
    def scheduler(self):
        return self.app.state.scheduler

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


@pytest.fixture(scope="session")
def server(model):
    running = RunningServer(model, ServerSettings(model_name="tiny", **LIMITS))
    yield running
    running.close()


@pytest.fixture(scope="session")
def keyed_server(model):
    running = RunningServer(model, ServerSettings(model_name="tiny", api_key=API_KEY, **LIMITS))
    yield running
    running.close()


@pytest.fixture(scope="session")
def client(server):
    import openai
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="session")
def alone(model):
    """alone(messages or text, raw=False, **sampling) -> the engine's Generation for the request run by itself."""
    from gemma3n.engine.generate import generate

    def run(prompt, raw: bool = False, **sampling):
        params = model.sampling_params(**sampling)
        if raw:
            ids = torch.tensor([model.tokenizer.encode(prompt, add_special_tokens=True)])
        else:
            ids = model.encode_prompt(prompt)
        return generate(model.decoder, ids, params, model.tokenizer, model.stop_ids())
    return run
