"""SSE keep-alive comments while a prompt's prefill runs, before the first token, and the
--sse-keepalive / LLM_SSE_KEEPALIVE names of keepalive_interval.

The WSGI app is called directly and its body read chunk by chunk while the engine's
first forward pass (the prefill) is held: no token can come, so what the stream sends
then can only be keep-alives; nothing here depends on how long anything takes.
"""
import argparse
import json
import threading

import pytest
from falcon import testing

from conftest import inprocess_app
from pyforge.config import ServerConfig, add_arguments
from pyforge.server.sse import KEEPALIVE

MESSAGES = [{"role": "user", "content": "Hello"}]


@pytest.fixture(scope="module")
def served(model_path):
    with inprocess_app(model_path, keepalive_interval=0.01) as (app, engine):
        yield app.app, engine


IDLE_AFTER_EACH_TEST = ("served",)     # conftest.engines_idle_after


class HeldPrefill:
    """The engine's next forward pass waits (in the engine thread) until released."""

    def __init__(self, engine):
        self.entered, self.release = threading.Event(), threading.Event()
        real = engine.runner.forward

        def forward(*args, **kwargs):
            engine.runner.forward = real
            self.entered.set()
            assert self.release.wait(60), "the test never released the prefill"
            return real(*args, **kwargs)
        engine.runner.forward = forward


def open_stream(app, path, body):
    """(status, the body's iterator) of a POST, before any of the body is read."""
    started = []
    environ = testing.create_environ(method="POST", path=path, body=json.dumps(body),
                                     headers={"Content-Type": "application/json"})
    return app(environ, lambda status, headers, exc_info=None: started.append(status)), started


@pytest.mark.parametrize("path, body, opening", [
    ("/v1/chat/completions", {"messages": MESSAGES}, 1),     # the role chunk comes at once
    ("/v1/completions", {"prompt": "Hello"}, 0),
    ("/api/chat/stream", {"messages": MESSAGES}, 0),
])
def test_keepalives_flow_while_the_prefill_runs(served, path, body, opening):
    app, engine = served
    held = HeldPrefill(engine)
    result, started = open_stream(app, path, {**body, "stream": True, "max_tokens": 3, "ignore_eos": True})
    try:
        assert started == ["200 OK"]                 # the stream opened before its first token
        frames = iter(result)
        first = [next(frames) for _ in range(opening)]
        assert all(b'"role":"assistant"' in f for f in first)
        assert held.entered.wait(60)                  # the prefill is running (and held) now
        assert [next(frames) for _ in range(3)] == [KEEPALIVE] * 3
        held.release.set()
        rest = b"".join(frames)
    finally:
        held.release.set()
        result.close()
    assert b'"finish_reason":"length"' in rest and rest.endswith(b"data: [DONE]\n\n")


def test_sse_keepalive_flag_and_env_name_keepalive_interval():
    parser = add_arguments(argparse.ArgumentParser())
    assert ServerConfig.from_sources(parser.parse_args(["--model", "m", "--sse-keepalive", "2.5"]),
                                     env={}).keepalive_interval == 2.5
    assert ServerConfig.from_sources(parser.parse_args(["--model", "m"]),
                                     env={"LLM_SSE_KEEPALIVE": "3"}).keepalive_interval == 3.0
    # LLM_<FIELD> wins over the alias, a flag over both
    env = {"LLM_SSE_KEEPALIVE": "3", "LLM_KEEPALIVE_INTERVAL": "4"}
    assert ServerConfig.from_sources(parser.parse_args(["--model", "m"]), env=env).keepalive_interval == 4.0
    assert ServerConfig.from_sources(parser.parse_args(["--model", "m", "--sse-keepalive", "5"]),
                                     env=env).keepalive_interval == 5.0
    with pytest.raises(ValueError, match=r"keepalive_interval: must be > 0.*LLM_SSE_KEEPALIVE"):
        ServerConfig.from_sources(parser.parse_args(["--model", "m"]), env={"LLM_SSE_KEEPALIVE": "0"})
