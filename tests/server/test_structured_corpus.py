"""The structured-output corpora (tests/data/structured/, see tests/test_structured.py)
through the HTTP routes on a random-weight model: whatever tokens it picks, every
constrained answer must end ("stop") and be valid. JSON schemas go by chat
response_format and by the streamed completions json_schema field; regexes, choice
lists and GBNF / Lark grammars by their completions fields, every other entry
streamed. Every invalid constraint is a 400 naming its field."""
import json
import re

import pytest

from conftest import inprocess_app, sse_payloads
from structured_corpus import CHOICES, FAST_SCHEMAS, GRAMMARS, INVALID, REGEXES, assert_valid, names


pytest.importorskip("jsonschema")
pytest.importorskip("llguidance")

SAMPLING = {"max_tokens": 400, "temperature": 1.0, "seed": 7}
CHAT = [{"role": "user", "content": "Answer in JSON."}]
# invalid.json kind -> the request field that carries it
FIELDS = {"json_schema": "json_schema", "regex": "regex", "grammar_gbnf": "grammar", "grammar_lark": "grammar",
          "choice": "choice"}


@pytest.fixture(scope="module")
def app(model_path):
    # three answers of max_model_len tokens fit the KV cache at once
    with inprocess_app(model_path, max_model_len=1024, kv_cache_tokens=4096) as app:
        yield app


def post(app, path, body):
    r = app[0].simulate_post(path, json=body)
    assert r.status_code == 200, r.text
    return r


def complete(app, fields, n, stream):
    """(text, finish_reason) of each choice of a constrained /v1/completions answer."""
    r = post(app, "/v1/completions", {"prompt": "Answer:", "n": n, "stream": stream, **SAMPLING, **fields})
    if not stream:
        return [(c["text"], c["finish_reason"]) for c in sorted(r.json["choices"], key=lambda c: c["index"])]
    texts, reasons = [""] * n, [None] * n
    for chunk in sse_payloads(r.text):
        assert "error" not in chunk, chunk
        for c in chunk["choices"]:
            texts[c["index"]] += c["text"]
            reasons[c["index"]] = c["finish_reason"] or reasons[c["index"]]
    return list(zip(texts, reasons))


def assert_stopped(outputs, n, check):
    """n outputs, each ended by the grammar (not by max_tokens) and passing `check`."""
    assert len(outputs) == n
    for text, reason in outputs:
        assert reason == "stop", f"{reason}: {text!r}"
        check(text)


def every_other_streamed(entries):
    return [pytest.param(e, i % 2 == 1, id=e["name"]) for i, e in enumerate(entries)]


# -- JSON schemas ------------------------------------------------------------------
@pytest.mark.parametrize("entry", FAST_SCHEMAS, ids=names(FAST_SCHEMAS))
def test_schema_by_chat_response_format(app, entry):
    schema = entry["schema"]
    r = post(app, "/v1/chat/completions", {
        "messages": CHAT, "n": 2, **SAMPLING,
        "response_format": {"type": "json_schema", "json_schema": {"name": entry["name"], "schema": schema}}})
    outputs = [(c["message"]["content"], c["finish_reason"]) for c in r.json["choices"]]
    assert_stopped(outputs, 2, lambda text: assert_valid(schema, json.loads(text)))


@pytest.mark.parametrize("entry", FAST_SCHEMAS, ids=names(FAST_SCHEMAS))
def test_schema_by_streamed_completion(app, entry):
    schema = entry["schema"]
    outputs = complete(app, {"json_schema": schema}, n=2, stream=True)
    assert_stopped(outputs, 2, lambda text: assert_valid(schema, json.loads(text)))


# -- regexes, choices, grammars ----------------------------------------------------
def _fullmatch(pattern, text):
    assert re.fullmatch(pattern, text), repr(text)


def _one_of(choices, text):
    assert text in choices, repr(text)


@pytest.mark.parametrize("entry, stream", every_other_streamed(REGEXES))
def test_regex(app, entry, stream):
    outputs = complete(app, {"regex": entry["regex"]}, n=3, stream=stream)
    assert_stopped(outputs, 3, lambda text: _fullmatch(entry["regex"], text))


@pytest.mark.parametrize("entry, stream", every_other_streamed(CHOICES))
def test_choice(app, entry, stream):
    outputs = complete(app, {"choice": entry["choices"]}, n=3, stream=stream)
    assert_stopped(outputs, 3, lambda text: _one_of(entry["choices"], text))


@pytest.mark.parametrize("entry, stream", every_other_streamed(GRAMMARS))
def test_grammar(app, entry, stream):
    outputs = complete(app, {"grammar": entry["grammar"]}, n=3, stream=stream)
    assert_stopped(outputs, 3, lambda text: _fullmatch(entry["check_regex"], text))


# -- invalid constraints -------------------------------------------------------------
@pytest.mark.parametrize("entry", INVALID, ids=names(INVALID))
def test_invalid_is_a_400_naming_its_field(app, entry):
    field = FIELDS[entry["kind"]]
    r = app[0].simulate_post("/v1/completions", json={"prompt": "x", "max_tokens": 5, field: entry["value"]})
    assert r.status_code == 400, r.text
    assert r.json["error"]["param"] == field, r.json
    assert not app[1].has_work
