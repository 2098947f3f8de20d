"""Tool-call formats of model families: detection, grammars, parsing.

  hermes       Hermes, Qwen2.5, Qwen3    <tool_call>\\n{"name": .., "arguments": {..}}\\n</tool_call>, repeated
  llama3_json  Llama 3.1 / 3.2 / 3.3     [<|python_tag|>]{"name": .., "parameters": {..}}[; {..}]
  mistral      Mistral                   [TOOL_CALLS][{"name": .., "arguments": {..}}, ..]
                                         or [TOOL_CALLS]name[ARGS]{..}, repeated (newer tokenizers)
  generic      any other model           the whole answer is {"tool_calls": [..]} or {"response": ".."},
                                         asked for by `system_prompt(tools)`

A native family is data: a `CallSyntax` (how its calls are written; the stream
parser reads the same entry) and the key its call objects hold the arguments
under. Grammars are llguidance Lark text in which each call's arguments are a
`%json` of that function's parameter schema; an opener the vocabulary has as a
special token is referenced by id (`<[ID]>`), any other as a string literal.
"""
import json
import re
from dataclasses import dataclass

from pyforge.server.tools.stream import (NAME_FORM_NAME, CallSyntax, StreamParser, WholeAnswerParser, call_parts,
                                         new_call_id, opener_at, skip_ws)
from pyforge.structured import JSON_WHITESPACE

_DECODER = json.JSONDecoder()
# Whitespace between the parts of a call outside its JSON: bounded, so a model cannot pad forever
WS_RULE = r"WS: /[ \t\r\n]{1,8}/"
JSON_STRING = r'/"(\\([\"\\\/bfnrt]|u[a-fA-F0-9]{4})|[^\"\\\x00-\x1F\x7F])*"/'
_REGEX_SPECIAL = re.compile(r"([\\.+*?()|\[\]{}^$/])")


@dataclass(frozen=True)
class ToolCall:
    id: str
    name: str
    arguments: str      # a JSON object text


def _tool_call(name, args):
    return ToolCall(new_call_id(), name, json.dumps(args, ensure_ascii=False))


class ToolFormat:
    name = "generic"

    def template_supports_tools(self, chat_template):
        """Whether the template reads `tools` (else the server injects system_prompt)."""
        return bool(chat_template) and re.search(r"\btools\b", chat_template) is not None

    def grammar(self, tools, choice, parallel, special_ids):
        raise NotImplementedError

    def system_prompt(self, tools):
        raise NotImplementedError(f"the {self.name} format's chat template renders the tools itself")

    def parse(self, text):
        raise NotImplementedError

    def stream_parser(self):
        raise NotImplementedError


# -- native families -------------------------------------------------------
class NativeFormat(ToolFormat):
    def __init__(self, name, syntax, args_key):
        self.name, self.syntax, self.args_key = name, syntax, args_key

    def parse(self, text):
        content, calls, pos, at_start = [], [], 0, self.syntax.bare_start
        while True:
            i, opener = _next_opener(self.syntax, text, pos, at_start)
            at_start = False
            if i is None:
                content.append(text[pos:])
                break
            content.append(text[pos:i])
            found, end = _group(self.syntax, text, i + len(opener))
            if found:
                calls += found
                pos = end
            else:       # malformed: the opener is text, and what follows it is read again
                content.append(opener)
                pos = i + len(opener)
        return "".join(content).strip() or None, [_tool_call(n, a) for n, a in calls]

    def stream_parser(self):
        return StreamParser(self.syntax)

    def grammar(self, tools, choice, parallel, special_ids):
        tools = _chosen(tools, choice)
        if not tools:
            return None
        parallel = parallel and choice.mode != "function"
        syntax = self.syntax
        opener = syntax.openers[0]
        name_form = syntax.args_marker is not None and special_ids(syntax.args_marker) is not None
        rules = (_name_form_rules(tools, _token(syntax.args_marker, special_ids)) if name_form
                 else _object_rules(tools, self.args_key))
        group, repeat = self._group_rule(parallel, name_form, special_ids)
        if choice.mode == "auto":
            start = _lazy_start(opener, special_ids(opener), repeat and parallel, syntax.bare_start)
        else:
            start = _required_start(_token(opener, special_ids), repeat and parallel, syntax.bare_start)
        return "\n".join([*start, group, *rules, WS_RULE]) + "\n"

    def _group_rule(self, parallel, name_form, special_ids):
        """The Lark rule `group` (what follows one opener) and whether each call has its own opener."""
        s = self.syntax
        if name_form:
            return "group: WS? call", True
        if s.closer:
            return f"group: WS? call WS? {_token(s.closer, special_ids)}", True
        more = f' (WS? {json.dumps(s.separator)} WS? call)*' if parallel and s.separator else ""
        if s.list_open:
            return f"group: WS? {json.dumps(s.list_open)} WS? call{more} WS? {json.dumps(s.list_close)}", False
        return f"group: WS? call{more}", False


def _next_opener(syntax, text, pos, at_start):
    if at_start:
        k = skip_ws(text, pos)
        if text.startswith("{", k):
            return k, ""
    return opener_at(syntax, text, pos)


def _call_at(text, i):
    """(name, arguments, end) of a call object at text[i], or None."""
    if not text.startswith("{", i):
        return None
    try:
        obj, end = _DECODER.raw_decode(text, i)
    except (ValueError, RecursionError):
        return None
    parts = call_parts(obj)
    return (*parts, end) if parts else None


def _group(syntax, text, start):
    """The calls after an opener at text[start] ([] if malformed) and where they end."""
    i = skip_ws(text, start)
    in_list = bool(syntax.list_open) and text.startswith(syntax.list_open, i)
    if in_list:
        i = skip_ws(text, i + len(syntax.list_open))
    elif syntax.args_marker and not text.startswith("{", i):
        return _name_form(syntax, text, i, start)
    first = _call_at(text, i)
    if first is None:
        return [], start
    calls, end = [first[:2]], first[2]
    closer = syntax.list_close if in_list else syntax.closer
    separator = syntax.separator if in_list or not syntax.list_open else None
    while True:
        j = skip_ws(text, end)
        if closer and text.startswith(closer, j):
            return calls, j + len(closer)
        nxt = (_call_at(text, skip_ws(text, j + len(separator)))
               if separator and text.startswith(separator, j) else None)
        if nxt is None:
            return calls, end
        calls.append(nxt[:2])
        end = nxt[2]


def _name_form(syntax, text, i, start):
    end = NAME_FORM_NAME.match(text, i).end()
    if end == i or not text.startswith(syntax.args_marker, end):
        return [], start
    j = skip_ws(text, end + len(syntax.args_marker))
    try:
        args, stop = _DECODER.raw_decode(text, j) if text.startswith("{", j) else (None, j)
    except (ValueError, RecursionError):
        args = None
    return ([(text[i:end], args)], stop) if isinstance(args, dict) else ([], start)


# -- grammar pieces ----------------------------------------------------------
def _chosen(tools, choice):
    """The tools a call may use: none for "none"; a named function that is not among them
    is an error here, never an unconstrained answer (request.py rejects it first)."""
    if choice.mode == "none":
        return []
    if choice.mode != "function":
        return list(tools)
    chosen = [t for t in tools if t.name == choice.name]
    if not chosen:
        raise ValueError(f"tool_choice names {choice.name!r}, which is not among the tools")
    return chosen


def _token(text, special_ids):
    token_id = special_ids(text)
    return f"<[{token_id}]>" if token_id is not None else json.dumps(text)


def _json_rule(schema):
    schema = {**schema, "x-guidance": {"whitespace_pattern": JSON_WHITESPACE, **schema.get("x-guidance", {})}}
    return "%json " + json.dumps(schema, ensure_ascii=False)


def _arguments_schema(tool):
    """The parameters schema, typed as an object, and its definitions ($defs...) to hoist to the root."""
    args = dict(tool.parameters)
    hoisted = {k: args.pop(k) for k in ("$defs", "definitions", "$schema") if k in args}
    args["type"] = "object"     # request.py let "object" through, maybe among other types
    return args, hoisted


def _object_rules(tools, args_key):
    """`call`: one call object {"name": <a tool>, args_key: <its arguments>}, name first."""
    rules = ["call: " + " | ".join(f"fn{i}" for i in range(len(tools)))]
    for i, tool in enumerate(tools):
        args, hoisted = _arguments_schema(tool)
        # "#/$defs/X" references resolve against the document root: keep the definitions there
        rules.append(f"fn{i}: " + _json_rule({
            "type": "object", "properties": {"name": {"const": tool.name}, args_key: args},
            "required": ["name", args_key], "additionalProperties": False, **hoisted}))
    return rules


def _name_form_rules(tools, marker):
    """`call`: name[ARGS]{arguments}."""
    rules = ["call: " + " | ".join(f"fn{i}" for i in range(len(tools)))]
    for i, tool in enumerate(tools):
        args, hoisted = _arguments_schema(tool)
        rules.append(f"fn{i}: {json.dumps(tool.name)} {marker} WS? args{i}")
        rules.append(f"args{i}: " + _json_rule({**args, **hoisted}))
    return rules


def _required_start(opener, repeat, bare_start):
    if repeat:
        return [f"start: WS? {opener} group (WS? {opener} group)* WS?"]
    return [f"start: WS? {opener}{'?' if bare_start else ''} group WS?"]


def _regex_literal(text):
    return _REGEX_SPECIAL.sub(r"\\\1", text)


def _lazy_start(opener, opener_id, repeat, bare_start):
    """Free text, in which an opener starts calls that must be well formed (llguidance's lazy
    lexemes: the text lexeme ends at the first opener). Text never holds a literal opener."""
    lit = json.dumps(opener)
    no_opener = f" & ~/(?s:.*){_regex_literal(opener)}(?s:.*)/" if opener_id is None else ""
    if bare_start:      # llama3: an object at the start is a call, so text must not start with '{'
        text0 = r"/[ \t\r\n]*[^{ \t\r\n](?s:.)*/"
        head = (f"hd: (TEXT0 | WS)? <[{opener_id}]>" if opener_id is not None
                else rf"hd[lazy]: /[ \t\r\n]*([^{{ \t\r\n](?s:.)*)?/ {lit}")
        return ["start: WS? group | TEXT0? | hd group", head, f"TEXT0: {text0}{no_opener}"]
    head = f"hd: TEXT? <[{opener_id}]>" if opener_id is not None else f"hd[lazy]: /(?s:.)*/ {lit}"
    return [f"start: (hd group){'*' if repeat else '?'} TEXT?", head, f"TEXT: /(?s:.)+/{no_opener}"]


# -- generic -----------------------------------------------------------------
class GenericFormat(ToolFormat):
    name = "generic"

    def system_prompt(self, tools):
        listed = json.dumps([{"name": t.name, **({"description": t.description} if t.description else {}),
                              "parameters": t.parameters} for t in tools], indent=2, ensure_ascii=False)
        return ("You can call the functions below (JSON schemas of their arguments).\n\n" + listed + "\n\n"
                "Answer with a single JSON object and nothing else. To call functions:\n"
                '{"tool_calls": [{"name": "<function name>", "arguments": {<argument values>}}]}\n'
                "To answer without calling a function:\n"
                '{"response": "<your answer>"}')

    def parse(self, text):
        s = text.strip()
        try:
            obj = json.loads(s)
        except (ValueError, RecursionError):
            obj = None
        if not isinstance(obj, dict):
            return s or None, []
        response = obj.get("response")
        response = (response.strip() or None) if isinstance(response, str) else None
        raw = [obj["tool_call"]] if "tool_call" in obj else obj.get("tool_calls")
        if raw is None and response is not None:
            return response, []
        parts = [call_parts(c) for c in raw] if isinstance(raw, list) else []
        if not parts or None in parts:
            return s or None, []
        return response, [_tool_call(n, a) for n, a in parts]

    def stream_parser(self):
        return WholeAnswerParser(self.parse)

    def grammar(self, tools, choice, parallel, special_ids):
        tools = _chosen(tools, choice)
        if not tools:
            return None
        parallel = parallel and choice.mode != "function"
        more = ' (WS? "," WS? call)*' if parallel else ""
        calls = f'{json.dumps(json.dumps("tool_calls"))} WS? ":" WS? "[" WS? call{more} WS? "]"'
        response = f'{json.dumps(json.dumps("response"))} WS? ":" WS? JSON_STRING'
        body = f"calls | answer\nanswer: {response}" if choice.mode == "auto" else "calls"
        return "\n".join(['start: WS? "{" WS? body WS? "}" WS?', f"body: {body}", f"calls: {calls}",
                          *_object_rules(tools, "arguments"), f"JSON_STRING: {JSON_STRING}", WS_RULE]) + "\n"


# -- the families ----------------------------------------------------------------
FORMATS = {
    "hermes": NativeFormat("hermes", CallSyntax(openers=("<tool_call>",), closer="</tool_call>"), "arguments"),
    "llama3_json": NativeFormat("llama3_json", CallSyntax(openers=("<|python_tag|>",), separator=";",
                                                          bare_start=True), "parameters"),
    "mistral": NativeFormat("mistral", CallSyntax(openers=("[TOOL_CALLS]",), list_open="[", separator=",",
                                                  list_close="]", args_marker="[ARGS]"), "arguments"),
    "generic": GenericFormat(),
}


def detect_format(chat_template):
    """The family whose tool-call syntax a Jinja chat template teaches its model."""
    t = chat_template or ""
    if "<tool_call>" in t:
        return "hermes"
    if "[TOOL_CALLS]" in t:
        return "mistral"
    if "<|python_tag|>" in t or ('"parameters"' in t and ("Environment: ipython" in t or "<|start_header_id|>" in t)):
        return "llama3_json"
    return "generic"
