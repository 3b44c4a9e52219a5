"""Each native block kernel (kernels/decode_blocks.c) against its PyTorch twin (model/blocks.py's EAGER), block by
block, as llama.cpp's test-backend-ops compares backends op by op; and the native plan against the layers' one
description (their BLOCKS).

An eager decode step of a tiny model is recorded block by block (the module, the block, its input registers and
its output); each recorded block is then run alone as a one-block native plan on the same inputs (attention on a
copy of the cache after the eager step, which holds the K/V every layer reads) and must give the eager output:
bit for bit where both compute the same float32 operations in the same order (sums, the stream copy), to float32
rounding elsewhere (the reductions of norms, softmax and products are summed in another order)."""
from __future__ import annotations

import copy
import ctypes

import pytest
import torch

from gemma3n import kernels
from gemma3n.model import blocks, gemma3, native_decode, text
from tests.model.test_native_decode import assert_native_equals_eager, gemma3_model, gemma3n_model

pytestmark = pytest.mark.skipif(kernels.native() is None, reason=f"native kernels unavailable: {kernels.why_not()}")

BIT_EXACT = {"add", "first_stream"}
RTOL = 2e-6  # of the largest value of the output, per block: a few float32 roundings


@pytest.fixture(autouse=True)
def restore_switch():
    before = native_decode.enabled()
    yield
    native_decode.set_enabled(before)


def record_decode_step(lm, batch: int, monkeypatch) -> tuple[list, object, object]:
    """A prompt and one eager decode step (row 1 left-padded): every block call of that step as (module, block,
    context, inputs, output), the step's `Step`, and the cache after it."""
    native_decode.set_enabled(False)
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(1, lm.config.vocab_size, (batch, 9), generator=g)
    mask = torch.ones(batch, 9, dtype=torch.long)
    if batch > 1:
        mask[1, :2] = 0
    calls: list = []
    with torch.inference_mode():
        cache = lm.new_cache(batch, 16)
        lm(ids, mask, cache, last_only=True)
        start, steps = cache.start, []
        cache.start = lambda *args: steps.append(start(*args)) or steps[-1]
        for kernel, eager in list(blocks.EAGER.items()):
            def recorded(module, block, ctx, *inputs, eager=eager):
                out = eager(module, block, ctx, *inputs)
                calls.append((module, block, ctx, [x.clone() for x in inputs], out.clone()))
                return out
            monkeypatch.setitem(blocks.EAGER, kernel, recorded)
        lm(torch.full((batch, 1), 5), torch.ones(batch, 1, dtype=torch.long), cache, last_only=True)
    monkeypatch.undo()
    return calls, steps[0], cache


def native_block(lm, module, block, ctx, inputs, step, cache) -> torch.Tensor:
    """One block run alone as a native plan on the same inputs."""
    decoder = native_decode.NativeDecoder(lm.model, [(module, block)])
    batch = cache.batch
    registers = {}
    for name, x in zip(block.inputs, inputs):
        registers[name] = x.float().contiguous().clone()
    ple = None
    if block.kernel == "per_layer_input":
        cfg = lm.config
        ple = torch.zeros(batch, 1, cfg.num_hidden_layers, cfg.hidden_size_per_layer_input)
        ple[:, 0, module.layer] = ctx.ple[:, 0].float()
    if block.kernel == "attention":
        assert decoder.bind(cache)
    return decoder.execute(registers, batch, step, cache, ple)[block.output]


def assert_blocks_equal_twins(lm, batch: int, monkeypatch) -> set[str]:
    calls, step, cache = record_decode_step(lm, batch, monkeypatch)
    assert calls, "no blocks ran"
    kernels_seen = set()
    with torch.inference_mode():
        for module, block, ctx, inputs, expected in calls:
            got = native_block(lm, module, block, ctx, inputs, step, copy.deepcopy(cache))
            got = got.reshape(expected.shape)  # [S][B][D] streams in memory, as the eager (S, B, 1, D)
            what = f"{block.kernel} ({block.module or 'layer'}) of layer {getattr(module, 'layer', '?')}"
            if block.kernel in BIT_EXACT:
                assert torch.equal(got, expected), what
            else:
                scale = expected.abs().max().item()
                err = (got - expected).abs().max().item() / scale
                assert err < RTOL, f"{what}: max difference {err:.2e} of the largest value"
            kernels_seen.add(block.kernel)
    return kernels_seen


@pytest.mark.parametrize("name,sparse", [("mixed", True), ("four_to_one", False)])
@pytest.mark.parametrize("batch", [1, 2])
def test_gemma3n_blocks_equal_their_twins(name, sparse, batch, monkeypatch):
    """AltUp predict / correct, LAuReL, attention (own and shared K/V), dense and sparse MLPs, per-layer input,
    norms, sums and the stream copy."""
    seen = assert_blocks_equal_twins(gemma3n_model(name, sparse), batch, monkeypatch)
    assert seen == {b.kernel for b in text.TextModel.INITIAL_BLOCKS + text.DecoderLayer.BLOCKS
                    + text.TextModel.FINAL_BLOCKS}


@pytest.mark.parametrize("batch", [1, 2])
def test_gemma3_blocks_equal_their_twins(batch, monkeypatch):
    """Norms with Gemma 3's 1 + w, attention scaled by query_pre_attn_scalar**-0.5 without a value norm."""
    seen = assert_blocks_equal_twins(gemma3_model(), batch, monkeypatch)
    assert seen == {b.kernel for b in gemma3.DecoderLayer.BLOCKS + gemma3.TextModel.FINAL_BLOCKS}


def test_every_block_kernel_has_both_twins():
    lib = kernels.native()
    used = {b.kernel for layer in (text.DecoderLayer, gemma3.DecoderLayer) for b in layer.BLOCKS}
    used |= {b.kernel for model in (text.TextModel, gemma3.TextModel)
             for b in getattr(model, "INITIAL_BLOCKS", ()) + model.FINAL_BLOCKS}
    assert used == set(blocks.EAGER)
    for kernel in blocks.EAGER:
        assert getattr(lib, f"g3n_block_{kernel}", None) is not None, kernel


@pytest.mark.parametrize("make", [gemma3n_model, gemma3_model], ids=["gemma3n", "gemma3"])
def test_the_plan_is_the_layers_blocks_in_order(make):
    """The native plan of a model is the model's INITIAL_BLOCKS (Gemma 3n's AltUp set-up), its layers' BLOCKS in
    order, then the model's FINAL_BLOCKS (Gemma 3n's collapse; the final norm), and nothing else."""
    lm = make("mixed") if make is gemma3n_model else make()
    lib = kernels.native()
    decoder = native_decode.NativeDecoder(lm.model)
    model = type(lm.model)
    listed = list(getattr(model, "INITIAL_BLOCKS", ())) + [b for layer in lm.model.layers for b in type(layer).BLOCKS]
    expected = [ctypes.cast(getattr(lib, f"g3n_block_{b.kernel}"), ctypes.c_void_p).value
                for b in listed + list(model.FINAL_BLOCKS)]
    assert [op.run for op in decoder.ops] == expected


def run_layer(lm, x):
    """The first layer of a Gemma 3 model on x (1, T, D), attending causally to its own keys, no cache."""
    layer, t = lm.model.layers[0], x.shape[1]
    rope = lm.model.rope[layer.kind].tables(torch.arange(t)[None], x.dtype)
    mask = torch.full((t, t), float("-inf")).triu(1)[None, None]
    return layer(x, rope, mask, lambda normed: layer.self_attn.project_kv(normed, *rope))


def test_a_layer_order_changed_once_reaches_both_paths(monkeypatch):
    """Change a layer's description once (here: Gemma 3 without its post-attention norm): the eager forward and the
    native step both follow it, and still agree."""
    lm = gemma3_model()
    x = torch.randn(1, 3, lm.config.hidden_size, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        original = run_layer(lm, x)
    monkeypatch.setattr(gemma3.DecoderLayer, "BLOCKS", tuple(
        b for b in gemma3.DecoderLayer.BLOCKS if b.module != "post_attention_layernorm"))
    with torch.inference_mode():
        assert not torch.allclose(run_layer(lm, x), original)  # the description is what runs
    assert len(native_decode.NativeDecoder(lm.model).ops) == 7 * lm.config.num_hidden_layers + 1  # + final norm
    assert_native_equals_eager(lm, batch=2)


def test_a_block_the_native_side_does_not_know_runs_eagerly(monkeypatch):
    """A layer listing a block without a native twin: the plan is not built and the eager layers run."""
    monkeypatch.setitem(blocks.EAGER, "scale_by_two", lambda module, block, ctx, x: x * 2)
    monkeypatch.setattr(gemma3.DecoderLayer, "BLOCKS",
                        gemma3.DecoderLayer.BLOCKS + (blocks.Block("scale_by_two", ("x",), "x"),))
    lm = gemma3_model()
    with pytest.raises(native_decode.Unsupported):
        native_decode.NativeDecoder(lm.model)
    native_decode.set_enabled(True)
    with torch.inference_mode():
        cache = lm.new_cache(1, 8)
        lm(torch.tensor([[3, 4]]), None, cache)
        lm(torch.tensor([[5]]), None, cache)
    assert cache.native_decoder[1] is None
