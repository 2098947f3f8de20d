"""POST /v1/messages, Anthropic's Messages API: shapes checked against the `anthropic`
package's own types, greedy outputs equal to /v1/chat/completions' for the same
conversation, the named-event stream, tools, errors in Anthropic's shape; then a real
`pyforge serve` driven by Anthropic's own client."""
import json
import logging

import pytest
from falcon import testing

anthropic = pytest.importorskip("anthropic")
pydantic = pytest.importorskip("pydantic")
jsonschema = pytest.importorskip("jsonschema")

from conftest import STORIES  # noqa: E402
from live_server import Server  # noqa: E402
from pyforge.config import ServerConfig  # noqa: E402
from pyforge.engine.engine import Engine  # noqa: E402
from pyforge.server.app import create_app  # noqa: E402
from pyforge.server.engine_client import ErrorEvent, QueueFullError, TokenEvent  # noqa: E402
from pyforge.server.inprocess import InProcessEngineClient  # noqa: E402
from test_app_errors import scripted  # noqa: E402

IDLE_AFTER_EACH_TEST = ("served",)
KEY = "sk-ant-test"
USER = [{"role": "user", "content": "Once upon a time"}]
WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 8},
                                            "unit": {"enum": ["celsius", "fahrenheit"]}},
           "required": ["city", "unit"], "additionalProperties": False}    # bounded: the model must end it
TOOLS = [{"name": "get_weather", "description": "Current weather of a city", "input_schema": WEATHER},
         {"name": "get_time", "input_schema": {"type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}},
                                               "required": ["zone"], "additionalProperties": False}}]
OPENAI_TOOLS = [{"type": "function", "function": {"name": t["name"], "parameters": t["input_schema"],
                                                  **({"description": t["description"]} if "description" in t else {})}}
                for t in TOOLS]
OK_SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
             "additionalProperties": False}


@pytest.fixture(scope="module")
def served():
    """(TestClient over chatml, Engine, its InProcessEngineClient): more apps share the client."""
    engine = Engine(STORIES, n_threads=1, max_model_len=2048, kv_cache_tokens=16384, max_num_seqs=8)
    client = InProcessEngineClient(engine, queue_capacity=64)
    app = testing.TestClient(create_app(ServerConfig(model=STORIES, chat_template="chatml"), client,
                                        engine.tokenizer))
    yield app, engine, client
    client.close()


@pytest.fixture(scope="module")
def app(served):
    return served[0]


def another_app(served, **config):
    _, engine, client = served
    return testing.TestClient(create_app(ServerConfig(model=STORIES, chat_template="chatml", **config), client,
                                         engine.tokenizer))


def post(app, body, **kwargs):
    return app.simulate_post("/v1/messages", json={"model": "stories260K", **body}, **kwargs)


def events_of(text):
    """(name, data) of each named SSE event; the name must be the data's type."""
    out = []
    for frame in text.split("\n\n"):
        if not frame:
            continue
        name, data = frame.split("\n")
        assert name.startswith("event: ") and data.startswith("data: "), frame
        out.append((name[len("event: "):], json.loads(data[len("data: "):])))
        assert out[-1][0] == out[-1][1]["type"]
    return out


def anthropic_error(r, status, kind, *names):
    """The Anthropic-shaped error body of `r`; its message names each of `names`."""
    assert r.status_code == status, r.text
    body = r.json
    assert body["type"] == "error" and set(body["error"]) == {"type", "message"}
    assert body["error"]["type"] == kind
    for name in names:
        assert name in body["error"]["message"], body
    return body["error"]["message"]


def text_of(message):
    return "".join(block["text"] for block in message["content"] if block["type"] == "text")


def chat_text(app, messages, **fields):
    r = app.simulate_post("/v1/chat/completions", json={"model": "stories260K", "messages": messages, **fields})
    assert r.status_code == 200, r.text
    return r.json


# -- replies ------------------------------------------------------------------------

def test_reply_is_an_anthropic_message(app):
    r = post(app, {"max_tokens": 12, "temperature": 0, "messages": USER})
    assert r.status_code == 200, r.text
    message = anthropic.types.Message.model_validate(r.json)
    assert message.id.startswith("msg_") and message.model == "stories260K" and message.role == "assistant"
    assert [b.type for b in message.content] == ["text"] and message.content[0].text
    assert (message.stop_reason, message.stop_sequence) == ("max_tokens", None)
    assert message.usage.output_tokens == 12
    chat = chat_text(app, USER, max_tokens=12, temperature=0)["usage"]
    # Anthropic counts prompt tokens read from the cache apart from the others
    assert message.usage.input_tokens + message.usage.cache_read_input_tokens == chat["prompt_tokens"]
    assert r.headers["request-id"] == r.headers["x-request-id"]


BLOCKS = [{"type": "text", "text": "Tell me a story."}, {"type": "text", "text": "About a cat.",
                                                          "cache_control": {"type": "ephemeral"}}]
CONVERSATIONS = {
    "plain": ({}, USER, USER),
    "system": ({"system": "You tell short stories."}, USER,
               [{"role": "system", "content": "You tell short stories."}, *USER]),
    "system blocks and turns": (
        {"system": [{"type": "text", "text": "You tell stories.", "cache_control": {"type": "ephemeral"}}]},
        [{"role": "user", "content": BLOCKS}, {"role": "assistant", "content": [{"type": "text", "text": "Lily"}]},
         {"role": "user", "content": "And then?"}],
        [{"role": "system", "content": [{"type": "text", "text": "You tell stories."}]},
         {"role": "user", "content": [{"type": b["type"], "text": b["text"]} for b in BLOCKS]},
         {"role": "assistant", "content": "Lily"}, {"role": "user", "content": "And then?"}]),
}


@pytest.mark.parametrize("conversation", CONVERSATIONS, ids=list(CONVERSATIONS))
def test_greedy_text_equals_chat_completions(app, conversation):
    extra, messages, openai_messages = CONVERSATIONS[conversation]
    r = post(app, {"max_tokens": 24, "temperature": 0, "messages": messages, **extra})
    assert r.status_code == 200, r.text
    chat = chat_text(app, openai_messages, max_tokens=24, temperature=0)
    assert text_of(r.json) == chat["choices"][0]["message"]["content"] != ""


def test_prefill_continues_the_last_assistant_message(app):
    messages = [*USER, {"role": "assistant", "content": "there was a"}]
    r = post(app, {"max_tokens": 16, "temperature": 0, "messages": messages})
    chat = chat_text(app, messages, max_tokens=16, temperature=0, continue_final_message=True)
    assert text_of(r.json) == chat["choices"][0]["message"]["content"]
    whole = chat_text(app, USER, max_tokens=16, temperature=0)["choices"][0]["message"]["content"]
    assert text_of(r.json) != whole      # the prompt ends inside the assistant turn


def test_stop_sequences(app):
    full = text_of(post(app, {"max_tokens": 40, "temperature": 0, "messages": USER}).json)
    words = full.split()
    first, later = words[1], words[-1]
    assert full.find(first) + len(first) <= full.find(later)     # `first` is found first
    r = post(app, {"max_tokens": 40, "temperature": 0, "messages": USER, "stop_sequences": [later, first, "zzq"]})
    message = r.json
    assert (message["stop_reason"], message["stop_sequence"]) == ("stop_sequence", first)   # the first found
    assert text_of(message) == full[:full.find(first)]
    events = events_of(post(app, {"max_tokens": 40, "temperature": 0, "messages": USER, "stream": True,
                                  "stop_sequences": [later, first]}).text)
    delta = next(data for name, data in events if name == "message_delta")["delta"]
    assert delta == {"stop_reason": "stop_sequence", "stop_sequence": first}


def test_a_format_the_output_meets_ends_the_turn(app):
    r = post(app, {"max_tokens": 200, "temperature": 0, "messages": USER,
                   "output_config": {"format": {"type": "json_schema", "schema": OK_SCHEMA}}})
    assert r.json["stop_reason"] == "end_turn" and r.json["stop_sequence"] is None
    jsonschema.validate(json.loads(text_of(r.json)), OK_SCHEMA)


# -- streams --------------------------------------------------------------------------

def test_stream_is_anthropics_event_sequence(app):
    body = {"max_tokens": 20, "temperature": 0, "messages": USER, "system": "You tell stories."}
    whole = post(app, body).json
    r = post(app, {**body, "stream": True})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    assert "[DONE]" not in r.text
    events = events_of(r.text)
    adapter = pydantic.TypeAdapter(anthropic.types.RawMessageStreamEvent)
    for _, data in events:
        if data["type"] != "ping":
            adapter.validate_python(data)
    names = [name for name, _ in events if name != "ping"]
    assert names == ["message_start", "content_block_start", *["content_block_delta"] * (len(names) - 5),
                     "content_block_stop", "message_delta", "message_stop"]
    start = events[0][1]["message"]
    assert start["id"].startswith("msg_") and start["content"] == [] and start["stop_reason"] is None
    deltas = [data["delta"] for name, data in events if name == "content_block_delta"]
    assert all(d["type"] == "text_delta" for d in deltas)
    assert "".join(d["text"] for d in deltas) == text_of(whole)
    end = next(data for name, data in events if name == "message_delta")
    assert end["delta"] == {"stop_reason": "max_tokens", "stop_sequence": None}
    assert end["usage"]["output_tokens"] == 20 == whole["usage"]["output_tokens"]


# -- tools ----------------------------------------------------------------------------

def tool_calls(message):
    return [(b["name"], b["input"]) for b in message["content"] if b["type"] == "tool_use"]


@pytest.mark.parametrize("choice", [{"type": "any", "disable_parallel_tool_use": True},
                                    {"type": "tool", "name": "get_weather"}], ids=["any", "tool"])
def test_forced_tool_use_streamed_and_whole(app, choice):
    body = {"max_tokens": 600, "temperature": 0, "messages": [{"role": "user", "content": "Weather in Paris?"}],
            "tools": TOOLS, "tool_choice": choice}
    message = post(app, body).json
    assert message["stop_reason"] == "tool_use", message
    [block] = message["content"]
    assert block["type"] == "tool_use" and block["id"].startswith("toolu_")
    if choice["type"] == "tool":
        assert block["name"] == "get_weather"
    jsonschema.validate(block["input"], next(t["input_schema"] for t in TOOLS if t["name"] == block["name"]))
    openai_choice = {"type": "function", "function": {"name": "get_weather"}} if choice["type"] == "tool" else \
        "required"
    chat = chat_text(app, body["messages"], max_tokens=600, temperature=0, tools=OPENAI_TOOLS,
                     tool_choice=openai_choice, parallel_tool_calls=False)["choices"][0]["message"]
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in chat["tool_calls"]] == \
        tool_calls(message)

    events = events_of(post(app, {**body, "stream": True}).text)
    start = next(data for name, data in events if name == "content_block_start")["content_block"]
    assert start["type"] == "tool_use" and start["name"] == block["name"] and start["input"] == {}
    arguments = "".join(data["delta"]["partial_json"] for name, data in events if name == "content_block_delta")
    assert json.loads(arguments) == block["input"]
    assert next(data for name, data in events if name == "message_delta")["delta"]["stop_reason"] == "tool_use"


def test_tool_history_renders_as_the_chat_route_does(app):
    call_id = "toolu_01abc"
    messages = [{"role": "user", "content": "Weather in Paris?"},
                {"role": "assistant", "content": [
                    {"type": "text", "text": "Let me look."},
                    {"type": "tool_use", "id": call_id, "name": "get_weather",
                     "input": {"city": "Paris", "unit": "celsius"}}]},
                {"role": "user", "content": [
                    {"type": "tool_result", "tool_use_id": call_id, "content": [{"type": "text", "text": "21 C"}]},
                    {"type": "text", "text": "Is it warm?"}]}]
    openai_messages = [messages[0],
                       {"role": "assistant", "content": [{"type": "text", "text": "Let me look."}],
                        "tool_calls": [{"id": call_id, "type": "function", "function": {
                            "name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius"}'}}]},
                       {"role": "tool", "tool_call_id": call_id, "content": "21 C"},
                       {"role": "user", "content": [{"type": "text", "text": "Is it warm?"}]}]
    r = post(app, {"max_tokens": 24, "temperature": 0, "messages": messages, "tools": TOOLS,
                   "tool_choice": {"type": "none"}})
    assert r.status_code == 200, r.text
    chat = chat_text(app, openai_messages, max_tokens=24, temperature=0, tools=OPENAI_TOOLS, tool_choice="none")
    assert text_of(r.json) == chat["choices"][0]["message"]["content"]
    assert r.json["usage"]["input_tokens"] + r.json["usage"]["cache_read_input_tokens"] == \
        chat["usage"]["prompt_tokens"]
    # an error result is shown to the model as one
    messages[2]["content"][0]["is_error"] = True
    failed = post(app, {"max_tokens": 1, "messages": messages, "tools": TOOLS, "tool_choice": {"type": "none"}})
    assert failed.json["usage"]["input_tokens"] + failed.json["usage"]["cache_read_input_tokens"] > \
        chat["usage"]["prompt_tokens"]


# -- thinking -------------------------------------------------------------------------

def test_thinking_blocks_with_a_reasoning_parser(served):
    app = another_app(served, reasoning_parser="qwen3")
    # a prefill inside <think>: the model's output is reasoning until it closes the block
    body = {"max_tokens": 12, "temperature": 0, "thinking": {"type": "adaptive"},
            "messages": [*USER, {"role": "assistant", "content": "<think>Hmm"}]}
    message = post(app, body).json
    assert [b["type"] for b in message["content"]] == ["thinking"] and message["content"][0]["thinking"]
    anthropic.types.Message.model_validate(message)
    events = events_of(post(app, {**body, "stream": True}).text)
    assert next(d for n, d in events if n == "content_block_start")["content_block"]["type"] == "thinking"
    assert "".join(d["delta"]["thinking"] for n, d in events if n == "content_block_delta") == \
        message["content"][0]["thinking"]
    # chatml has no switch for it: reasoning that cannot be turned off is said so, not ignored
    off = post(app, {"max_tokens": 4, "messages": USER, "thinking": {"type": "disabled"}})
    anthropic_error(off, 400, "invalid_request_error", "thinking")
    budget = post(app, {"max_tokens": 1500, "messages": USER, "thinking": {"type": "enabled", "budget_tokens": 2000}})
    anthropic_error(budget, 400, "invalid_request_error", "thinking.budget_tokens")


# -- errors ---------------------------------------------------------------------------

UNSUPPORTED = {
    "max_tokens missing": ({"max_tokens": None}, "max_tokens"),
    "image block": ({"messages": [{"role": "user", "content": [
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AAAA"}}]}]},
        "messages[0].content[0]"),
    "document in a tool result": ({"messages": [{"role": "user", "content": [
        {"type": "tool_result", "tool_use_id": "t", "content": [{"type": "document", "source": {}}]}]}]},
        "messages[0].content[0].content[0]"),
    "redacted thinking": ({"messages": [*USER, {"role": "assistant", "content": [
        {"type": "redacted_thinking", "data": "xx"}]}, *USER]}, "messages[1].content[0]"),
    "citations": ({"messages": [{"role": "user", "content": [
        {"type": "text", "text": "hi", "citations": [{"type": "char_location"}]}]}]},
        "messages[0].content[0].citations"),
    "system role": ({"messages": [{"role": "system", "content": "x"}, *USER]}, "messages[0]"),
    "thinking without a reasoning parser": ({"thinking": {"type": "enabled", "budget_tokens": 1024},
                                             "max_tokens": 2000}, "thinking"),
    "server tool": ({"tools": [{"type": "web_search_20250305", "name": "web_search"}]}, "tools[0]"),
    "tool not an object schema": ({"tools": [{"name": "f", "input_schema": {"type": "string"}}]},
                                  "tools[0].input_schema"),
    "invalid tool schema": ({"tools": [{"name": "f", "input_schema": {"type": "object", "properties": 5}}]},
                            "tools[0].input_schema"),
    "tool name twice": ({"tools": [TOOLS[0], TOOLS[0]]}, "tools[1].name"),
    "tool choice of no tool": ({"tools": TOOLS, "tool_choice": {"type": "tool", "name": "nope"}},
                               "tool_choice"),
    "any without tools": ({"tool_choice": {"type": "any"}}, "tool_choice"),
    "effort": ({"output_config": {"effort": "high"}}, "output_config.effort"),
    "bad format schema": ({"output_config": {"format": {"type": "json_schema", "schema": {"type": 5}}}},
                          "output_config.format"),
    "format with tools": ({"tools": TOOLS, "output_config": {"format": {"type": "json_schema",
                                                                         "schema": OK_SCHEMA}}},
                          "output_config.format"),
    "container": ({"container": "c_1"}, "container"),
    "mcp servers": ({"mcp_servers": [{"type": "url", "url": "http://x", "name": "x"}]}, "mcp_servers"),
    "metadata key": ({"metadata": {"user_id": "u", "tenant": "t"}}, "metadata.tenant"),
    "fast": ({"speed": "fast"}, "speed"),
    "temperature": ({"temperature": -1}, "temperature"),
}


@pytest.mark.parametrize("case", UNSUPPORTED, ids=list(UNSUPPORTED))
def test_what_is_not_honoured_is_a_400_naming_it(app, case):
    fields, name = UNSUPPORTED[case]
    body = {k: v for k, v in {"max_tokens": 4, "messages": USER, **fields}.items() if v is not None}
    anthropic_error(post(app, body), 400, "invalid_request_error", name)


def test_cache_control_and_anthropic_version_are_accepted(app):
    tool = {**TOOLS[0], "cache_control": {"type": "ephemeral"}}
    r = post(app, {"max_tokens": 2, "cache_control": {"type": "ephemeral"}, "tools": [tool],
                   "tool_choice": {"type": "none"}, "service_tier": "auto",
                   "system": [{"type": "text", "text": "Hi", "cache_control": {"type": "ephemeral", "ttl": "1h"}}],
                   "messages": [{"role": "user", "content": BLOCKS}]},
             headers={"anthropic-version": "2023-06-01", "anthropic-beta": "whatever-2025"})
    assert r.status_code == 200, r.text


def test_errors_of_every_layer_take_anthropics_shape(served):
    app = another_app(served, api_key=KEY, max_body_bytes=2048)
    body = {"model": "stories260K", "max_tokens": 2, "messages": USER}
    message = anthropic_error(app.simulate_post("/v1/messages", json=body), 401, "authentication_error")
    assert "API key" in message
    ok = app.simulate_post("/v1/messages", json=body, headers={"x-api-key": KEY, "anthropic-version": "2023-06-01"})
    assert ok.status_code == 200
    # the OpenAI routes keep OpenAI's shape
    assert app.simulate_post("/v1/chat/completions", json=body).json["error"]["code"] == "invalid_api_key"
    auth = {"x-api-key": KEY}
    anthropic_error(app.simulate_get("/v1/messages", headers=auth), 405, "invalid_request_error")
    anthropic_error(app.simulate_post("/v1/messages", body="{}", headers={**auth, "content-type": "text/plain"}),
                    415, "invalid_request_error")
    big = {**body, "system": "x" * 4000}
    anthropic_error(app.simulate_post("/v1/messages", json=big, headers=auth), 413, "request_too_large")
    anthropic_error(app.simulate_post("/v1/messages/nope", json=body, headers=auth), 404, "not_found_error")


def test_overload_is_a_503_overloaded_error_with_retry_after(served):
    config = ServerConfig(model=STORIES, chat_template="chatml")
    r = scripted(served[1].tokenizer, config, error=QueueFullError()).simulate_post(
        "/v1/messages", json={"max_tokens": 2, "messages": USER})
    anthropic_error(r, 503, "overloaded_error")
    assert r.headers["retry-after"] == "1"


def test_an_engine_error_mid_stream_is_an_anthropic_error_event(served):
    config = ServerConfig(model=STORIES, chat_template="chatml")
    client = scripted(served[1].tokenizer, config, script=[(0, TokenEvent([403])), (0, ErrorEvent(500, "boom"))])
    events = events_of(client.simulate_post("/v1/messages", json={"max_tokens": 4, "messages": USER,
                                                                 "stream": True}).text)
    assert events[-1] == ("error", {"type": "error", "error": {"type": "api_error", "message": "boom"}})


def test_metadata_user_id_is_in_the_access_line(app, caplog):
    with caplog.at_level(logging.INFO, logger="pyforge.access"):
        assert post(app, {"max_tokens": 2, "messages": USER, "metadata": {"user_id": "user-42"}}).status_code == 200
        post(app, {"max_tokens": 2, "messages": USER, "metadata": {"user_id": "evil\nGET / 200"}})
    lines = [r for r in caplog.records if r.name == "pyforge.access" and r.fields["path"] == "/v1/messages"]
    assert [r.fields["user"] for r in lines] == ["user-42", ascii("evil\nGET / 200")]
    assert "user=user-42" in lines[0].getMessage() and "\n" not in lines[1].getMessage()


# -- a real server, Anthropic's client --------------------------------------------------
# (the client's newer versions no longer take temperature, top_p or top_k as arguments; older
# ones and other clients still send them, and the server honours them: extra_body sends them here)
GREEDY = {"temperature": 0}

@pytest.fixture(scope="module")
def server():
    s = Server(STORIES, "--chat-template", "chatml")
    yield s
    assert s.stop() == 0
    s.assert_clean()


@pytest.fixture(scope="module")
def claude(server):
    return anthropic.Anthropic(base_url=server.url, api_key="x", max_retries=0)


def test_client_create_equals_chat_completions(server, claude):
    m = claude.messages.create(model="stories260K", max_tokens=24, system="You tell stories.", messages=USER,
                               extra_body=GREEDY)
    assert isinstance(m, anthropic.types.Message) and m.stop_reason == "max_tokens" and m.usage.output_tokens == 24
    chat = server.client.chat.completions.create(
        model="stories260K", max_tokens=24, temperature=0,
        messages=[{"role": "system", "content": "You tell stories."}, *USER])
    assert m.content[0].text == chat.choices[0].message.content

    words = m.content[0].text.split()
    stopped = claude.messages.create(model="stories260K", max_tokens=24, system="You tell stories.", messages=USER,
                                     stop_sequences=[words[2]], extra_body=GREEDY)
    assert (stopped.stop_reason, stopped.stop_sequence) == ("stop_sequence", words[2])
    assert stopped.content[0].text == m.content[0].text[:m.content[0].text.find(words[2])]

    short = claude.messages.create(model="stories260K", max_tokens=3, messages=USER, metadata={"user_id": "u-1"},
                                   extra_body={"top_k": 5, "top_p": 0.9})
    assert short.stop_reason == "max_tokens" and short.usage.output_tokens == 3


def test_client_count_tokens_counts_what_create_sends(claude):
    """/v1/messages/count_tokens: the input_tokens of a create with the same system, messages and tools."""
    args = dict(model="stories260K", system="You tell stories.", messages=USER)
    counted = claude.messages.count_tokens(**args)
    created = claude.messages.create(max_tokens=1, **args)
    usage = created.usage               # Anthropic's input_tokens leaves out the tokens read from the cache
    assert counted.input_tokens == usage.input_tokens + usage.cache_read_input_tokens > 0
    tools = [{"name": "get_weather", "description": "The weather", "input_schema": {"type": "object"}}]
    with_tools = claude.messages.count_tokens(**args, tools=tools)
    assert with_tools.input_tokens > counted.input_tokens       # the template tells the model of the tool
    with pytest.raises(anthropic.BadRequestError, match="messages"):
        claude.messages.count_tokens(model="stories260K", messages=[])


def test_client_stream(claude):
    args = dict(model="stories260K", max_tokens=24, messages=USER, extra_body=GREEDY)
    whole = claude.messages.create(**args)
    with claude.messages.stream(**args) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == final.content[0].text == whole.content[0].text
    assert final.stop_reason == "max_tokens" and final.usage.output_tokens == 24


def test_client_tool_use_round_trip(claude):
    question = [{"role": "user", "content": "Weather in Paris?"}]
    m = claude.messages.create(model="stories260K", max_tokens=600, messages=question, tools=TOOLS,
                               tool_choice={"type": "any", "disable_parallel_tool_use": True}, extra_body=GREEDY)
    assert m.stop_reason == "tool_use"
    [call] = m.content
    assert isinstance(call, anthropic.types.ToolUseBlock)
    jsonschema.validate(call.input, next(t["input_schema"] for t in TOOLS if t["name"] == call.name))
    with claude.messages.stream(model="stories260K", max_tokens=600, messages=question, tools=TOOLS,
                                tool_choice={"type": "any", "disable_parallel_tool_use": True},
                                extra_body=GREEDY) as stream:
        streamed = stream.get_final_message()
    assert [(b.name, b.input) for b in streamed.content] == [(call.name, call.input)]

    answer = claude.messages.create(
        model="stories260K", max_tokens=8, tools=TOOLS, extra_body=GREEDY,
        messages=[*question, {"role": "assistant", "content": m.content},
                  {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id, "content": "21 C"}]}])
    assert answer.stop_reason in ("end_turn", "max_tokens", "tool_use")


def test_client_sees_errors_as_anthropic_errors(claude):
    with pytest.raises(anthropic.BadRequestError) as raised:
        claude.messages.create(model="stories260K", max_tokens=4, messages=[{"role": "user", "content": [
            {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AAAA"}}]}])
    assert raised.value.body["error"]["type"] == "invalid_request_error"
    assert "messages[0].content[0]" in raised.value.body["error"]["message"]
