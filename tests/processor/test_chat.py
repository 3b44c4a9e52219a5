"""Chat rendering parity with transformers' apply_chat_template, the built-in Gemma 3n template against the documented
rule, and placeholder expansion against transformers' Gemma3nProcessor."""

from __future__ import annotations

import random

import jinja2
import numpy as np
import pytest

from gemma3n.processor import GEMMA3N_CHAT_TEMPLATE, expand_placeholders, render_chat, validate_messages

# Gemma 3 style (images as <start_of_image>), written without whitespace control so that transformers'
# trim_blocks / lstrip_blocks settings decide the output.
GEMMA3_STYLE_TEMPLATE = """{{ bos_token }}
{% if messages[0]['role'] == 'system' %}
    {% set prefix = messages[0]['content'] + '\n\n' %}
    {% set turns = messages[1:] %}
{% else %}
    {% set prefix = '' %}
    {% set turns = messages %}
{% endif %}
{% for message in turns %}
    {% if message['role'] == 'assistant' %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}{% endif %}
<start_of_turn>{{ role }}
{{ prefix if loop.first else '' }}{% if message['content'] is string %}{{ message['content'] | trim }}{% else %}
    {% for item in message['content'] %}
        {% if item['type'] == 'image' %}<start_of_image>{% endif %}
        {% if item['type'] == 'text' %}{{ item['text'] | trim }}{% endif %}
    {% endfor %}
{% endif %}<end_of_turn>
{% endfor %}
{% if add_generation_prompt %}
<start_of_turn>model
{% endif %}
"""

# The globals, filters and extensions transformers gives templates, and the data clean-up it applies to messages.
FEATURES_TEMPLATE = """{%- set ns = namespace(count=0) -%}
{%- for m in messages -%}
  {%- if m['role'] == 'system' -%}{%- continue -%}{%- endif -%}
  {%- set ns.count = ns.count + 1 -%}
  {{ ns.count }}|{{ m['role'] }}|{{ m['content'] | tojson }}|{{ 'name' in m }}
  |{{ m.get('thinking') }}|{{ m.get('reasoning_content') }}
  {%- if ns.count >= 4 -%}{%- break -%}{%- endif %}
{% endfor -%}
{{ dict(a=1, b=['<x> & "y"', 'é']) | tojson(indent=2) }}
{{ tools | tojson }}|{{ documents | tojson }}|{{ custom_var }}|{{ strftime_now('%Y') | length }}|{{ pad_token }}
{% generation %}GEN {{ eos_token }}{% endgeneration %}
{%- if add_generation_prompt %}<gen>{% endif -%}
"""

CONVERSATIONS = {
    "system_user": [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "  Hi there!  \n"}],
    "multi_turn": [
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "And {{ 3+3 }}? <start_of_turn>"},
    ],
    "list_content": [
        {"role": "system", "content": [{"type": "text", "text": "Describe media."}]},
        {"role": "user", "content": [
            {"type": "image", "image": np.zeros((4, 4, 3), np.uint8)},
            {"type": "text", "text": " What is this?\n"},
            {"type": "audio", "path": "clip.wav"},
            {"type": "text", "text": "and this"},
        ]},
        {"role": "assistant", "content": [{"type": "text", "text": "A cat. "}]},
        {"role": "user", "content": [{"type": "image", "url": "https://example.com/x.png"}]},
    ],
    "user_only": [{"role": "user", "content": "日本語 👩‍👩‍👧‍👦", "name": None}],
    "reasoning": [
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "a", "reasoning": "thought"},
        {"role": "user", "content": "q2"},
    ],
}
TEMPLATES = {"gemma3n": GEMMA3N_CHAT_TEMPLATE, "gemma3_style": GEMMA3_STYLE_TEMPLATE, "features": FEATURES_TEMPLATE}


def _system_text(system):
    return system["content"] if isinstance(system["content"], str) else system["content"][0]["text"]


def documented_gemma3n(messages, add_generation_prompt=True):
    """The Gemma 3n chat format as architecture.md 6.1 states it, in plain Python: the oracle for the built-in."""
    prefix, turns = "", list(messages)
    if turns[0]["role"] == "system":
        prefix, turns = _system_text(turns[0]) + "\n\n", turns[1:]
    out = "<bos>"
    for i, message in enumerate(turns):
        if (message["role"] == "user") != (i % 2 == 0):
            raise ValueError("roles must alternate")
        content = message["content"]
        if not isinstance(content, str):
            marks = {"image": "<image_soft_token>", "audio": "<audio_soft_token>"}
            content = "".join(p["text"].strip() if p["type"] == "text" else marks.get(p["type"], "") for p in content)
        role = "model" if message["role"] == "assistant" else message["role"]
        out += f"<start_of_turn>{role}\n{prefix if i == 0 else ''}{content.strip()}<end_of_turn>\n"
    return out + ("<start_of_turn>model\n" if add_generation_prompt else "")


def random_conversation(rng):
    words = ["hi", "  pad ", "\nnew\nlines\n", "日本", "😀", "{{ x }}", "{% raw %}", "<end_of_turn>", "\t", "é"]

    def text():
        return "".join(rng.choice(words) for _ in range(rng.randint(0, 4)))

    def content():
        if rng.random() < 0.5:
            return text()
        kinds = ["text", "image", "audio", "video"]
        return [{"type": k, "text": text()} if k == "text" else {"type": k, "url": "u"}
                for k in rng.choices(kinds, k=rng.randint(0, 4))]

    messages = []
    if rng.random() < 0.5:
        system = text() if rng.random() < 0.5 else [{"type": "text", "text": text()}]
        messages.append({"role": "system", "content": system})
    for i in range(rng.randint(1, 5)):
        messages.append({"role": "user" if i % 2 == 0 else "assistant", "content": content()})
    return messages


@pytest.mark.parametrize("template", sorted(TEMPLATES))
@pytest.mark.parametrize("conversation", sorted(CONVERSATIONS))
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_render_matches_transformers(hf_tokenizer, template, conversation, add_generation_prompt):
    messages, source = CONVERSATIONS[conversation], TEMPLATES[template]
    if template == "gemma3_style" and conversation == "list_content":
        messages = messages[1:]  # that template reads the system content as a string only
    extra = {k: v for k, v in hf_tokenizer.special_tokens_map.items() if k not in ("bos_token", "eos_token")}
    expected = hf_tokenizer.apply_chat_template(
        messages, chat_template=source, tokenize=False, add_generation_prompt=add_generation_prompt, custom_var="cv"
    )
    ours = render_chat(messages, source, add_generation_prompt, hf_tokenizer.bos_token, hf_tokenizer.eos_token,
                       custom_var="cv", **extra)
    assert ours == expected


def test_builtin_template_follows_documented_example():
    messages = [{"role": "system", "content": "S"},
                {"role": "user", "content": [{"type": "image", "image": "x.png"}, {"type": "text", "text": "Q"}]}]
    expected = "<bos><start_of_turn>user\nS\n\n<image_soft_token>Q<end_of_turn>\n<start_of_turn>model\n"
    assert render_chat(messages) == render_chat(messages, GEMMA3N_CHAT_TEMPLATE) == expected
    turns = [{"role": "user", "content": " a "}, {"role": "assistant", "content": "b"}]
    expected = "<bos><start_of_turn>user\na<end_of_turn>\n<start_of_turn>model\nb<end_of_turn>\n"
    assert render_chat(turns, add_generation_prompt=False) == expected


def test_builtin_template_equals_documented_rule_on_random_chats(hf_tokenizer):
    rng = random.Random(1234)
    for _ in range(150):
        messages = random_conversation(rng)
        generation = rng.random() < 0.5
        expected = documented_gemma3n(messages, generation)
        assert render_chat(messages, add_generation_prompt=generation) == expected, messages
    # and transformers renders the built-in identically on a sample (renderer parity, not just template behaviour)
    for _ in range(20):
        messages = random_conversation(rng)
        expected = hf_tokenizer.apply_chat_template(messages, chat_template=GEMMA3N_CHAT_TEMPLATE, tokenize=False,
                                                    add_generation_prompt=True)
        assert render_chat(messages) == expected


@pytest.mark.parametrize(
    "roles", [("user", "user"), ("assistant",), ("system", "assistant"), ("user", "assistant", "assistant")]
)
def test_bad_alternation_is_a_clear_error(hf_tokenizer, roles):
    messages = [{"role": role, "content": "x"} for role in roles]
    with pytest.raises(jinja2.TemplateError, match="alternate"):
        hf_tokenizer.apply_chat_template(messages, chat_template=GEMMA3N_CHAT_TEMPLATE, tokenize=False)
    with pytest.raises(ValueError, match="chat template rejected the messages: Conversation roles must alternate"):
        render_chat(messages)


@pytest.mark.parametrize("source", [
    "{{ namespace(_secret=1) }}",
    "{{ messages.__class__.__mro__ }}",
    "{{ raise_exception('custom failure') }}",
])
def test_template_errors_and_sandbox(hf_tokenizer, source):
    messages = [{"role": "user", "content": "x"}]
    with pytest.raises(jinja2.TemplateError):
        hf_tokenizer.apply_chat_template(messages, chat_template=source, tokenize=False)
    with pytest.raises(ValueError, match="chat template rejected the messages"):
        render_chat(messages, source)


def test_template_syntax_error():
    with pytest.raises(ValueError, match="not valid Jinja"):
        render_chat([{"role": "user", "content": "x"}], "{% for %}")


@pytest.mark.parametrize("messages, error, needle", [
    ("hello", TypeError, "must be a list of dicts"),
    ([], ValueError, "empty"),
    (["hello"], TypeError, "message 0 is a str"),
    ([{"role": "robot", "content": "x"}], ValueError, "unknown role 'robot'"),
    ([{"content": "x"}], ValueError, "unknown role None"),
    ([{"role": "user", "content": 5}], TypeError, "content must be a string or a list"),
    ([{"role": "user"}], TypeError, "content must be a string or a list"),
    ([{"role": "user", "content": [{"text": "x"}]}], ValueError, "part 0 must be a dict with 'type'"),
    ([{"role": "user", "content": [{"type": "pdf"}]}], ValueError, "part 0 must be a dict with 'type'"),
    ([{"role": "user", "content": [{"type": "text", "text": 3}]}], TypeError, "without a string 'text'"),
])
def test_message_validation(messages, error, needle):
    with pytest.raises(error, match=needle.replace("(", r"\(")):
        validate_messages(messages)
    with pytest.raises(error):
        render_chat(messages)


def test_assistant_tool_call_without_content_is_valid():
    validate_messages([{"role": "user", "content": "x"},
                       {"role": "assistant", "content": None, "tool_calls": [{"name": "f"}]}])


# ---- placeholder expansion --------------------------------------------------------------------------------------

IMAGE_RUN = "\n\n<start_of_image>" + "<image_soft_token>" * 256 + "<end_of_image>\n\n"
AUDIO_RUN = "\n\n<start_of_audio>" + "<audio_soft_token>" * 188 + "<end_of_audio>\n\n"


def test_expand_placeholders_follows_documented_rule():
    text = "a<image_soft_token>b<audio_soft_token><image_soft_token>c"
    assert expand_placeholders(text) == "a" + IMAGE_RUN + "b" + AUDIO_RUN + IMAGE_RUN + "c"
    assert expand_placeholders("no media") == "no media"
    small = expand_placeholders("<image_soft_token>", image_tokens=3)
    assert small == "\n\n<start_of_image>" + "<image_soft_token>" * 3 + "<end_of_image>\n\n"


def test_expand_placeholders_checks_counts():
    with pytest.raises(ValueError, match="has 2 <image_soft_token> placeholders but 1 image"):
        expand_placeholders("<image_soft_token><image_soft_token>", num_images=1)
    with pytest.raises(ValueError, match="has 0 <audio_soft_token> placeholders but 1 audio"):
        expand_placeholders("text", num_audios=1)


@pytest.fixture(scope="module")
def hf_processor(mm_tokenizers):
    from transformers import Gemma3nAudioFeatureExtractor, Gemma3nProcessor, SiglipImageProcessor

    # the preprocessor settings the official checkpoints carry (architecture.md 6.3); no download involved
    images = SiglipImageProcessor(size={"height": 768, "width": 768}, do_normalize=False)
    return Gemma3nProcessor(Gemma3nAudioFeatureExtractor(), images, mm_tokenizers[0])


def test_expanded_prompt_ids_match_gemma3n_processor(hf_processor, mm_tokenizers):
    _, ours = mm_tokenizers
    messages = [
        {"role": "system", "content": "Be precise."},
        {"role": "user", "content": [
            {"type": "image", "image": "a"}, {"type": "text", "text": "Compare with"}, {"type": "image", "image": "b"},
            {"type": "audio", "audio": "c"}, {"type": "text", "text": "and transcribe."},
        ]},
    ]
    prompt = render_chat(messages)
    rng = np.random.default_rng(0)
    pictures = [rng.integers(0, 255, (40, 60, 3), dtype=np.uint8), rng.integers(0, 255, (30, 30, 3), dtype=np.uint8)]
    clip = rng.standard_normal(16000).astype(np.float32)
    # the template already wrote <bos>, so no second one (architecture.md 6.2)
    reference = hf_processor(text=[prompt], images=[pictures], audio=[clip], add_special_tokens=False)
    expanded = expand_placeholders(prompt, num_images=2, num_audios=1)
    ids = ours.encode(expanded)
    assert ids == list(reference["input_ids"][0])
    assert ids.count(ours.token_to_id("<image_soft_token>")) == 512
    assert ids.count(ours.token_to_id("<audio_soft_token>")) == 188
    assert ids[0] == ours.bos_id and ids.count(ours.bos_id) == 1
    assert ours.decode(ids) == expanded


def test_processor_and_expansion_reject_the_same_count_mismatch(hf_processor):
    prompt = render_chat([{"role": "user", "content": [{"type": "image"}, {"type": "image"}]}])
    picture = np.zeros((8, 8, 3), np.uint8)
    with pytest.raises(ValueError):
        hf_processor(text=[prompt], images=[[picture]], add_special_tokens=False)
    with pytest.raises(ValueError, match="2 <image_soft_token> placeholders but 1 image"):
        expand_placeholders(prompt, num_images=1)
