"""The chat route's request and reply shaping: tools, reasoning and output constraints.

Request: `tools` reach the chat template (its `tools` variable, as transformers
passes them) or, where the template has no use for them, a system message that
lists them (the generic format); assistant `tool_calls` and `tool` messages render
in history. `tool_choice` required / named is enforced with a grammar, `auto`
with a lazy one (free text until the family's opener). A request constraint
(response_format, ...) and tool calling are one grammar each: not both. With a
--reasoning-parser, the grammar starts after the `<think>` block. The template's
switches are vLLM's: `add_generation_prompt`, `continue_final_message` (the reply
continues the last message) and `chat_template_kwargs` (validation.template_options).

Reply: each choice's text is split into reasoning and content, and the content's
tool calls parsed out (`message.tool_calls`, finish_reason "tool_calls"); a stream
sends `delta.reasoning_content`, `delta.content` and OpenAI's `delta.tool_calls`
pieces as they come.
"""
import json
from dataclasses import dataclass

from pyforge.server import validation as v
from pyforge.server.constraints import request_grammar
from pyforge.server.errors import bad_request
from pyforge.server.reasoning import Thinking
from pyforge.server.tools import FORMATS, ContentDelta, detect_format, parse_tool_request
from pyforge.structured import ConstraintError


@dataclass(frozen=True)
class ChatReply:
    """How one chat request's generated text becomes assistant messages."""
    thinking: Thinking | None = None
    tool_format: object = None          # a tools ToolFormat when tool calls are parsed out

    def message(self, text, finish_reason):
        """(message dict, finish_reason) of a whole output."""
        reasoning, content = self.thinking.split(text) if self.thinking else (None, text)
        calls = []
        if self.tool_format is not None:
            content, calls = self.tool_format.parse(content)
        message = {"role": "assistant", "content": content}
        if reasoning is not None:
            message["reasoning_content"] = reasoning
        if calls:
            message["tool_calls"] = [_call(c.id, c.name, c.arguments) for c in calls]
        return message, _finish(finish_reason, bool(calls))

    def stream(self):
        return ChatStream(self)


class ChatStream:
    """One choice's streamed text -> OpenAI chat deltas."""

    def __init__(self, reply):
        self.thinking = reply.thinking.stream() if reply.thinking else None
        self.tools = reply.tool_format.stream_parser() if reply.tool_format else None
        self.called = False

    def feed(self, text):
        """The delta dict for `text` ({} when all of it is held back)."""
        pieces = self.thinking.feed(text) if self.thinking else [("content", text)]
        return self._delta(pieces, [])

    def finish(self, finish_reason):
        """(the last delta, finish_reason) at the end of the output."""
        pieces = self.thinking.finish() if self.thinking else []
        delta = self._delta(pieces, self.tools.finish() if self.tools else [])
        return delta, _finish(finish_reason, self.called)

    def _delta(self, pieces, tail):
        """Merge this update's pieces (and the tool parser's final deltas) into one delta."""
        delta, tool_deltas = {}, []
        for kind, text in pieces:
            if kind == "reasoning":
                _append(delta, "reasoning_content", text)
            elif self.tools is None:
                _append(delta, "content", text)
            else:
                tool_deltas += self.tools.feed(text)
        for d in tool_deltas + tail:
            if isinstance(d, ContentDelta):
                _append(delta, "content", d.text)
                continue
            self.called = True
            calls = delta.setdefault("tool_calls", [])
            if d.id is not None:                                    # a call begins: id and name first
                calls.append({"index": d.index, **_call(d.id, d.name, d.arguments)})
            elif calls and calls[-1]["index"] == d.index:           # one arguments piece per call a chunk
                calls[-1]["function"]["arguments"] += d.arguments
            else:
                calls.append({"index": d.index, "function": {"arguments": d.arguments}})
        return delta


def _append(delta, key, text):
    if text:
        delta[key] = delta.get(key, "") + text


def _call(call_id, name, arguments):
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


def _finish(reason, called):
    return "tool_calls" if called and reason == "stop" else reason


# -- requests -------------------------------------------------------------------

def chat_request(body, ctx, logprobs):
    """(Prompt, SamplingParams, ChatReply, keep special tokens) of a chat body."""
    tok, config = ctx.tokenizer, ctx.config
    messages, template_kwargs, offered, fmt = chat_messages(body, ctx)
    prompt = v.chat_prompt(messages, ctx, **template_kwargs)
    grammar = request_grammar(body, ctx.constraints)
    if offered is not None:
        if grammar is not None:
            raise bad_request("an output constraint (response_format, json_schema, ...) and tools cannot be "
                              "combined; set tool_choice to none to use the constraint", "tools")
        grammar = _tool_grammar(fmt, *offered, ctx)
    thinking = Thinking(prompt.text) if config.reasoning_parser else None
    if thinking is not None and grammar is not None:
        grammar = _checked(ctx, thinking.wrap_grammar(grammar, _special_ids(tok)), "messages")
    params = v.sampling_params(body, config, ("max_completion_tokens", "max_tokens"), logprobs, grammar,
                               vocab_size=ctx.facts.vocab_size)
    return prompt, params, ChatReply(thinking, fmt), fmt is not None


def chat_messages(body, ctx):
    """(messages, template keywords, offered tools or None, their ToolFormat or None): what the
    chat template renders of a body — the tools in its `tools` variable or a system message,
    and the body's template switches (validation.template_options)."""
    tok = ctx.tokenizer
    offered = parse_tool_request(body)
    if offered is not None and offered[1].mode == "none":
        offered = None                  # the model is told of no tools and calls none
    messages = [_history_message(m) for m in v.check_messages(body.get("messages"))]
    fmt, template_kwargs = None, v.template_options(body)
    if offered is not None:
        tools, choice, parallel = offered
        fmt = FORMATS[ctx.config.tool_call_parser or detect_format(tok.chat_template)]
        if fmt.name == "generic" or not fmt.template_supports_tools(tok.chat_template):
            fmt = FORMATS["generic"]
            messages = _with_system(messages, fmt.system_prompt(tools))
        else:
            template_kwargs["tools"] = [_openai_tool(t) for t in tools]
    return messages, template_kwargs, offered, fmt


def _tool_grammar(fmt, tools, choice, parallel, ctx):
    try:
        lark = fmt.grammar(tools, choice, parallel, _special_ids(ctx.tokenizer))
    except ValueError as e:
        raise bad_request(str(e), "tool_choice") from None
    if lark is None:
        return None
    try:
        return ctx.constraints.grammar("lark", lark)
    except ConstraintError as e:
        raise bad_request(f"the tools' grammar does not compile: {e}", "tools") from None


def _checked(ctx, grammar, param):
    try:
        return ctx.constraints.grammar("llguidance", grammar)
    except ConstraintError as e:
        raise bad_request(str(e), param) from None


def _special_ids(tok):
    def special_id(text):
        token = tok.token_to_id(text)
        return token if token is not None and tok.is_special(token) else None
    return special_id


def _openai_tool(tool):
    function = {"name": tool.name, "parameters": tool.parameters}
    if tool.description is not None:
        function["description"] = tool.description
    return {"type": "function", "function": function}


def _history_message(message):
    """Templates read a call's arguments as an object (transformers' convention);
    the OpenAI API sends them as a JSON text."""
    calls = message.get("tool_calls")
    if not calls:
        return message
    if not isinstance(calls, list) or not all(isinstance(c, dict) and isinstance(c.get("function"), dict)
                                              for c in calls):
        raise bad_request("tool_calls must be a list of {id, type, function: {name, arguments}}", "messages")
    return {**message, "tool_calls": [_history_call(c) for c in calls]}


def _history_call(call):
    function = dict(call["function"])
    arguments = function.get("arguments")
    if isinstance(arguments, str):
        try:
            function["arguments"] = json.loads(arguments)
        except ValueError:
            raise bad_request("tool_calls[].function.arguments must be a JSON object text", "messages") from None
    return {**call, "function": function}


def _with_system(messages, text):
    """The tools' system prompt after the request's own system message, if any."""
    if messages and messages[0].get("role") == "system":
        first = messages[0]
        return [{**first, "content": f"{first['content']}\n\n{text}"}, *messages[1:]]
    return [{"role": "system", "content": text}, *messages]
