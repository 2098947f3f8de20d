"""Several models behind one `pyforge serve`, from a hand-built Hugging Face cache:
one engine process each, a request's `model` picks the engine; the memory budget
checked at start; max_concurrent_requests across worker processes."""
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest

pytest.importorskip("openai")

from conftest import inprocess_app  # noqa: E402
from live_server import REPO, Server, free_port, get, post, read_sse_events  # noqa: E402

SAFETENSORS_REPO = "acme/tiny-st"
GGUF_SPEC = "acme/tiny-GGUF:tiny-mha.F32.gguf@acme/tiny-tok"
GGUF_NAME = "acme/tiny-GGUF:tiny-mha.F32.gguf"
PROMPTS = ["Once upon a time", "The cat sat on"]


def cached_snapshot(hub, repo_id, commit):
    repo = hub / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    return snapshot


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """A hub cache as `huggingface-cli download` leaves it: a safetensors repo, a GGUF
    repo without a tokenizer and a tokenizer-only repo (its chat template included)."""
    from pyforge.synthetic import TOKENIZER_FILES, _tinyllama_dir, write_gguf, write_hf_folder
    hub = tmp_path_factory.mktemp("hf") / "hub"
    write_hf_folder("tiny-gqa", cached_snapshot(hub, SAFETENSORS_REPO, "a1"), seed=1)
    write_gguf("tiny-mha", cached_snapshot(hub, "acme/tiny-GGUF", "b2") / "tiny-mha.F32.gguf", "F32", seed=2)
    tokenizer = cached_snapshot(hub, "acme/tiny-tok", "c3")
    for name in TOKENIZER_FILES:
        if (_tinyllama_dir() / name).exists():
            shutil.copyfile(_tinyllama_dir() / name, tokenizer / name)
    return hub


@pytest.fixture(scope="module")
def alone(hub):
    """Each model served alone, in process: what the shared server must answer."""
    old = os.environ.get("HF_HUB_CACHE")
    os.environ["HF_HUB_CACHE"] = str(hub)
    try:
        with contextlib.ExitStack() as stack:
            yield {spec: stack.enter_context(inprocess_app(spec, max_model_len=512, kv_cache_tokens=4096))[0]
                   for spec in (SAFETENSORS_REPO, GGUF_SPEC)}
    finally:
        os.environ.pop("HF_HUB_CACHE") if old is None else os.environ.update(HF_HUB_CACHE=old)


@pytest.fixture(scope="module")
def server(hub):
    s = Server(None, "--models", SAFETENSORS_REPO, "--models", GGUF_SPEC, "--kv-cache-tokens", "4096",
               env={"HF_HUB_CACHE": str(hub)}, ready_timeout=90)
    yield s
    assert s.stop() == 0
    s.assert_clean()


GREEDY = {"temperature": 0, "max_tokens": 8, "ignore_eos": True}


def test_each_request_is_answered_by_the_model_it_names(server, alone):
    for spec, name in ((SAFETENSORS_REPO, SAFETENSORS_REPO), (GGUF_SPEC, GGUF_NAME)):
        for prompt in PROMPTS:
            body = {"model": name, "prompt": prompt, **GREEDY}
            status, reply = post(server.url + "/v1/completions", json.dumps(body).encode())
            expected = alone[spec].simulate_post("/v1/completions", json=body).json
            assert status == 200 and reply["model"] == name
            assert reply["choices"][0]["text"] == expected["choices"][0]["text"]
    texts = {name: server.client.completions.create(model=name, prompt=PROMPTS[0], max_tokens=8, temperature=0,
                                                     extra_body={"ignore_eos": True}).choices[0].text
             for name in (SAFETENSORS_REPO, GGUF_NAME)}
    assert texts[SAFETENSORS_REPO] != texts[GGUF_NAME]      # two different random models


def test_the_gguf_model_chats_with_the_tokenizer_repos_template(server, alone):
    messages = [{"role": "user", "content": "Hello!"}]
    r = server.client.chat.completions.create(model=GGUF_NAME, messages=messages, max_tokens=6, temperature=0)
    expected = alone[GGUF_SPEC].simulate_post("/v1/chat/completions", json={
        "messages": messages, "max_tokens": 6, "temperature": 0}).json
    assert r.choices[0].message.content == expected["choices"][0]["message"]["content"]
    assert r.usage.prompt_tokens == expected["usage"]["prompt_tokens"] > 10     # TinyLlama's template was applied


def test_models_are_listed_and_unknown_ones_refused(server):
    ids = [m.id for m in server.client.models.list().data]
    assert ids == [SAFETENSORS_REPO, GGUF_NAME]
    status, card = get(server.url + "/v1/models/" + SAFETENSORS_REPO)       # an id with a slash
    assert status == 200 and '"acme/tiny-st"' in card
    assert get(server.url + "/v1/models/acme/none")[0] == 404
    assert [m["name"] for m in json.loads(get(server.url + "/api/llms")[1])["llms"]] == ids
    status, reply = post(server.url + "/v1/completions", b'{"model": "gpt-4", "prompt": "x"}')
    assert status == 404 and reply["error"]["code"] == "model_not_found"
    assert SAFETENSORS_REPO in reply["error"]["message"] and GGUF_NAME in reply["error"]["message"]


def test_readiness_and_metrics_per_model(server):
    status, body = get(server.url + "/health/ready")
    assert status == 200
    assert json.loads(body)["models"] == {SAFETENSORS_REPO: "ready", GGUF_NAME: "ready"}
    text = get(server.url + "/metrics")[1]
    for name in (SAFETENSORS_REPO, GGUF_NAME):
        assert f'pyforge:generation_tokens_total{{model_name="{name}"}}' in text
    assert text.count("# TYPE pyforge:generation_tokens_total counter") == 1
    assert len(server.segments()) == 2


# -- the memory budget -----------------------------------------------------------

def test_models_that_do_not_fit_are_refused_at_start(model_path):
    """A KV pool of 2**31 tokens (1 TiB for this model) cannot fit: a clear error, no engine."""
    port = free_port()
    proc = subprocess.run([sys.executable, "-m", "pyforge.cli", "serve", "--models", model_path, "--port", str(port),
                           "--kv-cache-tokens", str(2 ** 31)], cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert "the models need about" in proc.stderr and "KV pool" in proc.stderr and "available" in proc.stderr


def test_memory_need_counts_weights_and_kv_pool(model_path):
    from pyforge.config import ServerConfig
    from pyforge.serving.memory import check_memory, memory_need
    config = ServerConfig(model=model_path, kv_cache_tokens=1024)
    need = memory_need(config)
    assert need.kv_pool == 1024 * 2 * 2 * 2 * 16 * 4     # tokens x K,V x layers x kv heads x head_dim x float32
    half = memory_need(ServerConfig(model=model_path, kv_cache_tokens=1024, kv_cache_dtype="f16"))
    assert half.kv_pool == need.kv_pool // 2             # --kv-cache-dtype f16: 2 bytes a value
    assert need.weights >= os.path.getsize(model_path) * 0.9
    check_memory([config], available=need.total)
    with pytest.raises(ValueError, match="need about"):
        check_memory([config, config], available=need.total)


# -- max_concurrent_requests ----------------------------------------------------

def open_stream(url, max_tokens):
    """A raw streamed completion, left unread after its first event: with a small receive
    buffer the server's writes soon block, so it stays in flight (holds its place)."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", int(url.rsplit(":", 1)[1])))
    body = (b'{"prompt": "Tell me a story", "max_tokens": %d, "stream": true, "ignore_eos": true}' % max_tokens)
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    assert b"200 OK" in read_sse_events(sock, 1).split(b"\r\n", 1)[0]
    return sock


def test_concurrent_requests_are_limited_across_workers(model_path):
    server = Server(model_path, "--max-concurrent-requests", "2", "--request-read-timeout", "120")
    try:
        held = [open_stream(server.url, max_tokens=2000) for _ in range(2)]
        for _ in range(4):          # whichever worker takes it: the limit is the server's
            status, reply = post(server.url + "/v1/completions", b'{"prompt": "x", "max_tokens": 1}')
            assert status == 503 and "2 concurrent requests" in reply["error"]["message"]
        assert get(server.url + "/health/ready")[0] == 200           # GETs are never limited
        held.pop().close()          # a client leaves: its place is given back
        assert _eventually(lambda: post(server.url + "/v1/completions", b'{"prompt": "x", "max_tokens": 1}')[0]
                           == 200)
        # a worker killed while it holds a stream gives its place back too
        for pid in server.workers():
            os.kill(pid, signal.SIGKILL)
        assert _eventually(lambda: all(post(server.url + "/v1/completions",
                                            b'{"prompt": "x", "max_tokens": 1}')[0] == 200 for _ in range(3)))
        held[0].close()
    finally:
        assert server.stop() == 0


def _eventually(check, timeout=30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if check():
                return True
        except OSError:
            pass
        time.sleep(0.2)
    return False
