"""Several tokens per event: a reader that falls behind gets a stream's queued
TokenEvents merged into one, and everything it serves from them (text, stop
strings, token counts, logprobs) is what one event per token would give."""
import json
import random

import pytest
from falcon import testing

from conftest import STORIES
from pyforge.config import ServerConfig
from pyforge.engine.config import EngineFacts
from pyforge.server.app import create_app
from pyforge.server.engine_client import FinishEvent, RequestStream, StreamGroup, TokenEvent
from pyforge.server.generation import Prompt, _Choice
from pyforge.tokenizer import Tokenizer
from pyforge.loader import load_model_file
from pyforge.tokenizer import load_tokenizer

PROMPT = "Once upon a time"
TEXT = (" there was a little girl named Lily. She liked to play in the park with her dog, Max. "
        "One day it rained, and the little dog ran home.")


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return load_tokenizer(load_model_file(STORIES))


def expected_text(tok, ids):
    """What the stream must add to the prompt: the detokenizer's promise."""
    prompt = tok.encode(PROMPT)
    return tok.decode(prompt + ids)[len(tok.decode(prompt)):]


def token_event(ids, lp=False):
    if not lp:
        return TokenEvent(list(ids))
    return TokenEvent(list(ids), [-0.01 * t for t in ids], [[(t, -0.01 * t), (t + 1, -1.0)] for t in ids])


# -- StreamGroup --------------------------------------------------------------------

def test_queued_token_events_of_a_stream_merge_in_order():
    a, b = RequestStream(1, lambda _: None), RequestStream(2, lambda _: None)
    group = StreamGroup([a, b])
    for stream, event in [(a, token_event([1], True)), (a, token_event([2, 3], True)), (b, token_event([7])),
                          (a, token_event([4], True)), (b, FinishEvent("length", 3, 1)),
                          (a, FinishEvent("length", 3, 4))]:
        stream.put(event)
    got = list(group.events())
    assert got == [(0, token_event([1, 2, 3, 4], True)), (1, token_event([7])),
                   (1, FinishEvent("length", 3, 1)), (0, FinishEvent("length", 3, 4))]
    assert a.done and b.done


def test_a_final_event_ends_a_run_of_tokens():
    a = RequestStream(1, lambda _: None)
    a.put(token_event([1]))
    a.put(token_event([2]))
    a.put(FinishEvent("length", 3, 2))
    a.put(token_event([9]))                 # after the final event: never read
    assert list(StreamGroup([a]).events()) == [(0, token_event([1, 2])), (0, FinishEvent("length", 3, 2))]


def test_tokens_after_the_reader_took_a_run_start_the_next():
    a = RequestStream(1, lambda _: None)
    events = StreamGroup([a]).events()
    a.put_tokens([1], [-0.5], [[(1, -0.5)]])
    assert next(events) == (0, TokenEvent([1], [-0.5], [[(1, -0.5)]]))
    a.put(TokenEvent([2], [-0.25], [[(2, -0.25)]]))
    a.put_tokens([3, 4], [-1.0, -2.0], [[(3, -1.0)], [(4, -2.0)]])
    a.put(FinishEvent("stop", 2, 4))
    assert next(events) == (0, TokenEvent([2, 3, 4], [-0.25, -1.0, -2.0], [[(2, -0.25)], [(3, -1.0)], [(4, -2.0)]]))
    assert next(events) == (0, FinishEvent("stop", 2, 4))
    assert next(events, None) is None


# -- one choice: merged events against one event per token ----------------------------

def serve_choice(tok, events, stop=()):
    """(text, n_tokens, finish_reason, logprob token ids) a choice makes of `events`, then a FinishEvent."""
    choice = _Choice(0, tok, Prompt(tok.encode(PROMPT)), stop, tok.eos_ids)
    texts, logprobs = [], []
    for event in events:
        if choice.finish_reason is not None:
            break                           # Generation drops a stopped choice's later events
        update = choice.on_tokens(event)
        texts.append(update.text)
        logprobs += [e.token_id for e in update.logprobs]
    if choice.finish_reason is None:
        texts.append(choice.on_finish(FinishEvent("length", 5, choice.n_tokens)).text)
    return "".join(texts), choice.n_tokens, choice.finish_reason, logprobs


def chunked(ids, rng, lp):
    events, at = [], 0
    while at < len(ids):
        k = rng.randint(1, 7)
        events.append(token_event(ids[at:at + k], lp))
        at += k
    return events


@pytest.mark.parametrize("stop", [(), ("little",), ("Max. One",), ("ran home",), ("abcd", "a l"),
                                  ("nowhere",), (" ",)])
def test_merged_events_serve_what_single_tokens_serve(tok, stop):
    ids = tok.encode(TEXT, add_bos=False)
    rng = random.Random(len(stop))
    single = serve_choice(tok, [token_event([t], True) for t in ids], stop)
    if not stop or stop == ("nowhere",):
        assert single[0] == expected_text(tok, ids) and single[1] == len(ids) and single[2] == "length"
    for _ in range(20):
        assert serve_choice(tok, chunked(ids, rng, True), stop) == single
    whole = serve_choice(tok, [token_event(ids, True)], stop)
    assert whole == single
    if stop and stop != ("nowhere",):
        assert whole[2] == "stop" and whole[1] < len(ids) and len(whole[3]) == whole[1]


def test_overlapping_stop_strings_stop_where_a_token_completes_the_first(tok):
    # "a l" completes (at "little") before "was a little girl" (which starts earlier) does:
    # one token at a time stops at "a l", so a merged event must too, not at the earlier start
    ids = tok.encode(TEXT, add_bos=False)
    stop = ("was a little girl", "a l")
    single = serve_choice(tok, [token_event([t]) for t in ids], stop)
    assert single[2] == "stop" and single[0].endswith("was ")
    assert serve_choice(tok, [token_event(ids)], stop) == single


# -- through the app: every event queued at once --------------------------------------

class BurstClient:
    """Puts all of a request's events on its stream before the app reads any,
    in events of `sizes` tokens (the reader then finds them all pending)."""

    def __init__(self, tok, ids, sizes, lp=False):
        self.facts = EngineFacts(256, tok.vocab_size, tok.eos_ids)
        self.ids, self.sizes, self.lp = ids, sizes, lp

    def submit(self, prompt_ids, params):
        stream = RequestStream(1, lambda _: None)
        at, k = 0, 0
        while at < len(self.ids):
            n = self.sizes[k % len(self.sizes)]
            stream.put(token_event(self.ids[at:at + n], self.lp))
            at, k = at + n, k + 1
        stream.put(FinishEvent("length", len(prompt_ids), len(self.ids)))
        return stream

    def ready(self):
        return True

    def stats(self):
        return {}


def app_for(tok, client):
    return testing.TestClient(create_app(ServerConfig(model=STORIES), client, tok))


def sse_payloads(text):
    return [json.loads(f[len("data: "):]) for f in text.split("\n\n") if f.startswith("data: {")]


@pytest.mark.parametrize("sizes", [[1], [3], [1, 5, 2], [1000]])
def test_streamed_text_usage_and_logprobs_do_not_depend_on_event_sizes(tok, sizes):
    ids = tok.encode(TEXT, add_bos=False)
    app = app_for(tok, BurstClient(tok, ids, sizes, lp=True))
    body = {"prompt": PROMPT, "max_tokens": 200, "stream": True, "logprobs": 1,
            "stream_options": {"include_usage": True}}
    chunks = sse_payloads(app.simulate_post("/v1/completions", json=body).text)
    text = "".join(c["choices"][0]["text"] for c in chunks if c["choices"])
    tokens = [t for c in chunks if c["choices"] and c["choices"][0]["logprobs"]
              for t in c["choices"][0]["logprobs"]["tokens"]]
    offsets = [o for c in chunks if c["choices"] and c["choices"][0]["logprobs"]
               for o in c["choices"][0]["logprobs"]["text_offset"]]
    assert text == expected_text(tok, ids)
    assert len(tokens) == len(ids) and offsets == sorted(offsets)
    assert chunks[-1]["usage"]["completion_tokens"] == len(ids)
    assert [c["choices"][0]["finish_reason"] for c in chunks[:-1]][-1] == "length"

    stopped = sse_payloads(app.simulate_post("/v1/completions", json={**body, "stop": ["park"]}).text)
    single = serve_choice(tok, [token_event([t]) for t in ids], ("park",))
    assert "".join(c["choices"][0]["text"] for c in stopped if c["choices"]) == single[0]
    assert stopped[-1]["usage"]["completion_tokens"] == single[1]
    assert [c["choices"][0]["finish_reason"] for c in stopped[:-1]][-1] == "stop"


@pytest.mark.parametrize("sizes", [[1], [4], [1000]])
def test_chat_and_api_streams_do_not_depend_on_event_sizes(tok, sizes):
    ids = tok.encode(TEXT, add_bos=False)
    app = app_for(tok, BurstClient(tok, ids, sizes))
    # stories260K has no chat template: the /api completion stream and /v1 non-streamed reply
    r = app.simulate_post("/api/completions/stream", json={"prompt": PROMPT, "max_tokens": 200})
    events = sse_payloads(r.text)
    assert "".join(e["text"] for e in events) == expected_text(tok, ids)
    assert events[-1]["usage"]["completion_tokens"] == len(ids)
    r = app.simulate_post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 200})
    assert r.json["choices"][0]["text"] == expected_text(tok, ids) and r.json["usage"]["completion_tokens"] == len(ids)


# -- metrics: tokens that arrive together -----------------------------------------------

def test_inter_token_latency_counts_every_token_of_a_merged_event():
    from pyforge.ipc.segment import Segment, _unlink, new_name
    from pyforge.server.metrics import SegmentObserver
    seg = Segment.create(new_name("pyforge-test-coalesce-"), n_workers=1,
                         request_ring_bytes=1 << 12, response_ring_bytes=1 << 12)
    try:
        seg.claim_slot()
        observer = SegmentObserver(seg)
        observer.on_first_token(0.5)
        observer.on_token(3, 0.5)           # the first event: the first token and two more with it
        observer.on_token(4, 0.08)          # four tokens 80 ms later: four gaps of 20 ms
        itl = seg.stats()["inter_token_latency_seconds"]
        assert itl["count"] == 3 + 4 - 1 and itl["sum"] == pytest.approx(0.08)
        assert itl["counts"][:2] == [2, 4]  # two gaps of 0 s (<= 10 ms), four of 20 ms (<= 25 ms)
    finally:
        seg.close()
        _unlink(seg.name)
