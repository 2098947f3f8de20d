"""Schemathesis against a real `pyforge serve`: requests generated from the server's own
/openapi.json, valid ones (positive) and ones that break the request schemas (negative),
and valid ones with stream: true, for every operation the spec lists, with a fixed seed:
about 1,300 requests in well under a minute. No answer may be a 5xx, and every answer
must match the response the spec documents for its status (JSON bodies, and each event
of an SSE stream). --max-tokens-limit keeps every generation short (the spec says so
too, so valid cases stay valid). The first failing case fails the test unshrunk.
"""
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, seed, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import response_schema_conformance

from conftest import STORIES
from live_server import Server
from pyforge.server import schemas

SEED = 20240611
MIN_CASES = 1000
POSITIVE, NEGATIVE = schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE
EXAMPLES = {POSITIVE: 45, NEGATIVE: 30, "streamed": 30}      # per operation
CHECKS = [not_a_server_error, response_schema_conformance]


@pytest.fixture(scope="module")
def server():
    server = Server(STORIES, "--chat-template", "chatml", "--max-tokens-limit", "8", "--default-max-tokens", "8",
                    "--max-model-len", "512")
    yield server
    assert server.stop() == 0
    server.assert_clean()


def streamed(case):
    """The case with stream: true (generated bodies seldom both hold it and pass every other check)."""
    if isinstance(case.body, dict):
        case.body = {**case.body, "stream": True}
    return case


def run_operation(operation, mode, base_url, session, sent):
    """Run `operation`'s generated cases; the first failing case raises (unshrunk: the time stays bounded)."""
    cases = operation.as_strategy(generation_mode=NEGATIVE if mode == NEGATIVE else POSITIVE)

    @seed(SEED)
    @settings(max_examples=EXAMPLES[mode], deadline=None, database=None, phases=[Phase.explicit, Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(case=cases.map(streamed) if mode == "streamed" else cases)
    def test(case):
        response = case.call(base_url=base_url, session=session, timeout=60)
        kind = (response.headers.get("content-type") or [""])[0]     # (each header: a list of values)
        sent.append((operation.label, response.status_code, kind))
        case.validate_response(response, checks=CHECKS)
    test()


def test_generated_requests_get_no_server_error_and_match_the_spec(server):
    schema = schemathesis.openapi.from_url(server.url + "/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 20
    sent = []
    with requests.Session() as session:
        for operation in operations:
            body = schemas.body_schema(operation.path) if operation.method.upper() == "POST" else None
            for mode in EXAMPLES:
                if mode == NEGATIVE and body is None:
                    continue                # a path segment is a string whatever it holds: nothing to break
                if mode == "streamed" and "stream" not in (body or {}).get("properties", {}):
                    continue
                run_operation(operation, mode, server.url, session, sent)
    print(f"{len(sent)} generated cases")
    assert len(sent) >= MIN_CASES, f"{len(sent)} cases"
    statuses = {status for _, status, _ in sent}
    assert 200 in statuses and 400 in statuses          # both kinds of case reached the server
    streams = [label for label, status, kind in sent if status == 200 and kind.startswith("text/event-stream")]
    assert {"POST /v1/completions", "POST /v1/chat/completions", "POST /api/chat/stream"} <= set(streams)
    assert all(status < 500 for _, status, _ in sent)
