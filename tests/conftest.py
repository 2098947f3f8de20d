"""Shared test helpers.

REPO, SHARED (../shared beside the checkout) and STORIES (its stories260K GGUF)
are the one place those paths are written.

`require_module(name)` imports an optional reference library (torch, transformers,
llama_cpp, gguf, ...). Where it is missing the calling test is skipped with the
reason, unless PYFORGE_REQUIRE_REFERENCES=1 (set in CI): then it fails, so a
broken reference install can never pass as a green run.
"""
import importlib
from contextlib import contextmanager
import json
import os
from pathlib import Path
import time

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"          # models and vocabularies laid beside the checkout
STORIES = str(SHARED / "models" / "stories260K" / "stories260K.gguf")     # as Engine and ServerConfig take it


def require_module(name):
    try:
        return importlib.import_module(name)
    except ImportError as e:
        if os.environ.get("PYFORGE_REQUIRE_REFERENCES") == "1":
            pytest.fail(f"reference module {name!r} is required (PYFORGE_REQUIRE_REFERENCES=1): {e}")
        pytest.skip(f"reference module {name!r} is not installed: {e}")


@pytest.fixture(scope="session")
def model_path(tmp_path_factory):
    """A small random model (synthetic tiny-gqa, F32; served as "tiny-gqa"), written
    once per session; test modules that need another model define their own."""
    from pyforge.synthetic import write_gguf
    path = tmp_path_factory.mktemp("model") / "tiny-gqa.gguf"
    write_gguf("tiny-gqa", path, "F32")
    return str(path)


def fail_next_run(engine, error):
    """The engine's next forward pass raises `error` (as an out-of-memory would); later ones run."""
    real = engine.runner.forward

    def forward(*args, **kwargs):
        engine.runner.forward = real
        raise error
    engine.runner.forward = forward


def wait_engine_idle(engine, timeout=5.0):
    """Aborts (a client gone, a stop string) are applied by the engine's own
    thread: give it a moment, then insist on no work and every KV block free."""
    blocks = engine.block_manager
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and (engine.has_work or blocks.num_free != blocks.n_blocks):
        time.sleep(0.01)
    assert not engine.has_work and blocks.num_free == blocks.n_blocks


@pytest.fixture(autouse=True)
def engines_idle_after(request):
    """After every test of a module that names its served-engine fixtures in
    IDLE_AFTER_EACH_TEST (each yielding (app, engine, ...)), those engines are
    idle: a leaked request or KV block fails the test that left it."""
    yield
    for name in getattr(request.module, "IDLE_AFTER_EACH_TEST", ()):
        if name in request.fixturenames:
            wait_engine_idle(request.getfixturevalue(name)[1])


def drain_stream(stream):
    """(token ids, the last event) of a request stream (engine_client.RequestStream), read to its end."""
    from pyforge.server.engine_client import TokenEvent

    tokens, last = [], None
    for event in stream:
        if isinstance(event, TokenEvent):
            tokens.extend(event.token_ids)
        else:
            last = event
    return tokens, last


def sse_payloads(text):
    """The JSON payloads of an SSE response body (keep-alive comments skipped), which must end with [DONE]."""
    assert text.endswith("data: [DONE]\n\n"), text[-300:]
    return [json.loads(f[len("data: "):]) for f in text.split("\n\n") if f.startswith("data: {")]


@contextmanager
def inprocess_app(model_path, max_model_len=512, kv_cache_tokens=8192, **config):
    """(falcon TestClient, Engine): the app over an in-process engine on `model_path`, with
    ServerConfig `config` (its chat template, if any, set on the tokenizer as the server does)."""
    from falcon import testing

    from pyforge.config import ServerConfig
    from pyforge.engine.engine import Engine
    from pyforge.server.app import create_app
    from pyforge.server.inprocess import InProcessEngineClient

    engine = Engine(model_path, n_threads=1, max_model_len=max_model_len, kv_cache_tokens=kv_cache_tokens,
                    max_num_seqs=16)
    server_config = ServerConfig(model=model_path, **config)
    if server_config.chat_template:
        engine.tokenizer.chat_template = server_config.load_chat_template()
    client = InProcessEngineClient(engine, queue_capacity=64)
    try:
        yield testing.TestClient(create_app(server_config, client, engine.tokenizer)), engine
    finally:
        client.close()
