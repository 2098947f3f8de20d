"""The web and transport surface: CORS, gzip both ways, several API keys (in-process
apps), and a live server over https (the official openai client trusting a CA made
here; plain http to the https port; clients that stall during or after the handshake)."""
import datetime
import gzip
import ipaddress
import json
import os
import socket
import ssl
import subprocess
import sys
import zlib

import openai
import pytest
from falcon import testing

from conftest import REPO, STORIES, sse_payloads
from live_server import Server, free_port, get
from pyforge.config import ServerConfig
from pyforge.engine.engine import Engine
from pyforge.server.app import create_app
from pyforge.server.inprocess import InProcessEngineClient
from pyforge.server.web import accepts_gzip, canonical_header_names

ORIGIN = "https://app.example"
KEY, KEY2, FILE_KEY = "sk-web-1", "sk-web-2", "sk-from-file"
GREEDY = {"temperature": 0, "seed": 1}
# a completion with five alternatives a token: a JSON body of several KiB
BIG = {"prompt": "Once upon a time", "max_tokens": 48, "ignore_eos": True, "logprobs": 5, **GREEDY}

IDLE_AFTER_EACH_TEST = ("served",)


@pytest.fixture(scope="module")
def served():
    engine = Engine(STORIES, n_threads=1, max_model_len=256, kv_cache_tokens=4096)
    client = InProcessEngineClient(engine, queue_capacity=16)
    yield None, engine, client          # (app, engine, ...) as IDLE_AFTER_EACH_TEST reads it; tests make their apps
    client.close()


def app_with(served, **config):
    _, engine, client = served
    return testing.TestClient(create_app(ServerConfig(model=STORIES, **config), client, engine.tokenizer))


def preflight(app, path, origin=ORIGIN, method="POST", headers="authorization, content-type, x-api-key"):
    return app.simulate_options(path, headers={"Origin": origin, "Access-Control-Request-Method": method,
                                               "Access-Control-Request-Headers": headers})


def assert_error(r, status, *words):
    assert r.status_code == status, r.text
    error = json.loads(r.content)["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert all(w in error["message"] for w in words), error["message"]


# -- CORS -------------------------------------------------------------------------

PATHS = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/v1/models/stories260K", "/api/chat/stream",
         "/api/llms", "/health/ready", "/no/such/path")


def test_preflight_needs_no_key_on_any_path(served):
    app = app_with(served, allowed_origins=(ORIGIN, "http://localhost:3000"), api_key=KEY)
    for path in PATHS:
        r = preflight(app, path)
        assert r.status_code == 200, (path, r.status_code, r.text)
        assert r.headers["access-control-allow-origin"] == ORIGIN
        assert "Origin" in r.headers["vary"]
        assert "POST" in r.headers["access-control-allow-methods"]
        assert r.headers["access-control-allow-headers"] == "authorization, content-type, x-api-key"
        assert int(r.headers["access-control-max-age"]) > 0
    # a preflight that names no headers is told the ones the API reads
    r = app.simulate_options("/v1/models", headers={"Origin": ORIGIN, "Access-Control-Request-Method": "GET"})
    allowed = r.headers["access-control-allow-headers"].lower()
    assert r.status_code == 200 and all(h in allowed for h in ("authorization", "x-api-key", "content-type"))


def test_preflight_from_another_origin_is_403(served):
    app = app_with(served, allowed_origins=(ORIGIN,), api_key=KEY)
    for origin in ("https://evil.example", "null", ORIGIN + ".evil.example"):
        r = preflight(app, "/v1/chat/completions", origin=origin)
        assert_error(r, 403, "not allowed")
        assert "access-control-allow-origin" not in r.headers


def test_responses_to_an_allowed_origin_carry_cors_headers(served):
    app = app_with(served, allowed_origins=(ORIGIN,), api_key=KEY)
    auth = {"Authorization": f"Bearer {KEY}"}
    r = app.simulate_post("/v1/completions", json={"prompt": "Once", "max_tokens": 2}, headers={"Origin": ORIGIN})
    assert_error(r, 401)                    # the page can read why, so CORS headers on errors too
    assert r.headers["access-control-allow-origin"] == ORIGIN
    for r in (app.simulate_get("/v1/models", headers={"Origin": ORIGIN, **auth}),
              app.simulate_get("/no/such/path", headers={"Origin": ORIGIN, **auth}),
              app.simulate_post("/v1/completions", json={"prompt": "Once", "max_tokens": 3, "stream": True},
                                headers={"Origin": ORIGIN, **auth})):
        assert r.headers["access-control-allow-origin"] == ORIGIN
        assert "X-Request-Id" in r.headers["access-control-expose-headers"]
        assert "Origin" in r.headers["vary"]
    assert r.headers["content-type"].startswith("text/event-stream") and sse_payloads(r.text)
    # another origin is answered as ever, with no CORS header: the browser keeps it from the page
    r = app.simulate_get("/v1/models", headers={"Origin": "https://evil.example", **auth})
    assert r.status_code == 200 and "access-control-allow-origin" not in r.headers


def test_any_origin(served):
    app = app_with(served, allowed_origins=("*",))
    r = preflight(app, "/v1/completions", origin="https://anywhere.example")
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "*"
    assert "access-control-allow-credentials" not in r.headers
    r = app.simulate_get("/v1/models", headers={"Origin": "https://anywhere.example"})
    assert r.headers["access-control-allow-origin"] == "*" and "vary" not in r.headers


def test_any_origin_with_credentials_echoes_the_origin(served):
    """vLLM's --allow-credentials: a browser refuses a credentialed response that says "*"."""
    app = app_with(served, allowed_origins=("*",), allow_credentials=True)
    for r in (preflight(app, "/v1/completions", origin="https://anywhere.example"),
              app.simulate_get("/v1/models", headers={"Origin": "https://anywhere.example"})):
        assert r.headers["access-control-allow-origin"] == "https://anywhere.example"
        assert r.headers["access-control-allow-credentials"] == "true"
        assert "Origin" in r.headers["vary"]


def test_preflight_methods_and_headers_as_configured(served):
    app = app_with(served, allowed_origins=(ORIGIN,), allowed_methods="GET, POST, DELETE, OPTIONS",
                   allowed_headers="*")
    r = preflight(app, "/v1/completions")
    assert r.headers["access-control-allow-methods"] == "GET, POST, DELETE, OPTIONS"
    assert r.headers["access-control-allow-headers"] == "*"
    default = preflight(app_with(served, allowed_origins=(ORIGIN,)), "/v1/completions")
    assert default.headers["access-control-allow-methods"] == "GET, POST, OPTIONS"


def test_cors_is_off_by_default(served):
    app = app_with(served, api_key=KEY)
    r = preflight(app, "/v1/models")
    assert r.status_code != 401 and not any(h.startswith("access-control-") for h in r.headers)
    r = app.simulate_get("/health", headers={"Origin": ORIGIN})
    assert not any(h.startswith("access-control-") for h in r.headers)


def test_header_names_go_out_in_their_usual_capitalisation():
    def app(environ, start_response):
        start_response("200 OK", [("content-type", "text/plain"), ("access-control-allow-origin", "*"),
                                  ("x-request-id", "r1"), ("ETag", "e")])
        return [b""]
    seen = {}
    canonical_header_names(app)({}, lambda status, headers, exc_info=None: seen.update(headers))
    assert list(seen) == ["Content-Type", "Access-Control-Allow-Origin", "X-Request-Id", "ETag"]


# -- gzip -------------------------------------------------------------------------

def test_large_responses_are_gzipped_for_clients_that_accept_it(served):
    app = app_with(served)
    plain = app.simulate_post("/v1/completions", json=BIG)
    assert plain.status_code == 200 and len(plain.content) > 2048
    assert "content-encoding" not in plain.headers and "Accept-Encoding" in plain.headers["vary"]
    zipped = app.simulate_post("/v1/completions", json=BIG, headers={"Accept-Encoding": "br, gzip;q=0.5"})
    assert zipped.headers["content-encoding"] == "gzip" and "Accept-Encoding" in zipped.headers["vary"]
    assert len(zipped.content) < len(plain.content)
    unzipped, expected = json.loads(gzip.decompress(zipped.content)), plain.json
    for body in (unzipped, expected):
        del body["id"], body["created"]
    assert unzipped == expected
    # refused (q=0), or too small to be worth it: sent as is
    r = app.simulate_post("/v1/completions", json=BIG, headers={"Accept-Encoding": "gzip;q=0, identity"})
    assert "content-encoding" not in r.headers and r.json["choices"]
    r = app.simulate_get("/health", headers={"Accept-Encoding": "gzip"})
    assert "content-encoding" not in r.headers and r.json == {"status": "ok"}


def test_streams_are_never_gzipped(served):
    app = app_with(served)
    r = app.simulate_post("/v1/completions", json={**BIG, "stream": True}, headers={"Accept-Encoding": "gzip"})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    assert "content-encoding" not in r.headers
    assert len(sse_payloads(r.text)) >= 2


@pytest.mark.parametrize("header, accepted", [
    ("gzip", True), ("GZIP", True), ("deflate, gzip;q=0.1", True), ("gzip; q=1.0", True),
    (None, False), ("", False), ("br", False), ("gzip;q=0", False), ("gzip;q=0.000", False), ("gzip;q=x", False),
])
def test_accepts_gzip(header, accepted):
    assert accepts_gzip(header) is accepted


def post_encoded(app, data, encoding="gzip"):
    return app.simulate_post("/v1/completions", body=data,
                             headers={"Content-Type": "application/json", "Content-Encoding": encoding})


def test_gzip_request_bodies_are_read(served):
    app = app_with(served)
    body = json.dumps({"prompt": "Once upon a time", "max_tokens": 4, **GREEDY}).encode()
    expected = app.simulate_post("/v1/completions", body=body, headers={"Content-Type": "application/json"})
    for data in (gzip.compress(body), gzip.compress(body[:10]) + gzip.compress(body[10:])):   # one member, two
        r = post_encoded(app, data)
        assert r.status_code == 200, r.text
        assert r.json["choices"][0]["text"] == expected.json["choices"][0]["text"]
    assert post_encoded(app, body, "identity").status_code == 200


def test_a_gzip_bomb_is_413(served):
    app = app_with(served, max_body_bytes=1 << 20)
    deflater = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    zeros = bytes(1 << 20)
    bomb = b"".join(deflater.compress(zeros) for _ in range(100)) + deflater.flush()   # 100 MiB of zeros
    assert len(bomb) < 1 << 20
    assert_error(post_encoded(app, bomb), 413, "decompressed")
    # just within the limit once inflated is fine (here: not JSON, so a 400 of another kind)
    assert_error(post_encoded(app, gzip.compress(bytes(1 << 20))), 400, "JSON")


def test_corrupt_gzip_is_400(served):
    app = app_with(served)
    good = gzip.compress(json.dumps({"prompt": "Once", "max_tokens": 2}).encode())
    assert_error(post_encoded(app, b"{\"prompt\": \"Once\"}"), 400, "gzip", "corrupt")
    assert_error(post_encoded(app, good[:10] + bytes([good[10] ^ 0xFF]) + good[11:]), 400, "gzip")
    assert_error(post_encoded(app, good[:-12]), 400, "gzip", "truncated")


def test_other_content_encodings_are_415(served):
    app = app_with(served)
    for coding in ("br", "deflate", "zstd", "gzip, br"):
        assert_error(post_encoded(app, b"{}", coding), 415, repr(coding))


# -- API keys ---------------------------------------------------------------------

def test_several_api_keys(served, tmp_path):
    key_file = tmp_path / "keys"
    key_file.write_text(f"# one key a line\n\n  {FILE_KEY}  \n")
    app = app_with(served, api_key=(KEY, KEY2), api_key_file=str(key_file))
    for key in (KEY, KEY2, FILE_KEY):
        for headers in ({"Authorization": f"Bearer {key}"}, {"authorization": f"bearer {key}"},
                        {"X-Api-Key": key}):
            assert app.simulate_get("/v1/models", headers=headers).status_code == 200, headers
    for headers in ({}, {"X-Api-Key": "# one key a line"}, {"X-Api-Key": KEY + KEY2}, {"X-Api-Key": KEY[:-1]},
                    {"Authorization": f"Bearer {KEY}x"}, {"Authorization": f"Basic {KEY}"}):
        assert_error(app.simulate_get("/v1/models", headers=headers), 401)
    # a Bearer header is the key presented, even beside a good X-Api-Key
    assert_error(app.simulate_get("/v1/models", headers={"Authorization": "Bearer no", "X-Api-Key": KEY}), 401)


# -- a live server over https -----------------------------------------------------

def make_certificates(directory):
    """A CA and a server certificate it signed for 127.0.0.1 and localhost: their paths (ca, cert, key)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.timezone.utc)

    def certificate(name, key, issuer, issuer_key, *extensions):
        builder = (x509.CertificateBuilder()
                   .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
                   .issuer_name(issuer).public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(hours=1))
                   .not_valid_after(now + datetime.timedelta(days=1))
                   .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
                   .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()),
                                  critical=False))
        for extension in extensions:
            builder = builder.add_extension(extension, critical=True)
        return builder.sign(issuer_key, hashes.SHA256())

    usage = dict(content_commitment=False, key_encipherment=False, data_encipherment=False, key_agreement=False,
                 encipher_only=False, decipher_only=False)
    ca_key, server_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "pyforge test CA")])
    ca = certificate("pyforge test CA", ca_key, ca_name, ca_key, x509.BasicConstraints(ca=True, path_length=0),
                     x509.KeyUsage(digital_signature=False, key_cert_sign=True, crl_sign=True, **usage))
    server = certificate("127.0.0.1", server_key, ca_name, ca_key, x509.BasicConstraints(ca=False, path_length=None),
                         x509.KeyUsage(digital_signature=True, key_cert_sign=False, crl_sign=False, **usage),
                         x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                         x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                                                      x509.DNSName("localhost")]))
    paths = directory / "ca.pem", directory / "server.pem", directory / "server.key"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(server.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(server_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                  serialization.NoEncryption()))
    return tuple(map(str, paths))


def test_a_certificate_and_key_that_do_not_match_are_a_clear_error(tmp_path):
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
    _, cert, _ = make_certificates(tmp_path / "a")
    _, _, other_key = make_certificates(tmp_path / "b")
    r = subprocess.run([sys.executable, "-m", "pyforge.cli", "serve", "--model", STORIES, "--port", str(free_port()),
                        "--ssl-certfile", cert, "--ssl-keyfile", other_key],
                       env={**os.environ, "PYTHONPATH": str(REPO)}, cwd=REPO, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 1
    assert "cannot load the TLS certificate" in r.stderr and "mismatch" in r.stderr, r.stderr


@pytest.fixture(scope="module")
def https_server(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tls")
    ca, cert, key = make_certificates(directory)
    (directory / "keys").write_text(FILE_KEY + "\n")
    # few threads: the stalling clients below outnumber them
    s = Server(STORIES, "--ssl-certfile", cert, "--ssl-keyfile", key, "--allowed-origins", ORIGIN,
               "--api-key", KEY, "--api-key", KEY2, "--api-key-file", str(directory / "keys"),
               "--chat-template", "chatml", "--worker-threads", "4", "--request-read-timeout", "3",
               "--log-level", "info", workers=1, ca=ca)
    s.client = s.client.with_options(api_key=KEY)
    yield s
    assert s.stop() == 0
    s.assert_clean()


def test_openai_client_over_https(https_server):
    s = https_server
    assert s.url.startswith("https://")
    messages = [{"role": "user", "content": "Tell me a story"}]
    r = s.client.chat.completions.create(model="stories260K", messages=messages, max_tokens=8, **GREEDY)
    assert r.choices[0].message.content and r.usage.completion_tokens == 8
    chunks = list(s.client.chat.completions.create(model="stories260K", messages=messages, max_tokens=8,
                                                   stream=True, **GREEDY))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == r.choices[0].message.content
    for key in (KEY2, FILE_KEY):        # every configured key, on the same kept-alive connection
        r = s.client.with_options(api_key=key).completions.create(model="stories260K", prompt="Once", max_tokens=2)
        assert r.choices[0].text is not None
    assert f"Listening at: https://127.0.0.1:{s.port}" in s.log()


def test_cors_and_gzip_over_https(https_server):
    s = https_server
    with openai.DefaultHttpxClient(verify=s.tls) as http:
        r = http.options(s.url + "/metrics", headers={"Origin": ORIGIN, "Access-Control-Request-Method": "GET"})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == ORIGIN
        body = gzip.compress(json.dumps(BIG).encode())
        r = http.post(s.url + "/v1/completions", content=body,
                      headers={"Content-Type": "application/json", "Content-Encoding": "gzip", "X-Api-Key": KEY,
                               "Origin": ORIGIN, "Accept-Encoding": "gzip"})
        assert r.status_code == 200, r.text
        assert r.headers["content-encoding"] == "gzip" and r.headers["access-control-allow-origin"] == ORIGIN
        assert len(r.json()["choices"][0]["logprobs"]["tokens"]) == BIG["max_tokens"]


def test_plain_http_to_the_https_port_fails_cleanly(https_server):
    s = https_server
    status, text = get(f"http://127.0.0.1:{s.port}/health")
    assert status == 400 and "https" in json.loads(text)["error"]["message"]
    with socket.create_connection(("127.0.0.1", s.port)) as raw:     # neither http nor TLS: closed
        raw.sendall(b"\x00" * 64 + b"\r\n\r\n")
        try:
            assert raw.recv(1024) == b""
        except ConnectionResetError:    # closed on bytes it did not read
            pass
    untrusting = ssl.create_default_context()                          # a client without our CA refuses
    with pytest.raises(ssl.SSLCertVerificationError):
        with socket.create_connection(("127.0.0.1", s.port)) as raw:
            untrusting.wrap_socket(raw, server_hostname="127.0.0.1")
    assert get(s.url + "/health", context=s.tls) == (200, '{"status": "ok"}')


def test_stalled_tls_clients_hold_no_thread(https_server):
    """More clients than threads stall: before the handshake, inside it, and after it with half a
    request. The handshakes and reads run in the worker's loop, so requests are still served."""
    s = https_server
    held = []
    try:
        for _ in range(6):
            held.append(socket.create_connection(("127.0.0.1", s.port)))       # says nothing
            half_hello = socket.create_connection(("127.0.0.1", s.port))
            half_hello.sendall(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")  # a ClientHello cut short
            held.append(half_hello)
            tls = s.tls.wrap_socket(socket.create_connection(("127.0.0.1", s.port)), server_hostname="127.0.0.1")
            tls.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                        b"Content-Length: 100\r\n\r\n{\"prompt\":")
            held.append(tls)
        for _ in range(3):
            r = s.client.completions.create(model="stories260K", prompt="Once", max_tokens=3, timeout=30)
            assert r.usage.completion_tokens == 3
    finally:
        for sock in held:
            sock.close()


def test_a_stalled_body_over_tls_is_answered(https_server):
    """After `Expect: 100-continue` a thread reads the body. Over TLS that read is bounded
    too (a Python timeout: OpenSSL takes a kernel timeout for "want more" and retries)."""
    s = https_server
    with s.tls.wrap_socket(socket.create_connection(("127.0.0.1", s.port)), server_hostname="127.0.0.1") as tls:
        tls.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nX-Api-Key: {KEY}\r\n"
                    "Content-Type: application/json\r\nExpect: 100-continue\r\nContent-Length: 50\r\n\r\n".encode())
        tls.settimeout(60)
        data = b""
        while b"}}" not in data and (chunk := tls.recv(65536)):
            data += chunk
    assert b"HTTP/1.1 400 " in data and b"the request body could not be read" in data, data
