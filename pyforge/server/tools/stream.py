"""Tool calls out of a model's output as it streams: text chunks in, deltas out.

A `CallSyntax` says how one model family writes calls (an opener such as
"<tool_call>", then JSON call objects, separators, closers). `StreamParser`
reads the output with it, chunk by chunk, and emits:

  ContentDelta(text)                       text outside calls
  ToolCallDelta(index, id, name, "")       a call begins: its name is known
  ToolCallDelta(index, None, None, piece)  its arguments, as the model writes them

Text that may still turn into an opener ("<tool" at the end of a chunk) is
held back until decided, like a stop string. A call object written
`{"name": ..., "arguments": {` is committed there: its arguments stream raw,
their end found by tracking JSON strings, escapes and nesting. Any other shape
(arguments before name, arguments as a string, extra keys) is buffered and
emitted whole when the object closes, or goes out as text if it is no call.

What goes out is what `ToolFormat.parse` finds in the whole output, however
the output is split (the tests check every split), with one exception: a
committed call whose arguments never close (output cut short) or turn out
not to be JSON stays a partial call here, where parse() calls it text.
Content is the text outside calls with the whole's outer whitespace stripped.
"""
import json
import re
import uuid
from dataclasses import dataclass

JSON_WS = " \t\n\r"
ARG_KEYS = ("arguments", "parameters")     # llama3 writes "parameters"
NAME_FORM_NAME = re.compile(r"[A-Za-z0-9_.-]*")
_JSON_STRING = re.compile(r'"(?:[^"\\]|\\.)*"', re.S)


@dataclass(frozen=True)
class ContentDelta:
    text: str


@dataclass(frozen=True)
class ToolCallDelta:
    index: int
    id: str | None
    name: str | None
    arguments: str


Delta = ContentDelta | ToolCallDelta


@dataclass(frozen=True)
class CallSyntax:
    """How a family writes tool calls in text (see formats.py for the entries)."""
    openers: tuple[str, ...]            # text that starts a group of calls
    closer: str | None = None           # after each call (hermes "</tool_call>"), optional
    list_open: str | None = None        # the calls as a list: "[" ...
    separator: str | None = None        # between calls of one group ("," in a list, llama3 ";")
    list_close: str | None = None       # ... "]"
    bare_start: bool = False            # a call object may open the output without an opener
    args_marker: str | None = None      # mistral's `name[ARGS]{...}` form


def new_call_id():
    return "call_" + uuid.uuid4().hex[:24]


def call_parts(obj):
    """(name, arguments dict) of a decoded call object, or None if it is no call.
    The arguments are the first of ARG_KEYS in the object; a JSON text of an object counts."""
    if not isinstance(obj, dict):
        return None
    name, key = obj.get("name"), next((k for k in obj if k in ARG_KEYS), None)
    args = obj.get(key)
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except (ValueError, RecursionError):
            return None
    if not isinstance(name, str) or not name or not isinstance(args, dict):
        return None
    return name, args


def skip_ws(text, i):
    while i < len(text) and text[i] in JSON_WS:
        i += 1
    return i


class Incomplete(Exception):
    """More text is needed to decide."""


class Mismatch(Exception):
    """The text cannot be what was expected here."""


def _char_at(text, i):
    if i >= len(text):
        raise Incomplete
    return text[i]


def _expect(text, i, literal):
    """Index after `literal` at text[i]."""
    if text.startswith(literal, i):
        return i + len(literal)
    if literal.startswith(text[i:]):
        raise Incomplete
    raise Mismatch


def _string_at(text, i):
    """(value, end) of the JSON string at text[i]."""
    if _char_at(text, i) != '"':
        raise Mismatch
    m = _JSON_STRING.match(text, i)
    if m is None:
        raise Incomplete
    try:
        return json.loads(m.group()), m.end()
    except ValueError:
        raise Mismatch from None


def match_header(text, i):
    """`{"name": "<name>", "arguments": {` at text[i] -> (name, index of the arguments' '{').
    Raises Mismatch for any other start of an object: such a call is buffered whole."""
    i = skip_ws(text, _expect(text, i, "{"))
    key, i = _string_at(text, i)
    if key != "name":
        raise Mismatch
    i = skip_ws(text, _expect(text, skip_ws(text, i), ":"))
    name, i = _string_at(text, i)
    i = skip_ws(text, _expect(text, skip_ws(text, i), ","))
    key, i = _string_at(text, i)
    if key not in ARG_KEYS or not name:
        raise Mismatch
    i = skip_ws(text, _expect(text, skip_ws(text, i), ":"))
    if _char_at(text, i) != "{":
        raise Mismatch
    return name, i


class JsonScanner:
    """Where a JSON object or array ends, fed piece by piece: tracks strings,
    escapes and nesting only (json.loads judges validity)."""

    def __init__(self, depth=0):
        self.depth = depth
        self._in_string = False
        self._escape = False

    def scan(self, text, start=0):
        """Index just past the bracket that closes the value in `text`, or None if still open."""
        for i in range(start, len(text)):
            c = text[i]
            if self._in_string:
                if self._escape:
                    self._escape = False
                elif c == "\\":
                    self._escape = True
                elif c == '"':
                    self._in_string = False
            elif c == '"':
                self._in_string = True
            elif c in "{[":
                self.depth += 1
            elif c in "}]":
                self.depth -= 1
                if self.depth == 0:
                    return i + 1
        return None


class ContentOut:
    """Content text with the outer whitespace of the whole stripped, as it goes:
    a run of whitespace is held until text follows it (dropped at the start and end)."""

    def __init__(self):
        self._started = False
        self._ws = ""

    def add(self, text):
        body = text.rstrip()
        if not body:
            self._ws += text
            return ""
        out = body.lstrip() if not self._started else self._ws + body
        self._started, self._ws = True, text[len(body):]
        return out


def opener_at(syntax, text, start):
    """(index, opener) of the first opener in text[start:], or (None, None)."""
    hits = [(i, o) for o in syntax.openers if (i := text.find(o, start)) >= 0]
    return min(hits) if hits else (None, None)


def partial_opener(syntax, text):
    """Length of the longest end of `text` that an opener starts with."""
    longest = max(len(o) for o in syntax.openers)
    for n in range(min(longest - 1, len(text)), 0, -1):
        if any(o.startswith(text[-n:]) for o in syntax.openers):
            return n
    return 0


class StreamParser:
    """Feeds of one output's text -> deltas. Each state method works on the
    undecided text `_buf` and returns True when it made progress."""

    def __init__(self, syntax):
        self._syntax = syntax
        self._content = ContentOut()
        self._buf = ""
        self._state = self._scan
        self._at_start = syntax.bare_start
        self._prefix = ""           # the opener: text again if its calls turn out malformed
        self._in_list = False
        self._index = -1            # of the current call
        self._scanner = None
        self._wrapped = True        # the current call's arguments sit inside a call object
        self._wrapper_start = 0     # buffered call: where its object starts in _buf
        self._scanned = 0           # ... and how far it has been scanned

    def feed(self, text):
        self._buf += text
        return self._run(final=False)

    def finish(self):
        """End of output: decide what is held back and emit it."""
        return self._run(final=True)

    def _run(self, final):
        out = []
        while self._state(out, final):
            pass
        return out

    # -- text ------------------------------------------------------------
    def _text(self, out, text):
        piece = self._content.add(text)
        if piece:
            out.append(ContentDelta(piece))

    def _scan(self, out, final):
        buf = self._buf
        if not buf:
            return False
        if self._at_start:
            k = skip_ws(buf, 0)
            if k == len(buf):
                self._text(out, buf)
                self._buf = ""
                return False
            self._at_start = False
            if buf[k] == "{":
                self._text(out, buf[:k])
                return self._open("", buf[k:])
        i, opener = opener_at(self._syntax, buf, 0)
        if i is not None:
            self._text(out, buf[:i])
            return self._open(opener, buf[i + len(opener):])
        keep = 0 if final else partial_opener(self._syntax, buf)
        self._text(out, buf[:len(buf) - keep])
        self._buf = buf[len(buf) - keep:]
        return False

    def _open(self, opener, rest):
        self._prefix, self._buf, self._in_list = opener, rest, False
        self._state = self._group_start
        return True

    def _fail(self, out):
        """The attempt is no call: its prefix is text, and the text after it is read again."""
        self._text(out, self._prefix)
        self._prefix = ""
        self._state = self._scan
        return True

    # -- the first call after an opener ------------------------------------
    def _group_start(self, out, final):
        syntax, buf = self._syntax, self._buf
        try:
            i = skip_ws(buf, 0)
            c = _char_at(buf, i)
            if syntax.list_open and buf.startswith(syntax.list_open, i):
                self._in_list = True
                return self._call_at(out, skip_ws(buf, i + len(syntax.list_open)))
            if syntax.args_marker and c != "{":
                return self._name_form(out, i)
            return self._call_at(out, i)
        except Incomplete:
            return self._fail(out) if final else False
        except Mismatch:
            return self._fail(out)

    def _call_at(self, out, i):
        """A call object at _buf[i]: commit it or buffer it."""
        if _char_at(self._buf, i) != "{":
            raise Mismatch
        try:
            name, j = match_header(self._buf, i)
        except Mismatch:
            self._wrapper_start = self._scanned = i
            self._scanner, self._state = JsonScanner(), self._buffered
            return True
        self._wrapped = True
        return self._commit(out, name, j)

    def _name_form(self, out, i):
        """mistral's `name[ARGS]{...}`."""
        buf = self._buf
        end = NAME_FORM_NAME.match(buf, i).end()
        if end == len(buf):
            raise Incomplete
        if end == i:
            raise Mismatch
        j = skip_ws(buf, _expect(buf, end, self._syntax.args_marker))
        if _char_at(buf, j) != "{":
            raise Mismatch
        self._wrapped = False
        return self._commit(out, buf[i:end], j)

    # -- a committed call ------------------------------------------------
    def _commit(self, out, name, args_start):
        self._index += 1
        out.append(ToolCallDelta(self._index, new_call_id(), name, ""))
        self._prefix, self._buf = "", self._buf[args_start:]
        self._scanner, self._state = JsonScanner(), self._arguments
        return True

    def _arguments(self, out, final):
        end = self._scanner.scan(self._buf)
        piece = self._buf if end is None else self._buf[:end]
        if piece:
            out.append(ToolCallDelta(self._index, None, None, piece))
        if end is None:
            self._buf = ""
            return False
        self._buf = self._buf[end:]
        self._scanner = JsonScanner(depth=1)
        self._state = self._trailer if self._wrapped else self._scan
        return True

    def _trailer(self, out, final):
        """The rest of the call object after its arguments (dropped)."""
        end = self._scanner.scan(self._buf)
        if end is None:
            self._buf = ""
            return False
        self._buf = self._buf[end:]
        self._state = self._after_call
        return True

    # -- a buffered call ---------------------------------------------------
    def _buffered(self, out, final):
        start = self._wrapper_start
        end = self._scanner.scan(self._buf, self._scanned)
        if end is None:
            self._scanned = len(self._buf)
            return self._fail(out) if final else False
        try:
            parts = call_parts(json.loads(self._buf[start:end]))
        except (ValueError, RecursionError):
            parts = None
        if parts is None:
            return self._fail(out)
        self._index += 1
        out.append(ToolCallDelta(self._index, new_call_id(), parts[0], ""))
        out.append(ToolCallDelta(self._index, None, None, json.dumps(parts[1], ensure_ascii=False)))
        self._prefix, self._buf = "", self._buf[end:]
        self._state = self._after_call
        return True

    # -- after a call: a closer, another call, or text -----------------------
    def _after_call(self, out, final):
        syntax, buf = self._syntax, self._buf
        closer = syntax.list_close if self._in_list else syntax.closer
        separator = syntax.separator if self._in_list or not syntax.list_open else None
        try:
            i = skip_ws(buf, 0)
            c = _char_at(buf, i)
            if closer and closer.startswith(c):
                self._buf = buf[_expect(buf, i, closer):]
                self._state = self._scan
                return True
            if separator and buf.startswith(separator, i):
                return self._call_at(out, skip_ws(buf, i + len(separator)))
            raise Mismatch
        except Incomplete:
            return self._fail(out) if final else False
        except Mismatch:
            return self._fail(out)


class WholeAnswerParser:
    """Streaming for a format whose answer is one JSON object (generic): an output
    that starts with '{' is held to its end and read whole by `parse`; any other
    output streams as content."""

    def __init__(self, parse):
        self._parse = parse
        self._content = ContentOut()
        self._mode = None           # None until the first non-space character, then "json" or "text"
        self._held = []

    def feed(self, text):
        if self._mode == "text":
            piece = self._content.add(text)
            return [ContentDelta(piece)] if piece else []
        self._held.append(text)
        if self._mode is None and text.strip():
            self._mode = "json" if "".join(self._held).lstrip()[0] == "{" else "text"
            if self._mode == "text":
                held, self._held = "".join(self._held), []
                return self.feed(held)
        return []

    def finish(self):
        if self._mode != "json":
            return []
        content, calls = self._parse("".join(self._held))
        out = [ContentDelta(content)] if content else []
        for index, call in enumerate(calls):
            out += [ToolCallDelta(index, call.id, call.name, ""), ToolCallDelta(index, None, None, call.arguments)]
        return out
