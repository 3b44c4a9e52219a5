"""Weight-only quantisation (int8 per output channel, int4 group-wise) as a module swap after loading.

    model = gemma3n.load(path, quantize="int4")          # or {"decoder": "int4", "embeddings": "int8", ...}
    quantize_checkpoint(src, dst, "int4")                  # a folder that gemma3n.load(dst) loads quantised
"""
from .checkpoint import quantize_checkpoint, stored_plan
from .formats import int4_dequantize, int4_quantize, int8_dequantize, int8_quantize
from .modules import Int4Embedding, Int4Linear, Int8Embedding, Int8Linear
from .quality import compare, guard_scheme
from .scheme import (QuantScheme, apply_plan, deferred_tensors, parse_scheme, plan, plan_for, quantize_model,
                     quantize_module)

__all__ = ["compare", "guard_scheme", "Int4Embedding", "Int4Linear", "Int8Embedding", "Int8Linear", "QuantScheme", "apply_plan", "deferred_tensors",
           "int4_dequantize", "int4_quantize", "int8_dequantize", "int8_quantize", "parse_scheme", "plan",
           "plan_for", "quantize_checkpoint", "quantize_model", "quantize_module", "stored_plan"]
