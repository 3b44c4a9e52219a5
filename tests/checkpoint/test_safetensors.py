"""Checkpoint loading: bad input gives one clear line naming the file or tensor; weights stay memory-mapped."""
import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file, save_file

import gemma3n
from gemma3n import CheckpointError, ConfigError

from ..reference.tiny import build_reference


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ckpt")
    build_reference("mixed", seed=3).save_pretrained(folder)
    return folder


def copy_of(checkpoint, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(checkpoint, dst)
    return dst


def one_line_error(exc_type, fn, *parts):
    with pytest.raises(exc_type) as e:
        fn()
    text = str(e.value)
    assert "\n" not in text
    for part in parts:
        assert part in text, text
    return text


def test_missing_path_and_folder_without_config(tmp_path):
    one_line_error(FileNotFoundError, lambda: gemma3n.load(tmp_path / "nope"), "nope", "no such file")
    one_line_error(CheckpointError, lambda: gemma3n.load(tmp_path), str(tmp_path), "no config.json")


def test_truncated_file(checkpoint, tmp_path):
    folder = copy_of(checkpoint, tmp_path)
    f = folder / "model.safetensors"
    os.truncate(f, f.stat().st_size - 1000)
    one_line_error(CheckpointError, lambda: gemma3n.load(folder), "model.safetensors", "truncated")


def test_corrupt_header(checkpoint, tmp_path):
    folder = copy_of(checkpoint, tmp_path)
    f = folder / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[8:20] = b"\x00garbage!!\xff\xfe"
    f.write_bytes(bytes(data))
    one_line_error(CheckpointError, lambda: gemma3n.load(folder), "model.safetensors", "corrupt")
    f.write_bytes(b"12")
    one_line_error(CheckpointError, lambda: gemma3n.load(folder), "not a safetensors file")


def test_wrong_shape_missing_and_unexpected_tensors(checkpoint, tmp_path):
    folder = copy_of(checkpoint, tmp_path)
    f = folder / "model.safetensors"
    original = load_file(f)
    name = "model.layers.1.mlp.up_proj.weight"
    save_file({**original, name: torch.zeros(3, 3)}, f, metadata={"format": "pt"})
    one_line_error(CheckpointError, lambda: gemma3n.load(folder), name, "shape (3, 3)", "(128, 64)")
    save_file({k: v for k, v in original.items() if k != name}, f, metadata={"format": "pt"})
    one_line_error(CheckpointError, lambda: gemma3n.load(folder), name, "missing")
    save_file({**original, "model.bogus.weight": torch.zeros(2)}, f, metadata={"format": "pt"})
    one_line_error(CheckpointError, lambda: gemma3n.load(folder), "model.bogus.weight", "unexpected")


def test_unused_kv_weights_of_shared_layers_are_skipped(checkpoint, tmp_path):
    """The released files still carry k_proj/v_proj/k_norm for layers that share K/V: they load and are unused."""
    folder = copy_of(checkpoint, tmp_path)
    f = folder / "model.safetensors"
    original = load_file(f)
    extra = {}
    for i in (4, 5):  # the shared layers of the "mixed" config
        extra[f"model.layers.{i}.self_attn.k_proj.weight"] = torch.randn(32, 64)
        extra[f"model.layers.{i}.self_attn.v_proj.weight"] = torch.randn(32, 64)
        extra[f"model.layers.{i}.self_attn.k_norm.weight"] = torch.randn(16)
    save_file({**original, **extra}, f, metadata={"format": "pt"})
    ids = torch.arange(20)[None]
    assert torch.equal(gemma3n.load(folder).logits(ids), gemma3n.load(checkpoint).logits(ids))


def test_unknown_architecture(checkpoint, tmp_path):
    folder = copy_of(checkpoint, tmp_path)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["model_type"] = "mistral"
    (folder / "config.json").write_text(json.dumps(cfg))
    one_line_error(ConfigError, lambda: gemma3n.load(folder), "config.json", "'mistral' is not supported")


def test_dtype_choice(checkpoint):
    for name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16), ("float16", torch.float16)):
        assert gemma3n.load(checkpoint, dtype=name).dtype == dtype
    with pytest.raises(ValueError, match="dtype 'int3' is not supported"):
        gemma3n.load(checkpoint, dtype="int3")


def test_loading_does_not_read_the_weights_into_memory(tmp_path):
    """A checkpoint whose tables are ~180 MB loads with almost no new resident memory: tensors are views of the
    file mapping. After a short forward the per-layer-embedding table is still not resident (only the rows of
    the tokens used are touched), so resident memory stays well under the checkpoint's size."""
    from transformers import Gemma3nForCausalLM, Gemma3nTextConfig
    from ..reference.tiny import text_config
    cfg = dict(text_config("mixed"), vocab_size=262400, vocab_size_per_layer_input=262144, hidden_size_per_layer_input=32)
    Gemma3nForCausalLM(Gemma3nTextConfig(**cfg)).save_pretrained(tmp_path / "big")
    Gemma3nForCausalLM(Gemma3nTextConfig(**text_config("mixed"))).save_pretrained(tmp_path / "small")
    size = (tmp_path / "big" / "model.safetensors").stat().st_size
    # The small model first: torch's first model build and forward map ~150 MB of library code into memory.
    script = textwrap.dedent(f"""
        import torch, gemma3n
        def rss():
            return int(open("/proc/self/statm").read().split()[1]) * 4096
        gemma3n.load({str(tmp_path / "small")!r}).logits(torch.arange(100, 120)[None])
        base = rss()
        m = gemma3n.load({str(tmp_path / "big")!r})
        loaded = rss()
        m.logits(torch.arange(100, 120)[None])
        print(loaded - base, rss() - base)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout.split()
    after_load, after_forward = map(int, out)
    assert size > 150e6
    assert after_load < 0.05 * size
    assert after_forward < 0.6 * size
