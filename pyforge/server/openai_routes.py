"""OpenAI-compatible routes: /v1/completions, /v1/chat/completions, /v1/models (each also
without the /v1, as llama-server serves them).

Response shapes follow the OpenAI API reference (and vLLM where OpenAI is
silent): `text_completion` / `chat.completion` objects, `*.chunk` objects in
streams, `usage` with `prompt_tokens_details.cached_tokens`, and with
`stream_options.include_usage` one last chunk with `choices: []` and the usage
(every earlier chunk then carries `"usage": null`). Every response and chunk
carries `system_fingerprint` (server/fingerprint.py).

Completions: `echo` with `logprobs` lists the prompt's tokens first (the first with
logprob null); `best_of` returns the n of best_of candidates of highest cumulative
logprob; `suffix` builds a fill-in-the-middle prompt (server/fim.py).
"""
import dataclasses
import time
import uuid

from pyforge.engine.sampling_params import brief
from pyforge.server import generation as g
from pyforge.server.constraints import request_grammar
from pyforge.server import validation as v
from pyforge.server.chat import chat_request
from pyforge.server.errors import APIError, bad_request
from pyforge.tokenizer import IncrementalDetokenizer


class _OpenAIGeneration:
    """POST handler shared by the two generation routes; subclasses name the
    request parser, the id prefix, the object type and the reply formatters."""

    parse = id_prefix = object_type = reply = chunks = None

    def __init__(self, models):
        self.models = models

    def on_post(self, req, resp):
        with self.models.serving(req) as (body, ctx, timer):
            request, stream, include_usage, reply = self.parse(body, ctx)
            fmt = _Format(ctx, self.id_prefix, self.object_type, include_usage, reply)
            g.run(ctx, resp, timer, request, stream=stream,
                  to_json=lambda results, usage: getattr(fmt, self.reply)(request, results, usage),
                  to_chunks=getattr(fmt, self.chunks), client_gone=g.connection_watch(req))


class Completions(_OpenAIGeneration):
    parse = staticmethod(lambda body, ctx: _completion_request(body, ctx))   # defined below
    id_prefix, object_type, reply, chunks = "cmpl", "text_completion", "completion", "completion_chunks"


class ChatCompletions(_OpenAIGeneration):
    parse = staticmethod(lambda body, ctx: _chat_request(body, ctx))
    id_prefix, object_type, reply, chunks = "chatcmpl", "chat.completion", "chat", "chat_chunks"


class Models:
    def __init__(self, models):
        self.models = models

    def on_get(self, req, resp):
        resp.media = {"object": "list", "data": [_card(ctx) for ctx in self.models]}

    def on_get_one(self, req, resp, model):
        ctx = self.models.by_name.get(model)
        if ctx is None:
            raise APIError(404, f"the model {brief(model)} does not exist", param="model", code="model_not_found")
        resp.media = _card(ctx)


def _card(ctx):
    return {"id": ctx.model_name, "object": "model", "created": ctx.created,
            "owned_by": "pyforge", "max_model_len": ctx.max_model_len}


def add_routes(app, models):
    completions, chat, listing = Completions(models), ChatCompletions(models), Models(models)
    for prefix in ("/v1", ""):      # llama-server serves them without the /v1 too
        app.add_route(f"{prefix}/completions", completions)
        app.add_route(f"{prefix}/chat/completions", chat)
        app.add_route(f"{prefix}/models", listing)
        # {model:path}: ids such as TinyLlama/TinyLlama-1.1B-Chat-v1.0 hold slashes
        app.add_route(f"{prefix}/models/{{model:path}}", listing, suffix="one")


# -- requests -------------------------------------------------------------------

def _completion_request(body, ctx):
    logprobs = v.parse_completion_logprobs(body.get("logprobs"))
    echo = v.parse_bool(body, "echo")
    params = v.sampling_params(body, ctx.config, ("max_tokens",), logprobs, request_grammar(body, ctx.constraints),
                               vocab_size=ctx.facts.vocab_size)
    if echo and logprobs is not None:       # the prompt's tokens get logprobs too
        params = dataclasses.replace(params, prompt_logprobs=logprobs)
    suffix = body.get("suffix")
    prompts = (v.completion_prompts(body.get("prompt"), ctx) if suffix is None or suffix == "" else
               v.fim_prompts(body.get("prompt"), suffix, ctx))
    n = v.parse_n(body)
    stream, include_usage = _stream_flags(body)
    request = g.GenerationRequest(prompts, params, n, v.parse_stop(body.get("stop")), echo,
                                  best_of=v.parse_best_of(body, n, stream))
    return request, stream, include_usage, None


def _chat_request(body, ctx):
    prompt, params, reply, keep_special = chat_request(body, ctx, v.parse_chat_logprobs(body))
    request = g.GenerationRequest([prompt], params, v.parse_n(body), v.parse_stop(body.get("stop")),
                                  keep_special=keep_special)
    return (request, *_stream_flags(body), reply)


def _stream_flags(body):
    stream = v.parse_bool(body, "stream")
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise bad_request("stream_options must be an object", "stream_options")
    include_usage = stream and options is not None and v.parse_bool(options, "include_usage")
    return stream, include_usage


# -- responses ------------------------------------------------------------------

class _Format:
    """Builds one request's response objects; every chunk shares id and created."""

    def __init__(self, ctx, id_prefix, object_name, include_usage, reply=None):
        self.tok = ctx.tokenizer
        self.reply = reply          # chat: a ChatReply (reasoning, tool calls)
        self.keepalive = ctx.config.keepalive_interval
        self.include_usage = include_usage
        self.id = f"{id_prefix}-{uuid.uuid4().hex}"
        self.object = object_name
        # OpenAI names completion stream chunks text_completion too; chat ones chat.completion.chunk
        self.chunk_object = object_name + ".chunk" if object_name.startswith("chat") else object_name
        self.created = int(time.time())
        self.model = ctx.model_name
        self.fingerprint = ctx.system_fingerprint

    def _body(self, choices, usage):
        return {"id": self.id, "object": self.object, "created": self.created, "model": self.model,
                "system_fingerprint": self.fingerprint, "choices": choices, "usage": usage}

    def _chunk(self, choices, usage=None):
        chunk = {"id": self.id, "object": self.chunk_object, "created": self.created, "model": self.model,
                 "system_fingerprint": self.fingerprint, "choices": choices}
        if self.include_usage:
            chunk["usage"] = usage
        return chunk

    def _updates(self, gen):
        """Updates worth a chunk, and None for keep-alives."""
        for update in gen.updates(self.keepalive):
            if update is None or update.text or update.logprobs or update.finish_reason or update.prompt_logprobs:
                yield update

    # completions
    def completion(self, request, results, usage):
        choices = []
        for index, (text, logprobs, reason) in enumerate(results):
            prefix = self._echo(request, index)
            choices.append({"index": index, "text": prefix + text, "finish_reason": reason,
                            "logprobs": self._choice_logprobs(request, index, logprobs, prefix) if _wants(request)
                            else None})
        return self._body(choices, usage)

    def _choice_logprobs(self, request, index, entries, prefix):
        """A choice's logprobs object: with echo, the prompt's tokens (collect put them first)
        at offsets from 0, then the generated ones from the end of the echoed prompt."""
        if request.params.prompt_logprobs is None:
            return self._completion_logprobs(entries, len(prefix))
        k = len(request.prompts[index // request.n].ids)
        prompt, generated = self._prompt_logprobs(entries[:k]), self._completion_logprobs(entries[k:], len(prefix))
        return {key: prompt[key] + generated[key] for key in prompt}

    def _prompt_logprobs(self, entries):
        """The prompt's tokens as a logprobs object, each offset where its text starts in
        the prompt's decoded text (the BOS has none: it takes no room)."""
        detok, offsets, at = IncrementalDetokenizer(self.tok), [], 0
        for e in entries:
            offsets.append(at)
            at += len(detok.feed(e.token_id))
        return {**self._completion_logprobs(entries, 0), "text_offset": offsets}

    def completion_chunks(self, gen):
        offsets = {c.index: 0 for c in gen.choices}
        prompt_logprobs = gen.request.params.prompt_logprobs is not None    # echo with logprobs
        if gen.request.echo and not prompt_logprobs:
            yield self._chunk([{"index": c.index, "text": self._echo(gen.request, c.index), "logprobs": None,
                                "finish_reason": None} for c in gen.choices])
        for u in self._updates(gen):
            if u is None:
                yield None
                continue
            if u.prompt_logprobs is not None:   # echo with logprobs: the prompt, before its first tokens
                echo = self._echo(gen.request, u.index)
                yield self._chunk([{"index": u.index, "text": echo, "finish_reason": None,
                                    "logprobs": self._prompt_logprobs(u.prompt_logprobs)}])
                offsets[u.index] = len(echo)
            logprobs = self._completion_logprobs(u.logprobs, offsets[u.index]) if _wants(gen.request) else None
            offsets[u.index] += sum(len(self._piece(lp.token_id)) for lp in u.logprobs)
            yield self._chunk([{"index": u.index, "text": u.text, "logprobs": logprobs,
                                "finish_reason": u.finish_reason}])
        if self.include_usage:
            yield self._chunk([], gen.usage())

    def _echo(self, request, index):
        if not request.echo:
            return ""
        prompt = request.prompts[index // request.n]
        return prompt.text if prompt.text is not None else self.tok.decode(prompt.ids)

    def _completion_logprobs(self, entries, offset):
        tokens = [self._piece(e.token_id) for e in entries]
        offsets = []
        for token in tokens:
            offsets.append(offset)
            offset += len(token)
        return {"tokens": tokens, "token_logprobs": [e.logprob for e in entries],
                # the first prompt token (echo) has no logprob and no alternatives: null, as OpenAI's
                "top_logprobs": [None if e.logprob is None else {self._piece(t): lp for t, lp in e.top}
                                 for e in entries],
                "text_offset": offsets}

    # chat
    def chat(self, request, results, usage):
        choices = []
        for index, (text, logprobs, reason) in enumerate(results):
            message, reason = self.reply.message(text, reason)
            choices.append({"index": index, "message": message, "finish_reason": reason,
                            "logprobs": {"content": self._chat_logprobs(logprobs)} if _wants(request) else None})
        return self._body(choices, usage)

    def chat_chunks(self, gen):
        # the role first, at once: clients see the stream open before the first token
        yield self._chunk([{"index": c.index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                            "finish_reason": None} for c in gen.choices])
        streams = {c.index: self.reply.stream() for c in gen.choices}
        for u in self._updates(gen):
            if u is None:
                yield None
                continue
            stream, reason = streams[u.index], None
            delta = stream.feed(u.text)
            if u.finish_reason is not None:
                last, reason = stream.finish(u.finish_reason)
                delta = _merged(delta, last)
            logprobs = {"content": self._chat_logprobs(u.logprobs)} if u.logprobs else None
            if delta or logprobs or reason:
                yield self._chunk([{"index": u.index, "delta": delta, "logprobs": logprobs, "finish_reason": reason}])
        if self.include_usage:
            yield self._chunk([], gen.usage())

    def _chat_logprobs(self, entries):
        return [{**self._token(e.token_id, e.logprob),
                 "top_logprobs": [self._token(t, lp) for t, lp in e.top]} for e in entries]

    def _token(self, token_id, logprob):
        raw = self.tok.token_to_piece(token_id)
        return {"token": self._piece(token_id), "logprob": logprob, "bytes": list(raw)}

    def _piece(self, token_id):
        """A token as text; a piece that is not whole UTF-8 shows its bytes (as OpenAI does)."""
        raw = self.tok.token_to_piece(token_id)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)


def _merged(first, second):
    """One delta from two in a row (text keys concatenate, tool call pieces append)."""
    out = dict(first)
    for key, value in second.items():
        out[key] = out.get(key, [] if key == "tool_calls" else "") + value
    return out


def _wants(request):
    return request.params.logprobs is not None

