"""POST /v1/embeddings (and /embeddings), OpenAI's shape:

    {model?, input: str | [str] | [id] | [[id]], encoding_format?: "float" | "base64",
     dimensions?, user?}
    -> {object: "list", data: [{object: "embedding", index, embedding}], model,
        usage: {prompt_tokens, total_tokens}}

Each input is a prefill-only request to the engine (engine/pooling.py): the final
hidden state (after the final RMSNorm, before lm_head) pooled by the server's
`--pooling` (last token by default, or the mean of every token) and L2-normalised,
as OpenAI's embeddings are. Text is tokenized as a completion prompt is (the
model's BOS first). `base64` is the little-endian float32 bytes, as OpenAI sends
them (its Python client decodes them so). An input must leave the context one
token to spare, as a completion prompt must; a longer one is a 400, never cut.
`dimensions` must equal the model's hidden size: cutting a vector short and
renormalising is meaningful only for models trained for it (OpenAI's matryoshka
text-embedding-3); for a generic decoder it would return a worse vector under the
name asked for, so any other value is a 400 naming it.
"""
import base64
import sys
from array import array

from pyforge.engine.sampling_params import SamplingParams, brief
from pyforge.server.engine_client import EmbeddingEvent, ErrorEvent, FinishEvent, QueueFullError, StreamGroup
from pyforge.server import validation as v
from pyforge.server.errors import APIError, bad_request

ENCODINGS = ("float", "base64")


class Embeddings:
    def __init__(self, models):
        self.models = models

    def on_post(self, req, resp):
        with self.models.serving(req) as (body, ctx, timer):
            encoding = _encoding(body)
            _check_dimensions(body, ctx)
            inputs = _inputs(body.get("input"), ctx)
            vectors, prompt_tokens = _embed(ctx, inputs)
            usage = {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens}
            resp.media = {"object": "list", "model": ctx.model_name, "usage": usage,
                          "data": [{"object": "embedding", "index": i, "embedding": _encoded(vec, encoding)}
                                   for i, vec in enumerate(vectors)]}
            timer.end(200, {**usage, "completion_tokens": 0}, ["stop"] * len(vectors))


def _encoding(body):
    value = body.get("encoding_format")
    if value is None:
        return "float"
    if value not in ENCODINGS:
        raise bad_request(f"encoding_format must be float or base64, got {brief(value)}", "encoding_format")
    return value


def _check_dimensions(body, ctx):
    value, size = body.get("dimensions"), ctx.facts.hidden_size
    if value is not None and value != size:
        raise bad_request(f"dimensions must be this model's hidden size, {size}, got {brief(value)}: its "
                          "embeddings are not trained to be cut short", "dimensions")


def _inputs(value, ctx):
    """`input` as token id lists, parsed and checked as a completion's `prompt` is."""
    return [prompt.ids for prompt in v.completion_prompts(value, ctx, "input")]


def _embed(ctx, inputs):
    """The inputs' vectors, in order, and their prompt tokens; APIError if the engine refused one."""
    capacity = getattr(ctx.client, "queue_capacity", None)
    if capacity is not None and len(inputs) > capacity:     # a 503 would say "retry", and no retry can fit
        raise bad_request(f"this request has {len(inputs)} inputs; this server queues at most {capacity} "
                          "at once", "input")
    params = SamplingParams(max_tokens=1, pooling=ctx.config.pooling)
    streams = []
    try:
        for ids in inputs:
            streams.append(ctx.client.submit(ids, params))
        vectors, prompt_tokens = [None] * len(inputs), 0
        for item in StreamGroup(streams).events():
            if item is None:
                continue
            i, event = item
            if isinstance(event, ErrorEvent):
                raise APIError(event.status, event.message,
                               headers={"Retry-After": "1"} if event.status == 503 else None)
            if isinstance(event, EmbeddingEvent):
                vectors[i] = event.values
            elif isinstance(event, FinishEvent):
                prompt_tokens += event.prompt_tokens
                if vectors[i] is None:
                    raise APIError(500, f"the engine ended input {i} ({event.finish_reason}) without its embedding")
        return vectors, prompt_tokens
    except QueueFullError as e:
        raise APIError(503, str(e), headers={"Retry-After": str(e.retry_after)}) from None
    except ValueError as e:
        raise bad_request(str(e), "input") from None
    finally:
        for stream in streams:
            stream.abort()


def _encoded(values, encoding):
    if encoding == "float":
        return values
    data = array("f", values)
    if sys.byteorder != "little":
        data.byteswap()
    return base64.b64encode(data.tobytes()).decode("ascii")


def add_routes(app, models):
    embeddings = Embeddings(models)
    for prefix in ("/v1", ""):      # as the other OpenAI routes: llama-server serves them without the /v1
        app.add_route(f"{prefix}/embeddings", embeddings)
