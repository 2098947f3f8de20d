"""POST /v1/embeddings: in-process for shapes, encodings and errors; a real `pyforge serve`
(the IPC path: POOLING extension, EMBEDDING record) with the official `openai` client,
against the engine's own result (tests/engine/test_pooling.py checks that against
transformers)."""
import base64

import numpy as np
import openai
import pytest

from conftest import inprocess_app
from live_server import Server
from pyforge.engine.engine import Engine


@pytest.fixture(scope="module")
def tiny(model_path):
    with inprocess_app(model_path, max_model_len=64) as served:
        yield served


@pytest.fixture(scope="module")
def tiny_mean(model_path):
    with inprocess_app(model_path, max_model_len=64, pooling="mean") as served:
        yield served


IDLE_AFTER_EACH_TEST = ("tiny", "tiny_mean")     # conftest.engines_idle_after


def close(a, b):
    """Vectors batched differently differ in their last bits (matmul blocking), no more."""
    return np.allclose(np.array(a), np.array(b), rtol=0, atol=1e-5)


def embed(app, status=200, **body):
    r = app.simulate_post("/v1/embeddings", json=body)
    assert r.status_code == status, r.json
    return r.json


def test_shape_usage_and_unit_norm(tiny):
    app, engine = tiny
    body = embed(app, input="Hello world", model="whatever", user="u1")
    ids = engine.tokenizer.encode("Hello world")
    assert body["object"] == "list" and body["model"] == "tiny-gqa"
    assert body["usage"] == {"prompt_tokens": len(ids), "total_tokens": len(ids)}
    [item] = body["data"]
    assert item["object"] == "embedding" and item["index"] == 0
    vec = np.array(item["embedding"])
    assert vec.shape == (engine.config.hidden_size,)
    assert abs(np.linalg.norm(vec) - 1.0) < 1e-5


def test_batch_and_token_ids_and_base64_agree(tiny):
    app, engine = tiny
    texts = ["Hello world", "Once upon a time", "a"]
    batch = embed(app, input=texts)
    assert [d["index"] for d in batch["data"]] == [0, 1, 2]
    singles = [embed(app, input=t)["data"][0]["embedding"] for t in texts]
    assert all(close(d["embedding"], one) for d, one in zip(batch["data"], singles))
    assert batch["usage"]["prompt_tokens"] == sum(len(engine.tokenizer.encode(t)) for t in texts)
    ids = [engine.tokenizer.encode(t) for t in texts]
    assert all(close(d["embedding"], one) for d, one in zip(embed(app, input=ids)["data"], singles))
    assert embed(app, input=ids[1])["data"][0]["embedding"] == singles[1]
    def decoded(d):
        return np.frombuffer(base64.b64decode(d["embedding"]), dtype="<f4").tolist()

    [one] = embed(app, input=texts[1], encoding_format="base64")["data"]
    assert decoded(one) == singles[1]          # the same float32 values, bit for bit
    encoded = embed(app, input=texts, encoding_format="base64")["data"]
    assert all(close(decoded(d), one) for d, one in zip(encoded, singles))
    assert embed(app, input="a", dimensions=engine.config.hidden_size)["data"][0]["embedding"] == singles[2]
    assert embed(app, input="a", encoding_format="float")["data"][0]["embedding"] == singles[2]


def test_mean_pooling_setting(tiny, tiny_mean):
    (app, _), (app_mean, _) = tiny, tiny_mean
    last = embed(app, input="Once upon a time")["data"][0]["embedding"]
    mean = embed(app_mean, input="Once upon a time")["data"][0]["embedding"]
    assert abs(np.linalg.norm(mean) - 1.0) < 1e-5 and mean != last
    # one token: the mean of one row is that row
    assert embed(app, input=[5])["data"][0]["embedding"] == embed(app_mean, input=[5])["data"][0]["embedding"]


@pytest.mark.parametrize("body, param", [
    ({"input": ""}, "input"),
    ({"input": []}, "input"),
    ({"input": ["ok", ""]}, "input"),
    ({"input": [[1, 2], []]}, "input"),
    ({"input": [1, "a"]}, "input"),
    ({"input": [10 ** 6]}, "input"),
    ({}, "input"),
    ({"input": "a", "encoding_format": "int8"}, "encoding_format"),
    ({"input": "a", "dimensions": 8}, "dimensions"),
    ({"input": "a", "dimensions": "all"}, "dimensions"),
])
def test_bad_requests_name_the_field(tiny, body, param):
    app, _ = tiny
    error = embed(app, 400, **body)["error"]
    assert error["param"] == param, error


def test_too_long_is_refused_never_truncated(tiny):
    app, _ = tiny
    error = embed(app, 400, input=["short", " word" * 100])["error"]
    assert error["param"] == "input" and "input[1]" in error["message"] and "64" in error["message"]
    assert embed(app, 400, input=[3] * 64)["error"]["param"] == "input"
    assert len(embed(app, input=[3] * 63)["data"][0]["embedding"]) > 0


def test_alias_without_v1(tiny):
    app, _ = tiny
    assert app.simulate_post("/embeddings", json={"input": "a"}).status_code == 200


# -- a real server: the IPC path, with the official client -----------------------------------

@pytest.fixture(scope="module")
def server(model_path):
    s = Server(model_path, "--pooling", "mean", workers=1)
    yield s
    assert s.stop() == 0
    s.assert_clean()


def test_openai_client(server, model_path):
    texts = ["Hello world", "Once upon a time there was"]
    r = server.client.embeddings.create(model="tiny-gqa", input=texts)     # the client asks for base64
    engine = Engine(model_path, n_threads=1, max_model_len=512, kv_cache_tokens=2048)
    expected = [engine.embed(t, "mean") for t in texts]
    assert [d.index for d in r.data] == [0, 1]
    for d, ref in zip(r.data, expected):
        assert close(d.embedding, ref)
    assert r.usage.prompt_tokens == r.usage.total_tokens == sum(len(engine.tokenizer.encode(t)) for t in texts)
    floats = server.client.embeddings.create(model="tiny-gqa", input=texts[0], encoding_format="float")
    assert close(floats.data[0].embedding, expected[0])
    with pytest.raises(openai.BadRequestError) as e:
        server.client.embeddings.create(model="tiny-gqa", input="a", dimensions=3)
    assert e.value.body["param"] == "dimensions"
