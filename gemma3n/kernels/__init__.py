"""Native kernels for quantised weights (native.c), loaded through ctypes, with the plain PyTorch code as fallback.

`native()` returns the library or None. It is the extension that `pip install` compiled next to this file, or, in
a source tree that was not installed, a copy compiled once into the user's cache with the system C compiler. Set
GEMMA3N_NATIVE=0 to run without it (every caller then takes its PyTorch path, which is also what the tests compare
the kernels against).

Every function here takes and returns tensors: weights as stored (uint8 / int8 views, often of a memory map),
activations converted to float32 rows, results float32 [M, N].

Two precisions for the activations of those products (one process-wide setting):
  * "float32" (the default): the weight's exact dequantised values times x in float32, as the reference
    computes, up to the order of the float32 additions.
  * "int8" (opt-in: GEMMA3N_ACTIVATIONS=int8, `set_activation_precision("int8")`, `gemma3n.load(...,
    activations="int8")`, `--activations int8`): each activation row is rounded to int8 per block of 32 values
    (`round_activations` shows the values used) and multiplied in integers, as llama.cpp does. Faster, but it
    changes the numbers, and on a real model sometimes the greedy answer; its distance to the float path is
    measured in tests/quant/test_fast_decode.py and the README. Used only on AVX2 CPUs (elsewhere float32 runs).
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import threading
from pathlib import Path

import torch
from torch import Tensor

ABI_VERSION = 14
_SOURCE = Path(__file__).with_name("native.c")
# the files native.c includes (a build is stale when any of them changed; setup.py lists them too)
INCLUDED_SOURCES = ("gemv_f32.c", "int4_rows.c", "gemm_f32.c", "decode_blocks.c", "channel_norm.c",
                    "depthwise_conv.c", "prompt_rows.c")
_SOURCES = (_SOURCE, *(_SOURCE.with_name(f) for f in INCLUDED_SOURCES))
# what pip's build compiles (setup.py) and what the cache build uses: the AVX2 code is chosen at run time
COMPILE_FLAGS = ["-O3", "-fPIC", "-shared", "-fopenmp", "-fvisibility=hidden", "-std=c11"]
SCALE_TYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
# Up to this many rows of activations the kernels (and the native decode step) take: each row's products are then
# computed alone, the same whatever the other rows; wider inputs go to dequantise + GEMM, which rounds differently.
MAX_ROWS = 16

PRECISIONS = ("int8", "float32")
_precision = os.environ.get("GEMMA3N_ACTIVATIONS", "float32")
if _precision not in PRECISIONS:
    raise ValueError(f"GEMMA3N_ACTIVATIONS={_precision!r}: use one of {PRECISIONS}")

_lock = threading.Lock()
_state: dict = {}


def native():
    """The loaded library, or None when it is disabled (GEMMA3N_NATIVE=0) or cannot be found or built."""
    if "lib" not in _state:
        with _lock:
            if "lib" not in _state:
                _state["lib"], _state["why"] = _load()
    return _state["lib"]


def set_activation_precision(precision: str) -> None:
    """"float32" (exact, the default) or "int8" (approximate, opt-in) activations for the native quantised products,
    for every model in this process."""
    global _precision
    if precision not in PRECISIONS:
        raise ValueError(f"activation precision {precision!r}: use one of {PRECISIONS}")
    _precision = precision


def activation_precision() -> str:
    return _precision


def why_not() -> str | None:
    """Why `native()` is None (None when it loaded)."""
    native()
    return _state.get("why")


def _load():
    if os.environ.get("GEMMA3N_NATIVE", "1") == "0":
        return None, "disabled by GEMMA3N_NATIVE=0"
    candidates = sorted(Path(__file__).parent.glob("_native*" + (sysconfig.get_config_var("EXT_SUFFIX") or ".so")))
    path = candidates[0] if candidates else None
    if path is None or _stale(path):
        path, why = _cached_build()
        if path is None:
            return None, why
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as e:
        return None, f"cannot load {path}: {e}"
    if lib.g3n_abi_version() != ABI_VERSION:
        return None, f"{path} is an older build (ABI {lib.g3n_abi_version()}, expected {ABI_VERSION}); reinstall"
    _declare(lib)
    return lib, None


def _stale(path: Path) -> bool:
    """An in-tree build older than the source (an editable checkout whose native.c changed since pip ran)."""
    return path.stat().st_mtime < max(source.stat().st_mtime for source in _SOURCES)


def _cached_build():
    """Compile native.c into ~/.cache/gemma3n (once per source version and interpreter)."""
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        return None, "no C compiler found to build gemma3n/kernels/native.c (install gcc, or pip install again)"
    digest = hashlib.sha256(b"".join(s.read_bytes() for s in _SOURCES) + " ".join(COMPILE_FLAGS).encode())
    digest = digest.hexdigest()[:16]
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "gemma3n"
    target = cache / f"native-{digest}-{sys.implementation.cache_tag}.so"
    if target.is_file():
        return target, None
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        out = Path(tmp) / target.name
        run = subprocess.run([compiler, *COMPILE_FLAGS, str(_SOURCE), "-o", str(out)], capture_output=True, text=True)
        if run.returncode:
            return None, f"compiling native.c failed: {(run.stderr or run.stdout).strip()[-500:]}"
        os.replace(out, target)  # atomic: a concurrent builder either sees nothing or the whole file
    return target, None


def _declare(lib) -> None:
    p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.g3n_gguf_row_bytes.argtypes, lib.g3n_gguf_row_bytes.restype = [i32, i64], i64
    lib.g3n_gguf_matmul.argtypes = [i32, p, i64, i64, p, p, i64, p, i32, i32]
    lib.g3n_gguf_dequantize.argtypes = [i32, p, i64, i64, p, p, i32, i32]
    lib.g3n_int8_matmul.argtypes = [p, p, i32, i64, i64, p, p, i64, p, i32, i32]
    lib.g3n_int4_matmul.argtypes = [p, p, i32, i64, i64, i64, p, i64, p, i64, p, i32, i32]
    lib.g3n_round_activations.argtypes = [p, i64, i64, p]
    lib.g3n_int4_rows_matmul.argtypes = [p, p, i32, i64, i64, i64, p, i64, p, i64, p, i32, i32]
    lib.g3n_int4_tiles_to_rows.argtypes = [p, p, i32, i64, i64, i64, p, p, i32]
    lib.g3n_gguf_matmul_pairs.argtypes = [i32, p, i64, i64, p, i64, p, p, i64, p, i32, i32]
    lib.g3n_int8_matmul_pairs.argtypes = [p, p, i32, i64, i64, p, i64, p, p, i64, p, i32, i32]
    lib.g3n_int4_rows_matmul_pairs.argtypes = [p, p, i32, i64, i64, i64, p, i64, p, p, i64, p, i32, i32]
    lib.g3n_int4_matmul_cols_per_row.argtypes = [p, p, i32, i64, i64, i64, p, p, p, i64, p, i32, i32]
    lib.g3n_int4_dequantize_t.argtypes = [p, p, i32, i64, i64, i64, i64, i64, p, i32, i32]
    lib.g3n_int4_dequantize_t.restype = i32
    lib.g3n_int4_gemm.argtypes, lib.g3n_int4_gemm.restype = [p, p, i32, i64, i64, i64, p, i32, i64, p, i32], i32
    lib.g3n_gguf_gemm.argtypes, lib.g3n_gguf_gemm.restype = [i32, p, i64, i64, p, i32, i64, p, i32], i32
    lib.g3n_int8_gemm.argtypes, lib.g3n_int8_gemm.restype = [p, p, i32, i64, i64, p, i32, i64, p, i32], i32
    lib.g3n_f32_gemm.argtypes, lib.g3n_f32_gemm.restype = [p, i64, i64, p, i32, i64, p, i32], i32
    lib.g3n_q8_supported.argtypes = [i32]
    lib.g3n_gguf_matmul_q8.argtypes = [i32, p, i64, i64, p, p, i64, p, i32]
    lib.g3n_int8_matmul_q8.argtypes = [p, p, i32, i64, i64, p, p, i64, p, i32]
    lib.g3n_int4_matmul_q8.argtypes = [p, p, i32, i64, i64, i64, p, i64, p, i32]
    lib.g3n_run_plan.argtypes, lib.g3n_run_plan.restype = [p, p], i32  # model/native_decode.py
    lib.g3n_set_avx512.argtypes, lib.g3n_set_avx512.restype = [i32], i32
    lib.g3n_avx512.argtypes, lib.g3n_avx512.restype = [], i32
    lib.g3n_gaussian_topk.argtypes, lib.g3n_gaussian_topk.restype = [p, p, i32, i64, i64, ctypes.c_float, i32], i32
    lib.g3n_altup_mix.argtypes, lib.g3n_altup_mix.restype = [p, p, p, i32, i64, i64, i64, i32], i32
    lib.g3n_nonzero_rows.argtypes, lib.g3n_nonzero_rows.restype = [p, i32, i64, i64, p, p, p, i32], i64
    lib.g3n_channel_rms_norm.argtypes = [p, p, p, p, p, i64, i64, ctypes.c_float, i32, i32, i32]
    lib.g3n_channel_rms_norm.restype = i32
    lib.g3n_depthwise_conv.argtypes = [p, p, p, p, i64, i64, i64, i64, *[i32] * 6, i64, i64, i32, i32]
    lib.g3n_depthwise_conv.restype = i32
    for f in (lib.g3n_gguf_matmul, lib.g3n_gguf_dequantize, lib.g3n_int8_matmul, lib.g3n_int4_matmul,
              lib.g3n_round_activations, lib.g3n_q8_supported, lib.g3n_gguf_matmul_q8, lib.g3n_int8_matmul_q8,
              lib.g3n_int4_matmul_q8, lib.g3n_int4_rows_matmul, lib.g3n_int4_tiles_to_rows, lib.g3n_gguf_matmul_pairs,
              lib.g3n_int8_matmul_pairs, lib.g3n_int4_rows_matmul_pairs, lib.g3n_int4_matmul_cols_per_row):
        f.restype = i32


# -- wrappers -----------------------------------------------------------------------------------------------------

VECTORISED = True  # AVX2 paths allowed; set False to run the portable C (the tests run both)


def avx512() -> bool:
    """Whether the kernels' 512-bit paths run (the CPU has AVX-512 F + BW and `set_avx512` allows them)."""
    lib = native()
    return lib is not None and bool(lib.g3n_avx512())


def set_avx512(allowed: bool) -> bool:
    """Allow (the default) or forbid the kernels' 512-bit paths, process-wide; returns whether they now run (the
    CPU has AVX-512 and they are allowed). They compute the same products in another order of the float32
    additions; the tests compare both paths. Q4_K's int8-activation kernel is a 512-bit one: without it a Q4_K
    product keeps float32 activations."""
    _Q8_TYPES.clear()  # which types have an int8 kernel depends on it
    return bool(native().g3n_set_avx512(int(allowed)))


def _rows_f32(x: Tensor, k: int) -> Tensor:
    """x as float32 contiguous rows of k; ops only where needed (each costs a dispatch on every decoded token)."""
    x = x.reshape(-1, k)
    if x.dtype != torch.float32:
        x = x.float()
    return x if x.is_contiguous() else x.contiguous()


def _ptr(t: Tensor | None):
    return None if t is None else t.data_ptr()


def _int8_activations(k: int) -> bool:
    return _precision == "int8" and VECTORISED and k % 32 == 0


_Q8_TYPES: dict[int, bool] = {}


def _q8_type(lib, ggml_type: int) -> bool:
    if ggml_type not in _Q8_TYPES:
        _Q8_TYPES[ggml_type] = bool(lib.g3n_q8_supported(ggml_type))
    return _Q8_TYPES[ggml_type]


def _check_rows(rows: Tensor | None, n: int) -> None:
    if rows is not None and not indices_within(rows, n):
        raise IndexError(f"row index out of range for {n} rows")


def indices_within(index: Tensor, n: int) -> bool:
    """Every value of an integer tensor in [0, n). A decode step's few ids are read out in one op (the two
    reductions and two reads of `min` / `max` cost ~4 small-op dispatches, several per step); longer ones are
    reduced by `aminmax`."""
    if index.numel() <= 64:
        values = index.reshape(-1).tolist()
        return not values or (min(values) >= 0 and max(values) < n)
    low, high = torch.aminmax(index)
    return int(low) >= 0 and int(high) < n


def _pairs(x: Tensor, k: int, xrows: Tensor, rows: Tensor, n: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Checked arguments of the *_pairs products: x as float32 rows, xrows / rows as int64, and the output."""
    x = _rows_f32(x, k)
    xrows, rows = xrows.to(torch.int64).contiguous(), rows.to(torch.int64).contiguous()
    if xrows.shape != rows.shape or rows.dim() != 1:
        raise ValueError(f"pairs need two 1-d index tensors of one length, got {tuple(xrows.shape)} and "
                         f"{tuple(rows.shape)}")
    _check_rows(rows, n)
    _check_rows(xrows, x.shape[0])
    return x, xrows, rows, torch.empty(rows.numel(), dtype=torch.float32)


def round_activations(x: Tensor) -> Tensor:
    """The values the int8-activation kernels multiply by: x [M, K] rounded to int8 per block of 32, as float32."""
    k = x.shape[-1]
    flat = _rows_f32(x, k)
    out = torch.empty_like(flat)
    _check(native().g3n_round_activations(flat.data_ptr(), flat.shape[0], k, out.data_ptr()), "rounding")
    return out.reshape(x.shape)


def _check(rc: int, what: str) -> None:
    if rc:
        raise RuntimeError(f"native {what} failed (code {rc}): unsupported shape or type")


def gguf_row_bytes(ggml_type: int, k: int) -> int:
    """Stored bytes of one row of k values of a GGUF type; 0 when the kernels do not support that type / width."""
    lib = native()
    return 0 if lib is None else int(lib.g3n_gguf_row_bytes(int(ggml_type), k))


def gguf_matmul(ggml_type: int, raw: Tensor, k: int, x: Tensor, rows: Tensor | None = None) -> Tensor:
    """x [M, K] float -> [M, R] float32 with W the GGUF rows `raw` (uint8 [N, row bytes]); `rows` (int64) picks R
    of them (all N when None)."""
    x = _rows_f32(x, k)
    _check_rows(rows, raw.shape[0])
    n = raw.shape[0] if rows is None else rows.numel()
    y = torch.empty(x.shape[0], n, dtype=torch.float32)
    lib = native()
    if _int8_activations(k) and _q8_type(lib, int(ggml_type)):
        rc = lib.g3n_gguf_matmul_q8(int(ggml_type), raw.data_ptr(), n, k, _ptr(rows), x.data_ptr(), x.shape[0],
                                    y.data_ptr(), torch.get_num_threads())
        _check(rc, "GGUF matmul")
        return y
    rc = lib.g3n_gguf_matmul(int(ggml_type), raw.data_ptr(), n, k, _ptr(rows), x.data_ptr(), x.shape[0],
                                  y.data_ptr(), torch.get_num_threads(), VECTORISED)
    _check(rc, "GGUF matmul")
    return y


def gguf_matmul_pairs(ggml_type: int, raw: Tensor, k: int, x: Tensor, xrows: Tensor, rows: Tensor) -> Tensor:
    """y[e] = W[rows[e]] . x[xrows[e]] (float32 [E]) with W the GGUF rows `raw`: each activation row against its own
    rows of W, as a sparse MLP's up projection needs over a prompt (each token's active units). float32 activations
    always: the exact products of `gguf_matmul`, whatever the activation precision (the callers use this where the
    dense product would be float32 too)."""
    x, xrows, rows, y = _pairs(x, k, xrows, rows, raw.shape[0])
    rc = native().g3n_gguf_matmul_pairs(int(ggml_type), raw.data_ptr(), raw.shape[0], k, x.data_ptr(), x.shape[0],
                                        xrows.data_ptr(), rows.data_ptr(), rows.numel(), y.data_ptr(),
                                        torch.get_num_threads(), VECTORISED)
    _check(rc, "GGUF pairs matmul")
    return y


def gguf_dequantize(ggml_type: int, raw: Tensor, k: int, rows: Tensor | None = None, checked: bool = False) -> Tensor:
    """GGUF rows (all, or the int64 `rows`) -> float32 [R, K]. `checked`: the caller has checked `rows` (an
    embedding, naming its own error)."""
    if not checked:
        _check_rows(rows, raw.shape[0])
    n = raw.shape[0] if rows is None else rows.numel()
    out = torch.empty(n, k, dtype=torch.float32)
    rc = native().g3n_gguf_dequantize(int(ggml_type), raw.data_ptr(), n, k, _ptr(rows), out.data_ptr(),
                                      torch.get_num_threads(), VECTORISED)
    _check(rc, "GGUF dequantize")
    return out


def int8_matmul(qweight: Tensor, scales: Tensor, x: Tensor, rows: Tensor | None = None) -> Tensor:
    """x [M, K] -> [M, R] float32 for int8 rows [N, K] with one scale per row (gemma3n.quant int8)."""
    n_all, k = qweight.shape
    x = _rows_f32(x, k)
    _check_rows(rows, n_all)
    n = n_all if rows is None else rows.numel()
    y = torch.empty(x.shape[0], n, dtype=torch.float32)
    if _int8_activations(k):
        rc = native().g3n_int8_matmul_q8(qweight.data_ptr(), scales.data_ptr(), SCALE_TYPES[scales.dtype], n, k,
                                         _ptr(rows), x.data_ptr(), x.shape[0], y.data_ptr(), torch.get_num_threads())
        if rc != -1:
            _check(rc, "int8 matmul")
            return y
    rc = native().g3n_int8_matmul(qweight.data_ptr(), scales.data_ptr(), SCALE_TYPES[scales.dtype], n, k, _ptr(rows),
                                  x.data_ptr(), x.shape[0], y.data_ptr(), torch.get_num_threads(), VECTORISED)
    _check(rc, "int8 matmul")
    return y


def int8_matmul_pairs(qweight: Tensor, scales: Tensor, x: Tensor, xrows: Tensor, rows: Tensor) -> Tensor:
    """gguf_matmul_pairs for int8 rows [N, K] with one scale per row (float32 activations always)."""
    n, k = qweight.shape
    x, xrows, rows, y = _pairs(x, k, xrows, rows, n)
    rc = native().g3n_int8_matmul_pairs(qweight.data_ptr(), scales.data_ptr(), SCALE_TYPES[scales.dtype], n, k,
                                        x.data_ptr(), x.shape[0], xrows.data_ptr(), rows.data_ptr(), rows.numel(),
                                        y.data_ptr(), torch.get_num_threads(), VECTORISED)
    _check(rc, "int8 pairs matmul")
    return y


def int4_matmul(qweight: Tensor, scales_and_zeros: Tensor, group_size: int, x: Tensor,
                cols: Tensor | None = None) -> Tensor:
    """x [M, K] -> [M, N] float32 for int4 in torch's CPU tile layout (gemma3n.quant.formats). `cols` (int32,
    ascending) lists the only input columns that are non-zero in x: the others are skipped, not read. With int8
    activations the sparse product multiplies the rounded x (`round_activations`), as the dense one does."""
    n, half = qweight.shape
    k = 2 * half
    x = _rows_f32(x, k)
    y = torch.empty(x.shape[0], n, dtype=torch.float32)
    if _int8_activations(k):
        if cols is None:
            rc = native().g3n_int4_matmul_q8(qweight.data_ptr(), scales_and_zeros.data_ptr(),
                                             SCALE_TYPES[scales_and_zeros.dtype], n, k, group_size, x.data_ptr(),
                                             x.shape[0], y.data_ptr(), torch.get_num_threads())
            if rc != -1:
                _check(rc, "int4 matmul")
                return y
        else:
            x = round_activations(x)
    n_cols = 0 if cols is None else cols.numel()
    rc = native().g3n_int4_matmul(qweight.data_ptr(), scales_and_zeros.data_ptr(),
                                  SCALE_TYPES[scales_and_zeros.dtype], n, k, group_size, _ptr(cols), n_cols,
                                  x.data_ptr(), x.shape[0], y.data_ptr(), torch.get_num_threads(), VECTORISED)
    _check(rc, "int4 matmul")
    return y


def int4_matmul_cols_per_row(qweight: Tensor, scales_and_zeros: Tensor, group_size: int, x: Tensor, offsets: Tensor,
                             cols: Tensor) -> Tensor:
    """x [M, K] -> [M, N] float32 for int4 in the tile layout, where row i of x is zero outside the input columns
    cols[offsets[i]:offsets[i + 1]] (ascending; offsets int64 [M + 1]): each row reads only its own columns (a sparse
    MLP's down projection over a prompt). float32 activations always; each row as `int4_matmul` computes it alone
    with those cols."""
    n, half = qweight.shape
    k = 2 * half
    x = _rows_f32(x, k)
    offsets, cols = offsets.to(torch.int64).contiguous(), cols.to(torch.int32).contiguous()
    if offsets.shape != (x.shape[0] + 1,) or int(offsets[0]) != 0 or int(offsets[-1]) != cols.numel() \
            or bool((offsets[1:] < offsets[:-1]).any()):
        raise ValueError(f"offsets must rise from 0 to {cols.numel()} over {x.shape[0] + 1} entries")
    if not indices_within(cols, k):
        raise IndexError(f"column index out of range for {k} columns")
    y = torch.empty(x.shape[0], n, dtype=torch.float32)
    rc = native().g3n_int4_matmul_cols_per_row(qweight.data_ptr(), scales_and_zeros.data_ptr(),
                                               SCALE_TYPES[scales_and_zeros.dtype], n, k, group_size,
                                               offsets.data_ptr(), cols.data_ptr(), x.data_ptr(), x.shape[0],
                                               y.data_ptr(), torch.get_num_threads(), VECTORISED)
    _check(rc, "int4 per-row columns matmul")
    return y


def int4_rows(qweight: Tensor, scales_and_zeros: Tensor, group_size: int) -> tuple[Tensor, Tensor]:
    """The int4 tile-layout weights as rows, for products that read only some rows (a sparse MLP's up projection):
    (qrows uint8 [N, K/2], srows [N, K/g, 2] in the scales' dtype), the layout of int4_rows.c. Same values."""
    n, half = qweight.shape
    k = 2 * half
    qrows = torch.empty(n, half, dtype=torch.uint8)
    srows = torch.empty(n, k // group_size, 2, dtype=scales_and_zeros.dtype)
    rc = native().g3n_int4_tiles_to_rows(qweight.data_ptr(), scales_and_zeros.contiguous().data_ptr(),
                                         SCALE_TYPES[scales_and_zeros.dtype], n, k, group_size, qrows.data_ptr(),
                                         srows.data_ptr(), torch.get_num_threads())
    _check(rc, "int4 rows")
    return qrows, srows


def int4_rows_matmul(qrows: Tensor, srows: Tensor, group_size: int, x: Tensor, rows: Tensor | None = None) -> Tensor:
    """x [M, K] -> [M, R] float32 with W the int4 rows of `int4_rows`; `rows` (int64) picks R of them (all when
    None)."""
    n, half = qrows.shape
    k = 2 * half
    x = _rows_f32(x, k)
    _check_rows(rows, n)
    r = n if rows is None else rows.numel()
    y = torch.empty(x.shape[0], r, dtype=torch.float32)
    rc = native().g3n_int4_rows_matmul(qrows.data_ptr(), srows.data_ptr(), SCALE_TYPES[srows.dtype], n, k,
                                       group_size, _ptr(rows), r, x.data_ptr(), x.shape[0], y.data_ptr(),
                                       torch.get_num_threads(), VECTORISED)
    _check(rc, "int4 rows matmul")
    return y


def int4_rows_matmul_pairs(qrows: Tensor, srows: Tensor, group_size: int, x: Tensor, xrows: Tensor,
                           rows: Tensor) -> Tensor:
    """gguf_matmul_pairs for the int4 rows of `int4_rows` (float32 activations always)."""
    n, half = qrows.shape
    k = 2 * half
    x, xrows, rows, y = _pairs(x, k, xrows, rows, n)
    rc = native().g3n_int4_rows_matmul_pairs(qrows.data_ptr(), srows.data_ptr(), SCALE_TYPES[srows.dtype], n, k,
                                             group_size, x.data_ptr(), x.shape[0], xrows.data_ptr(), rows.data_ptr(),
                                             rows.numel(), y.data_ptr(), torch.get_num_threads(), VECTORISED)
    _check(rc, "int4 rows pairs matmul")
    return y


def int4_dequantize_t(qweight: Tensor, scales_and_zeros: Tensor, group_size: int, rows: slice) -> Tensor:
    """W[rows, :]^T as float32 [K, R] for int4 in the tile layout; `rows` covers whole tiles of 64."""
    n, half = qweight.shape
    k = 2 * half
    start, stop, _ = rows.indices(n)
    out = torch.empty(k, stop - start, dtype=torch.float32)
    rc = native().g3n_int4_dequantize_t(qweight.data_ptr(), scales_and_zeros.data_ptr(),
                                        SCALE_TYPES[scales_and_zeros.dtype], n, k, group_size, start // 64,
                                        (stop - start) // 64, out.data_ptr(), torch.get_num_threads(), VECTORISED)
    _check(rc if start % 64 == 0 and (stop - start) % 64 == 0 else -1, "int4 dequantize")
    return out


def _gemm(entry: str, weights: tuple, n: int, k: int, x: Tensor, what: str) -> Tensor | None:
    """The GEMM entry points' shared call: native `entry`(*weights, x, x's type, M, y, threads) -> y [M, n] float32,
    or None where the library does not take it (no AVX2, or a shape it returns -1 for). x is read in its own dtype
    where that is float32, bfloat16 or float16 (the widening is exact), so a half-precision model's activations need
    no float32 copy first."""
    if not VECTORISED:
        return None
    x = x.reshape(-1, k)
    if x.dtype not in SCALE_TYPES:
        x = x.float()
    x = x if x.is_contiguous() else x.contiguous()
    y = torch.empty(x.shape[0], n, dtype=torch.float32)
    rc = getattr(native(), entry)(*weights, x.data_ptr(), SCALE_TYPES[x.dtype], x.shape[0], y.data_ptr(),
                                  torch.get_num_threads())
    if rc == -1:
        return None
    _check(rc, what)
    return y


def int4_gemm(qweight: Tensor, scales_and_zeros: Tensor, group_size: int, x: Tensor) -> Tensor | None:
    """x [M, K] W^T -> [M, N] float32 for many rows of x (long prompts): W unpacked tile by tile into the GEMM's own
    panels, the values of `int4_dequantize_t` (gemm_f32.c). None where the library cannot (no AVX2): the caller
    then unpacks W and multiplies with PyTorch."""
    n, k = qweight.shape[0], 2 * qweight.shape[1]
    weights = (qweight.data_ptr(), scales_and_zeros.data_ptr(), SCALE_TYPES[scales_and_zeros.dtype], n, k, group_size)
    return _gemm("g3n_int4_gemm", weights, n, k, x, "int4 GEMM")


def int8_gemm(qweight: Tensor, scales: Tensor, x: Tensor) -> Tensor | None:
    """x [M, K] W^T -> [M, N] float32 for many rows of x, W int8 rows with one scale each, decoded into the GEMM's own
    panels: the values of formats.int8_dequantize (gemm_f32.c). None where the library cannot (no AVX2, or K not a
    multiple of 8): the caller then dequantises W and multiplies with PyTorch."""
    n, k = qweight.shape
    weights = (qweight.data_ptr(), scales.data_ptr(), SCALE_TYPES[scales.dtype], n, k)
    return _gemm("g3n_int8_gemm", weights, n, k, x, "int8 GEMM")


# f32_gemm takes a float32 tower's product where it ran at least as fast as PyTorch's GEMM on the towers' shapes:
# wide enough in inputs and outputs that packing x's panels and W's strips is small beside the products. Narrower
# ones (MobileNet-V5's early 1x1 convs: tens of thousands of pixels, 64-256 channels) ran slower, and stay there.
F32_GEMM_MIN_INPUTS, F32_GEMM_MIN_OUTPUTS, F32_GEMM_MIN_ROWS = 512, 1024, 64


def _eager_and_no_grad(*tensors: Tensor) -> bool:
    """Whether a library kernel may stand in for PyTorch's ops on these tensors: no graph is being traced
    (torch.compile, torch.onnx / torch.export record the PyTorch ops) and autograd needs none of them."""
    return not (torch.compiler.is_compiling() or torch.compiler.is_exporting()
                or (torch.is_grad_enabled() and any(t.requires_grad for t in tensors)))


def f32_gemm_applies(weight: Tensor, x: Tensor) -> bool:
    """Whether `f32_gemm` takes x (..., K) times this weight [N, K]: both float32 on the CPU, outside autograd and
    graph tracing (torch.compile, torch.export record PyTorch's op), with the library's vector kernels, and at
    least F32_GEMM_MIN_INPUTS / _OUTPUTS / _ROWS in size."""
    if not VECTORISED or not _eager_and_no_grad(weight, x):
        return False
    if weight.dim() != 2 or x.shape[-1] != weight.shape[1] or weight.shape[1] % 8:
        return False
    n, k = weight.shape
    return (n >= F32_GEMM_MIN_OUTPUTS and k >= F32_GEMM_MIN_INPUTS and x.numel() >= F32_GEMM_MIN_ROWS * k
            and weight.dtype == torch.float32 and x.dtype == torch.float32 and x.device.type == "cpu"
            and weight.device.type == "cpu" and native() is not None)


def f32_gemm(weight: Tensor, x: Tensor) -> Tensor | None:
    """x [M, K] W^T -> [M, N] float32, W float32 [N, K]: the GEMM of the quantised formats over a tower's own float32
    weights (gemm_f32.c), each output summed in one order whatever M, the threads or the vector width. None where the
    library does not take it (no AVX2, or K not a multiple of 8): the caller then multiplies with PyTorch."""
    n, k = weight.shape
    weight = weight.contiguous()
    return _gemm("g3n_f32_gemm", (weight.data_ptr(), n, k), n, k, x, "float32 GEMM")


def gguf_gemm(ggml_type: int, raw: Tensor, k: int, x: Tensor) -> Tensor | None:
    """x [M, K] W^T -> [M, N] float32 for many rows of x, W the GGUF rows `raw` (uint8 [N, bytes per row]) decoded
    into the GEMM's own panels, the values of `gguf_dequantize` (gemm_f32.c). None where the library cannot (no
    AVX2, or a row width it does not take): the caller then dequantises W and multiplies with PyTorch."""
    raw = raw.contiguous()
    n = raw.shape[0]
    return _gemm("g3n_gguf_gemm", (ggml_type, raw.data_ptr(), n, k), n, k, x, "GGUF GEMM")


def row_kernels_apply(*tensors: Tensor) -> bool:
    """Whether the per-token row kernels (`gaussian_topk`, `altup_mix`, `nonzero_rows`) take these tensors:
    float32, bfloat16 or float16 on the CPU, outside autograd and graph tracing, with the library loaded."""
    return (native() is not None and _eager_and_no_grad(*tensors)
            and all(t.dtype in SCALE_TYPES and t.device.type == "cpu" and t.numel() > 0 for t in tensors))


def gaussian_topk(x: Tensor, z: float) -> Tensor | None:
    """ReLU(x - (mean + std * z)) over the last dim of x, in x's dtype, in one pass per row (prompt_rows.c): the
    mean and population std summed in double and rounded once to the dtype, then each operation rounded to it as the
    PyTorch expression (layers.gaussian_topk) rounds. z as the dtype holds it. Check `row_kernels_apply` first; None
    where the library does not take the dtype."""
    n = x.shape[-1]
    x = x if x.is_contiguous() else x.contiguous()
    out = torch.empty_like(x)
    rc = native().g3n_gaussian_topk(x.data_ptr(), out.data_ptr(), SCALE_TYPES[x.dtype], x.numel() // n, n, z,
                                    torch.get_num_threads())
    if rc == -1:  # float16 where the compiler has no _Float16
        return None
    _check(rc, "Gaussian top-k")
    return out


def altup_mix(streams: Tensor, coefs: Tensor) -> Tensor | None:
    """AltUp's prediction: streams (S, ..., D), coefs (..., S, S) -> (S, ..., D) with stream q = (sum_p coefs[..., q,
    p] streams[p], rounded to the streams' dtype) + streams[q], rounded to it; the sums taken in double and rounded
    once to float32 (prompt_rows.c). Check `row_kernels_apply` first; None where the library does not take it."""
    s, d = streams.shape[0], streams.shape[-1]
    if coefs.shape != (*streams.shape[1:-1], s, s):
        raise ValueError(f"coefs of shape {tuple(coefs.shape)} for streams of shape {tuple(streams.shape)}")
    x = streams if streams.is_contiguous() else streams.contiguous()
    c = coefs.to(torch.float32).contiguous()
    out = torch.empty_like(x)
    rc = native().g3n_altup_mix(x.data_ptr(), c.data_ptr(), out.data_ptr(), SCALE_TYPES[x.dtype], s,
                                x[0].numel() // d, d, torch.get_num_threads())
    if rc == -1:  # float16 where the compiler has no _Float16, or more streams than it takes
        return None
    _check(rc, "AltUp prediction")
    return out


def nonzero_rows(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """x [rows, n] -> (rows_at, pair_rows, cols): the pairs at which x is not zero, row by row with columns
    ascending (torch.nonzero's order: pair_rows, cols), and rows_at [rows + 1] (int64) where each row's pairs begin.
    -0 counts as zero, NaN as not. Check `row_kernels_apply` first."""
    rows, n = x.shape
    x = x if x.is_contiguous() else x.contiguous()
    rows_at = torch.empty(rows + 1, dtype=torch.int64)
    lib, xt, threads = native(), SCALE_TYPES[x.dtype], torch.get_num_threads()
    total = lib.g3n_nonzero_rows(x.data_ptr(), xt, rows, n, rows_at.data_ptr(), None, None, threads)
    _check(min(int(total), 0), "non-zero pairs")
    pair_rows, cols = torch.empty(total, dtype=torch.int64), torch.empty(total, dtype=torch.int64)
    lib.g3n_nonzero_rows(x.data_ptr(), xt, rows, n, rows_at.data_ptr(), pair_rows.data_ptr(), cols.data_ptr(),
                         threads)
    return rows_at, pair_rows, cols


def map_kernels_apply(x: Tensor, residual: Tensor | None = None, *params: Tensor | None) -> bool:
    """Whether the library's feature-map kernels (`channel_rms_norm`, `depthwise_conv`) take the map x, a residual
    map and per-channel params: float32 on the CPU, maps channels-last, outside autograd, with the library loaded."""
    maps = [t for t in (x, residual) if t is not None]
    tensors = maps + [t for t in params if t is not None]
    return (native() is not None and _eager_and_no_grad(*tensors)
            and all(t.dtype == torch.float32 and t.device.type == "cpu" for t in tensors)
            and all(t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last) for t in maps))


def channel_rms_norm(x: Tensor, weight: Tensor, eps: float, act: bool = False, gamma: Tensor | None = None,
                     residual: Tensor | None = None, out: Tensor | None = None) -> Tensor:
    """RMS norm over the channels of each pixel of x (N, C, H, W) channels-last, times `weight`, then GELU-tanh
    (act), times the per-channel `gamma`, plus `residual` (same shape and layout as x): one pass over the map,
    written to `out` (x itself allowed: each pixel is read whole before it is written), else to a new map.
    Check `map_kernels_apply` first."""
    c = x.shape[1]
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"residual of shape {tuple(residual.shape)} for a map of shape {tuple(x.shape)}")
    if out is None:
        out = torch.empty_like(x, memory_format=torch.channels_last)
    elif out.shape != x.shape or out.dtype != torch.float32 or not out.is_contiguous(memory_format=torch.channels_last):
        raise ValueError(f"out must be a float32 channels-last map of shape {tuple(x.shape)}")
    params = [p.detach().to(torch.float32).contiguous() for p in (weight, gamma) if p is not None]
    rc = native().g3n_channel_rms_norm(x.data_ptr(), params[0].data_ptr(), _ptr(params[1] if gamma is not None
                                       else None), _ptr(residual), out.data_ptr(), x.numel() // c, c, eps, int(act),
                                       torch.get_num_threads(), VECTORISED)
    _check(rc, "channel RMS norm")
    return out


def depthwise_conv(x: Tensor, weight: Tensor, bias: Tensor | None, stride: tuple[int, int], top: int, left: int,
                   out_size: tuple[int, int]) -> Tensor:
    """Depthwise conv of x (N, C, H, W) channels-last float32 by weight (C, 1, kh, kw), zero padding `top` / `left`
    implicit (the bottom and right follow from `out_size`): (N, C, oh, ow) channels-last, each output the bias plus
    one FMA per tap inside the map in row-major tap order (depthwise_conv.c). Check `map_kernels_apply` and that
    weight has one filter per channel first."""
    n, c, h, w = x.shape
    kh, kw = weight.shape[-2:]
    if weight.shape != (c, 1, kh, kw) or (bias is not None and bias.shape != (c,)):
        raise ValueError(f"a depthwise weight (C, 1, kh, kw) and bias (C,) for {c} channels, got "
                         f"{tuple(weight.shape)} and {None if bias is None else tuple(bias.shape)}")
    taps = weight.detach().float().reshape(c, kh * kw).t().contiguous()  # [kh * kw][C]: a tap's weights contiguous
    params = None if bias is None else bias.detach().float().contiguous()
    out = torch.empty(n, c, *out_size, memory_format=torch.channels_last)
    rc = native().g3n_depthwise_conv(x.data_ptr(), taps.data_ptr(), _ptr(params), out.data_ptr(), n, h, w, c, kh, kw,
                                     stride[0], stride[1], top, left, out_size[0], out_size[1],
                                     torch.get_num_threads(), VECTORISED)
    _check(rc, "depthwise conv")
    return out
