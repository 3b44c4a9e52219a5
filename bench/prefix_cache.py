"""Time to first token of a second chat turn, with and without prefix caching, through real `gemma3n serve`
processes on the real Gemma 3 270M (the embedded default model).

Two servers run side by side: `--prefix-cache-mb 0` (off) and the default (on). Each trial is a new conversation
(a long first user message, varied by trial, so no trial resumes from another's): turn 1 is answered by each server,
then turn 2 (the history, the answer, a new question) is streamed from each, alternating which server goes first.
For turn 2 we record the wall time to the first streamed token, the server process's CPU seconds up to that moment
(read from /proc when the first token arrives), the prompt and cached tokens from `usage`, and whether both servers
answered both turns alike. Prints one JSON line last.

    PYTHONPATH=. python bench/prefix_cache.py --trials 5
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
TOPICS = ["lighthouses", "tide pools", "sailing knots", "harbour cranes", "ship bells", "sea charts", "buoys",
          "fishing nets", "anchors", "ferries"]


def start_server(*flags: str) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])}
    script = Path(sys.executable).parent / "gemma3n"
    process = subprocess.Popen([str(script), "serve", "--port", str(port), "--served-model-name", "m", *flags],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 600
    while time.time() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"gemma3n serve {' '.join(flags)} exited with {process.returncode}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return process, url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError("the server did not start")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def first_turn(trial: int, words: int) -> list[dict]:
    topic = TOPICS[trial % len(TOPICS)]
    text = " ".join(f"Note {i} about {topic}: they matter to sailors in trial {trial}." for i in range(words // 12))
    return [{"role": "system", "content": "You are a helpful assistant who answers briefly."},
            {"role": "user", "content": f"Read my notes, then say in two sentences what {topic} are.\n{text}"}]


def ask(url: str, messages: list, max_tokens: int) -> dict:
    body = {"model": "m", "messages": messages, "max_tokens": max_tokens, "temperature": 0}
    response = httpx.post(url + "/v1/chat/completions", json=body, timeout=600)
    response.raise_for_status()
    return response.json()


def streamed_turn(url: str, pid: int, messages: list, max_tokens: int) -> dict:
    body = {"model": "m", "messages": messages, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    cpu0, t0 = cpu_seconds(pid), time.perf_counter()
    ttft = cpu = None
    text, usage = "", None
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=600) as response:
        for line in response.iter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                usage = chunk["usage"]
            for choice in chunk["choices"]:
                piece = choice["delta"].get("content")
                if piece and ttft is None:
                    ttft, cpu = time.perf_counter() - t0, cpu_seconds(pid) - cpu0
                text += piece or ""
    return {"ttft": ttft, "cpu": cpu, "text": text, "usage": usage}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--words", type=int, default=700, help="about how many words the first message has")
    parser.add_argument("--answer-tokens", type=int, default=48)
    args = parser.parse_args()
    servers = {"off": start_server("--prefix-cache-mb", "0"), "on": start_server()}
    rows = {name: [] for name in servers}
    same = True
    try:
        for trial in range(args.trials):
            history = first_turn(trial, args.words)
            answers = {name: ask(url, history, args.answer_tokens) for name, (_, url) in servers.items()}
            same &= answers["on"]["choices"][0]["message"] == answers["off"]["choices"][0]["message"]
            turn2 = history + [answers["off"]["choices"][0]["message"],
                               {"role": "user", "content": "Now say it again in one short sentence."}]
            order = ["off", "on"] if trial % 2 == 0 else ["on", "off"]
            results = {}
            for name in order:
                process, url = servers[name]
                results[name] = streamed_turn(url, process.pid, turn2, args.answer_tokens)
            same &= results["on"]["text"] == results["off"]["text"]
            for name, r in results.items():
                u = r["usage"]
                rows[name].append({"ttft": r["ttft"], "cpu": r["cpu"], "prompt": u["prompt_tokens"],
                                   "cached": u["prompt_tokens_details"]["cached_tokens"],
                                   "turn1_prompt": answers[name]["usage"]["prompt_tokens"],
                                   "turn1_answer": answers[name]["usage"]["completion_tokens"]})
            print(json.dumps({"trial": trial, **{k: rows[k][-1] for k in rows}}), flush=True)
    finally:
        for process, _ in servers.values():
            process.terminate()
            process.wait(timeout=60)
    summary = {"trials": args.trials, "answers_equal": bool(same), "load_average": os.getloadavg()[0]}
    for name, rs in rows.items():
        summary[name] = {"ttft_median_s": round(statistics.median(r["ttft"] for r in rs), 3),
                         "cpu_to_first_token_median_s": round(statistics.median(r["cpu"] for r in rs), 3),
                         "prompt_tokens_median": statistics.median(r["prompt"] for r in rs),
                         "prefilled_tokens_median": statistics.median(r["prompt"] - r["cached"] for r in rs),
                         "turn1_prompt_plus_answer_median": statistics.median(r["turn1_prompt"] + r["turn1_answer"]
                                                                              for r in rs)}
    summary["speedup_ttft"] = round(summary["off"]["ttft_median_s"] / summary["on"]["ttft_median_s"], 2)
    summary["speedup_cpu"] = round(summary["off"]["cpu_to_first_token_median_s"]
                                   / max(summary["on"]["cpu_to_first_token_median_s"], 1e-9), 2)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
