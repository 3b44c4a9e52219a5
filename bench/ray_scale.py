"""Question: how many rows a second does `gemma3n batch` answer locally and on Ray (1 and 2 replicas), and how
much time does Ray Serve add to each request?

On the real Gemma 3 270M (Q4_K_M GGUF, the embedded default model), through the console script as a user runs it:
- batch: N text completions (`/v1/completions`, greedy, --tokens new tokens each, distinct prompts) answered by
  `gemma3n batch` locally, then `--ray ADDRESS --replicas 1 --threads-per-replica C` and `--replicas 2
  --threads-per-replica C/2` on a local Ray instance of C CPUs (this machine's cores). Rows/s counts the whole
  job after the command starts it, model loading included (each Ray actor loads its own copy), as a user sees it;
  the runs are alternated over --trials rounds and the median is reported.
- per-request overhead: a 1-token completion sent --requests times, one at a time, to `gemma3n serve` and to
  `gemma3n serve --ray --replicas 1` (the same model, limits and threads): the difference of the median latencies
  is what Ray Serve's proxy and router add.

Run: python bench/ray_scale.py [--rows 96] [--tokens 16] [--trials 2] [--requests 40]
The last line printed is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
SCRIPT = str(Path(sys.executable).parent / "gemma3n")
MODEL = "gemma-3-270m-q4_k_m"


def env() -> dict:
    """The environment of each command, taken after ray.init (which sets RAY_AUTH_MODE for its clients)."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}


def rows(n: int, tokens: int) -> str:
    topics = ["the sea", "a mountain", "bread", "rain", "a city", "music", "a river", "the moon", "a clock", "snow"]
    return "".join(json.dumps({"custom_id": f"r{i}", "method": "POST", "url": "/v1/completions", "body": {
        "model": MODEL, "prompt": f"Question {i}: write one sentence about {topics[i % len(topics)]} and the "
                                  f"number {i}.\nAnswer:", "max_tokens": tokens, "temperature": 0}}) + "\n"
        for i in range(n))


def batch(source: Path, extra: list[str]) -> dict:
    out = source.with_suffix(f".{time.monotonic_ns()}.out")
    run = subprocess.run([SCRIPT, "batch", str(source), str(out), "--quiet", "--overwrite", *extra],
                         capture_output=True, text=True, env=env(), timeout=3600)
    if run.returncode != 0:
        raise RuntimeError(run.stderr[-2000:])
    summary = json.loads(run.stdout)
    assert summary["errors"] == 0, summary
    return summary


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def latencies(extra: list[str], requests: int, model: str = MODEL) -> list[float]:
    port = free_port()
    server = subprocess.Popen([SCRIPT, "serve", "--port", str(port), *extra], env=env(),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 600
        while True:
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.time() > deadline or server.poll() is not None:
                raise RuntimeError("the server did not start")
            time.sleep(0.5)
        body = {"model": model, "prompt": "Hello", "max_tokens": 1, "temperature": 0}
        with httpx.Client(timeout=120) as client:
            for _ in range(5):  # warm-up: first requests build caches and connections
                client.post(url + "/v1/completions", json=body)
            times = []
            for _ in range(requests):
                t = time.perf_counter()
                r = client.post(url + "/v1/completions", json=body)
                times.append(time.perf_counter() - t)
                assert r.status_code == 200, r.text
        return times
    finally:
        server.terminate()
        server.wait(timeout=60)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=96)
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--trials", type=int, default=2)
    parser.add_argument("--requests", type=int, default=40)
    parser.add_argument("--latency-model", metavar="PATH",
                        help="measure the overhead on this checkpoint instead (a tiny one: the model's own time "
                             "then hides less of Ray's)")
    parser.add_argument("--skip-batch", action="store_true", help="only the per-request overhead")
    args = parser.parse_args()
    import ray
    import torch
    cpus = os.cpu_count() or 1
    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
    address = ray.get_runtime_context().gcs_address
    runs = {"local": [], "ray_1_replica": ["--ray", address, "--replicas", "1", "--threads-per-replica", str(cpus)],
            "ray_2_replicas": ["--ray", address, "--replicas", "2", "--threads-per-replica",
                               str(max(1, cpus // 2))]}
    results: dict = {name: [] for name in runs}
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "rows.jsonl"
        source.write_text(rows(args.rows, args.tokens))
        for trial in range(0 if args.skip_batch else args.trials):
            for name, extra in runs.items():
                summary = batch(source, extra)
                results[name].append(summary["rows_per_second"])
                print(f"trial {trial + 1} {name}: {summary['rows_per_second']} rows/s "
                      f"({summary['seconds']} s)", file=sys.stderr, flush=True)
    served = ["--model", args.latency_model, "--served-model-name", "m"] if args.latency_model else []
    name = "m" if args.latency_model else MODEL
    single = latencies(served, args.requests, name)
    on_ray = latencies([*served, "--ray", address, "--replicas", "1", "--threads-per-replica", str(cpus)],
                       args.requests, name)
    ray.shutdown()
    report = {"question": "batch rows/s locally and on Ray; Ray Serve's per-request overhead",
              "machine": f"{platform.processor() or platform.machine()}, {cpus} cores", "torch": torch.__version__,
              "ray": ray.__version__, "model": "Gemma 3 270M Q4_K_M GGUF", "rows": args.rows,
              "new_tokens": args.tokens, "trials": args.trials,
              "latency_model": args.latency_model or "Gemma 3 270M Q4_K_M GGUF",
              "rows_per_second": {k: statistics.median(v) for k, v in results.items() if v},
              "rows_per_second_trials": results,
              "latency_ms_single_process": round(1000 * statistics.median(single), 1),
              "latency_ms_ray_serve": round(1000 * statistics.median(on_ray), 1),
              "ray_overhead_ms": round(1000 * (statistics.median(on_ray) - statistics.median(single)), 1)}
    print(json.dumps(report))


if __name__ == "__main__":
    main()
