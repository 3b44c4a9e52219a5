"""LoRA and QLoRA fine-tuning on ms-swift-style JSONL (`gemma3n finetune`, `from gemma3n.finetune import finetune`).

data.py reads and checks the JSONL and builds label masks; trainer.py loads the base through gemma3n.load, puts
adapters on it (gemma3n/adapters) and runs the loop. It sits above the loader, beside the server.
"""
from .trainer import TrainingArguments, TrainingResult, finetune

__all__ = ["finetune", "TrainingArguments", "TrainingResult"]
