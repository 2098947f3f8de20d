"""Web-facing middleware: CORS for browser clients, gzip for large responses.

CORS, with vLLM's settings (`allowed_origins`, "*" for any; `allow_credentials`,
`allowed_methods`, `allowed_headers`). A preflight (OPTIONS with Origin and
Access-Control-Request-Method) is answered here, before auth and routing, so
it works on every path and needs no key (browsers never send one on it): 200
with the allowed methods and headers, or a 403 error for an origin not allowed.
Every other response to an allowed origin, errors and SSE streams included,
carries Access-Control-Allow-Origin; a response to any other origin carries
no CORS header, and the browser keeps it from the page. With credentials
allowed, the origin is echoed even under "*": browsers refuse a credentialed
response that says "*".

gzip: a whole body of at least GZIP_MIN_BYTES goes out compressed to a client
whose Accept-Encoding takes gzip. Streams are never compressed: gzip would
hold each SSE event back until its buffer filled. (Compressed request bodies
are read in validation.read_json.)
"""
import functools
import gzip

import falcon

from pyforge.server.errors import APIError

ALLOW_METHODS = ("GET", "POST", "OPTIONS")
ALLOW_HEADERS = "Authorization, X-Api-Key, Content-Type, X-Request-Id"   # when a preflight names none
EXPOSE_HEADERS = "X-Request-Id"
PREFLIGHT_MAX_AGE = 600     # seconds a browser may reuse a preflight's answer
GZIP_MIN_BYTES = 1024       # below this, gzip's header and the CPU cost outweigh the saving


class CorsMiddleware:
    def __init__(self, origins, credentials=False, methods=(), headers=()):
        self.any = "*" in origins
        self.origins = frozenset(origins)
        self.credentials = credentials
        self.methods = ", ".join(methods or ALLOW_METHODS)
        self.headers = ", ".join(headers)      # "": whatever headers the preflight names

    def allows(self, origin):
        return self.any or origin in self.origins

    def process_request(self, req, resp):
        origin = req.get_header("Origin")
        if req.method != "OPTIONS" or origin is None or not req.get_header("Access-Control-Request-Method"):
            return
        if not self.allows(origin):
            raise APIError(403, f"the origin {origin[:200]!r} is not allowed (see --allowed-origins)")
        resp.status = falcon.HTTP_200     # as Starlette (vLLM) and llama-server answer it
        resp.set_header("Access-Control-Allow-Methods", self.methods)
        # by default whatever headers the page wants to send: the API key and the rest are ours to check
        resp.set_header("Access-Control-Allow-Headers", self.headers
                        or req.get_header("Access-Control-Request-Headers") or ALLOW_HEADERS)
        resp.set_header("Access-Control-Max-Age", str(PREFLIGHT_MAX_AGE))
        resp.complete = True            # skip auth and routing: every path answers alike (falcon: 404 on some)

    def process_response(self, req, resp, resource, req_succeeded):
        echoes = not self.any or self.credentials
        if echoes:
            resp.append_header("Vary", "Origin")    # the answer depends on the Origin: caches must key on it
        origin = req.get_header("Origin")
        if origin is None or not self.allows(origin):
            return
        resp.set_header("Access-Control-Allow-Origin", origin if echoes else "*")
        if self.credentials:
            resp.set_header("Access-Control-Allow-Credentials", "true")
        resp.set_header("Access-Control-Expose-Headers", EXPOSE_HEADERS)


def canonical_header_names(app):
    """The WSGI app with response header names in their usual capitalisation
    (Content-Type, Access-Control-Allow-Origin, X-Request-Id): falcon sends them in
    lower case, which HTTP allows, but clients that look headers up in a plain,
    case-sensitive dict (llama.cpp's own server tests do) miss them."""
    def wrapped(environ, start_response):
        def start(status, headers, exc_info=None):
            return start_response(status, [(_canonical(name), value) for name, value in headers], exc_info)
        return app(environ, start)
    return wrapped


@functools.lru_cache(maxsize=256)
def _canonical(name):
    return "-".join(part[:1].upper() + part[1:] for part in name.split("-"))


class GzipMiddleware:
    def process_response(self, req, resp, resource, req_succeeded):
        if resp.stream is not None or (resp.content_type or "").startswith("text/event-stream") \
                or resp.get_header("Content-Encoding"):
            return
        body = resp.render_body()
        if body is None or len(body) < GZIP_MIN_BYTES:
            return
        resp.append_header("Vary", "Accept-Encoding")
        if accepts_gzip(req.get_header("Accept-Encoding")):
            resp.text = None                # render_body prefers text to data
            resp.data = gzip.compress(body, compresslevel=5, mtime=0)   # level 5: most of 9's saving, far cheaper
            resp.set_header("Content-Encoding", "gzip")


def accepts_gzip(header):
    """Whether an Accept-Encoding header takes gzip (a q of 0 refuses it, RFC 9110 12.5.3)."""
    for item in (header or "").lower().split(","):
        coding, *params = [part.strip() for part in item.split(";")]
        if coding == "gzip":
            q = next((p[2:] for p in params if p.startswith("q=")), "1")
            try:
                return float(q) > 0
            except ValueError:
                return False
    return False
