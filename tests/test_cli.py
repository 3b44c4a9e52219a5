"""The command line, end to end, in a subprocess (as a person runs it)."""
import json
import subprocess
import sys

from .reference.tiny import build_reference


def gemma3n_cli(*args, stdin=None):
    return subprocess.run([sys.executable, "-m", "gemma3n.cli", *args], capture_output=True, text=True,
                          input=stdin, timeout=600)


def test_run_with_the_embedded_default_model_prints_what_the_api_returns():
    """`gemma3n run` with no --model uses the real Gemma 3 270M; greedy text equals model.generate's."""
    import gemma3n
    from gemma3n.cli import default_model_path
    prompt = "The capital of France is"
    done = gemma3n_cli("run", prompt, "--max-new-tokens", "8", "--json", "--temperature", "0")
    assert done.returncode == 0, done.stderr
    record = json.loads(done.stdout.strip().splitlines()[-1])
    assert record["new_tokens"] >= 1 and record["text"].strip()
    assert record["prompt_tokens"] > 3 and record["finish_reason"] in ("stop", "length")
    expected = gemma3n.load(default_model_path()).generate(prompt, max_new_tokens=8, temperature=0)
    assert record["text"] == expected
    streamed = gemma3n_cli("run", prompt, "--max-new-tokens", "8", "--temperature", "0")
    assert streamed.returncode == 0 and streamed.stdout == expected + "\n"


def test_folder_without_tokenizer_gives_a_clear_error(tmp_path):
    folder = tmp_path / "tiny"
    build_reference("mixed", seed=11).save_pretrained(folder)
    done = gemma3n_cli("run", "hello", "--model", str(folder), "-n", "5")
    assert done.returncode == 2 and "no tokenizer.json" in done.stderr and "Traceback" not in done.stderr


def test_errors_are_one_line_for_people(tmp_path):
    done = gemma3n_cli("run", "hi", "--model", str(tmp_path / "missing"))
    assert done.returncode == 2
    assert done.stderr.startswith("gemma3n: error:") and "Traceback" not in done.stderr
    done = gemma3n_cli("run", "hi", "--model", str(tmp_path), "--temperature", "-1")
    assert done.returncode == 2 and "Traceback" not in done.stderr
