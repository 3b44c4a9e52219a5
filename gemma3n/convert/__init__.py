"""Writing checkpoints from checkpoints: quantised folders (`gemma3n quantize`); MatFormer slices live in
gemma3n.matformer."""
from .quantized import quantize_checkpoint, stored_plan

__all__ = ["quantize_checkpoint", "stored_plan"]
