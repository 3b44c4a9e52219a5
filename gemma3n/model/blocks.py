"""The order of operations of a decoder layer, written once, as data.

A layer class lists its steps as a tuple of `Block`s (text.DecoderLayer.BLOCKS, gemma3.DecoderLayer.BLOCKS): which
block kernel runs, on which named registers, with the weights of which submodule. Two executors read that list:

- `run_eager` (here) runs each block's PyTorch implementation (`EAGER`, which calls the module's own code) in that
  order: this is the layer's forward, the reference that is compared with transformers;
- model/native_decode.py turns the same list, for every layer of a model, into a plan of native block kernels
  (kernels/decode_blocks.c, one C function per kernel name here) that C runs from the first block of the first
  layer to the last block of the last layer in one call per decode step.

So a new layer type, or a change to a layer's order, is written once, in its BLOCKS. A new block kernel needs both
twins: a PyTorch function here and a `g3n_block_<kernel>` in C, which tests/model/test_native_blocks.py compares
block by block (as llama.cpp's test-backend-ops compares backends op by op).

Why a plan run in C rather than a ctypes call per block from Python: a decode step is ~150 blocks (Gemma 3 270M)
to ~400 (E2B), most of them norms and sums over one row of a few thousand floats, for which a Python-side call
costs more than the arithmetic; one call per step keeps that overhead at one per step, as the hand-written step
before it had. Why not a compiler (torch.compile, a generated C file): the plan is data, built once per cache,
with no toolchain at run time beyond the native library that is already built.

Features are data in the modules, not architecture numbers: a norm's offset (Gemma 3's 1 + w), whether values are
normed (Gemma 3n), the attention scale, which layer's K/V a layer reads (KV sharing), the sparse MLP's z, the
AltUp stream count, the optional output scale of the per-layer input.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, NamedTuple

from torch import Tensor, nn

from .layers import scalar_operand


@dataclass(frozen=True)
class Block:
    """One step of a layer: `kernel` reads the registers `inputs` and writes the register `output` (which may be
    one of its inputs), with the weights of the layer's submodule `module` ("" = the layer itself)."""
    kernel: str
    inputs: tuple[str, ...]
    output: str
    module: str = ""
    divisor: float | None = None  # "add": divide the sum by this (Gemma 3n's 1 / sqrt(2) residual mix)


class LayerContext(NamedTuple):
    """What one layer call sees besides its registers."""
    rope: tuple[Tensor, Tensor]  # (cos, signed sin) of RotaryEmbedding.tables, for this layer's attention type
    mask: Tensor  # additive attention mask
    kv_source: Callable[[Tensor], tuple[Tensor, Tensor]]  # normed input -> the (K, V) this layer attends to
    ple: Tensor | None = None  # Gemma 3n: this layer's per-layer input (B, T, P)


def steps(layer: nn.Module, blocks: tuple[Block, ...]) -> list[tuple[nn.Module, Block]]:
    """The blocks with the modules that hold their weights, as the layer holds them now."""
    return [(getattr(layer, block.module) if block.module else layer, block) for block in blocks]


def run_eager(layer: nn.Module, blocks: tuple[Block, ...], ctx: LayerContext | None,
              registers: dict[str, Tensor]) -> dict[str, Tensor]:
    """Run `blocks` in order with their PyTorch implementations; returns the registers. `ctx` may be None for
    blocks that read none of it (a model's FINAL_BLOCKS: norms after the last layer)."""
    for module, block in steps(layer, blocks):
        registers[block.output] = EAGER[block.kernel](module, block, ctx, *[registers[n] for n in block.inputs])
    return registers


def _add(module, block: Block, ctx: LayerContext, first: Tensor, *rest: Tensor) -> Tensor:
    total = first
    for x in rest:
        total = total + x
    return total if block.divisor is None else total / scalar_operand(block.divisor, total.dtype)


# The PyTorch twin of each block kernel: (module, block, context, *input registers) -> output register.
EAGER: dict[str, Callable[..., Tensor]] = {
    "rms_norm": lambda norm, block, ctx, x: norm(x),
    "add": _add,
    "first_stream": lambda layer, block, ctx, streams: streams[0],
    "laurel": lambda laurel, block, ctx, x: laurel(x),
    "attention": lambda attn, block, ctx, x: attn(x, *ctx.rope, ctx.mask, ctx.kv_source(x)),
    "mlp": lambda mlp, block, ctx, x: mlp(x),
    "altup_predict": lambda altup, block, ctx, streams: altup.predict(streams),
    "altup_correct": lambda altup, block, ctx, predictions, out: altup.correct(predictions, out),
    "per_layer_input": lambda layer, block, ctx, streams: layer.add_per_layer_input(streams, ctx.ple),
    "altup_expand": lambda model, block, ctx, x0: model.expand(x0),
    "altup_collapse": lambda model, block, ctx, streams: model.collapse(streams),
}
