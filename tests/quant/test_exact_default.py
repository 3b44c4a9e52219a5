"""Exact by default: the real Gemma 3 270M GGUF, loaded with no options, continues ordinary prompts greedily as
transformers does on the same file (transformers dequantises the blocks to float32; gemma3n multiplies the blocks
as stored with float32 activations, which differs only in the order of float32 additions).

A greedy continuation may still part where the reference's two best tokens are a float32-rounding apart (a
near-tie): such a split is accepted only when the reference's own top-2 logit gap at that step is below NEAR_TIE,
and the sequences before it must be identical. int8 activations are an opt-in (`activations="int8"`,
`--activations int8`, GEMMA3N_ACTIVATIONS=int8); tests/quant/test_fast_decode.py measures what they change."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from gemma3n import kernels

from ..console import console_env, gemma3n

PROMPTS = [
    "The capital of France is",
    "Write a short story about a cat who learns to fly.",
    "Explain how photosynthesis works in simple terms.",
    "What are three tips for staying productive when working from home?",
    "Translate 'good morning, how are you?' into Spanish.",
    "Give me a recipe for a simple tomato soup.",
    "Why is the sky blue?",
]
NEW_TOKENS = 24
NEAR_TIE = 1e-3  # logits of this model are O(10-30); float32 reordering moves them by ~1e-5


@pytest.fixture(scope="module")
def path():
    from gemma3n.cli import default_model_path
    return default_model_path()


@pytest.fixture(scope="module")
def reference(path):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def model(path):
    import gemma3n
    return gemma3n.load(path)


def reference_greedy(ref, ids: list[int], n: int, stop_ids: set[int]) -> tuple[list[int], list[float]]:
    """transformers' greedy continuation with its KV cache (up to and including a stop id), and at each step the
    gap between its two best logits."""
    out, gaps = [], []
    with torch.no_grad():
        step = ref(torch.tensor([ids]), use_cache=True)
        for _ in range(n):
            top = step.logits[0, -1].float().topk(2)
            out.append(int(top.indices[0]))
            gaps.append(float(top.values[0] - top.values[1]))
            if out[-1] in stop_ids:
                break
            step = ref(torch.tensor([[out[-1]]]), past_key_values=step.past_key_values, use_cache=True)
    return out, gaps


def assert_same_continuation(ours: list[int], ref: list[int], gaps: list[float], what: str) -> None:
    split = next((i for i, (a, b) in enumerate(zip(ours, ref)) if a != b), None)
    if split is None:
        assert len(ours) == len(ref), (what, ours, ref)
        return
    assert gaps[split] < NEAR_TIE, f"{what}: parts from the reference at token {split} (top-2 gap {gaps[split]:.4f})"


def test_default_is_float32_activations():
    """A fresh process with no setting computes exactly; the env variable still opts in."""
    code = "from gemma3n import kernels; print(kernels.activation_precision())"
    env = console_env()
    env.pop("GEMMA3N_ACTIVATIONS", None)
    run = lambda e: subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=e,  # noqa: E731
                                   timeout=120).stdout.strip()
    assert run(env) == "float32"
    assert run({**env, "GEMMA3N_ACTIVATIONS": "int8"}) == "int8"


def test_load_activations_argument(path):
    import gemma3n
    with pytest.raises(ValueError, match="activation precision"):
        gemma3n.load(path, activations="int4")
    gemma3n.load(path, activations="int8")
    assert kernels.activation_precision() == "int8"
    gemma3n.load(path, activations="float32")
    assert kernels.activation_precision() == "float32"


@pytest.mark.slow
def test_default_greedy_answers_equal_transformers(model, reference):
    assert kernels.activation_precision() == "float32"
    stop = model.stop_ids()
    for prompt in PROMPTS:
        ids = model.encode_prompt(prompt)
        ours = [int(t) for t in model.generate(ids, max_new_tokens=NEW_TOKENS, temperature=0)[0]]
        ref, gaps = reference_greedy(reference, ids[0].tolist(), NEW_TOKENS, stop)
        assert_same_continuation(ours, ref, gaps, prompt)


@pytest.mark.slow
def test_console_script_default_is_exact(model, reference):
    """`gemma3n run` with no flags, through the installed console script, prints transformers' greedy answer."""
    prompt = PROMPTS[0]
    env = console_env()
    env.pop("GEMMA3N_ACTIVATIONS", None)
    done = gemma3n("run", prompt, "--json", "-n", str(NEW_TOKENS), "--temperature", "0", env=env)
    assert done.returncode == 0, done.stderr
    text = json.loads(done.stdout.strip().splitlines()[-1])["text"]
    ids = model.encode_prompt(prompt)[0].tolist()
    ref, gaps = reference_greedy(reference, ids, NEW_TOKENS, model.stop_ids())
    if ref[-1] in model.stop_ids():
        ref = ref[:-1]
    assert text == model.tokenizer.decode(ref)
    # the opt-in is accepted and is what the API's opt-in computes
    done = gemma3n("run", prompt, "--json", "-n", "8", "--temperature", "0", "--activations", "int8", env=env)
    assert done.returncode == 0, done.stderr
    kernels.set_activation_precision("int8")
    expected = model.generate(prompt, max_new_tokens=8, temperature=0)
    assert json.loads(done.stdout.strip().splitlines()[-1])["text"] == expected


def test_console_script_refuses_an_unknown_activation_precision():
    """Checked before any loading: a typo is one line for people, not a silent fallback."""
    done = gemma3n("run", "hi", "--activations", "int4")
    assert done.returncode == 2 and "--activations" in done.stderr and "Traceback" not in done.stderr
    assert "int8" in gemma3n("run", "--help").stdout
