"""LoRA adapters on the text decoder, in PEFT's format: lora.py puts LoRA beside any linear kind (float, int8, int4,
GGUF blocks) with a frozen base that stays differentiable w.r.t. its input; peft_format.py names adapters as PEFT
does, both ways, and applies one to a loaded model (`gemma3n.load(path, adapter=DIR)`); merge.py folds one into a
float checkpoint folder (`gemma3n merge`). Training them is gemma3n/finetune, a layer above the loader."""
