"""Request fields that constrain the output -> one checked llguidance grammar.

Accepted forms (at most one per request; two are a 400, as is any constraint
llguidance cannot apply — never a 200 with unconstrained text):

  response_format   {"type": "text"}                               no constraint
                    {"type": "json_object"}                        any JSON object
                    {"type": "json_object", "schema": {...}}       (llama-server)
                    {"type": "json_schema", "json_schema": {"name", "schema", "strict"}}   (OpenAI)
                    {"type": "json_schema", "schema": {...}}       (llama-server)
  json_schema       a schema object                                (llama-server; our /api)
  grammar           GBNF (llama-server) or Lark (llguidance) text
  regex, choice     a regex; a list of strings                     (vLLM)
  structured_outputs  {"json" | "regex" | "choice" | "grammar": ...}   (vLLM's extra body)
  guided_json, guided_regex, guided_choice, guided_grammar         (vLLM's older names)
"""
from pyforge.engine.sampling_params import brief
from pyforge.server.errors import bad_request
from pyforge.structured import ConstraintError

# top-level field -> constraint kind
_FIELDS = {"json_schema": "json_schema", "grammar": "grammar", "regex": "regex", "choice": "choice",
           "guided_json": "json_schema", "guided_regex": "regex", "guided_choice": "choice",
           "guided_grammar": "grammar"}
# structured_outputs key -> constraint kind
_STRUCTURED_OUTPUTS = {"json": "json_schema", "regex": "regex", "choice": "choice", "grammar": "grammar",
                       "json_object": "json_object"}


def request_grammar(body, constraints):
    """The grammar the request's output must match, or None; APIError 400 naming
    the field when a constraint is malformed, unsupported or not alone."""
    found = _response_format(body.get("response_format"))
    found += [(field, kind, body[field]) for field, kind in _FIELDS.items() if body.get(field) is not None]
    found += _structured_outputs(body.get("structured_outputs"))
    if not found:
        return None
    if len(found) > 1:
        names = ", ".join(sorted({field for field, _, _ in found}))
        raise bad_request(f"a request takes one output constraint; this one has several ({names})", found[1][0])
    field, kind, value = found[0]
    try:
        return constraints.grammar(kind, value)
    except ConstraintError as e:
        raise bad_request(f"{field}: {e}", field, "invalid_constraint") from None


def _response_format(fmt):
    if fmt is None:
        return []
    field = "response_format"
    if not isinstance(fmt, dict) or not isinstance(fmt.get("type"), str):
        raise bad_request("response_format must be an object with a string type", field)
    kind = fmt["type"]
    if kind == "text":
        return []
    if kind == "json_object":
        schema = fmt.get("schema")
        return [(field, "json_object", None)] if schema is None else [(field, "json_schema", schema)]
    if kind == "json_schema":
        spec = fmt.get("json_schema")
        if spec is None and "schema" in fmt:
            return [(field, "json_schema", fmt["schema"])]
        if not isinstance(spec, dict):
            raise bad_request("response_format.json_schema must be an object with a schema", field)
        schema = spec.get("schema")
        return [(field, "json_object", None)] if schema is None else [(field, "json_schema", schema)]
    raise bad_request(f"response_format type must be text, json_object or json_schema, got {brief(kind)}", field)


def _structured_outputs(value):
    if value is None:
        return []
    field = "structured_outputs"
    if not isinstance(value, dict):
        raise bad_request("structured_outputs must be an object", field)
    unknown = [k for k, v in value.items() if k not in _STRUCTURED_OUTPUTS and v is not None]
    if unknown:
        # vLLM's other keys (structural_tag, whitespace_pattern, ...) are not honoured here: say so
        raise bad_request(f"structured_outputs.{brief(unknown[0])} is not supported; "
                          f"use one of {', '.join(_STRUCTURED_OUTPUTS)}", field)
    return [(field, _STRUCTURED_OUTPUTS[k], v) for k, v in value.items() if v is not None and v is not False]
