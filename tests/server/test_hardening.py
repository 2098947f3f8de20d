"""One bad client hurts no one else; a dead engine comes back. Each test runs a real
`pyforge serve` (gunicorn serving, the engine its own process) and reproduces
what an attacker or an unlucky operator does to it."""
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

pytest.importorskip("openai")

from live_server import REPO, Server, get, metric, post, wait_for_metrics  # noqa: E402

GREEDY = {"temperature": 0, "extra_body": {"ignore_eos": True}}


@pytest.fixture(scope="module")
def server(model_path):
    s = Server(model_path, "--request-read-timeout", "3")
    yield s
    assert s.stop() == 0
    s.assert_clean()


def engine_pid(server):
    return next(p for p in server.pids_now() if b"engine_process" in Path(f"/proc/{p}/cmdline").read_bytes())


def idle(server):
    text = wait_for_metrics(server, lambda t: metric(t, "pyforge:num_requests_running") == 0
                            and metric(t, "pyforge:num_requests_waiting") == 0)
    assert metric(text, "pyforge:num_requests_running") == 0
    return text


def start_streams(server, n, max_tokens):
    """n streams already generating: (their chunk iterators, the first chunks)."""
    streams = [iter(server.client.completions.create(
        model="tiny-gqa", prompt=f"Stream {i} goes on", max_tokens=max_tokens, stream=True,
        stream_options={"include_usage": True}, **GREEDY)) for i in range(n)]
    return streams, [next(s) for s in streams]


def finish_cleanly(streams, firsts, max_tokens):
    for stream, first in zip(streams, firsts):
        rest = [first, *stream]
        assert rest[-2].choices[0].finish_reason == "length"
        assert rest[-1].usage.completion_tokens == max_tokens


# -- poison values -----------------------------------------------------------------

POISON = [
    {"top_k": 2**31}, {"top_k": 2**64}, {"max_tokens": 2**64}, {"max_tokens": 2**31},
    {"stop_token_ids": [2**31]}, {"n": 2**64},
]
RAW_POISON = [   # bodies json.dumps cannot write: an integer literal past 1e308 in float fields
    '{"model": "tiny-gqa", "prompt": "x", "max_tokens": 2, "temperature": 1%s}' % ("0" * 400),
    '{"model": "tiny-gqa", "prompt": "x", "max_tokens": 2, "repetition_penalty": 1%s}' % ("0" * 400),
    '{"model": "tiny-gqa", "prompt": "x", "max_tokens": 2, "top_p": -1%s}' % ("0" * 400),
]


def test_poison_values_are_400_and_live_streams_finish(server):
    streams, firsts = start_streams(server, 3, 200)
    url = server.url + "/v1/completions"
    bodies = [json.dumps({"model": "tiny-gqa", "prompt": "poison", **p}).encode() for p in POISON]
    bodies += [b.encode() for b in RAW_POISON]
    bodies.append(json.dumps({"model": "tiny-gqa", "prompt": "lone \ud800 surrogate"}).encode())
    bodies.append(json.dumps({"model": "tiny-gqa", "messages": [{"role": "user", "content": "\udfff"}]}).encode())
    for body in bodies:
        path = "/v1/chat/completions" if b'"messages"' in body else "/v1/completions"
        status, reply = post(server.url + path, body)
        assert status == 400, (body[:80], reply)
        assert reply["error"]["type"] == "invalid_request_error"
        assert len(reply["error"]["message"]) < 300       # values are not echoed whole
    finish_cleanly(streams, firsts, 200)
    assert post(url, json.dumps({"model": "tiny-gqa", "prompt": "fine", "max_tokens": 3}).encode())[0] == 200


def test_an_integer_seed_of_any_size_is_accepted(server):
    r = server.client.completions.create(model="tiny-gqa", prompt="seeded", max_tokens=3, seed=2**70)
    assert r.usage.completion_tokens == 3


# -- stalled and slow clients --------------------------------------------------------

HEAD = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"


def stalled_sockets(port, n):
    """n connections that each send part of a request and stop: half a request line,
    half the headers, or a whole head whose promised body never comes."""
    partial = [b"POST /v1/compl", HEAD, HEAD + b"Content-Length: 100\r\n\r\n{\"mod"]
    socks = []
    for i in range(n):
        s = socket.create_connection(("127.0.0.1", port), timeout=10)
        s.sendall(partial[i % 3])
        socks.append(s)
    return socks


def drip(socks, stop):
    """slowloris: one more header byte on each socket every 0.5 s, never the end."""
    for s in socks:
        s.sendall(HEAD)
    while not stop.wait(0.5):
        for s in socks:
            try:
                s.sendall(b"X")
            except OSError:
                pass


def closed_by_server(sock, timeout):
    sock.settimeout(timeout)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True
    except socket.timeout:
        return False


def test_stalled_and_dripping_clients_do_not_hold_the_server(server):
    read_timeout = 3.0
    socks = stalled_sockets(server.port, 900)
    drippers = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(100)]
    stop = threading.Event()
    thread = threading.Thread(target=drip, args=(drippers, stop), daemon=True)
    thread.start()
    try:
        time.sleep(0.5)      # every socket is accepted and stalled (900 + 100 > 2 workers x 40 threads)
        t0 = time.monotonic()
        r = server.client.with_options(timeout=read_timeout + 2).completions.create(
            model="tiny-gqa", prompt="Still served", max_tokens=4)
        assert r.usage.completion_tokens == 4
        assert time.monotonic() - t0 < read_timeout + 2
        # and the server drops them all once their time is up, drippers included
        assert all(closed_by_server(s, read_timeout + 3) for s in socks[:30] + drippers[:10])
    finally:
        stop.set()
        thread.join()
        for s in socks + drippers:
            s.close()


def test_a_body_sent_slowly_but_in_time_is_served(server):
    body = json.dumps({"model": "tiny-gqa", "prompt": "slow but fine", "max_tokens": 2}).encode()
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
        s.sendall(HEAD + f"Content-Length: {len(body)}\r\n\r\n".encode())
        for i in range(0, len(body), 10):
            s.sendall(body[i:i + 10])
            time.sleep(0.1)
        reply = s.recv(65536)
    assert reply.startswith(b"HTTP/1.1 200")


# -- bodies and content types ----------------------------------------------------------

def test_a_chunked_body_is_read(server):
    body = json.dumps({"model": "tiny-gqa", "prompt": "Chunked hello", "max_tokens": 3}).encode()
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    conn.request("POST", "/v1/completions", body=iter([body[:20], body[20:]]),
                 headers={"Content-Type": "application/json"}, encode_chunked=True)
    r = conn.getresponse()
    reply = json.loads(r.read())
    assert r.status == 200, reply
    assert reply["usage"]["completion_tokens"] == 3


@pytest.mark.parametrize("content_type", [None, "application/x-www-form-urlencoded", "text/plain"])
def test_json_routes_need_a_json_content_type(server, content_type):
    body = json.dumps({"model": "tiny-gqa", "prompt": "form", "max_tokens": 2}).encode()
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    conn.putrequest("POST", "/v1/completions")
    if content_type:
        conn.putheader("Content-Type", content_type)
    conn.putheader("Content-Length", str(len(body)))
    conn.endheaders(body)
    r = conn.getresponse()
    assert r.status == 415
    assert json.loads(r.read())["error"]["type"] == "invalid_request_error"


# -- admission, disconnects --------------------------------------------------------------

def raw_stream(port, prompt, max_tokens):
    """(status, headers, body) of one streamed completion read to its end."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    body = {"model": "tiny-gqa", "prompt": prompt, "max_tokens": max_tokens, "stream": True,
            "temperature": 0, "ignore_eos": True}
    conn.request("POST", "/v1/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
    r = conn.getresponse()
    return r.status, r.headers, r.read().decode()


def test_a_stream_refused_for_capacity_is_503_before_it_starts(model_path):
    s = Server(model_path, "--queue-capacity", "1", "--max-num-seqs", "1", workers=2)
    try:
        with ThreadPoolExecutor(12) as pool:
            answers = list(pool.map(lambda i: raw_stream(s.port, f"Crowd {i}", 40), range(12)))
        refused = [a for a in answers if a[0] == 503]
        served = [a for a in answers if a[0] == 200]
        assert refused and served and len(refused) + len(served) == len(answers)
        for _, headers, body in refused:
            assert headers.get("Retry-After") and json.loads(body)["error"]["type"] == "server_error"
        for _, _, body in served:      # no in-band refusals: every 200 stream is whole
            assert '"error"' not in body and body.endswith("data: [DONE]\n\n") and '"length"' in body
    finally:
        assert s.stop() == 0
    s.assert_clean()


def test_a_non_streamed_client_that_leaves_is_aborted(server):
    """The request ends when its client leaves, not when its 4 x 2000 tokens are done: the
    server looks at the socket every DISCONNECT_CHECK (0.25 s), while the whole answer takes
    the tiny model about a second here (so more work than that would be a stale bound)."""
    before = idle(server)
    body = json.dumps({"model": "tiny-gqa", "prompt": "Nobody waits for me", "max_tokens": 2000, "n": 4,
                       "temperature": 0, "ignore_eos": True}).encode()
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    sock.sendall(HEAD + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
    busy = wait_for_metrics(server, lambda t: metric(t, "pyforge:num_requests_running") >= 1)
    assert metric(busy, "pyforge:num_requests_running") >= 1
    sock.close()
    after = idle(server)
    assert metric(after, "pyforge:kv_cache_usage_perc") == metric(before, "pyforge:kv_cache_usage_perc")
    generated = metric(after, "pyforge:generation_tokens_total") - metric(before, "pyforge:generation_tokens_total")
    print(f"generated {generated:.0f} of 8000 tokens before the abort")
    assert generated < 4 * 2000
    assert metric(after, "pyforge:request_success_total") == metric(before, "pyforge:request_success_total")


# -- a dead engine, a dead worker ----------------------------------------------------------

def test_a_killed_engine_is_restarted_and_queued_requests_complete(model_path):
    s = Server(model_path, "--max-num-seqs", "1", workers=1)
    try:
        running = iter(s.client.with_options(timeout=30).completions.create(model="tiny-gqa", prompt="Running when it dies",
                                                   max_tokens=1800, stream=True, **GREEDY))
        next(running)
        with ThreadPoolExecutor(3) as pool:
            queued = [pool.submit(s.client.with_options(timeout=60).completions.create, model="tiny-gqa",
                                  prompt=f"Queued {i}", max_tokens=5, **GREEDY) for i in range(3)]
            wait_for_metrics(s, lambda t: metric(t, "pyforge:num_requests_waiting") == 3)
            old = engine_pid(s)
            t0 = time.monotonic()
            os.kill(old, signal.SIGKILL)
            with pytest.raises(Exception):      # the running stream ends with an error event
                list(running)
            while get(s.url + "/health/ready")[0] != 200:
                assert time.monotonic() - t0 < 30, "the engine did not come back within 30 s"
                time.sleep(0.05)
            restart = time.monotonic() - t0
            results = [f.result() for f in queued]
        assert all(r.usage.completion_tokens == 5 for r in results)
        assert engine_pid(s) != old
        r = s.client.completions.create(model="tiny-gqa", prompt="After the restart", max_tokens=4)
        assert r.usage.completion_tokens == 4
        print(f"engine restart: ready again {restart:.2f} s after SIGKILL")
    finally:
        assert s.stop() == 0
    s.assert_clean()
    assert "killed by SIGKILL" in s.log()


def test_an_engine_that_keeps_crashing_stops_the_server(model_path):
    s = Server(model_path, "--max-engine-restarts", "1", workers=1)
    os.kill(engine_pid(s), signal.SIGKILL)
    deadline = time.monotonic() + 30
    while (pid := engine_pid_or_none(s)) is None or get(s.url + "/health/ready")[0] != 200:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)
    assert s.proc.wait(30) == 1
    s.assert_clean()
    assert "giving up" in s.log()


def engine_pid_or_none(server):
    try:
        return engine_pid(server)
    except (StopIteration, OSError):
        return None


def test_a_killed_worker_s_requests_are_aborted_at_once(model_path):
    s = Server(model_path, workers=1)
    try:
        before = idle(s)
        stream = iter(s.client.completions.create(model="tiny-gqa", prompt="Orphan me", max_tokens=1800,
                                                  stream=True, **GREEDY))
        next(stream)
        [worker] = s.workers()
        os.kill(worker, signal.SIGKILL)
        after = wait_for_metrics(s, lambda t: metric(t, "pyforge:num_requests_running") == 0, timeout=3)
        assert metric(after, "pyforge:num_requests_running") == 0
        generated = metric(after, "pyforge:generation_tokens_total") - metric(before, "pyforge:generation_tokens_total")
        assert generated < 1000
    finally:
        assert s.stop() == 0
    s.assert_clean()


def test_a_killed_server_s_segment_is_removed_by_the_next_start(model_path):
    s = Server(model_path, workers=1)
    [segment] = s.segments()
    for pid in [s.proc.pid, *s.pids_now()]:
        os.kill(pid, signal.SIGKILL)
    s.proc.wait(10)
    assert os.path.exists(f"/dev/shm/{segment}")
    again = Server(model_path, workers=1)
    try:
        assert not os.path.exists(f"/dev/shm/{segment}")
    finally:
        assert again.stop() == 0
    again.assert_clean()


# -- smaller findings ----------------------------------------------------------------------

def test_a_model_file_path_is_not_a_model_name(server, model_path):
    """One model served: any name is answered by it (as llama-server does), under its
    served name: the reply tells nothing about which paths exist."""
    status, reply = post(server.url + "/v1/completions",
                         json.dumps({"model": model_path, "prompt": "x", "max_tokens": 2}).encode())
    assert status == 200 and reply["model"] != model_path and "/" not in reply["model"]
    assert get(server.url + "/v1/models/" + model_path.lstrip("/"))[0] == 404
    status, reply = post(server.url + "/v1/completions",
                         json.dumps({"model": "m" * 10000, "prompt": "x", "max_tokens": 2}).encode())
    assert status == 200 and reply["model"] == json.loads(get(server.url + "/v1/models")[1])["data"][0]["id"]


def test_a_busy_port_is_an_error_before_the_model_loads(model_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        r = subprocess.run([sys.executable, "-m", "pyforge.cli", "serve", "--model", model_path, "--port", str(port)],
                           env={**os.environ, "PYTHONPATH": str(REPO)}, cwd=REPO, capture_output=True, text=True,
                           timeout=30)
    assert r.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}" in r.stderr
    assert "engine ready" not in r.stderr and "loading" not in r.stderr


def test_inspect_into_a_closed_pipe_is_quiet(model_path):
    """`pyforge inspect FILE | head`: the reader is gone before inspect writes (closed
    here at once, while the child still imports)."""
    proc = subprocess.Popen([sys.executable, "-m", "pyforge.cli", "inspect", "--tensors", model_path],
                            env={**os.environ, "PYTHONPATH": str(REPO)}, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(60) == 0
    assert "BrokenPipe" not in err and "Traceback" not in err


def test_a_wedged_engine_makes_ready_fail_until_it_beats_again(model_path):
    """Alive is not enough: an engine that stops stepping (SIGSTOP stands in for a
    hang) turns /health/ready 503 after --engine-heartbeat-timeout; it comes back."""
    s = Server(model_path, "--engine-heartbeat-timeout", "1", workers=1)
    pid = engine_pid(s)
    try:
        os.kill(pid, signal.SIGSTOP)
        deadline = time.monotonic() + 10
        while get(s.url + "/health/ready")[0] == 200:
            assert time.monotonic() < deadline, "ready stayed 200 for a wedged engine"
            time.sleep(0.1)
        os.kill(pid, signal.SIGCONT)
        deadline = time.monotonic() + 10
        while get(s.url + "/health/ready")[0] != 200:
            assert time.monotonic() < deadline, "ready did not come back with the heartbeat"
            time.sleep(0.1)
    finally:
        os.kill(pid, signal.SIGCONT)
        assert s.stop() == 0
    s.assert_clean()
