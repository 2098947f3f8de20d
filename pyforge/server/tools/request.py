"""The tool fields of a chat request (OpenAI shapes) -> Tool / ToolChoice, or a 400.

  tools                [{"type": "function", "function": {"name", "description"?, "parameters"?, "strict"?}}]
  tool_choice          "none" | "auto" | "required" | {"type": "function", "function": {"name": ...}}
  parallel_tool_calls  bool (default true)

Every malformed value is a 400 naming its param, as validation.py does for the
other fields: a tool we cannot honour is never silently dropped.
"""
import re
from dataclasses import dataclass

from jsonschema import Draft202012Validator
from jsonschema.exceptions import SchemaError

from pyforge.server.errors import bad_request

NAME = re.compile(r"[a-zA-Z0-9_-]{1,64}")       # OpenAI's rule for function names
CHOICE_MODES = ("none", "auto", "required")
EMPTY_PARAMETERS = {"type": "object", "properties": {}}


@dataclass(frozen=True)
class Tool:
    name: str
    description: str | None
    parameters: dict            # JSON schema of the arguments object


@dataclass(frozen=True)
class ToolChoice:
    mode: str                   # "none" | "auto" | "required" | "function"
    name: str | None = None     # the function, for mode "function"


def parse_tool_request(body):
    """(tools, choice, parallel), or None when the request has no tools to offer."""
    tools = _tools(body.get("tools"))
    choice = _choice(body.get("tool_choice"), tools)
    parallel = body.get("parallel_tool_calls")
    if parallel is None:
        parallel = True
    elif not isinstance(parallel, bool):
        raise bad_request("parallel_tool_calls must be a boolean", "parallel_tool_calls")
    if not tools:
        return None
    return tools, choice, parallel


def _tools(value):
    if value is None:
        return []
    if not isinstance(value, list):
        raise bad_request(f"tools must be an array, got {type(value).__name__}", "tools")
    tools = [_tool(entry, f"tools[{i}]") for i, entry in enumerate(value)]
    seen = set()
    for i, tool in enumerate(tools):
        if tool.name in seen:
            raise bad_request(f"tools: the function name {tool.name!r} is used twice", f"tools[{i}].function.name")
        seen.add(tool.name)
    return tools


def _tool(entry, param):
    if not isinstance(entry, dict) or entry.get("type") != "function":
        raise bad_request(f'{param} must be an object with "type": "function"', f"{param}.type")
    fn = entry.get("function")
    if not isinstance(fn, dict):
        raise bad_request(f"{param}.function must be an object", f"{param}.function")
    name = fn.get("name")
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise bad_request(f"{param}.function.name must be 1 to 64 letters, digits, '_' or '-'",
                          f"{param}.function.name")
    description = fn.get("description")
    if description is not None and not isinstance(description, str):
        raise bad_request(f"{param}.function.description must be a string", f"{param}.function.description")
    if fn.get("strict") is not None and not isinstance(fn["strict"], bool):
        raise bad_request(f"{param}.function.strict must be a boolean", f"{param}.function.strict")
    return Tool(name, description, _parameters(fn.get("parameters"), f"{param}.function.parameters"))


def _parameters(schema, param):
    if schema is None:
        return dict(EMPTY_PARAMETERS)
    if not isinstance(schema, dict):
        raise bad_request(f"{param} must be a JSON schema object", param)
    try:
        Draft202012Validator.check_schema(schema)
    except SchemaError as e:
        raise bad_request(f"{param} is not a valid JSON schema: {e.message}", param) from None
    kind = schema.get("type", "object")
    if kind != "object" and not (isinstance(kind, list) and "object" in kind):
        # arguments are always a JSON object: a schema for anything else can never be met
        raise bad_request(f'{param} must describe an object ("type": "object")', param)
    return schema


def _choice(value, tools):
    names = {tool.name for tool in tools}
    if value is None:
        return ToolChoice("auto" if tools else "none")
    if isinstance(value, str):
        if value not in CHOICE_MODES:
            raise bad_request(f"tool_choice must be one of {', '.join(CHOICE_MODES)} or a function, "
                              f"got {value[:40]!r}", "tool_choice")
        if value == "required" and not tools:
            raise bad_request('tool_choice "required" needs tools', "tool_choice")
        return ToolChoice(value)
    fn = value.get("function") if isinstance(value, dict) and value.get("type") == "function" else None
    name = fn.get("name") if isinstance(fn, dict) else None
    if not isinstance(name, str):
        raise bad_request('tool_choice must be a string or {"type": "function", "function": {"name": ...}}',
                          "tool_choice")
    if name not in names:
        raise bad_request(f"tool_choice names the function {name[:64]!r}, which is not in tools", "tool_choice")
    return ToolChoice("function", name)
