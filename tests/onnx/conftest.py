"""One tiny multimodal Gemma 3n (transformers' save_pretrained), exported once through the installed console script
in every dtype; the tests compare onnxruntime, transformers.js and gemma3n's own torch model on it."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from tests.console import gemma3n
from tests.finetune.tiny_data import write_turn_tokenizer
from tests.reference.tiny import build_reference, save_reference

JS_DIR = Path(__file__).resolve().parent / "js"
DTYPES = ("fp32", "fp16", "q8", "q4", "q4f16")
# Through the console script with every session (towers included); the other dtypes are made for the two text
# sessions only, with the same converter: the towers' fp16 / q8 / q4f16 conversions took ~29 s of the shared
# two cores (vision_encoder: 11.6 + 7.7 + 9.7 s) and no test reads them (q4 proves a converted tower loads).
CONSOLE_DTYPES = ("fp32", "q4")


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A seeded tiny multimodal checkpoint with a word-level tokenizer and the Gemma 3n chat template. Weights at
    scale 0.1: well conditioned, like a trained model, so that quantised sessions are meaningfully comparable."""
    torch.manual_seed(0)
    folder = save_reference(build_reference("multimodal", seed=16, scale=0.1), tmp_path_factory.mktemp("tiny_mm"))
    write_turn_tokenizer(folder)
    return folder


@pytest.fixture(scope="session")
def exported(tiny_checkpoint, tmp_path_factory) -> Path:
    """`gemma3n export onnx` of the tiny checkpoint in fp32 and q4, then the text sessions in the other dtypes."""
    from gemma3n.onnx import SUFFIXES, TEXT_SESSIONS
    from gemma3n.onnx.dtypes import convert
    out = tmp_path_factory.mktemp("tiny_onnx") / "export"
    result = gemma3n("export", "onnx", str(tiny_checkpoint), str(out), "--dtype", ",".join(CONSOLE_DTYPES),
                     timeout=1800)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["dtypes"] == list(CONSOLE_DTYPES)
    onnx = out / "onnx"
    for dtype in DTYPES:
        if dtype not in CONSOLE_DTYPES:
            for name in TEXT_SESSIONS:
                convert(onnx / f"{name}.onnx", dtype, onnx / f"{name}{SUFFIXES[dtype]}.onnx")
    return out


@pytest.fixture(scope="session")
def transformers_js() -> Path:
    """tests/onnx/js with @huggingface/transformers installed from its package-lock.json (npm ci), the CPU binary
    of onnxruntime-node only (ONNXRUNTIME_NODE_INSTALL=skip: no downloads outside the npm registry)."""
    if shutil.which("node") is None or shutil.which("npm") is None:
        pytest.skip("node and npm are needed for the transformers.js test")
    if not (JS_DIR / "node_modules" / "@huggingface" / "transformers").is_dir():
        env = {**os.environ, "ONNXRUNTIME_NODE_INSTALL": "skip"}
        subprocess.run(["npm", "ci", "--no-audit", "--no-fund"], cwd=JS_DIR, env=env, check=True, timeout=900,
                       capture_output=True)
    return JS_DIR


def run_transformers_js(js_dir: Path, folder: Path, dtype: str, max_new_tokens: int, prompt: dict) -> dict:
    result = subprocess.run(["node", str(js_dir / "generate.mjs"), str(folder), dtype, str(max_new_tokens),
                             json.dumps(prompt)], capture_output=True, text=True, timeout=600, cwd=js_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def stored_with_external_data(source: Path, folder: Path) -> Path:
    """A copy of the session at `source` with its weights in `<file>_data` beside it, as E2B's sessions are
    stored (the tiny ones are small enough to be inline)."""
    import onnx
    stored = folder / source.name
    stored.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(onnx.load(str(source)), str(stored), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=stored.name + "_data", size_threshold=1024)
    return stored
