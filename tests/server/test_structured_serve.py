"""Structured output and tools through `pyforge serve` (gunicorn workers, the engine
process, shared memory) with the official `openai` client as the test client."""
import json
from typing import Literal

import pytest

pytest.importorskip("openai")
pydantic = pytest.importorskip("pydantic")
jsonschema = pytest.importorskip("jsonschema")

from live_server import Server  # noqa: E402


@pytest.fixture(scope="module")
def server(model_path):
    s = Server(model_path)
    yield s
    assert s.stop() == 0
    s.assert_clean()


class Forecast(pydantic.BaseModel):
    city: str = pydantic.Field(max_length=8)     # bounded: a random-weight model must end its strings
    unit: Literal["celsius", "fahrenheit"]
    days: int = pydantic.Field(ge=1, le=7)
    windy: bool


MESSAGES = [{"role": "user", "content": "Forecast for Paris?"}]


def test_openai_parse_returns_the_pydantic_object(server):
    for seed in range(3):
        r = server.client.chat.completions.parse(model="tiny-gqa", messages=MESSAGES, response_format=Forecast,
                                                 max_tokens=150, temperature=1.0, seed=seed)
        parsed = r.choices[0].message.parsed
        assert isinstance(parsed, Forecast) and r.choices[0].finish_reason == "stop"
        assert Forecast.model_validate_json(r.choices[0].message.content) == parsed


def test_streamed_schema_output_over_the_ring(server):
    # what strict mode asks of a schema (the client's parse() adds it too): no other properties
    schema = {**Forecast.model_json_schema(), "additionalProperties": False}
    chunks = list(server.client.chat.completions.create(
        model="tiny-gqa", messages=MESSAGES, max_tokens=300, temperature=1.0, seed=9, stream=True, n=2,
        response_format={"type": "json_schema", "json_schema": {"name": "f", "schema": schema}}))
    texts, reasons = {0: "", 1: ""}, {}
    for ch in chunks:
        for c in ch.choices:
            texts[c.index] += c.delta.content or ""
            reasons[c.index] = c.finish_reason or reasons.get(c.index)
    assert reasons == {0: "stop", 1: "stop"}
    for text in texts.values():
        jsonschema.validate(json.loads(text), schema)


def test_an_invalid_schema_is_a_400_from_the_server(server):
    import openai
    with pytest.raises(openai.BadRequestError) as raised:
        server.client.chat.completions.create(
            model="tiny-gqa", messages=MESSAGES, max_tokens=10,
            response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": 5}}})
    assert raised.value.body["param"] == "response_format"


# -- tools through the openai client ------------------------------------------------

WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 10},
                                            "unit": {"enum": ["celsius", "fahrenheit"]}},
           "required": ["city", "unit"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Current weather",
                                           "parameters": WEATHER}},
         {"type": "function", "function": {"name": "get_time", "parameters": {
             "type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"],
             "additionalProperties": False}}}]


@pytest.fixture(scope="module")
def qwen_server(model_path, tmp_path_factory):
    """The random model behind Qwen2.5's tool-calling chat template (hermes tool calls)."""
    from conftest import SHARED
    template = json.loads((SHARED / "models" / "Qwen2.5-0.5B-Instruct" / "tokenizer_config.json").read_text())
    path = tmp_path_factory.mktemp("template") / "qwen2.5.jinja"
    path.write_text(template["chat_template"])
    s = Server(model_path, "--chat-template", str(path))
    yield s
    assert s.stop() == 0
    s.assert_clean()


@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "function": {"name": "get_weather"}}],
                         ids=["required", "named"])
def test_tool_calls_round_trip_with_the_openai_client(qwen_server, tool_choice):
    c = qwen_server.client
    r = c.chat.completions.create(model="tiny-gqa", messages=MESSAGES, tools=TOOLS, tool_choice=tool_choice,
                                  parallel_tool_calls=False, max_tokens=200, temperature=1.0, seed=3)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and len(choice.message.tool_calls) == 1
    call = choice.message.tool_calls[0]
    if isinstance(tool_choice, dict):
        assert call.function.name == "get_weather"
    schema = next(t["function"]["parameters"] for t in TOOLS if t["function"]["name"] == call.function.name)
    jsonschema.validate(json.loads(call.function.arguments), schema)

    stream = c.chat.completions.create(model="tiny-gqa", messages=MESSAGES, tools=TOOLS, tool_choice=tool_choice,
                                       parallel_tool_calls=False, max_tokens=200, temperature=1.0, seed=3,
                                       stream=True)
    name, arguments, reason = None, "", None
    for chunk in stream:
        for ch in chunk.choices:
            for piece in ch.delta.tool_calls or []:
                name = piece.function.name or name
                arguments += piece.function.arguments or ""
            reason = ch.finish_reason or reason
    assert (name, json.loads(arguments), reason) == (call.function.name, json.loads(call.function.arguments),
                                                      "tool_calls")

    second = c.chat.completions.create(
        model="tiny-gqa", tools=TOOLS, max_tokens=8, temperature=0.0,
        messages=[*MESSAGES, choice.message.model_dump(exclude_none=True),
                  {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 21}'}])
    assert second.choices[0].finish_reason in ("stop", "length", "tool_calls")
