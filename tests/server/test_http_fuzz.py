"""Hypothesis fuzzing of the HTTP layer of a live `pyforge serve` on loopback.

About 4,400 requests over raw sockets: wrong types and out-of-range values for
every request field, hostile bodies (deep nesting, invalid UTF-8, truncated or
huge JSON), hostile HTTP framing (headers, Content-Length, chunked bodies,
methods, paths), and valid bodies sent chunked. Every answer must be < 500,
show no traceback or file path, and be OpenAI-shaped when it is a JSON error;
a body not sent as application/json is never taken; a whole, well-framed
request always gets an answer. One good stream runs beside them; afterwards
the server must still serve, be ready, and count no running request.
"""
import http.client
import json
import math
import re
import socket
import sys
import threading
import time

import pytest

pytest.importorskip("hypothesis")
openai = pytest.importorskip("openai")
from hypothesis import HealthCheck, Phase, configuration, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from live_server import REPO, Server, get, metric  # noqa: E402

MODEL = "tiny-gqa"
FIELD_EXAMPLES, BODY_EXAMPLES, FRAMING_EXAMPLES, CHUNKED_EXAMPLES = 2000, 800, 1500, 100   # 2,000 at least
TIME_BUDGET = 120.0     # seconds of fuzzing; past it nothing more is sent (and the count checks fail)
REPLY_TIMEOUT = 15.0
GOOD_STREAM_TOKENS = 200
MAX_BODY = 8 << 20      # the server's default max_body_bytes
# what an answer must never show: a traceback, or where the code lives
LEAKS = ("Traceback", 'File "', "site-packages", '.py"', str(REPO), sys.prefix)

FUZZ = settings(deadline=None, database=None, derandomize=True, print_blob=False,
                suppress_health_check=list(HealthCheck), phases=[Phase.generate, Phase.shrink])

PROMPT_PATHS = ("/v1/completions", "/api/generate", "/api/completions", "/api/completions/stream")
CHAT_PATHS = ("/v1/chat/completions", "/api/chat", "/api/chat/stream")
GENERATION_PATHS = PROMPT_PATHS + CHAT_PATHS
GET_PATHS = ("/health", "/health/live", "/health/ready", "/metrics", "/v1/models", f"/v1/models/{MODEL}",
             "/v1/models/nope", "/api/llms")
FIELDS = ("model", "prompt", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k",
          "min_p", "seed", "n", "stop", "logprobs", "top_logprobs", "echo", "stream", "stream_options",
          "presence_penalty", "frequency_penalty", "repetition_penalty", "ignore_eos", "stop_token_ids")


# -- the live server ------------------------------------------------------------

@pytest.fixture(scope="module", autouse=True)
def hypothesis_home(tmp_path_factory):
    """Hypothesis keeps its caches in a temporary folder, not in the checkout's .hypothesis/."""
    configuration.set_hypothesis_home_dir(tmp_path_factory.mktemp("hypothesis"))
    yield
    configuration.set_hypothesis_home_dir(None)


class FuzzedServer(Server):
    """`pyforge serve` with one worker; `send` counts what it sends, within the time budget."""

    def __init__(self, model_path):
        super().__init__(model_path, "--max-model-len", "512", "--kv-cache-tokens", "4096", workers=1)
        self.sent = 0
        self.deadline = None        # set by the first send: the fuzzing's time budget

    def send(self, request):
        """The Reply to `request`, or None once the time budget is spent."""
        self.deadline = self.deadline or time.monotonic() + TIME_BUDGET
        if time.monotonic() > self.deadline:
            return None
        self.sent += 1
        return exchange(self.port, request)


@pytest.fixture(scope="module")
def server(model_path):
    s = FuzzedServer(model_path)
    yield s
    assert s.stop() == 0
    s.assert_clean()


class GoodStream:
    """One well-formed streamed completion through the official client, in a thread
    started among the fuzzing; `overlap`: the fuzzing requests sent while it ran."""

    def __init__(self, server):
        self.server = server
        self.client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.chunks, self.error, self.sent = [], None, []
        self.among_fuzzing = False

    def start(self, among_fuzzing=True):
        self.among_fuzzing = among_fuzzing
        self.sent.append(self.server.sent)
        self.thread.start()

    @property
    def overlap(self):
        return self.sent[1] - self.sent[0]

    def _run(self):
        try:
            self.chunks = list(self.client.completions.create(
                model=MODEL, prompt="A good request among bad ones", max_tokens=GOOD_STREAM_TOKENS, stream=True,
                stream_options={"include_usage": True}, temperature=0, extra_body={"ignore_eos": True}))
        except Exception as e:      # noqa: BLE001 - raised again by result()
            self.error = e
        self.sent.append(self.server.sent)

    def result(self, timeout=60):
        if not self.sent:
            self.start(among_fuzzing=False)     # the fuzzing did not run (a -k selection)
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the good stream did not finish"
        if self.error is not None:
            raise self.error
        return self.chunks


@pytest.fixture(scope="module")
def good_stream(server):
    return GoodStream(server)


# -- raw HTTP -------------------------------------------------------------------

class Request:
    """One raw HTTP request; its repr is cut short so a falsifying example stays readable."""

    def __init__(self, method, path, body=b"", headers=None, version="HTTP/1.1"):
        self.method, self.path, self.body, self.version = method, path, body, version
        self.headers = default_headers(body) if headers is None else headers

    def to_bytes(self):
        head = f"{self.method} {self.path} {self.version}".encode("utf-8", "surrogateescape")
        return b"\r\n".join([head, *self.headers, b"", self.body])

    def __repr__(self):
        raw = self.to_bytes()
        return f"<Request {len(raw)} bytes: {raw[:400]!r}{'...' if len(raw) > 400 else ''}>"


class Reply:
    """One response; status None when the server closed the connection without one."""

    def __init__(self, status, content_type, body):
        self.status, self.content_type, self.body = status, content_type, body
        self.text = body.decode("utf-8", "replace")

    def __repr__(self):
        return f"<Reply {self.status} {self.content_type!r}: {self.text[:400]!r}>"


def default_headers(body):
    return [b"Host: 127.0.0.1", b"Content-Type: application/json", b"Content-Length: %d" % len(body),
            b"Connection: close"]


def exchange(port, request):
    """Send the request, close our side, read one response (to its end)."""
    with socket.create_connection(("127.0.0.1", port), timeout=REPLY_TIMEOUT) as sock:
        try:
            sock.sendall(request.to_bytes())
            sock.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            pass        # the server answered (413) before taking the whole body: its answer is still there
        response = http.client.HTTPResponse(sock, method=request.method)
        try:
            response.begin()
        except (http.client.RemoteDisconnected, ConnectionResetError):
            return Reply(None, "", b"")     # closed without a reply
        return Reply(response.status, response.getheader("Content-Type") or "", response.read())


# -- what every answer must look like --------------------------------------------

MODEL_OUTPUT = ("choices", "text", "message")   # a random model may well write "Traceback"


def check(request, reply):
    if reply is None:       # the time budget is spent
        return
    if reply.status is None:
        assert not needs_a_reply(request), ("the server closed a whole request without a reply", request)
        return
    assert reply.status < 500, (request, reply)
    if request.method == "POST" and request.path in GENERATION_PATHS and not sends_json(request):
        assert reply.status >= 400, ("a body not sent as application/json was taken", request, reply)
    if reply.content_type.startswith("text/event-stream"):
        shown = check_events(request, reply)
    elif reply.content_type.startswith("application/json") and reply.body and request.method != "HEAD":
        shown = check_json(request, reply)
    else:
        shown = [reply.text]
    leaked = [marker for marker in LEAKS if any(marker in text for text in shown)]
    assert not leaked, (leaked, request, reply)


def check_json(request, reply):
    """An error is OpenAI-shaped; the strings the reply shows, less the model's output."""
    body = json.loads(reply.body)
    if reply.status >= 400:
        error = body.get("error") if isinstance(body, dict) else None
        assert isinstance(error, dict) and isinstance(error.get("message"), str) \
            and isinstance(error.get("type"), str), (request, reply)
    return list(strings(without_output(body)))


def check_events(request, reply):
    """A stream: JSON events, none a server error, ending with [DONE]; the strings it shows."""
    events = [line[len("data: "):] for line in reply.text.split("\n") if line.startswith("data: ")]
    assert events and events[-1] == "[DONE]", (request, reply)
    shown = []
    for event in map(json.loads, events[:-1]):
        assert event.get("error", {}).get("type") != "server_error", (request, reply)
        shown.extend(strings(without_output(event)))
    return shown


def without_output(body):
    return {k: v for k, v in body.items() if k not in MODEL_OUTPUT} if isinstance(body, dict) else body


def strings(value):
    """Every string in a JSON value, keys included."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for k, v in value.items():
            yield k
            yield from strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from strings(v)


def sends_json(request):
    """True if a Content-Type header of the request names application/json."""
    return any(line.split(b":", 1)[1].split(b";", 1)[0].strip().lower() == b"application/json"
               for line in request.headers if line.lower().startswith(b"content-type:"))


def needs_a_reply(request):
    """True for a whole request in sound HTTP/1.1 framing. Having closed our
    side, a cut or ill-framed request may fairly be dropped without a reply."""
    fields = []
    for line in request.headers:
        name, colon, value = line.partition(b":")
        if not colon or not re.fullmatch(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+", name):
            return False        # an ill-formed field line
        fields.append((name.lower(), value.strip().lower()))
    encodings = [v for k, v in fields if k == b"transfer-encoding"]
    lengths = [v for k, v in fields if k == b"content-length"]
    if encodings:
        return encodings == [b"chunked"] and not lengths and chunked_body_is_whole(request.body)
    if not lengths:
        return True
    return len(lengths) == 1 and lengths[0].isdigit() and len(request.body) >= int(lengths[0])


def chunked_body_is_whole(data):
    """True if `data` is a complete, well-formed chunked body (extensions and trailers allowed)."""
    while True:
        line, sep, data = data.partition(b"\r\n")
        size = line.split(b";", 1)[0].strip()
        if not sep or not re.fullmatch(rb"[0-9a-fA-F]+", size):
            return False
        n = int(size, 16)
        if n == 0:
            break
        if data[n:n + 2] != b"\r\n":
            return False
        data = data[n + 2:]
    while True:             # trailer fields, then an empty line
        line, sep, data = data.partition(b"\r\n")
        if not sep or not line:
            return bool(sep)


# -- hostile JSON values --------------------------------------------------------

class Literal(str):
    """JSON text written into a body as is: what json.dumps cannot write."""


def to_json(value):
    """JSON text of `value`; Literals go in verbatim, lone surrogates as \\udXXX escapes."""
    if isinstance(value, Literal):
        return value
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(k)}: {to_json(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(map(to_json, value)) + "]"
    return json.dumps(value)


EDGE_INTS = [-1, 0, 1, 2**31 - 1, 2**31, -2**31 - 1, 2**32, 2**63 - 1, 2**63, -2**63 - 1, 2**64 - 1, 2**64, 10**400]
NUMBER_LITERALS = ["1" + "0" * 400, "-" + "9" * 400, "9" * 5000, "1e400", "-1e400", "1e308", "-1e308", "1e-400",
                   "NaN", "Infinity", "-Infinity", "-0", "0e0", "4.0", "4e0", "2.5"]
SURROGATE_LITERALS = ['"\\ud800"', '"\\udfff"', '"abc\\ud83d"', '"\\udc80x\\ud800"', '"\\ud83d\\ude00"',
                      '"\\u0000"']

LONE_SURROGATES = ["\ud800", "\udbff", "\udc80", "\udfff", "\ud83d"]

# half of all text holds a lone surrogate (json.dumps writes it as a \udXXX escape)
texts = st.one_of(st.text(max_size=20), st.builds(lambda a, s, b: a + s + b, st.text(max_size=8),
                                                  st.sampled_from(LONE_SURROGATES), st.text(max_size=8)))
scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), texts, st.sampled_from(EDGE_INTS),
                    st.sampled_from(NUMBER_LITERALS).map(Literal), st.sampled_from(SURROGATE_LITERALS).map(Literal))
hostile = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                         st.dictionaries(texts, inner, max_size=4)),
                       max_leaves=8)
token_ids = st.one_of(st.integers(0, 40000), st.integers(), scalars)
content_parts = st.lists(st.fixed_dictionaries({"type": st.one_of(st.just("text"), hostile),
                                                "text": st.one_of(texts, hostile)}), max_size=3)
messages = st.lists(st.fixed_dictionaries(
    {"role": st.one_of(st.sampled_from(["user", "system", "assistant", "tool", "", "User"]), hostile),
     "content": st.one_of(texts, st.none(), content_parts, hostile)}), max_size=3)
NUMERIC_FIELDS = ("max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k", "min_p", "seed",
                  "presence_penalty", "frequency_penalty", "repetition_penalty")
extremes = st.one_of(st.sampled_from(EDGE_INTS), st.sampled_from(NUMBER_LITERALS).map(Literal),
                     st.sampled_from([math.nan, math.inf, -math.inf, 1e308, -1e308, 5e-324, -0.0]))
# values of the right shape but hostile inside, per field
NEAR_VALID = {
    **{name: extremes for name in NUMERIC_FIELDS},
    "model": st.sampled_from(["", " ", MODEL.upper(), MODEL + "\x00", f"../{MODEL}", f"{MODEL}.gguf"]),
    "prompt": st.one_of(texts, st.lists(token_ids, max_size=8), st.lists(st.lists(token_ids, max_size=4), max_size=3),
                        st.lists(texts, max_size=4), st.sampled_from([[], [[]], "", [31999], [32000], [-1], [True]])),
    "messages": st.one_of(messages, st.sampled_from([[], [{}], [[]], [{"content": "x"}]])),
    "stop": st.one_of(texts, st.lists(st.one_of(texts, scalars), max_size=4)),
    "stop_token_ids": st.lists(token_ids, max_size=4),
    "stream_options": st.one_of(st.fixed_dictionaries({"include_usage": scalars}), st.just({})),
    "logprobs": st.one_of(st.integers(-5, 30), st.booleans(), extremes),
    "top_logprobs": st.one_of(st.integers(-5, 30), extremes),
    "n": st.one_of(st.integers(-2, 130), extremes),
}


@st.composite
def hostile_fields(draw):
    """A valid request to a generation route with one or two fields made hostile."""
    path = draw(st.sampled_from(GENERATION_PATHS))
    body = draw(valid_bodies(path))
    for field in draw(st.lists(st.sampled_from(FIELDS), min_size=1, max_size=2, unique=True)):
        body[field] = draw(st.one_of(hostile, NEAR_VALID.get(field, hostile)))
    return Request("POST", path, to_json(body).encode())


@st.composite
def valid_bodies(draw, path):
    """A small valid body: at most 4 tokens, so that accepted requests stay cheap."""
    body = {"model": MODEL, "max_tokens": draw(st.integers(1, 4))}
    if path in CHAT_PATHS:
        body["messages"] = [{"role": "user", "content": "Fuzz me"}]
    else:
        body["prompt"] = "Fuzz me"
    if path.startswith("/v1/") and draw(st.booleans()):
        body["stream"] = True
    return body


def valid_body_bytes(path):
    prompt = {"messages": [{"role": "user", "content": "Fuzz me"}]} if path in CHAT_PATHS else {"prompt": "Fuzz me"}
    return json.dumps({"model": MODEL, "max_tokens": 2, **prompt}).encode()


# -- hostile bodies --------------------------------------------------------------

BAD_UTF8 = [b"\xff", b"\xfe", b"\x80", b"\xc3\x28", b"\xc0\xaf", b"\xe0\x80\xaf", b"\xed\xa0\x80", b"\xed\xbf\xbf",
            b"\xf4\x90\x80\x80", b"\xf8\x88\x80\x80\x80", b"\xe2\x82", b"\x00"]
NOT_OBJECTS = [b"", b" ", b"null", b"true", b"1", b"-1", b'"x"', b"[]", b"[{}]", b"{}", b"1e400", b"NaN", b"{,}",
               b"{'prompt': 'x'}", b'{"prompt": "x",}', b'{"prompt": "x"} trailing', b"/* */{}"]
NESTING_DEPTHS = [64, 500, 1000, 5000, 10_000, 100_000]


@st.composite
def deep_nesting(draw, path):
    """A body, or one field of it, nested thousands of levels deep (closed or not)."""
    depth = draw(st.one_of(st.sampled_from(NESTING_DEPTHS), st.integers(1, 20_000)))
    opening, closing, leaf = draw(st.sampled_from([("[", "]", ""), ('{"a": ', "}", "1"), ('[{"role": ', "}]", '""')]))
    nested = opening * depth + leaf + (closing * depth if draw(st.booleans()) else "")
    field = draw(st.sampled_from([None, "prompt", "messages", "stop", "x"]))
    if field is None:
        return nested.encode()
    head = valid_body_bytes(path)[:-1]
    return head + f', "{field}": {nested}}}'.encode()


@st.composite
def invalid_utf8(draw, path):
    """A valid body with bytes that are not UTF-8, inside the prompt or anywhere."""
    body = valid_body_bytes(path)
    bad = draw(st.one_of(st.sampled_from(BAD_UTF8), st.binary(min_size=1, max_size=8)))
    at = body.index(b"Fuzz") + 2 if draw(st.booleans()) else draw(st.integers(0, len(body)))
    return body[:at] + bad + body[at:]


@st.composite
def odd_encodings(draw, path):
    """The body in UTF-16/32, with a BOM, or with raw (CESU-8) surrogates in its strings."""
    text = valid_body_bytes(path).decode().replace("Fuzz", "Fuzz \ud800 \udfff")
    codec = draw(st.sampled_from(["utf-16", "utf-16-le", "utf-32", "utf-8-sig", "cesu"]))
    if codec == "cesu":
        return text.encode("utf-8", "surrogatepass")
    return text.replace("\ud800 \udfff", "\u00e9").encode(codec)


@st.composite
def truncated(draw, path):
    body = valid_body_bytes(path)
    return body[:draw(st.integers(0, len(body) - 1))]


@st.composite
def big_bodies(draw, path):
    """A valid body grown to up to 4 MB by an ignored field, whitespace or a long prompt."""
    size = draw(st.sampled_from([10_000, 100_000, 1_000_000, 4_000_000]))
    body = valid_body_bytes(path)
    how = draw(st.sampled_from(["field", "whitespace", "prompt"]))
    if how == "field":
        return body[:-1] + b', "padding": "' + b"a" * size + b'"}'
    if how == "whitespace":
        return b" " * size + body + b"\n" * size
    return json.dumps({"model": MODEL, "max_tokens": 2, "prompt": "word " * (size // 50)}).encode()


@st.composite
def hostile_bodies(draw):
    path = draw(st.sampled_from(GENERATION_PATHS))
    kind = draw(st.sampled_from([deep_nesting, invalid_utf8, odd_encodings, truncated, big_bodies]))
    body = draw(st.one_of(kind(path), st.sampled_from(NOT_OBJECTS), st.binary(max_size=200)))
    return Request("POST", path, body)


# -- hostile framing: methods, paths, headers --------------------------------------

METHODS = ["POST", "GET", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD", "TRACE", "CONNECT", "FOO", "post", "P0ST",
           "G\x00T", "GET\tPOST", "M" * 300]
ODD_PATHS = ("/", "//v1/completions", "/v1/completions/", "/v1//completions", "/v1/completions?x=1&x=2",
             "/v1/../v1/completions", "/%2e%2e/%2e%2e/etc/passwd", "/v1/models/%ff%fe", "/v1/models/%00",
             "/v1/models/" + "a" * 5000, "/" + "x" * 9000, "*", "http://127.0.0.1/v1/completions",
             "/v1/completions#x", "/v1/models/\u00e9", "/v1/models/%F0%9F%98%80", "/api/chat/stream/extra",
             "/metrics?format=../../x", "v1/completions", "/v1/completions\x00", "/v1/completions HTTP/1.1\r\nX: y")
ODD_VERSIONS = ["HTTP/1.0", "HTTP/2.0", "HTTP/0.9", "HTTP/1.x", "HTTP/9.9", "http/1.1", ""]
CONTENT_TYPES = [b"text/plain", b"application/x-www-form-urlencoded", b"multipart/form-data; boundary=x", b"",
                 b"application/json; charset=latin-1", b"APPLICATION/JSON", b"application/jsonx",
                 b"application/json;;;", b"application/*", b"*/*", b"application/json, text/plain",
                 b"application/json\x00", b"\xff\xfe"]
CONTENT_LENGTHS = [b"abc", b"-1", b"1e3", b"0x10", b" 5", b"99999999999999999999999", b"+5", b"", b"0", b"9000000",
                   b"5, 5", b"\xff"]


def drop(headers, name):
    return [h for h in headers if not h.lower().startswith(name.lower() + b":")]


def replace(headers, name, value):
    return drop(headers, name) + [name + b": " + value]


@st.composite
def content_type_mutation(draw, headers, body):
    choice = draw(st.sampled_from(["drop", "odd", "twice"]))
    if choice == "drop":
        return drop(headers, b"Content-Type"), body
    value = draw(st.sampled_from(CONTENT_TYPES))
    if choice == "odd":
        return replace(headers, b"Content-Type", value), body
    return headers + [b"Content-Type: " + value], body


@st.composite
def content_length_mutation(draw, headers, body):
    choice = draw(st.sampled_from(["drop", "odd", "short", "long", "twice_same", "twice_different"]))
    n = len(body)
    values = {"odd": draw(st.sampled_from(CONTENT_LENGTHS)), "short": b"%d" % max(n - draw(st.integers(1, 10)), 0),
              "long": b"%d" % (n + draw(st.integers(1, 1000)))}
    if choice == "drop":
        return drop(headers, b"Content-Length"), body
    if choice in values:
        return replace(headers, b"Content-Length", values[choice]), body
    second = b"%d" % n if choice == "twice_same" else b"%d" % (n + 1)
    return headers + [b"Content-Length: " + second], body


@st.composite
def chunked(draw, body):
    """`body` in chunked framing: chunks of random sizes, maybe with extensions and a trailer field."""
    extension = b";name=value" if draw(st.booleans()) else b""
    chunks, rest = [], body
    for size in draw(st.lists(st.integers(1, 64), max_size=8)) + [len(body)]:
        if rest:
            chunks.append(b"%x%s\r\n%s\r\n" % (len(rest[:size]), extension, rest[:size]))
            rest = rest[size:]
    trailer = b"X-Trailer: 1\r\n" if draw(st.booleans()) else b""
    return b"".join(chunks) + b"0" + extension + b"\r\n" + trailer + b"\r\n"


def break_chunks(framed, breakage, draw):
    if breakage == "size":
        return b"zz" + framed[framed.index(b"\r\n"):]
    if breakage == "terminator":
        return framed.replace(b"\r\n", b"\n", 2)
    if breakage == "truncate":
        return framed[:draw(st.integers(0, len(framed) - 1))]
    return framed


@st.composite
def chunked_mutation(draw, headers, body):
    """The body sent chunked, well-formed or broken, with or without a Content-Length beside it."""
    framed = draw(chunked(body))
    framed = break_chunks(framed, draw(st.sampled_from([None, "size", "terminator", "truncate"])), draw)
    encoding = draw(st.sampled_from([b"chunked"] * 6 + [b"gzip, chunked", b"chunked, gzip", b"identity", b"CHUNKED",
                                     b"chunked, chunked", b"xchunked"]))
    headers = replace(headers, b"Transfer-Encoding", encoding)
    if draw(st.booleans()):
        headers = drop(headers, b"Content-Length")
    return headers, framed


@st.composite
def odd_header_mutation(draw, headers, body):
    """Huge, many, malformed or strange headers."""
    choice = draw(st.sampled_from(["huge", "many", "no_colon", "space_before_colon", "folded", "non_ascii",
                                   "request_id", "authorization", "expect", "keep_alive", "no_host"]))
    if choice == "huge":
        return headers + [b"X-Fuzz: " + b"a" * draw(st.sampled_from([1000, 8000, 8190, 9000, 100_000]))], body
    if choice == "many":
        return headers + [b"X-Fuzz-%d: %d" % (i, i) for i in range(draw(st.integers(50, 300)))], body
    extra = {"no_colon": [b"X-Fuzz no colon"], "space_before_colon": [b"Content-Length : 5"],
             "folded": [b"X-Fuzz: a", b" folded"], "non_ascii": [b"X-Fuzz: \xff\xfe\x80 \xc3\xa9"],
             "request_id": [b"X-Request-Id: " + draw(st.sampled_from([b"\xff", b"a" * 5000, b"../../x", b"\x00"]))],
             "authorization": [b"Authorization: Bearer " + b"k" * draw(st.integers(0, 10_000))],
             "expect": [b"Expect: 100-continue"]}
    if choice == "keep_alive":
        return replace(headers, b"Connection", b"keep-alive"), body
    if choice == "no_host":
        return drop(headers, b"Host"), body
    return headers + extra[choice], body


MUTATIONS = [content_type_mutation, content_length_mutation, chunked_mutation, odd_header_mutation]


@st.composite
def hostile_framing(draw):
    """A request with one or two odd parts among its method, path, HTTP version and headers."""
    odd = draw(st.lists(st.sampled_from(["method", "path", "version", "headers", "headers"]), min_size=1,
                        max_size=2, unique=True))
    path = draw(st.sampled_from(GET_PATHS + ODD_PATHS if "path" in odd else GENERATION_PATHS))
    method = draw(st.sampled_from(METHODS)) if "method" in odd else "GET" if path in GET_PATHS else "POST"
    body = valid_body_bytes(path if path in GENERATION_PATHS else "/v1/completions")
    if method != "POST" and draw(st.booleans()):
        body = b""
    headers = default_headers(body)
    if "headers" in odd:
        for mutation in draw(st.lists(st.sampled_from(MUTATIONS), min_size=1, max_size=3)):
            headers, body = draw(mutation(headers, body))
    version = draw(st.sampled_from(ODD_VERSIONS)) if "version" in odd else "HTTP/1.1"
    return Request(method, path, body, headers, version)


@st.composite
def chunked_requests(draw):
    """A valid request with its body sent chunked: the server must take it whole."""
    path = draw(st.sampled_from(GENERATION_PATHS))
    headers = replace(drop(default_headers(b""), b"Content-Length"), b"Transfer-Encoding", b"chunked")
    return Request("POST", path, draw(chunked(valid_body_bytes(path))), headers)


# -- the tests ------------------------------------------------------------------

def fuzz(server, strategy, examples, status=None, beside=None):
    """Send `examples` requests drawn from `strategy`, checking every answer (and
    its status, if given); the GoodStream `beside` starts after the first."""
    @settings(FUZZ, max_examples=examples)
    @given(strategy)
    def send_and_check(request):
        check(request, reply := server.send(request))
        assert status is None or reply is None or reply.status == status, (request, reply)
        if beside is not None and not beside.sent:
            beside.start()

    before = server.sent
    send_and_check()
    assert server.sent - before >= examples, f"the time budget ran out after {server.sent} requests"


def test_hostile_field_values(server, good_stream):
    fuzz(server, hostile_fields(), FIELD_EXAMPLES, beside=good_stream)


def test_hostile_bodies(server):
    fuzz(server, hostile_bodies(), BODY_EXAMPLES)


def test_hostile_framing(server):
    fuzz(server, hostile_framing(), FRAMING_EXAMPLES)


def test_chunked_bodies_are_read_whole(server):
    fuzz(server, chunked_requests(), CHUNKED_EXAMPLES, status=200)


def test_a_body_over_the_limit_is_413(server):
    body = b'{"prompt": "' + b"a" * MAX_BODY + b'"}'
    request = Request("POST", "/v1/completions", body)
    check(request, reply := server.send(request))
    assert reply is not None and reply.status == 413, reply


def running_requests_after(server, timeout=10.0):
    """pyforge:num_requests_running once it is 0, or what it is when the timeout passes."""
    deadline = time.monotonic() + timeout
    while (running := metric(get(server.url + "/metrics")[1], "pyforge:num_requests_running")) and \
            time.monotonic() < deadline:
        time.sleep(0.1)
    return running


def test_the_server_survives_the_fuzzing(server, good_stream):
    chunks = good_stream.result()
    assert good_stream.overlap > 0 or not good_stream.among_fuzzing, "no fuzzing request ran beside the stream"
    assert chunks[-2].choices[0].finish_reason == "length"
    assert chunks[-1].usage.completion_tokens == GOOD_STREAM_TOKENS

    client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
    r = client.completions.create(model=MODEL, prompt="Still there?", max_tokens=4, temperature=0,
                                  extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 4 and r.choices[0].finish_reason == "length"
    assert get(server.url + "/health/ready")[0] == 200
    assert running_requests_after(server) == 0
