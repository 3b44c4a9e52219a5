"""Google's published MatFormer configurations of Gemma 3n E4B (the `google/gemma3n-slicing-configs` table that the
MatFormer Lab notebook of the Gemma cookbook reads; the same table is copied in mistral.rs).

Each row: the layers of E4B to skip (original indices) and one FFN width per kept layer, in order, with the
effective parameter count (billions) and the pre-trained model's MMLU accuracy that Google published for it. The
widths are multiples of 2048 (E4B's FFN is 2048 x 8 = 16384 wide, E2B's 2048 x 4 = 8192); below they are written
as one digit (the multiple) per kept layer, in groups of five (E4B's blocks of 4 local + 1 global layers).
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Published:
    name: str  # as in Google's table
    layers_skipped: tuple[int, ...]
    ffn_hidden_dims: tuple[int, ...]
    effective_params_b: float  # "# Effective Params (B)" as published
    mmlu_pt: float  # "MMLU PT accuracy", percent, of the pre-trained checkpoint
    aliases: tuple[str, ...] = ()

    @property
    def layers(self) -> int:
        return len(self.ffn_hidden_dims)

    def spec(self) -> dict:
        return {"layers_skipped": list(self.layers_skipped), "ffn_hidden_dims": list(self.ffn_hidden_dims)}


def _widths(multiples: str) -> tuple[int, ...]:
    return tuple(2048 * int(m) for m in multiples.replace(" ", ""))


_E2B_SKIP = (20, 21, 22, 23, 24)

# name, layers skipped, widths (multiples of 2048), effective params (B), MMLU PT %, short aliases
PUBLISHED: tuple[Published, ...] = tuple(Published(n, s, _widths(w), e, m, a) for n, s, w, e, m, a in (
    ("Main model", (), "88888 88888 88888 88888 88888 88888 88888", 3.98, 62.3, ("E4B",)),
    ("Config for official E2B Model", _E2B_SKIP, "44444 44444 44444 44444 44444 44444", 1.91, 50.9, ("E2B",)),
    ("Config for E1.96B (layer-level)", _E2B_SKIP, "44448 44444 44444 44444 44444 44444", 1.96, 53.4, ("E1.96B",)),
    ("Config for E2.54B (layer-level)", (), "44448 44444 44444 44444 88888 44444 44444", 2.54, 55.4, ("E2.54B",)),
    ("Config for E2.69B (layer-level)", (), "44448 44448 44448 44448 88888 44444 44444", 2.69, 57.7, ("E2.69B",)),
    ("Config for E2.98B (layer-level)", (), "44444 44444 44444 88888 88888 44444 88888", 2.98, 59.5, ()),
    ("Config for E3.18B (layer-level)", (), "44448 44448 88888 88888 88888 44448 44448", 3.18, 61.8, ("E3.18B",)),
    ("Config for E3.39B (layer-level)", (), "44448 44448 88888 88888 88888 88888 44448", 3.39, 63.0, ("E3.39B",)),
    ("Config for E3.59B (layer-level)", (), "44448 88888 88888 88888 88888 88888 44448", 3.59, 63.4, ("E3.59B",)),
    ("Config for E3.79B (layer-level)", (), "44448 88888 88888 88888 88888 88888 88888", 3.79, 63.4, ()),
    ("Config for E2.49B (block-level)", (), "44444 44444 44444 44444 88888 44444 44444", 2.49, 54.5, ("E2.49B",)),
    ("Config for E2.73B (block-level)", (), "44444 44444 44444 88888 88888 44444 44444", 2.73, 57.1, ("E2.73B",)),
    ("Config for E2.98B (block-level)", (), "44444 44444 88888 88888 88888 44444 44444", 2.98, 59.5, ()),
    ("Config for E3.24B (block-level)", (), "44444 44444 88888 88888 88888 88888 44444", 3.24, 60.7, ("E3.24B",)),
    ("Config for E3.49B (block-level)", (), "44444 88888 88888 88888 88888 88888 44444", 3.49, 61.4, ("E3.49B",)),
    # Google's table lists 3.74 B effective parameters for the row it names E3.79B
    ("Config for E3.79B (block-level)", (), "44444 88888 88888 88888 88888 88888 88888", 3.74, 62.0, ()),
))


def _key(text: str) -> str:
    """Names compare without case, spaces, parentheses, dashes, "Config for" and "-level": "E2.98B-block",
    "e2.98b (block-level)" and "Config for E2.98B (block-level)" are one name."""
    t = text.lower().strip()
    t = t.removeprefix("config for ")
    return "".join(c for c in t.replace("-level", "") if c.isalnum() or c == ".")


def find(name: str) -> Published | None:
    """The published configuration with this name or alias (see `_key`), or None."""
    key = _key(name)
    for row in PUBLISHED:
        if key in {_key(row.name), *(_key(a) for a in row.aliases)}:
            return row
    return None


def names() -> list[str]:
    return [row.name for row in PUBLISHED]
