"""Build step for the native kernels (gemma3n/kernels/native.c); everything else is in pyproject.toml.

The library is plain C called through ctypes (no Python or PyTorch headers), so building needs only a C compiler
and never pulls in another torch. It is optional: without a compiler the install still succeeds and gemma3n
runs its PyTorch code instead (or builds the library on first use, see gemma3n/kernels/__init__.py).
"""
from setuptools import Extension, setup

setup(ext_modules=[Extension(
    "gemma3n.kernels._native", ["gemma3n/kernels/native.c"],
    depends=[f"gemma3n/kernels/{name}"
             for name in ("gemv_f32.c", "int4_rows.c", "gemm_f32.c", "decode_blocks.c", "channel_norm.c",
                          "depthwise_conv.c", "prompt_rows.c")],
    extra_compile_args=["-O3", "-fopenmp", "-fvisibility=hidden", "-std=c11"],
    extra_link_args=["-fopenmp"],
    optional=True,
)])
