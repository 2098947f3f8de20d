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
