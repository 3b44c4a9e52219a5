"""`gemma3n export onnx` against independent runtimes: onnxruntime runs the exported sessions and must give gemma3n's
torch logits (text, image, audio; prefill and cached decode); transformers.js (npm) must load the folder with local
files only and generate gemma3n's greedy tokens. The export itself runs once, through the console script."""
from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import gemma3n
from gemma3n.onnx import OnnxFolderError
from tests.console import gemma3n as run_console

from .conftest import run_transformers_js

pytestmark = pytest.mark.slow  # the export traces four graphs: minutes on two shared cores

RTOL = 1e-4


def relative(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).abs().max() / want.abs().max())


@pytest.fixture(scope="module")
def torch_model(tiny_checkpoint):
    return gemma3n.load(tiny_checkpoint, dtype="float32")


@pytest.fixture(scope="module")
def onnx_model(exported):
    return gemma3n.load(exported, onnx_dtype="fp32")


def text_ids(n: int = 40, seed: int = 0) -> torch.Tensor:
    """Text ids plus ids of the media vocabularies (their hard embeddings come out of embed_tokens)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 380, (1, n), generator=g)
    ids[0, n // 5], ids[0, n // 2] = 384, 448  # <end_of_image>, <end_of_audio>
    return ids


def test_text_prefill_and_cached_decode_equal_torch(torch_model, onnx_model):
    ids = text_ids()
    want = torch_model.logits(ids)
    assert relative(onnx_model.logits(ids), want) <= RTOL
    lm = onnx_model.lm  # the engine's path: a prefill into the cache, then one token per call
    cache = lm.new_cache(1, ids.shape[1])
    prefill = lm(ids[:, :25], cache=cache)
    assert relative(prefill, want[:, :25]) <= RTOL
    for t in range(25, ids.shape[1]):  # past the sliding window (8): the window is applied inside the graph
        step = lm(ids[:, t:t + 1], cache=cache, last_only=True)
        assert relative(step[:, -1], want[:, t]) <= RTOL, t


def test_left_padded_batch_equals_torch(torch_model, onnx_model):
    ids = torch.cat([text_ids(12, 1), text_ids(12, 2)])
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    got, want = onnx_model.logits(ids, mask), torch_model.logits(ids, mask)
    assert relative(got[mask.bool()], want[mask.bool()]) <= RTOL
    assert torch.equal(onnx_model.generate(ids, attention_mask=mask, max_new_tokens=12, temperature=0),
                       torch_model.generate(ids, attention_mask=mask, max_new_tokens=12, temperature=0))


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    folder = tmp_path_factory.mktemp("media")
    rng = np.random.default_rng(0)
    image = folder / "noise.png"  # already 768 x 768: no resize, so every runtime sees the same pixels
    Image.fromarray(rng.integers(0, 256, (768, 768, 3), dtype=np.uint8)).save(image)
    import soundfile
    clip = folder / "tone.wav"
    t = np.arange(int(16000 * 1.7)) / 16000
    soundfile.write(clip, (0.3 * np.sin(2 * np.pi * 440 * t) + 0.05 * rng.standard_normal(t.size)).astype(np.float32),
                    16000)
    return image, clip


@pytest.mark.parametrize("kind", ["image", "audio", "both"])
def test_media_prompts_equal_torch(torch_model, onnx_model, media, kind):
    image, clip = media
    parts = []
    if kind in ("image", "both"):
        parts.append({"type": "image", "image": str(image)})
    if kind in ("audio", "both"):
        parts.append({"type": "audio", "audio": str(clip)})
    messages = [{"role": "user", "content": [*parts, {"type": "text", "text": "w5 w6"}]}]
    inputs = torch_model.processor(messages)
    assert inputs.keys() == onnx_model.processor(messages).keys()
    inputs.pop("attention_mask")
    assert relative(onnx_model.logits(**inputs), torch_model.logits(**inputs)) <= RTOL
    assert onnx_model.generate(messages, max_new_tokens=8, temperature=0) == \
        torch_model.generate(messages, max_new_tokens=8, temperature=0)


# Top-1 agreement with torch float32 over 64 positions, measured on this checkpoint: fp16 0.984, q8 0.734,
# q4 0.328, q4f16 0.375 (uint8 tables made block-wise, fp16 values written block-wise). A tiny random model is
# far more sensitive to weight rounding than a trained one: the same rounding applied to the torch model's own
# weights (uint8 per-tensor tables: 0.75; int4 blocks of 32 on every linear: 0.36) loses as much, so these
# figures measure the model, not a fault of the export. The bounds keep well above chance (1/512) and below the
# measured values.
TOP1 = {"fp16": 0.95, "q8": 0.6, "q4": 0.2, "q4f16": 0.2}


@pytest.mark.parametrize("dtype", sorted(TOP1))
def test_quantised_sessions_agree_on_top1(torch_model, exported, dtype):
    ids = text_ids(64, seed=3)
    want = torch_model.logits(ids).argmax(-1)
    got = gemma3n.load(exported, onnx_dtype=dtype).logits(ids).argmax(-1)
    agreement = float((got == want).float().mean())
    print(f"{dtype}: top-1 agreement with torch float32 {agreement:.3f}")
    assert agreement >= TOP1[dtype]


def test_default_dtype_is_the_smallest(exported):
    sizes = {d: sum(f.stat().st_size for f in (exported / "onnx").glob(f"*{s}.onnx*")
                    if f.name.startswith(("embed_tokens" + s + ".", "decoder_model_merged" + s + ".")))
             for d, s in gemma3n.onnx.SUFFIXES.items()}
    assert gemma3n.onnx.runtime.choose_dtype(exported / "onnx", None) == min(sizes, key=sizes.get)


def test_run_command_on_the_onnx_folder_answers_as_torch(tiny_checkpoint, exported):
    args = ["run", "--quiet", "-n", "10", "-t", "0", "w5 w6 w7"]
    onnx = run_console(*args, "--model", str(exported), "--onnx-dtype", "fp32")
    ref = run_console(*args, "--model", str(tiny_checkpoint))
    assert onnx.returncode == 0 and ref.returncode == 0, onnx.stderr + ref.stderr
    assert onnx.stdout == ref.stdout and onnx.stdout.strip()


def test_folder_errors_say_what_is_wrong(exported, tmp_path):
    folder = tmp_path / "copy"
    shutil.copytree(exported, folder, ignore=shutil.ignore_patterns("vision_encoder*"))  # 300 MB we do not need
    onnx = folder / "onnx"
    with pytest.raises(OnnxFolderError, match="no q4 sessions|present"):
        shutil.move(onnx / "decoder_model_merged_q4.onnx", tmp_path / "moved.onnx")
        gemma3n.load(folder, onnx_dtype="q4")
    (onnx / "embed_tokens.onnx").write_bytes(b"not an onnx file")
    with pytest.raises(OnnxFolderError, match="corrupt"):
        gemma3n.load(folder, onnx_dtype="fp32")
    shutil.copyfile(onnx / "audio_encoder.onnx", onnx / "embed_tokens.onnx")  # a session with other names
    with pytest.raises(OnnxFolderError, match="does not declare input_ids"):
        gemma3n.load(folder, onnx_dtype="fp32")
    with pytest.raises(ValueError, match="do not apply"):
        gemma3n.load(exported, quantize="int8")
    result = run_console("run", "--model", str(folder), "--onnx-dtype", "fp32", "hi")
    assert result.returncode == 2 and "does not declare input_ids" in result.stderr


def test_transformers_js_generates_the_same_tokens(transformers_js, exported, torch_model, media):
    image, _ = media
    for prompt, messages in (
            ({"text": "w5 w6 w7"}, "w5 w6 w7"),
            ({"text": "w9 w8", "image": str(image)},
             [{"role": "user", "content": [{"type": "image", "image": str(image)}, {"type": "text", "text": "w9 w8"}]}])):
        js = run_transformers_js(transformers_js, exported, "fp32", 10, prompt)
        if isinstance(messages, str):
            ids = torch_model.encode_prompt(messages)
        else:
            ids = torch_model.processor(messages)["input_ids"]
        assert js["prompt_ids"] == ids[0].tolist()
        stops = torch_model.stop_ids()
        new = js["new_ids"]
        new = new[:next((i for i, t in enumerate(new) if t in stops), len(new))]
        assert torch_model.tokenizer.decode(new) == torch_model.generate(messages, max_new_tokens=10, temperature=0)


def test_serve_on_the_onnx_folder_answers_as_the_api(exported):
    from tests.server.test_console_serve import ServeProcess
    import httpx
    server = ServeProcess("--model", str(exported), "--onnx-dtype", "q8")
    try:
        reply = httpx.post(server.url + "/v1/chat/completions", timeout=300, json={
            "model": exported.name, "messages": [{"role": "user", "content": "w5 w6 w7"}], "max_tokens": 8,
            "temperature": 0}).json()
    finally:
        server.close()
    want = gemma3n.load(exported, onnx_dtype="q8").generate("w5 w6 w7", max_new_tokens=8, temperature=0)
    assert reply["choices"][0]["message"]["content"] == want and want.strip()


def decoder_feeds(onnx_model, ids: torch.Tensor) -> dict:
    """The decoder's inputs for a prefill of `ids` (empty past), as the runtime builds them."""
    lm = onnx_model.lm
    embeds, per_layer = lm.model.embed_both(ids)
    b, t = ids.shape
    cfg = lm.config
    feeds = {"inputs_embeds": embeds, "per_layer_inputs": per_layer, "attention_mask": np.ones((b, t), np.int64),
             "position_ids": np.arange(t)[None].repeat(b, 0)}
    empty = np.zeros((b, cfg.num_key_value_heads, 0, cfg.head_dim), np.float32)
    feeds.update({f"past_key_values.{i}.{kind}": empty for i in lm.kv_layers for kind in ("key", "value")})
    return feeds


def test_num_logits_to_keep_gives_the_last_rows(onnx_model):
    decoder = onnx_model.lm.decoder
    assert decoder.inputs["num_logits_to_keep"].type == "tensor(int64)" and decoder.inputs["num_logits_to_keep"].shape == []
    feeds = decoder_feeds(onnx_model, torch.cat([text_ids(9, 4), text_ids(9, 5)]))

    def logits(k: int) -> np.ndarray:
        return decoder.run({**feeds, "num_logits_to_keep": np.array(k, np.int64)})["logits"]

    full = logits(0)
    assert full.shape[:2] == (2, 9)
    scale = np.abs(full).max()
    for k, rows in ((1, 1), (3, 3), (9, 9), (50, 9)):  # more than the length: every row, as transformers
        kept = logits(k)
        assert kept.shape == (2, rows, full.shape[2])
        assert np.abs(kept - full[:, -rows:]).max() <= 1e-5 * scale, k


def test_folder_without_num_logits_to_keep_still_runs(exported, torch_model, tmp_path):
    """The published onnx-community decoders do not declare num_logits_to_keep: the runtime must not feed it,
    and slices the last row itself. Here our decoder with that input turned into a constant 0 (every row)."""
    import onnx
    folder = tmp_path / "published_like"
    shutil.copytree(exported, folder, ignore=lambda d, names: [
        n for n in names if n.endswith((".onnx", ".onnx_data")) and n not in ("embed_tokens.onnx",
                                                                              "decoder_model_merged.onnx")])
    path = folder / "onnx" / "decoder_model_merged.onnx"
    model = onnx.load(str(path))
    declared = next(i for i in model.graph.input if i.name == "num_logits_to_keep")
    model.graph.input.remove(declared)
    model.graph.initializer.append(onnx.numpy_helper.from_array(np.array(0, np.int64), "num_logits_to_keep"))
    onnx.save(model, str(path))
    old = gemma3n.load(folder, onnx_dtype="fp32")
    assert "num_logits_to_keep" not in old.lm.decoder.inputs
    ids = text_ids(20, 6)
    want = torch_model.logits(ids)
    assert relative(old.logits(ids), want) <= RTOL
    cache = old.lm.new_cache(1, ids.shape[1])
    last = old.lm(ids[:, :12], cache=cache, last_only=True)
    assert last.shape[1] == 1 and relative(last[:, -1], want[:, 11]) <= RTOL
    assert old.generate(ids, max_new_tokens=6, temperature=0).tolist() == \
        torch_model.generate(ids, max_new_tokens=6, temperature=0).tolist()
