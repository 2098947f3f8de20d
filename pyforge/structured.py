"""Structured output: what a request may generate, as one llguidance grammar.

Both sides use this module. An HTTP worker turns a request's constraint (a JSON
schema, "any JSON object", a regex, a list of choices, a GBNF or Lark grammar)
into an llguidance grammar string with `grammar_for`, checks it against the
vocabulary with `check`, and sends it to the engine in SamplingParams.grammar.
The engine compiles it into one matcher per sequence (engine/guided.py) and
masks each step's logits with it. A constraint llguidance cannot apply is a
ConstraintError (a ValueError: HTTP 400), never an unconstrained answer.
"""
import json
import threading
from collections import OrderedDict
from functools import lru_cache

# Whitespace JSON may hold between tokens: one space, or a line break and up to 20
# characters of indentation (llama.cpp's json-schema-to-grammar allows the same).
# Pretty-printed output passes; a model cannot pad a value with whitespace forever.
# A schema's own "x-guidance": {"whitespace_pattern": ...} overrides it.
JSON_WHITESPACE = r"(?: |\n[ \t]{0,20})?"
ENCODINGS_KEPT = 4096     # forced texts whose tokens a vocabulary remembers


class ConstraintError(ValueError):
    """The constraint is malformed or uses what llguidance does not support."""


def grammar_for(kind, value):
    """The llguidance grammar for a constraint of `kind` ("json_schema": a schema
    object; "json_object": ignored; "regex" / "gbnf" / "lark": text; "grammar":
    GBNF or Lark text, told apart as llama-server does; "choice": strings;
    "llguidance": a grammar already in llguidance's JSON form, passed through)."""
    import llguidance
    try:
        if kind in ("json_object", "json_schema"):
            schema = {"type": "object"} if kind == "json_object" else value
            if not isinstance(schema, (dict, bool)):
                raise ConstraintError("a JSON schema must be an object")
            return llguidance.LLMatcher.grammar_from_json_schema(
                json.dumps(schema), defaults={"whitespace_pattern": JSON_WHITESPACE})
        if kind == "choice":
            return _choice_grammar(value)
        if not isinstance(value, str) or not value.strip():
            raise ConstraintError(f"a {kind} constraint must be a non-empty string")
        if kind == "regex":
            return llguidance.LLMatcher.grammar_from_regex(value)
        if kind == "grammar":
            kind = "lark" if _looks_like_lark(value) else "gbnf"
        return llguidance.grammar_from(kind, value)
    except ConstraintError:
        raise
    except (ValueError, TypeError) as e:
        raise ConstraintError(str(e)) from None


def _choice_grammar(choices):
    import llguidance
    if not isinstance(choices, list) or not choices or not all(isinstance(c, str) and c for c in choices):
        raise ConstraintError("choice must be a non-empty list of non-empty strings")
    # each choice is one literal of an alternation: json.dumps quotes it the way Lark reads strings
    return llguidance.LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in choices))


def _looks_like_lark(text):
    """GBNF rules read `name ::= ...`; Lark's `name: ...` (and %llguidance headers)."""
    return "::=" not in text


def check(grammar, llg_tok):
    """ConstraintError with llguidance's message unless `grammar` compiles against
    the vocabulary `llg_tok` (an LLTokenizer) without errors."""
    import llguidance
    is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, llg_tok)
    if is_error:
        raise ConstraintError(messages[0] if messages else "the grammar is invalid")


class _Vocabulary:
    """What llguidance.TokenizerWrapper reads of a tokenizer: every token's bytes
    (GGUF and tokenizer.json vocabularies alike), the special ids, EOS and BOS."""

    def __init__(self, tokenizer):
        self._tok = tokenizer
        self.eos_token_id = tokenizer.eos_id
        self.bos_token_id = tokenizer.bos_id
        self.tokens = [tokenizer.token_to_piece(i) for i in range(tokenizer.vocab_size)]
        self.special_token_ids = [i for i in range(tokenizer.vocab_size) if tokenizer.is_special(i)]
        # llguidance asks again and again for the same forced text (a schema's keys) while it
        # computes masks, holding the GIL for each call: remember the answers
        self._encode = lru_cache(maxsize=ENCODINGS_KEPT)(self._exact)

    def __call__(self, text):
        return list(self._encode(text))

    def _exact(self, text):
        """Token ids (a tuple) whose bytes are exactly `text`: what llguidance forces
        where the grammar leaves one way on."""
        ids = tuple(self._tok.encode(text, add_bos=False, special=False))
        if self._bytes(ids) == text.encode():
            return ids
        # SentencePiece vocabularies prepend a space to the text; behind a newline they do not
        shifted = self._tok.encode("\n" + text, add_bos=False, special=False)
        for k in range(1, len(shifted)):
            if self._bytes(shifted[:k]).endswith(b"\n"):
                rest = tuple(shifted[k:])
                return rest if self._bytes(rest) == text.encode() else ids
        return ids

    def _bytes(self, ids):
        return b"".join(self._tok.token_to_piece(i) for i in ids)


def llg_tokenizer(tokenizer):
    """An llguidance LLTokenizer over our Tokenizer (tens of milliseconds for a 32k
    vocabulary: build it once per process). Every EOS id ends a grammar."""
    import llguidance
    eos = sorted(tokenizer.eos_ids) or None
    return llguidance.LLTokenizer(llguidance.TokenizerWrapper(_Vocabulary(tokenizer)), eos_token=eos)


class Constraints:
    """A worker's constraint compiler: request values -> checked grammars for one
    vocabulary, whose LLTokenizer is built at the first constrained request.
    Grammars that passed are remembered (a served schema comes again and again,
    and checking one costs about half a millisecond)."""

    def __init__(self, tokenizer, remembered=256):
        self.tokenizer = tokenizer
        self._llg = None
        self._checked = OrderedDict()       # grammar -> None, oldest first
        self._remembered = remembered
        self._lock = threading.Lock()       # a worker's request threads share it

    def grammar(self, kind, value):
        grammar = grammar_for(kind, value)
        with self._lock:
            if grammar in self._checked:
                return grammar
        if self._llg is None:       # a race only builds it twice
            self._llg = llg_tokenizer(self.tokenizer)
        check(grammar, self._llg)
        with self._lock:
            self._checked[grammar] = None
            if len(self._checked) > self._remembered:
                self._checked.popitem(last=False)
        return grammar
