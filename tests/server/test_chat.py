"""The chat route's tools and reasoning (pyforge/server/chat.py): tool calls enforced by
grammar on a random-weight model (arguments validate whatever the weights), in the
model's native format (Qwen2.5's template: hermes) and the generic one (a template
without tools); streamed deltas rebuild the same calls; history with tool calls
renders; bad tool requests are 400s; reasoning and tool calls split alike whole and
streamed."""
import json

import pytest

from conftest import SHARED, inprocess_app, sse_payloads
from pyforge.server.chat import ChatReply
from pyforge.server.reasoning import Thinking
from pyforge.server.tools import FORMATS

jsonschema = pytest.importorskip("jsonschema")

WEATHER = {"type": "object", "properties": {
    "city": {"type": "string", "maxLength": 10},
    "unit": {"enum": ["celsius", "fahrenheit"]}}, "required": ["city", "unit"], "additionalProperties": False}
CLOCK = {"type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"],
         "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather now", "parameters": WEATHER}},
         {"type": "function", "function": {"name": "get_time", "parameters": CLOCK}}]
SCHEMAS = {"get_weather": WEATHER, "get_time": CLOCK}
ASK = [{"role": "user", "content": "Weather in Paris?"}]
QWEN_TEMPLATE = json.loads((SHARED / "models" / "Qwen2.5-0.5B-Instruct" / "tokenizer_config.json")
                           .read_text())["chat_template"]


@pytest.fixture(scope="module", params=["hermes", "generic"])
def app(request, model_path):
    """hermes: Qwen2.5's tool template over the random model; generic: its own template (no tools)."""
    config = {"chat_template": QWEN_TEMPLATE} if request.param == "hermes" else {}
    with inprocess_app(model_path, max_model_len=1024, **config) as (client, engine):
        yield client, engine, request.param


def post(app, body):
    return app[0].simulate_post("/v1/chat/completions", json={"messages": ASK, "max_tokens": 300,
                                                              "temperature": 1.0, **body})


def assert_valid_calls(calls, names=SCHEMAS):
    assert calls
    for call in calls:
        assert call["type"] == "function" and call["id"].startswith("call_") and call["function"]["name"] in names
        jsonschema.validate(json.loads(call["function"]["arguments"]), SCHEMAS[call["function"]["name"]])


def streamed_calls(result):
    """(content, calls rebuilt from delta.tool_calls, finish_reason) of an SSE reply."""
    content, calls, reason = "", {}, None
    for chunk in sse_payloads(result.text):
        for choice in chunk["choices"]:
            delta = choice["delta"]
            content += delta.get("content") or ""
            for piece in delta.get("tool_calls") or []:
                call = calls.setdefault(piece["index"], {"function": {"arguments": ""}})
                if "id" in piece:       # the first piece: id, type and name
                    call.update(id=piece["id"], type=piece["type"])
                    call["function"]["name"] = piece["function"]["name"]
                call["function"]["arguments"] += piece["function"]["arguments"]
            reason = choice["finish_reason"] or reason
    return content, [calls[i] for i in sorted(calls)], reason


@pytest.mark.parametrize("seed", range(3))
def test_required_tool_calls_validate(app, seed):
    r = post(app, {"tools": TOOLS, "tool_choice": "required", "parallel_tool_calls": False, "seed": seed, "n": 2})
    assert r.status_code == 200, r.text
    for choice in r.json["choices"]:
        assert choice["finish_reason"] == "tool_calls", choice
        assert_valid_calls(choice["message"]["tool_calls"])


def test_parallel_calls_are_each_valid(app):
    """A random model rarely stops calling: every call it finished is valid, and a
    call cut short by max_tokens is never passed off as a call."""
    r = post(app, {"tools": TOOLS, "tool_choice": "required", "seed": 5, "n": 2, "max_tokens": 400})
    for choice in r.json["choices"]:
        assert choice["finish_reason"] in ("tool_calls", "length")
        assert_valid_calls(choice["message"]["tool_calls"])


def test_a_named_function_is_the_one_called_once(app):
    r = post(app, {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "get_time"}}, "seed": 4})
    calls = r.json["choices"][0]["message"]["tool_calls"]
    assert len(calls) == 1 and calls[0]["function"]["name"] == "get_time"
    assert_valid_calls(calls, {"get_time"})


def test_parallel_tool_calls_false_gives_one_call(app):
    for seed in range(3):
        r = post(app, {"tools": TOOLS, "tool_choice": "required", "parallel_tool_calls": False, "seed": seed})
        assert len(r.json["choices"][0]["message"]["tool_calls"]) == 1


@pytest.mark.parametrize("seed", range(3))
def test_streamed_tool_calls_rebuild_the_same_calls(app, seed):
    body = {"tools": TOOLS, "tool_choice": "required", "seed": seed, "temperature": 1.0, "parallel_tool_calls": False}
    whole = post(app, body).json["choices"][0]
    content, calls, reason = streamed_calls(post(app, {**body, "stream": True}))
    assert reason == whole["finish_reason"] == "tool_calls"
    assert (content or None) == whole["message"]["content"]
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == \
        [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in whole["message"]["tool_calls"]]
    assert_valid_calls(calls)


def test_auto_leaves_text_free_and_calls_well_formed(app):
    for seed in range(4):
        choice = post(app, {"tools": TOOLS, "tool_choice": "auto", "seed": seed, "max_tokens": 60}).json["choices"][0]
        if choice["message"].get("tool_calls"):
            assert_valid_calls(choice["message"]["tool_calls"])
        else:
            assert choice["finish_reason"] in ("stop", "length")


def test_a_second_turn_with_the_tool_result_renders(app):
    first = post(app, {"tools": TOOLS, "tool_choice": "required", "seed": 1, "parallel_tool_calls": False}) \
        .json["choices"][0]["message"]
    history = [*ASK, {"role": "assistant", "content": None, "tool_calls": first["tool_calls"]},
               {"role": "tool", "tool_call_id": first["tool_calls"][0]["id"], "content": "21 degrees"}]
    r = app[0].simulate_post("/v1/chat/completions", json={"messages": history, "tools": TOOLS, "max_tokens": 5})
    assert r.status_code == 200, r.text
    prompt_tokens = r.json["usage"]["prompt_tokens"]
    r2 = app[0].simulate_post("/v1/chat/completions", json={"messages": ASK, "tools": TOOLS, "max_tokens": 5})
    assert prompt_tokens > r2.json["usage"]["prompt_tokens"]     # the call and its result are in the prompt


@pytest.mark.parametrize("body, param", [
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools[0].function.name"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice"),
    ({"tools": TOOLS, "response_format": {"type": "json_object"}}, "tools"),
    ({"tools": "get_weather"}, "tools"),
    ({"tools": TOOLS, "parallel_tool_calls": "yes"}, "parallel_tool_calls"),
])
def test_bad_tool_requests_are_400(app, body, param):
    r = post(app, body)
    assert r.status_code == 400 and r.json["error"]["param"] == param, r.text


# -- reply shaping, whole and streamed -------------------------------------------------

OUTPUTS = [   # (prompt, format, output)
    ("<|im_start|>assistant\n", "hermes",
     '<think>\nThey want weather.\n</think>\n\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", '
     '"unit": "celsius"}}\n</tool_call>'),
    ("<|im_start|>assistant\n", "hermes", "<think>short</think>Just text, {no call}."),
    ("x<think>\n", "generic", 'Plan.</think>{"tool_calls": [{"name": "get_time", "arguments": {"zone": "UTC"}}]}'),
    ("<|im_start|>assistant\n", "mistral", '[TOOL_CALLS][{"name": "get_time", "arguments": {"zone": "CET"}}]'),
]


@pytest.mark.parametrize("prompt, fmt, output", OUTPUTS)
def test_reasoning_and_tool_calls_split_alike_whole_and_streamed(prompt, fmt, output):
    reply = ChatReply(Thinking(prompt), FORMATS[fmt])
    message, reason = reply.message(output, "stop")
    for size in (1, 3, 7, len(output)):
        stream, deltas = reply.stream(), []
        for i in range(0, len(output), size):
            deltas.append(stream.feed(output[i:i + size]))
        last, streamed_reason = stream.finish("stop")
        deltas.append(last)
        assert streamed_reason == reason
        assert "".join(d.get("reasoning_content", "") for d in deltas) == (message.get("reasoning_content") or "")
        assert "".join(d.get("content", "") for d in deltas) == (message["content"] or "")
        names = [c["function"]["name"] for d in deltas for c in d.get("tool_calls", []) if "id" in c]
        assert names == [c["function"]["name"] for c in message.get("tool_calls", [])]
