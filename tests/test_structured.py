r"""pyforge/structured.py on the structured-output corpora in tests/data/structured/.

The corpora are constraints that tests/server/test_structured_corpus.py sends through
a random-weight model (whose outputs must satisfy them, and must END, whatever tokens
it picks); tests/structured_corpus.py loads them:

    schemas.json    {"name", "schema", "example"[, "slow": true]}   JSON schemas (draft 2020-12)
    regexes.json    {"name", "regex", "example"}                    whole output must match
    choices.json    {"name", "choices", "example"}                  output is one of the strings
    grammars.json   {"name", "syntax": "gbnf"|"lark", "grammar", "check_regex", "example"}
    invalid.json    {"name", "kind", "value"}                       constraints llguidance rejects

Here every entry's grammar_for grammar must compile against TinyLlama's vocabulary
(llg_tokenizer) with no error and no warning (so the corpus only uses what llguidance
fully supports), its hand-written example must be valid and accepted token by token,
every invalid entry must be a ConstraintError, the coverage the corpus claims must
hold, and a sampler that picks uniformly among the allowed tokens (a stand-in for a
random-weight model) must end within MAX_TOKENS with a valid output. Entries marked
"slow" (unbounded object keys or recursion) are compiled and checked, but left out of
that last check.

Findings the later tests depend on (llguidance 1.9):
- JSON whitespace: grammar_for allows JSON_WHITESPACE between tokens (one space, or a
  line break and up to 20 spaces or tabs), none before the value or after it, so
  json.dumps's ", " / ": ", indent=2 and compact forms all pass and a random model
  cannot emit whitespace forever. A schema's "x-guidance" overrides it only through
  "whitespace_pattern": {"whitespace_flexible": false} alone leaves it in force.
- Properties come in the order of "properties"; optional ones may be left out.
- A number with a decimal multipleOf has exactly that many decimals or none
  (multipleOf 0.25: "2.75", "2.50" and "3" but not "2.5"); numbers never take an
  exponent once bounded. Decimal multipleOf steps here are binary fractions (0.5,
  0.25): jsonschema's float check calls 0.07 no multiple of 0.01.
- Regex classes \d, \w and \s are Unicode-wide, with newer Unicode tables than
  Python 3.11's re: \d let the model write "+08２ 93۱ 784 88\U0001e5f2", which re
  refuses. The corpus writes ASCII classes ([0-9]).
- "date" allows February 29 in every year and year 0000, which Python's date (and so
  jsonschema's format checker) refuses: outputs are checked with a lenient checker.
- TinyLlama's SentencePiece encoder prepends a space ("a" -> "▁a", bytes b" a").
  llguidance tokenizes forced text with the wrapper's __call__ and then allows only
  those tokens, so structured._Vocabulary.__call__ returns tokens of exactly the
  text's bytes; with a plain encode() the mask allows " a" where the grammar forces
  "a", and the matcher then refuses it.
"""
import json
import re
import zlib

import pytest

from conftest import SHARED, require_module
from structured_corpus import (CHOICES, FAST_SCHEMAS, GRAMMARS, INVALID, REGEXES, SCHEMAS, assert_valid,
                               names)

from pyforge.structured import ConstraintError, Constraints, _Vocabulary, grammar_for, llg_tokenizer

TINYLLAMA = SHARED / "models" / "TinyLlama-1.1B-Chat-v1.0"

MAX_TOKENS = 200        # an output must end within this many tokens
WALKS = 10              # uniform-sampler runs per entry
COMPACT = {"whitespace_pattern": ""}     # a schema's x-guidance asking for json.dumps(x, separators=(",", ":"))


# -- fixtures ------------------------------------------------------------------
@pytest.fixture(scope="module")
def llg():
    return require_module("llguidance")


@pytest.fixture(scope="module")
def jsonschema():
    return require_module("jsonschema")


@pytest.fixture(scope="module")
def np():
    return require_module("numpy")


@pytest.fixture(scope="module")
def tk():
    if not (TINYLLAMA / "tokenizer.json").exists():
        pytest.skip(f"the TinyLlama tokenizer is not at {TINYLLAMA}")
    from pyforge.tokenizer import Tokenizer
    return Tokenizer.from_hf_folder(TINYLLAMA)


@pytest.fixture(scope="module")
def tok(llg, tk):
    return llg_tokenizer(tk)


@pytest.fixture(scope="module")
def encode(tk):
    """Text -> token ids of exactly its bytes, as llguidance tokenizes forced text."""
    return _Vocabulary(tk)


# -- helpers -------------------------------------------------------------------
def _schema_grammar(schema, x_guidance=None):
    if x_guidance is not None:
        schema = dict(schema, **{"x-guidance": x_guidance})
    return grammar_for("json_schema", schema)


def _assert_compiles(llg, tok, grammar):
    message = llg.LLMatcher.validate_grammar(grammar, tok)
    assert message == "", message           # "WARNING: ..." fails too


def _assert_accepts(llg, tok, encode, grammar, text):
    """The matcher takes `text` token by token (as the model's BPE and llguidance's
    greedy tokenization split it) and may stop there."""
    data = text.encode()
    for how, ids in (("encode", encode(text)), ("greedy", tok.greedy_tokenize(text))):
        assert tok.decode_bytes(ids) == data, how
        matcher = llg.LLMatcher(tok, grammar, log_level=0)
        assert matcher.consume_tokens(ids), f"{how}: {text!r} refused: {matcher.get_error()[:300]}"
        assert matcher.is_accepting(), f"{how}: {text!r} is only a prefix of an output"


def _refuses(llg, tok, encode, grammar, text):
    matcher = llg.LLMatcher(tok, grammar, log_level=0)
    return not (matcher.consume_tokens(encode(text)) and matcher.is_accepting())


def _walk(llg, np, tok, grammar, rng):
    """One output of a sampler that picks uniformly among the tokens the grammar allows
    (EOS among them once the output may end); None if it does not end in MAX_TOKENS."""
    matcher = llg.LLMatcher(tok, grammar, log_level=0)
    eos = set(tok.eos_tokens)
    out = []
    while not matcher.is_stopped():
        if len(out) >= MAX_TOKENS:
            return None
        bits = np.unpackbits(np.frombuffer(matcher.compute_bitmask(), dtype=np.uint8), bitorder="little")
        allowed = np.flatnonzero(bits[:tok.vocab_size])
        assert allowed.size, f"no token allowed after {tok.decode_bytes(out)!r}"
        token = int(rng.choice(allowed))
        if token in eos:
            assert matcher.is_accepting()
            break
        assert matcher.consume_token(token), matcher.get_error()[:300]
        out.append(token)
    return tok.decode_bytes(out).decode("utf-8")


def _walks(llg, np, tok, grammar, name):
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    outputs = [_walk(llg, np, tok, grammar, rng) for _ in range(WALKS)]
    assert None not in outputs, f"{outputs.count(None)} of {WALKS} outputs ran past {MAX_TOKENS} tokens"
    return outputs


# -- schema structure ------------------------------------------------------------
_SUBSCHEMA_MAPS = ("properties", "patternProperties", "$defs")
_SUBSCHEMA_LISTS = ("prefixItems", "anyOf", "oneOf", "allOf")


def _subschemas(node):
    """(key, subschema) for each schema directly inside `node`."""
    for key in _SUBSCHEMA_MAPS:
        for name, sub in node.get(key, {}).items():
            yield f"{key}/{name}", sub
    for key in _SUBSCHEMA_LISTS:
        for i, sub in enumerate(node.get(key, [])):
            yield f"{key}/{i}", sub
    for key in ("items", "additionalProperties"):
        if isinstance(node.get(key), dict):
            yield key, node[key]


def _nodes(schema, path="#", depth=0):
    """(path, node, object nesting depth) for every schema node."""
    if not isinstance(schema, dict):
        return
    depth += schema.get("type") == "object"
    yield path, schema, depth
    for key, sub in _subschemas(schema):
        yield from _nodes(sub, f"{path}/{key}", depth)


def _types(node):
    t = node.get("type", [])
    return [t] if isinstance(t, str) else t


_UNBOUNDED_REPEAT = re.compile(r"(?<!\\)[*+]|\{[0-9]+,\}")
_BOUNDED_FORMATS = {"date", "uuid", "ipv4", "ipv6"}


def _string_bounded(node):
    if "enum" in node or "const" in node:
        return True
    if node.get("maxLength", 10**9) <= 12 or node.get("format") in _BOUNDED_FORMATS:
        return True
    if "format" in node and node.get("maxLength", 10**9) <= 40:
        return True
    if "pattern" in node and not _UNBOUNDED_REPEAT.search(node["pattern"]):
        return True
    if any(_string_bounded(b) for b in node.get("allOf", [])):
        return True
    branches = node.get("anyOf", []) + node.get("oneOf", [])
    return bool(branches) and all(_string_bounded(b) for b in branches)


def _merged(node):
    """`node` with its allOf branches' keywords folded in (allOf's numeric bounds)."""
    merged = dict(node)
    for branch in node.get("allOf", []):
        merged.update(branch)
    return merged


def _unbounded(schema):
    """Where an output could grow without bound: strings without a small maxLength
    (or enum/const/format/bounded pattern), arrays without maxItems <= 3, numbers
    without both bounds, objects open to extra keys."""
    problems = []
    for path, node, _ in _nodes(schema):
        if re.search(r"/allOf/[0-9]+$", path):
            continue        # its keywords count in the merged parent
        node = _merged(node)
        types = _types(node)
        if "enum" in node or "const" in node:
            continue
        if "string" in types and not _string_bounded(node):
            problems.append(f"{path}: string")
        if "array" in types and not (node.get("maxItems", 10**9) <= 3
                                     or (node.get("items") is False and len(node.get("prefixItems", [])) <= 3)):
            problems.append(f"{path}: array")
        if {"number", "integer"} & set(types) and not (
                {"minimum", "exclusiveMinimum"} & node.keys() and {"maximum", "exclusiveMaximum"} & node.keys()):
            problems.append(f"{path}: number")
        if "object" in types:
            if node.get("additionalProperties") is not False:
                problems.append(f"{path}: object keys")
            elif node.get("patternProperties") and (
                    node.get("maxProperties", 10**9) > 3
                    or any(_UNBOUNDED_REPEAT.search(p) for p in node["patternProperties"])):
                problems.append(f"{path}: patternProperties")
    return problems


# -- the corpora's shape -----------------------------------------------------------
@pytest.mark.parametrize("entries,fields,least", [
    (SCHEMAS, {"name", "schema", "example"}, 60),
    (REGEXES, {"name", "regex", "example"}, 15),
    (CHOICES, {"name", "choices", "example"}, 8),
    (GRAMMARS, {"name", "syntax", "grammar", "check_regex", "example"}, 8),
    (INVALID, {"name", "kind", "value"}, 12),
], ids=["schemas", "regexes", "choices", "grammars", "invalid"])
def test_corpus_shape(entries, fields, least):
    assert len(entries) >= least
    entry_names = names(entries)
    assert len(set(entry_names)) == len(entry_names), "names must be unique"
    for e in entries:
        assert fields <= e.keys() <= fields | {"slow"}, e["name"]
        assert re.fullmatch(r"[a-z0-9_]+", e["name"]), e["name"]


def test_corpus_mix():
    assert len(FAST_SCHEMAS) >= 60
    syntaxes = [g["syntax"] for g in GRAMMARS]
    assert syntaxes.count("gbnf") >= 4 and syntaxes.count("lark") >= 4
    assert all(re.match(r"\s*(#.*\n\s*)*root\s*::=", g["grammar"]) for g in GRAMMARS if g["syntax"] == "gbnf")
    assert all(re.search(r"^start\s*:", g["grammar"], re.M) for g in GRAMMARS if g["syntax"] == "lark")
    kinds = {e["kind"] for e in INVALID}
    assert kinds == {"json_schema", "regex", "grammar_gbnf", "grammar_lark", "choice"}
    choices = [c for e in CHOICES for c in e["choices"]]
    assert any(not c.isascii() for c in choices) and any(" " in c for c in choices)
    assert any(a != b and b.startswith(a) for e in CHOICES for a in e["choices"] for b in e["choices"])
    # a leading space could be lost: SentencePiece decoding drops one leading space
    assert not any(c.startswith(" ") for c in choices)
    # llguidance's \d, \w and \s are Unicode classes with newer tables than Python's re: ASCII classes only
    patterns = [e["regex"] for e in REGEXES] + [g[k] for g in GRAMMARS for k in ("grammar", "check_regex")]
    patterns += [n["pattern"] for e in SCHEMAS for _, n, _ in _nodes(e["schema"]) if "pattern" in n]
    assert not any(re.search(r"\\[dwsDWS]", p) for p in patterns)


def _entries_with(predicate):
    return {e["name"] for e in SCHEMAS if any(predicate(node) for _, node, _ in _nodes(e["schema"]))}


COVERAGE = {     # feature -> (test on a schema node, least number of entries using it)
    **{f"type {t}": ((lambda t: lambda n: t in _types(n))(t), 4)
       for t in ("object", "array", "string", "number", "integer", "boolean", "null")},
    **{kw: ((lambda kw: lambda n: kw in n)(kw), 3) for kw in (
        "enum", "const", "items", "prefixItems", "minItems", "maxItems", "pattern", "minLength", "maxLength",
        "anyOf", "oneOf", "allOf", "$ref", "$defs", "required", "minimum", "maximum",
        "exclusiveMinimum", "exclusiveMaximum", "multipleOf")},
    **{f"format {f}": ((lambda f: lambda n: n.get("format") == f)(f), 2)
       for f in ("date", "time", "date-time", "email", "uuid", "ipv4")},
    "type list": (lambda n: isinstance(n.get("type"), list), 3),
    "type list with null": (lambda n: isinstance(n.get("type"), list) and "null" in n["type"], 3),
    "additionalProperties false": (lambda n: n.get("additionalProperties") is False, 30),
    "additionalProperties schema or true": (lambda n: n.get("additionalProperties") not in (None, False), 2),
    "patternProperties": (lambda n: "patternProperties" in n, 2),
    "maxProperties": (lambda n: "maxProperties" in n, 2),
    "optional property": (lambda n: "properties" in n and set(n["properties"]) - set(n.get("required", [])), 10),
    "integer multipleOf": (lambda n: "integer" in _types(n) and "multipleOf" in n, 2),
    "number multipleOf": (lambda n: "number" in _types(n) and "multipleOf" in n, 2),
    "tuple closed by items: false": (lambda n: "prefixItems" in n and n.get("items") is False, 2),
    "array of objects": (lambda n: isinstance(n.get("items"), dict) and "object" in _types(n["items"]), 2),
}


@pytest.mark.parametrize("feature", list(COVERAGE))
def test_schema_coverage(feature):
    predicate, least = COVERAGE[feature]
    users = _entries_with(predicate)
    assert len(users) >= least, f"{feature}: only {sorted(users)}"


def test_schema_coverage_nesting_and_realism():
    deep = {e["name"] for e in SCHEMAS if max(d for _, _, d in _nodes(e["schema"])) >= 3}
    assert len(deep) >= 3, sorted(deep)
    schema_names = set(names(SCHEMAS))
    assert {"user_profile", "order_with_line_items", "weather_tool_arguments", "calendar_event",
            "classification_result"} <= schema_names
    # oneOf branches must be provably disjoint for llguidance: every oneOf entry compiles below
    assert len([n for n in schema_names if n.startswith("one_of") or n == "tool_call_union"]) >= 3


# -- schemas -----------------------------------------------------------------
@pytest.mark.parametrize("entry", SCHEMAS, ids=names(SCHEMAS))
def test_schema_is_valid_draft_2020_12(jsonschema, entry):
    jsonschema.Draft202012Validator.check_schema(entry["schema"])


@pytest.mark.parametrize("entry", SCHEMAS, ids=names(SCHEMAS))
def test_schema_compiles(llg, tok, entry):
    _assert_compiles(llg, tok, _schema_grammar(entry["schema"]))
    _assert_compiles(llg, tok, _schema_grammar(entry["schema"], COMPACT))


@pytest.mark.parametrize("entry", SCHEMAS, ids=names(SCHEMAS))
def test_schema_example(llg, tok, encode, jsonschema, entry):
    schema, example = entry["schema"], entry["example"]
    assert_valid(schema, example)
    grammar = _schema_grammar(schema)
    _assert_accepts(llg, tok, encode, grammar, json.dumps(example))                      # ", " and ": "
    _assert_accepts(llg, tok, encode, grammar, json.dumps(example, indent=2))
    _assert_accepts(llg, tok, encode, grammar, json.dumps(example, separators=(",", ":")))
    _assert_accepts(llg, tok, encode, _schema_grammar(schema, COMPACT), json.dumps(example, separators=(",", ":")))


@pytest.mark.parametrize("entry", FAST_SCHEMAS, ids=names(FAST_SCHEMAS))
def test_schema_is_bounded(entry):
    assert _unbounded(entry["schema"]) == []


def _recursive(schema):
    """Whether a definition refers to itself (outputs of unbounded depth)."""
    defs = schema.get("$defs", {})
    return any(f'"#/$defs/{name}"' in json.dumps(sub) for name, sub in defs.items())


def test_slow_schemas_are_the_unbounded_ones():
    for e in SCHEMAS:
        assert bool(e.get("slow")) == bool(_unbounded(e["schema"]) or _recursive(e["schema"])), e["name"]


@pytest.mark.parametrize("entry", FAST_SCHEMAS, ids=names(FAST_SCHEMAS))
def test_schema_random_outputs_end_and_validate(llg, np, tok, jsonschema, entry):
    for text in _walks(llg, np, tok, _schema_grammar(entry["schema"]), entry["name"]):
        assert_valid(entry["schema"], json.loads(text))


def test_json_whitespace_rules(llg, tok, tk, encode):
    """What the JSON grammar accepts around and between tokens (see the module notes)."""
    schema = {"type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 9}},
              "required": ["a"], "additionalProperties": False}
    grammar, compact = _schema_grammar(schema), _schema_grammar(schema, COMPACT)
    for text in ('{"a":1}', '{"a": 1}', '{ "a" : 1 }', '{\n\t"a":\n 1\n}', '{\n' + " " * 20 + '"a":1}'):
        _assert_accepts(llg, tok, encode, grammar, text)
    for text in (' {"a":1}', '\n{"a":1}', '{"a":1} ', '{"a":1}\n',                  # around the value
                 '{"a":  1}', '{\t"a":1}', '{\n\n"a":1}', '{"a":\r\n1}', '{\n' + " " * 21 + '"a":1}'):
        assert _refuses(llg, tok, encode, grammar, text), repr(text)
    _assert_accepts(llg, tok, encode, compact, '{"a":1}')
    for text in ('{"a": 1}', '{ "a":1}', '{"a" :1}'):
        assert _refuses(llg, tok, encode, compact, text), repr(text)
    # the plain SentencePiece encoding starts with "▁{" (b' {'): refused
    matcher = llg.LLMatcher(tok, grammar, log_level=0)
    assert not matcher.consume_tokens(tk.encode('{"a":1}', add_bos=False))


def test_decimal_multiple_of_takes_its_own_number_of_decimals(llg, tok, encode):
    grammar = _schema_grammar({"type": "number", "multipleOf": 0.25, "minimum": 0, "maximum": 10})
    for text in ("2.75", "2.50", "3"):
        _assert_accepts(llg, tok, encode, grammar, text)
    for text in ("2.5", "2.500", "1e0"):
        assert _refuses(llg, tok, encode, grammar, text), text


# -- regexes, choices, grammars ------------------------------------------------------
@pytest.mark.parametrize("entry", REGEXES, ids=names(REGEXES))
def test_regex(llg, np, tok, encode, entry):
    assert re.fullmatch(entry["regex"], entry["example"])
    grammar = grammar_for("regex", entry["regex"])
    _assert_compiles(llg, tok, grammar)
    _assert_accepts(llg, tok, encode, grammar, entry["example"])
    for text in _walks(llg, np, tok, grammar, entry["name"]):
        assert re.fullmatch(entry["regex"], text), repr(text)


@pytest.mark.parametrize("entry", CHOICES, ids=names(CHOICES))
def test_choice(llg, np, tok, encode, entry):
    assert entry["example"] in entry["choices"]
    assert len(set(entry["choices"])) == len(entry["choices"]) and all(entry["choices"])
    grammar = grammar_for("choice", entry["choices"])
    _assert_compiles(llg, tok, grammar)
    for choice in entry["choices"]:
        _assert_accepts(llg, tok, encode, grammar, choice)
    for text in _walks(llg, np, tok, grammar, entry["name"]):
        assert text in entry["choices"], repr(text)


@pytest.mark.parametrize("entry", GRAMMARS, ids=names(GRAMMARS))
def test_grammar(llg, np, tok, encode, entry):
    assert re.fullmatch(entry["check_regex"], entry["example"])
    grammar = grammar_for(entry["syntax"], entry["grammar"])
    assert grammar_for("grammar", entry["grammar"]) == grammar      # the request field tells the syntax apart
    _assert_compiles(llg, tok, grammar)
    _assert_accepts(llg, tok, encode, grammar, entry["example"])
    for text in _walks(llg, np, tok, grammar, entry["name"]):
        assert re.fullmatch(entry["check_regex"], text), repr(text)


# -- invalid constraints --------------------------------------------------------------
_KINDS = {"json_schema": "json_schema", "regex": "regex", "grammar_gbnf": "gbnf", "grammar_lark": "lark",
          "choice": "choice"}


@pytest.fixture(scope="module")
def constraints(llg, tk):
    return Constraints(tk)


@pytest.mark.parametrize("entry", INVALID, ids=names(INVALID))
def test_invalid_is_rejected(constraints, entry):
    with pytest.raises(ConstraintError, match="."):
        constraints.grammar(_KINDS[entry["kind"]], entry["value"])
