"""`gemma3n batch` without Ray: each row is answered as the server answers the same body, in input order, and a
rerun resumes after the finished rows."""
from __future__ import annotations

import json
import pytest

from gemma3n.scale.batch_job import BatchInput
from gemma3n.scale.job import run_batch

from ..console import gemma3n as console
from .conftest import LIMIT_FLAGS, MODEL, NEW, answers, batch_spec as spec, expected_text, mixed_rows, png, wav, \
    write_jsonl


@pytest.fixture(scope="module")
def mixed(mixed_local):
    rows, _, output, summary = mixed_local
    return rows, output, summary


def test_rows_equal_generate_row_by_row_in_input_order(mixed, direct):
    rows, output, summary = mixed
    got = answers(output)
    assert [g[0] for g in got] == [r["custom_id"] for r in rows]
    assert summary["rows"] == summary["answered"] == 40 and summary["errors"] == 1
    for row, (custom_id, status, text) in zip(rows, got):
        if custom_id == "row-17":  # the truncated PNG carries the server's error
            assert status == 400 and "messages[0].content[0]: the data is not a readable image" in text
            continue
        assert status == 200, (custom_id, text)
        assert text == expected_text(direct, row), custom_id
    texts = {t for _, s, t in got if s == 200}
    assert len(texts) > 20  # distinct answers, so a mix-up of rows would show


def test_output_lines_are_openai_batch_objects(mixed):
    _, output, _ = mixed
    first, broken = (json.loads(line) for i, line in enumerate(output.read_text().splitlines()) if i in (0, 17))
    assert set(first) == {"id", "custom_id", "response", "error"} and first["error"] is None
    assert first["response"]["status_code"] == 200 and first["response"]["body"]["object"] == "chat.completion"
    assert first["response"]["body"]["model"] == MODEL and first["response"]["body"]["usage"]["completion_tokens"]
    assert broken["error"] is None and broken["response"]["body"]["error"]["type"] == "invalid_request_error"


def test_malformed_lines_get_errors_and_the_job_goes_on(tmp_path, folder):
    good = {"custom_id": "ok", "method": "POST", "url": "/v1/completions",
            "body": {"model": MODEL, "prompt": "w11 w12", "max_tokens": 3}}
    lines = ["{not json", json.dumps({**good, "custom_id": "url", "url": "/v1/embeddings"}), json.dumps(good),
             "", json.dumps({**good, "custom_id": "other-model", "body": {**good["body"], "model": "gpt-4o"}}),
             json.dumps({**good, "custom_id": "stream", "body": {**good["body"], "stream": True}}),
             json.dumps({**good, "custom_id": "too-long", "body": {**good["body"], "max_tokens": 999}}),
             json.dumps(good)]
    source = write_jsonl(tmp_path / "in.jsonl", lines)
    run_batch(BatchInput(source), tmp_path / "out.jsonl", spec(folder), progress=False)
    got = answers(tmp_path / "out.jsonl")
    assert [(c, s) for c, s, _ in got] == [(None, 400), ("url", 400), ("ok", 200), ("other-model", 404),
                                            ("stream", 400), ("too-long", 400), ("ok", 400)]
    assert "not valid JSON" in got[0][2] and "/v1/embeddings" in got[1][2]
    assert "does not exist" in got[3][2] and "stream" in got[4][2]
    assert "at most 6" in got[5][2]  # the server's own --max-tokens refusal
    assert "repeats an earlier row" in got[6][2]


def test_a_rerun_resumes_after_the_finished_rows(mixed, tmp_path, folder):
    """The README's `gemma3n batch requests.jsonl answers.jsonl --model M`, interrupted and run again."""
    rows, full, _ = mixed
    source = write_jsonl(tmp_path / "requests.jsonl", rows)
    lines = full.read_text().splitlines(keepends=True)
    partial = tmp_path / "answers.jsonl"
    partial.write_text("".join(lines[:25]) + lines[25][:40])  # interrupted while writing row 26
    run = console("batch", str(source), str(partial), "--model", str(folder), *LIMIT_FLAGS)
    assert run.returncode == 0, run.stderr
    summary = json.loads(run.stdout)
    assert summary["finished_before"] == 25 and summary["answered"] == 15 and "40/40 rows" in run.stderr
    assert partial.read_text().splitlines()[:25] == [line.rstrip("\n") for line in lines[:25]]
    assert answers(partial) == answers(full)
    again = run_batch(BatchInput(source), partial, spec(folder), progress=False)  # all done: nothing to do
    assert again["answered"] == 0 and answers(partial) == answers(full)
    other = write_jsonl(tmp_path / "other.jsonl", rows[::-1])
    with pytest.raises(ValueError, match="another job's results"):
        run_batch(BatchInput(other), partial, spec(folder), progress=False)


def test_folders_of_images_and_audio_through_the_console_script(tmp_path, folder, direct):
    """The README's commands: `gemma3n batch FOLDER OUT --prompt TEXT` and `--transcribe`, file names in order."""
    from gemma3n.server.generation import INSTRUCTIONS
    images, audio = tmp_path / "photos", tmp_path / "recordings"
    (images / "sub").mkdir(parents=True)
    audio.mkdir()
    (images / "b.png").write_bytes(png(3))
    (images / "sub" / "a.png").write_bytes(png(4))
    (images / "broken.jpg").write_bytes(b"not a picture")
    (images / "notes.txt").write_text("not an image: left out")
    (audio / "one.wav").write_bytes(wav(1.0))
    (audio / "two.wav").write_bytes(wav(2.0))
    limits = LIMIT_FLAGS
    run = console("batch", str(images), str(tmp_path / "captions.jsonl"), "--model", str(folder), "--prompt",
                  "w40 w41", *limits)
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["rows"] == 3 and "3/3 rows" in run.stderr and "rows/s" in run.stderr
    got = [json.loads(line) for line in (tmp_path / "captions.jsonl").read_text().splitlines()]
    assert [g["file"] for g in got] == ["b.png", "broken.jpg", "sub/a.png"]
    for g, image in ((got[0], png(3)), (got[2], png(4))):
        want = direct.generate([{"role": "user", "content": [{"type": "image", "image": image},
                                                             {"type": "text", "text": "w40 w41"}]}],
                               max_new_tokens=NEW, temperature=0)
        assert g["status_code"] == 200 and g["text"] == want and g["error"] is None
    assert got[1]["status_code"] == 400 and "not a readable image" in got[1]["error"]["message"]
    run = console("batch", str(audio), str(tmp_path / "transcripts.jsonl"), "--model", str(folder),
                  "--transcribe", "--quiet", *limits)
    assert run.returncode == 0, run.stderr
    got = [json.loads(line) for line in (tmp_path / "transcripts.jsonl").read_text().splitlines()]
    assert [g["file"] for g in got] == ["one.wav", "two.wav"]
    for g, seconds in zip(got, (1.0, 2.0)):
        want = direct.generate([{"role": "user", "content": [{"type": "audio", "audio": wav(seconds)},
                                {"type": "text", "text": INSTRUCTIONS[False].format(language="")}]}],
                               max_new_tokens=NEW, temperature=0)
        assert g["text"] == want


def test_console_batch_refuses_a_file_for_another_model_before_loading(tmp_path, folder):
    source = write_jsonl(tmp_path / "in.jsonl", mixed_rows(2))
    run = console("batch", str(source), str(tmp_path / "out.jsonl"), "--model", str(folder))
    assert run.returncode == 2 and "--served-model-name tiny-mm" in run.stderr
    assert not (tmp_path / "out.jsonl").exists()


def test_nothing_of_ray_is_imported_without_ray_and_its_absence_is_explained(tmp_path):
    """Batch and serve without --ray import no Ray; with --ray and no Ray installed, one line says what to
    install (Ray hidden from a child interpreter)."""
    import subprocess
    import sys

    from ..console import console_env
    code = ("import sys\n"
            "from gemma3n.cli import build_parser\n"
            "import gemma3n.scale.batch_job, gemma3n.scale.engine\n"
            "build_parser().parse_args(['batch', 'a', 'b', '--ray', 'auto'])\n"
            "assert not [m for m in sys.modules if m == 'ray' or m.startswith('ray.')], 'ray was imported'\n"
            "sys.modules['ray'] = None\n"
            "from gemma3n.cli import main\n"
            "sys.exit(main(sys.argv[1:]))\n")
    source = write_jsonl(tmp_path / "in.jsonl", mixed_rows(1))
    for args in (["batch", str(source), str(tmp_path / "out"), "--ray"], ["serve", "--ray", "auto"]):
        run = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                             env=console_env(), timeout=120)
        assert run.returncode == 2 and "pip install 'gemma3n[ray]'" in run.stderr, run.stderr


@pytest.mark.parametrize("args", [["serve", "--replicas", "2"], ["serve", "--max-replicas", "3"],
                                  ["batch", "in.jsonl", "out.jsonl", "--replicas", "3"]])
def test_replica_flags_without_ray_are_refused(args, capsys):
    from gemma3n.cli import main
    assert main(args) == 2
    assert "need --ray" in capsys.readouterr().err
