"""LoRA and QLoRA fine-tuning on ms-swift-style JSONL, with adapters in PEFT's format.

data.py reads and checks the JSONL and builds label masks; lora.py puts LoRA beside any linear kind (float, int8,
int4, GGUF blocks); peft_format.py names adapters as PEFT does, both ways; trainer.py runs the loop.
`gemma3n.finetune(...)` is trainer.finetune; `gemma3n.load(path, adapter=DIR)` uses peft_format.apply_adapter.
"""


def finetune(*args, **kwargs):
    """Train a LoRA adapter; see gemma3n.finetune.trainer.finetune for the arguments."""
    from .trainer import finetune as run  # the trainer loads models, so it sits above the loader; import on use
    return run(*args, **kwargs)
