"""The stream parser against parse(): for every recorded output and every way of
cutting it into two chunks (and char by char), the deltas rebuild parse()'s
content and calls; plus the shape of the deltas, hold-back and what is left
when an output is cut short."""
import json
import random
import re

import pytest

from pyforge.server.tools import FORMATS, ContentDelta, ToolCallDelta
from test_formats import RECORDED, hermes


def run(family, chunks):
    parser = FORMATS[family].stream_parser()
    out = []
    for chunk in chunks:
        out += parser.feed(chunk)
    return out + parser.finish()


def rebuild(deltas):
    """(content, [(id, name, arguments text)]) as a client assembles them."""
    content, calls = "", {}
    for d in deltas:
        if isinstance(d, ContentDelta):
            content += d.text
            continue
        if d.name is not None:
            assert d.index == len(calls) and d.id is not None and d.arguments == ""
            calls[d.index] = [d.id, d.name, ""]
        else:
            assert d.id is None and d.index in calls
            calls[d.index][2] += d.arguments
    return content, [tuple(c) for c in calls.values()]


def assert_same_as_parse(family, text, deltas):
    content, calls = FORMATS[family].parse(text)
    got_content, got_calls = rebuild(deltas)
    assert got_content == (content or "")
    assert [(name, json.loads(args)) for _, name, args in got_calls] == \
        [(c.name, json.loads(c.arguments)) for c in calls]
    for call_id, _, args in got_calls:
        assert re.fullmatch(r"call_[0-9a-zA-Z]{24}", call_id)
        assert isinstance(json.loads(args), dict)
    assert all(d.text for d in deltas if isinstance(d, ContentDelta))       # no empty content deltas


@pytest.mark.parametrize("family,text", [(c[0], c[1]) for c in RECORDED],
                         ids=[f"{c[0]}-{i}" for i, c in enumerate(RECORDED)])
def test_every_split_matches_parse(family, text):
    for cut in range(len(text) + 1):
        assert_same_as_parse(family, text, run(family, [text[:cut], text[cut:]]))
    assert_same_as_parse(family, text, run(family, list(text)))
    rng = random.Random(len(text))
    for _ in range(20):
        cuts = sorted(rng.sample(range(len(text) + 1), min(5, len(text) + 1)))
        chunks = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
        assert_same_as_parse(family, text, run(family, chunks))


def test_held_back_until_decided():
    parser = FORMATS["hermes"].stream_parser()
    assert parser.feed("Hello <tool") == [ContentDelta("Hello")]
    assert parser.feed("box> is") == [ContentDelta(" <toolbox> is")]
    assert parser.feed(" here.\n<tool_") == [ContentDelta(" here.")]
    deltas = parser.feed('call>\n{"name": "f", "arguments": {"a": ')
    assert [type(d) for d in deltas] == [ToolCallDelta, ToolCallDelta]
    assert (deltas[0].index, deltas[0].name, deltas[0].arguments) == (0, "f", "")
    assert (deltas[1].id, deltas[1].name, deltas[1].arguments) == (None, None, '{"a": ')
    assert parser.feed('"x}"}') == [ToolCallDelta(0, None, None, '"x}"}')]
    assert parser.feed("}\n</tool_call>") == []
    assert parser.finish() == []


def test_arguments_stream_before_the_call_closes():
    text = hermes("search", {"query": "a long query " * 5, "n": 3})
    parser = FORMATS["hermes"].stream_parser()
    pieces = []
    for i, ch in enumerate(text):
        for d in parser.feed(ch):
            if isinstance(d, ToolCallDelta) and d.name is None:
                pieces.append((i, d.arguments))
    assert len(pieces) > 20 and pieces[0][0] < text.index('"n"')
    assert json.loads("".join(p for _, p in pieces)) == {"query": "a long query " * 5, "n": 3}


@pytest.mark.parametrize("family,text", [
    ("hermes", '<tool_call>{"arguments": {"a": 1}, "name": "f"}</tool_call>'),
    ("llama3_json", '{"parameters": {"a": 1}, "name": "f"}'),
    ("mistral", '[TOOL_CALLS] [{"id": "x1", "name": "f", "arguments": {"a": 1}}]'),
    ("hermes", '<tool_call>{"name": "f", "arguments": "{\\"a\\": 1}"}</tool_call>'),
])
def test_unstreamable_calls_come_whole(family, text):
    deltas = run(family, list(text))
    assert deltas[0] == ToolCallDelta(0, deltas[0].id, "f", "")
    assert deltas[1:] == [ToolCallDelta(0, None, None, '{"a": 1}')]


def test_indices_follow_output_order():
    text = "\n".join(hermes(name, {"i": i}) for i, name in enumerate("abc"))
    deltas = run("hermes", [text])
    starts = [(d.index, d.name) for d in deltas if isinstance(d, ToolCallDelta) and d.name]
    assert starts == [(0, "a"), (1, "b"), (2, "c")]
    assert len({d.id for d in deltas if d.id}) == 3


def test_call_cut_before_its_name_is_text():
    for text in ['Sure. <tool_call>\n{"name": "get_we', "Sure. <tool_call>", "Sure. <tool_c"]:
        assert rebuild(run("hermes", list(text))) == (text, [])


def test_call_cut_after_its_name_stays_partial():
    """The documented exception: once the name went out the call is the client's;
    parse() of the same text calls it text (finish_reason "length" tells the two apart)."""
    text = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Par'
    content, calls = rebuild(run("hermes", list(text)))
    assert content == "" and [(name, args) for _, name, args in calls] == [("get_weather", '{"city": "Par')]
    assert FORMATS["hermes"].parse(text) == (text, [])


def test_generic_streams_text_and_holds_json():
    parser = FORMATS["generic"].stream_parser()
    assert parser.feed("  ") == []
    assert parser.feed("Hello") == [ContentDelta("Hello")]
    assert parser.feed(" world \n") == [ContentDelta(" world")]
    assert parser.finish() == []
    parser = FORMATS["generic"].stream_parser()
    assert parser.feed('\n{"response": "Hi') == []
    assert parser.feed('"}') == []
    assert parser.finish() == [ContentDelta("Hi")]


def test_deep_nesting_is_text():
    text = '<tool_call>{"name": "a", "arguments": ' + "[" * 100000
    assert rebuild(run("hermes", [text[:5000], text[5000:]])) == (text, [])
