"""Per-layer embeddings are read row by row from the memory map, whatever dtype is asked for, for safetensors and
GGUF; loading and running do not make the table resident."""
import json
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from torch import nn

import gemma3n
from gemma3n.checkpoint.gguf import GGUFRowEmbedding, GGUFRows
from gemma3n.checkpoint.writer import write_checkpoint
from gemma3n.model.text import CausalLM

from ..reference.tiny import build_reference, save_reference, text_config

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def bf16_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ple_bf16")
    return save_reference(build_reference("mixed", seed=3, scale=0.05).to(torch.bfloat16), folder)


def _ids():
    return torch.randint(0, 512, (2, 17), generator=torch.Generator().manual_seed(5))


@pytest.mark.parametrize("dtype", [None, "float32"])
def test_mmap_rows_equal_a_materialised_table(bf16_folder, dtype):
    model = gemma3n.load(bf16_folder, dtype=dtype)
    table = model.lm.model.embed_tokens_per_layer.weight
    assert table.dtype == torch.bfloat16  # kept as stored, even when float32 is asked for
    mapped = model.logits(_ids())
    # materialise: the whole table in RAM, converted to the compute dtype the old way
    model.lm.model.embed_tokens_per_layer.weight = nn.Parameter(table.to(model.dtype).clone(), requires_grad=False)
    assert torch.equal(mapped, model.logits(_ids()))


_CHILD = r"""
import json, resource, sys, torch, gemma3n
model = gemma3n.load(sys.argv[1], dtype=sys.argv[2] if sys.argv[2] != "stored" else None)
ids = torch.randint(0, model.config.text.vocab_size, (1, 64), generator=torch.Generator().manual_seed(0))
model.logits(ids)
print(json.dumps({"rss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
"""


def _write_ple_checkpoint(folder: Path, ple_rows: int) -> None:
    """A tiny decoder whose per-layer table is wide (6 layers x 256) and has `ple_rows` rows, written in bf16
    without ever being in memory whole."""
    cfg = {**text_config("mixed"), "model_type": "gemma3n_text", "vocab_size": 4096,
           "vocab_size_per_layer_input": ple_rows, "hidden_size_per_layer_input": 256}
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(cfg))
    parsed = gemma3n.config.ModelConfig.from_file(folder / "config.json")
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in CausalLM(parsed.text).state_dict().items()}

    def chunks(shape):
        step = max(1, (1 << 20) // max(1, int(np.prod(shape[1:]))))
        for start in range(0, shape[0], step):
            n = min(step, shape[0] - start)
            yield (torch.randn(n, *shape[1:]) * 0.05).to(torch.bfloat16).reshape(-1)

    write_checkpoint(folder, [(k, s, torch.bfloat16, lambda s=s: chunks(s)) for k, s in shapes.items()])


@pytest.mark.slow
def test_rss_does_not_grow_with_the_ple_table(tmp_path):
    small, large = 4096, 65536  # tables of 12 MiB and 192 MiB in bf16
    for rows in (small, large):
        _write_ple_checkpoint(tmp_path / str(rows), rows)
    growth = {}
    for dtype in ("stored", "float32"):  # float32: converting the whole table would add 384 MiB
        rss = [json.loads(subprocess.run([sys.executable, "-c", _CHILD, str(tmp_path / str(rows)), dtype],
                                         capture_output=True, text=True, check=True, cwd=ROOT).stdout)["rss_kib"]
               for rows in (small, large)]
        growth[dtype] = (rss[1] - rss[0]) / 1024
    table_mib = (large - small) * 6 * 256 * 2 / 2**20
    assert all(g < 0.15 * table_mib for g in growth.values()), (growth, table_mib)


def _encode(values: np.ndarray, kind) -> np.ndarray:
    if kind == gguf.GGMLQuantizationType.F16:
        return values.astype(np.float16)
    if kind != gguf.GGMLQuantizationType.Q4_K:
        return gguf.quants.quantize(values, kind)
    # gguf cannot encode k-quants: random Q4_K blocks (144 bytes per 256 values) with sane fp16 d / dmin
    blocks = np.random.default_rng(1).integers(0, 256, (values.shape[0], values.shape[1] // 256, 144), np.uint8)
    blocks[..., 0:4] = np.array([0.01, 0.002], np.float16).view(np.uint8)
    blocks[np.all(values == 0, axis=1)] = 0  # keep the padding rows zero
    return blocks.reshape(values.shape[0], -1)


@pytest.mark.parametrize("kind", [gguf.GGMLQuantizationType.Q8_0, gguf.GGMLQuantizationType.Q4_K,
                                  gguf.GGMLQuantizationType.F16])
def test_gguf_rows_are_dequantised_one_by_one(tmp_path, kind):
    rows, width, padding = 40, 512, 8
    values = np.random.default_rng(0).standard_normal((rows + padding, width)).astype(np.float32)
    values[rows:] = 0  # the converter's zero padding up to vocab_size
    stored = _encode(values, kind)
    writer = gguf.GGUFWriter(tmp_path / "t.gguf", "gemma3n")
    writer.add_tensor("t", stored, raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tensor = gguf.GGUFReader(tmp_path / "t.gguf").tensors[0]
    table = GGUFRows(tensor, torch.float32, vocab_size=rows + padding)
    assert table.shape == (rows, width)  # the zero tail is not part of the table
    whole = torch.from_numpy(gguf.quants.dequantize(stored, kind).astype(np.float32)).reshape(-1, width)[:rows]
    assert torch.equal(table.materialise(), whole)
    ids = torch.tensor([[3, 0, 39], [3, 17, 5]])
    assert torch.equal(GGUFRowEmbedding(table)(ids), whole[ids])


# -- end to end through a GGUF written by llama.cpp's own converter -------------------------------------------------

from ..checkpoint.test_gguf import _convert, llama_cpp_converter, sentencepiece_model, tiny_gemma3n  # noqa: E402,F401


@pytest.mark.slow
@pytest.mark.parametrize("outtype", ["f32", "q8_0"])
def test_gguf_model_gathers_ple_rows_from_the_file(llama_cpp_converter, tiny_gemma3n, outtype,  # noqa: F811
                                                  monkeypatch):
    _, folder, _ = tiny_gemma3n
    path = _convert(llama_cpp_converter, folder, outtype)
    with monkeypatch.context() as patch:  # loading never dequantises the whole table (E2B's: GBs, tens of seconds)
        patch.setattr(GGUFRows, "materialise", lambda self: pytest.fail("the per-layer table was materialised"))
        model = gemma3n.load(path)
    assert isinstance(model.lm.model.embed_tokens_per_layer, GGUFRowEmbedding)
    ids = torch.randint(0, model.config.text.vocab_size, (2, 9), generator=torch.Generator().manual_seed(4))
    ple = model.lm.model.embed_tokens_per_layer
    rows = ple.table.materialise()
    gathered = model.logits(ids)
    # the same model with the table materialised in RAM as an ordinary embedding gives identical logits
    model.lm.model.embed_tokens_per_layer = nn.Embedding.from_pretrained(rows)
    assert torch.equal(gathered, model.logits(ids))
    if outtype == "f32":  # and equals the safetensors checkpoint it was converted from
        assert torch.equal(gathered, gemma3n.load(folder, dtype="float32").logits(ids))
