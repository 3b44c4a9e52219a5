"""Several adapters beside one base, chosen per row (`gemma3n.load(path, adapters={...})`, what `gemma3n serve
--adapter NAME=DIR` runs): in one forward, and in one continuous batch, each row gives what its adapter gives merged
into the base alone (`gemma3n.load(path, adapter=DIR)`, itself checked against PEFT in test_peft_parity.py), and
base rows give exactly the base model's bits."""
from __future__ import annotations

import pytest
import torch

import gemma3n
from gemma3n import kernels
from gemma3n.adapters.multi_lora import AdapterSet, MultiLoRALinear
from gemma3n.engine.batch import ContinuousBatch
from gemma3n.engine.sampling import SamplingParams
from gemma3n.model import native_decode

peft = pytest.importorskip("peft")

ROWS = [None, None, "a", "b", "a", "b", "b"]  # the adapter of each prompt: base, A and B side by side
# (base rows first: float products round by the number of rows, so the base reference must see the same groups)


def make_adapter(ref, folder, seed: int, **config):
    """A PEFT LoRA adapter with random (non-zero) B, saved as PEFT saves it."""
    import copy
    model = peft.get_peft_model(copy.deepcopy(ref), peft.LoraConfig(**config))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * (0.05 if "lora_B" in name else 0.3))
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def served(tiny_base, tmp_path_factory):
    ref, base = tiny_base("mixed")  # Gemma 3n: sparse and dense MLPs, shared KV, AltUp, LAuReL
    work = tmp_path_factory.mktemp("multi-lora")
    a = make_adapter(ref, work / "a", 1, r=4, lora_alpha=8, target_modules="all-linear")
    b = make_adapter(ref, work / "b", 2, r=2, lora_alpha=4, use_rslora=True,
                     target_modules=["q_proj", "v_proj", "o_proj", "down_proj", "up_proj"])
    return {"multi": gemma3n.load(base, adapters={"a": a, "b": b}), None: gemma3n.load(base),
            "a": gemma3n.load(base, adapter=a), "b": gemma3n.load(base, adapter=b)}


def prompts() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(11)
    return [torch.randint(3, 380, (1, n), generator=g) for n in (5, 9, 14, 3, 20, 7, 11)]


def run(model, items, adapters=None, max_new_tokens=12):
    """Greedy-generate every (ids, adapter) of `items` in one continuous batch; per item (tokens, logprobs)."""
    batch = ContinuousBatch(model.decoder, chunk_size=6, adapters=adapters)
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0, logprobs=3)
    seqs = [batch.add(ids, params, adapter=name) for ids, name in items]
    while len(batch):
        batch.step()
    return [(s.new_ids, [(t.token, t.logprob, t.top) for t in s.logprobs]) for s in seqs]


def test_the_adapters_differ_from_the_base(served):
    ids = prompts()[2]
    base = served[None].logits(ids)
    for name in ("a", "b"):
        assert (served[name].logits(ids) - base).abs().max() > 1e-2 * base.abs().max()


def test_one_forward_with_rows_of_base_a_and_b(served):
    """Teacher-forced logits of a batch whose rows use base, A and B: each row as its own model gives it."""
    ids = torch.randint(3, 380, (len(ROWS), 9), generator=torch.Generator().manual_seed(3))
    multi = served["multi"]
    with torch.inference_mode(), multi.adapters.selected(ROWS):
        got = multi.decoder(ids, None).float()
    with torch.inference_mode():  # the base model on the same rows: float products round with the batch's shape
        base = served[None].decoder(ids, None).float()
    for row, name in enumerate(ROWS):
        want = served[name].logits(ids[row:row + 1])[0]
        if name is None:
            assert torch.equal(got[row], base[row]), "a base row must be the base model exactly"
            assert float((got[row] - want).abs().max()) <= 1e-5 * float(want.abs().max())
        else:
            assert float((got[row] - want).abs().max()) <= 1e-4 * float(want.abs().max()), name
    assert not multi.adapters.active  # the selection ends with its block


def test_continuous_batch_rows_equal_each_model_alone(served, monkeypatch):
    """Rows of base, A and B generated in one batch: base rows give the base model's bits (run with the same base
    rows: float products of several rows round unlike one row's), adapter rows the merged model's answers."""
    native_steps = []
    real_run = native_decode.NativeDecoder.run
    monkeypatch.setattr(native_decode.NativeDecoder, "run",
                        lambda self, *a, **k: native_steps.append(1) or real_run(self, *a, **k))
    multi, items = served["multi"], list(zip(prompts(), ROWS))
    got = run(multi, items, multi.adapters)
    used_native = len(native_steps)
    base_rows = [row for row, name in enumerate(ROWS) if name is None]
    base_alone = run(served[None], [items[row] for row in base_rows])
    assert [got[row] for row in base_rows] == base_alone  # tokens and logprobs, bit for bit
    for (ids, name), (tokens, logprobs) in zip(items, got):
        if name is not None:
            want_tokens, want_logprobs = run(served[name], [(ids, None)])[0]
            assert tokens == want_tokens, name
            assert max(abs(g[1] - w[1]) for g, w in zip(logprobs, want_logprobs)) <= 1e-4, name
    if kernels.native() is not None and native_decode.enabled():
        assert used_native > 0, "base-only decode groups must keep the native decode step"


def test_python_api_generates_with_a_named_adapter(served):
    """`Model.generate/complete/stream(..., adapter=NAME)` on a model loaded with `adapters=` give what the model with
    that adapter merged gives (greedy ids); no name is the base model; an unknown name says which are loaded."""
    multi = served["multi"]
    ids = prompts()[1]
    for name in ("a", "b", None):
        want = served[name].generate(ids, max_new_tokens=10, temperature=0.0)
        assert torch.equal(multi.generate(ids, max_new_tokens=10, temperature=0.0, adapter=name), want), name
    text = "hello world"  # the tiny checkpoint's turn-aware tokenizer
    whole = multi.complete(text, adapter="a", max_new_tokens=8, temperature=0.0)
    assert whole.new_tokens > 0
    assert whole.text == served["a"].complete(text, max_new_tokens=8, temperature=0.0).text
    assert whole.token_ids != multi.complete(text, max_new_tokens=8, temperature=0.0).token_ids  # a is not the base
    assert "".join(multi.stream(text, adapter="a", max_new_tokens=8, temperature=0.0)) == whole.text
    with pytest.raises(ValueError, match=r"no adapter named 'c' is loaded \(loaded: \['a', 'b'\]\)"):
        multi.generate(ids, max_new_tokens=2, adapter="c")


@pytest.mark.parametrize("rows", [1, 3, 16])
def test_a_rows_delta_does_not_depend_on_its_neighbours(rows):
    """Over int8 weights (whose native products compute each row alone), a row's output is the same bits alone and
    among other rows of base, A and B, and the bits of LoRALinear (one adapter beside quantised weights, as
    `gemma3n.load(path, adapter=DIR)` applies it to a quantised base, and `gemma3n run --adapter` runs it)."""
    from gemma3n.adapters.lora import LoRALinear
    from gemma3n.quant.modules import Int8Linear
    g = torch.Generator().manual_seed(0)
    base = Int8Linear.from_weight(torch.randn(96, 64, generator=g))
    adapters = AdapterSet(["a", "b"])
    multi = MultiLoRALinear(base, adapters)
    single = {}
    for index, (name, rank, alpha) in enumerate((("a", 4, 8.0), ("b", 2, 6.0))):
        a, b = torch.randn(rank, 64, generator=g), torch.randn(96, rank, generator=g)
        multi.add(index, a, b, alpha / rank)
        single[name] = LoRALinear(base, rank, alpha)
        single[name].lora_A.weight.data.copy_(a)
        single[name].lora_B.weight.data.copy_(b)
    names = (["a", None, "b", "b"] * 4)[:rows]
    x = torch.randn(rows, 1, 64, generator=g)
    with torch.inference_mode():
        with adapters.selected(names):
            together = multi(x)
        for row, name in enumerate(names):
            with adapters.selected([name]):
                alone = multi(x[row:row + 1])
            assert torch.equal(together[row:row + 1], alone)
            want = base(x[row:row + 1]) if name is None else single[name](x[row:row + 1])
            assert torch.equal(alone, want)


def test_unknown_adapter_and_bad_names_are_refused(served):
    multi = served["multi"]
    batch = ContinuousBatch(multi.decoder, adapters=multi.adapters)
    with pytest.raises(ValueError, match="no adapter named 'c'"):
        batch.add(prompts()[0], SamplingParams(max_new_tokens=2), adapter="c")
    with pytest.raises(ValueError, match="no adapter named 'a'"):
        ContinuousBatch(served[None].decoder).add(prompts()[0], SamplingParams(max_new_tokens=2), adapter="a")
    with pytest.raises(ValueError, match="adapter name"):
        AdapterSet(["a b"])
    with pytest.raises(ValueError, match="must differ"):
        AdapterSet(["a", "a"])


def test_layers_keep_the_base_weights_as_loaded(served):
    multi = served["multi"]
    wrapped = [m for m in multi.lm.modules() if isinstance(m, MultiLoRALinear)]
    assert wrapped and all(type(m.base_layer) is torch.nn.Linear for m in wrapped)
    base = dict(served[None].lm.named_parameters())
    for path, module in multi.lm.named_modules():
        if isinstance(module, MultiLoRALinear):
            assert torch.equal(module.base_layer.weight, base[path + ".weight"])


def test_an_adapter_for_another_model_is_refused(tiny_base, tmp_path, served):
    ref, _ = tiny_base("mixed")
    _, other = tiny_base("four_to_one")
    adapter = make_adapter(ref, tmp_path / "a", 1, r=2, lora_alpha=4, target_modules="all-linear")
    with pytest.raises(ValueError, match="adapter 'x'"):
        gemma3n.load(other, adapters={"x": adapter})
