"""Anthropic's Messages API: POST /v1/messages, a thin adapter over the chat route.

A Messages body becomes the body of a /v1/chat/completions request (system and
content blocks -> chat messages; tools -> OpenAI tools; output_config.format -> a
json_schema constraint) and goes through chat.chat_request and generation.run, so
both routes render, constrain and sample alike; only the shapes differ:

  request   system (text or text blocks), messages (user / assistant; text,
            tool_use, tool_result and, with a --reasoning-parser, thinking blocks;
            a last assistant message is continued: prefill), max_tokens (required),
            stop_sequences, temperature, top_p, top_k, stream, tools
            ({name, description, input_schema}), tool_choice (auto | any | tool |
            none, disable_parallel_tool_use), thinking, output_config.format,
            metadata.user_id (the access log's `user`); cache_control anywhere
            (prefix caching is automatic)
  reply     {id "msg_…", type "message", role, content [thinking | text | tool_use],
            model, stop_reason, stop_sequence, usage}, or Anthropic's named events
            (messages_output.py)
  count     POST /v1/messages/count_tokens: {"input_tokens": n} of the same body
            (max_tokens and the sampling fields not needed)
  errors    Anthropic's shape ({"type": "error", "error": {type, message}}, errors.py),
            auth and overload included; a stream that fails ends with an `error` event

A field of the API we cannot honour (images, documents, server tools, ...) is a 400
that names it.
"""
from jsonschema import Draft202012Validator
from jsonschema.exceptions import SchemaError

from pyforge.engine.sampling_params import brief
from pyforge.server import generation as g
from pyforge.server import validation as v
from pyforge.server.chat import chat_request
from pyforge.server.errors import anthropic_error_body, bad_request
from pyforge.server.messages_output import MessageFormat
from pyforge.server.tools.request import NAME
from pyforge.structured import ConstraintError

# tool_choice type -> the chat route's tool_choice
TOOL_CHOICES = {"auto": "auto", "any": "required", "none": "none"}
# Messages API fields this server cannot honour (null is "not set" for each)
UNSUPPORTED = ("container", "context_management", "mcp_servers", "diagnostics", "inference_geo",
               "user_profile_id", "workspace_id")
# per block type: the fields we cannot honour when set
BLOCK_UNSUPPORTED = {"text": ("citations",), "tool_use": ("caller", "toolset_name"),
                     "tool_result": ("toolset_name",)}
TOOL_UNSUPPORTED = ("allowed_callers", "defer_loading", "input_examples")
THINKING = ("enabled", "adaptive", "disabled")
MAX_USER_ID = 256


class Messages:
    def __init__(self, models):
        self.models = models

    def on_post(self, req, resp):
        if req.context.get("request_id"):
            resp.set_header("request-id", req.context.request_id)     # where Anthropic clients look
        with self.models.serving(req) as (body, ctx, timer):
            request, reply, stream, user = messages_request(body, ctx)
            if user is not None:
                timer.log.user = user
            fmt = MessageFormat(ctx, reply)
            g.run(ctx, resp, timer, request, stream=stream, to_json=fmt.message, to_chunks=fmt.events,
                  client_gone=g.connection_watch(req), named_events=True, stream_error=anthropic_error_body,
                  with_generation=True)


class CountTokens:
    """POST /v1/messages/count_tokens: {"input_tokens": n}, the prompt a Messages body with
    the same system, messages, tools, tool_choice, thinking and output_config would send."""

    def __init__(self, models):
        self.models = models

    def on_post(self, req, resp):
        body = v.read_json(req, self.models.config.max_body_bytes)
        ctx = self.models.pick(body.get("model"))
        chat, _ = chat_body(body, ctx)
        prompt, *_ = chat_request(chat, ctx, None)
        resp.media = {"input_tokens": len(prompt.ids)}


def add_routes(app, models):
    app.add_route("/v1/messages", Messages(models))
    app.add_route("/v1/messages/count_tokens", CountTokens(models))


# -- requests -------------------------------------------------------------------

def messages_request(body, ctx):
    """(GenerationRequest, ChatReply, stream, metadata.user_id) of a Messages body."""
    if body.get("max_tokens") is None:
        raise bad_request("max_tokens: field required", "max_tokens")
    stop, stream = _stop_sequences(body.get("stop_sequences")), v.parse_bool(body, "stream")
    user = _user_id(body.get("metadata"))
    chat, thinking = chat_body(body, ctx)
    prompt, params, reply, keep_special = chat_request(chat, ctx, None)
    if thinking == "disabled" and reply.thinking is not None and reply.thinking.expected:
        raise bad_request("thinking: this model's chat template cannot turn its reasoning off", "thinking")
    return g.GenerationRequest([prompt], params, 1, stop, keep_special=keep_special), reply, stream, user


def chat_body(body, ctx):
    """(the /v1/chat/completions body, the thinking type asked for) of a Messages body."""
    for name in UNSUPPORTED:
        if body.get(name) is not None:
            raise bad_request(f"{name} is not supported by this server", name)
    _check_service(body)
    messages = _system(body.get("system")) + _messages(body.get("messages"))
    chat = {"messages": messages, **({"max_tokens": body["max_tokens"]} if "max_tokens" in body else {}),
            **{k: body[k] for k in ("temperature", "top_p", "top_k") if body.get(k) is not None},
            **_tools(body.get("tools"), body.get("tool_choice"))}
    if body["messages"][-1].get("role") == "assistant":
        chat["continue_final_message"] = True          # prefill: the reply continues that message
    schema = _output_format(body.get("output_config"), ctx)
    if schema is not None:
        if chat.get("tools") and chat.get("tool_choice") != "none":
            raise bad_request("output_config.format and tools cannot be combined (one grammar per request); "
                              'set tool_choice to {"type": "none"} to use the format', "output_config")
        chat["json_schema"] = schema
    thinking = _thinking(body.get("thinking"), ctx.config, body.get("max_tokens"))
    if thinking is not None:
        chat["chat_template_kwargs"] = {"enable_thinking": thinking != "disabled"}
    return chat, thinking


def _check_service(body):
    tier, speed = body.get("service_tier"), body.get("speed")
    if tier is not None and tier not in ("auto", "standard_only"):     # one tier here: both are honoured
        raise bad_request(f"service_tier must be auto or standard_only, got {brief(tier)}", "service_tier")
    if speed is not None and speed != "standard":
        raise bad_request(f"speed {brief(speed)} is not supported (standard is)", "speed")


def _system(value):
    if value is None:
        return []
    if isinstance(value, str):
        return [{"role": "system", "content": value}] if value else []
    return [{"role": "system", "content": _text_parts(value, "system")}]


def _text_parts(blocks, param):
    """Text blocks -> the chat route's text parts (joined as that route joins them)."""
    if not isinstance(blocks, list):
        raise bad_request(f"{param} must be a string or a list of text blocks", param)
    parts = []
    for j, block in enumerate(blocks):
        _check_block(block, f"{param}[{j}]", ("text",))
        parts.append({"type": "text", "text": block["text"]})
    return parts


def _check_block(block, param, allowed):
    if not isinstance(block, dict) or not isinstance(block.get("type"), str):
        raise bad_request(f"{param} must be a content block (an object with a type)", param)
    kind = block["type"]
    if kind not in allowed:
        raise bad_request(f"{param}: content blocks of type {brief(kind)} are not supported here "
                          f"({', '.join(allowed)} are)", f"{param}.type")
    for name in BLOCK_UNSUPPORTED.get(kind, ()):
        if block.get(name) is not None:
            raise bad_request(f"{param}.{name} is not supported by this server", f"{param}.{name}")
    if kind == "text" and not isinstance(block.get("text"), str):
        raise bad_request(f"{param}.text must be a string", f"{param}.text")


def _messages(value):
    if not isinstance(value, list) or not value:
        raise bad_request("messages must be a non-empty list", "messages")
    out = []
    for i, message in enumerate(value):
        param = f"messages[{i}]"
        if not isinstance(message, dict) or message.get("role") not in ("user", "assistant"):
            raise bad_request(f"{param} must be an object with role user or assistant "
                              "(a system prompt goes in the top-level system field)", f"{param}.role")
        content = message.get("content")
        if isinstance(content, str):
            out.append({"role": message["role"], "content": content})
        elif not isinstance(content, list):
            raise bad_request(f"{param}.content must be a string or a list of content blocks", f"{param}.content")
        elif message["role"] == "user":
            out += _user_turn(content, f"{param}.content")
        else:
            out.append(_assistant_turn(content, f"{param}.content"))
    return out


def _user_turn(blocks, param):
    """A user turn's blocks -> a `tool` message per tool_result, in order, and a user message of its text."""
    out, parts = [], []
    for j, block in enumerate(blocks):
        _check_block(block, f"{param}[{j}]", ("text", "tool_result"))
        if block["type"] == "text":
            parts.append({"type": "text", "text": block["text"]})
        else:
            out.append(_tool_result(block, f"{param}[{j}]"))
    return out + ([{"role": "user", "content": parts}] if parts or not out else [])


def _tool_result(block, param):
    call_id = block.get("tool_use_id")
    if not isinstance(call_id, str):
        raise bad_request(f"{param}.tool_use_id must be a string", f"{param}.tool_use_id")
    content = block.get("content")
    if content is None:
        text = ""
    elif isinstance(content, str):
        text = content
    else:
        text = "\n".join(p["text"] for p in _text_parts(content, f"{param}.content"))
    is_error = block.get("is_error")
    if is_error is not None and not isinstance(is_error, bool):
        raise bad_request(f"{param}.is_error must be true or false", f"{param}.is_error")
    return {"role": "tool", "tool_call_id": call_id, "content": f"Error: {text}" if is_error else text}


def _assistant_turn(blocks, param):
    """An assistant turn's blocks -> one assistant message: its text, tool calls and reasoning."""
    message, parts, calls = {"role": "assistant"}, [], []
    for j, block in enumerate(blocks):
        _check_block(block, f"{param}[{j}]", ("text", "tool_use", "thinking"))
        if block["type"] == "text":
            parts.append({"type": "text", "text": block["text"]})
        elif block["type"] == "tool_use":
            calls.append(_tool_call(block, f"{param}[{j}]"))
        elif not isinstance(block.get("thinking"), str):
            raise bad_request(f"{param}[{j}].thinking must be a string", f"{param}[{j}].thinking")
        else:       # the template decides what earlier reasoning it shows (most drop it)
            message["reasoning_content"] = message.get("reasoning_content", "") + block["thinking"]
    message["content"] = parts if parts else ""
    if calls:
        message["tool_calls"] = calls
    return message


def _tool_call(block, param):
    call_id, name, arguments = block.get("id"), block.get("name"), block.get("input")
    if not isinstance(call_id, str) or not isinstance(name, str) or not isinstance(arguments, dict):
        raise bad_request(f"{param} must have a string id and name and an object input", param)
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


def _tools(tools, choice):
    """The chat route's tools, tool_choice and parallel_tool_calls of Anthropic's tools and tool_choice."""
    out = {}
    if tools is not None:
        if not isinstance(tools, list):
            raise bad_request("tools must be a list", "tools")
        out["tools"] = [_tool(tool, f"tools[{i}]") for i, tool in enumerate(tools)]
        names = [t["function"]["name"] for t in out["tools"]]
        for i, name in enumerate(names):
            if name in names[:i]:
                raise bad_request(f"tools[{i}].name: the tool name {name!r} is used twice", f"tools[{i}].name")
    if choice is None:
        return out
    kind = choice.get("type") if isinstance(choice, dict) else None
    if kind not in (*TOOL_CHOICES, "tool"):
        raise bad_request('tool_choice must be {"type": "auto" | "any" | "tool" | "none"}', "tool_choice")
    if kind == "tool":
        name = choice.get("name")
        if not isinstance(name, str) or not any(t["function"]["name"] == name for t in out.get("tools", ())):
            raise bad_request(f"tool_choice.name {brief(name)} is not the name of one of the tools", "tool_choice")
        out["tool_choice"] = {"type": "function", "function": {"name": name}}
    else:
        if kind == "any" and not out.get("tools"):
            raise bad_request('tool_choice {"type": "any"} needs tools', "tool_choice")
        out["tool_choice"] = TOOL_CHOICES[kind]
    single = choice.get("disable_parallel_tool_use")
    if single is not None and not isinstance(single, bool):
        raise bad_request("tool_choice.disable_parallel_tool_use must be true or false", "tool_choice")
    out["parallel_tool_calls"] = not single
    return out


def _tool(tool, param):
    if not isinstance(tool, dict):
        raise bad_request(f"{param} must be an object", param)
    if tool.get("type") not in (None, "custom"):
        raise bad_request(f"{param}: tools of type {brief(tool['type'])} are not supported (custom tools are)",
                          f"{param}.type")
    for name in TOOL_UNSUPPORTED:
        if tool.get(name) is not None:
            raise bad_request(f"{param}.{name} is not supported by this server", f"{param}.{name}")
    name, description, schema = tool.get("name"), tool.get("description"), tool.get("input_schema")
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise bad_request(f"{param}.name must be 1 to 64 letters, digits, '_' or '-'", f"{param}.name")
    if description is not None and not isinstance(description, str):
        raise bad_request(f"{param}.description must be a string", f"{param}.description")
    if not isinstance(schema, dict) or schema.get("type") != "object":
        raise bad_request(f'{param}.input_schema must be a JSON schema with "type": "object"',
                          f"{param}.input_schema")
    try:
        Draft202012Validator.check_schema(schema)
    except SchemaError as e:
        raise bad_request(f"{param}.input_schema is not a valid JSON schema: {e.message}",
                          f"{param}.input_schema") from None
    if tool.get("strict") is not None and not isinstance(tool["strict"], bool):
        raise bad_request(f"{param}.strict must be true or false", f"{param}.strict")
    function = {"name": name, "parameters": schema, **({"description": description} if description else {})}
    return {"type": "function", "function": function}


def _output_format(config, ctx):
    """output_config.format's schema (checked here, so a bad one is named as sent), or None."""
    if config is None:
        return None
    if not isinstance(config, dict):
        raise bad_request("output_config must be an object", "output_config")
    if config.get("effort") is not None:
        raise bad_request("output_config.effort is not supported by this server", "output_config.effort")
    fmt = config.get("format")
    if fmt is None:
        return None
    if not isinstance(fmt, dict) or fmt.get("type") != "json_schema" or not isinstance(fmt.get("schema"), dict):
        raise bad_request('output_config.format must be {"type": "json_schema", "schema": {...}}',
                          "output_config.format")
    try:
        ctx.constraints.grammar("json_schema", fmt["schema"])
    except ConstraintError as e:
        raise bad_request(f"output_config.format.schema: {e}", "output_config.format", "invalid_constraint") from None
    return fmt["schema"]


def _thinking(value, config, max_tokens):
    """The thinking type asked for (None: not set). Thinking needs a --reasoning-parser, which
    splits the model's reasoning out; budget_tokens is checked as Anthropic checks it, but the
    model reasons until it closes its block (max_tokens bounds the whole reply)."""
    if value is None:
        return None
    kind = value.get("type") if isinstance(value, dict) else None
    if kind not in THINKING:
        raise bad_request(f"thinking must be {{\"type\": {' | '.join(THINKING)}}}", "thinking")
    if kind != "disabled" and not config.reasoning_parser:
        raise bad_request("thinking: this server splits no reasoning out of this model's output "
                          "(start it with --reasoning-parser)", "thinking")
    budget = value.get("budget_tokens")
    if kind == "enabled" and (not v.is_int(budget) or budget < 1024 or
                              (v.is_int(max_tokens) and budget >= max_tokens)):
        raise bad_request("thinking.budget_tokens must be an integer >= 1024 and less than max_tokens",
                          "thinking.budget_tokens")
    return kind


def _stop_sequences(value):
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
        raise bad_request("stop_sequences must be a list of strings", "stop_sequences")
    return tuple(s for s in value if s)


def _user_id(metadata):
    if metadata is None:
        return None
    if not isinstance(metadata, dict):
        raise bad_request("metadata must be an object", "metadata")
    for key in metadata:
        if key != "user_id":
            raise bad_request(f"metadata.{str(key)[:64]}: unknown field (metadata holds user_id)", "metadata")
    user = metadata.get("user_id")
    if user is not None and (not isinstance(user, str) or len(user) > MAX_USER_ID):
        raise bad_request(f"metadata.user_id must be a string of at most {MAX_USER_ID} characters",
                          "metadata.user_id")
    return user
