"""Tool-call formats: parsing recorded outputs per family, detection on real chat
templates, the generic system prompt, and grammars compiled by llguidance
against real vocabularies (a valid call passes, a schema violation does not).

RECORDED is also what test_stream.py checks the stream parser against."""
import copy
import json
import pickle
import re

import pytest

from conftest import SHARED, require_module
from pyforge.server.tools import FORMATS, Tool, ToolChoice, detect_format
from pyforge.structured import llg_tokenizer
from pyforge.tokenizer import Tokenizer

MODELS, VOCAB = SHARED / "models", SHARED / "vocab"

W = {"city": "Paris", "unit": "c"}
TRICKY = {"query": 'naïve "quoted" {braces} [x] back\\slash 日本語 😀', "note": "</tool_call> ] } inside",
          "odd": 'he said "} and left \\', "ctl": "tab\tnewline\n\u0001"}
NESTED = {"filter": {"tags": ["a", "b"], "range": {"from": 1, "to": [2, 3.5]}, "ok": True, "none": None},
          "empty": {}, "list": []}


def j(obj):
    return json.dumps(obj, ensure_ascii=False)


def hermes(name, args, key="arguments"):
    return f'<tool_call>\n{{"name": "{name}", "{key}": {j(args)}}}\n</tool_call>'


# (family, output text, expected content, expected calls [(name, arguments)])
RECORDED = [
    ("hermes", hermes("get_weather", W), None, [("get_weather", W)]),
    ("hermes", hermes("get_weather", W) + "\n" + hermes("get_time", {"tz": "CET"}), None,
     [("get_weather", W), ("get_time", {"tz": "CET"})]),
    ("hermes", "I'll look that up.\n" + hermes("get_weather", W), "I'll look that up.", [("get_weather", W)]),
    ("hermes", hermes("search", TRICKY), None, [("search", TRICKY)]),
    ("hermes", hermes("search", NESTED), None, [("search", NESTED)]),
    ("hermes", "The weather in Paris is sunny, 24 °C.", "The weather in Paris is sunny, 24 °C.", []),
    ("hermes", '<tool_call>\n{"name": "get_weather", arguments: {}}\n</tool_call>',
     '<tool_call>\n{"name": "get_weather", arguments: {}}\n</tool_call>', []),
    ("hermes", '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}', None,
     [("get_weather", {"city": "Rome"})]),                                          # Qwen: no closing tag
    ("hermes", '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n', None,
     [("get_weather", {"city": "Rome"})]),
    ("hermes", '<tool_call>\n{"arguments": {"city": "Oslo"}, "name": "get_weather"}\n</tool_call>', None,
     [("get_weather", {"city": "Oslo"})]),                                          # arguments first
    ("hermes", '<tool_call>{"name": "f", "arguments": "{\\"a\\": 1}"}</tool_call>', None, [("f", {"a": 1})]),
    ("hermes", hermes("get_weather", W) + "\nDone, anything else?", "Done, anything else?", [("get_weather", W)]),
    ("hermes", 'Sure <tool_call>\n{"na', 'Sure <tool_call>\n{"na', []),               # cut before the name
    ("hermes", "Use the <tool_call> tag to call tools.", "Use the <tool_call> tag to call tools.", []),
    ("hermes", 'A <tool_call>{"nme": "f"}</tool_call> B ' + hermes("g", {}), 'A <tool_call>{"nme": "f"}</tool_call> B',
     [("g", {})]),
    ("hermes", "<tool_call>" + hermes("g", {}), "<tool_call>", [("g", {})]),
    ("llama3_json", '<|python_tag|>{"name": "get_weather", "parameters": ' + j(W) + "}", None, [("get_weather", W)]),
    ("llama3_json", '{"name": "get_weather", "parameters": ' + j(W) + "}", None, [("get_weather", W)]),
    ("llama3_json", '\n\n{"name": "get_weather", "arguments": ' + j(W) + "}", None, [("get_weather", W)]),
    ("llama3_json", '{"name": "a", "parameters": {"x": 1}}; {"name": "b", "parameters": ' + j(NESTED) + "}", None,
     [("a", {"x": 1}), ("b", NESTED)]),
    ("llama3_json", '<|python_tag|>{"name": "search", "parameters": ' + j(TRICKY) + "}", None, [("search", TRICKY)]),
    ("llama3_json", "It is sunny in Paris.", "It is sunny in Paris.", []),
    ("llama3_json", "The set {1, 2} is small.", "The set {1, 2} is small.", []),
    ("llama3_json", '{"function": "get_weather", "parameters": {"city": "Paris"}}',
     '{"function": "get_weather", "parameters": {"city": "Paris"}}', []),
    ("llama3_json", '{"name": "get_weather"}', '{"name": "get_weather"}', []),
    ("llama3_json", '<|python_tag|>brave_search.call(query="weather")',
     '<|python_tag|>brave_search.call(query="weather")', []),
    ("llama3_json", '{"name": "a", "parameters": {}} Let me know.', "Let me know.", [("a", {})]),
    ("llama3_json", '{"name": "a", "parameters": {}}; oops', "; oops", [("a", {})]),
    ("llama3_json", 'Calling. <|python_tag|>{"name": "a", "parameters": {}}', "Calling.", [("a", {})]),
    ("mistral", '[TOOL_CALLS] [{"name": "get_weather", "arguments": ' + j(W) + "}]", None, [("get_weather", W)]),
    ("mistral", '[TOOL_CALLS][{"name": "get_weather", "arguments": ' + j(W) + '}, '
     '{"name": "get_time", "arguments": {}}]', None, [("get_weather", W), ("get_time", {})]),
    ("mistral", "[TOOL_CALLS]get_weather[ARGS]" + j(W), None, [("get_weather", W)]),
    ("mistral", "[TOOL_CALLS]get_weather[ARGS]" + j(W) + '[TOOL_CALLS]get_time[ARGS]{"tz": "CET"}', None,
     [("get_weather", W), ("get_time", {"tz": "CET"})]),
    ("mistral", 'Let me check. [TOOL_CALLS] [{"name": "search", "arguments": ' + j(TRICKY) + "}]", "Let me check.",
     [("search", TRICKY)]),
    ("mistral", "[TOOL_CALLS]search[ARGS]" + j(NESTED), None, [("search", NESTED)]),
    ("mistral", "Bonjour ! Il fait beau à Paris.", "Bonjour ! Il fait beau à Paris.", []),
    ("mistral", "[TOOL_CALLS] not json", "[TOOL_CALLS] not json", []),
    ("mistral", "[TOOL_CALLS]get weather[ARGS]{}", "[TOOL_CALLS]get weather[ARGS]{}", []),
    ("mistral", '[TOOL_CALLS] [{"name": "a", "arguments": {"x": 1}, "id": "abc123def"}]', None, [("a", {"x": 1})]),
    ("mistral", '[TOOL_CALLS] {"name": "a", "arguments": {}}', None, [("a", {})]),
    ("mistral", '[TOOL_CALLS] [{"name": "a", "arguments": {}}, {"bad": 1}]', ', {"bad": 1}]', [("a", {})]),
    ("generic", '{"tool_calls": [{"name": "get_weather", "arguments": ' + j(W) + "}]}", None, [("get_weather", W)]),
    ("generic", '{"tool_calls": [{"name": "a", "arguments": ' + j(TRICKY) + '}, {"name": "b", "arguments": {}}]}',
     None, [("a", TRICKY), ("b", {})]),
    ("generic", ' {"tool_call": {"name": "a", "arguments": ' + j(NESTED) + "}}\n", None, [("a", NESTED)]),
    ("generic", '{"response": "Hello! How can I help?"}', "Hello! How can I help?", []),
    ("generic", '{"response": "Line1\\nLine2 \\"q\\" é"}', 'Line1\nLine2 "q" é', []),
    ("generic", "  Hello there\n", "Hello there", []),
    ("generic", '{"tool_calls": [{"name": "x", "arguments": {}}', '{"tool_calls": [{"name": "x", "arguments": {}}', []),
    ("generic", '{"foo": 1}', '{"foo": 1}', []),
    ("generic", '{"tool_calls": [{"name": "x"}]}', '{"tool_calls": [{"name": "x"}]}', []),
]


@pytest.mark.parametrize("family,text,content,calls", RECORDED, ids=[f"{c[0]}-{i}" for i, c in enumerate(RECORDED)])
def test_parse_recorded(family, text, content, calls):
    got_content, got_calls = FORMATS[family].parse(text)
    assert got_content == content
    assert [(c.name, json.loads(c.arguments)) for c in got_calls] == calls
    for call in got_calls:
        assert re.fullmatch(r"call_[0-9a-zA-Z]{24}", call.id)
        assert call.arguments == json.dumps(json.loads(call.arguments), ensure_ascii=False)    # compact form
    assert len({c.id for c in got_calls}) == len(got_calls)


def test_parse_never_raises_on_deep_nesting():
    deep = "[" * 100000
    for name, fmt in FORMATS.items():
        text = {"hermes": "<tool_call>", "mistral": "[TOOL_CALLS]", "llama3_json": ""}.get(name, "") + \
            '{"name": "a", "arguments": ' + deep
        content, calls = fmt.parse(text)
        assert content == text.strip() and calls == []


# -- detection -----------------------------------------------------------------
def _templates():
    return json.loads((MODELS / "ollama-chat-templates" / "index.json").read_text())


def test_detect_on_ollama_templates():
    seen = set()
    for entry in _templates():
        template = entry["template"]
        # the only template here that teaches tool calls is Llama 3.1's (JSON calls, ipython)
        expected = "llama3_json" if "Environment: ipython" in template else "generic"
        assert detect_format(template) == expected, entry["name"]
        assert FORMATS[expected].template_supports_tools(template) == (expected != "generic"), entry["name"]
        seen.add(expected)
    assert seen == {"llama3_json", "generic"}


def test_detect_qwen25_is_hermes():
    config = json.loads((MODELS / "Qwen2.5-0.5B-Instruct" / "tokenizer_config.json").read_text())
    assert detect_format(config["chat_template"]) == "hermes"
    assert FORMATS["hermes"].template_supports_tools(config["chat_template"])


def test_detect_mistral_and_fallbacks():
    mistral = ("{%- for message in messages %}{%- if message.tool_calls %}{{ '[TOOL_CALLS][' }}"
               "{%- for call in message.tool_calls %}{{ call.function | tojson }}{% endfor %}{{ ']' }}"
               "{%- endif %}{%- endfor %}"
               "{%- if tools %}[AVAILABLE_TOOLS]{{ tools | tojson }}[/AVAILABLE_TOOLS]{% endif %}")
    assert detect_format(mistral) == "mistral"
    assert FORMATS["mistral"].template_supports_tools(mistral)
    assert detect_format(None) == detect_format("") == "generic"
    assert not FORMATS["generic"].template_supports_tools(None)
    assert not FORMATS["hermes"].template_supports_tools("{{ builtin_tools_x }}{{ custom_tools }}")


def test_generic_system_prompt_lists_the_schemas():
    tools = [Tool("get_weather", "Weather now", {"type": "object", "properties": {"city": {"type": "string"}}}),
             Tool("ping", None, {"type": "object", "properties": {}})]
    prompt = FORMATS["generic"].system_prompt(tools)
    listed = json.loads(prompt[prompt.index("["):prompt.index("]\n\n") + 1])
    assert listed == [{"name": "get_weather", "description": "Weather now", "parameters": tools[0].parameters},
                      {"name": "ping", "parameters": tools[1].parameters}]
    assert '"tool_calls"' in prompt and '"response"' in prompt
    with pytest.raises(NotImplementedError):
        FORMATS["hermes"].system_prompt(tools)


# -- grammars --------------------------------------------------------------------
WEATHER = Tool("get_weather", "Current weather", {
    "type": "object", "properties": {"city": {"type": "string"}, "unit": {"enum": ["c", "f"]}},
    "required": ["city"], "additionalProperties": False})
ORDER = Tool("place_order", None, {
    "type": "object", "properties": {"items": {"type": "array", "items": {"$ref": "#/$defs/item"}}},
    "required": ["items"], "$defs": {"item": {"type": "object", "properties": {"sku": {"type": "string"},
                                                                              "qty": {"type": "integer"}},
                                              "required": ["sku", "qty"]}}})
TOOLS = [WEATHER, ORDER]
GOOD_W, BAD_W = {"city": 'Saint-Étienne "centre" {x}', "unit": "c"}, {"city": 5}
GOOD_O, BAD_O = {"items": [{"sku": "A-1", "qty": 2}]}, {"items": [{"sku": "A-1", "qty": "two"}]}


def _gguf_meta(name, cache_dir):
    """The tokenizer keys of a shared GGUF vocabulary, cached between runs (GGUFReader is slow)."""
    path = VOCAB / f"ggml-vocab-{name}.gguf"
    cached = cache_dir / f"{path.stem}-{path.stat().st_size}-{path.stat().st_mtime_ns}.pickle"   # as test_tokenizer
    if cached.is_file():
        return pickle.loads(cached.read_bytes())
    reader = require_module("gguf").GGUFReader(str(path))
    meta = {k: f.contents() for k, f in reader.fields.items() if k.startswith(("tokenizer.", "general."))}
    cached.write_bytes(pickle.dumps(meta))
    return meta


def _renamed(meta, names):
    """Llama 3.1 and Qwen2.5 keep their predecessors' vocabularies and name some reserved tokens."""
    meta = copy.copy(meta)
    tokens = list(meta["tokenizer.ggml.tokens"])
    for token_id, text in names.items():
        tokens[token_id] = text
    meta["tokenizer.ggml.tokens"] = tokens
    return meta


def _with_control_tokens(meta, texts):
    """A Llama-2 vocabulary plus control tokens, standing in for Mistral v3's [TOOL_CALLS] / [ARGS]."""
    meta = copy.copy(meta)
    meta["tokenizer.ggml.tokens"] = [*meta["tokenizer.ggml.tokens"], *texts]
    meta["tokenizer.ggml.scores"] = [*meta["tokenizer.ggml.scores"], *[0.0] * len(texts)]
    meta["tokenizer.ggml.token_type"] = [*meta["tokenizer.ggml.token_type"], *[3] * len(texts)]
    return meta


VOCABS = {
    # Qwen2's vocabulary with Qwen2.5's <tool_call> / </tool_call> (ordinary added tokens, not special)
    "qwen2.5": lambda c: Tokenizer.from_gguf_metadata(_renamed(_gguf_meta("qwen2", c),
                                                               {151657: "<tool_call>", 151658: "</tool_call>"})),
    # Llama 3's vocabulary with Llama 3.1's <|eom_id|> and <|python_tag|> (control tokens)
    "llama3.1": lambda c: Tokenizer.from_gguf_metadata(_renamed(_gguf_meta("llama-bpe", c),
                                                                {128008: "<|eom_id|>", 128010: "<|python_tag|>"})),
    "mistral-v3": lambda c: Tokenizer.from_gguf_metadata(_with_control_tokens(_gguf_meta("llama-spm", c),
                                                                              ["[TOOL_CALLS]"])),
    "mistral-v11": lambda c: Tokenizer.from_gguf_metadata(_with_control_tokens(_gguf_meta("llama-spm", c),
                                                                               ["[TOOL_CALLS]", "[ARGS]"])),
    "llama2": lambda c: Tokenizer.from_hf_folder(MODELS / "TinyLlama-1.1B-Chat-v1.0"),
}


@pytest.fixture(scope="module")
def vocab(pytestconfig):
    """name -> (Tokenizer, LLTokenizer, special_ids), built once per module."""
    require_module("llguidance")
    cache_dir, built = pytestconfig.cache.mkdir("pyforge-gguf-tokenizer-metadata"), {}

    def get(name):
        if name not in built:
            tk = VOCABS[name](cache_dir)

            def special_ids(text):
                token_id = tk.token_to_id(text)
                return token_id if token_id is not None and tk.is_special(token_id) else None
            built[name] = tk, llg_tokenizer(tk), special_ids
        return built[name]
    return get


def _hermes(calls):
    return "\n".join(hermes(n, a) for n, a in calls)


def _llama3(calls, tag=True):
    return ("<|python_tag|>" if tag else "") + "; ".join(f'{{"name": "{n}", "parameters": {j(a)}}}' for n, a in calls)


def _mistral_list(calls):
    return "[TOOL_CALLS] [" + ", ".join(f'{{"name": "{n}", "arguments": {j(a)}}}' for n, a in calls) + "]"


def _mistral_named(calls):
    return "".join(f"[TOOL_CALLS]{n}[ARGS]{j(a)}" for n, a in calls)


def _generic(calls):
    return '{"tool_calls": [' + ", ".join(f'{{"name": "{n}", "arguments": {j(a)}}}' for n, a in calls) + "]}"


# family, vocabulary, writer of calls, text that is no call (None: the format has no free text),
# whether calls written this way may follow text
GRAMMAR_CASES = [
    ("hermes", "qwen2.5", _hermes, "The weather is fine.\nSee <b>tags</b> {x}.", True),
    ("hermes", "llama2", _hermes, "Plain text.", True),
    ("llama3_json", "llama3.1", _llama3, "It is sunny, {maybe}.", True),
    ("llama3_json", "llama3.1", lambda calls: _llama3(calls, tag=False), "Sure.", False),
    ("llama3_json", "llama2", _llama3, "It is sunny.", True),                 # <|python_tag|> as text
    ("mistral", "llama2", _mistral_list, "Bonjour.", True),
    ("mistral", "mistral-v3", _mistral_list, "Bonjour.", True),
    ("mistral", "mistral-v11", _mistral_named, "Bonjour.", True),
    ("generic", "llama2", _generic, None, False),
]
CASE_IDS = [f"{c[0]}-{c[1]}-{i}" for i, c in enumerate(GRAMMAR_CASES)]


def _matches(vocab_entry, grammar, text):
    import llguidance
    tk, llg, _ = vocab_entry
    matcher = llguidance.LLMatcher(llg, grammar, log_level=0)
    return matcher.consume_tokens(tk.encode(text, add_bos=False)) and matcher.is_accepting() and not matcher.is_error()


def _grammar(vocab_entry, family, choice, parallel=True):
    import llguidance
    grammar = FORMATS[family].grammar(TOOLS, choice, parallel, vocab_entry[2])
    assert llguidance.LLMatcher.validate_grammar(grammar, vocab_entry[1]) == "", grammar
    return grammar


@pytest.mark.parametrize("family,vocab_name,write,free_text,after_text", GRAMMAR_CASES, ids=CASE_IDS)
def test_grammar_required(vocab, family, vocab_name, write, free_text, after_text):
    entry = vocab(vocab_name)
    grammar = _grammar(entry, family, ToolChoice("required"))
    assert _matches(entry, grammar, write([("get_weather", GOOD_W)]))
    assert _matches(entry, grammar, write([("place_order", GOOD_O)]))
    assert _matches(entry, grammar, write([("get_weather", GOOD_W), ("place_order", GOOD_O)]))
    assert not _matches(entry, grammar, write([("get_weather", BAD_W)]))
    assert not _matches(entry, grammar, write([("place_order", BAD_O)]))
    assert not _matches(entry, grammar, write([("get_time", {})]))         # no such tool
    if free_text is not None:
        assert not _matches(entry, grammar, free_text)
    single = _grammar(entry, family, ToolChoice("required"), parallel=False)
    assert _matches(entry, single, write([("get_weather", GOOD_W)]))
    assert not _matches(entry, single, write([("get_weather", GOOD_W), ("place_order", GOOD_O)]))


@pytest.mark.parametrize("family,vocab_name,write,free_text,after_text", GRAMMAR_CASES, ids=CASE_IDS)
def test_grammar_named_function(vocab, family, vocab_name, write, free_text, after_text):
    entry = vocab(vocab_name)
    grammar = _grammar(entry, family, ToolChoice("function", "place_order"))
    assert _matches(entry, grammar, write([("place_order", GOOD_O)]))
    assert not _matches(entry, grammar, write([("get_weather", GOOD_W)]))
    assert not _matches(entry, grammar, write([("place_order", BAD_O)]))
    assert not _matches(entry, grammar, write([("place_order", GOOD_O), ("place_order", GOOD_O)]))


@pytest.mark.parametrize("family,vocab_name,write,free_text,after_text", GRAMMAR_CASES, ids=CASE_IDS)
def test_grammar_auto(vocab, family, vocab_name, write, free_text, after_text):
    entry = vocab(vocab_name)
    grammar = _grammar(entry, family, ToolChoice("auto"))
    assert _matches(entry, grammar, write([("get_weather", GOOD_W)]))
    assert _matches(entry, grammar, write([("get_weather", GOOD_W), ("place_order", GOOD_O)]))
    assert not _matches(entry, grammar, write([("get_weather", BAD_W)]))
    assert not _matches(entry, grammar, write([("place_order", BAD_O)]))
    if free_text is not None:
        assert _matches(entry, grammar, free_text)
    if after_text:
        assert _matches(entry, grammar, free_text + " " + write([("get_weather", GOOD_W)]))
        assert not _matches(entry, grammar, free_text + " " + write([("get_weather", BAD_W)]))
    if free_text is None:
        assert _matches(entry, grammar, '{"response": "Hi! \\"Quoted\\" {text}."}')


def test_grammar_none_when_no_call_allowed():
    for fmt in FORMATS.values():
        assert fmt.grammar(TOOLS, ToolChoice("none"), True, lambda text: None) is None
        with pytest.raises(ValueError):
            fmt.grammar(TOOLS, ToolChoice("function", "missing"), True, lambda text: None)


@pytest.mark.parametrize("family,vocab_name,expected", [
    ("hermes", "qwen2.5", ['"<tool_call>"', '"</tool_call>"']),       # Qwen2.5's are ordinary added tokens
    ("llama3_json", "llama3.1", ["<[128010]>"]),
    ("mistral", "llama2", ['"[TOOL_CALLS]"', '"["']),
    ("mistral", "mistral-v3", ["<[32000]>", '"["']),
    ("mistral", "mistral-v11", ["<[32000]>", "<[32001]>"]),
])
def test_grammar_openers_by_vocabulary(vocab, family, vocab_name, expected):
    tk, _, special_ids = vocab(vocab_name)
    grammar = FORMATS[family].grammar(TOOLS, ToolChoice("required"), True, special_ids)
    assert all(piece in grammar for piece in expected), grammar
    if vocab_name == "qwen2.5":
        assert tk.encode("<tool_call>", add_bos=False) == [151657] and not tk.is_special(151657)


def test_grammar_auto_single_call_and_broken_opener(vocab):
    entry = vocab("qwen2.5")
    single = _grammar(entry, "hermes", ToolChoice("auto"), parallel=False)
    one, two = _hermes([("get_weather", GOOD_W)]), _hermes([("get_weather", GOOD_W), ("place_order", GOOD_O)])
    assert _matches(entry, single, "Checking.\n" + one + "\nDone.")
    assert not _matches(entry, single, two)
    assert not _matches(entry, single, one + "\nAnd <tool_call> again")
    many = _grammar(entry, "hermes", ToolChoice("auto"))
    assert not _matches(entry, many, "Text <tool_call>\nnot a call\n</tool_call>")
    assert not _matches(entry, many, one + "\nthen <tool_call>{}")


def test_grammar_auto_allows_an_empty_answer(vocab):
    for family, name in [("hermes", "qwen2.5"), ("llama3_json", "llama3.1"), ("mistral", "mistral-v3")]:
        entry = vocab(name)
        assert _matches(entry, _grammar(entry, family, ToolChoice("auto")), "")
