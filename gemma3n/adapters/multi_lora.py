"""Several LoRA adapters served beside one base model, each row of a batch with its own (vLLM's multi-LoRA).

`attach_adapters(lm, {"a": DIR, "b": DIR})` wraps every decoder linear that some adapter targets in a
`MultiLoRALinear` holding each adapter's A, B and scaling, and returns the `AdapterSet` they all read. The base
weights stay as loaded (float, int8 / int4, GGUF blocks): nothing is merged. Before a forward, the engine says which
adapter each row uses (`with adapters.selected(["a", None, "b"]): ...`); a wrapper then adds to each row its own
adapter's delta, scaling * B A x, and nothing to rows without one. Outside a selection (or when every row is the
base model) the wrappers are the base layers exactly, and the native decode plan describes their base layers
(`native_stand_in`), so base rows run as fast as without adapters and give the base model's bits.

Each row's delta is computed in float64 and rounded once (lora.lora_delta): its bits do not depend on which other
rows share its forward, and equal those of the same adapter applied beside the base by LoRALinear
(`gemma3n.load(path, adapter=DIR)` over quantised weights, `gemma3n run --adapter`).
"""
from __future__ import annotations

import math
import re
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import Tensor, nn

from ..model.text import rows_product, sparse_inputs_product
from .lora import LoRALinear, decoder_linears, lora_delta, replace_module
from .peft_format import fitting_layers

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@+-]{0,127}")


class AdapterSet:
    """The adapters served beside one base model (by name), and which one each row of the running forward uses."""

    def __init__(self, names, folders=None):
        self.names = tuple(names)
        for name in self.names:
            if not isinstance(name, str) or not _NAME.fullmatch(name):
                raise ValueError(f"adapter name {name!r}: use letters, digits and . _ : @ + - (at most 128 "
                                 f"characters, starting with a letter or digit)")
        if len(set(self.names)) != len(self.names):
            raise ValueError(f"adapter names must differ: {list(self.names)}")
        self.folders = dict(zip(self.names, folders or [None] * len(self.names)))
        self.index = {name: i for i, name in enumerate(self.names)}
        # while a forward runs with adapters: (adapter index, its rows as a LongTensor, or None for every row)
        self.groups: list[tuple[int, Tensor | None]] | None = None

    def __contains__(self, name) -> bool:
        return name in self.index

    def __len__(self) -> int:
        return len(self.names)

    @property
    def active(self) -> bool:
        """Whether some row of the running forward uses an adapter (the native decode plan then stands aside)."""
        return self.groups is not None

    @contextmanager
    def selected(self, rows):
        """Run the forward inside this block with row i using adapter `rows[i]` (a name, or None: the base)."""
        groups: dict[int, list[int]] = {}
        for row, name in enumerate(rows):
            if name is None:
                continue
            if name not in self.index:
                raise KeyError(f"no adapter named {name!r}; these are loaded: {list(self.names)}")
            groups.setdefault(self.index[name], []).append(row)
        before = self.groups
        if groups:
            every = len(groups) == 1 and len(next(iter(groups.values()))) == len(rows)
            self.groups = [(index, None if every else torch.tensor(members)) for index, members in groups.items()]
        else:
            self.groups = None
        try:
            yield
        finally:
            self.groups = before


class MultiLoRALinear(nn.Module):
    """A base linear (of any kind) with the deltas of several adapters, each added only to its own rows."""

    def __init__(self, base_layer: nn.Module, adapters: AdapterSet):
        super().__init__()
        self.base_layer, self.adapters = base_layer, adapters
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self.scalings: dict[int, float] = {}

    def add(self, index: int, a: Tensor, b: Tensor, scaling: float) -> None:
        """Hold adapter `index`'s A [r, in] and B [out, r] (in float64, the precision their product is computed
        in, on the base's device; the values are float32's, as LoRALinear holds them)."""
        device = _device_of(self.base_layer)
        for part, weight in (("A", a), ("B", b)):
            held = weight.detach().to(device, torch.float32).to(torch.float64).contiguous()
            self.register_buffer(f"lora_{part}_{index}", held, persistent=False)
        self.scalings[index] = scaling

    # The native decode plan describes this module's base linear in its place while no adapter is in use.
    @property
    def native_stand_in(self) -> nn.Module:
        return self.base_layer

    @property
    def native_guard(self) -> AdapterSet:
        return self.adapters

    def forward(self, x: Tensor) -> Tensor:
        return self._with_deltas(self.base_layer(x), x)

    def forward_rows(self, x: Tensor, active: Tensor) -> Tensor:
        """The output units `active` only (a sparse MLP's up projection at decode)."""
        return self._with_deltas(rows_product(self.base_layer, x, active), x, active)

    def forward_sparse_inputs(self, full: Tensor, active: Tensor) -> Tensor:
        """A product whose inputs are zero outside `active` (a sparse MLP's down projection at decode)."""
        base = sparse_inputs_product(self.base_layer, full.index_select(-1, active), active, full)
        return self._with_deltas(base, full)

    def _with_deltas(self, out: Tensor, x: Tensor, columns: Tensor | None = None) -> Tensor:
        groups = self.adapters.groups
        if groups is None:
            return out
        for index, rows in groups:
            if index not in self.scalings:  # this adapter leaves this layer as it is
                continue
            part = x if rows is None else x.index_select(0, rows.to(x.device))
            delta = self._delta(index, part)
            if columns is not None:
                delta = delta.index_select(-1, columns)
            delta = delta.to(out.dtype)
            if rows is None:
                out = out + delta
            elif torch.is_grad_enabled():
                out = out.index_add(0, rows.to(out.device), delta)
            else:
                out.index_add_(0, rows.to(out.device), delta)
        return out

    def _delta(self, index: int, x: Tensor) -> Tensor:
        """scaling * B A x for rows x, as LoRALinear computes it (lora.lora_delta: each row's bits the same
        whatever the rows beside it)."""
        a, b = getattr(self, f"lora_A_{index}"), getattr(self, f"lora_B_{index}")
        return lora_delta(x, a, b, self.scalings[index])

    def extra_repr(self) -> str:
        names = [self.adapters.names[i] for i in sorted(self.scalings)]
        return f"adapters={names}"


def _device_of(module: nn.Module) -> torch.device:
    for t in list(module.parameters()) + list(module.buffers()):
        return t.device
    return torch.device("cpu")


def adaptable_linears(lm: nn.Module) -> dict[str, nn.Module]:
    """Path -> module for the decoder linears an adapter may target, including those that already carry a single
    adapter beside quantised weights (a LoRALinear, which then counts as the base)."""
    found = {p: m for p, m in decoder_linears(lm).items() if not p.endswith(".base_layer")}
    found.update({p: m for p, m in lm.named_modules() if isinstance(m, LoRALinear)})
    return found


def attach_adapters(lm: nn.Module, folders: dict[str, str | Path]) -> AdapterSet:
    """Wrap the decoder linears that the adapters target in MultiLoRALinear modules; returns the set they read.
    Every adapter is checked against the model before any module is replaced."""
    if not folders:
        raise ValueError("attach_adapters needs at least one adapter")
    adapters = AdapterSet(list(folders), [str(f) for f in folders.values()])
    linears = adaptable_linears(lm)
    planned: dict[str, list[tuple[int, Tensor, Tensor, float]]] = {}
    for index, (name, folder) in enumerate(folders.items()):
        for _, path, a, b, rank, alpha, rslora in fitting_layers(folder, linears, f"adapter {name!r} ({folder})"):
            scaling = alpha / math.sqrt(rank) if rslora else alpha / rank
            planned.setdefault(path, []).append((index, a, b, scaling))
    for path, deltas in planned.items():
        wrapper = MultiLoRALinear(linears[path], adapters)
        for index, a, b, scaling in deltas:
            wrapper.add(index, a, b, scaling)
        replace_module(lm, path, wrapper.requires_grad_(False))
    return adapters
