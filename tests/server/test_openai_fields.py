"""The OpenAI / vLLM request fields beyond sampling basics, each honoured or a 400 naming
it: logit_bias, min_tokens, stop_token_ids, best_of, echo with logprobs, suffix, user,
and system_fingerprint in every response.

In-process tests (falcon.testing over a real Engine on stories260K, which writes
coherent text) check each field's semantics against a second engine driven directly:
its logits at the prompt's positions, its greedy tokens. The last test serves the same
model with `pyforge serve` and drives it with the official `openai` client."""
import logging
import os
import re
import shutil

import numpy as np
import pytest

from conftest import SHARED, STORIES, inprocess_app, sse_payloads
from pyforge.engine.engine import Engine
from pyforge.engine.sampling_params import SamplingParams
from pyforge.server.fim import fim_ids, fim_token_ids
from pyforge.server.fingerprint import system_fingerprint
from pyforge.tokenizer import Tokenizer

PROMPT = "Once upon a time"
EOS = 2                         # stories260K's end of sequence
IDLE_AFTER_EACH_TEST = ("stories",)     # conftest.engines_idle_after: nothing leaks


@pytest.fixture(scope="module")
def stories():
    with inprocess_app(STORIES, chat_template="chatml") as (client, engine):
        yield client, engine


@pytest.fixture(scope="module")
def reference():
    """A second engine on the same file, driven directly."""
    return Engine(STORIES, n_threads=1, max_model_len=512, kv_cache_tokens=8192)


def post(client, path="/v1/completions", **body):
    r = client.simulate_post(path, json=body)
    return r.status_code, r.json


def completion(client, **body):
    status, reply = post(client, **{"prompt": PROMPT, "max_tokens": 6, "temperature": 0, **body})
    assert status == 200, reply
    return reply


def log_softmax(x):
    x = np.asarray(x, np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def greedy_ids(reference, prompt, max_tokens, **params):
    ids = reference.tokenizer.encode(prompt)
    return [o.token_id for o in reference.generate(ids, SamplingParams(temperature=0, max_tokens=max_tokens,
                                                                       **params))]


def piece(engine, token_id):
    return engine.tokenizer.token_to_piece(token_id).decode()


def assert_400(reply, param):
    status, body = reply
    assert status == 400 and body["error"]["param"] == param, body


# -- logit_bias -------------------------------------------------------------------------

def test_logit_bias_100_forces_a_token_under_greedy_decoding(stories):
    client, engine = stories
    reply = completion(client, logit_bias={"300": 100}, logprobs=0)
    assert reply["choices"][0]["logprobs"]["tokens"] == [piece(engine, 300)] * 6
    status, chat = post(client, "/v1/chat/completions", messages=[{"role": "user", "content": "Hi"}],
                        max_tokens=4, temperature=0, logit_bias={"300": 100})
    assert status == 200 and chat["choices"][0]["message"]["content"] == piece(engine, 300) * 4
    status, api = post(client, "/api/generate", prompt=PROMPT, max_tokens=3, temperature=0, logit_bias={"300": 100})
    assert status == 200 and api["text"] == piece(engine, 300) * 3


def test_logit_bias_minus_100_bans_the_greedy_token(stories, reference):
    client, engine = stories
    ids = reference.tokenizer.encode(PROMPT)
    ranked = np.argsort(-reference.prompt_logits(ids)[-1], kind="stable")
    reply = completion(client, max_tokens=1, logit_bias={str(ranked[0]): -100}, logprobs=1)
    lp = reply["choices"][0]["logprobs"]
    assert lp["tokens"] == [piece(engine, ranked[1])]
    # logprobs stay the model's own, as OpenAI and vLLM report them: the banned token still tops the list
    assert list(lp["top_logprobs"][0]) == [piece(engine, ranked[0])]
    raw = log_softmax(reference.prompt_logits(ids)[-1])
    assert lp["token_logprobs"][0] == pytest.approx(raw[ranked[1]], abs=1e-5)


def test_a_small_bias_moves_the_distribution_as_softmax_of_biased_logits(stories, reference):
    """Sampled at temperature 1, the first token's frequencies follow softmax(logits + bias)."""
    client, _ = stories
    ids = reference.tokenizer.encode(PROMPT)
    logits = reference.prompt_logits(ids)[-1].astype(np.float64)
    top = np.argsort(-logits, kind="stable")[:2]
    bias = {str(top[1]): float(logits[top[0]] - logits[top[1]])}      # the runner-up draws level with the best
    reply = completion(client, max_tokens=1, temperature=1.0, seed=5, n=64, logit_bias=bias, logprobs=0)
    biased = logits.copy()
    biased[top[1]] += bias[str(top[1])]
    probs = np.exp(log_softmax(biased))
    tokens = [c["logprobs"]["tokens"][0] for c in reply["choices"]]
    got = np.array([tokens.count(piece(reference, t)) for t in top])
    expected = probs[top] * len(tokens)
    assert (np.abs(got - expected) < 4 * np.sqrt(expected)).all(), (got, expected)


def test_logit_bias_is_checked(stories):
    client, engine = stories
    vocab = engine.tokenizer.vocab_size
    assert_400(post(client, prompt=PROMPT, logit_bias={str(vocab): 1}), "logit_bias")
    assert_400(post(client, prompt=PROMPT, logit_bias={"x": 1}), "logit_bias")
    assert_400(post(client, prompt=PROMPT, logit_bias={"5": 101}), "logit_bias")
    assert_400(post(client, prompt=PROMPT, logit_bias=[5, 1]), "logit_bias")
    assert_400(post(client, "/v1/chat/completions", messages=[{"role": "user", "content": "x"}],
                    logit_bias={str(vocab + 5): -1}), "logit_bias")


# -- min_tokens and stop_token_ids ---------------------------------------------------------

def test_min_tokens_holds_back_an_eos_the_model_would_write_first(stories):
    client, engine = stories
    stops_at_once = completion(client, logit_bias={str(EOS): 100})      # EOS first: an empty answer
    assert stops_at_once["choices"][0]["finish_reason"] == "stop"
    assert stops_at_once["usage"]["completion_tokens"] == 1 and stops_at_once["choices"][0]["text"] == ""
    held = completion(client, max_tokens=20, logit_bias={str(EOS): 100}, min_tokens=5, logprobs=0)
    [choice] = held["choices"]
    assert held["usage"]["completion_tokens"] == 6 and choice["finish_reason"] == "stop"
    assert piece(engine, EOS) not in choice["logprobs"]["tokens"][:5] and len(choice["text"]) > 0


def test_stop_token_ids_end_the_choice_and_min_tokens_holds_them_back(stories, reference):
    client, engine = stories
    ids = greedy_ids(reference, PROMPT, 12)
    k = next(i for i in range(2, len(ids)) if ids[i] not in ids[:i])     # first seen at position k
    reply = completion(client, max_tokens=12, stop_token_ids=[ids[k]])
    [choice] = reply["choices"]
    assert choice["finish_reason"] == "stop" and reply["usage"]["completion_tokens"] == k + 1
    assert choice["text"] == engine.tokenizer.decode(ids[:k])          # the stop token is not text
    held = completion(client, max_tokens=12, stop_token_ids=[ids[k]], min_tokens=k + 2)
    assert held["usage"]["completion_tokens"] >= k + 2
    reference_held = greedy_ids(reference, PROMPT, 12, stop_token_ids=[ids[k]], min_tokens=k + 2)
    assert held["choices"][0]["text"] == engine.tokenizer.decode([t for t in reference_held if t != ids[k]])


def test_min_tokens_is_checked(stories):
    client, _ = stories
    assert_400(post(client, prompt=PROMPT, max_tokens=3, min_tokens=4), "min_tokens")
    assert_400(post(client, prompt=PROMPT, min_tokens=-1), "min_tokens")


# -- best_of --------------------------------------------------------------------------------

def test_best_of_returns_the_candidates_of_highest_cumulative_logprob(stories):
    client, _ = stories
    base = {"max_tokens": 8, "temperature": 1.5, "seed": 11}
    candidates = completion(client, n=5, logprobs=0, **base)["choices"]    # what best_of=5 draws (same seeds)
    sums = [sum(c["logprobs"]["token_logprobs"]) for c in candidates]
    assert len({c["text"] for c in candidates}) > 2                        # a real choice to make
    ranked = sorted(range(5), key=lambda i: -sums[i])
    best = completion(client, n=2, best_of=5, logprobs=0, **base)
    assert [c["text"] for c in best["choices"]] == [candidates[i]["text"] for i in ranked[:2]]
    assert [c["index"] for c in best["choices"]] == [0, 1]
    assert [sum(c["logprobs"]["token_logprobs"]) for c in best["choices"]] == pytest.approx(
        [sums[i] for i in ranked[:2]])
    total = sum(len(c["logprobs"]["tokens"]) for c in candidates)
    assert best["usage"]["completion_tokens"] == total                     # every candidate was generated
    quiet = completion(client, best_of=5, **base)                           # logprobs only to rank: not shown
    assert quiet["choices"][0]["logprobs"] is None and quiet["choices"][0]["text"] == candidates[ranked[0]]["text"]


def test_best_of_over_several_prompts_keeps_each_prompts_own(stories):
    client, engine = stories
    prompts = [PROMPT, "The little dog"]
    reply = completion(client, prompt=prompts, n=1, best_of=3, echo=True, max_tokens=4, temperature=1.0, seed=3)
    assert [c["text"][:len(p)] for c, p in zip(reply["choices"], prompts)] == prompts


def test_best_of_is_checked(stories):
    client, _ = stories
    assert_400(post(client, prompt=PROMPT, n=3, best_of=2), "best_of")
    assert_400(post(client, prompt=PROMPT, best_of=2, stream=True), "best_of")
    assert completion(client, n=2, best_of=2)["choices"][1]["index"] == 1     # best_of == n: nothing to choose


# -- echo with logprobs (prompt logprobs) -------------------------------------------------

def test_echo_with_logprobs_scores_the_prompt_then_the_output(stories, reference):
    client, engine = stories
    ids = reference.tokenizer.encode(PROMPT)
    plain = completion(client, max_tokens=5, logprobs=2)["choices"][0]
    echoed = completion(client, max_tokens=5, logprobs=2, echo=True)
    [choice] = echoed["choices"]
    lp, n = choice["logprobs"], len(ids)
    assert choice["text"] == PROMPT + plain["text"]
    assert len(lp["tokens"]) == n + 5 == echoed["usage"]["prompt_tokens"] + echoed["usage"]["completion_tokens"]
    assert lp["tokens"][:n] == [piece(engine, t) for t in ids]
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    rows = log_softmax(reference.prompt_logits(ids))[:-1]
    np.testing.assert_allclose(lp["token_logprobs"][1:n], rows[np.arange(n - 1), ids[1:]], atol=1e-5)
    for row, top in zip(rows, lp["top_logprobs"][1:n]):
        best = np.argsort(-row, kind="stable")[:2]
        assert list(top) == [piece(engine, t) for t in best]
        assert list(top.values()) == pytest.approx(row[best].tolist(), abs=1e-5)
    for key in ("tokens", "token_logprobs", "top_logprobs"):
        assert lp[key][n:] == plain["logprobs"][key]
    assert lp["text_offset"][n] == len(PROMPT) and lp["text_offset"][1] == 0     # "<s>" takes no room


def test_echo_with_logprobs_streams_the_prompt_first(stories):
    client, _ = stories
    body = {"prompt": PROMPT, "max_tokens": 5, "temperature": 0, "logprobs": 1, "echo": True}
    whole = completion(client, **body)["choices"][0]
    r = client.simulate_post("/v1/completions", json={**body, "stream": True})
    chunks = [c for c in sse_payloads(r.text) if c["choices"]]
    first = chunks[0]["choices"][0]
    assert first["text"] == PROMPT and first["logprobs"]["token_logprobs"][0] is None
    assert "".join(c["choices"][0]["text"] for c in chunks) == whole["text"]
    streamed = sum((c["choices"][0]["logprobs"]["token_logprobs"] for c in chunks), [])
    assert streamed == whole["logprobs"]["token_logprobs"]


def test_prompt_logprobs_are_the_same_when_the_prefix_is_cached(stories):
    client, _ = stories
    prompt = PROMPT + ", there was a little girl named Lily. She loved to play outside in the park."
    body = {"prompt": prompt, "max_tokens": 2, "logprobs": 0, "echo": True}
    first, again = completion(client, **body), completion(client, **body)
    assert again["choices"][0]["logprobs"] == first["choices"][0]["logprobs"]
    assert again["usage"]["prompt_tokens_details"]["cached_tokens"] == 0     # scored, so computed again
    cached = completion(client, prompt=prompt, max_tokens=2)
    assert cached["usage"]["prompt_tokens_details"]["cached_tokens"] > 0     # others still reuse it


def test_echo_with_logprobs_for_several_prompts_and_choices(stories, reference):
    client, _ = stories
    prompts = [PROMPT, "The dog ran"]
    reply = completion(client, prompt=prompts, n=2, max_tokens=3, logprobs=0, echo=True, temperature=0.7, seed=1)
    for choice in reply["choices"]:
        ids = reference.tokenizer.encode(prompts[choice["index"] // 2])
        assert choice["text"].startswith(prompts[choice["index"] // 2])
        assert len(choice["logprobs"]["tokens"]) == len(ids) + 3 and choice["logprobs"]["token_logprobs"][0] is None


def test_echo_with_logprobs_of_a_one_token_prompt(stories):
    client, engine = stories
    reply = completion(client, prompt=[[403], [1, 403, 407]], max_tokens=2, logprobs=0, echo=True)
    one, three = (c["logprobs"] for c in reply["choices"])
    assert one["token_logprobs"][0] is None and None not in one["token_logprobs"][1:] and len(one["tokens"]) == 3
    assert three["token_logprobs"][0] is None and None not in three["token_logprobs"][1:]
    assert one["tokens"][0] == piece(engine, 403) and len(three["tokens"]) == 5


# -- suffix ---------------------------------------------------------------------------------

def test_suffix_without_fim_tokens_is_a_400_naming_it(stories):
    client, _ = stories
    assert_400(post(client, prompt="def add(a, b):", suffix="\n    return c"), "suffix")
    assert completion(client, suffix="")["choices"][0]["text"]      # an empty suffix: nothing comes after


def test_a_fim_vocabulary_gets_the_prefix_suffix_middle_prompt():
    tok = Tokenizer.from_hf_folder(SHARED / "models" / "TinyLlama-1.1B-Chat-v1.0")
    assert fim_token_ids(tok) is None
    tok.backend.add_special_tokens(["<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>"])
    fim = fim_token_ids(tok)
    pre, suf, mid = (tok.token_to_id(t) for t in ("<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>"))
    assert fim == (pre, suf, mid) and min(fim) >= 32000
    ids = fim_ids(tok, fim, "def add(a, b):", "\n    return c")
    assert ids == ([tok.bos_id, pre] + tok.encode("def add(a, b):", add_bos=False) + [suf]
                   + tok.encode("\n    return c", add_bos=False) + [mid])
    # the tokenizer's own reading of the prompt written out with its special tokens
    assert ids == tok.encode("<|fim_prefix|>def add(a, b):<|fim_suffix|>\n    return c<|fim_middle|>")


# -- user and system_fingerprint ----------------------------------------------------------------

def test_user_is_written_into_the_access_line(stories, caplog):
    client, _ = stories
    with caplog.at_level(logging.INFO, logger="pyforge.access"):
        completion(client, user="alice-42")
        post(client, "/v1/chat/completions", messages=[{"role": "user", "content": "x"}], max_tokens=2,
             user="bob\nforged=1")
        completion(client)
    lines = [r for r in caplog.records if r.name == "pyforge.access"]
    assert [r.fields.get("user") for r in lines] == ["alice-42", ascii("bob\nforged=1"), None]
    assert "user=alice-42" in lines[0].getMessage() and "\n" not in lines[1].getMessage()


def test_every_response_and_chunk_carries_one_system_fingerprint(stories):
    client, _ = stories
    chat = {"messages": [{"role": "user", "content": "x"}], "max_tokens": 3}
    bodies = [completion(client), post(client, "/v1/chat/completions", **chat)[1]]
    bodies += sse_payloads(client.simulate_post("/v1/completions", json={
        "prompt": PROMPT, "max_tokens": 3, "stream": True, "stream_options": {"include_usage": True}}).text)
    bodies += sse_payloads(client.simulate_post("/v1/chat/completions", json={**chat, "stream": True}).text)
    prints = {b["system_fingerprint"] for b in bodies}
    assert len(bodies) > 6 and len(prints) == 1 and re.fullmatch(r"fp_[0-9a-f]{12}", prints.pop())


def test_the_fingerprint_follows_the_model_file(tmp_path):
    copy = tmp_path / "model.gguf"
    shutil.copy(STORIES, copy)
    assert system_fingerprint(str(copy)) == system_fingerprint(str(copy))
    assert system_fingerprint(str(copy)) != system_fingerprint(STORIES)
    before = system_fingerprint(str(copy))
    stat = os.stat(copy)
    os.utime(copy, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))      # the file was replaced
    assert system_fingerprint(str(copy)) != before


# -- a real server, the official client -------------------------------------------------------

def test_the_fields_through_pyforge_serve_and_the_openai_client(reference):
    openai = pytest.importorskip("openai")
    from live_server import Server

    server = Server(STORIES, "--chat-template", "chatml", "--log-level", "info")
    try:
        c = server.client
        r = c.completions.create(model="stories260K", prompt=PROMPT, max_tokens=4, temperature=0,
                                 logit_bias={"300": 100}, user="carol", echo=True, logprobs=1)
        ids = reference.tokenizer.encode(PROMPT)
        assert r.choices[0].logprobs.tokens[len(ids):] == [piece(reference, 300)] * 4
        assert r.choices[0].logprobs.token_logprobs[0] is None and r.choices[0].text.startswith(PROMPT)
        assert re.fullmatch(r"fp_[0-9a-f]{12}", r.system_fingerprint)

        greedy = greedy_ids(reference, PROMPT, 8)
        r = c.completions.create(model="stories260K", prompt=PROMPT, max_tokens=8, temperature=0,
                                 extra_body={"stop_token_ids": [greedy[2]]})
        assert r.choices[0].finish_reason == "stop" and r.usage.completion_tokens == 3
        r = c.completions.create(model="stories260K", prompt=PROMPT, max_tokens=8, temperature=0,
                                 logit_bias={str(EOS): 100}, extra_body={"min_tokens": 3})
        assert r.usage.completion_tokens == 4 and r.choices[0].finish_reason == "stop"

        r = c.completions.create(model="stories260K", prompt=PROMPT, max_tokens=6, temperature=1.2, seed=4,
                                 n=2, best_of=4)
        assert len(r.choices) == 2 and r.usage.completion_tokens > 12
        with pytest.raises(openai.BadRequestError) as e:
            c.completions.create(model="stories260K", prompt=PROMPT, best_of=2, stream=True)
        assert e.value.body["param"] == "best_of"
        with pytest.raises(openai.BadRequestError) as e:
            c.completions.create(model="stories260K", prompt="def f(", suffix="\n")
        assert e.value.body["param"] == "suffix"

        chat = c.chat.completions.create(model="stories260K", messages=[{"role": "user", "content": "Hi"}],
                                         max_tokens=3, temperature=0, logit_bias={"300": 100}, user="dave")
        assert chat.choices[0].message.content == piece(reference, 300) * 3
        prints = {chat.system_fingerprint} | {
            ch.system_fingerprint for ch in c.chat.completions.create(
                model="stories260K", messages=[{"role": "user", "content": "Hi"}], max_tokens=3, stream=True)}
        prints |= {c.completions.create(model="stories260K", prompt=PROMPT, max_tokens=1).system_fingerprint
                   for _ in range(4)}       # two workers: each computes the same one
        assert len(prints) == 1
        log = server.log()
        assert "user=carol" in log and "user=dave" in log
    finally:
        assert server.stop() == 0
        server.assert_clean()
