"""The native decode step (model/native_decode.py, kernels/decode_blocks.c) against the eager layers.

Same model, same prompt, one cache per path: after a prefill (always eager), each decode step's logits from the
native step must equal the eager step's to float32 rounding (relative to the largest logit) and give the same
greedy tokens, for Gemma 3n (AltUp, LAuReL, per-layer inputs, KV sharing, sparse layers, per-layer widths,
sequences past the sliding window) and Gemma 3 (linear RoPE scaling on global layers), batches with left padding,
float, int8, int4 and GGUF weights. Where it does not apply, the eager layers must run."""
from __future__ import annotations

import copy
import ctypes

import numpy as np
import pytest
import torch
from torch import nn

from gemma3n import kernels
from gemma3n.config import FULL, SLIDING, Gemma3TextConfig, TextConfig
from gemma3n.model import native_decode
from gemma3n.model.gemma3 import Gemma3CausalLM
from gemma3n.model.layers import RotaryEmbedding
from gemma3n.model.text import CausalLM, enable_sparse_decode
from gemma3n.quant.formats import int4_supported
from gemma3n.quant.modules import Int4Linear, Int8Linear
from tests.reference.tiny import randomize, text_config

pytestmark = pytest.mark.skipif(kernels.native() is None, reason=f"native kernels unavailable: {kernels.why_not()}")

RTOL = 1e-4
PROMPT = 11
STEPS = 20  # with the prompt, past every tiny config's sliding window (ring buffers wrap)

GEMMA3 = dict(
    vocab_size=97, hidden_size=48, intermediate_size=80, num_hidden_layers=5, num_attention_heads=4,
    num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=24, sliding_window=4, rms_norm_eps=1e-6,
    layer_types=[SLIDING, FULL, SLIDING, SLIDING, FULL], final_logit_softcapping=30.0, max_position_embeddings=256,
    rope_parameters={FULL: {"rope_type": "linear", "factor": 8.0, "rope_theta": 10_000.0},
                     SLIDING: {"rope_type": "default", "rope_theta": 100.0}},
)


@pytest.fixture(autouse=True)
def restore_switch():
    before = native_decode.enabled()
    yield
    native_decode.set_enabled(before)


def gemma3n_model(name: str, sparse: bool = False) -> CausalLM:
    lm = randomize(CausalLM(TextConfig.from_dict(text_config(name))), seed=0)
    if sparse:
        enable_sparse_decode(lm)
    return lm


def gemma3_model() -> Gemma3CausalLM:
    return randomize(Gemma3CausalLM(Gemma3TextConfig.from_dict(GEMMA3)), seed=0)


def decode(lm, batch: int, native: bool, steps: int = STEPS, forced: torch.Tensor | None = None):
    """Greedy decode after a prompt (row 1 left-padded when batch > 1), or the ids `forced` (B, steps) fed one
    at a time: the logits of every step, and the cache."""
    native_decode.set_enabled(native)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, lm.config.vocab_size, (batch, PROMPT), generator=g)
    mask = None
    if batch > 1:
        mask = torch.ones(batch, PROMPT, dtype=torch.long)
        mask[1, :3] = 0
    out = []
    with torch.inference_mode():
        cache = lm.new_cache(batch, PROMPT + steps + 1)
        logits = lm(ids, mask, cache, last_only=True)
        for i in range(steps):
            nxt = logits[:, -1].argmax(-1, keepdim=True) if forced is None else forced[:, i:i + 1]
            logits = lm(nxt, None if mask is None else torch.ones_like(nxt), cache, last_only=True)
            out.append(logits[:, -1])
    return torch.stack(out, 1), cache


def assert_native_equals_eager(lm, batch: int = 1, rtol: float = RTOL):
    got, cache = decode(lm, batch, native=True)
    assert cache.native_decoder[1] is not None, "the native step did not run"
    expected, eager_cache = decode(lm, batch, native=False)
    assert getattr(eager_cache, "native_decoder", None) is None
    err = ((got - expected).abs().max() / expected.abs().max()).item()
    assert err < rtol, f"max relative difference {err:.2e}"
    assert torch.equal(got.argmax(-1), expected.argmax(-1))
    return cache.native_decoder[1]


@pytest.mark.parametrize("name", ["mixed", "four_to_one"])
@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("sparse", [False, True])
def test_gemma3n_native_step_equals_eager(name, batch, sparse):
    assert_native_equals_eager(gemma3n_model(name, sparse), batch)


def test_portable_code_path(monkeypatch):
    """Without AVX2 (kernels.VECTORISED off) the step runs its portable C throughout."""
    monkeypatch.setattr(kernels, "VECTORISED", False)
    assert_native_equals_eager(gemma3n_model("mixed", sparse=True), batch=2)


def test_avx2_code_path_where_the_cpu_has_avx512():
    """With the 512-bit kernels turned off, the step runs the AVX2 ones (the path of CPUs without AVX-512)."""
    if not kernels.set_avx512(True):
        pytest.skip("this CPU has no AVX-512: every other test runs the AVX2 kernels")
    kernels.set_avx512(False)
    try:
        assert_native_equals_eager(gemma3n_model("mixed", sparse=True), batch=2)
    finally:
        kernels.set_avx512(True)


def test_wide_batch_without_the_sparse_skip():
    """More rows than the sparse skip takes (text.MLP.SPARSE_MAX_TOKENS): the transposed float down projection
    of the sparse layers is computed densely."""
    assert_native_equals_eager(gemma3n_model("mixed", sparse=True), batch=10)


@pytest.mark.parametrize("batch", [1, 2])
def test_gemma3_native_step_equals_eager(batch):
    assert_native_equals_eager(gemma3_model(), batch)


def test_gemma3_with_rope_rows_from_block_tables():
    """head_dim 32: the step reads RoPE rows from tables made a block of positions at a time (RopeRows)."""
    lm = randomize(Gemma3CausalLM(Gemma3TextConfig.from_dict({**GEMMA3, "head_dim": 32})), seed=0)
    decoder = assert_native_equals_eager(lm, batch=2)
    assert all(rows.span and rows.blocks for rows in decoder.rope_rows.values())


@pytest.mark.parametrize("head_dim", [16, 32, 48, 64, 256])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_rows_hold_the_tables_a_step_makes(head_dim, dtype):
    """Each row's cos and signed sin, as the step reads them, are the bits `RotaryEmbedding.tables` gives for
    that row's position alone (what the eager decode step computes), across block boundaries and for rows far
    apart; head dims that are not multiples of 32 make each step's own tables."""
    rope = RotaryEmbedding(head_dim, 10_000.0, 8.0)
    rows = native_decode.RopeRows(rope, dtype)
    assert bool(rows.span) == (head_dim % 32 == 0)
    span = rows.span or 1
    for positions in ([0], [span - 1], [span], [3, span + 5, 7 * span + 1], [span - 1, 40_000], [span + 2]):
        step_positions = torch.tensor(positions)[:, None]
        keep: list = []
        cos_at, sin_at = rows.pointers(positions, step_positions, keep)
        for b, p in enumerate(positions):
            cos, sin = rope.tables(torch.tensor([[p]]), dtype)
            for want, address in ((cos, cos_at[b]), (sin, sin_at[b])):
                got = np.ctypeslib.as_array((ctypes.c_float * head_dim).from_address(address))
                assert np.array_equal(got.view(np.uint32), want.float().reshape(-1).numpy().view(np.uint32))
    if rows.span:  # only the blocks the last step read are held
        assert set(rows.blocks) == {(span + 2) // span}


@pytest.mark.parametrize("kind", [SLIDING, FULL])
def test_one_attention_type(kind):
    """Models whose layers are all sliding or all global: the cache has masks for one type only."""
    cfg = Gemma3TextConfig.from_dict({**GEMMA3, "layer_types": [kind] * GEMMA3["num_hidden_layers"]})
    assert_native_equals_eager(randomize(Gemma3CausalLM(cfg), seed=0), batch=2)


def _swap_linears(lm: nn.Module, make) -> None:
    """Every nn.Linear inside the decoder layers replaced by make(weight) (or kept where make returns None)."""
    for layer in lm.model.layers:
        for name, m in list(layer.named_modules()):
            if type(m) is nn.Linear:
                new = make(m.weight.detach())
                if new is not None:
                    parent, _, leaf = name.rpartition(".")
                    setattr(layer.get_submodule(parent) if parent else layer, leaf, new)


@pytest.mark.parametrize("kind", ["int8", "int4"])
@pytest.mark.parametrize("precision", ["float32", "int8"])
def test_quantised_weights(kind, precision):
    kernels.set_activation_precision(precision)
    lm = gemma3n_model("mixed")

    def make(w):
        if kind == "int4" and int4_supported(w.shape[0], w.shape[1], 32):
            return Int4Linear.from_weight(w, 32)
        return Int8Linear.from_weight(w) if w.shape[1] % 32 == 0 else None
    _swap_linears(lm, make)
    enable_sparse_decode(lm)  # sparse up rows (int8) and down columns (int4) in the native step too
    # int8 activations round x per block of 32: a float32-rounding difference in x may move one value by a whole
    # step of its block, so the two paths agree to that step (~1e-2 of the largest logit in this chaotic model)
    decoder = assert_native_equals_eager(lm, batch=2, rtol=RTOL if precision == "float32" else 2e-2)
    if kind == "int4":  # the sparse layers' int4 up projections are read as rows (a copy: int4_rows.c)
        mlp = ctypes.cast(kernels.native().g3n_block_mlp, ctypes.c_void_p).value
        ups = [(op.opt[0], bool(op.lin[1].rows_w)) for op in decoder.ops
               if op.run == mlp and op.lin[1].kind == native_decode.L_INT4]
        assert ups and all(sparse == rows for sparse, rows in ups) and any(rows for _, rows in ups), ups


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0"])
def test_gguf_weights(qtype):
    gguf = pytest.importorskip("gguf")
    from gemma3n.quant.gguf_modules import GGUFLinear
    t = getattr(gguf.GGMLQuantizationType, qtype)
    lm = gemma3_model()

    def make(w):
        if w.shape[1] % 32:
            return None
        raw = gguf.quants.quantize(w.numpy().astype(np.float32), t)
        return GGUFLinear(torch.from_numpy(np.ascontiguousarray(raw)), int(t), w.shape[1], torch.float32)
    _swap_linears(lm, make)
    assert_native_equals_eager(lm, batch=1)


def test_bfloat16_model_is_computed_in_float32():
    """A bfloat16 model: the native step computes in float32 (with a bfloat16 cache), so it is closer to the same
    weights run in float32 than the eager bfloat16 step is."""
    lm = randomize(CausalLM(TextConfig.from_dict(text_config("mixed"))), seed=0).to(torch.bfloat16)
    forced = torch.randint(1, lm.config.vocab_size, (1, STEPS), generator=torch.Generator().manual_seed(2))
    native, cache = decode(lm, 1, native=True, forced=forced)
    assert cache.native_decoder[1] is not None
    eager, _ = decode(lm, 1, native=False, forced=forced)
    exact, _ = decode(copy.deepcopy(lm).float(), 1, native=False, forced=forced)  # the same weights in float32
    scale = exact.abs().max()
    native_err, eager_err = ((native - exact).abs().max() / scale).item(), ((eager - exact).abs().max() / scale).item()
    assert native_err < eager_err, (native_err, eager_err)


def test_where_it_does_not_apply_the_eager_layers_run():
    lm = gemma3n_model("mixed").double()  # no float64 kernels: eager
    _, cache = decode(lm, 1, native=True, steps=2)
    assert cache.native_decoder[1] is None
    lm = gemma3n_model("mixed")
    _, cache = decode(lm, 1, native=False, steps=2)  # switched off
    assert getattr(cache, "native_decoder", None) is None
    native_decode.set_enabled(True)
    cache = lm.new_cache(1, 8)
    with torch.no_grad():
        lm(torch.tensor([[1, 2, 3]]), None, cache)  # prefill: eager
        assert getattr(cache, "native_decoder", None) is None
    lm(torch.tensor([[4]]), None, cache)  # autograd on: eager (the native step records no graph)
    assert getattr(cache, "native_decoder", None) is None


def test_continuous_batch_rows_equal_the_eager_layers():
    """The server's BatchCache (rows joining and leaving, each at its own position and cache cell)."""
    from gemma3n.engine.batch import ContinuousBatch
    from gemma3n.engine.sampling import SamplingParams
    lm = gemma3n_model("mixed", sparse=True)
    arrivals = {0: [(0, 3, 30), (1, 12, 18)], 2: [(2, 5, 25)], 5: [(3, 20, 12), (4, 9, 40)]}

    def run(native: bool):
        native_decode.set_enabled(native)
        batch, seqs, tokens, used = ContinuousBatch(lm, chunk_size=4), {}, {}, False
        for step in range(200):
            for key, n, budget in arrivals.get(step, []):
                ids = torch.randint(1, lm.config.vocab_size, (1, n), generator=torch.Generator().manual_seed(key))
                seqs[key] = batch.add(ids, SamplingParams(max_new_tokens=budget, temperature=0), ())
                tokens[key] = []
            with torch.inference_mode():
                for seq, token in batch.step():
                    key = next(k for k, s in seqs.items() if s is seq)
                    if token is not None:
                        tokens[key].append(token)
            for group in batch.groups:
                held = getattr(group.cache, "native_decoder", None)
                used |= held is not None and held[1] is not None
            if step > max(arrivals) and not len(batch):
                return tokens, used
        raise AssertionError("the batch did not finish")
    native, used = run(True)
    assert used, "the native step did not run"
    eager, _ = run(False)
    assert native == eager


def test_a_finished_cache_is_freed_at_once():
    """The native description lives on the cache and must not hold the cache back (no reference cycle): its K/V
    memory goes when the generation drops it, without waiting for the cycle collector."""
    import gc
    import weakref
    lm = gemma3n_model("mixed")
    _, cache = decode(lm, 1, native=True, steps=3)
    assert cache.native_decoder[1] is not None
    gone = weakref.ref(cache)
    gc.disable()
    try:
        del cache
        assert gone() is None
    finally:
        gc.enable()
