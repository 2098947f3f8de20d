"""The models one server serves, by the name clients send: a request's `model` picks one.

    ServedModels([ServingContext, ...], strict=False)
      .pick(name)  -> the ServingContext answering a request that names `name`
      .default     -> the first model (requests naming none go to it)

With one model served, a request naming another is answered by it (llama-server
and Ollama do so: OpenAI clients often send a fixed name), unless `strict`;
with several, an unknown name is a 404 that lists the served ones.
"""
from contextlib import contextmanager

from pyforge.engine.sampling_params import brief
from pyforge.server.errors import APIError, bad_request


class ServedModels:
    def __init__(self, contexts, strict=False):
        if not contexts:
            raise ValueError("no model to serve")
        self.by_name = {ctx.model_name: ctx for ctx in contexts}
        if len(self.by_name) != len(contexts):
            raise ValueError("two served models have the same name")
        self.default = contexts[0]
        self.strict = strict

    @property
    def config(self):
        """The server-wide settings (body limit, keep-alive): every model's config shares them."""
        return self.default.config

    def __iter__(self):
        return iter(self.by_name.values())

    def __len__(self):
        return len(self.by_name)

    @contextmanager
    def serving(self, req):
        """(body, ServingContext, RequestTimer) of a POST to a model route: the body read
        and checked, the model it names picked; a failure inside the block ends the
        request's metrics, log line and span with its status."""
        from pyforge.server import generation as g, validation as v
        timer = g.RequestTimer(self.default.observer, req)
        with g.observed(timer):
            body = v.read_json(req, self.config.max_body_bytes)
            yield body, g.picked(self, body, timer), timer

    def pick(self, name):
        if name is None:
            return self.default
        if not isinstance(name, str):
            raise bad_request(f"model must be a string, got {brief(name)}", "model")
        ctx = self.by_name.get(name)
        if ctx is not None:
            return ctx
        if len(self.by_name) == 1 and not self.strict:
            return self.default
        raise APIError(404, f"the model {brief(name)} does not exist; this server serves "
                            f"{', '.join(map(repr, self.by_name))}", param="model", code="model_not_found")
