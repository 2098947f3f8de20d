"""max_concurrent_requests: POST requests in flight in the whole server, across
every gunicorn worker process; one more is answered 503 + Retry-After.

The counts live in shared memory made before gunicorn forks its workers (the
launcher, or gunicorn's on_starting hook): one count per worker process, in a
slot its pid owns, summed under one lock. A worker that dies holding requests
gives them back when the arbiter sees it exit (`release_worker`), so a crashed
worker never shrinks the server's capacity for good.

    limit = ConcurrencyLimit(n)       # before the fork
    limit.attach()                    # in each worker, after it
    AdmissionMiddleware(limit)        # the Falcon side: admit or 503 (after auth)
    admitted_app(wsgi_app, limit)     # the WSGI side: give the place back when the
                                      # response is really over (a stream's last byte)
"""
import multiprocessing
import os

from pyforge.server.errors import APIError

RETRY_AFTER_S = 1
_ADMITTED = "pyforge.admitted"          # WSGI environ key: this request holds a place


class ConcurrencyLimit:
    def __init__(self, limit, n_slots=256):
        self.limit = limit
        self._lock = multiprocessing.Lock()
        self._pids = multiprocessing.RawArray("i", n_slots)
        self._counts = multiprocessing.RawArray("i", n_slots)
        self._slot = None

    def attach(self):
        """Claim this process's slot (a free one, or one whose owner is gone)."""
        pid = os.getpid()
        with self._lock:
            for i, owner in enumerate(self._pids):
                if owner in (0, pid) or not _alive(owner):
                    self._pids[i], self._counts[i], self._slot = pid, 0, i
                    return
        raise RuntimeError(f"more than {len(self._pids)} worker processes share one concurrency limit")

    def try_enter(self):
        with self._lock:
            if sum(self._counts) >= self.limit:
                return False
            self._counts[self._slot] += 1
            return True

    def leave(self):
        with self._lock:
            self._counts[self._slot] -= 1

    def in_flight(self):
        with self._lock:
            return sum(self._counts)

    def release_worker(self, pid):
        """The arbiter saw worker `pid` exit: its requests are no longer in flight."""
        with self._lock:
            for i, owner in enumerate(self._pids):
                if owner == pid:
                    self._pids[i], self._counts[i] = 0, 0


class AdmissionMiddleware:
    """Admits a routed POST (after auth and CORS, so refusals carry their headers)."""

    def __init__(self, limit):
        self.limit = limit

    def process_resource(self, req, resp, resource, params):
        if req.method != "POST" or resource is None or req.env.get(_ADMITTED):
            return
        if not self.limit.try_enter():
            raise APIError(503, f"the server is at its limit of {self.limit.limit} concurrent requests; "
                                "retry later", headers={"Retry-After": str(RETRY_AFTER_S)})
        req.env[_ADMITTED] = True


def admitted_app(app, limit):
    """`app` with the place of an admitted request given back once its response is
    closed (for a stream: after its last byte, or when its client left)."""
    def wsgi(environ, start_response):
        try:
            body = app(environ, start_response)
        except BaseException:
            _leave(environ, limit)
            raise
        return _Closing(body, lambda: _leave(environ, limit)) if environ.get(_ADMITTED) else body
    return wsgi


def _leave(environ, limit):
    if environ.pop(_ADMITTED, False):
        limit.leave()


class _Closing:
    """A WSGI body whose close() also runs on_close (PEP 3333: the server calls close once)."""

    def __init__(self, body, on_close):
        self.body, self.on_close = body, on_close

    def __iter__(self):
        return iter(self.body)

    def close(self):
        try:
            if hasattr(self.body, "close"):
                self.body.close()
        finally:
            self.on_close()


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
