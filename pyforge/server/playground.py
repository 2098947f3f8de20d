"""The web playground: GET / serves one page to chat with the served models.

Plain HTML, CSS and JavaScript shipped in server/static/ (no build step, nothing
fetched from another host). The page talks to the API like any client: it lists
the models with GET /v1/models and streams answers from POST
/v1/chat/completions (`stream_options.include_usage`: tokens/s and cached prompt
tokens after each answer), sending the API key the user typed (kept in the
browser's localStorage) as `Authorization: Bearer`.

The page and its files are served without an API key, by exact path
(app.AuthMiddleware: OPEN_EXACT_PATHS): they hold nothing secret, and every
request the page makes is checked as usual. The Content-Security-Policy lets the
page load only this server's own script, style and icon and talk only to this
server: no inline script or style, no other origin, no framing.
"""
from importlib import resources

FILES = {       # path -> (file in server/static/, content type)
    "/": ("playground.html", "text/html; charset=utf-8"),
    "/static/playground.js": ("playground.js", "text/javascript; charset=utf-8"),
    "/static/playground.css": ("playground.css", "text/css; charset=utf-8"),
    "/static/favicon.svg": ("favicon.svg", "image/svg+xml"),
}
PAGE_PATHS = tuple(FILES)       # served without an API key (app.OPEN_EXACT_PATHS)
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
       "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


class StaticFile:
    """One file of the package, read once when the app is built."""

    def __init__(self, name, content_type):
        self.data = (resources.files(__package__) / "static" / name).read_bytes()
        self.content_type = content_type

    def on_get(self, req, resp):
        resp.data = self.data
        resp.content_type = self.content_type
        resp.set_header("Content-Security-Policy", CSP)
        resp.set_header("X-Content-Type-Options", "nosniff")
        resp.set_header("Referrer-Policy", "no-referrer")
        resp.set_header("Cache-Control", "no-cache")     # a new version shows on the next load


def add_routes(app, models):
    """The page's routes (`models` is not needed: the page asks /v1/models, as any client does)."""
    for path, (name, content_type) in FILES.items():
        app.add_route(path, StaticFile(name, content_type))
