"""load(quantize=...), quantised checkpoints (write, load without the original, same logits), the CLI."""
import json

import pytest
import torch

import gemma3n
from gemma3n.cli import main
from gemma3n.convert import quantize_checkpoint
from gemma3n.quant import Int4Embedding, Int4Linear, Int8Embedding, Int8Linear, parse_scheme

from ..reference.tiny import build_reference, save_reference


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A tiny Gemma 3n decoder and a tiny Gemma 3 one (float32, small weights), saved by transformers.

    Tiny random decoders are chaotic (at scale 0.05, bf16 rounding alone moves the logits of a 12-layer one by
    24%), so the model-level bounds below are loose; the layer-level bounds are in test_formats.py."""
    import transformers
    root = tmp_path_factory.mktemp("quant")
    g3n = save_reference(build_reference("mixed", seed=1, scale=0.02), root / "g3n")
    cfg = transformers.Gemma3TextConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                        num_attention_heads=2, num_key_value_heads=1, head_dim=64,
                                        query_pre_attn_scalar=64, sliding_window=8, max_position_embeddings=256)
    torch.manual_seed(0)
    g3 = save_reference(transformers.Gemma3ForCausalLM(cfg).eval(), root / "g3")
    return {"gemma3n": g3n, "gemma3": g3}


def _ids(vocab):
    return torch.randint(0, vocab, (2, 19), generator=torch.Generator().manual_seed(2))


@pytest.mark.parametrize("family", ["gemma3n", "gemma3"])
@pytest.mark.parametrize("scheme", ["int8", "int4", {"decoder": "int4", "embeddings": "int4", "group_size": 32}])
def test_load_quantized_is_close_and_round_trips(folders, tmp_path, family, scheme):
    folder = folders[family]
    base = gemma3n.load(folder)
    ids = _ids(base.config.text.vocab_size)
    quant = gemma3n.load(folder, quantize=scheme)
    layer = quant.lm.model.layers[0]
    assert isinstance(layer.self_attn.q_proj, Int8Linear if scheme == "int8" else Int4Linear)
    embedding_kind = Int4Embedding if isinstance(scheme, dict) else Int8Embedding
    assert isinstance(quant.lm.model.embed_tokens, embedding_kind)
    ref, out = base.logits(ids), quant.logits(ids)
    rel = (out - ref).norm() / ref.norm()
    assert rel < (0.1 if scheme == "int8" else 0.6), rel
    quantize_checkpoint(folder, tmp_path / "q", scheme)
    saved = json.loads((tmp_path / "q" / "config.json").read_text())["quantization"]
    assert saved["scheme"] == parse_scheme(scheme).to_dict()
    reloaded = gemma3n.load(tmp_path / "q")
    assert torch.equal(reloaded.logits(ids), out)
    assert torch.equal(reloaded.generate(ids[:1, :6], max_new_tokens=6, temperature=0),
                       quant.generate(ids[:1, :6], max_new_tokens=6, temperature=0))


def test_quantized_checkpoint_is_smaller_and_keeps_ple_as_stored(folders, tmp_path):
    out = quantize_checkpoint(folders["gemma3n"], tmp_path / "q4", "int4")
    size = sum(p.stat().st_size for p in folders["gemma3n"].glob("*.safetensors"))
    assert out["bytes"] < size
    model = gemma3n.load(tmp_path / "q4")
    assert model.lm.model.embed_tokens_per_layer.weight.dtype == torch.float32  # as stored, not quantised
    with pytest.raises(ValueError, match="already quantised"):
        gemma3n.load(tmp_path / "q4", quantize="int8")
    with pytest.raises(ValueError, match="already quantised"):
        quantize_checkpoint(tmp_path / "q4", tmp_path / "again", "int8")


@pytest.mark.parametrize("bad, message", [("int3", "not supported"), ({"decoder": "int2"}, "decoder='int2'"),
                                          ({"ple": "int8"}, "unknown component"), ("int4-g48", "group_size 48")])
def test_bad_schemes_are_clear_errors(bad, message):
    with pytest.raises(ValueError, match=message):
        parse_scheme(bad)


def test_cli_quantize_then_run(folders, tmp_path, capsys):
    dst = tmp_path / "cli-int8"
    assert main(["quantize", str(folders["gemma3n"]), str(dst), "--scheme", '{"decoder": "int8"}']) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["modules"] > 0 and (dst / "config.json").exists()
    assert main(["quantize", str(folders["gemma3n"]), str(dst)]) == 2  # not empty: a one-line error
    assert "not empty" in capsys.readouterr().err
