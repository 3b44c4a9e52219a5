"""Constrained decoding in the engine and the Python API, on a tiny random checkpoint: the grammar decides which
tokens may come, the model's raw distribution still decides among them (and is what logprobs report), the row ends
the moment the grammar is complete, and compiled grammars are cached."""
from __future__ import annotations

import json
import re

import pytest
import torch

jsonschema = pytest.importorskip("jsonschema", reason="the structured-output tests validate with jsonschema")
pytest.importorskip("llguidance", reason="structured output needs the 'structured' extra (llguidance)")

import gemma3n  # noqa: E402
from gemma3n.engine.batch import ContinuousBatch  # noqa: E402
from gemma3n.structured import GrammarCompiler, GrammarError  # noqa: E402

from ..console import gemma3n as run_console  # noqa: E402
from ..reference.tiny import build_reference  # noqa: E402

SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 6},
                                           "size": {"enum": ["S", "M", "L"]},
                                           "legs": {"type": "integer", "minimum": 0, "maximum": 8}},
          "required": ["name", "size", "legs"], "additionalProperties": False}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from ..server.conftest import write_tokenizer
    folder = tmp_path_factory.mktemp("tiny_structured")
    build_reference("mixed", seed=5).save_pretrained(folder)
    write_tokenizer(folder)
    return folder


@pytest.fixture(scope="module")
def model(checkpoint):
    """A 64-wide model gains nothing from intra-op threads; one thread for this module, restored afterwards (the
    setting is process-wide and would otherwise slow every later test)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield gemma3n.load(checkpoint)
    torch.set_num_threads(before)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_json_schema_output_validates_and_ends_when_complete(model, seed):
    result = model.complete("An animal:", max_new_tokens=120, temperature=1.0, seed=seed, json_schema=SCHEMA)
    jsonschema.validate(json.loads(result.text), SCHEMA)
    assert result.finish_reason == "stop"
    # no stop token was needed: the last token completed the grammar and the row ended without another forward
    assert result.new_tokens == len(result.token_ids)


def test_regex_stream_and_response_format(model):
    pieces = list(model.stream("Code:", max_new_tokens=40, temperature=1.0, seed=4, regex=r"[A-Z]{3}-[0-9]{2}"))
    assert re.fullmatch(r"[A-Z]{3}-[0-9]{2}", "".join(pieces))
    text = model.generate("x", max_new_tokens=60, temperature=1.0, seed=5, response_format={
        "type": "json_schema", "json_schema": {"name": "a", "schema": SCHEMA}})
    jsonschema.validate(json.loads(text), SCHEMA)
    assert model.generate("x", max_new_tokens=30, temperature=0, response_format={"type": "text"}) == \
        model.generate("x", max_new_tokens=30, temperature=0)
    with pytest.raises(GrammarError, match="not json_schema and regex"):
        model.generate("x", json_schema=SCHEMA, regex="a")


def test_greedy_picks_the_models_best_allowed_token_and_logprobs_stay_raw(model):
    ids = model.encode_prompt("pick one")
    grammar = model.constraint(regex=r"(cat|dog|emu)")
    batch = ContinuousBatch(model.decoder)
    seq = batch.add(ids, model.sampling_params(max_new_tokens=8, temperature=0, logprobs=0, constraint=grammar),
                    model.stop_ids())
    while len(batch):
        batch.step()
    assert model.tokenizer.decode(seq.new_ids) in ("cat", "dog", "emu")
    logits = model.logits(torch.cat((ids, torch.tensor([seq.new_ids[:-1]])), dim=1))[0, ids.shape[1] - 1:]
    raw = torch.log_softmax(logits.float(), dim=-1)
    state = grammar.start()
    for step, token in enumerate(seq.new_ids):
        allowed = state.logit_bias(model.stop_ids()) == 0
        best = int(torch.where(allowed, logits[step], float("-inf")).argmax())
        assert token == best  # the model's own choice among what the grammar allows
        assert seq.logprobs[step].logprob == pytest.approx(float(raw[step, token]), abs=1e-4)  # before the mask
        state.advance(token)
    assert seq.finish_reason == "stop" and seq.stop_token is None


def test_compiled_grammars_are_cached_and_evicted_least_recently_used(model):
    compiler = GrammarCompiler(model.tokenizer, model.config.text.vocab_size, cache_size=2)
    first = compiler.json_schema(SCHEMA)
    assert compiler.json_schema(json.dumps(SCHEMA)) is first and compiler.compiled == 1  # same text: no compile
    compiler.regex("a+")
    compiler.json_schema(SCHEMA)  # recently used again
    compiler.regex("b+")  # evicts "a+", the least recently used
    assert compiler.compiled == 3
    compiler.json_schema(SCHEMA)
    assert compiler.compiled == 3
    compiler.regex("a+")
    assert compiler.compiled == 4
    # each row gets its own state: two rows of one grammar do not disturb each other
    one, two = first.start(), first.start()
    token = int(torch.nonzero(one.logit_bias(set()) == 0)[0])
    one.advance(token)
    assert not torch.equal(one.logit_bias(set()) == 0, two.logit_bias(set()) == 0)


def test_run_json_schema_through_the_console_script(checkpoint, tmp_path):
    schema_file = tmp_path / "animal.json"
    schema_file.write_text(json.dumps(SCHEMA))
    done = run_console("run", "--model", str(checkpoint), "--json-schema", str(schema_file), "--seed", "3",
                       "--temperature", "1", "-n", "120", "--quiet", "Describe an animal as JSON.", timeout=300)
    assert done.returncode == 0, done.stderr
    jsonschema.validate(json.loads(done.stdout), SCHEMA)
    done = run_console("run", "--model", str(checkpoint), "--regex", "(yes|no)", "--quiet", "Well?", timeout=300)
    assert done.returncode == 0 and done.stdout.strip() in ("yes", "no"), done.stderr
    schema_file.write_text(json.dumps({"type": "array", "uniqueItems": True}))
    done = run_console("run", "--model", str(checkpoint), "--json-schema", str(schema_file), "x", timeout=300)
    assert done.returncode != 0 and "uniqueItems" in done.stderr
