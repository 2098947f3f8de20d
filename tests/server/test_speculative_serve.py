"""Per-request speculative decoding control over HTTP (llama-server's `speculative.n_max`),
on a real `pyforge serve --speculative-config` driven by the official `openai` client: a
request with n_max 0 drafts nothing (the spec_decode counters stay put), the others draft,
every request gets the same tokens, and a bad value is a 400 naming the field."""
import json

import pytest

from live_server import Server, get, metric, wait_for_metrics
from pyforge.synthetic import write_gguf
from pyforge.synthetic_copy import successors, walk

openai = pytest.importorskip("openai")
SPEC = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4, "prompt_lookup_min": 2}
DRAFTS = "pyforge:spec_decode_num_drafts_total"
DRAFT_TOKENS = "pyforge:spec_decode_num_draft_tokens_total"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    # the copy model: a prompt walking a token cycle is continued around it, so drafts land
    path = write_gguf("small-k-copy", tmp_path_factory.mktemp("copy") / "copy.gguf", "Q4_K_M")
    s = Server(str(path), "--speculative-config", json.dumps(SPEC), workers=1)
    try:
        yield s
    finally:
        s.stop()


def counters(server):
    text = get(server.url + "/metrics")[1]
    return metric(text, DRAFTS), metric(text, DRAFT_TOKENS)


def complete(server, **extra):
    prompt = [1] + walk(successors("small-k-copy"), 321, 24)
    r = server.client.completions.create(model=server.client.models.list().data[0].id, prompt=prompt,
                                         max_tokens=32, temperature=0, extra_body=extra)
    return r.choices[0].text


def test_n_max_0_opts_a_request_out_and_the_others_speculate(server):
    before = counters(server)
    opted_out = complete(server, **{"speculative.n_max": 0})
    assert counters(server) == before
    plain = complete(server)
    text = wait_for_metrics(server, lambda t: metric(t, DRAFTS) > before[0])
    drafts, draft_tokens = metric(text, DRAFTS), metric(text, DRAFT_TOKENS)
    assert drafts > before[0] and opted_out == plain
    capped = complete(server, **{"speculative.n_max": 1})
    text = wait_for_metrics(server, lambda t: metric(t, DRAFTS) > drafts)
    more_drafts, more_tokens = metric(text, DRAFTS) - drafts, metric(text, DRAFT_TOKENS) - draft_tokens
    assert capped == plain and more_tokens == more_drafts > 0      # one drafted token per draft


@pytest.mark.parametrize("value, words", [(-1, "in 0.."), ("4", "integer"), (1.5, "integer")])
def test_a_bad_n_max_is_a_400_naming_it(server, value, words):
    with pytest.raises(openai.BadRequestError) as e:
        complete(server, **{"speculative.n_max": value})
    assert e.value.body["param"] == "speculative.n_max" and words in e.value.body["message"], e.value.body
    with pytest.raises(openai.BadRequestError) as e:
        server.client.chat.completions.create(model=server.client.models.list().data[0].id, max_tokens=4,
                                              messages=[{"role": "user", "content": "hi"}],
                                              extra_body={"speculative.n_max": value})
    assert e.value.body["param"] == "speculative.n_max"
