"""The LoRA / QLoRA training loop: AdamW with linear warm-up and cosine decay, gradient accumulation, gradient
checkpointing per decoder layer, checkpoints every `save_steps` (resumable), a progress line and a JSONL log.

Only the adapter trains. The base stays in the form it was loaded in: float weights frozen, quantised ones (int8,
int4, GGUF blocks) read as stored, differentiated through `lora.frozen_linear`. The loss is the mean cross-entropy
over the label tokens of an optimizer step (transformers' loss when there is no accumulation).
"""
from __future__ import annotations

import functools
import json
import math
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

from ..model.layers import softcap
from . import data as data_mod
from ..adapters.lora import inject, make_differentiable, select_targets, frozen_linear, undo_differentiable
from ..adapters.peft_format import external_name, internal_name, read_adapter, save_adapter

LOG_NAME, STATE_NAME = "training_log.jsonl", "trainer_state.pt"


@dataclass
class TrainingArguments:
    """Settings of a run; the defaults follow ms-swift's LoRA SFT defaults."""

    lora_rank: int = 8
    lora_alpha: float = 32
    lora_dropout: float = 0.05
    target: str = "all-linear"
    epochs: float = 3
    max_steps: int | None = None
    learning_rate: float = 1e-4
    weight_decay: float = 0.1
    warmup_ratio: float = 0.05
    max_grad_norm: float = 1.0
    batch_size: int = 1
    gradient_accumulation: int = 1
    max_length: int = 2048
    seed: int = 42
    val_fraction: float = 0.0
    save_steps: int | None = None
    gradient_checkpointing: bool = True
    allow_network: bool = False

    def check(self) -> None:
        for name in ("lora_rank", "batch_size", "gradient_accumulation", "max_length"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.epochs <= 0 or (self.max_steps is not None and self.max_steps < 1):
            raise ValueError("epochs must be > 0 and max-steps at least 1")
        if not 0 <= self.lora_dropout < 1 or self.learning_rate <= 0:
            raise ValueError("lora-dropout must be in [0, 1) and learning-rate > 0")
        if self.save_steps is not None and self.save_steps < 1:
            raise ValueError("save-steps must be at least 1")


@dataclass
class TrainingResult:
    output: Path
    steps: int
    final_loss: float | None
    val_loss: float | None
    tokens_per_second: float
    seconds: float
    trained_modules: int
    history: list[dict] = field(default_factory=list)


def default_dtype(device: str) -> str:
    """float32 on the CPU (exact, and CPUs without bfloat16 units run it faster); bfloat16 on a GPU that has it."""
    if device.startswith("cuda") and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bfloat16"
    return "float32"


def finetune(model: str | Path, data: str | Path, output: str | Path, val: str | Path | None = None,
             device: str | None = None, dtype: str | None = None, quantize=None, resume: bool = False,
             progress: bool = True, **settings) -> TrainingResult:
    """Train a LoRA adapter for `model` (a checkpoint folder, .gguf file or cached Hub id) on the JSONL `data` and
    write it to `output` (PEFT format, with training_log.jsonl). settings: the fields of TrainingArguments."""
    from ..api import load  # the loader sits below this package (loading calls peft_format to apply adapters)
    args = TrainingArguments(**settings)
    args.check()
    output = Path(output)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    examples = data_mod.read_jsonl(data, args.allow_network)
    if val is not None:
        train_examples, val_examples = examples, data_mod.read_jsonl(val, args.allow_network)
    else:
        train_examples, val_examples = data_mod.split_validation(examples, args.val_fraction, args.seed)
    loaded = load(model, dtype=dtype or default_dtype(device), device=device, quantize=quantize)
    loaded.allow_network = args.allow_network
    encoder = data_mod.Encoder(loaded, args.max_length)
    train_set = encoder.encode_all(train_examples, str(data))
    val_set = encoder.encode_all(val_examples, str(val or data))
    trainer = Trainer(loaded, args, output, base_name=str(model))
    return trainer.train(train_set, val_set, resume=resume, progress=progress)


class Trainer:
    def __init__(self, model, args: TrainingArguments, output: Path, base_name: str):
        self.model, self.args, self.output, self.base_name = model, args, Path(output), base_name
        self.lm = model.lm
        torch.manual_seed(args.seed)
        random.seed(args.seed)
        name_of = external_name(model.config)
        paths = select_targets(self.lm, args.target, name_of)
        generator = torch.Generator().manual_seed(args.seed)
        self.wrappers = inject(self.lm, paths, args.lora_rank, args.lora_alpha, args.lora_dropout)
        for wrapper in self.wrappers.values():
            wrapper.reset_parameters(generator)
            wrapper.lora_A.weight.requires_grad_(True)
            wrapper.lora_B.weight.requires_grad_(True)
            wrapper.lora_dropout.train()
        self.frozen_paths = make_differentiable(self.lm)
        self.params = [p for w in self.wrappers.values() for p in (w.lora_A.weight, w.lora_B.weight)]
        self.optimizer = torch.optim.AdamW(self.params, lr=args.learning_rate, weight_decay=args.weight_decay)
        self.sparse = [m for m in self.lm.modules() if getattr(m, "sparse_decode", False)]
        self.pad_id = model.tokenizer.pad_id if model.tokenizer.pad_id is not None else model.config.text.pad_token_id

    # -- one forward ---------------------------------------------------------------------------------------------

    def loss_sum(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
        """(sum of the token cross-entropies, number of label tokens) of one micro-batch."""
        device = self.model.device
        ids = batch["input_ids"].to(device)
        labels = batch["labels"][:, 1:].to(device)
        media = {k: batch[k] for k in ("pixel_values", "input_features", "input_features_mask") if k in batch}
        embeds = self.model.embed_media(ids, **media)
        if embeds is not None:
            embeds = embeds.clone()  # a normal tensor: the merge ran in inference mode (the towers are frozen)
        hidden = self.hidden_states(ids, batch["attention_mask"].to(device), embeds)
        chosen = labels != data_mod.IGNORE
        table = self.lm.model.embed_tokens
        logits = softcap(frozen_linear(table, hidden[:, :-1][chosen]).float(), self.lm.config.final_logit_softcapping)
        return F.cross_entropy(logits, labels[chosen], reduction="sum"), int(chosen.sum())

    def hidden_states(self, ids, mask, embeds) -> torch.Tensor:
        lookahead = None
        image_token = getattr(self.model.decoder, "image_token_id", None)  # Gemma 3: bidirectional image blocks
        if image_token is not None and bool((ids == image_token).any()):
            from ..model.gemma3_multimodal import block_lookahead, image_blocks
            lookahead = block_lookahead(image_blocks(ids, image_token))
        if lookahead is not None:
            return self.lm.model(ids, mask, None, embeds, lookahead=lookahead)
        return self.lm.model(ids, mask, None, embeds)

    # -- the loop ------------------------------------------------------------------------------------------------

    def train(self, train_set: list, val_set: list, resume: bool = False, progress: bool = True) -> TrainingResult:
        args = self.args
        micro_per_epoch = math.ceil(len(train_set) / args.batch_size)
        steps_per_epoch = max(1, math.ceil(micro_per_epoch / args.gradient_accumulation))
        total = math.ceil(steps_per_epoch * args.epochs)
        total = min(total, args.max_steps) if args.max_steps else total
        warmup = math.ceil(total * args.warmup_ratio)
        schedule = functools.partial(_warmup_cosine, warmup=warmup, total=total)
        scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, schedule)
        self.output.mkdir(parents=True, exist_ok=True)
        step = self._resume(scheduler) if resume else 0
        if not resume:
            (self.output / LOG_NAME).write_text("")
        order = self._micro_batches(len(train_set), total * args.gradient_accumulation)
        bar = Progress(total, enabled=progress)
        history, started, seen_tokens, last_loss = [], time.perf_counter(), 0, None
        self.set_training(True)
        try:
            while step < total:
                step_started = time.perf_counter()
                micro = order[step * args.gradient_accumulation:(step + 1) * args.gradient_accumulation]
                batches = [data_mod.collate([train_set[i] for i in rows], self.pad_id) for rows in micro]
                label_tokens = sum(int((b["labels"][:, 1:] != data_mod.IGNORE).sum()) for b in batches)
                total_loss = 0.0
                for batch in batches:
                    loss_sum, _ = self.loss_sum(batch)
                    (loss_sum / label_tokens).backward()
                    total_loss += float(loss_sum.detach())
                grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, args.max_grad_norm))
                lr = scheduler.get_last_lr()[0]
                self.optimizer.step()
                scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
                step += 1
                tokens = sum(int(b["attention_mask"].sum()) for b in batches)
                seen_tokens += tokens
                elapsed = time.perf_counter() - started
                last_loss = total_loss / label_tokens
                record = {"step": step, "epoch": round(step / steps_per_epoch, 4), "loss": round(last_loss, 6),
                          "learning_rate": lr, "grad_norm": round(grad_norm, 6), "tokens": tokens,
                          "tokens_per_second": round(tokens / (time.perf_counter() - step_started), 2),
                          "elapsed_seconds": round(elapsed, 2)}
                at_end = step == total
                if val_set and (at_end or step % steps_per_epoch == 0
                                or (args.save_steps and step % args.save_steps == 0)):
                    record["val_loss"] = round(self.evaluate(val_set), 6)
                history.append(record)
                with open(self.output / LOG_NAME, "a") as f:
                    f.write(json.dumps(record) + "\n")
                bar.update(step, last_loss, seen_tokens / elapsed if elapsed else 0.0)
                if args.save_steps and step % args.save_steps == 0 and not at_end:
                    self._save_checkpoint(step, scheduler)
        finally:
            self.set_training(False)
            bar.close()
        save_adapter(self.output, self.lm, self.model.config, self.base_name, args.lora_rank, args.lora_alpha,
                     args.lora_dropout)
        (self.output / "training_args.json").write_text(json.dumps(asdict(args), indent=2) + "\n")
        seconds = time.perf_counter() - started
        val_loss = next((r["val_loss"] for r in reversed(history) if "val_loss" in r), None)
        return TrainingResult(self.output, step, last_loss, val_loss, seen_tokens / seconds if seconds else 0.0,
                              seconds, len(self.wrappers), history)

    @torch.no_grad()
    def evaluate(self, items: list) -> float:
        """Mean cross-entropy over the label tokens of `items` (dropout off)."""
        self.set_training(False)
        try:
            total, count = 0.0, 0
            for start in range(0, len(items), self.args.batch_size):
                loss_sum, n = self.loss_sum(data_mod.collate(items[start:start + self.args.batch_size], self.pad_id))
                total, count = total + float(loss_sum), count + n
            return total / max(count, 1)
        finally:
            self.set_training(True)

    def finish(self) -> None:
        """Put the model back as it was loaded (adapters stay attached; quantised linears unwrapped)."""
        undo_differentiable(self.lm, self.frozen_paths)

    def set_training(self, on: bool) -> None:
        """Dropout of the adapters, per-layer gradient checkpointing, and the sparse decode path (decode only)."""
        for wrapper in self.wrappers.values():
            wrapper.lora_dropout.train(on)
        for mlp in self.sparse:
            mlp.sparse_decode = not on
        for layer in self.lm.model.layers:
            if on and self.args.gradient_checkpointing:
                layer.forward = functools.partial(_checkpointed, type(layer).forward.__get__(layer))
            else:
                layer.__dict__.pop("forward", None)

    def _micro_batches(self, size: int, count: int) -> list[list[int]]:
        """Row indices of each micro-batch, epoch after epoch, each epoch in its own seeded order."""
        out, epoch = [], 0
        while len(out) < count:
            order = torch.randperm(size, generator=torch.Generator().manual_seed(self.args.seed + epoch)).tolist()
            out += [order[i:i + self.args.batch_size] for i in range(0, size, self.args.batch_size)]
            epoch += 1
        return out

    def _save_checkpoint(self, step: int, scheduler) -> None:
        folder = self.output / f"checkpoint-{step}"
        save_adapter(folder, self.lm, self.model.config, self.base_name, self.args.lora_rank, self.args.lora_alpha,
                     self.args.lora_dropout)
        torch.save({"step": step, "optimizer": self.optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "torch_rng": torch.get_rng_state(), "args": asdict(self.args)}, folder / STATE_NAME)

    def _resume(self, scheduler) -> int:
        found = sorted((p for p in self.output.glob("checkpoint-*") if (p / STATE_NAME).exists()),
                       key=lambda p: int(p.name.rpartition("-")[2]))
        if not found:
            raise FileNotFoundError(f"{self.output}: no checkpoint-N folder to resume from (they are written every "
                                    f"--save-steps steps)")
        folder = found[-1]
        state = torch.load(folder / STATE_NAME, weights_only=False)
        changed = {k for k in ("lora_rank", "lora_alpha", "target", "batch_size", "gradient_accumulation", "seed")
                   if state["args"].get(k) != getattr(self.args, k)}
        if changed:
            raise ValueError(f"{folder} was written with other settings ({', '.join(sorted(changed))}); resume with "
                             f"the same ones")
        _, layers = read_adapter(folder)
        with torch.no_grad():
            for name, pair in layers.items():
                wrapper = self.wrappers[internal_name(name)]
                wrapper.lora_A.weight.copy_(pair["lora_A"])
                wrapper.lora_B.weight.copy_(pair["lora_B"])
        self.optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["torch_rng"])
        # the log keeps the steps up to the checkpoint; later lines (from the interrupted run) are dropped
        log = self.output / LOG_NAME
        kept = [line for line in (log.read_text().splitlines() if log.exists() else [])
                if line.strip() and json.loads(line)["step"] <= state["step"]]
        log.write_text("".join(line + "\n" for line in kept))
        return state["step"]


def _checkpointed(forward, *args, **kwargs):
    if not torch.is_grad_enabled():
        return forward(*args, **kwargs)
    return checkpoint(forward, *args, use_reentrant=False, **kwargs)


def _warmup_cosine(step: int, warmup: int, total: int) -> float:
    """Linear warm-up to the peak over `warmup` steps, then cosine decay to zero at `total` (transformers'
    get_cosine_schedule_with_warmup)."""
    if step < warmup:
        return step / max(1, warmup)
    progress = (step - warmup) / max(1, total - warmup)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))


class Progress:
    """One line on stderr, rewritten each step: step, loss, tokens/s, elapsed and ETA."""

    def __init__(self, total: int, enabled: bool = True):
        self.total, self.enabled, self.started = total, enabled, time.perf_counter()
        self.tty = sys.stderr.isatty()

    def update(self, step: int, loss: float, tokens_per_second: float) -> None:
        if not self.enabled:
            return
        elapsed = time.perf_counter() - self.started
        eta = elapsed / step * (self.total - step)
        width = 24
        filled = round(width * step / self.total)
        line = (f"[{'#' * filled}{'.' * (width - filled)}] step {step}/{self.total}  loss {loss:.4f}  "
                f"{tokens_per_second:.0f} tok/s  {_clock(elapsed)} elapsed  ETA {_clock(eta)}")
        sys.stderr.write(("\r" + line) if self.tty else line + "\n")
        sys.stderr.flush()

    def close(self) -> None:
        if self.enabled and self.tty:
            sys.stderr.write("\n")


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600 else \
        f"{seconds // 60}:{seconds % 60:02d}"
