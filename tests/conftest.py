"""Shared test helpers.

REPO, SHARED (../shared beside the checkout) and STORIES (its stories260K GGUF)
are the one place those paths are written.

`require_module(name)` imports an optional reference library (torch, transformers,
llama_cpp, gguf, ...). Where it is missing the calling test is skipped with the
reason, unless PYFORGE_REQUIRE_REFERENCES=1 (set in CI): then it fails, so a
broken reference install can never pass as a green run.
"""
import importlib
import json
import os
from pathlib import Path

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
