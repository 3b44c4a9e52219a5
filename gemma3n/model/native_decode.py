"""A decode step of the whole decoder stack in one native call: the layers' blocks, run as a plan in C.

A decode step of the eager layers is ~1,500 (Gemma 3 270M) to ~4,500 (Gemma 3n E2B) small PyTorch ops, and on a
laptop CPU their dispatch costs as much as the matrix products themselves. For a step of one new token per row,
`NativeDecoder` runs the layers in C instead, from the same description the eager forward runs: each layer class
lists its order of operations once, as blocks (model/blocks.py), and this module turns the blocks of every layer
into a plan of native block kernels (kernels/decode_blocks.c), each the twin of one PyTorch function and tested
against it (tests/model/test_native_blocks.py). The plan is built once per cache and run by one C call per step
(a ctypes call per block would put Python back between ~150 to ~400 blocks a step). The products run on the
weights as stored (the kernels the eager modules call), the rest in float32.

What the plan holds is data read from the modules (norm scales with their offset, attention scale, value norm, KV
slot, sparsity, AltUp streams, output scale), never a model family. Around the layers the plan runs the model's
own INITIAL_BLOCKS and FINAL_BLOCKS (Gemma 3n's AltUp set-up before them, its collapse after; the final norm). The
embeddings, the per-layer inputs and the head stay the eager code, and so do prefill and
everything the plan does not describe (another device, a float16 cache, a module kind or block it does not know):
those run the eager layers, which stay the reference (tests/model/test_native_decode.py compares the two).

Turn it off with GEMMA3N_NATIVE_DECODE=0 or `set_enabled(False)`; it is also off without the native library.
"""
from __future__ import annotations

import ctypes
import os
import weakref

import torch
from torch import Tensor, nn

from .. import kernels
from ..config import SLIDING
from ..quant.gguf_modules import GGUFLinear
from ..quant.modules import Int4Linear, Int8Linear
from .batch_cache import BatchCache
from .blocks import Block, steps
from .cache import KVCache, Step
from .layers import RMSNorm

_enabled = os.environ.get("GEMMA3N_NATIVE_DECODE", "1") != "0"

L_NONE, L_GGUF, L_INT8, L_INT4, L_FLOAT_T = range(5)
_FLOAT_TYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 30}  # GGUF type ids of float rows
_CACHE_TYPES = {torch.float32: 0, torch.bfloat16: 2}  # the scale-type ids decode_blocks.c reads caches with
_c_void_p = ctypes.c_void_p
_MAX_HEAD_DIM = 1024  # decode_blocks.c rotates a head in a buffer of this size


def set_enabled(enabled: bool) -> None:
    """Use (True, the default) or bypass the native decode step for the next caches."""
    global _enabled
    _enabled = bool(enabled)


def enabled() -> bool:
    return _enabled


# what a step's profile (NativeDecoder.profile) adds up: the products by group, attention, the whole native call
PROFILE = ("attention projections", "MLP", "AltUp, LAuReL, per-layer input", "attention over the cache",
           "native call")
_GROUP = {"attention": 0, "mlp": 1}  # products of other blocks: group 2


class _Lin(ctypes.Structure):
    _fields_ = [("kind", ctypes.c_int32), ("type", ctypes.c_int32), ("w", _c_void_p), ("s", _c_void_p),
                ("n", ctypes.c_int64), ("k", ctypes.c_int64), ("g", ctypes.c_int64), ("group", ctypes.c_int32),
                ("rows_w", _c_void_p), ("rows_s", _c_void_p)]


class _Op(ctypes.Structure):  # g3n_op
    _fields_ = [("run", _c_void_p), ("inputs", ctypes.c_int32 * 3), ("out", ctypes.c_int32), ("lin", _Lin * 4),
                ("vec", _c_void_p * 2), ("opt", ctypes.c_int32 * 8), ("val", ctypes.c_float * 2)]


class _Plan(ctypes.Structure):  # g3n_plan
    _fields_ = [("n_ops", ctypes.c_int32), ("n_regs", ctypes.c_int32), ("ops", ctypes.POINTER(_Op)),
                ("width", ctypes.POINTER(ctypes.c_int64))]


class _Step(ctypes.Structure):  # g3n_step
    _fields_ = [("batch", ctypes.c_int64), ("reg", _c_void_p), ("ple", _c_void_p),
                ("cos", _c_void_p * 2), ("sin", _c_void_p * 2), ("mask", _c_void_p * 2),
                ("tk", ctypes.c_int64 * 2), ("cell", _c_void_p * 2),
                ("k", _c_void_p), ("v", _c_void_p), ("cap", _c_void_p),
                ("cache_type", ctypes.c_int32), ("threads", ctypes.c_int32), ("q8", ctypes.c_int32),
                ("vec", ctypes.c_int32), ("prof", _c_void_p)]


class Unsupported(Exception):
    """Something in the model that the native step does not describe; the eager layers run instead."""


class NativeDecoder:
    """The plan of one model's layers (for one cache, made at its first decode step: `for_step`); `bind` points it
    at the cache's tensors, `run` does a step. It is taken from the modules as they are at that step: weights
    changed in place are seen, modules replaced (or hooks added) later in the same cache's life are not, and the
    next cache describes the model afresh.

    `blocks` (default: every block of every layer, in order) may be any list of (module, Block) pairs, as
    `blocks.steps` gives them: the tests run single blocks this way (`execute`)."""

    def __init__(self, text_model: nn.Module, blocks: list[tuple[nn.Module, Block]] | None = None):
        lib = kernels.native()
        if lib is None:
            raise Unsupported(kernels.why_not())
        self.keep: list[Tensor] = []  # every tensor a pointer below refers to stays alive with this object
        # Objects whose `.active` says the plan must not run this step: a module with a `native_stand_in` (the
        # linear the plan describes in its place) changes the product only while its `native_guard` is active
        # (adapters/multi_lora.py: rows with an adapter); then the eager layers run.
        self.guards: dict[int, object] = {}  # id -> guard
        cfg = text_model.config
        self.text_model, self.d, self.n_layers = text_model, cfg.hidden_size, cfg.num_hidden_layers
        self.dtype = text_model.norm.weight.dtype  # the compute dtype: constants are rounded to it, as eager does
        layers = list(text_model.layers)
        self.state = type(layers[0]).STATE  # the register the layers carry: hidden states or AltUp streams
        self.input = self.state  # the register `run` is given
        if blocks is None:  # the layers', with the model's own before and after them (AltUp set-up, final norm)
            first = steps(text_model, getattr(type(text_model), "INITIAL_BLOCKS", ()))
            blocks = first + [pair for layer in layers for pair in steps(layer, type(layer).BLOCKS)]
            blocks += steps(text_model, getattr(type(text_model), "FINAL_BLOCKS", ()))
            self.input = first[0][1].inputs[0] if first else self.state
        self.output = blocks[-1][1].output if blocks else self.state  # the register `run` returns
        self.registers: dict[str, int] = {}
        self.written: dict[int, int] = {}  # register -> floats per row, for those some block writes
        ops = (_Op * len(blocks))()
        for op, (module, block) in zip(ops, blocks):
            self._describe(lib, op, module, block)
        self.ops = ops
        self.width = (ctypes.c_int64 * len(self.registers))(*[self.written.get(i, 0)
                                                              for i in range(len(self.registers))])
        self.plan = _Plan(n_ops=len(blocks), n_regs=len(self.registers), ops=ops, width=self.width)
        self.bound: tuple | None = None
        self.bound_refs: list | None = None  # weak references to the K/V tensors `bound` points at
        self.rope_rows: dict[tuple[str, torch.dtype], RopeRows] = {}
        self.layouts: dict[frozenset, tuple[list[int], list[int], int]] = {}  # given registers -> made ones
        self.profile: Tensor | None = None  # set to torch.zeros(len(PROFILE), dtype=float64) to collect seconds

    def bind(self, cache) -> bool:
        """Point the step at the cache's K/V tensors as they are now (a BatchCache replaces them when rows join or
        leave); False when their dtype, device or layout is not one the native step writes. Checked again only
        when the tensors change: a step costs a few identity comparisons."""
        slots = cache.slot_tensors()
        if self.bound is not None and len(slots) == len(self.bound_refs) \
                and all(k is rk() and v is rv() for (k, v), (rk, rv) in zip(slots, self.bound_refs)):
            return True
        self.bound = self.bound_refs = None
        if any(t.dtype not in _CACHE_TYPES or t.device.type != "cpu" or not t.is_contiguous()
               or t.dtype != slots[0][0].dtype for pair in slots for t in pair):
            return False
        n = len(slots)  # (neither the cache nor its tensors are held: the cache holds this object)
        self.bound = ((_c_void_p * n)(*[k.data_ptr() for k, _ in slots]),
                      (_c_void_p * n)(*[v.data_ptr() for _, v in slots]),
                      (ctypes.c_int64 * n)(*[k.shape[2] for k, _ in slots]), _CACHE_TYPES[slots[0][0].dtype])
        self.bound_refs = [(weakref.ref(k), weakref.ref(v)) for k, v in slots]
        return True

    # -- the plan --------------------------------------------------------------------------------------------------

    def _register(self, name: str) -> int:
        return self.registers.setdefault(name, len(self.registers))

    def _describe(self, lib, op: _Op, module: nn.Module, block: Block) -> None:
        describe = _DESCRIBE.get(block.kernel)
        fn = getattr(lib, f"g3n_block_{block.kernel}", None)
        if describe is None or fn is None or len(block.inputs) > 3:
            raise Unsupported(f"block {block.kernel!r}")
        op.run = ctypes.cast(fn, _c_void_p).value
        inputs = [self._register(name) for name in block.inputs]
        op.inputs[:] = inputs + [-1] * (3 - len(inputs))
        op.out = self._register(block.output)
        self.written[op.out] = describe(self, op, module, block)
        for lin in op.lin:
            lin.group = _GROUP.get(block.kernel, 2)

    def _hold(self, t: Tensor) -> int:
        if t.device.type != "cpu" or not t.is_contiguous():  # the C code reads plain row-major memory
            raise Unsupported(f"a {'non-contiguous ' if t.device.type == 'cpu' else ''}tensor on {t.device}")
        self.keep.append(t)
        return t.data_ptr()

    def _described(self, m: nn.Module) -> nn.Module:
        """The module the plan describes for `m`: m, or the linear a wrapper that may stand aside puts in its place
        (multi-LoRA serving), whose guard is then registered (see `guards`)."""
        stand_in = getattr(m, "native_stand_in", None)
        if stand_in is None:
            return m
        self.guards[id(m.native_guard)] = m.native_guard
        return stand_in

    def _lin(self, m: nn.Module) -> _Lin:
        m = self._described(m)
        if type(m) is nn.Linear and m.bias is None and m.weight.dtype in _FLOAT_TYPES:
            w = m.weight
            n, k = w.shape
            if w.is_contiguous():
                return _Lin(L_GGUF, _FLOAT_TYPES[w.dtype], self._hold(w), None, n, k, 0)
            if w.t().is_contiguous():  # enable_sparse_decode's transposed down projection
                return _Lin(L_FLOAT_T, _FLOAT_TYPES[w.dtype], self._hold(w.t()), None, n, k, 0)
        elif type(m) is GGUFLinear:
            return _Lin(L_GGUF, m.ggml_type, self._hold(m.raw), None, m.raw.shape[0], m.in_features, 0)
        elif type(m) is Int8Linear and m.scales.dtype in kernels.SCALE_TYPES:
            return _Lin(L_INT8, kernels.SCALE_TYPES[m.scales.dtype], self._hold(m.qweight), self._hold(m.scales),
                        m.out_features, m.in_features, 0)
        elif type(m) is Int4Linear and m.scales_and_zeros.dtype in kernels.SCALE_TYPES and m.out_features % 64 == 0:
            return _Lin(L_INT4, kernels.SCALE_TYPES[m.scales_and_zeros.dtype], self._hold(m.qweight),
                        self._hold(m.scales_and_zeros), m.out_features, m.in_features, m.group_size)
        raise Unsupported(f"linear module {m!r}")

    def _norm(self, norm: nn.Module) -> int | None:
        """The scale an RMSNorm multiplies by, in float32: w + offset, added as the eager norm adds it (None: a
        norm without a scale)."""
        if type(norm) is not RMSNorm:
            raise Unsupported(f"norm module {norm!r}")
        if not norm.with_scale:
            return None
        w = norm.weight.float()
        return self._hold((w + torch.tensor(norm.offset, dtype=torch.float32) if norm.offset else w).contiguous())

    def _vector(self, w: Tensor) -> int:
        return self._hold(w.detach().float().contiguous())

    def _model_dtype(self, value: float) -> float:
        """A Python float constant as the eager code holds it: rounded to the compute dtype."""
        return float(torch.tensor(value, dtype=self.dtype))

    # -- a step ----------------------------------------------------------------------------------------------------

    def run(self, x: Tensor, step: Step, cache, ple: Tensor | None = None, reuse_input: bool = False) -> Tensor:
        """x: what the plan's first block reads (the model's INITIAL_BLOCKS' input: Gemma 3n's embeddings (B, 1, D);
        else the layers' state, Gemma 3's hidden (B, 1, D)); ple (B, 1, L, P) -> after every block of the plan, in
        x's dtype, the FINAL_BLOCKS' last output (B, 1, width), or the state in x's shape where the model lists
        none. `step` is this call's `cache.start(...)`, on the cache `for_step` bound. A register given is
        updated in place: x itself only with `reuse_input` (x is the caller's own temporary), else a copy."""
        work = x.to(torch.float32).contiguous()
        if work.data_ptr() == x.data_ptr() and not reuse_input:
            work = work.clone()
        batch = cache.batch
        pool, made, offsets = self.launch({self.input: work}, batch, step, cache, ple, x.dtype)
        if self.output != self.input:  # a register the plan made (a FINAL_BLOCKS output): (B, 1, width)
            i = self.registers[self.output]
            at = offsets[made.index(i)]
            work = pool[batch * at:batch * (at + self.width[i])].view(batch, 1, self.width[i])
        return work if work.dtype == x.dtype else work.to(x.dtype)

    def execute(self, registers: dict[str, Tensor], batch: int, step: Step | None = None, cache=None,
                ple: Tensor | None = None, dtype: torch.dtype | None = None) -> dict[str, Tensor]:
        """Run the plan on `batch` rows. `registers` gives some registers as float32 contiguous tensors (a row
        each, or [S][B][D] streams), updated in place; the others are made here. Returns every register as a
        (B, width) tensor (streams: their memory viewed so). `step` and the bound `cache` are needed by attention
        blocks (their RoPE tables are rounded to `dtype`, default the model's), `ple` (B, 1, L, P) by per-layer
        inputs."""
        pool, made, offsets = self.launch(registers, batch, step, cache, ple, dtype)
        out = {name: t.view(batch, -1) for name, t in registers.items()}
        names = {i: name for name, i in self.registers.items()}
        for i, at in zip(made, offsets):
            out[names[i]] = pool[batch * at:batch * (at + self.width[i])].view(batch, self.width[i])
        return out

    def launch(self, registers: dict[str, Tensor], batch: int, step: Step | None, cache, ple: Tensor | None,
               dtype: torch.dtype | None) -> tuple[Tensor, list[int], list[int]]:
        """`execute`'s native call; returns the pool holding the registers it made, which ones, and their offsets
        (in floats per row). Every per-step cost here is paid on each token, so it makes no view it does not
        need and reads RoPE rows from tables (`RopeRows`)."""
        lib = kernels.native()
        width = self.width
        for name, t in registers.items():
            i = self.registers[name]
            if t.dtype != torch.float32 or not t.is_contiguous() or t.device.type != "cpu" \
                    or self.written.get(i, t.numel() // batch) * batch != t.numel():
                raise ValueError(f"register {name!r}: a contiguous float32 CPU tensor of "
                                 f"{self.written.get(i, '?')} values per row is needed")
            width[i] = t.numel() // batch
        made, offsets, total = self._layout(registers)
        pool = torch.empty(batch * total, dtype=torch.float32)
        pointers = (_c_void_p * len(self.registers))()
        for name, t in registers.items():
            pointers[self.registers[name]] = t.data_ptr()
        base = pool.data_ptr()
        for i, at in zip(made, offsets):
            pointers[i] = base + 4 * batch * at
        s = _Step(batch=batch, reg=ctypes.cast(pointers, _c_void_p), threads=torch.get_num_threads(),
                  q8=int(kernels.activation_precision() == "int8" and kernels.VECTORISED),
                  vec=int(kernels.VECTORISED))
        if self.bound is not None:
            k_ptrs, v_ptrs, caps, s.cache_type = self.bound
            s.k, s.v, s.cap = ctypes.cast(k_ptrs, _c_void_p), ctypes.cast(v_ptrs, _c_void_p), \
                ctypes.cast(caps, _c_void_p)
        if self.profile is not None:
            if self.profile.dtype != torch.float64 or self.profile.numel() < len(PROFILE) \
                    or not self.profile.is_contiguous():
                raise ValueError(f"profile must be torch.zeros({len(PROFILE)}, dtype=torch.float64)")
            s.prof = self.profile.data_ptr()
        keep = [pool, pointers]
        if ple is not None:
            ple = ple.to(torch.float32).contiguous()
            keep.append(ple)
            s.ple = ple.data_ptr()
        if step is not None:
            cells = cache.write_cells()
            positions = step.positions.reshape(-1).tolist()
            for kind, allowed in step.masks.items():  # the attention types the layers have
                i = _kind(kind)
                rows = self._rope_rows(kind, dtype or self.dtype)
                cos, sin = rows.pointers(positions, step.positions, keep)
                mask = allowed.reshape(batch, -1).contiguous()
                cell = (ctypes.c_int64 * batch)(*cells[i])
                keep += [cos, sin, mask, cell]
                s.cos[i], s.sin[i] = ctypes.addressof(cos), ctypes.addressof(sin)
                s.mask[i], s.tk[i], s.cell[i] = mask.data_ptr(), mask.shape[1], ctypes.addressof(cell)
        rc = lib.g3n_run_plan(ctypes.byref(self.plan), ctypes.byref(s))
        if rc:
            raise RuntimeError(f"native decode step failed (code {rc})")
        return pool, made, offsets

    def _layout(self, registers: dict[str, Tensor]) -> tuple[list[int], list[int], int]:
        """The registers a step makes (those not given), their offsets in its pool and its width, per row."""
        given = frozenset(self.registers[name] for name in registers)
        layout = self.layouts.get(given)
        if layout is None:
            made = [i for i in range(len(self.registers)) if i not in given]
            if any(i not in self.written for i in made):
                raise ValueError("every register that no block writes must be given")
            offsets = [sum(self.written[j] for j in made[:k]) for k in range(len(made))]
            layout = self.layouts[given] = (made, offsets, sum(self.written[i] for i in made))
        return layout

    def _rope_rows(self, kind: str, dtype: torch.dtype) -> "RopeRows":
        rows = self.rope_rows.get((kind, dtype))
        if rows is None:
            rows = self.rope_rows[(kind, dtype)] = RopeRows(self.text_model.rope[kind], dtype)
        return rows


class RopeRows:
    """Each step row's RoPE cos and signed sin as `RotaryEmbedding.tables` makes them for its position, read from
    tables made a block of positions at a time: a step that made its own would pay ~14 small PyTorch ops per
    attention kind, on every token.

    A block holds the same bits a step's own tables would: cos and sin are elementwise in ATen, computed in one
    flat pass of vectors of up to 16 floats, two vectors at a time; only a remainder of fewer than 32 values may
    take another code path (the scalar functions, in some builds). Where the head dim is a multiple of 32, a
    step's tables (B x head dim values) and a block (positions x head dim, kept below ATen's parallel grain so that
    no thread boundary makes a remainder) have none, so every value takes the vector path in both. Other head dims
    make each step's tables as the eager forward does (tests/model/test_native_decode.py checks both)."""

    BLOCK_VALUES = 16384  # values per block table: under ATen's grain size (32768), so one thread, one pass

    def __init__(self, rope: nn.Module, dtype: torch.dtype):
        self.rope, self.dtype = rope, dtype
        self.head_dim = 2 * rope.inv_freq.numel()
        self.span = max(1, self.BLOCK_VALUES // self.head_dim) if self.head_dim % 32 == 0 else 0  # positions a block
        self.blocks: dict[int, tuple[Tensor, Tensor]] = {}  # first position // span -> (cos, signed sin)

    def pointers(self, positions: list[int], step_positions: Tensor, keep: list) -> tuple[ctypes.Array,
                                                                                            ctypes.Array]:
        """Per row, the address of its cos and of its signed sin (head dim float32 values each); whatever they
        point into is appended to `keep`, or held by this object until a step no longer reads it."""
        batch, row_bytes = len(positions), 4 * self.head_dim
        if not self.span or min(positions) < 0:
            cos, sin = self.rope.tables(step_positions, self.dtype)
            cos, sin = (t.reshape(batch, -1).float().contiguous() for t in (cos, sin))
            keep += [cos, sin]
            return ((_c_void_p * batch)(*[cos.data_ptr() + b * row_bytes for b in range(batch)]),
                    (_c_void_p * batch)(*[sin.data_ptr() + b * row_bytes for b in range(batch)]))
        needed = {p // self.span for p in positions}
        for block in needed - self.blocks.keys():
            first = block * self.span
            cos, sin = self.rope.tables(torch.arange(first, first + self.span)[None], self.dtype)
            self.blocks[block] = tuple(t.reshape(self.span, -1).float().contiguous() for t in (cos, sin))
        for block in self.blocks.keys() - needed:  # a row's position only grows: a block no row reads is done
            del self.blocks[block]
        at = [(self.blocks[p // self.span], (p % self.span) * row_bytes) for p in positions]
        return ((_c_void_p * batch)(*[cos.data_ptr() + off for (cos, _), off in at]),
                (_c_void_p * batch)(*[sin.data_ptr() + off for (_, sin), off in at]))


# -- what each block kernel reads from its module: fills the op's slots (kernels/decode_blocks.c lists them) and
# returns the width of its output register, in floats per row

def _describe_rms_norm(dec: NativeDecoder, op: _Op, norm: nn.Module, block: Block) -> int:
    op.vec[0], op.val[0] = dec._norm(norm), norm.eps
    return dec.d


def _describe_add(dec: NativeDecoder, op: _Op, module: nn.Module, block: Block) -> int:
    op.val[0] = block.divisor or 0.0
    return dec.d


def _describe_first_stream(dec: NativeDecoder, op: _Op, module: nn.Module, block: Block) -> int:
    return dec.d


def _describe_laurel(dec: NativeDecoder, op: _Op, laurel: nn.Module, block: Block) -> int:
    op.lin[0], op.lin[1] = dec._lin(laurel.linear_left), dec._lin(laurel.linear_right)
    op.vec[0], op.val[0] = dec._norm(laurel.post_laurel_norm), laurel.post_laurel_norm.eps
    return dec.d


def _describe_attention(dec: NativeDecoder, op: _Op, attn: nn.Module, block: Block) -> int:
    if attn.head_dim > _MAX_HEAD_DIM or attn.head_dim % 2:
        raise Unsupported(f"head_dim {attn.head_dim}")
    writes = not attn.shares_kv
    op.lin[0], op.lin[3] = dec._lin(attn.q_proj), dec._lin(attn.o_proj)
    op.vec[0] = dec._norm(attn.q_norm)
    if writes:
        op.lin[1], op.lin[2], op.vec[1] = dec._lin(attn.k_proj), dec._lin(attn.v_proj), dec._norm(attn.k_norm)
    op.opt[:7] = [_kind(attn.kind), attn.kv_slot, int(writes), int(attn.normalises_values), attn.heads,
                  attn.kv_heads, attn.head_dim]
    op.val[0], op.val[1] = attn.scale, attn.q_norm.eps
    return dec.d


def _describe_mlp(dec: NativeDecoder, op: _Op, mlp: nn.Module, block: Block) -> int:
    op.lin[0], op.lin[1], op.lin[2] = dec._lin(mlp.gate_proj), dec._lin(mlp.up_proj), dec._lin(mlp.down_proj)
    sparse = mlp.sparsity > 0
    if op.lin[2].kind == L_FLOAT_T and not (sparse and mlp.sparse_decode):
        raise Unsupported("a transposed down projection outside a sparse MLP")
    if sparse and mlp.sparse_decode and op.lin[1].kind == L_INT4 and op.lin[1].g % 32 == 0:
        # the tiles interleave 64 rows: a row copy lets the step read only the active units' rows (about 5%)
        qrows, srows = dec._described(mlp.up_proj).rows_layout()
        op.lin[1].rows_w, op.lin[1].rows_s = dec._hold(qrows), dec._hold(srows)
    op.opt[0], op.opt[1] = int(sparse), mlp.SPARSE_MAX_TOKENS if sparse and mlp.sparse_decode else 0
    op.val[0] = dec._model_dtype(mlp.z)
    return dec.d


def _describe_altup(dec: NativeDecoder, op: _Op, altup: nn.Module, block: Block) -> int:
    coefs = altup.prediction_coefs if block.kernel == "altup_predict" else altup.correction_coefs
    op.lin[0], op.lin[1] = dec._lin(altup.modality_router), dec._lin(coefs)
    op.vec[0], op.val[0] = dec._norm(altup.router_norm), altup.router_norm.eps
    op.val[1] = dec._model_dtype(altup.router_input_scale)
    return altup.streams * dec.d


def _describe_per_layer_input(dec: NativeDecoder, op: _Op, layer: nn.Module, block: Block) -> int:
    op.lin[0], op.lin[1] = dec._lin(layer.per_layer_input_gate), dec._lin(layer.per_layer_projection)
    op.vec[0] = dec._vector(layer.altup.correct_output_scale) if layer.correct_scale else None
    op.vec[1], op.val[0] = dec._norm(layer.post_per_layer_input_norm), layer.post_per_layer_input_norm.eps
    op.opt[0], op.opt[1] = layer.layer, dec.n_layers
    return layer.altup.streams * dec.d


def _describe_stream_projections(dec: NativeDecoder, op: _Op, projections: nn.ModuleList) -> int:
    """The lins of an AltUp set-up or collapse (one per stream after the first); returns the stream count."""
    if len(projections) > len(op.lin):
        raise Unsupported(f"{len(projections) + 1} AltUp streams")
    for i, proj in enumerate(projections):
        op.lin[i] = dec._lin(proj)
    return len(projections) + 1


def _describe_altup_expand(dec: NativeDecoder, op: _Op, model: nn.Module, block: Block) -> int:
    return _describe_stream_projections(dec, op, model.altup_projections) * dec.d


def _describe_altup_collapse(dec: NativeDecoder, op: _Op, model: nn.Module, block: Block) -> int:
    _describe_stream_projections(dec, op, model.altup_unembed_projections)
    return dec.d


_DESCRIBE = {"rms_norm": _describe_rms_norm, "add": _describe_add, "first_stream": _describe_first_stream,
             "laurel": _describe_laurel, "attention": _describe_attention, "mlp": _describe_mlp,
             "altup_predict": _describe_altup, "altup_correct": _describe_altup,
             "per_layer_input": _describe_per_layer_input, "altup_expand": _describe_altup_expand,
             "altup_collapse": _describe_altup_collapse}


def for_step(text_model: nn.Module, cache: KVCache | None, new_tokens: int,
             inputs_embeds: Tensor | None) -> NativeDecoder | None:
    """The native decoder for this forward call, or None where the eager layers run: no cache (or a cache that is
    neither a KVCache nor the server's BatchCache), more than one new column, a multimodal merge, a batch wider
    than the native kernels take, autograd on, the step disabled, or a model it does not describe. Built once per
    cache (at its first decode step) and kept on it."""
    if not _enabled or type(cache) not in (KVCache, BatchCache) or new_tokens != 1 or inputs_embeds is not None \
            or cache.batch > kernels.MAX_ROWS or torch.is_grad_enabled() or kernels.native() is None:
        return None
    held = getattr(cache, "native_decoder", None)
    if held is None or held[0] is not text_model:
        try:
            decoder = NativeDecoder(text_model)
        except Unsupported:
            decoder = None
        held = cache.native_decoder = (text_model, decoder)
    decoder = held[1]
    if decoder is None or any(guard.active for guard in decoder.guards.values()):
        return None
    return decoder if decoder.bind(cache) else None


def _kind(kind: str) -> int:
    return 0 if kind == SLIDING else 1
