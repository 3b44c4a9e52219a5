"""Weight-only quantisation (int8 per output channel, int4 group-wise) as a module swap after loading.
Quantised checkpoint folders are written by gemma3n.convert (`gemma3n quantize`).

    model = gemma3n.load(path, quantize="int4")          # or {"decoder": "int4", "embeddings": "int8", ...}
"""
from .formats import int4_dequantize, int4_quantize, int8_dequantize, int8_quantize
from .modules import Int4Embedding, Int4Linear, Int8Embedding, Int8Linear
from .scheme import (QuantScheme, apply_plan, deferred_tensors, parse_scheme, plan, plan_for, quantize_model,
                     quantize_module)

__all__ = ["Int4Embedding", "Int4Linear", "Int8Embedding", "Int8Linear", "QuantScheme", "apply_plan", "deferred_tensors",
           "int4_dequantize", "int4_quantize", "int8_dequantize", "int8_quantize", "parse_scheme", "plan",
           "plan_for", "quantize_model", "quantize_module"]
