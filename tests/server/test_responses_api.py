"""POST /v1/responses (server/responses_api.py, responses_output.py): OpenAI's Responses
API over the chat route's machinery.

In process (falcon.testing, a real engine): greedy outputs equal /v1/chat/completions'
for the same conversation, whole and streamed; history items (developer messages, text
parts, function calls and their outputs) render as the chat messages they stand for;
the stream's named events are well formed and rebuild the whole reply's items; a
reasoning block becomes a reasoning item; unsupported fields are 400s naming them.
Live (`pyforge serve`, the official openai client): create, instructions, streamed events
in order, max_output_tokens -> incomplete, text.format json_schema, a required function
call and its output sent back as history."""
import json

import pytest

from conftest import SHARED, STORIES, fail_next_run, inprocess_app
from pyforge.chat_template import CHATML_TEMPLATE
from pyforge.server.chat import ChatReply
from pyforge.server.reasoning import Thinking
from pyforge.server.responses_output import StreamedItems, output_items
from pyforge.server.tools import FORMATS

jsonschema = pytest.importorskip("jsonschema")

WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 10},
                                            "unit": {"enum": ["celsius", "fahrenheit"]}},
           "required": ["city", "unit"], "additionalProperties": False}
TOOLS = [{"type": "function", "name": "get_weather", "description": "Weather now", "parameters": WEATHER}]
CHAT_TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather now",
                                                "parameters": WEATHER}}]
# a ChatML whose generation prompt opens a <think> block (as the DeepSeek-R1 distills' does)
R1_CHATML = CHATML_TEMPLATE.replace("'<|im_start|>assistant\n'", "'<|im_start|>assistant\n<think>\n'")
QWEN_TEMPLATE = json.loads((SHARED / "models" / "Qwen2.5-0.5B-Instruct" / "tokenizer_config.json")
                           .read_text())["chat_template"]


@pytest.fixture(scope="module")
def stories():
    with inprocess_app(STORIES, max_model_len=2048, chat_template="chatml") as (client, _):
        yield client


def named_events(text):
    """The events of a named SSE stream: each frame's `event:` line names its data's type; no [DONE]."""
    assert "[DONE]" not in text
    events = []
    for frame in text.split("\n\n"):
        if not frame or frame.startswith(":"):
            continue
        name, data = frame.split("\n")
        assert name.startswith("event: ") and data.startswith("data: "), frame
        event = json.loads(data[len("data: "):])
        assert event["type"] == name[len("event: "):]
        events.append(event)
    return events


def rebuilt(events):
    """Check the order of a Responses stream's events and rebuild its items from them; the
    final response (whose output must equal the rebuilt items)."""
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    assert [e["type"] for e in events[:2]] == ["response.created", "response.in_progress"]
    assert events[0]["response"]["status"] == "in_progress" and events[0]["response"]["output"] == []
    items, open_items, done = [], {}, []
    for e in events[2:-1]:
        kind = e["type"]
        if kind == "response.output_item.added":
            assert e["output_index"] == len(items) and e["item"]["status"] == "in_progress"
            items.append(dict(e["item"], text=""))
            open_items[e["item"]["id"]] = items[-1]
            continue
        if kind == "response.output_item.done":
            item = items[e["output_index"]]
            assert open_items.pop(item["id"]) is item
            done.append(e["item"])
            continue
        item = open_items[e["item_id"]]
        assert items[e["output_index"]] is item
        if kind == "response.content_part.added":
            assert e["part"]["text"] == "" and item["text"] == ""
        elif kind == "response.content_part.done":
            assert e["part"]["text"] == item["text"]
        elif kind.endswith(".delta"):
            item["text"] += e["delta"]
        else:
            assert kind.endswith(".done"), kind
            assert e.get("text", e.get("arguments")) == item["text"]
    assert not open_items
    final = events[-1]
    assert final["type"] in ("response.completed", "response.incomplete")
    assert final["response"]["status"] == final["type"].split(".")[1]
    assert final["response"]["output"] == done
    for item, whole in zip(items, done):
        if whole["type"] == "function_call":
            assert whole["arguments"] == item["text"]
        else:
            assert whole["content"][0]["text"] == item["text"]
    return final["response"]


def text_of(response):
    return "".join(p["text"] for i in response["output"] if i["type"] == "message" for p in i["content"])


def respond(client, body):
    r = client.simulate_post("/v1/responses", json=body)
    assert r.status_code == 200, r.text
    return r.json


def chat(client, body):
    r = client.simulate_post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    return r.json


# -- the same conversation through both routes -------------------------------------------

CONVERSATIONS = [   # (Responses fields, the chat messages they stand for)
    ({"input": "Once upon a time"}, [{"role": "user", "content": "Once upon a time"}]),
    ({"instructions": "Be brief.",
      "input": [{"role": "developer", "content": "Tell a story."},
                {"role": "user", "content": [{"type": "input_text", "text": "Once upon"},
                                             {"type": "input_text", "text": " a time"}]},
                {"role": "assistant", "content": [{"type": "output_text", "text": "There was a cat."}]},
                {"type": "message", "role": "user", "content": "More."}]},
     [{"role": "system", "content": "Be brief."}, {"role": "system", "content": "Tell a story."},
      {"role": "user", "content": [{"type": "text", "text": "Once upon"}, {"type": "text", "text": " a time"}]},
      {"role": "assistant", "content": [{"type": "text", "text": "There was a cat."}]},
      {"role": "user", "content": "More."}]),
]


@pytest.mark.parametrize("fields, messages", CONVERSATIONS, ids=["string", "items"])
@pytest.mark.parametrize("max_tokens", [6, 60])
def test_greedy_output_equals_chat_completions(stories, fields, messages, max_tokens):
    expected = chat(stories, {"messages": messages, "max_tokens": max_tokens, "temperature": 0})
    r = respond(stories, {**fields, "max_output_tokens": max_tokens, "temperature": 0})
    choice = expected["choices"][0]
    assert r["id"].startswith("resp_") and r["object"] == "response"
    assert text_of(r) == choice["message"]["content"]
    assert r["status"] == ("incomplete" if choice["finish_reason"] == "length" else "completed")
    assert r["incomplete_details"] == ({"reason": "max_output_tokens"} if r["status"] == "incomplete" else None)
    usage = expected["usage"]
    assert (r["usage"]["input_tokens"], r["usage"]["output_tokens"], r["usage"]["total_tokens"]) == \
        (usage["prompt_tokens"], usage["completion_tokens"], usage["total_tokens"])
    assert r["usage"]["output_tokens_details"] == {"reasoning_tokens": 0}

    streamed = stories.simulate_post("/v1/responses", json={**fields, "max_output_tokens": max_tokens,
                                                            "temperature": 0, "stream": True})
    assert streamed.status_code == 200 and streamed.headers["content-type"].startswith("text/event-stream")
    final = rebuilt(named_events(streamed.text))
    assert text_of(final) == text_of(r) and final["status"] == r["status"]
    assert final["usage"]["output_tokens"] == r["usage"]["output_tokens"]


def test_the_response_repeats_the_request_settings(stories):
    r = respond(stories, {"input": "Hi", "max_output_tokens": 3, "temperature": 0.5, "top_p": 0.9,
                          "metadata": {"run": "7"}, "instructions": "Be kind.", "parallel_tool_calls": False})
    assert (r["temperature"], r["top_p"], r["max_output_tokens"], r["metadata"], r["instructions"]) == \
        (0.5, 0.9, 3, {"run": "7"}, "Be kind.")
    assert r["parallel_tool_calls"] is False and r["tools"] == [] and r["text"] == {"format": {"type": "text"}}


def test_json_schema_format_constrains_the_output(stories):
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer"}},
              "required": ["ok", "n"], "additionalProperties": False}
    for seed in range(3):
        r = respond(stories, {"input": "Answer in JSON.", "max_output_tokens": 100, "temperature": 1.0, "seed": seed,
                              "text": {"format": {"type": "json_schema", "name": "a", "schema": schema,
                                                  "strict": True}}})
        assert r["status"] == "completed"
        jsonschema.validate(json.loads(text_of(r)), schema)
    # json_object: the chat route's constraint (stories260K never closes its object: compare the prefixes)
    r = respond(stories, {"input": "JSON please.", "max_output_tokens": 30, "temperature": 1.0, "seed": 1,
                          "text": {"format": {"type": "json_object"}}})
    expected = chat(stories, {"messages": [{"role": "user", "content": "JSON please."}], "max_tokens": 30,
                              "temperature": 1.0, "seed": 1, "response_format": {"type": "json_object"}})
    assert text_of(r).startswith("{") and text_of(r) == expected["choices"][0]["message"]["content"]


def test_an_engine_failure_ends_the_stream_with_failed_and_error():
    with inprocess_app(STORIES, max_model_len=2048, chat_template="chatml") as (client, engine):
        fail_next_run(engine, RuntimeError("injected"))
        r = client.simulate_post("/v1/responses", json={"input": "Hi", "max_output_tokens": 5, "stream": True})
    events = named_events(r.text)
    assert [e["type"] for e in events] == ["response.created", "response.in_progress", "response.failed", "error"]
    assert [e["sequence_number"] for e in events] == [0, 1, 2, 3]
    failed = events[2]["response"]
    assert failed["status"] == "failed" and failed["error"]["code"] == "server_error"
    assert events[3]["code"] == "server_error" and events[3]["message"] == failed["error"]["message"]


@pytest.mark.parametrize("body, param", [
    ({"previous_response_id": "resp_1"}, "previous_response_id"),
    ({"conversation": "conv_1"}, "conversation"),
    ({"store": True}, "store"),
    ({"background": True}, "background"),
    ({"include": ["message.output_text.logprobs"]}, "include"),
    ({"top_logprobs": 2}, "top_logprobs"),
    ({"truncation": "auto"}, "truncation"),
    ({"prompt": {"id": "pmpt_1"}}, "prompt"),
    ({"service_tier": "flex"}, "service_tier"),
    ({"reasoning": {"effort": "low"}}, "reasoning.effort"),
    ({"text": {"verbosity": "low"}}, "text.verbosity"),
    ({"tools": [{"type": "web_search"}]}, "tools[0].type"),
    ({"tools": [{"type": "function", "name": "bad name!"}]}, "tools[0].name"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "name": "nope"}}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": {"type": "web_search_preview"}}, "tool_choice"),
    ({"tools": TOOLS, "text": {"format": {"type": "json_object"}}}, "tools"),
    ({"text": {"format": {"type": "json_schema", "name": "x", "schema": {"type": 5}}}}, "text.format"),
    ({"text": {"format": {"type": "xml"}}}, "text.format"),
    ({"max_output_tokens": 0}, "max_output_tokens"),
    ({"temperature": -1}, "temperature"),
    ({"input": []}, "input"),
    ({"input": [{"role": "robot", "content": "x"}]}, "input[0].role"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]}, "input[0].content"),
    ({"input": [{"type": "item_reference", "id": "msg_1"}]}, "input[0].type"),
    ({"input": [{"type": "function_call", "call_id": "c", "name": "f", "arguments": "{oops"}]}, "input[0].arguments"),
    ({"input": [{"type": "function_call_output", "output": "x"}]}, "input[0].call_id"),
    ({"instructions": 5}, "instructions"),
])
def test_unsupported_and_malformed_fields_are_400s_naming_them(stories, body, param):
    r = stories.simulate_post("/v1/responses", json={"input": "Hi", "max_output_tokens": 4, **body})
    assert r.status_code == 400, r.text
    assert r.json["error"]["param"] == param and r.json["error"]["type"] == "invalid_request_error", r.json
    for chat_name in ("messages", "max_tokens", "function.", "response_format"):     # the Responses names only
        assert chat_name not in r.json["error"]["message"], r.json


# -- tools and their history, in a template that renders them (Qwen2.5: hermes) -----------

@pytest.fixture(scope="module")
def qwen(model_path):
    with inprocess_app(model_path, max_model_len=1024, chat_template=QWEN_TEMPLATE) as (client, _):
        yield client


def test_history_items_render_as_the_chat_messages(qwen):
    call = {"type": "function_call", "call_id": "call_1", "name": "get_weather",
            "arguments": '{"city": "Paris", "unit": "celsius"}'}
    items = [{"role": "user", "content": "Weather in Paris?"}, call,
             {"type": "function_call_output", "call_id": "call_1", "output": "21 degrees"}]
    messages = [{"role": "user", "content": "Weather in Paris?"},
                {"role": "assistant", "content": None, "tool_calls": [
                    {"id": "call_1", "type": "function", "function": {"name": "get_weather",
                                                                      "arguments": call["arguments"]}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": "21 degrees"}]
    expected = chat(qwen, {"messages": messages, "tools": CHAT_TOOLS, "max_tokens": 8, "temperature": 0})
    r = respond(qwen, {"input": items, "tools": TOOLS, "max_output_tokens": 8, "temperature": 0})
    assert r["usage"]["input_tokens"] == expected["usage"]["prompt_tokens"]
    assert text_of(r) == (expected["choices"][0]["message"]["content"] or "")
    shorter = respond(qwen, {"input": items[:1], "tools": TOOLS, "max_output_tokens": 8, "temperature": 0})
    assert shorter["usage"]["input_tokens"] < r["usage"]["input_tokens"]     # the call and its output rendered


@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "name": "get_weather"}],
                         ids=["required", "named"])
def test_required_function_calls_whole_and_streamed(qwen, tool_choice):
    body = {"input": "Weather in Paris?", "tools": TOOLS, "tool_choice": tool_choice, "parallel_tool_calls": False,
            "max_output_tokens": 300, "temperature": 1.0, "seed": 4}
    r = respond(qwen, body)
    assert r["status"] == "completed" and [i["type"] for i in r["output"]] == ["function_call"]
    call = r["output"][0]
    assert call["id"].startswith("fc_") and call["call_id"].startswith("call_") and call["name"] == "get_weather"
    jsonschema.validate(json.loads(call["arguments"]), WEATHER)
    assert r["tool_choice"] == tool_choice and r["tools"] == TOOLS

    streamed = rebuilt(named_events(qwen.simulate_post("/v1/responses", json={**body, "stream": True}).text))
    assert [(i["type"], i["name"], json.loads(i["arguments"])) for i in streamed["output"]] == \
        [("function_call", "get_weather", json.loads(call["arguments"]))]


# -- reasoning ----------------------------------------------------------------------------

def test_a_reasoning_block_becomes_a_reasoning_item():
    """The template opens <think>; stories260K never closes it, so all is reasoning and
    max_output_tokens cuts it: a reasoning item, then an empty incomplete message."""
    with inprocess_app(STORIES, max_model_len=2048, chat_template=R1_CHATML, reasoning_parser="deepseek_r1") \
            as (client, _):
        body = {"input": "Once upon a time", "max_output_tokens": 20, "temperature": 0}
        expected = chat(client, {"messages": [{"role": "user", "content": "Once upon a time"}], "max_tokens": 20,
                                 "temperature": 0})["choices"][0]["message"]
        assert expected["reasoning_content"] and expected["content"] == ""
        r = respond(client, body)
        assert [(i["type"], i["status"]) for i in r["output"]] == \
            [("reasoning", "completed"), ("message", "incomplete")]
        assert r["output"][0]["content"] == [{"type": "reasoning_text", "text": expected["reasoning_content"]}]
        assert text_of(r) == "" and r["status"] == "incomplete"
        assert 0 < r["usage"]["output_tokens_details"]["reasoning_tokens"] <= 2 * r["usage"]["output_tokens"]
        events = named_events(client.simulate_post("/v1/responses", json={**body, "stream": True}).text)
        final = rebuilt(events)
        assert "response.reasoning_text.delta" in {e["type"] for e in events}
        assert final["output"][0]["content"] == r["output"][0]["content"] and text_of(final) == ""


OUTPUTS = [   # (prompt, tool format, output): reasoning, text and tool calls in one output
    ("<|im_start|>assistant\n", "hermes",
     '<think>\nThey want weather.\n</think>\n\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", '
     '"unit": "celsius"}}\n</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>'),
    ("<|im_start|>assistant\n", "hermes", "<think>short</think>Just text, {no call}."),
    ("<|im_start|>assistant\n", "hermes", 'Let me look.\n<tool_call>\n{"name": "get_time", "arguments": {}}\n'
                                          '</tool_call>'),
    ("x<think>\n", "generic", 'Plan.</think>{"tool_calls": [{"name": "get_time", "arguments": {"zone": "UTC"}}]}'),
    ("<|im_start|>assistant\n", "mistral", '[TOOL_CALLS][{"name": "get_time", "arguments": {"zone": "CET"}}]'),
    ("<|im_start|>assistant\n", "hermes", "<think>cut sho"),
    ("<|im_start|>assistant\n", "hermes", "   "),
]


@pytest.mark.parametrize("prompt, fmt, output", OUTPUTS)
@pytest.mark.parametrize("finish_reason", ["stop", "length"])
def test_streamed_items_equal_the_whole_reply(prompt, fmt, output, finish_reason):
    reply = ChatReply(Thinking(prompt), FORMATS[fmt])
    status, whole, _ = output_items(reply, output, finish_reason)
    for size in (1, 3, 7, len(output)):
        items = StreamedItems(reply.stream())
        events = []
        for i in range(0, len(output), size):
            events += items.feed(output[i:i + size], finish_reason if i + size >= len(output) else None)
        assert items.reason in ("stop", "length", "tool_calls")
        assert [_no_ids(i) for i in items.output()] == [_no_ids(i) for i in whole], size
        added = [f["item"]["type"] for kind, f in events if kind == "response.output_item.added"]
        assert added == [i["type"] for i in whole]
    assert status == ("incomplete" if finish_reason == "length" else "completed")


def _no_ids(item):
    return {k: v for k, v in item.items() if k not in ("id", "call_id")}


# -- a real server and the official client ------------------------------------------------

@pytest.fixture(scope="module")
def server():
    pytest.importorskip("openai")
    from live_server import Server
    s = Server(STORIES, "--chat-template", "chatml")
    yield s
    assert s.stop() == 0
    s.assert_clean()


def test_client_create_equals_chat_completions(server):
    c = server.client
    for instructions in (None, "Tell a short story."):
        r = c.responses.create(model="stories260K", input="Once upon a time", instructions=instructions,
                               max_output_tokens=40, temperature=0)
        messages = [{"role": "user", "content": "Once upon a time"}]
        if instructions:
            messages.insert(0, {"role": "system", "content": instructions})
        expected = c.chat.completions.create(model="stories260K", messages=messages, max_tokens=40, temperature=0)
        assert r.id.startswith("resp_") and r.object == "response" and r.model == "stories260K"
        assert r.output_text == expected.choices[0].message.content and r.output[0].type == "message"
        assert r.usage.input_tokens == expected.usage.prompt_tokens
        assert r.usage.output_tokens == expected.usage.completion_tokens
        assert r.instructions == instructions


def test_client_stream_events_in_order(server):
    c = server.client
    whole = c.responses.create(model="stories260K", input="Once upon a time", max_output_tokens=30, temperature=0)
    events = list(c.responses.create(model="stories260K", input="Once upon a time", max_output_tokens=30,
                                     temperature=0, stream=True))
    types = [e.type for e in events]
    deltas = types.count("response.output_text.delta")
    assert deltas >= 1
    assert types == ["response.created", "response.in_progress", "response.output_item.added",
                     "response.content_part.added", *["response.output_text.delta"] * deltas,
                     "response.output_text.done", "response.content_part.done", "response.output_item.done",
                     f"response.{whole.status}"]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == whole.output_text == events[-1].response.output_text


def test_client_max_output_tokens_makes_an_incomplete_response(server):
    r = server.client.responses.create(model="stories260K", input="Once upon a time", max_output_tokens=5,
                                       temperature=0)
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    assert r.usage.output_tokens == 5 and r.output[0].status == "incomplete"


def test_client_json_schema_output_validates(server):
    pydantic = pytest.importorskip("pydantic")

    class Answer(pydantic.BaseModel):
        ok: bool
        n: int

    schema = {**Answer.model_json_schema(), "additionalProperties": False}
    r = server.client.responses.create(
        model="stories260K", input="Answer in JSON.", max_output_tokens=100, temperature=1.0, extra_body={"seed": 3},
        text={"format": {"type": "json_schema", "name": "answer", "schema": schema, "strict": True}})
    assert r.status == "completed"
    jsonschema.validate(json.loads(r.output_text), schema)
    with server.client.responses.stream(model="stories260K", input="Answer in JSON.", max_output_tokens=100,
                                        temperature=1.0, text_format=Answer, extra_body={"seed": 3}) as stream:
        final = stream.get_final_response()
    assert isinstance(final.output_parsed, Answer)
    parsed = server.client.responses.parse(model="stories260K", input="Answer in JSON.", max_output_tokens=100,
                                           temperature=1.0, text_format=Answer, extra_body={"seed": 5})
    assert isinstance(parsed.output_parsed, Answer) and Answer.model_validate_json(parsed.output_text) == \
        parsed.output_parsed


def test_client_required_function_call_and_its_output(server):
    c = server.client
    body = dict(model="stories260K", input=[{"role": "user", "content": "Weather in Paris?"}], tools=TOOLS,
                tool_choice="required", parallel_tool_calls=False, max_output_tokens=300, temperature=1.0,
                extra_body={"seed": 3})
    r = c.responses.create(**body)
    calls = [i for i in r.output if i.type == "function_call"]
    assert r.status == "completed" and len(calls) == 1 and calls[0].name == "get_weather"
    jsonschema.validate(json.loads(calls[0].arguments), WEATHER)

    events = list(c.responses.create(**body, stream=True))
    arguments = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")
    done = [e.item for e in events if e.type == "response.output_item.done"]
    assert [i.type for i in done] == ["function_call"] and done[0].arguments == arguments
    jsonschema.validate(json.loads(arguments), WEATHER)

    history = [*body["input"], *[i.model_dump(exclude_none=True) for i in r.output],
               {"type": "function_call_output", "call_id": calls[0].call_id, "output": "21 degrees"}]
    second = c.responses.create(**{**body, "input": history, "tool_choice": "auto", "max_output_tokens": 8})
    first_turn = c.responses.create(**{**body, "tool_choice": "auto", "max_output_tokens": 8})
    assert second.usage.input_tokens > first_turn.usage.input_tokens    # the call's output is in the prompt


def test_client_unsupported_fields_are_400s(server):
    import openai
    for kwargs, param in [({"previous_response_id": "resp_1"}, "previous_response_id"),
                          ({"store": True}, "store"), ({"background": True}, "background"),
                          ({"tools": [{"type": "web_search"}]}, "tools[0].type")]:
        with pytest.raises(openai.BadRequestError) as raised:
            server.client.responses.create(model="stories260K", input="Hi", max_output_tokens=4, **kwargs)
        assert raised.value.body["param"] == param
