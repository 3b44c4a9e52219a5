"""Public entry points: `load()` and `Model`."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .checkpoint.hub import looks_like_hub_id, resolve_cached
from .checkpoint.safetensors import Checkpoint, CheckpointError
from .checkpoint.weights import assemble, resolve_dtype, text_key_map
from .config import ConfigError, ModelConfig


def text_model_class(config: ModelConfig):
    """The decoder class for a config's family."""
    if config.family == "gemma3n":
        from .model.text import CausalLM
        return CausalLM
    from .model.gemma3 import Gemma3CausalLM
    return Gemma3CausalLM


def _first_shared(config: ModelConfig) -> int | None:
    return getattr(config.text, "first_shared_layer", None)


def _load_folder(folder: Path, dtype: torch.dtype | None) -> tuple[ModelConfig, nn.Module]:
    if not (folder / "config.json").exists():
        raise CheckpointError(f"{folder}: no config.json here; pass a Hugging Face checkpoint folder or a .gguf file")
    config = ModelConfig.from_file(folder / "config.json")
    tensors = Checkpoint(folder)
    keys = text_key_map(list(tensors), _first_shared(config))
    cls = text_model_class(config)
    lm = assemble(lambda: cls(config.text), tensors, keys, dtype,
                  lambda name: str(tensors.file_of(name)) if name in tensors else str(folder))
    return config, lm


def _load_gguf(path: Path, dtype: torch.dtype | None) -> tuple[ModelConfig, nn.Module]:
    from .checkpoint.gguf import read_gguf
    config, tensors = read_gguf(path, dtype)
    keys = text_key_map(list(tensors), _first_shared(config))
    cls = text_model_class(config)
    return config, assemble(lambda: cls(config.text), tensors, keys, dtype, lambda name: str(path))


def load(path_or_id: str | Path, dtype=None, device: str = "cpu") -> "Model":
    """Load a Hugging Face checkpoint folder, a .gguf file, or a Hub id found in the local cache.

    dtype: None keeps the stored dtype (memory-mapped, no copy); "float32", "bfloat16" or "float16" converts.
    """
    dtype = resolve_dtype(dtype)
    path = Path(path_or_id).expanduser()
    if not path.exists():
        if isinstance(path_or_id, str) and looks_like_hub_id(path_or_id):
            path = resolve_cached(path_or_id)
        else:
            raise FileNotFoundError(f"{path}: no such file or folder; pass a checkpoint folder, a .gguf file "
                                    f"or a Hugging Face model id that is in the local cache")
    if path.is_dir():
        config, lm = _load_folder(path, dtype)
    elif path.suffix.lower() == ".gguf":
        config, lm = _load_gguf(path, dtype)
    else:
        raise CheckpointError(f"{path}: not a checkpoint folder or a .gguf file")
    if device != "cpu":
        lm = lm.to(device)
    return Model(lm, config, path)


class Model:
    """A loaded model: teacher-forced logits and generation."""

    def __init__(self, lm: nn.Module, config: ModelConfig, path: Path):
        self.lm, self.config, self.path = lm, config, path

    @property
    def dtype(self) -> torch.dtype:
        return self.lm.model.embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.lm.model.embed_tokens.weight.device

    @torch.inference_mode()
    def logits(self, input_ids, attention_mask=None, **multimodal: Any) -> torch.Tensor:
        """Teacher-forced forward: float32 [B, T, vocab] after the soft-cap.

        With left padding (attention_mask 0 on the left), positions count only the real tokens, so a padded
        row's logits equal those of the same sequence alone.
        """
        if any(v is not None for v in multimodal.values()):
            raise NotImplementedError("image and audio inputs are not supported by this build yet")
        ids = _as_ids(input_ids, self.device)
        mask = None if attention_mask is None else torch.as_tensor(attention_mask, device=self.device)
        self._check_ids(ids)
        return self.lm(ids, mask)

    @torch.inference_mode()
    def generate(self, input_ids, max_new_tokens: int = 64, temperature: float = 0.0,
                 attention_mask=None) -> torch.Tensor:
        """Token ids in ([1, T] LongTensor) -> the new ids ([1, N]); greedy when temperature is 0."""
        ids = _as_ids(input_ids, self.device)
        self._check_ids(ids)
        if temperature != 0:
            raise NotImplementedError("sampling is not available in this build yet; use temperature=0")
        mask = None if attention_mask is None else torch.as_tensor(attention_mask, device=self.device)
        return greedy_ids(self.lm, ids, mask, max_new_tokens, set(self.config.eos_token_id),
                          self.config.text.pad_token_id)

    def _check_ids(self, ids: torch.Tensor) -> None:
        vocab = self.config.text.vocab_size
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
            raise ValueError(f"token ids must lie in [0, {vocab}); got {int(ids.min())}..{int(ids.max())}")


def _as_ids(input_ids, device) -> torch.Tensor:
    ids = torch.as_tensor(input_ids, device=device)
    if ids.dim() == 1:
        ids = ids[None]
    if ids.dim() != 2 or ids.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"input_ids must be integer ids of shape [B, T]; got {tuple(ids.shape)} {ids.dtype}")
    return ids.long()


def greedy_ids(lm: nn.Module, ids: torch.Tensor, mask, max_new_tokens: int, stop: set[int],
               pad_id: int) -> torch.Tensor:
    """Greedy decoding with the KV cache; a row that has stopped emits the pad id, as the reference does."""
    b, t = ids.shape
    cache = lm.new_cache(b, t + max_new_tokens)
    logits = lm(ids, mask, cache, last_only=True)
    out, done = [], torch.zeros(b, dtype=torch.bool, device=ids.device)
    for _ in range(max_new_tokens):
        nxt = logits[:, -1].argmax(-1)
        nxt = torch.where(done, torch.full_like(nxt, pad_id), nxt)
        out.append(nxt)
        done |= torch.isin(nxt, torch.tensor(sorted(stop), device=ids.device))
        if bool(done.all()) or len(out) == max_new_tokens:
            break
        logits = lm(nxt[:, None], None, cache, last_only=True)
    return torch.stack(out, 1) if out else torch.empty(b, 0, dtype=torch.long)
