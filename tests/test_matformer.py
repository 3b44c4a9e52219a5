"""MatFormer slicing: spec checks (one clear line, nothing written), Google's table, the E4B parameter counts, and
`gemma3n slice` / `--matformer` through the installed console script."""
import json
import os

import pytest
import torch

import gemma3n
from gemma3n.config import ModelConfig
from gemma3n.matformer import (PUBLISHED, MatformerError, find, parameter_counts, parse_spec, plan_slice,
                               reserved_layers, slice_checkpoint)
from gemma3n.matformer import tensors as sliced_tensors

from .console import gemma3n as cli
from .reference.tiny import build_reference, save_reference, write_tiny_tokenizer

# "mixed": 6 layers S F S F | S F, the last two reading layers 2 (sliding) and 3 (global); widths 96 128 64 96 160 96
SPEC = {"layers_skipped": [0, 4], "ffn_hidden_dims": [64, 32, 96, 80]}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = save_reference(build_reference("mixed", seed=4, scale=0.1), tmp_path_factory.mktemp("mixed") / "src")
    write_tiny_tokenizer(path)
    return path


def _e4b_config() -> dict:
    """google/gemma-3n-E4B-it's config (bench/make_e2b_checkpoint.py --shape e4b): 35 layers, 15 KV-shared, FFN
    16384, the first 10 layers sparse; towers as in E2B."""
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    from make_e2b_checkpoint import E4B_TEXT, e2b_config
    data = e2b_config(E4B_TEXT).to_dict()
    assert data["text_config"]["layer_types"][:5] == ["sliding_attention"] * 4 + ["full_attention"]
    return data


# -- spec checks -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("spec, message", [
    ({"layers_skipped": [2]}, "layer 2 cannot be skipped: it is the last non-shared sliding_attention layer, whose "
                              "K/V the shared layers 4 read (reserved layers: 2, 3)"),
    ({"layers_skipped": [3]}, "layer 3 cannot be skipped: it is the last non-shared full_attention layer"),
    ({"layers_skipped": [6]}, "layer 6 is out of range: this checkpoint has 6 layers (0-5)"),
    ({"layers_skipped": [-1]}, "layer -1 is out of range"),
    ({"layers_skipped": [0, 0]}, "layer 0 is listed twice"),
    ({"layers_skipped": [0], "ffn_hidden_dims": [64, 64]}, "2 widths given but 5 layers are kept (6 - 1 skipped)"),
    ({"layers_skipped": [0], "ffn_hidden_dims": [128, 65, 96, 160, 96]},
     "width 65 for kept layer 1 (layer 2 of the checkpoint) is larger than that layer's width 64"),
    ({"ffn_hidden_dims": [96, 128, 64, 0, 160, 96]}, "width 0 (kept layer 3, layer 3 of the checkpoint) must be "
                                                     "positive"),
    ({"layers_skipped": [0, 1, 4, 5], "ffn_hidden_dims": [1, 2, 3]}, "3 widths given but 2 layers are kept"),
    ({"layers": [1]}, "unknown field(s) ['layers']"),
    ("E9.99B", "unknown MatFormer configuration 'E9.99B'"),
    ("E2B", "ffn_hidden_dims (Config for official E2B Model): 30 widths given but 6 layers are kept; ... ")
])
def test_bad_specs_give_one_clear_error_and_write_nothing(folder, tmp_path, spec, message):
    dst = tmp_path / "out"
    with pytest.raises(MatformerError) as raised:
        slice_checkpoint(folder, dst, spec)
    text = str(raised.value)
    if spec == "E2B":  # skipped layer 20 is out of range first
        assert "layer 20 is out of range" in text and "published configurations are for Gemma 3n E4B" in text
    else:
        assert message in text
    assert "\n" not in text
    assert list(tmp_path.iterdir()) == []  # no destination, no partial folder
    with pytest.raises(MatformerError):
        gemma3n.load(folder, matformer=spec)


def test_a_failure_while_writing_leaves_no_folder(folder, tmp_path, monkeypatch):
    def broken(self, name):
        yield from ()
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(sliced_tensors.SlicedTensors, "chunks", broken)
    with pytest.raises(OSError, match="No space left"):
        slice_checkpoint(folder, tmp_path / "out", SPEC)
    assert list(tmp_path.iterdir()) == []


def test_destination_must_be_new(folder, tmp_path):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("keep me")
    with pytest.raises(FileExistsError):
        slice_checkpoint(folder, tmp_path / "full", SPEC)
    assert (tmp_path / "full" / "x").read_text() == "keep me"
    (tmp_path / "empty").mkdir()
    slice_checkpoint(folder, tmp_path / "empty", SPEC)  # an empty folder is replaced by the slice
    assert (tmp_path / "empty" / "model.safetensors").exists()


def test_reserved_layers_come_from_the_config():
    data = _e4b_config()
    text = ModelConfig.from_dict(data).text
    assert sorted(reserved_layers(text)) == [18, 19]  # E4B: the notebook's hard-coded pair
    data["text_config"].update(num_kv_shared_layers=5)
    assert sorted(reserved_layers(ModelConfig.from_dict(data).text)) == [28, 29]
    data["text_config"].update(num_kv_shared_layers=0)
    assert reserved_layers(ModelConfig.from_dict(data).text) == {}


def test_sliced_config_fields(folder):
    config = ModelConfig.from_file(folder / "config.json")
    plan = plan_slice(config, SPEC)
    assert plan.kept == (1, 2, 3, 5) and plan.runs() == [(1, 4), (5, 6)]
    assert plan.text_fields() == {
        "num_hidden_layers": 4, "intermediate_size": [64, 32, 96, 80],
        "layer_types": ["full_attention", "sliding_attention", "full_attention", "full_attention"],
        "num_kv_shared_layers": 1, "activation_sparsity_pattern": [0.0, 0.95, 0.0, 0.0]}
    assert plan.text.kv_producer == (0, 1, 2, 2)  # old layer 5 still reads old layer 3
    assert parse_spec({"layers_skipped": [1]}).ffn_hidden_dims is None
    assert plan_slice(config, {"layers_skipped": [1]}).widths == (96, 64, 96, 160, 96)


# -- the published table and E4B's numbers ----------------------------------------------------------------------

def test_published_table():
    assert len(PUBLISHED) == 16 and PUBLISHED[0].name == "Main model"
    assert sum(r.name.startswith("Config for") for r in PUBLISHED) == 15
    e2b = find("Config for official E2B Model")
    assert e2b is find("E2B") and e2b.layers_skipped == (20, 21, 22, 23, 24)
    assert e2b.ffn_hidden_dims == (8192,) * 30 and e2b.mmlu_pt == 50.9 and e2b.effective_params_b == 1.91
    assert find("e2.98b-block").name == "Config for E2.98B (block-level)"
    assert find("E2.98B (layer-level)").ffn_hidden_dims[15:25] == (16384,) * 10
    assert find("E2.98B") is None  # two rows have that size: the level must be named
    for r in PUBLISHED:
        assert len(r.layers_skipped) + r.layers == 35 and set(r.ffn_hidden_dims) <= {8192, 16384}


def test_e4b_counts_equal_googles():
    """On E4B's config, the official E2B slice has Google's text and effective counts exactly (MatFormer Lab:
    4,456,156,768 text, 1,905,495,648 effective). Google's total, 5,976,833,408, counts the tied embedding / LM head
    a second time (+537,395,200) and 64 values fewer in the towers than transformers 5.23 / timm 1.0.31 build (the
    vision stem's conv bias has 64); ours counts each stored tensor once."""
    config = ModelConfig.from_dict(_e4b_config())
    e2b = plan_slice(config, "E2B")
    from dataclasses import replace
    counts = parameter_counts(replace(config, text=e2b.text))
    assert counts["text"] == 4_456_156_768
    assert counts["effective"] == 1_905_495_648
    assert counts["total"] == 5_439_438_272 == 5_976_833_408 - 537_395_200 + 64
    assert counts["effective"] == counts["text"] - counts["embed_tokens"] - counts["per_layer_table"]
    assert parameter_counts(config)["effective"] == 3_980_491_248  # Google: 3.98 B for the main model
    for row in PUBLISHED:  # every published row is a valid slice of E4B; effective within Google's rounding
        counts = parameter_counts(replace(config, text=plan_slice(config, row.name).text))
        assert abs(counts["effective"] / 1e9 - row.effective_params_b) < 0.025, row.name


def test_dry_run_on_a_config_alone(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(_e4b_config()))
    summary = slice_checkpoint(tmp_path, None, "E2B", dry_run=True)
    assert summary["parameters"]["effective"] == 1_905_495_648
    assert summary["config"]["num_hidden_layers"] == 30 and summary["config"]["num_kv_shared_layers"] == 10
    assert summary["kept_layers"] == list(range(20)) + list(range(25, 35))
    assert summary["source_parameters"]["text"] == 6_866_696_688
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json"]


# -- the command line, as installed ---------------------------------------------------------------------------------

def test_cli_list():
    done = cli("slice", "--list")
    assert done.returncode == 0, done.stderr
    for row in PUBLISHED:
        assert row.name in done.stdout
    assert "Config for E2.54B (layer-level)  35      -               2.54           55.4%" in done.stdout


def test_cli_slice_then_run_equals_run_with_matformer(folder, tmp_path):
    dst = tmp_path / "sliced"
    done = cli("slice", str(folder), str(dst), "--layers-skipped", "0,4", "--ffn-hidden-dims", "64,32,96,80")
    assert done.returncode == 0, done.stderr
    assert "slicing: 100%" in done.stderr  # progress on stderr
    summary = json.loads(done.stdout)
    assert summary["destination"] == str(dst) and summary["config"]["intermediate_size"] == [64, 32, 96, 80]
    assert (dst / "tokenizer.json").exists() and (dst / "tokenizer_config.json").exists()
    record = json.loads((dst / "config.json").read_text())
    assert record["matformer_slice"] == {"layers_skipped": [0, 4], "ffn_hidden_dims": [64, 32, 96, 80]}
    prompt = ["w11 w12 w13 w14", "-n", "6", "--temperature", "0", "--json"]
    offline = cli("run", "--model", str(dst), *prompt)
    elastic = cli("run", "--model", str(folder), "--matformer", json.dumps(SPEC), *prompt)
    assert offline.returncode == 0 and elastic.returncode == 0, offline.stderr + elastic.stderr
    assert json.loads(offline.stdout)["text"] == json.loads(elastic.stdout)["text"]
    assert json.loads(offline.stdout)["new_tokens"] == 6


def test_cli_dry_run_and_errors(folder, tmp_path):
    dst = tmp_path / "out"
    done = cli("slice", str(folder), str(dst), "--layers-skipped", "1", "--dry-run")
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["parameters"]["total"] < summary["source_parameters"]["total"] and not dst.exists()
    assert summary["bytes"] > 0
    for args in (["--layers-skipped", "3"], ["--layers-skipped", "0", "--ffn-hidden-dims", "1,2"],
                 ["--config", "E2B"], ["--layers-skipped", "x"], ["--ffn-hidden-dims", "96,128,64,96,160,200"]):
        done = cli("slice", str(folder), str(dst), *args)
        assert done.returncode == 2, args
        assert done.stderr.startswith("gemma3n: error:") and done.stderr.count("\n") == 1, done.stderr
        assert "Traceback" not in done.stderr
        assert list(tmp_path.iterdir()) == [], args
    done = cli("run", "--model", str(folder), "--matformer", '{"layers_skipped": [2]}', "hi")
    assert done.returncode == 2 and "layer 2 cannot be skipped" in done.stderr and "Traceback" not in done.stderr
    done = cli("slice", str(folder), str(dst), "--config", "E2B", "--layers-skipped", "1")
    assert done.returncode == 2 and "either --config" in done.stderr


def test_cli_quantized_slice(folder, tmp_path):
    dst = tmp_path / "int4"
    done = cli("slice", str(folder), str(dst), "--layers-skipped", "0,4", "--ffn-hidden-dims", "64,32,96,64",
               "--quantize", "int8")
    assert done.returncode == 0, done.stderr
    assert json.loads((dst / "config.json").read_text())["quantization"]["scheme"]["decoder"] == "int8"
    ids = torch.randint(0, 400, (1, 9), generator=torch.Generator().manual_seed(0))
    spec = {"layers_skipped": [0, 4], "ffn_hidden_dims": [64, 32, 96, 64]}
    assert torch.equal(gemma3n.load(dst).logits(ids), gemma3n.load(folder, matformer=spec, quantize="int8").logits(ids))
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())
    assert os.listdir(tmp_path) == ["int4"]


def test_matformer_option_on_every_loading_command():
    from gemma3n.cli import build_parser
    parser = build_parser()
    for command in (["run", "hi"], ["chat"], ["transcribe", "a.wav"], ["serve"]):
        assert parser.parse_args([*command, "--matformer", "E2B"]).matformer == "E2B"


def test_not_a_gemma3n_folder_is_refused(tmp_path):
    import transformers
    cfg = transformers.Gemma3TextConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=2, num_key_value_heads=1, head_dim=16)
    transformers.Gemma3ForCausalLM(cfg).save_pretrained(tmp_path / "g3")
    with pytest.raises(MatformerError, match="applies to Gemma 3n checkpoints"):
        gemma3n.load(tmp_path / "g3", matformer={"layers_skipped": [1]})
    with pytest.raises(MatformerError, match="applies to Gemma 3n checkpoints"):
        slice_checkpoint(tmp_path / "g3", tmp_path / "out", {"layers_skipped": [1]})
    (tmp_path / "model.gguf").write_bytes(b"GGUF")
    with pytest.raises(ValueError, match="needs a Gemma 3n safetensors checkpoint folder"):
        gemma3n.load(tmp_path / "model.gguf", matformer="E2B")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g3", "model.gguf"]
