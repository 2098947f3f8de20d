"""The tool fields of a chat request: OpenAI shapes accepted, each malformed value a 400 naming its param."""
import pytest

from pyforge.server.errors import APIError, status_code
from pyforge.server.tools import Tool, ToolChoice, parse_tool_request

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    "strict": True}}
PING = {"type": "function", "function": {"name": "ping"}}


def fn(**fields):
    return {"type": "function", "function": {"name": "f", **fields}}


def test_tools_with_defaults():
    tools, choice, parallel = parse_tool_request({"tools": [WEATHER, PING]})
    assert tools == [Tool("get_weather", "Current weather", WEATHER["function"]["parameters"]),
                     Tool("ping", None, {"type": "object", "properties": {}})]
    assert choice == ToolChoice("auto") and parallel is True


@pytest.mark.parametrize("value,expected", [
    ("none", ToolChoice("none")), ("auto", ToolChoice("auto")), ("required", ToolChoice("required")),
    ({"type": "function", "function": {"name": "ping"}}, ToolChoice("function", "ping")), (None, ToolChoice("auto")),
])
def test_tool_choice(value, expected):
    _, choice, _ = parse_tool_request({"tools": [WEATHER, PING], "tool_choice": value, "parallel_tool_calls": False})
    assert choice == expected


@pytest.mark.parametrize("body", [{}, {"tools": None}, {"tools": []}, {"tool_choice": "none"},
                                  {"tools": [], "tool_choice": None}, {"tool_choice": "auto"},
                                  {"parallel_tool_calls": False}, {"messages": [], "model": "m"}])
def test_no_tools_is_none(body):
    assert parse_tool_request(body) is None


def test_parallel_flag():
    assert parse_tool_request({"tools": [PING], "parallel_tool_calls": False})[2] is False
    assert parse_tool_request({"tools": [PING], "parallel_tool_calls": None})[2] is True


@pytest.mark.parametrize("body,param", [
    ({"tools": {"a": 1}}, "tools"),
    ({"tools": "get_weather"}, "tools"),
    ({"tools": [{"type": "code_interpreter"}]}, "tools[0].type"),
    ({"tools": [PING, {"function": {"name": "x"}}]}, "tools[1].type"),
    ({"tools": ["ping"]}, "tools[0].type"),
    ({"tools": [{"type": "function"}]}, "tools[0].function"),
    ({"tools": [{"type": "function", "function": "ping"}]}, "tools[0].function"),
    ({"tools": [{"type": "function", "function": {}}]}, "tools[0].function.name"),
    ({"tools": [{"type": "function", "function": {"name": 7}}]}, "tools[0].function.name"),
    ({"tools": [{"type": "function", "function": {"name": "get weather"}}]}, "tools[0].function.name"),
    ({"tools": [{"type": "function", "function": {"name": "x" * 65}}]}, "tools[0].function.name"),
    ({"tools": [{"type": "function", "function": {"name": ""}}]}, "tools[0].function.name"),
    ({"tools": [{"type": "function", "function": {"name": "tëst"}}]}, "tools[0].function.name"),
    ({"tools": [PING, WEATHER, PING]}, "tools[2].function.name"),
    ({"tools": [fn(parameters="{}")]}, "tools[0].function.parameters"),
    ({"tools": [fn(parameters=[])]}, "tools[0].function.parameters"),
    ({"tools": [fn(parameters={"type": "objekt"})]}, "tools[0].function.parameters"),
    ({"tools": [fn(parameters={"type": "object", "required": "city"})]}, "tools[0].function.parameters"),
    ({"tools": [fn(parameters={"type": "object", "properties": {"a": {"minimum": "1"}}})]},
     "tools[0].function.parameters"),
    ({"tools": [fn(parameters={"type": "string"})]}, "tools[0].function.parameters"),
    ({"tools": [fn(description=3)]}, "tools[0].function.description"),
    ({"tools": [fn(strict="yes")]}, "tools[0].function.strict"),
    ({"tools": [PING], "tool_choice": "always"}, "tool_choice"),
    ({"tools": [PING], "tool_choice": 1}, "tool_choice"),
    ({"tools": [PING], "tool_choice": {"type": "function", "function": {"name": "get_weather"}}}, "tool_choice"),
    ({"tools": [PING], "tool_choice": {"type": "function", "name": "ping"}}, "tool_choice"),
    ({"tools": [PING], "tool_choice": {"type": "tool", "function": {"name": "ping"}}}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [], "tool_choice": "required"}, "tool_choice"),
    ({"tool_choice": {"type": "function", "function": {"name": "ping"}}}, "tool_choice"),
    ({"tools": [PING], "parallel_tool_calls": "true"}, "parallel_tool_calls"),
    ({"tools": [PING], "parallel_tool_calls": 1}, "parallel_tool_calls"),
])
def test_malformed_is_400_naming_the_param(body, param):
    with pytest.raises(APIError) as info:
        parse_tool_request(body)
    assert status_code(info.value) == 400
    assert info.value.param == param
    assert info.value.description


def test_valid_schemas_pass():
    params = {"type": "object", "properties": {"items": {"type": "array", "items": {"$ref": "#/$defs/item"}}},
              "$defs": {"item": {"type": "object"}}, "additionalProperties": False}
    for p in (params, {"properties": {"a": {"type": "integer"}}}, {"type": ["object", "null"]}, {}):
        tools, _, _ = parse_tool_request({"tools": [fn(parameters=p)]})
        assert tools[0].parameters == p
