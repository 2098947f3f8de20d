"""The /api family used by in-house platforms: same engine, same validation as /v1.

Requests take the /v1 sampling fields (`max_tokens`, `temperature`, `top_p`,
`top_k`, `min_p`, `seed`, `stop`, `presence_penalty`, `frequency_penalty`,
`repetition_penalty`, `ignore_eos`, `stop_token_ids`, `min_tokens`, `logit_bias`,
`user`, llama-server's `speculative.n_max`), an optional `model` and an optional
output constraint (`json_schema`, `response_format`, `grammar`, `regex`,
`choice`: see server/constraints.py); unknown fields are ignored. One prompt,
one choice.

  POST /api/generate            {"prompt": str | [token ids], ...}
  POST /api/completions         (the same; kept under the name platforms call)
      -> {"text": str, "finish_reason": "stop" | "length", "usage": USAGE}

  POST /api/chat                {"messages": [{"role", "content"}, ...], ...}   (and the /v1 chat template
                                switches: add_generation_prompt, continue_final_message, chat_template_kwargs)
      -> {"message": {"role": "assistant", "content": str}, "finish_reason", "usage": USAGE}

  POST /api/completions/stream  (body as /api/completions)
  POST /api/chat/stream         (body as /api/chat)
      -> text/event-stream:  data: {"text": "<new text>"}            one per update
                             data: {"text": "", "finish_reason": ..., "usage": USAGE}
                             data: [DONE]
         an error after the stream began arrives as  data: {"error": {...}}  before [DONE];
         `: keep-alive` comment lines may come at any time.

  GET /api/llms  -> {"llms": [{"name": str, "context_length": int}]}

  USAGE = {"prompt_tokens", "completion_tokens", "total_tokens",
           "prompt_tokens_details": {"cached_tokens"}}

Errors have the /v1 (OpenAI) shape and statuses: {"error": {"message", "type", "param", "code"}}.
"""
from pyforge.server import generation as g
from pyforge.server import validation as v
from pyforge.server.constraints import request_grammar
from pyforge.server.errors import bad_request


class _Generate:
    """One-prompt generation; subclasses say how the prompt and the reply look."""

    stream = False

    def __init__(self, models):
        self.models = models

    def on_post(self, req, resp):
        with self.models.serving(req) as (body, ctx, timer):
            request = self._request(body, ctx)
            g.run(ctx, resp, timer, request, stream=self.stream,
                  to_json=lambda results, usage: self._reply(results[0].text, results[0].finish_reason, usage),
                  to_chunks=self._chunks, client_gone=g.connection_watch(req))

    def _request(self, body, ctx):
        params = v.sampling_params(body, ctx.config, grammar=request_grammar(body, ctx.constraints),
                                   vocab_size=ctx.facts.vocab_size)
        return g.GenerationRequest([self._prompt(body, ctx)], params, 1, v.parse_stop(body.get("stop")))

    def _chunks(self, gen):
        for update in gen.updates(self.models.config.keepalive_interval):
            if update is None:
                yield None
            elif update.finish_reason is not None:
                if update.text:
                    yield {"text": update.text}
                yield {"text": "", "finish_reason": update.finish_reason, "usage": gen.usage()}
            elif update.text:
                yield {"text": update.text}


class Generate(_Generate):
    def _prompt(self, body, ctx):
        prompts = v.completion_prompts(body.get("prompt"), ctx)
        if len(prompts) != 1:
            raise bad_request("/api takes one prompt: a string or a list of token ids", "prompt")
        return prompts[0]

    def _reply(self, text, finish_reason, usage):
        return {"text": text, "finish_reason": finish_reason, "usage": usage}


class Chat(_Generate):
    def _prompt(self, body, ctx):
        if body.get("tools") is not None:     # not part of /api: never answered as if honoured
            raise bad_request("/api/chat takes no tools; use /v1/chat/completions for tool calling", "tools")
        return v.chat_prompt(body.get("messages"), ctx, **v.template_options(body))

    def _reply(self, text, finish_reason, usage):
        return {"message": {"role": "assistant", "content": text}, "finish_reason": finish_reason, "usage": usage}


class GenerateStream(Generate):
    stream = True


class ChatStream(Chat):
    stream = True


class Models:
    def __init__(self, models):
        self.models = models

    def on_get(self, req, resp):
        resp.media = {"llms": [{"name": ctx.model_name, "context_length": ctx.max_model_len} for ctx in self.models]}


def add_routes(app, models):
    app.add_route("/api/generate", Generate(models))
    app.add_route("/api/completions", Generate(models))
    app.add_route("/api/completions/stream", GenerateStream(models))
    app.add_route("/api/chat", Chat(models))
    app.add_route("/api/chat/stream", ChatStream(models))
    app.add_route("/api/llms", Models(models))
