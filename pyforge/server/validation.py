"""Request validation: a JSON body -> a GenerationRequest, or an APIError.

Shared by the /v1 and /api routes, so both accept and reject the same things.
Rules: unknown fields are ignored; null means "not set"; every rejection is a
400 naming the offending `param` (404 for an unknown model, 413 for a body
over the limit); a prompt that leaves no room for one generated token is
rejected, never truncated. Ranges of the sampling fields are SamplingParams'
own checks, so the engine and the app cannot disagree.
"""
import json
import zlib
from numbers import Integral

from pyforge.engine.sampling_params import MAX_TOP_LOGPROBS, SamplingParams, brief
from pyforge.server import schemas
from pyforge.server.errors import APIError, bad_request
from pyforge.server.fim import fim_ids, fim_token_ids
from pyforge.server.generation import Prompt
from pyforge.server.schemas import MAX_N    # OpenAI's limit on n (the schemas own it)
from pyforge.tokenizer import ChatTemplateError
# request fields passed to SamplingParams under the same name (OpenAI / vLLM names)
SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty",
                   "repetition_penalty", "seed", "ignore_eos", "stop_token_ids", "min_tokens")
# request fields passed to SamplingParams under another name: {request field: SamplingParams field}
RENAMED_FIELDS = {"speculative.n_max": "max_drafts"}       # llama-server's


def read_json(req, limit):
    """The body as a JSON object: 415 unless sent as application/json (plain or
    gzip-encoded), 413 above `limit` bytes (sent or decompressed), 400 if not a
    JSON object of valid Unicode or if it breaks the route's request schema
    (server/schemas.py: types and bounds, before the routes' own checks)."""
    if req.content_type is None or req.content_type.split(";", 1)[0].strip().lower() != "application/json":
        # a form POST from any web page must not reach the engine as JSON
        raise APIError(415, "the request body must be sent as Content-Type: application/json")
    coding = (req.get_header("Content-Encoding") or "identity").strip().lower()
    if coding not in ("identity", "gzip", "x-gzip"):
        raise APIError(415, f"unsupported Content-Encoding {coding[:40]!r} (gzip and identity are)")
    if req.content_length is not None and req.content_length > limit:
        raise APIError(413, f"the request body is larger than {limit} bytes")
    # a chunked body has no Content-Length: bounded_stream would read it as empty
    stream = req.bounded_stream if req.content_length is not None else req.stream
    try:
        raw = stream.read(limit + 1)
    except Exception as e:      # the server's body reader: malformed chunked framing, a body cut short
        if isinstance(e, OSError) and not isinstance(e, TimeoutError):
            raise
        raise bad_request(f"the request body could not be read: {type(e).__name__}") from None
    if len(raw) > limit:
        raise APIError(413, f"the request body is larger than {limit} bytes")
    if coding != "identity":
        raw = _gunzip(raw, limit)
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError) as e:
        raise bad_request(f"the body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise bad_request(f"the body must be a JSON object, got {type(body).__name__}")
    _check_unicode(body)
    return schemas.check(req.uri_template, body)


def _gunzip(data, limit):
    """A gzip body inflated to at most `limit` bytes: a small body that inflates to
    gigabytes (a zip bomb) is a 413, never held in memory. Several gzip members
    in a row are one body (RFC 1952 2.2)."""
    out = b""
    while data:
        inflater = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)    # gzip framing
        try:
            out += inflater.decompress(data, limit + 1 - len(out))
        except zlib.error as e:
            raise bad_request(f"the gzip request body is corrupt: {e}") from None
        if len(out) > limit:
            raise APIError(413, f"the request body is larger than {limit} bytes once decompressed")
        if not inflater.eof:
            raise bad_request("the gzip request body is truncated")
        data = inflater.unused_data
    return out


def _check_unicode(body):
    """A lone surrogate is no Unicode text: no tokenizer or reply can take it. JSON
    makes one from an escape (\\ud800), and json.loads decodes bytes with
    surrogatepass, so raw surrogate bytes make one too: look at the whole body."""
    try:
        json.dumps(body, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise bad_request("the body holds a lone UTF-16 surrogate escape (such as \\ud800), "
                          "which is not valid Unicode") from None
    except (ValueError, RecursionError):     # nesting too deep to write back: it cannot be a request
        raise bad_request("the body is nested too deeply") from None


def sampling_params(body, config, max_tokens_keys=("max_tokens",), logprobs=None, grammar=None, vocab_size=None):
    """SamplingParams from OpenAI / vLLM request fields (null means unset); `grammar`
    is the request's output constraint (server/constraints.py), already checked;
    `vocab_size` bounds logit_bias's token ids (else the engine refuses them)."""
    kwargs = {name: body[name] for name in SAMPLING_FIELDS if body.get(name) is not None}
    kwargs.update({ours: body[theirs] for theirs, ours in RENAMED_FIELDS.items() if body.get(theirs) is not None})
    kwargs["logit_bias"] = parse_logit_bias(body.get("logit_bias"), vocab_size)
    for name, default in (("temperature", config.default_temperature), ("top_p", config.default_top_p)):
        if default is not None:         # the server's default stands in for an omitted field
            kwargs.setdefault(name, default)
    if grammar is not None:
        kwargs["grammar"] = grammar
    max_tokens = next((body[k] for k in max_tokens_keys if body.get(k) is not None), config.default_max_tokens)
    if config.max_tokens_limit is not None and is_int(max_tokens) and max_tokens > config.max_tokens_limit:
        raise bad_request(f"max_tokens must be <= {config.max_tokens_limit}, got {brief(max_tokens)}", "max_tokens")
    try:
        return SamplingParams(max_tokens=max_tokens, logprobs=logprobs, **kwargs)
    except ValueError as e:
        field = str(e).split(" ", 1)[0]
        theirs = {ours: theirs for theirs, ours in RENAMED_FIELDS.items()}
        if field in theirs:
            raise bad_request(f"{theirs[field]} {str(e).split(' ', 1)[1]}", theirs[field]) from None
        named = field in SAMPLING_FIELDS or field in ("max_tokens", "logit_bias")
        raise bad_request(str(e), field if named else None) from None


def parse_logit_bias(value, vocab_size=None):
    """OpenAI's `logit_bias`, {token id as a string: bias}, as (id, bias) pairs (the
    biases' range is SamplingParams' check)."""
    if value is None:
        return ()
    if not isinstance(value, dict):
        raise bad_request(f"logit_bias must be an object of token id: bias, got {brief(value)}", "logit_bias")
    pairs = []
    for key, bias in value.items():
        if not (isinstance(key, str) and key.isascii() and key.isdigit()):
            raise bad_request(f"logit_bias keys must be token ids, got {brief(key)}", "logit_bias")
        token = int(key)
        if vocab_size is not None and token >= vocab_size:
            raise bad_request(f"logit_bias names token {brief(token)}, outside the vocabulary "
                              f"(0..{vocab_size - 1})", "logit_bias")
        pairs.append((token, bias))
    return pairs


def parse_best_of(body, n, stream):
    """Completions `best_of` (>= n; not with stream, as OpenAI): candidates per prompt of
    which the n of highest cumulative logprob are returned; None when there is no choosing."""
    best_of = body.get("best_of")
    if best_of is None or best_of == n:
        return None
    if not is_int(best_of) or not n <= best_of <= MAX_N:
        raise bad_request(f"best_of must be an integer in n..{MAX_N} (n = {n}), got {brief(best_of)}", "best_of")
    if stream:
        raise bad_request("best_of cannot be streamed: the best candidates are known only at the end", "best_of")
    return best_of


def parse_n(body):
    n = body.get("n")
    if n is None:
        return 1
    if not is_int(n) or not 1 <= n <= MAX_N:
        raise bad_request(f"n must be an integer in 1..{MAX_N}, got {brief(n)}", "n")
    return n


def parse_stop(value):
    """`stop`: a string or a list of strings (any number; empty strings are ignored)."""
    if value is None:
        return ()
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise bad_request("stop must be a string or a list of strings", "stop")
    return tuple(s for s in stops if s)


def parse_completion_logprobs(value):
    """Completions `logprobs`: how many top alternatives per token (0..20), or null."""
    if value is None:
        return None
    if not is_int(value) or not 0 <= value <= MAX_TOP_LOGPROBS:
        raise bad_request(f"logprobs must be an integer in 0..{MAX_TOP_LOGPROBS}, got {brief(value)}", "logprobs")
    return value


def parse_chat_logprobs(body):
    """Chat `logprobs` (bool) + `top_logprobs` (0..20) -> top count, or None."""
    want, top = body.get("logprobs"), body.get("top_logprobs")
    if want is not None and not isinstance(want, bool):
        raise bad_request(f"logprobs must be true or false, got {brief(want)}", "logprobs")
    if top is not None:
        if not want:
            raise bad_request("top_logprobs needs logprobs set to true", "top_logprobs")
        if not is_int(top) or not 0 <= top <= MAX_TOP_LOGPROBS:
            raise bad_request(f"top_logprobs must be an integer in 0..{MAX_TOP_LOGPROBS}, got {brief(top)}",
                              "top_logprobs")
    return (top or 0) if want else None


def parse_bool(body, key):
    value = body.get(key)
    if value is not None and not isinstance(value, bool):
        raise bad_request(f"{key} must be true or false, got {brief(value)}", key)
    return bool(value)


def completion_prompts(value, ctx, param="prompt"):
    """`prompt` (or an embeddings `input`): a string, a list of strings, a list of token
    ids or a list of such lists -> [Prompt], each leaving room for one more token."""
    if isinstance(value, str):
        return [_text_prompt(value, ctx, param, param)]
    if not isinstance(value, list) or not value:
        raise bad_request(f"{param} must be a non-empty string, list of strings or list of token ids", param)
    if all(isinstance(p, str) for p in value):
        return [_text_prompt(p, ctx, param, f"{param}[{i}]") for i, p in enumerate(value)]
    if all(is_int(t) for t in value):
        return [_ids_prompt(value, ctx, param, param)]
    if all(isinstance(p, list) for p in value):
        return [_ids_prompt(p, ctx, param, f"{param}[{i}]") for i, p in enumerate(value)]
    raise bad_request(f"{param} must not mix strings, token ids and lists", param)


def fim_prompts(value, suffix, ctx):
    """Completions `prompt` (text) with a `suffix`: fill-in-the-middle prompts (server/fim.py);
    a 400 naming suffix where the model has no FIM tokens."""
    if not isinstance(suffix, str):
        raise bad_request(f"suffix must be a string, got {brief(suffix)}", "suffix")
    fim = fim_token_ids(ctx.tokenizer)
    if fim is None:
        raise bad_request("suffix needs a fill-in-the-middle model; this model's vocabulary has no FIM tokens "
                          "(such as <|fim_prefix|> <|fim_suffix|> <|fim_middle|> or <PRE> <SUF> <MID>)", "suffix")
    texts = [value] if isinstance(value, str) else value
    if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
        raise bad_request("with suffix, prompt must be a string or a list of strings", "prompt")
    return [_checked(Prompt(fim_ids(ctx.tokenizer, fim, t, suffix), t), ctx, "prompt") for t in texts]


def chat_prompt(messages, ctx, **template_kwargs):
    """The rendered chat template of `messages`, tokenized; template_kwargs: template_options(body),
    `tools`, ... (default: a generation prompt after the messages)."""
    text = chat_text(messages, ctx, **template_kwargs)
    return _checked(Prompt(encode_chat(ctx.tokenizer, text), text), ctx, "messages")


def chat_text(messages, ctx, add_generation_prompt=True, **template_kwargs):
    """The rendered chat template of `messages` (a 400 naming `messages` where it fails)."""
    try:
        return ctx.tokenizer.apply_chat_template(check_messages(messages),
                                                 add_generation_prompt=add_generation_prompt, **template_kwargs)
    except ChatTemplateError as e:
        raise bad_request(str(e), "messages") from None


def encode_chat(tok, text):
    """Token ids of a rendered chat: the template usually writes the BOS itself; do not add a second one."""
    bos = tok.id_to_token(tok.bos_id) if tok.bos_id is not None else None
    return tok.encode(text, add_bos=False) if bos and text.startswith(bos) else tok.encode(text)


def template_options(body):
    """The chat template's switches in a chat body (vLLM's names) as chat_prompt keywords:
    `add_generation_prompt` (default true; false when continuing), `continue_final_message`
    (the reply continues the last message) and `chat_template_kwargs` (more template variables)."""
    continued = parse_bool(body, "continue_final_message")
    add = body.get("add_generation_prompt")
    if add is None:
        add = not continued
    elif not isinstance(add, bool):
        raise bad_request(f"add_generation_prompt must be true or false, got {brief(add)}", "add_generation_prompt")
    if add and continued:
        raise bad_request("continue_final_message continues the last message: it needs add_generation_prompt "
                          "false", "continue_final_message")
    extra = body.get("chat_template_kwargs")
    if extra is None:
        extra = {}
    elif not isinstance(extra, dict):
        raise bad_request(f"chat_template_kwargs must be an object, got {brief(extra)}", "chat_template_kwargs")
    taken = sorted(set(extra) & _TEMPLATE_RESERVED)
    if taken:
        raise bad_request(f"chat_template_kwargs must not set {', '.join(taken)} (request fields of their own)",
                          "chat_template_kwargs")
    return {**extra, "add_generation_prompt": add, "continue_final_message": continued}


_TEMPLATE_RESERVED = frozenset(("messages", "tools", "add_generation_prompt", "continue_final_message"))


def check_messages(messages):
    if not isinstance(messages, list) or not messages:
        raise bad_request("messages must be a non-empty list", "messages")
    return [_check_message(m, i) for i, m in enumerate(messages)]


def _check_message(message, i):
    if not isinstance(message, dict) or not isinstance(message.get("role"), str):
        raise bad_request(f"messages[{i}] must be an object with a string role", "messages")
    content = message.get("content")
    if isinstance(content, list):     # content parts: text only, one per line (as vLLM joins them)
        if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                   for p in content):
            raise bad_request(f"messages[{i}].content: only text parts are supported", "messages")
        content = "\n".join(p["text"] for p in content)
    elif content is not None and not isinstance(content, str):
        raise bad_request(f"messages[{i}].content must be a string or a list of text parts", "messages")
    return {**message, "content": content or ""}


def _text_prompt(text, ctx, param, where):
    if not text:
        raise bad_request(f"{where} is empty", param)
    return _checked(Prompt(ctx.tokenizer.encode(text), text), ctx, param, where)


def _ids_prompt(ids, ctx, param, where):
    vocab = ctx.tokenizer.vocab_size
    if not ids:
        raise bad_request(f"{where} is empty", param)
    if not all(is_int(t) and 0 <= t < vocab for t in ids):
        raise bad_request(f"{where}: token ids must be integers in 0..{vocab - 1}", param)
    return _checked(Prompt([int(t) for t in ids]), ctx, param, where)


def _checked(prompt, ctx, param, where=None):
    """Never truncate: a prompt that leaves no room for one new token is an error."""
    n = len(prompt.ids)
    if n >= ctx.max_model_len:
        raise bad_request(
            f"this model's maximum context length is {ctx.max_model_len} tokens; {where or 'the prompt'} has {n} "
            "(a prompt must leave room for at least one generated token; it is never truncated)", param,
            "context_length_exceeded")
    return prompt


def is_int(value):
    return isinstance(value, Integral) and not isinstance(value, bool)
