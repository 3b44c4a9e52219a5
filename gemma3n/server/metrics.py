"""`GET /metrics`: what an operator scrapes (Prometheus text format 0.0.4).

Counters are updated by the scheduler thread when a request ends (or is refused); gauges are read when scraped.
Time to first token is a histogram (the prompt's prefill and the first token), decode speed a counter pair
(tokens, seconds) from which a rate is taken, as Prometheus users expect."""
from __future__ import annotations

import threading
from dataclasses import dataclass, field

TTFT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


@dataclass
class Metrics:
    requests: dict[str, int] = field(default_factory=dict)  # by outcome: stop, length, cancelled, error
    prompt_tokens: int = 0
    generation_tokens: int = 0
    decode_seconds: float = 0.0
    ttft_buckets: list[int] = field(default_factory=lambda: [0] * len(TTFT_BUCKETS))
    ttft_count: int = 0
    ttft_sum: float = 0.0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def finished(self, outcome: str, prompt_tokens: int, new_tokens: int, ttft: float | None,
                 decode_seconds: float) -> None:
        with self.lock:
            self.requests[outcome] = self.requests.get(outcome, 0) + 1
            self.prompt_tokens += prompt_tokens
            self.generation_tokens += new_tokens
            self.decode_seconds += decode_seconds
            if ttft is not None:
                self.ttft_count += 1
                self.ttft_sum += ttft
                for i, bound in enumerate(TTFT_BUCKETS):
                    if ttft <= bound:
                        self.ttft_buckets[i] += 1

    def refused(self) -> None:
        with self.lock:
            self.requests["error"] = self.requests.get("error", 0) + 1

    def render(self, model: str, running: int, waiting: int, batch_steps: int, peak_batch: int,
               prefix=None) -> str:
        """`prefix`: the prefix cache's `PrefixStats`, when there is one."""
        label = f'model="{_escape(model)}"'
        lines: list[str] = []

        def metric(name: str, kind: str, help_text: str, samples: list[tuple[str, float]]) -> None:
            lines.append(f"# HELP gemma3n_{name} {help_text}")
            lines.append(f"# TYPE gemma3n_{name} {kind}")
            lines.extend(f"gemma3n_{name}{suffix} {_number(value)}" for suffix, value in samples)

        with self.lock:
            outcomes = sorted(set(self.requests) | {"stop", "length", "cancelled", "error"})
            metric("requests_total", "counter", "Requests that ended, by outcome (finish reason or error).",
                   [(f'{{{label},outcome="{o}"}}', self.requests.get(o, 0)) for o in outcomes])
            metric("prompt_tokens_total", "counter", "Prompt tokens prefilled.", [(f"{{{label}}}", self.prompt_tokens)])
            metric("generation_tokens_total", "counter", "Tokens generated.",
                   [(f"{{{label}}}", self.generation_tokens)])
            metric("decode_seconds_total", "counter", "Seconds requests spent decoding after their first token.",
                   [(f"{{{label}}}", self.decode_seconds)])
            cumulative = [(f'_bucket{{{label},le="{_number(b)}"}}', n) for b, n in zip(TTFT_BUCKETS, self.ttft_buckets)]
            metric("time_to_first_token_seconds", "histogram", "Prefill and first token, per request.",
                   cumulative + [(f'_bucket{{{label},le="+Inf"}}', self.ttft_count),
                                 (f"_sum{{{label}}}", self.ttft_sum), (f"_count{{{label}}}", self.ttft_count)])
        metric("requests_running", "gauge", "Requests being prefilled or decoded.", [(f"{{{label}}}", running)])
        metric("requests_waiting", "gauge", "Requests queued for a place in the batch.", [(f"{{{label}}}", waiting)])
        metric("batch_steps_total", "counter", "Steps of the continuous batch.", [(f"{{{label}}}", batch_steps)])
        metric("batch_size_peak", "gauge", "Most sequences decoded in one step.", [(f"{{{label}}}", peak_batch)])
        if prefix is not None:
            one = f"{{{label}}}"
            metric("prefix_cache_queries_total", "counter", "Prompt tokens looked up in the prefix cache.",
                   [(one, prefix.query_tokens)])
            metric("prefix_cache_hits_total", "counter",
                   "Prompt tokens resumed from the prefix cache instead of prefilled (hit rate: hits / queries).",
                   [(one, prefix.hit_tokens)])
            metric("prefix_cache_requests_total", "counter", "Prompts looked up in the prefix cache, by result.",
                   [(f'{{{label},result="hit"}}', prefix.hits),
                    (f'{{{label},result="miss"}}', prefix.lookups - prefix.hits)])
            metric("prefix_cache_evictions_total", "counter", "Prefix cache entries evicted for room.",
                   [(one, prefix.evictions)])
            metric("prefix_cache_entries", "gauge", "Prefix cache entries held.", [(one, prefix.entries)])
            metric("prefix_cache_bytes", "gauge", "Bytes of K/V the prefix cache holds.", [(one, prefix.bytes)])
        return "\n".join(lines) + "\n"


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def _escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
