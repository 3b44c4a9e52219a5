"""Tokenizer parity with transformers on the real Gemma 3 270M vocabulary, from tokenizer.json and from the GGUF."""

from __future__ import annotations

import json
import random

import gguf
import pytest
from gguf import GGUFReader
from transformers import AutoTokenizer

from gemma3n.processor import Tokenizer, read_gguf_metadata

from .conftest import TINY_TEMPLATE

TEXTS = [
    "",
    "Hello world",
    "Hello, world! How's it going? 3.14159 1,000,000 2024-01-01T12:00:00Z",
    " leading space",
    "   three leading spaces and trailing   ",
    "a\t\tb\n\n\nc    d\r\ne",
    " " * 40 + "x" + "\t" * 40 + "y" + "\n" * 40 + "z",
    " \n \t \r\n\t \u00a0 \u3000 end",
    "日本語のテキストを分割します。中文句子，标点。한국어 문장입니다.",
    "مرحبا بالعالم، كيف حالك؟ שלום עולם",
    "नमस्ते दुनिया, क्या हाल है? สวัสดีชาวโลก",
    "Привет, мир! Ελληνικά γράμματα.",
    "👩‍👩‍👧‍👦 🏳️‍🌈 👍🏽 1️⃣ 🇯🇵 😀😃😄",
    "def f(x):\n    return x ** 2  # square\n\nprint({'a': [1, 2]}, std::vector<int>{})",
    '{"key": "value", "list": [1, 2, 3], "nested": {"t": true}}',
    "<table><tr><td>cell</td></tr></table> <b>bold</b> <h1>x</h1>",
    "<start_of_turn>user\nHi there<end_of_turn>\n<start_of_turn>model\n",
    "<bos><eos><pad><mask><unk><unused0><unused6241>[multimodal]",
    "<start_of_image><end_of_image> <start_of_turn <<start_of_turn>> </start_of_turn>",
    "\x00\x01\x7f \ue000 \u0378 \U0010ffff \U00010380\U00010381 \U00013000",
    "Z\u0324\u0354\u0367\u0311\u0313a\u0308\u0356\u032d\u0308\u0307l",
    "e\u0301 vs \u00e9, \uff21\uff22\uff23, \ufb01, \u2126",
    "\u2581\u2581 literal sentencepiece spaces \u2581",
    "The quick brown fox jumps over the lazy dog. " * 100,
]

# A pool for random strings: every script and whitespace kind above, plus specials that must stay whole
_POOL = list("abcXYZ019 .,;:!?'\"()[]{}<>/\\\t\n\r_-+=*&^%$#@~`|") + list("日本語中文한국어مرحباनमस्तेПриветΩ") + [
    "👩‍👩‍👧‍👦", "🏳️‍🌈", "\u2581", "\x00", "\ue000", "\U00013000", "<start_of_turn>", "<end_of_turn>", "<bos>",
    "<table>", "  ", "\n\n", "\t\t", "é", "e\u0301", "<image_soft_token>", "<start_of_audio>",
]
MM_TEXTS = ["<image_soft_token>x<audio_soft_token>", "\n\n<start_of_audio><audio_soft_token><end_of_audio>\n\n"]
RANDOM_TEXTS = ["".join(random.Random(seed).choices(_POOL, k=1 + seed % 60)) for seed in range(300)]


@pytest.fixture(scope="module", params=["from_gguf", "from_file"])
def pair(request, ours_gguf, hf_tokenizer, mm_tokenizers):
    """(ours, transformers reference): the 270M GGUF as transformers converts it, and a Hugging Face folder saved
    by transformers (270M vocabulary + the Gemma 3n image / audio tokens) loaded through from_pretrained_dir."""
    if request.param == "from_gguf":
        return ours_gguf, hf_tokenizer
    reference, ours = mm_tokenizers
    return ours, reference


def test_encode_matches_transformers(pair):
    ours, hf_tokenizer = pair
    for text in TEXTS + MM_TEXTS + RANDOM_TEXTS:
        assert ours.encode(text) == hf_tokenizer(text, add_special_tokens=False).input_ids, repr(text)


def test_add_special_tokens_prepends_bos_like_transformers(pair):
    ours, hf_tokenizer = pair
    for text in TEXTS[:6]:
        ids = ours.encode(text, add_special_tokens=True)
        assert ids == hf_tokenizer(text).input_ids
        assert ids[0] == ours.bos_id == 2


def test_special_tokens_in_text_are_single_ids(pair):
    ours, _ = pair
    ids = ours.encode("<start_of_turn>user\nhi<end_of_turn>")
    assert ids[0] == 105 and ids[-1] == 106 and ours.token_to_id("<start_of_turn>") == 105
    assert ours.encode("<start_of_image>") == [255999]


def test_multimodal_tokens_are_single_ids_when_the_vocabulary_has_them(mm_tokenizers):
    reference, ours = mm_tokenizers
    for token in ["<image_soft_token>", "<audio_soft_token>", "<start_of_audio>", "<end_of_audio>"]:
        assert ours.encode(token) == [reference.convert_tokens_to_ids(token)] and ours.token_to_id(token) >= 262144
        assert ours.token_to_id(token) in ours.special_ids


def test_decode_matches_transformers(pair):
    ours, hf_tokenizer = pair
    for text in TEXTS + RANDOM_TEXTS[:100]:
        ids = hf_tokenizer(text, add_special_tokens=False).input_ids
        assert ours.decode(ids) == hf_tokenizer.decode(ids), repr(text)
        assert ours.decode(ids, skip_special_tokens=True) == hf_tokenizer.decode(ids, skip_special_tokens=True)
        if "\u2581" not in text:  # a literal "▁" decodes as a space, in transformers too
            assert ours.decode(ours.encode(text)) == text  # byte fallback makes every other text round-trip


def test_decode_arbitrary_ids_matches_transformers(pair):
    ours, hf_tokenizer = pair
    # random ids hit byte tokens mid-sequence (invalid UTF-8), control tokens and whitespace runs
    rng = random.Random(0)
    for _ in range(200):
        ids = [rng.choice([rng.randrange(262144), rng.randrange(238, 494), rng.randrange(0, 256)]) for _ in range(12)]
        assert ours.decode(ids) == hf_tokenizer.decode(ids), ids
        assert ours.decode(ids, skip_special_tokens=True) == hf_tokenizer.decode(ids, skip_special_tokens=True)


def test_decode_accepts_tensors_and_rejects_bad_ids(ours_gguf):
    ours = ours_gguf
    torch = pytest.importorskip("torch")
    assert ours.decode(torch.tensor([9259, 1902])) == ours.decode([9259, 1902])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        ours.decode([5, ours.vocab_size])
    with pytest.raises(TypeError, match="takes a str"):
        ours.encode(["not", "a", "string"])
    with pytest.raises(TypeError, match="unexpected keyword argument"):
        Tokenizer.from_file(__file__, bos_tokn="<bos>")


def test_vocabulary_properties_match_transformers(pair):
    ours, hf_tokenizer = pair
    assert (ours.bos_id, ours.eos_id, ours.pad_id) == (2, 1, 0)
    assert ours.vocab_size == len(hf_tokenizer) >= 262144
    reference_special = {i for i, tok in hf_tokenizer.added_tokens_decoder.items() if tok.special}
    assert ours.special_ids == reference_special
    assert {0, 1, 2, 3, 4, 105, 106} <= ours.special_ids
    for token in ["<start_of_turn>", "\u2581\u2581", "\n\n", "<0x0A>", "\u2581the", "<table>", "<unused99>"]:
        assert ours.token_to_id(token) == hf_tokenizer.convert_tokens_to_ids(token), token
    for token_id in [0, 2, 105, 138, 238, 255968, 262143]:
        assert ours.id_to_token(token_id) == hf_tokenizer.convert_ids_to_tokens(token_id)
    assert ours.token_to_id("certainly-not-a-token") is None  # transformers answers unk (3) here instead


def test_270m_has_no_chat_template(ours_gguf, mm_tokenizers, hf_tokenizer):
    assert ours_gguf.chat_template is None and mm_tokenizers[1].chat_template is None
    assert hf_tokenizer.chat_template is None


def test_gguf_reader_and_path_agree_with_transformers_on_tiny_vocab(tiny_gguf):
    by_path, by_reader = Tokenizer.from_gguf(tiny_gguf), Tokenizer.from_gguf(GGUFReader(str(tiny_gguf)))
    reference = AutoTokenizer.from_pretrained(str(tiny_gguf.parent), gguf_file=tiny_gguf.name)
    for text in ["hello world", "  hello\n\n<b>", "<start_of_turn>hello<end_of_turn>", "é€ world  ", ""]:
        expected = reference(text).input_ids  # the file says add_bos_token=False: no BOS even when asked
        assert by_path.encode(text, True) == by_reader.encode(text, True) == expected, repr(text)
        assert by_path.decode(expected) == reference.decode(expected)
    assert by_path.chat_template == by_reader.chat_template == reference.chat_template == TINY_TEMPLATE
    assert by_path.special_ids == by_reader.special_ids == {0, 1, 2, 3, 4, 5, 6}


def test_read_gguf_metadata(gguf_path):
    meta = read_gguf_metadata(gguf_path)
    assert meta["general.architecture"] == "gemma3"
    assert len(meta["tokenizer.ggml.tokens"]) == 262144 and meta["tokenizer.ggml.tokens"][105] == "<start_of_turn>"
    assert meta["tokenizer.ggml.add_bos_token"] is True and meta["tokenizer.ggml.bos_token_id"] == 2


# ---- folders and chat templates ---------------------------------------------------------------------------------


@pytest.fixture
def tiny_folder(tiny_gguf, tmp_path):
    Tokenizer.from_gguf(tiny_gguf).backend.save(str(tmp_path / "tokenizer.json"))
    return tmp_path


@pytest.mark.parametrize("layout", ["config", "config_list", "jinja_wins", "legacy_json", "none"])
def test_chat_template_discovery_matches_transformers(tiny_folder, layout):
    config = {"tokenizer_class": "GemmaTokenizer"}
    if layout in ("config", "jinja_wins", "legacy_json"):
        config["chat_template"] = "from config"
    if layout == "config_list":
        config["chat_template"] = [{"name": "default", "template": "listed default"}]
    if layout == "jinja_wins":
        (tiny_folder / "chat_template.jinja").write_text("from jinja file")
    (tiny_folder / "tokenizer_config.json").write_text(json.dumps(config))
    ours = Tokenizer.from_pretrained_dir(tiny_folder)
    reference = AutoTokenizer.from_pretrained(str(tiny_folder))
    # transformers keeps the legacy list form as a dict and renders its "default" entry; we keep that entry
    assert ours.chat_template == (reference.get_chat_template() if reference.chat_template else None)
    if layout == "legacy_json":  # a processor's chat_template.json, which the tokenizer itself ignores
        (tiny_folder / "chat_template.json").write_text(json.dumps({"chat_template": "from processor json"}))
        assert Tokenizer.from_pretrained_dir(tiny_folder).chat_template == "from processor json"


def test_special_token_names_from_config(tiny_folder):
    config = {"bos_token": {"content": "<bos>", "special": True}, "pad_token": "<mask>"}
    (tiny_folder / "tokenizer_config.json").write_text(json.dumps(config))
    legacy = {"pad_token": "<unk>", "eos_token": "<end_of_turn>"}
    (tiny_folder / "special_tokens_map.json").write_text(json.dumps(legacy))
    tok = Tokenizer.from_pretrained_dir(tiny_folder)
    assert (tok.bos_id, tok.pad_id, tok.eos_id) == (2, 4, 6)  # config beats special_tokens_map
    assert tok.special_tokens_map == {"bos_token": "<bos>", "eos_token": "<end_of_turn>", "pad_token": "<mask>"}


# ---- errors -----------------------------------------------------------------------------------------------------


def _one_line(excinfo, *needles):
    message = str(excinfo.value)
    assert "\n" not in message
    for needle in needles:
        assert str(needle) in message


def test_missing_files_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        Tokenizer.from_file(tmp_path / "tokenizer.json")
    _one_line(err, tmp_path / "tokenizer.json")
    with pytest.raises(FileNotFoundError) as err:
        Tokenizer.from_pretrained_dir(tmp_path)
    _one_line(err, "tokenizer.json", tmp_path)
    with pytest.raises(FileNotFoundError) as err:
        Tokenizer.from_gguf(tmp_path / "model.gguf")
    _one_line(err, tmp_path / "model.gguf")


def test_corrupt_tokenizer_files(tmp_path, tiny_folder):
    bad = tmp_path / "bad.json"
    bad.write_text('{"version": "1.0", "model": {"type": "BPE", "vocab": ')
    with pytest.raises(ValueError) as err:
        Tokenizer.from_file(bad)
    _one_line(err, bad, "not a valid tokenizer.json")
    (tiny_folder / "tokenizer_config.json").write_text("{oops")
    with pytest.raises(ValueError) as err:
        Tokenizer.from_pretrained_dir(tiny_folder)
    _one_line(err, tiny_folder / "tokenizer_config.json")


def test_corrupt_gguf_files(tmp_path, gguf_path, tiny_gguf):
    not_gguf = tmp_path / "x.gguf"
    not_gguf.write_bytes(b"PK\x03\x04" + bytes(100))
    with pytest.raises(ValueError) as err:
        Tokenizer.from_gguf(not_gguf)
    _one_line(err, not_gguf, "not a GGUF file")
    truncated = tmp_path / "truncated.gguf"
    with open(gguf_path, "rb") as src:  # cut inside the 262k-token vocabulary
        truncated.write_bytes(src.read(1 << 20))
    with pytest.raises(ValueError) as err:
        Tokenizer.from_gguf(truncated)
    _one_line(err, truncated, "truncated or corrupt")
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match="too short"):
        Tokenizer.from_gguf(empty)


@pytest.mark.parametrize("arch, model, types, needle", [
    ("llama", "llama", None, "not supported"),
    ("gemma3", "gpt2", None, "not supported"),
    ("gemma3", None, None, "no tokenizer vocabulary"),
    ("gemma3", "llama", [3], "1 token types for 2 tokens"),
])
def test_gguf_without_a_usable_gemma_vocabulary(tmp_path, arch, model, types, needle):
    path = tmp_path / "model.gguf"
    writer = gguf.GGUFWriter(str(path), arch)
    if model:
        writer.add_tokenizer_model(model)
        writer.add_token_list(["<pad>", "a"])
    if types:
        writer.add_token_types(types)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError) as err:
        Tokenizer.from_gguf(path)
    _one_line(err, path, needle)
    with pytest.raises(ValueError) as err:  # the same checks through an open GGUFReader
        Tokenizer.from_gguf(GGUFReader(str(path)))
    _one_line(err, path, needle)

