"""The operators' settings change what the server does (issue 11): sampling
defaults, the max_tokens limit, prefix caching, and a server configured by
environment variables alone."""
import json
import os
import subprocess
import sys
import time

import pytest

from conftest import REPO, inprocess_app
from live_server import free_port, get, post
from pyforge.config import ServerConfig
from pyforge.server import validation as v

PROMPT = "Once upon a time " * 8        # four blocks of 16 tokens and more


def test_server_defaults_stand_in_for_omitted_sampling_fields():
    config = ServerConfig(model="m", default_temperature=0.3, default_top_p=0.8)
    params = v.sampling_params({}, config)
    assert (params.temperature, params.top_p) == (0.3, 0.8)
    params = v.sampling_params({"temperature": 1.5, "top_p": None}, config)
    assert (params.temperature, params.top_p) == (1.5, 0.8)
    params = v.sampling_params({}, ServerConfig(model="m"))
    assert (params.temperature, params.top_p) == (1.0, 1.0)


def test_a_zero_default_temperature_makes_omitted_temperature_greedy(model_path):
    with inprocess_app(model_path, default_temperature=0.0) as (app, _):
        body = {"prompt": "Hello", "max_tokens": 12, "ignore_eos": True}
        texts = {app.simulate_post("/v1/completions", json=body).json["choices"][0]["text"] for _ in range(3)}
        greedy = app.simulate_post("/v1/completions", json={**body, "temperature": 0}).json["choices"][0]["text"]
    assert texts == {greedy}


@pytest.mark.parametrize("enabled", [True, False])
def test_prefix_caching_can_be_turned_off(model_path, enabled):
    from pyforge.engine.engine import Engine
    engine = Engine(model_path, n_threads=1, max_model_len=512, kv_cache_tokens=4096,
                    enable_prefix_caching=enabled)
    from pyforge.engine.sampling_params import SamplingParams
    ids = engine.tokenizer.encode(PROMPT)
    for _ in range(2):
        list(engine.generate(ids, SamplingParams(max_tokens=2, temperature=0)))
    assert (engine.block_manager.prefix_hits > 0) == enabled


def test_a_server_configured_by_environment_alone(model_path):
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO), "LLM_MODEL_PATH": model_path,
           "LLM_INFERENCE_HOSTNAME": "127.0.0.1", "LLM_INFERENCE_PORT": str(port), "LLM_WORKERS": "1",
           "LLM_THREADS": "1", "LLM_DEFAULT_MAX_TOKENS": "5", "LLM_MAX_TOKENS_LIMIT": "40",
           "LLM_DEFAULT_TEMPERATURE": "0", "LLM_PAGED_ATTENTION_BLOCK_SIZE": "32",
           "LLM_PAGED_ATTENTION_CONTEXT_SIZE": "4096", "LLM_ENABLE_PREFIX_CACHING": "false",
           "LLM_NOT_A_SETTING": "1", "LLM_LOG_LEVEL": "info"}
    proc = subprocess.Popen([sys.executable, "-m", "pyforge.cli", "serve"], cwd=REPO, env=env,
                            stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_ready(proc, url)
        body = {"prompt": PROMPT, "ignore_eos": True}
        replies = [post(url + "/v1/completions", json.dumps(body).encode()) for _ in range(2)]
        assert [r[0] for r in replies] == [200, 200]
        assert replies[0][1]["choices"][0]["text"] == replies[1][1]["choices"][0]["text"]   # greedy by default
        assert [r[1]["usage"]["completion_tokens"] for r in replies] == [5, 5]
        assert [r[1]["usage"]["prompt_tokens_details"]["cached_tokens"] for r in replies] == [0, 0]
        status, reply = post(url + "/v1/completions", json.dumps({**body, "max_tokens": 41}).encode())
        assert status == 400 and reply["error"]["param"] == "max_tokens"
    finally:
        proc.terminate()
        _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0
    assert "LLM_NOT_A_SETTING" in stderr and "names no pyforge setting" in stderr


def _wait_ready(proc, url, timeout=60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stderr.read()
        try:
            if get(url + "/health/ready", 1)[0] == 200:
                return
        except OSError:
            pass
        time.sleep(0.1)
    raise AssertionError("the server did not get ready")


def _ipv6_loopback():
    import socket
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not _ipv6_loopback(), reason="no IPv6 loopback here")
def test_a_server_listens_on_every_address_of_host(model_path):
    """--host 127.0.0.1,::1 (llama-server's comma-separated form): both answer."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "pyforge.cli", "serve", "--model", model_path,
                             "--host", "127.0.0.1, ::1", "--port", str(port), "--workers", "1", "--threads", "1"],
                            cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, stderr=subprocess.PIPE, text=True)
    try:
        _wait_ready(proc, f"http://127.0.0.1:{port}")
        for url in (f"http://127.0.0.1:{port}", f"http://[::1]:{port}"):
            assert get(url + "/health")[0] == 200, url
    finally:
        proc.terminate()
        proc.communicate(timeout=60)


def test_host_takes_several_addresses():
    assert ServerConfig(model="m", host="127.0.0.1, ::1").hosts == ("127.0.0.1", "::1")
    with pytest.raises(ValueError, match="host: has an empty address"):
        ServerConfig(model="m", host="127.0.0.1,,::1")
