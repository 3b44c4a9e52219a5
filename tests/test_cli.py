"""The command line, end to end, through the installed `gemma3n` console script (as a person runs it)."""
import json

import pytest

from .console import gemma3n
from .reference.tiny import build_reference


@pytest.fixture(scope="module")
def expected_default():
    """What the Python API answers on the embedded default model (the real Gemma 3 270M)."""
    import gemma3n as api
    from gemma3n.cli import default_model_path
    model = api.load(default_model_path())
    return lambda prompt, n: model.generate(prompt, max_new_tokens=n, temperature=0)


def test_run_with_the_embedded_default_model_prints_what_the_api_returns(expected_default):
    """`gemma3n run` with no --model uses the real Gemma 3 270M; greedy text equals model.generate's."""
    prompt = "The capital of France is"
    done = gemma3n("run", prompt, "--max-new-tokens", "8", "--json", "--temperature", "0")
    assert done.returncode == 0, done.stderr
    record = json.loads(done.stdout.strip().splitlines()[-1])
    assert record["new_tokens"] >= 1 and record["text"].strip()
    assert record["prompt_tokens"] > 3 and record["finish_reason"] in ("stop", "length")
    assert record["text"] == expected_default(prompt, 8)
    streamed = gemma3n("run", prompt, "--max-new-tokens", "8", "--temperature", "0")
    assert streamed.returncode == 0 and streamed.stdout == record["text"] + "\n"
    # Not a terminal, yet the loading and speed lines are there, on stderr only.
    assert "gemma3n: loading" in streamed.stderr and "new tokens" in streamed.stderr
    quiet = gemma3n("run", prompt, "-n", "2", "--temperature", "0", "--quiet")
    assert quiet.returncode == 0 and quiet.stderr == ""


def test_prompt_from_stdin_and_invalid_utf8_is_refused_with_its_offset():
    ok = gemma3n("run", "-", "-n", "2", "--temperature", "0", "--quiet", stdin=b"Hello there", text=False)
    assert ok.returncode == 0, ok.stderr
    for args, stdin in ((("run", "-"), b"abc\xff"), (("run", b"abc\xff".decode("utf-8", "surrogateescape")), None)):
        done = gemma3n(*args, "-n", "2", stdin=stdin, text=False)
        err = done.stderr.decode()
        assert done.returncode == 2 and "Traceback" not in err, err
        assert "not valid UTF-8 (byte 0xff at offset 3)" in err.splitlines()[-1]


def test_chat_answers_on_stdout_and_talks_on_stderr(expected_default):
    """Piped chat: stdout holds the answers only; the '> ' marker and the base-model note go to stderr."""
    done = gemma3n("chat", "-n", "6", "--temperature", "0", stdin="Hello\n/reset\nHi\n")
    assert done.returncode == 0, done.stderr
    first = expected_default([{"role": "user", "content": "Hello"}], 6)
    second = expected_default([{"role": "user", "content": "Hi"}], 6)  # /reset forgot the first turn
    assert done.stdout == first + "\n" + second + "\n"
    assert done.stderr.count("> ") >= 3 and "no chat template" in done.stderr


@pytest.mark.parametrize("flag, value, words", [
    ("--top-p", "2", "argument --top-p: must be in [0.0, 1.0], got 2"),
    ("--temperature", "-1", "argument --temperature/-t: must be >= 0.0, got -1"),
    ("--max-new-tokens", "0", "argument --max-new-tokens/-n: must be >= 1, got 0"),
    ("--seed", "x", "argument --seed: 'x' is not an integer"),
])
def test_bad_flags_fail_before_loading_and_name_the_flag(tmp_path, flag, value, words):
    # The model path does not exist: had it been loaded first, the error would be about the path.
    done = gemma3n("run", "hi", "--model", str(tmp_path / "missing"), flag, value, timeout=60)
    assert done.returncode == 2 and words in done.stderr and "Traceback" not in done.stderr
    assert "loading" not in done.stderr


def test_folder_without_tokenizer_gives_a_clear_error(tmp_path):
    folder = tmp_path / "tiny"
    build_reference("mixed", seed=11).save_pretrained(folder)
    done = gemma3n("run", "hello", "--model", str(folder), "-n", "5")
    assert done.returncode == 2 and "no tokenizer.json" in done.stderr and "Traceback" not in done.stderr


def test_errors_are_one_line_for_people(tmp_path):
    done = gemma3n("run", "hi", "--model", str(tmp_path / "missing"))
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.splitlines()[-1].startswith("gemma3n: error:")


def test_quantize_refuses_a_gguf_and_bad_scheme_json_with_the_fix(tmp_path):
    from gemma3n.cli import default_model_path
    out = tmp_path / "out"
    done = gemma3n("quantize", str(default_model_path()), str(out), timeout=120)
    assert done.returncode == 2 and "is a GGUF file" in done.stderr and "--quantize int4" in done.stderr
    assert not out.exists()
    folder = tmp_path / "tiny"
    build_reference("mixed", seed=11).save_pretrained(folder)
    done = gemma3n("quantize", str(folder), str(out), "--scheme", "{decoder: int4}", timeout=120)
    assert done.returncode == 2 and "--scheme is not valid JSON" in done.stderr and not out.exists()
    done = gemma3n("quantize", str(tmp_path / "nothing"), str(out), timeout=120)
    assert done.returncode == 2 and "does not exist" in done.stderr and not out.exists()


def test_quantize_writes_a_checkpoint_that_runs(tmp_path):
    from .server.conftest import write_tokenizer
    folder, out = tmp_path / "tiny", tmp_path / "int8"
    build_reference("mixed", seed=11).save_pretrained(folder)
    write_tokenizer(folder)
    done = gemma3n("quantize", str(folder), str(out), "--scheme", "int8", timeout=300)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["modules"] > 0 and (out / "config.json").exists()
    assert [p.name for p in tmp_path.iterdir() if "partial" in p.name] == []
    done = gemma3n("run", "--model", str(out), "hello", "-n", "3", "--temperature", "0", "--json", timeout=300)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.splitlines()[-1])["new_tokens"] == 3
