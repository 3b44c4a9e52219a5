"""Modules built on the meta device as skeletons: shapes only, their values assigned from a checkpoint afterwards.

torch's layers run their initialisers (torch.nn.init) even on the meta device, and the first initialiser run on a
meta tensor imports torch._dynamo: seconds added to the start of every process that loads a model (`gemma3n run`,
`serve`), for values that are thrown away. Inside `uninitialised_meta()` the initialisers leave tensors as they are.
"""
from __future__ import annotations

import contextlib
import threading

import torch
from torch.nn import init

INITIALISERS = ("uniform_", "normal_", "trunc_normal_", "constant_", "ones_", "zeros_", "eye_", "dirac_",
                "xavier_uniform_", "xavier_normal_", "kaiming_uniform_", "kaiming_normal_", "orthogonal_", "sparse_")
_LOCK = threading.RLock()  # the initialisers are module attributes: one skeleton build swaps them at a time


def _unchanged(tensor, *args, **kwargs):
    return tensor


@contextlib.contextmanager
def uninitialised_meta():
    """`torch.device("meta")` with torch.nn.init's initialisers skipped (see the module's docstring). Nests."""
    with _LOCK:
        saved = {name: getattr(init, name) for name in INITIALISERS if hasattr(init, name)}
        for name in saved:
            setattr(init, name, _unchanged)
        try:
            with torch.device("meta"):
                yield
        finally:
            for name, original in saved.items():
                setattr(init, name, original)
