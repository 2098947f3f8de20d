"""Tokenizer routes, at the root as vLLM and llama-server serve them; both servers' shapes.

  POST /tokenize
    vLLM      {"model"?, "prompt": str, "add_special_tokens"?: true, "return_token_strs"?: false}
              {"model"?, "messages": [...], "tools"?, "add_generation_prompt"?, "continue_final_message"?,
               "chat_template_kwargs"?, "add_special_tokens"?, "return_token_strs"?}
              -> {"count", "max_model_len", "tokens": [id], "token_strs": [str] | null}
    llama-server  {"content": str, "add_special"?: false, "parse_special"?: true, "with_pieces"?: false}
              -> {"tokens": [id]}, with_pieces: {"tokens": [{"id", "piece"}]} (a piece that is not
                 whole UTF-8 is its list of byte values, as llama-server writes it)
  POST /detokenize  {"model"?, "tokens": [id]} -> {"prompt": str, "content": str}  (vLLM's key, llama-server's)

Messages are rendered and tokenized as the chat route does (the same tools and template
switches), so `count` is that request's prompt_tokens; `add_special_tokens: false` adds
nothing to the rendered text. A prompt is encoded as /v1/completions encodes it (the
model's BOS) unless `add_special_tokens` / `add_special` is false. Nothing is checked
against the context length: /tokenize is how a client finds out. Detokenizing keeps
special tokens' text (both servers do); an id outside the vocabulary is a 400.
"""

from pyforge.engine.sampling_params import brief
from pyforge.server import validation as v
from pyforge.server.chat import chat_messages
from pyforge.server.errors import bad_request


class Tokenize:
    def __init__(self, models):
        self.models = models

    def on_post(self, req, resp):
        body = v.read_json(req, self.models.config.max_body_bytes)
        ctx = self.models.pick(body.get("model"))
        given = [key for key in ("prompt", "messages", "content") if body.get(key) is not None]
        if len(given) != 1:
            raise bad_request("/tokenize takes one of prompt, messages (vLLM) or content (llama-server)",
                              given[-1] if given else "prompt")
        if given == ["content"]:
            resp.media = _llama_server(body, ctx.tokenizer)
            return
        ids = _chat_ids(body, ctx) if given == ["messages"] else _prompt_ids(body, ctx.tokenizer)
        strs = [ctx.tokenizer.id_to_token(i) for i in ids] if _flag(body, "return_token_strs", False) else None
        resp.media = {"count": len(ids), "max_model_len": ctx.max_model_len, "tokens": ids, "token_strs": strs}


class Detokenize:
    def __init__(self, models):
        self.models = models

    def on_post(self, req, resp):
        body = v.read_json(req, self.models.config.max_body_bytes)
        tok = self.models.pick(body.get("model")).tokenizer
        ids = body.get("tokens")
        if not isinstance(ids, list) or not all(_is_id(t, tok.vocab_size) for t in ids):
            raise bad_request(f"tokens must be a list of token ids in 0..{tok.vocab_size - 1}, got {brief(ids)}",
                              "tokens")
        text = tok.decode(ids, skip_special_tokens=False)
        resp.media = {"prompt": text, "content": text}


def _prompt_ids(body, tok):
    prompt = body["prompt"]
    if not isinstance(prompt, str):
        raise bad_request(f"prompt must be a string, got {brief(prompt)}", "prompt")
    if _flag(body, "add_special_tokens", True):
        return tok.encode(prompt)
    return tok.encode(prompt, add_bos=False, add_eos=False)


def _chat_ids(body, ctx):
    messages, template_kwargs, _, _ = chat_messages(body, ctx)
    text = v.chat_text(messages, ctx, **template_kwargs)
    if _flag(body, "add_special_tokens", True):
        return v.encode_chat(ctx.tokenizer, text)
    return ctx.tokenizer.encode(text, add_bos=False, add_eos=False)


def _llama_server(body, tok):
    content = body["content"]
    if not isinstance(content, str):
        raise bad_request(f"content must be a string, got {brief(content)}", "content")
    add = _flag(body, "add_special", False)
    ids = tok.encode(content, add_bos=None if add else False, add_eos=None if add else False,
                     special=_flag(body, "parse_special", True))
    if not _flag(body, "with_pieces", False):
        return {"tokens": ids}
    return {"tokens": [{"id": i, "piece": _piece(tok.token_to_piece(i))} for i in ids]}


def _piece(raw):
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return list(raw)


def _flag(body, key, default):
    return v.parse_bool(body, key) if body.get(key) is not None else default


def _is_id(value, vocab_size):
    return v.is_int(value) and 0 <= value < vocab_size


def add_routes(app, models):
    app.add_route("/tokenize", Tokenize(models))
    app.add_route("/detokenize", Detokenize(models))
