"""gemma3n: run Google's Gemma 3n (and Gemma 3) locally, exactly as the reference computes it."""
from .api import Model, export_onnx, load
from .config import ConfigError, ModelConfig, TextConfig
from .checkpoint.safetensors import CheckpointError

__all__ = ["load", "export_onnx", "Model", "ModelConfig", "TextConfig", "ConfigError", "CheckpointError"]
__version__ = "0.1.0"
