"""Ray, on a local instance of 2 CPUs shared by the module's tests: `gemma3n batch --ray` equals the local job
(and so `generate`, row by row), and `gemma3n serve --ray --replicas 2` answers as the single-process server,
spreads requests over both replicas and survives a killed one. Both through the console script, as a person runs
them, joined to this instance by its address."""
from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest

ray = pytest.importorskip("ray", reason="the Ray tests need the 'ray' extra")
pytest.importorskip("ray.serve")
openai = pytest.importorskip("openai")

from ..console import gemma3n as console  # noqa: E402
from ..server.test_console_serve import ServeProcess  # noqa: E402
from .conftest import LIMIT_FLAGS, MODEL, NEW, answers, b64, png, words  # noqa: E402

KEY = "ray-key-1"


@pytest.fixture(scope="module")
def cluster():
    """A local Ray instance for this module; its GCS address is what `--ray` is given."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


def test_batch_on_ray_equals_the_local_job_and_resumes(cluster, mixed_local, folder, tmp_path):
    rows, source, local, _ = mixed_local
    output = tmp_path / "answers.jsonl"
    run = console("batch", str(source), str(output), "--model", str(folder), *LIMIT_FLAGS, "--ray", cluster,
                  "--replicas", "2", "--threads-per-replica", "1")
    assert run.returncode == 0, run.stderr[-3000:]
    summary = json.loads(run.stdout)
    assert summary["rows"] == summary["answered"] == 40 and summary["errors"] == 1
    assert "40/40 rows" in run.stderr and "rows/s" in run.stderr
    got = answers(output)
    assert got == answers(local)  # which equal generate row by row (test_batch_job)
    assert got[17][1] == 400 and "not a readable image" in got[17][2]
    # Interrupted after 30 rows (the 31st half written): the rerun answers only the last 10.
    lines = output.read_text().splitlines(keepends=True)
    output.write_text("".join(lines[:30]) + lines[30][:25])
    run = console("batch", str(source), str(output), "--model", str(folder), *LIMIT_FLAGS, "--quiet", "--ray",
                  cluster, "--replicas", "1", "--threads-per-replica", "1")
    assert run.returncode == 0, run.stderr[-3000:]
    assert json.loads(run.stdout)["answered"] == 10 and answers(output) == answers(local)


def client(url: str):
    return openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=120)


def chat(c, content, **kw):
    return c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": content}],
                                     max_tokens=NEW, temperature=0, **kw)


@pytest.fixture(scope="class")
def ray_served(cluster, folder):
    running = ServeProcess("--model", str(folder), *LIMIT_FLAGS, "--api-key", KEY, "--ray", cluster,
                           "--replicas", "2", "--threads-per-replica", "1")
    yield running
    running.close()


@pytest.fixture(scope="module")
def single(folder):
    """The single-process server on the same checkpoint, limits and key: the reference."""
    import gemma3n
    from gemma3n.server import ServerSettings

    from ..server.conftest import RunningServer
    from .conftest import batch_settings
    settings = batch_settings()
    running = RunningServer(gemma3n.load(folder), ServerSettings(**{**settings.__dict__, "api_key": KEY}))
    yield running
    running.close()


def replicas_answering(url: str, n: int) -> list[str]:
    """The replica that answered each of n concurrent requests."""
    async def one(c, i):
        r = await c.post(url + "/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"}, json={
            "model": MODEL, "messages": [{"role": "user", "content": words(i)}], "max_tokens": NEW})
        assert r.status_code == 200, r.text
        return r.headers["x-gemma3n-replica"]

    async def run():
        async with httpx.AsyncClient(timeout=120) as c:
            return await asyncio.gather(*[one(c, i) for i in range(n)])
    return asyncio.run(run())


class TestServeOnRay:
    """`gemma3n serve --ray --replicas 2` (its deployment lives while this class runs)."""

    def test_serve_on_ray_answers_as_the_single_process_server(self, ray_served, single):
        ray_client, one = client(ray_served.url), client(single.url)
        image = [{"type": "image_url", "image_url": {"url": "data:image/png;base64," + b64(png(6))}},
                 {"type": "text", "text": words(2)}]
        for content in (words(0), words(1), image):
            assert chat(ray_client, content).choices[0].message.content == chat(one, content).choices[0].message.content
        streamed = "".join(c.choices[0].delta.content or "" for c in chat(ray_client, words(3), stream=True)
                           if c.choices)
        assert streamed == chat(one, words(3)).choices[0].message.content
        completion = ray_client.completions.create(model=MODEL, prompt=words(4), max_tokens=NEW, temperature=0)
        assert completion.choices[0].text == \
            one.completions.create(model=MODEL, prompt=words(4), max_tokens=NEW, temperature=0).choices[0].text
        # The same refusals: no key, another model, too many tokens.
        assert httpx.get(ray_served.url + "/v1/models", timeout=30).status_code == 401
        for kw in ({"model": "gpt-4o"}, {"max_tokens": 999}):
            body = {"model": MODEL, "messages": [{"role": "user", "content": "w1"}], **kw}
            got, want = (httpx.post(s.url + "/v1/chat/completions", json=body, timeout=60,
                                    headers={"Authorization": f"Bearer {KEY}"}) for s in (ray_served, single))
            assert (got.status_code, got.json()) == (want.status_code, want.json())


    def test_requests_reach_both_replicas_and_a_killed_one_is_replaced(self, ray_served):
        before = set(replicas_answering(ray_served.url, 12))
        assert len(before) == 2, before
        victim = sorted(before)[0]
        ray.kill(ray.get_actor(f"SERVE_REPLICA::gemma3n#gemma3n#{victim}", namespace="serve"), no_restart=True)
        seen, deadline = set(), time.time() + 240
        while time.time() < deadline:  # every request succeeds meanwhile; Serve starts a replacement
            seen |= set(replicas_answering(ray_served.url, 4))
            if len(seen - before) >= 1 and victim not in seen:
                break
            time.sleep(1)
        assert victim not in seen and seen - before, f"no replacement replica answered: {seen} (before: {before})"


def test_autoscaling_bounds_become_serve_options():
    """--min-replicas / --max-replicas: Serve's autoscaling between them, starting within them; bad bounds are
    refused before anything is deployed."""
    from gemma3n.scale.engine import EngineSpec
    from gemma3n.scale.ray_serve import LeastLoadedRouter, deployment_options
    from gemma3n.server import ServerSettings
    spec = EngineSpec(model="m", settings=ServerSettings(max_batch=8, max_queue=20), threads=3)
    fixed = deployment_options(spec, replicas=2)
    assert fixed["num_replicas"] == 2 and "autoscaling_config" not in fixed
    assert fixed["ray_actor_options"] == {"num_cpus": 3} and fixed["max_ongoing_requests"] == 28
    router = fixed["request_router_config"].request_router_class  # Serve keeps the import path
    assert router == f"{LeastLoadedRouter.__module__}.{LeastLoadedRouter.__name__}"
    scaled = deployment_options(spec, replicas=1, min_replicas=1, max_replicas=4)
    assert "num_replicas" not in scaled and scaled["autoscaling_config"] == {
        "min_replicas": 1, "max_replicas": 4, "initial_replicas": 1, "target_ongoing_requests": 4}
    with pytest.raises(ValueError, match="--min-replicas <= --max-replicas"):
        deployment_options(spec, replicas=1, min_replicas=5, max_replicas=2)


@pytest.mark.slow
def test_serve_with_autoscaling_bounds_starts_at_the_minimum(cluster, folder):
    """The README's `serve --ray --min-replicas 1 --max-replicas 2`: one replica to begin with, answering."""
    from ray import serve
    running = ServeProcess("--model", str(folder), *LIMIT_FLAGS, "--ray", cluster, "--min-replicas", "1",
                           "--max-replicas", "2", "--threads-per-replica", "1")
    try:
        reply = openai.OpenAI(base_url=running.url + "/v1", api_key="none", max_retries=0, timeout=120)
        assert chat(reply, words(7)).choices[0].finish_reason in ("stop", "length")
        deployment = serve.status().applications["gemma3n"].deployments["gemma3n"]
        assert deployment.replica_states.get("RUNNING") == 1, deployment
    finally:
        running.close()


@pytest.mark.slow
def test_a_folder_of_images_on_ray_equals_the_local_job(cluster, folder, tmp_path):
    """`batch FOLDER OUT --prompt TEXT --ray`: Ray Data reads the files; names and answers as without Ray."""
    photos = tmp_path / "photos"
    (photos / "sub").mkdir(parents=True)
    for name, seed in (("b.png", 7), ("sub/a.png", 8)):
        (photos / name).write_bytes(png(seed))
    (photos / "broken.png").write_bytes(b"not a picture")
    outputs = []
    for extra in ([], ["--ray", cluster, "--replicas", "1", "--threads-per-replica", "1"]):
        outputs.append(tmp_path / f"captions{len(outputs)}.jsonl")
        run = console("batch", str(photos), str(outputs[-1]), "--model", str(folder), "--prompt", "w40 w41",
                      "--quiet", *LIMIT_FLAGS, *extra)
        assert run.returncode == 0, run.stderr[-3000:]
    local, on_ray = ([json.loads(line) for line in o.read_text().splitlines()] for o in outputs)
    assert [r["file"] for r in on_ray] == ["b.png", "broken.png", "sub/a.png"]
    assert on_ray == local and on_ray[0]["text"] and on_ray[1]["status_code"] == 400
