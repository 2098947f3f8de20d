"""One JSON Schema per request body: the routes check each body against it
(validation.read_json, keyed by the route's URI template) and /openapi.json
publishes the same dicts (server/openapi.py), so the two cannot drift.

    check(route, body)   the body to use (integral numbers as ints where an integer
                         goes), or APIError 400 naming the param when it breaks the
                         route's schema; a route without a schema is not checked
    REQUEST_BODIES       {route: schema}; an alias without /v1 (/chat/completions)
                         uses its /v1 route's schema (body_schema)
    specialised(...)     a schema with this server's limits, for the published spec

The schema says what each field is: type, bounds, shape. Bounds come from the
constants the hand checks use (MAX_TEMPERATURE, MAX_TOP_LOGPROBS, MAX_N,
INT32_MAX), so the spec and the validators agree. What depends on the model or
on other fields (a token id below the vocabulary size, the prompt's length,
top_logprobs needing logprobs, one output constraint per request) stays with
validation.py and the routes. Unknown fields are allowed (clients send extras);
null means "not set" for every optional field. JSON has one number type, so 2.0
is an integer to JSON Schema: check() hands the routes 2 for it where an integer
goes (the hand checks take Python ints only); 2.5 or true is never an integer.
"""
import copy
import functools
from numbers import Integral

from jsonschema import Draft202012Validator, validators

from pyforge.engine.sampling_params import INT32_MAX, MAX_LOGIT_BIAS, MAX_TEMPERATURE, MAX_TOP_LOGPROBS, brief
from pyforge.server.errors import bad_request

MAX_N = 128                 # OpenAI's limit on n


def nullable(schema):
    """`schema`, or null (not set)."""
    kinds = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
    return {**schema, "type": [*kinds, "null"]}


def _number(description, low=None, high=None, *, low_open=False, examples=None):
    schema = {"type": "number", "description": description}
    if low is not None:
        schema["exclusiveMinimum" if low_open else "minimum"] = low
    if high is not None:
        schema["maximum"] = high
    if examples:
        schema["examples"] = examples
    return nullable(schema)


def _integer(description, low=None, high=None, examples=None):
    schema = {"type": "integer", "description": description}
    if low is not None:
        schema["minimum"] = low
    if high is not None:
        schema["maximum"] = high
    if examples:
        schema["examples"] = examples
    return nullable(schema)


def _boolean(description):
    return nullable({"type": "boolean", "description": description, "examples": [True]})


def _string(description, examples=None, **more):
    return nullable({"type": "string", "description": description, **more, "examples": examples or ["x"]})


TOKEN_ID = {"type": "integer", "minimum": 0, "maximum": INT32_MAX,
            "description": "a token id (below the vocabulary size)"}
TEXT = {"type": "string", "minLength": 1, "pattern": r"\S"}        # a regex or grammar: not blank

# -- fields shared by the generation routes ------------------------------------------------

MODEL = _string("The served model to use (GET /v1/models); omitted: the first served model.", ["stories260K"])
MAX_TOKENS = _integer("Most tokens to generate (the server's --max-tokens-limit caps it; default "
                      "--default-max-tokens).", 1, INT32_MAX, [8])
STOP = nullable({"type": ["string", "array"], "items": {"type": "string"}, "examples": [["\n\n"]],
                 "description": "Text that ends generation (not included in the output): a string or a list of "
                                "strings."})
SAMPLING = {
    "temperature": _number("Sampling temperature; 0 is greedy.", 0, MAX_TEMPERATURE, examples=[0.7]),
    "top_p": _number("Nucleus sampling: keep the smallest set of tokens whose probability adds up to top_p.",
                     0, 1, low_open=True, examples=[0.9]),
    "top_k": _integer("Keep the k most likely tokens; 0 or -1: all.", -1, INT32_MAX, [40]),
    "min_p": _number("Drop tokens less likely than min_p times the most likely one.", 0, 1, examples=[0.05]),
    "presence_penalty": _number("Penalty on tokens already generated (OpenAI).", -2, 2, examples=[0.5]),
    "frequency_penalty": _number("Penalty per occurrence of a token already generated (OpenAI).", -2, 2,
                                 examples=[0.5]),
    "repetition_penalty": _number("Divides the logits of tokens in the prompt and output (vLLM); 1: off.", 0,
                                  low_open=True, examples=[1.1]),
    "seed": _integer("Seed of this request's sampler: the same seed gives the same output.", examples=[42]),
    "ignore_eos": _boolean("Keep generating past the end-of-sequence token (vLLM)."),
    "stop_token_ids": nullable({"type": "array", "items": TOKEN_ID, "examples": [[2]],
                                "description": "Token ids that end generation (vLLM)."}),
    "min_tokens": _integer("Tokens to generate before EOS or a stop token may end the output (vLLM; at most "
                           "max_tokens).", 0, INT32_MAX, [1]),
    "logit_bias": nullable({"type": "object",
                            "propertyNames": {"pattern": "^[0-9]+$", "description": "a token id"},
                            "additionalProperties": {"type": "number", "minimum": -MAX_LOGIT_BIAS,
                                                     "maximum": MAX_LOGIT_BIAS},
                            "examples": [{"1": 0.5}],
                            "description": "Added to the logits of the given token ids: token id (as a string) -> "
                                           f"bias in [-{MAX_LOGIT_BIAS:g}, {MAX_LOGIT_BIAS:g}]."}),
    "stop": STOP,
    "user": _string("An id of the end user (OpenAI).", ["user-1"]),
}

# llama-server's per-request draft cap (its key has the dot in it); our n-gram speculative
# decoding takes it when the server runs with --speculative-config
SPECULATION = {
    "speculative.n_max": _integer("Speculative decoding: at most this many drafted tokens per step for this request "
                                  "(llama-server); 0 turns it off for this request. The server's "
                                  "--speculative-config num_speculative_tokens caps it; without that it has no "
                                  "effect. The output is the same either way.", 0, INT32_MAX, [0]),
}

# a JSON schema: an object (llguidance refuses the boolean schemas true and false)
_SCHEMA_VALUE = {"type": "object", "description": "a JSON schema"}
CONSTRAINTS = {     # server/constraints.py: one per request
    "response_format": nullable({
        "type": "object", "required": ["type"],
        "description": "The output's format: text, any JSON object, or JSON matching a schema (OpenAI; "
                       "llama-server's schema key too).",
        "properties": {
            "type": {"enum": ["text", "json_object", "json_schema"], "description": "the kind of output"},
            "json_schema": nullable({"type": "object", "description": "OpenAI's {name, schema, strict}",
                                     "properties": {"name": {"type": "string"},
                                                    "description": {"type": "string"},
                                                    "schema": nullable(_SCHEMA_VALUE),
                                                    "strict": {"type": ["boolean", "null"]}}}),
            "schema": nullable({**_SCHEMA_VALUE, "description": "the output's JSON schema (llama-server)"}),
        },
        # {"type": "json_schema"} needs its schema: in json_schema (OpenAI) or schema (llama-server)
        "if": {"properties": {"type": {"const": "json_schema"}}},
        "then": {"anyOf": [{"required": ["json_schema"], "properties": {"json_schema": {"type": "object"}}},
                           {"required": ["schema"]}],
                 "description": 'an object with "json_schema" (OpenAI) or "schema" (llama-server) for type '
                                'json_schema'},
        "examples": [{"type": "json_object"}]}),
    "json_schema": nullable({**_SCHEMA_VALUE, "examples": [{"type": "object"}],
                             "description": "A JSON schema the output must match (llama-server)."}),
    "grammar": nullable({**TEXT, "examples": ['root ::= "yes" | "no"'],
                         "description": "A grammar the output must match: GBNF (llama-server) or Lark."}),
    "regex": nullable({**TEXT, "examples": ["[a-z]+"], "description": "A regex the output must match (vLLM)."}),
    "choice": nullable({"type": "array", "minItems": 1, "items": {"type": "string", "minLength": 1},
                        "examples": [["yes", "no"]], "description": "The output is one of these strings (vLLM)."}),
    "structured_outputs": nullable({
        "type": "object", "examples": [{"regex": "[a-z]+"}],
        "description": "vLLM's output constraint: one of json, regex, choice, grammar, json_object.",
        "properties": {"json": nullable(_SCHEMA_VALUE), "regex": nullable(TEXT),
                       "choice": nullable({"type": "array", "minItems": 1,
                                           "items": {"type": "string", "minLength": 1}}),
                       "grammar": nullable(TEXT), "json_object": {"type": ["boolean", "null"]}},
        "additionalProperties": {"type": "null", "description": "vLLM's other keys (structural_tag, ...) are not "
                                                                "supported"}}),
    "guided_json": nullable({**_SCHEMA_VALUE, "examples": [{"type": "object"}],
                             "description": "vLLM's older name for structured_outputs.json."}),
    "guided_regex": nullable({**TEXT, "examples": ["[a-z]+"],
                              "description": "vLLM's older structured_outputs.regex."}),
    "guided_choice": nullable({"type": "array", "minItems": 1, "items": {"type": "string", "minLength": 1},
                               "examples": [["yes", "no"]],
                               "description": "vLLM's older structured_outputs.choice."}),
    "guided_grammar": nullable({**TEXT, "examples": ['root ::= "yes" | "no"'],
                                "description": "vLLM's older structured_outputs.grammar."}),
}

STREAM = {
    "stream": _boolean("Answer as a server-sent event stream of chunks, ending with data: [DONE]."),
    "stream_options": nullable({"type": "object", "examples": [{"include_usage": True}],
                                "description": "Stream options: include_usage sends a last chunk with the usage.",
                                "properties": {"include_usage": {"type": ["boolean", "null"]}}}),
}

# -- prompts and messages ---------------------------------------------------------------------

_TEXT_PROMPT = {"type": "string", "minLength": 1}
_IDS_PROMPT = {"type": "array", "minItems": 1, "items": TOKEN_ID}
# (the empty string and list are named before the forms, for a clearer message)
PROMPT = {"type": ["string", "array"], "minLength": 1, "minItems": 1,
          "anyOf": [_TEXT_PROMPT, {"type": "array", "items": _TEXT_PROMPT}, _IDS_PROMPT,
                    {"type": "array", "items": _IDS_PROMPT}],
          "examples": ["Once upon a time"],
          "description": "a non-empty string, a list of strings, a list of token ids or a list of such lists"}
API_PROMPT = {"type": ["string", "array"], "minLength": 1, "minItems": 1,
              "anyOf": [_TEXT_PROMPT, _IDS_PROMPT, {"type": "array", "maxItems": 1, "items": _TEXT_PROMPT},
                        {"type": "array", "maxItems": 1, "items": _IDS_PROMPT}],
              "examples": ["Once upon a time"],
              "description": "one prompt: a non-empty string or a list of token ids"}

_TEXT_PART = {"type": "object", "properties": {"type": {"const": "text"}, "text": {"type": "string"}},
              "required": ["type", "text"]}
_TOOL_CALL = {"type": "object", "required": ["function"], "description": "a call the assistant made",
              "properties": {"id": {"type": "string"}, "type": {"const": "function"},
                             "function": {"type": "object", "description": "{name, arguments (JSON text)}",
                                          "properties": {"name": {"type": "string"},
                                                         "arguments": {"type": ["string", "object"]}}}}}
MESSAGE = {
    "type": "object", "required": ["role"],
    "properties": {
        "role": {"type": "string", "description": "system, user, assistant, tool, ..."},
        "content": {"type": ["string", "array", "null"], "items": _TEXT_PART,
                    "description": "text, or a list of text parts ({type: text, text})"},
        "name": {"type": "string", "description": "the author's name"},
        "tool_calls": {"type": ["array", "null"], "items": _TOOL_CALL,
                       "description": "an assistant's earlier tool calls"},
        "tool_call_id": {"type": "string", "description": "the call a tool message answers"},
    },
}
MESSAGES = {"type": "array", "minItems": 1, "items": MESSAGE,
            "examples": [[{"role": "user", "content": "Hello"}]],
            "description": "The conversation so far, rendered with the model's chat template."}

_TOOL = {"type": "object", "required": ["type", "function"],
         "properties": {
             "type": {"const": "function"},
             "function": {"type": "object", "required": ["name"], "properties": {
                 # the name's pattern (1-64 of [a-zA-Z0-9_-]) is checked by server/tools/request.py, which
                 # names the failing tool's field in `param`
                 "name": {"type": "string", "description": "1 to 64 letters, digits, '_' or '-'"},
                 "description": {"type": ["string", "null"]},
                 "parameters": {"type": ["object", "null"], "description": "JSON schema of the arguments object"},
                 "strict": {"type": ["boolean", "null"]}}}}}
TOOLS = {
    "tools": nullable({"type": "array", "items": _TOOL,
                       "examples": [[{"type": "function", "function": {
                           "name": "get_weather", "parameters": {"type": "object",
                                                                 "properties": {"city": {"type": "string"}}}}}]],
                       "description": "Functions the model may call (OpenAI)."}),
    "tool_choice": {"type": ["string", "object", "null"],
                    "anyOf": [{"enum": ["none", "auto", "required", None]},
                              {"type": "object", "required": ["type", "function"],
                               "properties": {"type": {"const": "function"},
                                              "function": {"type": "object", "required": ["name"],
                                                           "properties": {"name": {"type": "string"}}}}}],
                    "examples": ["auto"],
                    "description": "none, auto, required, or {type: function, function: {name}}"},
    "parallel_tool_calls": _boolean("Whether the model may make several calls in one answer."),
}

CHAT_TEMPLATE = {
    "add_generation_prompt": _boolean("End the rendered prompt with the assistant's turn opener (vLLM; "
                                      "default true)."),
    "continue_final_message": _boolean("Continue the last (assistant) message instead of starting a new one "
                                       "(vLLM)."),
    "chat_template_kwargs": nullable({"type": "object", "examples": [{"enable_thinking": False}],
                                      "description": "Extra variables for the chat template (vLLM)."}),
}

# -- request bodies ---------------------------------------------------------------------------


def _body(description, properties, required=()):
    return {"type": "object", "description": description, "required": list(required),
            "properties": properties, "additionalProperties": True}


COMPLETION = _body("An OpenAI completion request.", {
    "model": MODEL, "prompt": PROMPT, "max_tokens": MAX_TOKENS, **SAMPLING, **SPECULATION,
    "n": _integer("Choices to generate per prompt.", 1, MAX_N, [2]),
    "best_of": _integer("Candidates to sample per prompt (n..128, not streamed), of which the n of highest "
                        "cumulative logprob are returned.", 1, MAX_N, [1]),
    "logprobs": _integer("Log probabilities of each token and of this many likeliest alternatives.", 0,
                         MAX_TOP_LOGPROBS, [2]),
    "echo": _boolean("Repeat the prompt before the completion."),
    "suffix": _string("Text that comes after the completion (OpenAI)."),
    **STREAM, **CONSTRAINTS,
}, ["prompt"])

CHAT_COMPLETION = _body("An OpenAI chat completion request.", {
    "model": MODEL, "messages": MESSAGES, "max_completion_tokens": MAX_TOKENS,
    "max_tokens": {**MAX_TOKENS, "description": "OpenAI's older name of max_completion_tokens."}, **SAMPLING,
    **SPECULATION,
    "n": _integer("Choices to generate.", 1, MAX_N, [2]),
    "logprobs": _boolean("Return the log probability of each generated token."),
    "top_logprobs": _integer("With logprobs: this many likeliest alternatives per token.", 0, MAX_TOP_LOGPROBS,
                             [2]),
    **STREAM, **CONSTRAINTS, **TOOLS, **CHAT_TEMPLATE,
}, ["messages"])

_API = {"model": MODEL, "max_tokens": MAX_TOKENS, **SAMPLING, **SPECULATION, **CONSTRAINTS}
API_GENERATE = _body("A /api generation request: one prompt, one choice.", {"prompt": API_PROMPT, **_API},
                     ["prompt"])
API_CHAT = _body("A /api chat request: one choice, no tools.", {
    "messages": MESSAGES, **_API, **CHAT_TEMPLATE,
    "tools": {"type": "null", "description": "Not taken here (a 400 unless null): use /v1/chat/completions."},
}, ["messages"])

# Routes being built beside this table; shaped as OpenAI's, Anthropic's and vLLM's documentation has them.
# /v1/responses (server/responses_api.py): the top-level types only; the route checks the items itself and
# names the field it found wrong (input[2].role, tools[0].type); the fields it does not honour (store: true,
# previous_response_id, ...) are left out here and refused there, naming them
RESPONSES = _body("An OpenAI Responses API request (stateless).", {
    "model": MODEL,
    "input": {"type": ["string", "array"], "examples": ["Hello"],
              "description": "The input: text, or a list of items: messages {role, content}, function_call, "
                             "function_call_output, reasoning."},
    "instructions": _string("A system message placed first."),
    "max_output_tokens": {**MAX_TOKENS, "description": "Most tokens to generate."},
    **{k: v for k, v in SAMPLING.items() if k != "stop"},
    "stream": _boolean("Answer as a stream of typed events (response.created, response.output_text.delta, ...)."),
    "tools": nullable({"type": "array", "examples": [[{"type": "function", "name": "get_weather", "parameters": {
                           "type": "object", "properties": {"city": {"type": "string"}}}}]],
                       "description": "Function tools {type: function, name, description, parameters, strict}."}),
    "tool_choice": {"type": ["string", "object", "null"], "examples": ["auto"],
                    "description": "none, auto, required or {type: function, name}"},
    "parallel_tool_calls": TOOLS["parallel_tool_calls"],
    "text": nullable({"type": "object", "examples": [{"format": {"type": "json_object"}}],
                      "description": "Output options: format {type: text | json_object | json_schema, name, "
                                     "schema, strict}."}),
    "reasoning": nullable({"type": "object", "examples": [{}],
                           "description": "Reasoning options: none honoured (every key must be null)."}),
    "metadata": nullable({"type": "object", "additionalProperties": {"type": "string"}, "examples": [{"k": "v"}],
                          "description": "String pairs echoed in the response."}),
}, ["input"])
# /v1/messages (server/messages_api.py): top-level types only, as for /v1/responses (the route names the
# block or tool it found wrong, and refuses the fields it does not honour)
ANTHROPIC_MESSAGES = _body("An Anthropic Messages API request.", {
    "model": MODEL,
    "messages": {"type": "array", "examples": [[{"role": "user", "content": "Hello"}]],
                 "description": "The conversation: {role: user | assistant, content: text or blocks (text, "
                                "tool_use, tool_result, thinking)}; a last assistant message is continued."},
    "max_tokens": {**MAX_TOKENS, "type": "integer", "description": "Most tokens to generate (required)."},
    "system": {"type": ["string", "array", "null"], "examples": ["Be brief."],
               "description": "The system prompt: text or a list of text blocks."},
    "stop_sequences": nullable({"type": "array", "examples": [["\n\n"]],
                                "description": "Text that ends generation."}),
    "stream": _boolean("Answer as a stream of named events (message_start, content_block_delta, ...)."),
    "temperature": SAMPLING["temperature"], "top_p": SAMPLING["top_p"], "top_k": SAMPLING["top_k"],
    "metadata": nullable({"type": "object", "examples": [{"user_id": "u1"}],
                          "description": "Request metadata: user_id (logged)."}),
    "tools": nullable({"type": "array", "examples": [[{"name": "get_weather", "input_schema": {"type": "object"}}]],
                       "description": "Tools the model may use: {name, description, input_schema}."}),
    "tool_choice": nullable({"type": "object", "examples": [{"type": "auto"}],
                             "description": "{type: auto | any | tool | none, name, disable_parallel_tool_use}"}),
    "thinking": nullable({"type": "object", "examples": [{"type": "disabled"}],
                          "description": "Extended thinking {type: enabled | adaptive | disabled, budget_tokens} "
                                         "(needs --reasoning-parser, except disabled)."}),
    "output_config": nullable({"type": "object", "examples": [{"format": {"type": "json_schema",
                                                                         "schema": {"type": "object"}}}],
                               "description": "Output options: format {type: json_schema, schema}."}),
    "service_tier": _string("auto or standard_only (one tier here).", ["auto"]),
    "speed": _string("standard only.", ["standard"]),
}, ["messages", "max_tokens"])
ANTHROPIC_COUNT_TOKENS = _body("An Anthropic token-count request: the prompt a Messages request would send.", {
    name: ANTHROPIC_MESSAGES["properties"][name]
    for name in ("model", "messages", "system", "tools", "tool_choice", "thinking", "output_config")}, ["messages"])
TOKENIZE = _body("A vLLM tokenize request: a prompt, or chat messages rendered with the chat template.", {
    "model": MODEL,
    "prompt": _string("Text to tokenize.", ["Hello"]),
    "messages": nullable({**MESSAGES, "description": "Chat messages to render and tokenize (instead of prompt)."}),
    "add_special_tokens": _boolean("Add the tokenizer's special tokens (BOS)."),
    "return_token_strs": _boolean("Also return each token as text."),
    **CHAT_TEMPLATE, "tools": TOOLS["tools"],
})
TOKENIZE["properties"].update({    # llama-server's shape (server/tokenize_routes.py)
    "content": _string("Text to tokenize (llama-server).", ["Hello"]),
    "add_special": _boolean("Add the BOS token (llama-server; default false)."),
    "parse_special": _boolean("Read special-token text as special tokens (llama-server; default true)."),
    "with_pieces": _boolean("Return [{id, piece}] instead of ids (llama-server)."),
})
TOKENIZE["anyOf"] = [{"required": ["prompt"]}, {"required": ["messages"]}, {"required": ["content"]}]
DETOKENIZE = _body("A vLLM detokenize request.", {
    "model": MODEL,
    "tokens": {"type": "array", "items": TOKEN_ID, "examples": [[1, 2]], "description": "Token ids to turn into "
                                                                                        "text."},
}, ["tokens"])

EMBEDDINGS = _body("An OpenAI embeddings request: one vector per input, the final hidden state pooled by the "
                   "server's --pooling and L2-normalised.", {
    "model": MODEL,
    "input": {**PROMPT, "examples": ["The food was delicious"],
              "description": "a non-empty string, a list of strings, a list of token ids or a list of such lists; "
                             "each shorter than the context (never truncated)"},
    "encoding_format": {"type": ["string", "null"], "enum": ["float", "base64", None], "examples": ["float"],
                        "description": "float (a list of numbers; default) or base64 (little-endian float32 bytes)"},
    "dimensions": _integer("The vector's length: only the model's hidden size (vectors are not cut short).", 1,
                           INT32_MAX, [4096]),
    "user": _string("An end-user id (written to the access log)."),
}, ["input"])

REQUEST_BODIES = {
    "/v1/completions": COMPLETION,
    "/v1/chat/completions": CHAT_COMPLETION,
    "/v1/responses": RESPONSES,
    "/v1/messages": ANTHROPIC_MESSAGES,
    "/v1/messages/count_tokens": ANTHROPIC_COUNT_TOKENS,
    "/v1/embeddings": EMBEDDINGS,
    "/tokenize": TOKENIZE,
    "/detokenize": DETOKENIZE,
    "/api/generate": API_GENERATE,
    "/api/completions": API_GENERATE,
    "/api/completions/stream": API_GENERATE,
    "/api/chat": API_CHAT,
    "/api/chat/stream": API_CHAT,
}


def body_schema(route):
    """The request body schema of `route` (a URI template), or None."""
    if route is None:
        return None
    schema = REQUEST_BODIES.get(route)
    if schema is None and not route.startswith("/v1/"):
        schema = REQUEST_BODIES.get("/v1" + route)     # an alias: /chat/completions
    return schema


# -- checking -------------------------------------------------------------------------------


def _is_integer(checker, instance):
    return isinstance(instance, Integral) and not isinstance(instance, bool)


def _items(validator, items, instance, schema):
    """`items`, stopping at the first item that fails (the first error is all check() reports, and a
    prompt of 100,000 token ids must not make 100,000 errors in each anyOf form), with a fast lane for
    a list of bounded integers (token ids)."""
    if not validator.is_type(instance, "array") or items is True:
        return
    bounds = _integer_bounds(items)
    if bounds is not None and instance and set(map(type, instance)) == {int} and \
            bounds[0] <= min(instance) and max(instance) <= bounds[1]:
        return                          # every item a token id: at C speed
    for index, item in enumerate(instance):
        if bounds is not None and type(item) is int and bounds[0] <= item <= bounds[1]:
            continue
        error = next(iter(validator.descend(item, items, path=index)), None)
        if error is not None:
            yield error
            return


def _integer_bounds(schema):
    """(low, high) of a schema that is a bounded integer and nothing more (TOKEN_ID), else None."""
    if not isinstance(schema, dict) or schema.get("type") != "integer" or \
            not set(schema) <= {"type", "minimum", "maximum", "description", "examples"}:
        return None
    return schema.get("minimum", float("-inf")), schema.get("maximum", float("inf"))


# JSON integers only (check() has made integral floats ints where an integer goes: what is left, 1.5
# or true, is none); items stop at the first failure
Validator = validators.extend(
    Draft202012Validator, validators={"items": _items},
    type_checker=Draft202012Validator.TYPE_CHECKER.redefine("integer", _is_integer))


@functools.lru_cache(maxsize=None)
def _route_validator(route):
    schema = body_schema(route)
    return None if schema is None else Validator(schema)


def check(route, body):
    """`body` with JSON's integral numbers as integers where `route`'s schema says integer
    (2.0 is the integer 2 to JSON Schema, and to vLLM); APIError 400 naming the param (the
    failing field) if it breaks the schema. A route without a schema: `body` as it is."""
    checker = _route_validator(route)
    if checker is None:
        return body
    body = integers(checker.schema, body)
    error = next(iter(checker.iter_errors(body)), None)
    if error is not None:
        raise bad_request(*describe(error))
    return body


def integers(schema, value):
    """`value` with each integral float (2.0) that `schema` places where an integer goes made
    an int; nothing else changes. Of anyOf / oneOf forms, the first that then holds decides."""
    if isinstance(value, float):
        return int(value) if value.is_integer() and "integer" in _listed_types(schema) else value
    if isinstance(value, dict):
        properties, extra = schema.get("properties", {}), schema.get("additionalProperties")
        out = {key: integers(properties[key], item) if key in properties
               else integers(extra, item) if isinstance(extra, dict) else item for key, item in value.items()}
    elif isinstance(value, list):
        walk = isinstance(schema.get("items"), dict) and not {float, dict, list}.isdisjoint(map(type, value))
        out = [integers(schema["items"], item) for item in value] if walk else value
    else:
        return value
    for form in schema.get("anyOf", schema.get("oneOf", ())):
        candidate = integers(form, out)
        if candidate is not out and Validator(form).is_valid(candidate):
            return candidate
    return out


def describe(error):
    """(message, param) of a jsonschema ValidationError, in the hand checks' words."""
    path = list(error.absolute_path)
    if error.validator in ("required", "dependentRequired") and isinstance(error.instance, dict):
        missing = next((k for k in _listed(error.validator_value) if k not in error.instance), None)
        if missing is not None:
            path.append(missing)
            return f"{_dotted(path)} is required", str(path[0])
    name = _dotted(path) if path else "the body"
    alternatives = _required_alternatives(error)
    if alternatives:                    # {"anyOf": [{"required": [a]}, {"required": [b]}]}
        return f"{name} needs {_or(alternatives)}", str(path[0]) if path else alternatives[0]
    return _message(name, error), str(path[0]) if path else None


def _required_alternatives(error):
    branches = error.validator_value if error.validator == "anyOf" else None
    if not branches or not all(isinstance(b, dict) and list(b) == ["required"] for b in branches):
        return []
    return [key for b in branches for key in b["required"]]


def _listed(value):
    if isinstance(value, dict):         # dependentRequired: {key: [keys]}
        return [k for keys in value.values() for k in keys]
    return value


def _message(name, error):
    kind, value, schema, got = error.validator, error.validator_value, error.schema, brief(error.instance)
    if kind == "type":
        kinds = value if isinstance(value, list) else [value]
        return f"{name} must be {_or([_TYPE_WORDS.get(k, k) for k in kinds])}, got {got}" + _about(schema)
    if kind in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"):
        return f"{name} must be {_bounds(schema)}, got {got}"
    if kind in ("enum", "const"):
        options = value if kind == "enum" else [value]
        return f"{name} must be {_or([repr(o) for o in options if o is not None])}, got {got}"
    if kind == "minItems":
        return f"{name} must have at least {value} item{'s' if value != 1 else ''}" if value > 1 \
            else f"{name} must be non-empty"
    if kind == "maxItems":
        return f"{name} must have at most {value} item{'s' if value != 1 else ''}, got {len(error.instance)}"
    if kind == "minLength":
        return f"{name} must be a non-empty string"
    if "propertyNames" in error.schema_path:
        return f"{name} has a key that is not {schema.get('description', 'allowed')}: {got}"
    if kind == "pattern":
        return f"{name} must not be blank" if value == TEXT["pattern"] else f"{name} must match {value!r}, got {got}"
    if kind in ("anyOf", "oneOf") and "description" in schema:
        return f"{name} must be {schema['description']}, got {got}"
    return f"{name}: {error.message}"


_TYPE_WORDS = {"string": "a string", "integer": "an integer", "number": "a number", "boolean": "true or false",
               "object": "an object", "array": "a list", "null": "null"}


def _or(words):
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " or " + words[-1]


def _about(schema):
    """What a field is, after a type error: the schema's description if it has one."""
    return f" ({schema['description'].rstrip('.')})" if "description" in schema and len(schema["description"]) \
        < 120 else ""


def _bounds(schema):
    """The bounds as the hand checks write them: [0, 100], (0, 1], >= 1, 0..20."""
    low, high = schema.get("minimum", schema.get("exclusiveMinimum")), schema.get("maximum")
    low_open = "exclusiveMinimum" in schema
    if "integer" in _listed_types(schema):
        if high is None:
            return f">= {low}"
        return f"<= {high}" if low is None else f"in {low}..{high}"
    if high is None:
        return f"> {low:g}" if low_open else f">= {low:g}"
    if low is None:
        return f"<= {high:g}"
    return f"in {'(' if low_open else '['}{low:g}, {high:g}]"


def _listed_types(schema):
    kinds = schema.get("type", [])
    return kinds if isinstance(kinds, list) else [kinds]


def _dotted(path):
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def specialised(schema, max_tokens=None, max_token_id=None, hidden_size=None):
    """A copy of `schema` with this server's limits (for the published spec): max_tokens
    at most `max_tokens`, token ids at most `max_token_id`, embeddings' `dimensions`
    exactly `hidden_size` (when every served model has that one)."""
    def walk(node):
        if isinstance(node, dict):
            if max_token_id is not None and node.get("description") == TOKEN_ID["description"]:
                node["maximum"] = max_token_id
            for key, value in node.items():
                if max_tokens is not None and key in ("max_tokens", "max_completion_tokens", "max_output_tokens") \
                        and isinstance(value, dict) and "maximum" in value:
                    value["maximum"] = min(value["maximum"], max_tokens)
                if hidden_size and key == "dimensions" and isinstance(value, dict) and "maximum" in value:
                    value.update(minimum=hidden_size, maximum=hidden_size, examples=[hidden_size])
                walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)
        return node
    return walk(copy.deepcopy(schema))
