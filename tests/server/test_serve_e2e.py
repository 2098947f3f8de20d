"""`pyforge serve` end to end on loopback: launcher, engine process, gunicorn
workers, the official `openai` client, metrics and drain (engine loss and
hostile clients: test_hardening.py)."""
import json
import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

pytest.importorskip("openai")

from live_server import REPO, Server, free_port, get, metric, post, read_sse_events, wait_for_metrics  # noqa: E402


@pytest.fixture(scope="module")
def server(model_path):
    s = Server(model_path)
    assert len(s.pids) >= 3          # the engine and two workers
    assert len(s.segments()) == 1
    yield s
    assert s.stop() == 0
    s.assert_clean()


GREEDY = {"temperature": 0, "extra_body": {"ignore_eos": True}}


def test_completions_and_chat_with_the_openai_client(server):
    c = server.client
    r = c.completions.create(model="tiny-gqa", prompt="Hello there", max_tokens=8, **GREEDY)
    assert r.usage.completion_tokens == 8 and r.choices[0].finish_reason == "length"
    chunks = list(c.completions.create(model="tiny-gqa", prompt="Hello there", max_tokens=8, stream=True,
                                       stream_options={"include_usage": True}, **GREEDY))
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == r.choices[0].text
    assert chunks[-1].usage.completion_tokens == 8

    messages = [{"role": "user", "content": "Say something."}]
    r = c.chat.completions.create(model="tiny-gqa", messages=messages, max_tokens=6, **GREEDY)
    assert r.usage.completion_tokens == 6 and r.choices[0].message.role == "assistant"
    chunks = list(c.chat.completions.create(model="tiny-gqa", messages=messages, max_tokens=6, stream=True,
                                            **GREEDY))
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == r.choices[0].message.content
    assert c.models.list().data[0].id == "tiny-gqa"


def test_concurrent_streams_equal_single_requests(server):
    c = server.client
    n = 32
    prompts = [f"Request number {i} says" for i in range(n)]
    single = [c.completions.create(model="tiny-gqa", prompt=p, max_tokens=12, **GREEDY).choices[0].text
              for p in prompts[:4]]

    def stream(p):
        chunks = list(c.completions.create(model="tiny-gqa", prompt=p, max_tokens=12, stream=True,
                                           stream_options={"include_usage": True}, **GREEDY))
        return "".join(ch.choices[0].text for ch in chunks if ch.choices), chunks[-1].usage.completion_tokens

    with ThreadPoolExecutor(n) as pool:
        results = list(pool.map(stream, prompts))
    assert all(k == 12 for _, k in results)
    assert [text for text, _ in results[:4]] == single
    with ThreadPoolExecutor(4) as pool:
        again = list(pool.map(stream, prompts[4:8]))
    assert again == results[4:8]


def test_metrics_sum_over_workers(server):
    before = get(server.url + "/metrics")[1]
    n = 12
    with ThreadPoolExecutor(n) as pool:
        list(pool.map(lambda i: server.client.completions.create(
            model="tiny-gqa", prompt=f"metrics {i}", max_tokens=5, **GREEDY), range(n)))
    # any worker answers for all: ask several times, always the same totals
    texts = [get(server.url + "/metrics")[1] for _ in range(6)]
    def grew(text, name):
        return metric(text, "pyforge:" + name) - metric(before, "pyforge:" + name)

    for text in texts:
        assert grew(text, "request_success_total") == n
        assert grew(text, "generation_tokens_total") == 5 * n
        assert grew(text, "e2e_request_latency_seconds_count") == n
        assert grew(text, "time_to_first_token_seconds_count") == n
        assert grew(text, "inter_token_latency_seconds_count") == 4 * n
        assert metric(text, "pyforge:num_requests_running") == 0
        assert metric(text, "pyforge:kv_cache_usage_perc") == 0
        assert metric(text, "pyforge:prompt_tokens_total") > 0
        for name in ("prefix_cache_queries_total", "prefix_cache_hits_total", "num_requests_waiting",
                     "inter_token_latency_seconds_count"):
            metric(text, "pyforge:" + name)
    assert 'pyforge:time_to_first_token_seconds_bucket{model_name="tiny-gqa",le="+Inf"}' in texts[0]


def test_sigterm_drains_an_inflight_stream(model_path):
    s = Server(model_path)
    stream = s.client.completions.create(model="tiny-gqa", prompt="Drain me", max_tokens=1500, stream=True,
                                         stream_options={"include_usage": True}, **GREEDY)
    chunks = iter(stream)
    next(chunks)
    s.proc.send_signal(signal.SIGTERM)
    t0 = time.monotonic()
    rest = list(chunks)
    assert time.monotonic() - t0 > 0.2          # still generating when the signal came
    assert rest[-1].usage.completion_tokens == 1500
    assert rest[-2].choices[0].finish_reason == "length"
    assert s.stop() == 0
    s.assert_clean()


def test_bad_model_file_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf file at all")
    r = subprocess.run([sys.executable, "-m", "pyforge.cli", "serve", "--model", str(bad), "--port", str(free_port())],
                       env={**os.environ, "PYTHONPATH": str(REPO)}, cwd=REPO, capture_output=True, text=True,
                       timeout=30)
    assert r.returncode == 1      # the start-up memory check reads the file first and says what is wrong
    assert "bad.gguf: not a GGUF file" in r.stderr and "Traceback" not in r.stderr


# -- prefix reuse, disconnects, bad requests next to good ones -------------------

def test_a_shared_prefix_is_served_from_the_cache(server, model_path):
    from pyforge.tokenizer import load_tokenizer
    from pyforge.loader import load_model_file
    tok = load_tokenizer(load_model_file(model_path))
    system = "You are the cache test assistant. " + " ".join(f"Rule {i}: answer briefly and kindly."
                                                           for i in range(30))
    prompts = [system + " Question: what is a river?", system + " Question: why is the sky blue?"]
    ids = [tok.encode(p) for p in prompts]
    shared = next(i for i, (a, b) in enumerate(zip(*ids)) if a != b)
    assert shared >= 200
    full_blocks = shared // 16 * 16
    hits = lambda text: metric(text, "pyforge:prefix_cache_hits_total")
    before = hits(get(server.url + "/metrics")[1])

    first, second = (server.client.completions.create(model="tiny-gqa", prompt=p, max_tokens=4, **GREEDY)
                     for p in prompts)
    assert first.usage.prompt_tokens == len(ids[0]) and second.usage.prompt_tokens == len(ids[1])
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    assert full_blocks <= cached < len(ids[1])
    text = wait_for_metrics(server, lambda t: hits(t) - before >= cached)
    assert hits(text) - before == cached


def test_a_client_that_disconnects_mid_stream_frees_its_blocks(server):
    idle_text = wait_for_metrics(server, lambda t: metric(t, "pyforge:num_requests_running") == 0)
    idle = metric(idle_text, "pyforge:kv_cache_usage_perc")
    body = json.dumps({"model": "tiny-gqa", "prompt": "Walk away from me", "max_tokens": 1800, "stream": True,
                       "temperature": 0, "ignore_eos": True}).encode()
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    try:
        sock.sendall(head + body)
        data = read_sse_events(sock, 3)
        assert data.startswith(b"HTTP/1.1 200")
        busy = get(server.url + "/metrics")[1]
        assert metric(busy, "pyforge:num_requests_running") == 1
        assert metric(busy, "pyforge:kv_cache_usage_perc") > idle
    finally:
        sock.close()
    text = wait_for_metrics(server, lambda t: metric(t, "pyforge:num_requests_running") == 0
                            and metric(t, "pyforge:kv_cache_usage_perc") == idle)
    assert metric(text, "pyforge:num_requests_running") == 0
    assert metric(text, "pyforge:kv_cache_usage_perc") == idle
    assert metric(text, "pyforge:generation_tokens_total") - metric(busy, "pyforge:generation_tokens_total") < 1500


def test_bad_requests_are_answered_while_a_good_stream_completes(server):
    stream = server.client.completions.create(model="tiny-gqa", prompt="Keep going", max_tokens=300, stream=True,
                                              stream_options={"include_usage": True}, **GREEDY)
    chunks = iter(stream)
    first = next(chunks)
    url = server.url + "/v1/completions"
    too_long = json.dumps({"model": "tiny-gqa", "prompt": [5] * 2100, "max_tokens": 4}).encode()
    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda b: post(url, b), [b'{"model": "tiny-gqa", "prompt": ', too_long] * 2))
    for (status, body), kind in zip(answers, ["invalid_request_error", "invalid_request_error"] * 2):
        assert status == 400 and body["error"]["type"] == kind
    assert answers[1][1]["error"]["code"] == "context_length_exceeded"
    rest = [first, *chunks]
    assert rest[-1].usage.completion_tokens == 300
    assert rest[-2].choices[0].finish_reason == "length"


def test_null_model_server_answers_with_the_requested_tokens(model_path):
    s = Server(model_path, "--null-model", workers=1)
    try:
        r = s.client.completions.create(model="tiny-gqa", prompt="Anything", max_tokens=40, temperature=1.0)
        assert r.usage.completion_tokens == 40 and r.choices[0].finish_reason == "length"
        chunks = list(s.client.chat.completions.create(
            model="tiny-gqa", messages=[{"role": "user", "content": "Hi"}], max_tokens=25, stream=True,
            stream_options={"include_usage": True}))
        assert chunks[-1].usage.completion_tokens == 25
        assert chunks[-2].choices[0].finish_reason == "length"
    finally:
        assert s.stop() == 0
    s.assert_clean()
