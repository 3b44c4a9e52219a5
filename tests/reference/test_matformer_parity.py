"""MatFormer slices equal transformers: the folder `slice_checkpoint` writes, loaded by transformers, gives the same
float32 logits as gemma3n's elastic view of the unsliced folder and as gemma3n loading the written folder.

The tiny models are E4B-like (AltUp, LAuReL, per-layer embeddings, KV sharing, sparse layers, per-layer widths) but
laid out unlike E4B: other layer counts, global layers first or irregular, sparse layers in the middle and among
the shared ones, a model without shared layers, both checkpoint layouts, single and sharded files."""
import json

import pytest
import torch

import gemma3n
from gemma3n.matformer import MatformerError, SlicedRowEmbedding, parameter_counts, plan_slice, slice_checkpoint

from .test_text_parity import rel_err
from .tiny import COMMON, F, S, randomize, save_reference

T = 24
# name -> (text config, checkpoint layout, shard size of the saved source, slices)
MODELS = {
    # 7 layers S S F S | F S F shared (reserved: 3 = last sliding, 2 = last global); sparse layers scattered
    "seven": (dict(num_hidden_layers=7, layer_types=[S, S, F, S, F, S, F], num_kv_shared_layers=3,
                   intermediate_size=[96, 128, 64, 160, 96, 128, 64],
                   activation_sparsity_pattern=[0.0, 0.95, 0.0, 0.95, 0.0, 0.95, 0.0], sliding_window=8),
              "causal", None,
              [{"layers_skipped": [0, 5], "ffn_hidden_dims": [64, 48, 160, 32, 64]},   # a sparse shared layer goes
               {"layers_skipped": [1, 4, 6], "ffn_hidden_dims": [96, 64, 80, 64]},     # every shared but one
               {"layers_skipped": [], "ffn_hidden_dims": [32, 32, 32, 32, 32, 32, 32]}]),
    # 9 layers, global first, no KV sharing at all (nothing is reserved), saved sharded
    "nine": (dict(num_hidden_layers=9, layer_types=[F, S, S, F, S, S, F, S, S], num_kv_shared_layers=0,
                  intermediate_size=128, activation_sparsity_pattern=[0.95] * 3 + [0.0] * 6, sliding_window=16),
             "causal", "60KB",
             [{"layers_skipped": [0, 1, 2, 7], "ffn_hidden_dims": [128, 64, 96, 32, 128]},
              {"layers_skipped": [8]}]),
    # the multimodal layout (towers copied unchanged): 6 layers F S S F | S F shared
    "multimodal6": (dict(num_hidden_layers=6, layer_types=[F, S, S, F, S, F], num_kv_shared_layers=2,
                         intermediate_size=[64, 96, 128, 96, 64, 128],
                         activation_sparsity_pattern=[0.95, 0.0, 0.95, 0.0, 0.0, 0.95], sliding_window=8,
                         vocab_size_per_layer_input=384),
                    "multimodal", None,
                    [{"layers_skipped": [1, 4], "ffn_hidden_dims": [32, 128, 48, 64]},
                     {"layers_skipped": [0, 5], "ffn_hidden_dims": [96, 64, 96, 64]}]),
}


def _build(name: str, seed: int):
    from transformers import Gemma3nConfig, Gemma3nForCausalLM, Gemma3nForConditionalGeneration, Gemma3nTextConfig

    from .tiny import TINY_AUDIO, TINY_MEDIA_TOKENS, TINY_VISION
    text, layout, _, _ = MODELS[name]
    text = {**COMMON, **text}
    torch.manual_seed(seed)
    if layout == "multimodal":
        cfg = Gemma3nConfig(text_config=text, audio_config=TINY_AUDIO, vision_config=TINY_VISION, **TINY_MEDIA_TOKENS)
        return randomize(Gemma3nForConditionalGeneration(cfg), seed, 0.1)
    return randomize(Gemma3nForCausalLM(Gemma3nTextConfig(**text)), seed, 0.1)


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    made = {}

    def get(name: str):
        if name not in made:
            ref = _build(name, seed=len(made) + 5)
            folder = save_reference(ref, tmp_path_factory.mktemp(name), max_shard_size=MODELS[name][2])
            made[name] = (ref, folder)
        return made[name]
    return get


def _reference(folder, layout):
    from transformers import Gemma3nForCausalLM, Gemma3nForConditionalGeneration
    cls = Gemma3nForConditionalGeneration if layout == "multimodal" else Gemma3nForCausalLM
    return cls.from_pretrained(folder, dtype=torch.float32).eval()


def _logits(ref, ids):
    with torch.no_grad():
        return ref(input_ids=ids).logits.float()


def _ids(vocab=380):
    return torch.randint(0, vocab, (2, T), generator=torch.Generator().manual_seed(7))


CASES = [(name, i) for name, (_, _, _, slices) in MODELS.items() for i in range(len(slices))]


@pytest.mark.parametrize("name,index", CASES, ids=[f"{n}-{i}" for n, i in CASES])
def test_slice_equals_transformers_loading_it(source, tmp_path, name, index):
    _, layout, _, slices = MODELS[name]
    spec = slices[index]
    ref, folder = source(name)
    dst = tmp_path / "sliced"
    summary = slice_checkpoint(folder, dst, spec, shard_bytes=80_000 if name == "nine" else 2 << 30)
    if name == "nine":
        assert (dst / "model.safetensors.index.json").exists()  # written sharded too
    sliced_ref = _reference(dst, layout)
    ids = _ids()
    want = _logits(sliced_ref, ids)
    elastic = gemma3n.load(folder, matformer=spec, dtype="float32")
    offline = gemma3n.load(dst, dtype="float32")
    assert rel_err(elastic.logits(ids), want) <= 1e-4
    assert rel_err(offline.logits(ids), want) <= 1e-4
    # the sliced config is what transformers built, and the counts are transformers' (+ the unused shared K/V)
    text = sliced_ref.config.get_text_config()
    kept = [i for i in range(MODELS[name][0]["num_hidden_layers"]) if i not in spec["layers_skipped"]]
    assert text.num_hidden_layers == len(kept) == elastic.config.text.num_hidden_layers
    assert summary["kept_layers"] == kept
    counts = summary["parameters"]
    assert counts["total"] - counts["shared_kv"] == sliced_ref.num_parameters()
    language = sliced_ref.model.language_model if layout == "multimodal" else sliced_ref.model
    assert counts["text"] - counts["shared_kv"] == language.num_parameters()
    assert counts["effective"] - counts["shared_kv"] == language.num_parameters(exclude_embeddings=True)
    # greedy decoding (the native decode step, the sparse path) agrees too
    elastic_ids = elastic.generate(ids[:1, :9], max_new_tokens=6, temperature=0)
    assert torch.equal(elastic_ids, offline.generate(ids[:1, :9], max_new_tokens=6, temperature=0))


@pytest.mark.parametrize("name", sorted(MODELS))
def test_identity_slice_is_the_full_model(source, tmp_path, name):
    ref, folder = source(name)
    n = MODELS[name][0]["num_hidden_layers"]
    full = gemma3n.load(folder, dtype="float32")
    widths = list(full.config.text.intermediate_size)
    spec = {"layers_skipped": [], "ffn_hidden_dims": widths}
    ids = _ids()
    same = gemma3n.load(folder, matformer=spec, dtype="float32")
    assert not isinstance(same.lm.model.embed_tokens_per_layer, SlicedRowEmbedding)
    assert torch.equal(same.logits(ids), full.logits(ids))
    dst = tmp_path / "identity"
    slice_checkpoint(folder, dst, spec)
    assert torch.equal(gemma3n.load(dst, dtype="float32").logits(ids), full.logits(ids))
    assert rel_err(_logits(_reference(dst, MODELS[name][1]), ids), _logits(ref, ids)) == 0
    assert plan_slice(full.config, spec).identity and full.config.text.num_hidden_layers == n


def test_elastic_view_reads_only_kept_blocks_of_the_per_layer_table(source, monkeypatch):
    """The table stays the stored file view: the elastic model's table holds views of the map, and neither loading
    nor running ever produces the sliced table whole (which would read every page of a multi-GB table)."""
    from gemma3n.matformer import SlicedTensors
    _, folder = source("seven")
    produced = []
    original = SlicedTensors.__getitem__
    monkeypatch.setattr(SlicedTensors, "__getitem__", lambda self, name: produced.append(name) or original(self, name))
    model = gemma3n.load(folder, matformer={"layers_skipped": [0, 5]})
    model.generate(_ids()[:1, :5], max_new_tokens=3, temperature=0)
    assert produced and not any("embed_tokens_per_layer" in name for name in produced)
    table = model.lm.model.embed_tokens_per_layer
    assert isinstance(table, SlicedRowEmbedding)
    start, end = table.source.data_ptr(), table.source.data_ptr() + table.source.numel() * table.source.element_size()
    assert all(start <= piece.data_ptr() < end for piece in table.pieces)  # views into the stored table
    assert table.embedding_dim == 5 * COMMON["hidden_size_per_layer_input"]
    assert [p.shape[1] for p in table.pieces] == [16 * 4, 16]  # layers 1-4 and 6


def test_quantized_slice_in_one_pass_equals_quantizing_the_elastic_view(source, tmp_path):
    _, folder = source("seven")
    spec = MODELS["seven"][3][0]
    dst = tmp_path / "int8"
    summary = slice_checkpoint(folder, dst, spec, quantize="int8")
    assert json.loads((dst / "config.json").read_text())["quantization"]["format"] == "gemma3n-weight-only-1"
    assert summary["quantization"]["decoder"] == "int8"
    ids = _ids()
    written = gemma3n.load(dst)
    elastic = gemma3n.load(folder, matformer=spec, quantize="int8")
    assert torch.equal(written.logits(ids), elastic.logits(ids))


def test_published_configuration_on_a_small_model_is_refused_clearly(source, tmp_path):
    _, folder = source("seven")
    with pytest.raises(MatformerError, match="published configurations are for Gemma 3n E4B"):
        slice_checkpoint(folder, tmp_path / "x", "E2.54B")
    assert not (tmp_path / "x").exists()


def test_counts_follow_the_sliced_config(source):
    _, folder = source("multimodal6")
    model = gemma3n.load(folder)
    counts = parameter_counts(model.config)
    assert counts["vision"] and counts["audio"] and counts["total"] == counts["text"] + counts["vision"] + \
        counts["audio"]
