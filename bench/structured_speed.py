"""Question: what does a grammar cost per token? Constrained (a JSON schema) vs unconstrained decoding on the real
Gemma 3 270M, in one process, alternating, rows of 1 and of 4 (--rows) in the continuous batch.

Each trial decodes --new-tokens (32) new tokens per row (stop ids ignored, so both modes run the same number of steps; the
schema is an open-ended array, so the grammar is not complete before that either). Reported per mode: decode tokens/s
(wall) and CPU milliseconds per token (process time, both torch threads), medians over the trials, and the time the
grammar itself took (computing the mask, applying it, advancing the matcher) per constrained token.
The machine is shared: wall time depends on the others' load; CPU time and the same-run ratio are the fairer figures.

    PYTHONPATH=. python bench/structured_speed.py --trials 3 --rows 1 4
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

SCHEMA = {"type": "array", "items": {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 16}, "score": {"type": "integer", "minimum": 0, "maximum": 100}},
    "required": ["name", "score"], "additionalProperties": False}}
PROMPTS = ["List the players of a team with their scores as JSON.", "Give me some cities and ratings in JSON.",
           "Write JSON: fruits and how much you like them.", "Scores of a quiz, as a JSON list.",
           "A JSON list of planets with a number each.", "Students and marks, JSON please.",
           "Rate some films as JSON.", "Books and their ranks in JSON."]


class Timed:
    """Wraps a grammar so each row's mask and advance time is summed (the engine's only extra work per token)."""

    def __init__(self, grammar):
        self.grammar, self.seconds, self.tokens = grammar, 0.0, 0

    def start(self):
        outer, state = self, self.grammar.start()

        class Row:
            def logit_bias(self, stop_ids):
                t = time.perf_counter()
                try:
                    return state.logit_bias(stop_ids)
                finally:
                    outer.seconds += time.perf_counter() - t

            def advance(self, token):
                t = time.perf_counter()
                outer.tokens += 1
                try:
                    return state.advance(token)
                finally:
                    outer.seconds += time.perf_counter() - t
        return Row()


def run(model, rows: int, constraint, new_tokens: int) -> dict:
    from gemma3n.engine.batch import ContinuousBatch
    batch = ContinuousBatch(model.decoder)
    params = model.sampling_params(max_new_tokens=new_tokens, temperature=0, constraint=constraint)
    seqs = [batch.add(model.encode_prompt([{"role": "user", "content": PROMPTS[i]}]), params, ())
            for i in range(rows)]
    while batch.prefilling:  # prefill outside the timed part
        batch.step()
    c0, w0 = time.process_time(), time.perf_counter()
    while len(batch):
        batch.step()
    wall, cpu = time.perf_counter() - w0, time.process_time() - c0
    tokens = sum(len(s.new_ids) for s in seqs) - rows  # the first token of each row came with its prefill
    return {"tok_s": tokens / wall, "cpu_ms_per_token": 1000 * cpu / tokens, "tokens": tokens}


def main() -> None:
    import gemma3n
    from gemma3n.cli import default_model_path
    parser = argparse.ArgumentParser()
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--new-tokens", type=int, default=32)
    args = parser.parse_args()
    torch.set_num_threads(2)
    model = gemma3n.load(default_model_path())
    grammar = model.constraint(json_schema=SCHEMA)  # compiled once (and the vocabulary read into llguidance)
    run(model, 1, grammar, 4)  # warm-up
    out = {"torch": torch.__version__, "threads": torch.get_num_threads(), "new_tokens": args.new_tokens}
    for rows in args.rows:
        results = {"unconstrained": [], "json_schema": []}
        timed = Timed(grammar)
        for _ in range(args.trials):  # alternating
            results["unconstrained"].append(run(model, rows, None, args.new_tokens))
            results["json_schema"].append(run(model, rows, timed, args.new_tokens))
        row = {mode: {k: round(statistics.median(r[k] for r in rs), 2) for k in ("tok_s", "cpu_ms_per_token")}
               for mode, rs in results.items()}
        row["grammar_ms_per_token"] = round(1000 * timed.seconds / max(timed.tokens, 1), 3)
        row["ratio_tok_s"] = round(row["json_schema"]["tok_s"] / row["unconstrained"]["tok_s"], 3)
        out[f"rows_{rows}"] = row
        print(json.dumps({f"rows_{rows}": row}), flush=True)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
