"""POST /v1/responses: OpenAI's Responses API, stateless, over the chat route's machinery.

A Responses body becomes the body /v1/chat/completions takes and runs through the
same chat.chat_request (template, tools and their grammars, reasoning split,
structured output) and generation.run; responses_output.py shapes the reply.

  input: a string | items     messages: message items by role (developer -> system; text
                              parts input_text / output_text), function_call items -> the
                              assistant message's tool_calls, function_call_output -> a tool
                              message, a reasoning item -> the next assistant message's
                              reasoning_content
  instructions                a system message first
  max_output_tokens           max_completion_tokens
  text.format                 response_format (text | json_object | json_schema)
  tools, tool_choice          flat function tools {type, name, description, parameters, strict}
                              -> the chat tools; tool_choice {type: function, name} likewise
  temperature, top_p, parallel_tool_calls, vLLM's extra sampling fields (top_k, seed, ...),
  logit_bias                  as they are

Stateless: fields that need stored responses, OpenAI's hosted tools or anything else
this server does not do are 400s naming the field; errors from the chat machinery
name the Responses field (input, text.format, tools[0].name, max_output_tokens).
"""
import json
import re

from pyforge.engine.sampling_params import brief
from pyforge.server import generation as g
from pyforge.server import validation as v
from pyforge.server.chat import chat_request
from pyforge.server.errors import APIError, bad_request, status_code
from pyforge.server.responses_output import ResponseBuilder

STATELESS = "this server keeps no responses: send the whole conversation as input"
# fields we do not honour -> (the values that ask nothing of us, why); absent and null always pass
UNSUPPORTED = {
    "previous_response_id": ((), STATELESS),
    "conversation": ((), STATELESS),
    "store": ((False,), STATELESS + " (store must be false)"),
    "background": ((False,), "background responses are not supported"),
    "background_options": ((), "background responses are not supported"),
    "prompt": ((), "stored prompt templates are not supported"),
    "include": (([],), "include is not supported (no logprobs, encrypted reasoning or hosted tool results)"),
    "top_logprobs": ((), "logprobs are not supported on /v1/responses"),
    "truncation": (("disabled",), 'truncation must be "disabled": a prompt is never truncated'),
    "max_tool_calls": ((), "max_tool_calls limits hosted tools, which this server does not run"),
    "context_management": ((), "context compaction is not supported"),
    "moderation": ((), "moderation is not supported"),
    "prompt_cache_options": ((), "prompt cache options are not supported (the prefix cache is automatic)"),
    "prompt_cache_retention": ((), "prompt cache retention is not supported (the prefix cache is automatic)"),
    "access_programs": ((), "access programs are not supported"),
    "image": ((), "image options are not supported (text only)"),
    "service_tier": (("auto", "default"), "service tiers are not supported"),
    "stream_options": (({}, {"include_obfuscation": False}), "stream obfuscation is not supported"),
}
ROLES = {"user": "user", "assistant": "assistant", "system": "system", "developer": "system"}
TEXT_PARTS = ("input_text", "output_text")
# chat param -> Responses param, for errors raised by the chat machinery
_PARAMS = {"messages": "input", "response_format": "text.format", "max_tokens": "max_output_tokens",
           "max_completion_tokens": "max_output_tokens"}
_TOOL_PARAM = re.compile(r"tools\[(\d+)\]\.function\b")


class Responses:
    def __init__(self, models):
        self.models = models

    def on_post(self, req, resp):
        with self.models.serving(req) as (body, ctx, timer):
            request, stream, builder = parse(body, ctx)
            g.run(ctx, resp, timer, request, stream=stream, to_json=builder.whole, to_chunks=builder.events,
                  client_gone=g.connection_watch(req), named_events=True, stream_error=builder.error_event)


def add_routes(app, models):
    responses = Responses(models)
    for prefix in ("/v1", ""):      # llama-server serves it without the /v1 too
        app.add_route(f"{prefix}/responses", responses)


def parse(body, ctx):
    """(GenerationRequest, stream, ResponseBuilder) of a Responses body."""
    _check_supported(body)
    tools = _tools(body.get("tools"))
    fmt = _text_format(body.get("text"))
    if tools and fmt is not None and fmt["type"] != "text" and body.get("tool_choice") != "none":
        raise bad_request("text.format and tools cannot be combined (each is a grammar); set tool_choice to none "
                          "to use text.format", "tools")
    chat = {k: body[k] for k in (*v.SAMPLING_FIELDS, "logit_bias") if k in body}
    chat.update(messages=_messages(body.get("input"), body.get("instructions")), tools=tools,
                tool_choice=_tool_choice(body.get("tool_choice")), parallel_tool_calls=body.get("parallel_tool_calls"),
                response_format=fmt, max_completion_tokens=body.get("max_output_tokens"))
    try:
        prompt, params, reply, keep_special = chat_request(chat, ctx, None)
    except APIError as e:
        raise _renamed(e) from None
    stream = v.parse_bool(body, "stream")
    echo = {"instructions": body.get("instructions"), "max_output_tokens": body.get("max_output_tokens"),
            "metadata": body.get("metadata") or {}, "parallel_tool_calls": body.get("parallel_tool_calls") is not False,
            "temperature": params.temperature, "top_p": params.top_p,
            "text": {"format": body["text"]["format"] if fmt else {"type": "text"}},
            "tool_choice": body.get("tool_choice") or "auto", "tools": body.get("tools") or [],
            "reasoning": {"effort": None, "summary": None}, "truncation": "disabled", "store": False,
            "background": False, "previous_response_id": None, "user": body.get("user")}
    request = g.GenerationRequest([prompt], params, keep_special=keep_special)
    return request, stream, ResponseBuilder(ctx, reply, echo)


def _check_supported(body):
    for field, (noop, why) in UNSUPPORTED.items():
        value = body.get(field)
        if value is not None and value not in noop:
            raise bad_request(f"{field}: {why}", field)
    reasoning = body.get("reasoning")
    if reasoning is not None:
        if not isinstance(reasoning, dict):
            raise bad_request("reasoning must be an object", "reasoning")
        for key, value in reasoning.items():
            if value is not None:
                raise bad_request(f"reasoning.{key[:40]} is not supported (the model reasons as its chat "
                                  "template and --reasoning-parser set it up)", f"reasoning.{key[:40]}")
    metadata = body.get("metadata")
    if metadata is not None and not (isinstance(metadata, dict) and all(isinstance(x, str) for x in metadata.values())):
        raise bad_request("metadata must be an object of strings", "metadata")
    if body.get("instructions") is not None and not isinstance(body["instructions"], str):
        raise bad_request("instructions must be a string", "instructions")


def _renamed(error):
    """An APIError of the chat machinery, naming the Responses field instead."""
    old = error.param
    new = _PARAMS.get(old) or (_TOOL_PARAM.sub(r"tools[\1]", old) if old else old)
    message = error.description
    if old and new != old and message.startswith(old):     # "max_tokens must be ...", "tools[0].function.name ..."
        message = new + message[len(old):]
    return APIError(status_code(error), message, param=new, code=error.code, headers=error.headers)


# -- input -> messages ------------------------------------------------------------

def _messages(value, instructions):
    items = [{"role": "user", "content": value}] if isinstance(value, str) else value
    if not isinstance(items, list) or not items:
        raise bad_request("input must be a string or a non-empty list of items", "input")
    messages = [{"role": "system", "content": instructions}] if instructions else []
    names, reasoning = {}, None         # call_id -> function name; reasoning for the next assistant message
    for i, entry in enumerate(items):
        param = f"input[{i}]"
        if not isinstance(entry, dict):
            raise bad_request(f"{param} must be an object", param)
        kind = entry.get("type")
        if kind is None or kind == "message":
            role = entry.get("role")
            role = ROLES.get(role) if isinstance(role, str) else None
            if role is None:
                raise bad_request(f"{param}.role must be one of {', '.join(ROLES)}", f"{param}.role")
            message = {"role": role, "content": _text(entry.get("content"), f"{param}.content")}
            if role == "assistant":
                message, reasoning = _with_reasoning(message, reasoning), None
            messages.append(message)
        elif kind == "function_call":
            call_id, name, arguments = (_string(entry, key, param) for key in ("call_id", "name", "arguments"))
            try:
                json.loads(arguments)
            except (ValueError, RecursionError):
                raise bad_request(f"{param}.arguments must be a JSON text", f"{param}.arguments") from None
            names[call_id] = name
            last = messages[-1] if messages else None
            if last is None or last["role"] != "assistant" or reasoning is not None:
                last, reasoning = _with_reasoning({"role": "assistant", "content": None}, reasoning), None
                messages.append(last)
            last.setdefault("tool_calls", []).append(
                {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}})
        elif kind == "function_call_output":
            call_id = _string(entry, "call_id", param)
            message = {"role": "tool", "tool_call_id": call_id,
                       "content": _text(entry.get("output"), f"{param}.output")}
            if call_id in names:
                message["name"] = names[call_id]
            messages.append(message)
        elif kind == "reasoning":
            if entry.get("encrypted_content") is not None:
                raise bad_request(f"{param}: encrypted reasoning cannot be read here", f"{param}.encrypted_content")
            parts = entry.get("content") or entry.get("summary") or []
            if not isinstance(parts, list) or not all(isinstance(p, dict) and isinstance(p.get("text"), str)
                                                      for p in parts):
                raise bad_request(f"{param}.content must be a list of reasoning_text parts", f"{param}.content")
            reasoning = (reasoning or "") + "".join(p["text"] for p in parts)
        else:
            why = STATELESS if kind == "item_reference" else "only message, function_call, function_call_output " \
                                                             "and reasoning items are supported"
            raise bad_request(f"{param}: items of type {brief(kind)} are not supported: {why}", f"{param}.type")
    return messages


def _text(content, param):
    """A message's content: a string, or text parts (input_text / output_text / refusal) as the
    chat route's text parts (joined as it joins them)."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise bad_request(f"{param} must be a string or a list of content parts", param)
    parts = []
    for j, p in enumerate(content):
        kind = p.get("type") if isinstance(p, dict) else None
        text = p.get("refusal" if kind == "refusal" else "text") if isinstance(p, dict) else None
        if kind not in (*TEXT_PARTS, "refusal") or not isinstance(text, str):
            raise bad_request(f"{param}[{j}]: only text parts ({', '.join(TEXT_PARTS)}) are supported, "
                              f"got {brief(kind)}", param)
        parts.append({"type": "text", "text": text})
    return parts


def _string(entry, key, param):
    value = entry.get(key)
    if not isinstance(value, str):
        raise bad_request(f"{param}.{key} must be a string", f"{param}.{key}")
    return value


def _with_reasoning(message, reasoning):
    return message if reasoning is None else {**message, "reasoning_content": reasoning}


# -- tools and text.format --------------------------------------------------------

def _tools(value):
    """Flat function tools -> the chat tools (nested under `function`); hosted tools are 400s."""
    if value is None:
        return None
    if not isinstance(value, list):
        raise bad_request("tools must be an array", "tools")
    tools = []
    for i, tool in enumerate(value):
        kind = tool.get("type") if isinstance(tool, dict) else None
        if kind != "function":
            raise bad_request(f"tools[{i}]: only function tools are supported, got {brief(kind)} (this server "
                              "runs no hosted tools)", f"tools[{i}].type")
        for key in ("defer_loading", "async", "output_schema"):
            if tool.get(key):
                raise bad_request(f"tools[{i}].{key} is not supported", f"tools[{i}].{key}")
        tools.append({"type": "function", "function": {k: tool[k] for k in ("name", "description", "parameters",
                                                                           "strict") if k in tool}})
    return tools


def _tool_choice(value):
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict) and value.get("type") == "function" and isinstance(value.get("name"), str):
        return {"type": "function", "function": {"name": value["name"]}}
    raise bad_request('tool_choice must be "none", "auto", "required" or {"type": "function", "name": ...}',
                      "tool_choice")


def _text_format(text):
    """`text` -> the chat response_format, or None."""
    if text is None:
        return None
    if not isinstance(text, dict):
        raise bad_request("text must be an object", "text")
    if text.get("verbosity") not in (None, "medium"):
        raise bad_request("text.verbosity is not supported (only the default, medium)", "text.verbosity")
    fmt = text.get("format")
    if fmt is None:
        return None
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind == "json_schema":
        if not isinstance(fmt.get("schema"), dict):
            raise bad_request("text.format.schema must be a JSON schema object", "text.format")
        return {"type": "json_schema", "json_schema": {"name": fmt.get("name"), "schema": fmt["schema"]}}
    if kind in ("text", "json_object"):
        return {"type": kind}
    raise bad_request(f"text.format.type must be text, json_object or json_schema, got {brief(kind)}", "text.format")
