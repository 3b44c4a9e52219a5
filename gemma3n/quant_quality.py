"""Quality guard: how far a quantised model's next-token distributions are from the float model's.

`compare(reference, quantised, ids)` gives the top-1 agreement and the mean KL(reference || quantised) over every
position of a teacher-forced text; `guard_scheme` measures a scheme on a checkpoint and warns or refuses.

Thresholds, from measurements on the real Gemma 3 270M (its Q4_K_M GGUF dequantised to bf16 is the reference;
300 tokens of SAMPLE_TEXT; tests/quant/test_quality.py):
  bf16 vs float32            top-1 97.7%  mean KL 0.0008   (the float noise floor)
  int8 everywhere            top-1 93.3%  mean KL 0.008
  int4 group 64 (+int8 emb.) top-1 73.7%  mean KL 0.30
  int4 group 32 (+int8 emb.) top-1 78.3%  mean KL 0.19
  int8 decoder, int4 emb.    top-1 79.7%  mean KL 0.11   (the 640-wide 270M is dominated by its tied head)
  int4 decoder + int4 emb.   top-1 63.7%  mean KL 0.43   (group 64; group 128: 61.3%, 0.63)
This small model is sensitive, and its weights were already 4-5-bit (Q4_K / Q5_0), so int4 re-quantises them.
We warn below 90% agreement or above KL 0.05 (int8 passes with margin; int4 here warns: its degradation is real
and the user should know), and refuse below 60% or above KL 1.0: far outside every working scheme measured, the
mark of a broken scheme or a model that cannot take it.
"""
from __future__ import annotations

import warnings

import torch

from .api import load

WARN_TOP1, WARN_KL = 0.90, 0.05
REFUSE_TOP1, REFUSE_KL = 0.60, 1.0

# Varied text for the comparison: prose, dialogue, code, numbers, a list and two other languages.
SAMPLE_TEXT = """The river had been low all summer, and by August the old mill wheel stood still above a bed of cracked
mud. Farmers argued at the market about whether the rain would come before the harvest.
"Do you think we should sell the north field?" she asked. "Not until we know what the bank will offer," he said.
def fibonacci(n):
    a, b = 0, 1
    for _ in range(n):
        a, b = b, a + b
    return a
print([fibonacci(i) for i in range(10)])  # [0, 1, 1, 2, 3, 5, 8, 13, 21, 34]
In 2023 the company reported revenue of 4.7 billion dollars, up 12% from 4.2 billion the year before, while
operating costs rose by only 3%. Shopping list: eggs, flour, two lemons, olive oil, fresh basil.
La ville de Lyon est située au confluent du Rhône et de la Saône. Die Katze schläft auf dem warmen Fensterbrett.
Photosynthesis converts light energy into chemical energy: carbon dioxide and water become glucose and oxygen.
SELECT name, COUNT(*) FROM orders WHERE status = 'shipped' GROUP BY name ORDER BY 2 DESC LIMIT 5;
"""


@torch.inference_mode()
def compare(reference, quantised, ids: torch.Tensor) -> dict[str, float]:
    """Top-1 agreement and mean KL(reference || quantised) of next-token distributions at every position."""
    p = torch.log_softmax(reference.logits(ids).float(), dim=-1)
    q = torch.log_softmax(quantised.logits(ids).float(), dim=-1)
    kl = (p.exp() * (p - q)).sum(-1)
    top1 = (p.argmax(-1) == q.argmax(-1)).float().mean()
    return {"top1_agreement": round(float(top1), 4), "mean_kl": round(float(kl.mean()), 5),
            "tokens": int(ids.numel())}


def verdict(scores: dict[str, float], scheme) -> str:
    """"ok", or a warning issued / an error raised with the scores and what to do."""
    top1, kl = scores["top1_agreement"], scores["mean_kl"]
    where = f"quantization scheme {scheme!r}: top-1 agreement {top1:.1%} and mean KL {kl:.3f} against bf16"
    if top1 < REFUSE_TOP1 or kl > REFUSE_KL:
        raise ValueError(f"{where} are too far from the float model (limits {REFUSE_TOP1:.0%}, {REFUSE_KL}); "
                         f"use int8 or a smaller int4 group size")
    if top1 < WARN_TOP1 or kl > WARN_KL:
        warnings.warn(f"{where}: below the usual quality (limits {WARN_TOP1:.0%}, {WARN_KL}); check the outputs",
                      stacklevel=2)
        return "warn"
    return "ok"


def guard_scheme(path, scheme, text: str = SAMPLE_TEXT, max_tokens: int = 300, dtype="bfloat16",
                 reference=None) -> dict:
    """Measure a scheme on a checkpoint against its float (bf16) version, then warn or refuse (see verdict).

    `reference`: the float model already loaded from `path` in `dtype`, to reuse across schemes."""
    reference = reference or load(path, dtype=dtype)
    ids = torch.tensor([reference.tokenizer.encode(text, add_special_tokens=True)[:max_tokens]])
    quantised = load(path, dtype=dtype, quantize=scheme)
    scores = compare(reference, quantised, ids)
    scores["verdict"] = verdict(scores, scheme)
    return scores
