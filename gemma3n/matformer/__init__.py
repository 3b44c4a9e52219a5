"""MatFormer: the nested sizes inside Gemma 3n E4B (and any Gemma 3n checkpoint), offline and at load time.

    gemma3n.matformer.slice_checkpoint("gemma-3n-E4B-it", "e2.54b", "Config for E2.54B (layer-level)")
    gemma3n.matformer.slice_checkpoint(src, dst, {"layers_skipped": [20, 21], "ffn_hidden_dims": [...]})
    gemma3n.load("gemma-3n-E4B-it", matformer="E2B")          # the slice, read from the unsliced files
    gemma3n.matformer.PUBLISHED                                # Google's 15 configurations (+ the main model)
"""
from .plan import (MatformerError, SlicePlan, SliceSpec, describe, parameter_counts, parse_int_list, parse_spec,
                   plan_slice, reserved_layers, sliced_config_dict)
from .published import PUBLISHED, Published, find
from .slicing import elastic_view, slice_checkpoint
from .tensors import SlicedRowEmbedding, SlicedTensors

__all__ = ["MatformerError", "PUBLISHED", "Published", "SlicePlan", "SliceSpec", "SlicedRowEmbedding",
           "SlicedTensors", "describe", "elastic_view", "find", "parameter_counts", "parse_int_list", "parse_spec",
           "plan_slice", "reserved_layers", "slice_checkpoint", "sliced_config_dict"]
