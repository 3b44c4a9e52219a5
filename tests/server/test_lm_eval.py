"""lm-evaluation-harness scores a multiple-choice task through `gemma3n serve` (its `local-completions` backend,
log-likelihoods from completions with echo + logprobs, tokenized by the server's /tokenize) exactly as its `hf`
backend scores it on the same real model (transformers on the same GGUF)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from .test_console_serve import ServeProcess

lm_eval = pytest.importorskip("lm_eval", reason="the evaluation test needs lm-eval (test extra)")

TASK = Path(__file__).parent / "lm_eval_task"


def _evaluate(model: str, model_args: str) -> dict:
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager
    cwd = os.getcwd()
    os.chdir(TASK)  # the task's data_files are relative to it
    try:
        return simple_evaluate(model=model, model_args=model_args, tasks=["gemma3n_mc"], log_samples=True,
                               task_manager=TaskManager(include_path=str(TASK)), batch_size=1)
    finally:
        os.chdir(cwd)


def _scores(results: dict) -> tuple[list[list[float]], float]:
    samples = sorted(results["samples"]["gemma3n_mc"], key=lambda s: s["doc_id"])
    return [[r[0] for r in s["filtered_resps"]] for s in samples], results["results"]["gemma3n_mc"]["acc,none"]


@pytest.mark.slow
def test_local_completions_scores_equal_the_hf_backend():
    from gemma3n.cli import default_model_path
    gguf = default_model_path()
    served = ServeProcess("--model", str(gguf), "--served-model-name", "gemma-270m")
    try:
        ours = _evaluate("local-completions", f"model=gemma-270m,base_url={served.url}/v1/completions,"
                                              "tokenizer_backend=remote,tokenized_requests=True,num_concurrent=1")
    finally:
        served.close()
    reference = _evaluate("hf", f"pretrained={gguf.parent},gguf_file={gguf.name},dtype=float32,device=cpu,"
                                "add_bos_token=False")
    (ours_ll, ours_acc), (ref_ll, ref_acc) = _scores(ours), _scores(reference)
    assert len(ours_ll) == len(ref_ll) == 8
    assert max(abs(a - b) for x, y in zip(ours_ll, ref_ll) for a, b in zip(x, y)) <= 1e-3
    assert ours_acc == ref_acc
