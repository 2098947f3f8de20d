"""Request → engine events → text, shared by the /v1 and /api routes.

  (validation.py turns a JSON body into the GenerationRequest used here)
  run:     Generation submits prompts x n streams, reads them as one group and
           turns events into per-choice Updates: incremental detokenization,
           stop strings matched on text (the engine only knows token ids),
           logprobs, usage. A stop string aborts its stream at once.
  serve:   `run` answers with one JSON body or an SSE stream, and maps
           overload (503 + Retry-After) and engine errors to HTTP statuses.
  observe: RequestTimer feeds the metrics observer (a no-op by default), the
           access log line and the trace span (logs.RequestLog).

Choice `index` follows OpenAI: prompt i's j-th sample is choice i * n + j (with
best_of, candidate i * best_of + j, until `Generation.best` keeps each prompt's n).
"""
import dataclasses
import functools
import itertools
import select
import socket
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import NamedTuple

import falcon

from pyforge.engine.sampling_params import SamplingParams
from pyforge.server import sse
from pyforge.server.engine_client import (AdmittedEvent, ErrorEvent, FinishEvent, PromptLogprobsEvent,
                                          QueueFullError, StreamGroup)
from pyforge.server.errors import APIError, bad_request, error_body, status_code
from pyforge.server.fingerprint import system_fingerprint
from pyforge.server.logs import RequestLog
from pyforge.tokenizer import IncrementalDetokenizer


@dataclass(frozen=True)
class ServingContext:
    """What every generation route needs, passed explicitly to each resource."""
    config: object              # ServerConfig
    client: object              # EngineClient
    tokenizer: object
    observer: object
    model_name: str
    facts: object               # EngineFacts: the engine's limits
    created: int                # when the app was built (the /v1/models `created`)
    constraints: object         # pyforge.structured.Constraints: request constraints -> grammars

    @property
    def max_model_len(self):
        return self.facts.max_model_len

    @functools.cached_property
    def system_fingerprint(self):
        """This build and model, as responses' `system_fingerprint` (server/fingerprint.py)."""
        return system_fingerprint(self.config.model)


@dataclass(frozen=True)
class Prompt:
    ids: list[int]
    text: str | None = None     # the prompt as text, for echo


@dataclass(frozen=True)
class GenerationRequest:
    prompts: list[Prompt]
    params: SamplingParams
    n: int = 1
    stop: tuple[str, ...] = ()
    echo: bool = False
    keep_special: bool = False  # detokenize special tokens too (tool-call openers such as [TOOL_CALLS])
    best_of: int | None = None  # > n: sample this many per prompt, return the n of highest cumulative logprob

    @property
    def samples(self):
        """Generations per prompt."""
        return self.best_of or self.n


@dataclass(frozen=True)
class TokenLogprob:
    token_id: int
    logprob: float | None       # None: the first prompt token (prompt logprobs), which nothing predicts
    top: list[tuple[int, float]]


@dataclass
class Update:
    """What one choice produced since its last update."""
    index: int
    text: str = ""
    logprobs: list[TokenLogprob] = dataclasses.field(default_factory=list)
    finish_reason: str | None = None
    # the prompt's tokens with their logprobs (params.prompt_logprobs), in the choice's first update
    prompt_logprobs: list[TokenLogprob] | None = None


class ChoiceResult(NamedTuple):
    text: str
    logprobs: list[TokenLogprob]
    finish_reason: str


DISCONNECT_CHECK = 0.25    # seconds between looks at a waiting client's socket
MAX_LOGGED_USER = 256      # characters of a request's `user` the access line keeps


class ClientGone(Exception):
    """The client closed its connection before its (non-streamed) reply."""


class GenerationError(Exception):
    def __init__(self, status, message):
        super().__init__(message)
        self.status = status


# -- running ------------------------------------------------------------------

class StopMatcher:
    """Finds stop strings in streamed text, across token boundaries.

    `push` returns the text that is safe to release: everything before a stop
    string, minus any tail that could still become one (held back until the
    next push or `flush`)."""

    def __init__(self, stops):
        self.stops = tuple(stops)
        self.pending = ""
        self.found = None       # the stop string found, once one is

    def push(self, text):
        """(released text, True if a stop string was found)."""
        self.pending += text
        if not self.stops:
            return self.flush(), False
        hits = [(i, s) for i, s in ((self.pending.find(s), s) for s in self.stops) if i >= 0]
        if hits:
            at, self.found = min(hits, key=lambda hit: hit[0])
            released, self.pending = self.pending[:at], ""
            return released, True
        cut = len(self.pending) - self._partial_tail()
        released, self.pending = self.pending[:cut], self.pending[cut:]
        return released, False

    def flush(self):
        text, self.pending = self.pending, ""
        return text

    def _partial_tail(self):
        """Length of the longest tail of `pending` that starts some stop string."""
        text = self.pending
        for k in range(min(len(text), max(map(len, self.stops)) - 1), 0, -1):
            if any(s.startswith(text[-k:]) for s in self.stops):
                return k
        return 0


class _Choice:
    """One sample of one prompt: detokenize, match stops, count, collect logprobs."""

    def __init__(self, index, tokenizer, prompt, stop, skip_ids, keep_special=False, score_prompt=False):
        self.index = index
        self.detok = IncrementalDetokenizer(tokenizer, skip_special_tokens=not keep_special, prefix_ids=prompt.ids)
        self.matcher = StopMatcher(stop)
        self.skip_ids = skip_ids
        self.n_prompt = len(prompt.ids)
        self.n_tokens = 0
        self.cached_tokens = 0
        self.finish_reason = None
        self.cumulative_logprob = 0.0   # of the tokens counted, when the engine sends logprobs
        # score_prompt (params.prompt_logprobs): the prompt's TokenLogprobs until the first update
        # takes them; the first token's logprob is None, nothing predicts it
        self.prompt_logprobs = [TokenLogprob(prompt.ids[0], None, [])] if score_prompt else None

    @property
    def stop(self):
        """The stop string that ended this choice, or None (its end, the length, an EOS)."""
        return self.matcher.found

    def on_tokens(self, event):
        """The Update for an event of one or more tokens. Stop strings are
        matched token by token, as if each token had come alone: the tokens
        after the one that completes a stop string are dropped (not counted,
        no logprobs), exactly as their own later events would have been."""
        ids = event.token_ids
        if self.matcher.stops:
            text, n = self._until_stop(ids)
        else:
            (text, _), n = self.matcher.push(self.detok.feed_many(t for t in ids if t not in self.skip_ids)), len(ids)
        self.n_tokens += n
        entries = _logprob_entries(event, n)
        self.cumulative_logprob += sum(e.logprob for e in entries)
        return Update(self.index, text, entries, self.finish_reason, self._take_prompt_logprobs())

    def on_prompt_logprobs(self, event):
        """Keep the prompt logprobs an event carries until the choice's first update."""
        if self.prompt_logprobs is not None:
            self.prompt_logprobs += [TokenLogprob(t, lp, list(top)) for t, lp, top in
                                     zip(event.token_ids, event.logprobs, event.top_logprobs)]

    def _take_prompt_logprobs(self):
        entries, self.prompt_logprobs = self.prompt_logprobs, None
        return entries

    def _until_stop(self, ids):
        """(released text, tokens consumed) up to and including a stop string's last token."""
        released = []
        for n, t in enumerate(ids, 1):
            text, stopped = self.matcher.push(self.detok.feed(t) if t not in self.skip_ids else "")
            released.append(text)
            if stopped:
                self.finish_reason = "stop"
                return "".join(released), n
        return "".join(released), len(ids)

    def on_finish(self, event):
        self.cached_tokens = event.cached_tokens
        released, stopped = self.matcher.push(self.detok.flush())
        self.finish_reason = "stop" if stopped else event.finish_reason
        return Update(self.index, released + self.matcher.flush(), finish_reason=self.finish_reason,
                      prompt_logprobs=self._take_prompt_logprobs())


def _logprob_entries(event, n):
    """TokenLogprobs of the event's first n tokens ([] without logprobs)."""
    if event.logprobs is None:
        return []
    tops = event.top_logprobs or [[] for _ in event.token_ids]
    return [TokenLogprob(t, lp, list(top)) for t, lp, top in zip(event.token_ids[:n], event.logprobs, tops)]


class Generation:
    """Submits a GenerationRequest's prompts x n and yields choice Updates."""

    def __init__(self, ctx, request, timer):
        self.ctx, self.request, self.timer = ctx, request, timer
        tok, n = ctx.tokenizer, request.samples
        # the tokens that end a choice are not text (vLLM leaves a stop token id's text out too)
        skip = (frozenset() if request.params.ignore_eos else ctx.facts.eos_ids) | set(request.params.stop_token_ids)
        score = request.params.prompt_logprobs is not None
        self.choices = [_Choice(i * n + j, tok, p, request.stop, skip, request.keep_special, score)
                        for i, p in enumerate(request.prompts) for j in range(n)]
        self.streams = []
        self._group = None
        self._events = None         # the group's one event iterator, shared by admitted() and updates()
        self._early = []            # events admitted() read past the admissions

    def submit(self):
        """Queue every choice; all or none (QueueFullError / ValueError propagate)."""
        try:
            for prompt in self.request.prompts:
                for j in range(self.request.samples):
                    self.streams.append(self.ctx.client.submit(prompt.ids, self._params(j)))
        except BaseException:
            self.close()
            raise
        return self

    def _params(self, j):
        params = self.request.params
        if j and params.seed is not None:      # n samples from a seeded request differ, reproducibly
            params = dataclasses.replace(params, seed=params.seed + j)
        if self.request.best_of and params.logprobs is None:    # best_of ranks by the tokens' logprobs
            params = dataclasses.replace(params, logprobs=0)
        return params

    def _next_events(self, heartbeat):
        if self._events is None:
            self._group = StreamGroup(self.streams)
            self._events = self._group.events()
        self._group.heartbeat = heartbeat
        return self._events

    def admitted(self):
        """Wait until the engine took every stream into its queue (the first event of
        each); raises GenerationError if it refused one. Later events stay queued."""
        waiting = set(range(len(self.streams)))
        self._early = []
        for item in self._next_events(None):
            i, event = item
            if isinstance(event, ErrorEvent):
                self.close()
                raise GenerationError(event.status, event.message)
            if not isinstance(event, AdmittedEvent):
                self._early.append(item)     # a transport without the event: take what came
            waiting.discard(i)
            if not waiting:
                break
        return self

    def updates(self, heartbeat=None):
        """Updates as events arrive (None for a heartbeat); raises GenerationError."""
        early, self._early = self._early, []
        for item in itertools.chain(early, self._next_events(heartbeat)):
            if item is None:
                yield None
                continue
            update = self._on_event(*item)
            if update is not None:
                yield update

    def _on_event(self, i, event):
        choice, stream = self.choices[i], self.streams[i]
        n_before = choice.n_tokens
        if isinstance(event, ErrorEvent):
            self.close()
            raise GenerationError(event.status, event.message)
        if isinstance(event, AdmittedEvent):
            return None
        if isinstance(event, PromptLogprobsEvent):
            choice.on_prompt_logprobs(event)
            return None
        if isinstance(event, FinishEvent):
            if choice.finish_reason is not None:    # stopped by us: only the cache count is news
                # (and the engine may have generated past the stop: the counts cannot agree)
                choice.cached_tokens = event.cached_tokens
                return None
            self._check_counts(choice, event)
            return choice.on_finish(event)
        if choice.finish_reason is not None:
            return None                             # tokens generated after our stop string
        update = choice.on_tokens(event)
        self.timer.tokens(choice.n_tokens - n_before)
        if update.finish_reason is not None:
            stream.abort()                          # a stop string: the engine may stop too
        return update

    def _check_counts(self, choice, event):
        """The engine's counts in FINISH against what arrived: a lost or duplicated
        TOKENS record is a broken transport, not a shorter answer."""
        if (event.prompt_tokens, event.completion_tokens) != (choice.n_prompt, choice.n_tokens):
            self.close()
            raise GenerationError(500, f"the engine reports {event.prompt_tokens} prompt and "
                                       f"{event.completion_tokens} generated tokens; {choice.n_prompt} and "
                                       f"{choice.n_tokens} arrived")

    def close(self):
        """Abort whatever still runs (client gone, error, or done: then a no-op)."""
        for stream in self.streams:
            stream.abort()

    def best(self, results):
        """best_of: of each prompt's candidates (results, in choice order) the n of highest
        cumulative logprob, best first (ties: the earlier candidate)."""
        k, n = self.request.samples, self.request.n
        best = []
        for start in range(0, len(self.choices), k):
            ranked = sorted(range(start, start + k), key=lambda c: -self.choices[c].cumulative_logprob)
            best += [results[c] for c in ranked[:n]]
        return best

    def usage(self):
        """Token counts; completion_tokens counts every candidate best_of generated."""
        n = self.request.samples
        prompt_tokens = sum(len(p.ids) for p in self.request.prompts)
        completion_tokens = sum(c.n_tokens for c in self.choices)
        cached = sum(self.choices[i * n].cached_tokens for i in range(len(self.request.prompts)))
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
                "prompt_tokens_details": {"cached_tokens": cached}}


def collect(generation, client_gone=None):
    """Run a Generation to the end: per choice, its text, logprobs and finish_reason.
    `client_gone()` is asked every DISCONNECT_CHECK seconds: once true, the
    generation is aborted (its KV blocks freed) and ClientGone raised."""
    texts = {c.index: [] for c in generation.choices}
    logprobs = {c.index: [] for c in generation.choices}
    next_check = time.monotonic() + DISCONNECT_CHECK
    for update in generation.updates(DISCONNECT_CHECK if client_gone else None):
        if client_gone is not None and time.monotonic() >= next_check:
            next_check = time.monotonic() + DISCONNECT_CHECK
            if client_gone():
                generation.close()
                raise ClientGone()
        if update is None:
            continue
        texts[update.index].append(update.text)
        logprobs[update.index].extend(update.prompt_logprobs or ())    # echo: the prompt's, first
        logprobs[update.index].extend(update.logprobs)
    return [ChoiceResult("".join(texts[c.index]), logprobs[c.index], c.finish_reason) for c in generation.choices]


# -- serving ------------------------------------------------------------------

def picked(models, body, timer):
    """The ServingContext of the model `body` names (server/served.py); the request's
    metrics, log line and span go to that model from here on. OpenAI's `user` (an
    end-user id) goes into the access line."""
    ctx = models.pick(body.get("model"))
    timer.picked(ctx, body)
    if isinstance(body.get("user"), str):
        timer.log.user = body["user"][:MAX_LOGGED_USER]
    return ctx


@contextmanager
def observed(timer):
    """Report a request that fails before its reply to the observer, with its status."""
    try:
        yield
    except falcon.HTTPError as e:
        timer.end(status_code(e))
        raise
    except Exception:
        timer.end(500)
        raise


def run(ctx, resp, timer, request, *, stream, to_json, to_chunks, client_gone=None, named_events=False,
        stream_error=error_body, with_generation=False):
    """Submit `request`; reply with to_json(results, usage) or an SSE stream of
    to_chunks(generation) (dicts, None for keep-alives; `named_events`: sse.py's named
    events). A stream starts (status 200) only once the engine admitted it: a refusal
    is a plain error reply. `stream_error(status, message)`: the event that ends a stream
    that failed; `with_generation`: to_json(results, usage, generation), for a reply that
    needs more of it (the stop string that ended a choice: `generation.choices[i].stop`)."""
    gen = _start(ctx, request, timer)
    try:
        if stream:
            gen.admitted()
            _stream(resp, gen, timer, to_chunks, named_events, stream_error)
            return
        results = collect(gen, client_gone)
    except GenerationError as e:     # the generation closed itself
        raise _api_error(e) from None
    except ClientGone:
        _end(timer, 499, gen)
        resp.status = 499
        return
    finally:
        if not stream:
            gen.close()
    if request.best_of:
        results = gen.best(results)
    resp.media = to_json(results, gen.usage(), *([gen] if with_generation else []))
    _end(timer, 200, gen)


def _end(timer, status, gen):
    timer.end(status, gen.usage(), [c.finish_reason for c in gen.choices if c.finish_reason])


def _start(ctx, request, timer):
    wanted, capacity = len(request.prompts) * request.samples, getattr(ctx.client, "queue_capacity", None)
    if capacity is not None and wanted > capacity:      # a 503 would say "retry", and no retry can fit
        raise bad_request(f"this request asks for {wanted} generations (prompts x n or best_of); this server "
                          f"queues at most {capacity} at once", "n" if request.samples > 1 else "prompt")
    try:
        return Generation(ctx, request, timer).submit()
    except QueueFullError as e:
        raise APIError(503, str(e), headers={"Retry-After": str(e.retry_after)}) from None
    except ValueError as e:
        raise bad_request(str(e), "prompt") from None


def _api_error(e):
    headers = {"Retry-After": "1"} if e.status == 503 else None
    return APIError(e.status, str(e), headers=headers)


def _stream(resp, gen, timer, to_chunks, named=False, stream_error=error_body):
    status = [499]      # nginx's "client closed request" until the stream completes

    def events():
        try:
            yield from to_chunks(gen)
            status[0] = 200
        except GenerationError as e:   # headers are gone: the error becomes the last event
            status[0] = e.status
            yield stream_error(e.status, str(e))

    def on_close():
        gen.close()
        _end(timer, status[0], gen)

    sse.respond(resp, events(), on_close, named)


def connection_watch(req):
    """client_gone() for the request's socket, or None where the server gives none
    (falcon.testing). A readable socket with nothing to read is a closed one."""
    sock = req.env.get("gunicorn.socket")
    if sock is None:
        return None

    def client_gone():
        try:
            if not select.select([sock], [], [], 0)[0]:
                return False
            return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
        except BlockingIOError:
            return False
        except (OSError, ValueError):
            return True
    return client_gone


# -- observing ----------------------------------------------------------------

class NoopObserver:
    def on_request_start(self):
        pass

    def on_first_token(self, seconds):
        pass

    def on_token(self, n, seconds_since_last):
        pass

    def on_request_end(self, status, seconds, prompt_tokens, completion_tokens):
        pass


class RequestTimer:
    """Feeds one generation request's timings to the observer and to its RequestLog
    (access line, span); `end` reports once, at the request's real end (a stream's
    last event)."""

    def __init__(self, observer, req):
        self.observer = observer
        self.log = RequestLog.claim(req)
        self.start = self.last = time.perf_counter()
        self.first = None
        self.ended = False
        observer.on_request_start()

    def picked(self, ctx, body):
        self.observer = ctx.observer
        self.log.picked(ctx.model_name, body)

    def tokens(self, n):
        now = time.perf_counter()
        if self.first is None:
            self.first = now
            self.observer.on_first_token(now - self.start)
            self.log.first_token(now - self.start)
        self.observer.on_token(n, now - self.last)
        self.last = now

    def end(self, status, usage=None, finish_reasons=()):
        if not self.ended:
            self.ended = True
            counts = usage or {}
            self.observer.on_request_end(status, time.perf_counter() - self.start,
                                         counts.get("prompt_tokens", 0), counts.get("completion_tokens", 0))
            self.log.end(status, usage, None if self.first is None else self.first - self.start, finish_reasons)
