"""GuardedThreadWorker's framing rules: when a request read in the event loop is whole
enough to hand to a thread (the live behaviour is in test_hardening.py)."""
import json

import pytest

from pyforge.server.worker import chunked_body_end, refusal, request_complete, unsupported_coding

HEAD = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n"
LIMIT = 1000


def whole(data):
    return request_complete(bytearray(data), LIMIT)


@pytest.mark.parametrize("data, complete", [
    (b"POST /v1/compl", False),                                         # half a request line
    (HEAD, False),                                                      # half the headers
    (HEAD + b"\r\n", True),                                             # no body
    (HEAD + b"Content-Length: 5\r\n\r\nabc", False),
    (HEAD + b"Content-Length: 5\r\n\r\nabcde", True),
    (HEAD + b"content-length:5\r\n\r\nabcdeNEXT", True),               # a pipelined request behind it
    (HEAD + b"Content-Length: 5000\r\n\r\nabc", True),                  # past the limit: the app says 413
    (HEAD + b"Content-Length: 5\r\nContent-Length: 6\r\n\r\n", True),   # conflicting: the parser refuses
    (HEAD + b"Expect: 100-continue\r\nContent-Length: 5\r\n\r\n", True),  # the client waits for us
    (HEAD + b"Transfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n", False),
    (HEAD + b"Transfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n", True),
    (HEAD + b"Transfer-Encoding: chunked\r\n\r\n3;x=y\r\nabc\r\n0;z\r\nTrailer: 1\r\n\r\n", True),
    (HEAD + b"Transfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\nTrailer: 1\r\n", False),
    (HEAD + b"Transfer-Encoding: chunked\r\n\r\nzz\r\n", True),         # malformed: the parser answers 400
    (HEAD + b"Transfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n", True),
    (HEAD + b"Transfer-Encoding: gzip\r\n\r\n", True),
    (HEAD + b"X: " + b"a" * (70 << 10), True),                          # a head too long to be valid
])
def test_when_a_request_is_whole(data, complete):
    assert whole(data) is complete


def test_a_chunked_body_end_is_found_past_its_chunks():
    body = b"3\r\nabc\r\n10\r\n" + b"x" * 16 + b"\r\n0\r\n\r\nGET / HTTP/1.1\r\n"
    assert chunked_body_end(memoryview(body)) == body.index(b"GET")


def test_an_unsupported_transfer_coding_is_refused_in_our_error_shape():
    assert unsupported_coding(HEAD + b"Transfer-Encoding: xchunked\r\n\r\n") == "xchunked"
    assert unsupported_coding(HEAD + b"Transfer-Encoding: chunked\r\n\r\n") is None
    reply = refusal(400, "unsupported")
    head, body = reply.split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.1 400 Bad Request") and b"Connection: close" in head
    assert json.loads(body)["error"]["type"] == "invalid_request_error"
