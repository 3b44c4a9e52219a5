"""Text side of the processor: tokenizer, chat template rendering, multimodal placeholder expansion."""

from gemma3n.processor.chat import GEMMA3N_CHAT_TEMPLATE, expand_placeholders, render_chat, validate_messages
from gemma3n.processor.tokenizer import Tokenizer, read_gguf_metadata

__all__ = [
    "GEMMA3N_CHAT_TEMPLATE",
    "Tokenizer",
    "expand_placeholders",
    "read_gguf_metadata",
    "render_chat",
    "validate_messages",
]
