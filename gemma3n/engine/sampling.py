"""Next-token selection: greedy, or sampling with temperature / top-k / top-p / min-p, after a repetition penalty.

The order and semantics are those of transformers' logits processors (`generation/utils.py:_get_logits_processor`):
the repetition penalty applies to every strategy (greedy included) and sees the prompt; temperature, top-k, top-p and
min-p apply only when sampling, in that order. Each filter below mirrors the transformers warper line by line so the
kept token sets are the same, ties included.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import Tensor

NEG_INF = float("-inf")


@dataclass(frozen=True)
class SamplingParams:
    """How to pick each new token. temperature == 0 means greedy; top_k 0, top_p 1 and min_p 0 mean off."""

    max_new_tokens: int = 256
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    # log-probabilities of the model's own distribution (the raw logits, before temperature and the filters):
    # None = not computed; n >= 0 = each new token's, with the n most likely alternatives
    logprobs: int | None = None
    prompt_logprobs: bool = False  # also every prompt token's (after the first), given the tokens before it
    # constrained decoding: a grammar (gemma3n.structured.Grammar) whose start() gives each sequence its own state,
    # with logit_bias(stop_ids) -> float (V,): 0 for the tokens it allows next, -inf for the others, and
    # advance(token) -> True once it is complete
    constraint: Any = None

    def __post_init__(self) -> None:
        # Accept any iterable (a list from JSON, a single string) but store tuples so the params stay hashable.
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)
        object.__setattr__(self, "stop", stop)
        ids = self.stop_token_ids
        object.__setattr__(self, "stop_token_ids", (ids,) if isinstance(ids, int) else tuple(ids))
        _check_int("max_new_tokens", self.max_new_tokens, minimum=1)
        _check_real("temperature", self.temperature, self.temperature >= 0, "must be >= 0 (0 means greedy)")
        _check_int("top_k", self.top_k, minimum=0)
        _check_real("top_p", self.top_p, 0 <= self.top_p <= 1, "must be in [0, 1]")
        _check_real("min_p", self.min_p, 0 <= self.min_p <= 1, "must be in [0, 1]")
        _check_real("repetition_penalty", self.repetition_penalty, self.repetition_penalty > 0, "must be > 0")
        if self.seed is not None:
            _check_int("seed", self.seed, minimum=0)
        if self.logprobs is not None:
            _check_int("logprobs", self.logprobs, minimum=0)
        for s in self.stop:
            if not isinstance(s, str) or not s:
                raise ValueError(f"SamplingParams.stop: every stop string must be a non-empty str, got {s!r}")
        for i in self.stop_token_ids:
            _check_int("stop_token_ids", i, minimum=0)
        if self.constraint is not None and not callable(getattr(self.constraint, "start", None)):
            raise ValueError(f"SamplingParams.constraint must be a grammar with start() (gemma3n.structured), got "
                             f"{type(self.constraint).__name__}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @classmethod
    def from_generation_config(cls, path_or_dict: str | Path | Mapping[str, Any], **overrides) -> "SamplingParams":
        """Read a Hugging Face `generation_config.json` (a file, the folder holding it, or its parsed dict).

        Missing keys take transformers' defaults (do_sample False, top_k 50 when sampling), so a checkpoint samples
        here as it would under `model.generate()`. `eos_token_id` (int or list) becomes `stop_token_ids`;
        `overrides` are SamplingParams fields and win over the file.
        """
        data = _read_generation_config(path_or_dict)
        get = lambda key, default: default if data.get(key) is None else data[key]  # noqa: E731  JSON null = unset
        fields: dict[str, Any] = {}
        if get("do_sample", False):
            fields["temperature"] = float(get("temperature", 1.0))
            fields["top_k"] = int(get("top_k", 50))
            fields["top_p"] = float(get("top_p", 1.0))
            fields["min_p"] = float(get("min_p", 0.0))
        else:
            fields["temperature"] = 0.0  # transformers ignores the warpers when do_sample is false
        fields["repetition_penalty"] = float(get("repetition_penalty", 1.0))
        if data.get("max_new_tokens") is not None:
            fields["max_new_tokens"] = int(data["max_new_tokens"])
        eos = get("eos_token_id", [])
        fields["stop_token_ids"] = tuple(eos) if isinstance(eos, (list, tuple)) else (eos,)
        unknown = set(overrides) - {f for f in cls.__dataclass_fields__}
        if unknown:
            raise ValueError(f"SamplingParams.from_generation_config: unknown field(s) {sorted(unknown)}")
        return replace(cls(), **{**fields, **overrides})


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"SamplingParams.{name} must be an int >= {minimum}, got {value!r}")


def _check_real(name: str, value: Any, ok: bool, rule: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not ok:
        raise ValueError(f"SamplingParams.{name} {rule}, got {value!r}")


def _read_generation_config(path_or_dict: str | Path | Mapping[str, Any]) -> Mapping[str, Any]:
    if isinstance(path_or_dict, Mapping):
        return path_or_dict
    path = Path(path_or_dict)
    if path.is_dir():
        path = path / "generation_config.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"{path}: not found; expected a Hugging Face generation_config.json") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, Mapping):
        raise ValueError(f"{path}: expected a JSON object at the top level")
    return data


# -- the filters (each mirrors one transformers processor) -------------------------------------------------------


def apply_repetition_penalty(scores: Tensor, previous_ids: Tensor, penalty: float) -> Tensor:
    """`RepetitionPenaltyLogitsProcessor`: every token seen in `previous_ids` (B, L) once: x<0 -> x*p, else x/p.

    Ids < 0 (left padding) and ids outside the vocabulary are ignored: they are routed to an extra column that is
    dropped, as transformers does for its `prompt_ignore_length` and out-of-vocabulary ids."""
    vocab = scores.shape[-1]
    ids = previous_ids.to(scores.device, torch.long)
    ids = torch.where((ids < 0) | (ids >= vocab), vocab, ids)
    padded = torch.nn.functional.pad(scores, (0, 1))
    seen = torch.gather(padded, 1, ids)
    seen = torch.where(seen < 0, seen * penalty, seen / penalty)
    return padded.scatter(1, ids, seen)[..., :vocab]


def top_k_candidates(scores: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """`TopKLogitsWarper` as a compact set: (scores, ids) (B, K') of every token >= the k-th best score.

    Ties with the k-th score are kept, as transformers keeps them, so K' >= k; entries a row does not keep are
    -inf. Working on K' columns instead of the whole vocabulary makes top-p's sort and the draw cheap."""
    k = min(k, scores.shape[-1])
    kth = torch.topk(scores, k).values[..., -1:]
    width = max(k, int((scores >= kth).sum(-1).max()))
    values, ids = torch.topk(scores, width)
    return values.masked_fill(values < kth, NEG_INF), ids


def top_p_filter(scores: Tensor, top_p: float) -> Tensor:
    """`TopPLogitsWarper`: drop the least likely tokens whose cumulative probability is <= 1 - top_p (keep >= 1)."""
    sorted_scores, order = torch.sort(scores, descending=False)
    cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
    remove = cumulative <= (1 - top_p)
    remove[..., -1:] = False
    return scores.masked_fill(remove.scatter(1, order, remove), NEG_INF)


def min_p_filter(scores: Tensor, min_p: float) -> Tensor:
    """`MinPLogitsWarper`: drop tokens whose probability is below min_p times the top token's (keep >= 1)."""
    probs = torch.softmax(scores, dim=-1)
    remove = probs < min_p * probs.amax(dim=-1, keepdim=True)
    remove.scatter_(-1, torch.topk(probs, 1, dim=-1).indices, False)
    return scores.masked_fill(remove, NEG_INF)


class Sampler:
    """Picks the next token of each row from float32 logits (B, V); one seeded generator per sampler."""

    def __init__(self, params: SamplingParams):
        self.params = params
        self._generator: torch.Generator | None = None

    def generator(self, device: torch.device) -> torch.Generator:
        """The RNG on the logits' device, created on first use; reseeded only if the device changes."""
        if self._generator is None or self._generator.device != device:
            self._generator = torch.Generator(device=device)
            if self.params.seed is None:
                self._generator.seed()
            else:
                self._generator.manual_seed(self.params.seed)
        return self._generator

    def penalised(self, logits: Tensor, previous_ids: Tensor | None = None) -> Tensor:
        """float32 logits (B, V) after the repetition penalty, the one processor greedy applies too."""
        p = self.params
        scores = logits if logits.dtype == torch.float32 else logits.float()
        if p.repetition_penalty != 1.0 and previous_ids is not None and previous_ids.numel():
            scores = apply_repetition_penalty(scores, previous_ids, p.repetition_penalty)
        return scores

    def candidates(self, logits: Tensor, previous_ids: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(scores, ids) (B, K) after every processor; filtered tokens score -inf. Greedy returns the penalised
        logits over the whole vocabulary (its argmax is the token)."""
        p = self.params
        scores = self.penalised(logits, previous_ids)
        if p.greedy:
            return scores, _all_ids(scores)
        if p.temperature != 1.0:
            scores = scores / p.temperature
        ids = _all_ids(scores)
        if p.top_k > 0:
            scores, ids = top_k_candidates(scores, p.top_k)
        if p.top_p < 1.0:
            scores = top_p_filter(scores, p.top_p)
        if p.min_p > 0.0:
            scores = min_p_filter(scores, p.min_p)
        return scores, ids

    def sample(self, logits: Tensor, previous_ids: Tensor | None = None) -> Tensor:
        """logits (B, V), previous_ids (B, L) (prompt + generated; < 0 = padding) -> next ids (B,) long."""
        if logits.dim() != 2:
            raise ValueError(f"Sampler.sample expects logits of shape (batch, vocab), got {tuple(logits.shape)}")
        if self.params.greedy:  # no candidate ids: a vocabulary-wide arange a step costs more than the argmax
            return greedy(self.penalised(logits, previous_ids))
        scores, ids = self.candidates(logits, previous_ids)
        return ids.gather(1, _draw(scores.softmax(dim=-1), self.generator(scores.device))).squeeze(1)


def greedy(scores: Tensor) -> Tensor:
    """The index of each row's largest score, (B, V) -> (B,) int64: `scores.argmax(-1)`, the first of equal maxima
    and NaN above everything, as both torch and numpy define it. On the CPU numpy's vectorised argmax takes ~20 us
    over a 262k vocabulary where torch's takes ~250 us, about 2% of a small model's decode step."""
    if scores.device.type == "cpu" and scores.dim() == 2 and scores.dtype in (torch.float32, torch.float64) \
            and not scores.requires_grad:
        return torch.from_numpy(scores.numpy().argmax(-1))
    return scores.argmax(dim=-1)


def _draw(probs: Tensor, generator: torch.Generator) -> Tensor:
    """One index per row with probability probs[i] (B, K) -> (B, 1), by inverting the float64 CDF.

    torch.multinomial (and an exponential race) cost ~5 ms over 262k columns on CPU; a float64 cumsum + binary
    search costs ~1 ms and cannot land on a zero-probability (filtered) column: the CDF is flat there, and u is
    kept strictly below the total."""
    cdf = probs.double().cumsum(dim=-1)
    total = cdf[:, -1:]
    u = torch.rand(total.shape, dtype=torch.float64, device=probs.device, generator=generator) * total
    u = torch.minimum(u, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cdf, u, right=True)


def restrict(logits: Tensor, bias: Tensor) -> Tensor:
    """logits (1, V) plus a grammar's bias (0 where a token is allowed, -inf where it is forbidden; as wide as the
    vocabulary or wider): the grammar's step, before every other processor so that top-k / top-p choose among
    allowed tokens. Adding 0 leaves an allowed logit bit-identical."""
    width = logits.shape[-1]
    bias = bias[:width].to(logits.device)
    if bias.shape[0] < width:  # columns past the tokenizer's vocabulary (a padded head): never allowed
        bias = torch.nn.functional.pad(bias, (0, width - bias.shape[0]), value=NEG_INF)
    return logits + bias


def _all_ids(scores: Tensor) -> Tensor:
    return torch.arange(scores.shape[-1], device=scores.device).expand(scores.shape[0], -1)
