"""The gunicorn worker: gthread, except that no thread waits on a slow client.

gunicorn's gthread worker hands a connection to a thread as soon as its first
byte arrives; the thread then reads the request line, headers and body with
blocking reads and no deadline. A client that sends half a request and goes
silent (or drips a byte every few seconds: slowloris) holds that thread for
as long as it likes, and workers x threads such clients deny service to all.

`GuardedThreadWorker` reads each request in the worker's event loop instead,
non-blocking, into a buffer: the request line and headers, and a body whose
Content-Length is within the body limit. Only a whole request reaches a
thread (its bytes given back to gunicorn's parser), so threads serve requests,
never wait for them. A connection that has not delivered its whole request
within `request_read_timeout` seconds of its first byte (or of being accepted,
or of going idle after a kept-alive reply's idle period) is closed. What is
left to read in a thread (a chunked body, a body after `Expect: 100-continue`)
and every write to the client run under kernel socket timeouts of the same
length (SO_RCVTIMEO / SO_SNDTIMEO), so a thread is never held longer than that
by a client that stops reading or writing.

TLS: gthread wraps a connection's socket in the thread, and a thread would do
the handshake. Here the socket is wrapped on accept and the handshake runs in
the loop, non-blocking, like the request read after it (through the TLS
layer, so the buffer holds plain HTTP). In a thread a TLS socket keeps a
Python timeout of the same length instead of blocking: the kernel timeouts do
not bound it (see TimeoutSSLSocket).
"""
import contextlib
import errno
import re
import resource
import selectors
import socket
import ssl
import struct
import time
from functools import partial

from gunicorn import http
from gunicorn.sock import ssl_context
from gunicorn.workers.gthread import TConn, ThreadWorker

MAX_HEAD_BYTES = 64 << 10    # a head this long without its end goes to gunicorn's parser (which refuses it)
_CONTENT_LENGTH = re.compile(rb"^content-length[ \t]*:[ \t]*(\d+)[ \t]*\r?$", re.I | re.M)
_TRANSFER_ENCODING = re.compile(rb"^transfer-encoding[ \t]*:[ \t]*(.*?)[ \t]*\r?$", re.I | re.M)
_EXPECT_CONTINUE = re.compile(rb"^expect[ \t]*:[ \t]*100-continue", re.I | re.M)
_HEAD_END = re.compile(rb"\r?\n\r?\n")


def request_complete(data, body_limit):
    """True once `data` holds a whole request as far as this worker waits for one:
    the head, and a body (Content-Length or chunked) of up to `body_limit` bytes.
    Whatever gunicorn's parser must judge (framing it refuses, 100-continue, a
    body past the limit, a head too long to be valid) counts as complete: a
    thread reads the rest, under socket timeouts, or answers the error."""
    end = _HEAD_END.search(data)
    if end is None:
        return len(data) > MAX_HEAD_BYTES
    head, body = data[:end.start()], memoryview(data)[end.end():]
    if _EXPECT_CONTINUE.search(head):
        return True
    codings, lengths = _TRANSFER_ENCODING.findall(head), _CONTENT_LENGTH.findall(head)
    if codings:
        if lengths or len(codings) > 1 or codings[0].lower() != b"chunked":
            return True          # framing the parser (or unsupported_coding) refuses
        return len(body) > body_limit or chunked_body_end(body) is not None
    if len(lengths) != 1:
        return True              # no body, or a conflicting Content-Length for the parser to refuse
    length = int(lengths[0])
    return length > body_limit or len(body) >= length      # past the limit: the app answers 413 unread


def unsupported_coding(data):
    """The Transfer-Encoding of a whole head when it is not plain `chunked`, else None.
    gunicorn would answer 501 with an HTML page; a request we cannot read is the
    client's error (400), answered in our error shape."""
    end = _HEAD_END.search(data)
    codings = _TRANSFER_ENCODING.findall(data[:end.start()]) if end else []
    if len(codings) == 1 and codings[0].lower() != b"chunked":
        return codings[0][:40].decode("latin-1")
    return None


def refusal(status, message):
    """A whole HTTP/1.1 error response with an OpenAI-shaped body; the connection closes."""
    import json
    from http import HTTPStatus

    from pyforge.server.errors import error_body
    body = json.dumps(error_body(status, message)).encode()
    return (f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode() + body


def chunked_body_end(body):
    """Where a whole chunked body (RFC 9112 7.1: chunks, the last chunk, trailer
    fields, CRLF) ends in `body`; None while it is incomplete. Malformed framing
    counts as complete (0): the parser answers it."""
    pos = 0
    while True:
        eol = bytes(body[pos:pos + 4096]).find(b"\r\n")
        if eol < 0:
            return None if len(body) - pos < 4096 else 0
        size_text = bytes(body[pos:pos + eol]).split(b";", 1)[0].strip()
        try:
            size = int(size_text, 16)
        except ValueError:
            return 0
        pos += eol + 2
        if size == 0:
            return _trailer_end(body, pos)
        pos += size + 2
        if pos > len(body):
            return None


def _trailer_end(body, pos):
    while True:
        eol = bytes(body[pos:pos + 8192]).find(b"\r\n")
        if eol < 0:
            return None if len(body) - pos < 8192 else 0
        pos += eol + 2
        if eol == 0:
            return pos


class GuardedThreadWorker(ThreadWorker):
    """gthread with each request read whole in the event loop (see the module doc)."""

    def init_process(self):
        config = self.app.pyforge_config      # set by the launcher or by the on_starting hook
        self.reading = {}       # TConn -> deadline, oldest first (one timeout for all)
        self.read_timeout = config.request_read_timeout
        self.body_limit = config.max_body_bytes
        self.tls = ssl_context(self.cfg) if self.cfg.is_ssl else None     # one context, not one per connection
        if self.tls is not None:
            self.tls.sslsocket_class = TimeoutSSLSocket
        _raise_open_file_limit()
        super().init_process()

    # -- connections in, requests read in the loop ------------------------------
    def accept(self, listener):
        try:
            client_sock, client_addr = listener.accept()
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.ECONNABORTED, errno.EWOULDBLOCK):
                raise
            return
        self.nr_conns += 1
        _set_io_timeouts(client_sock, self.read_timeout)
        conn = TConn(self.cfg, client_sock, client_addr, listener.getsockname())   # non-blocking
        if self.tls is not None:
            try:                        # the handshake happens in the first reads (_receive)
                conn.sock = self.tls.wrap_socket(client_sock, server_side=True, do_handshake_on_connect=False,
                                                 suppress_ragged_eofs=self.cfg.suppress_ragged_eofs)
            except OSError:             # the client has gone already
                self.nr_conns -= 1
                client_sock.close()
                return
            conn.sock.io_timeout = self.read_timeout
        conn.pf_data = bytearray()
        self._read_request(conn)

    def on_client_socket_readable(self, conn, client):
        """A kept-alive connection has bytes: read its next request in the loop too."""
        self.poller.unregister(client)
        self.keepalived_conns.remove(conn)
        conn.pf_data = bytearray()
        self._read_request(conn)

    def _read_request(self, conn):
        self.reading[conn] = time.monotonic() + self.read_timeout
        self.poller.register(conn.sock, selectors.EVENT_READ, partial(self._on_request_bytes, conn))

    def _on_request_bytes(self, conn, sock):
        try:
            data = _receive(sock)
        except (BlockingIOError, InterruptedError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
            return                      # TLS: the handshake or a record is not whole yet (a write the
                                        # handshake could not finish waits for the client's next bytes)
        except ssl.SSLError as e:       # a failed handshake
            if e.reason == "HTTP_REQUEST":     # plain http to the https port: say so, in plain http
                _send_raw(sock, refusal(400, "this port serves https; the request came as plain http"))
            data = b""
        except OSError:
            data = b""
        if not data:                    # the client left before its request was whole
            self._drop(conn)
            return
        conn.pf_data += data
        if not request_complete(conn.pf_data, self.body_limit):
            return
        coding = unsupported_coding(conn.pf_data)
        if coding is not None:
            try:
                sock.send(refusal(400, f"unsupported Transfer-Encoding {coding!r} (only chunked is)"))
            except OSError:
                pass
            self._drop(conn)
            return
        self.poller.unregister(sock)
        del self.reading[conn]
        conn.data_ready = True          # gthread's own wait for a first byte is over
        self.enqueue_req(conn)

    def handle(self, conn):
        data = getattr(conn, "pf_data", None)
        if data:
            conn.pf_data = None
            conn.sock.setblocking(True)
            if conn.parser is None:     # as conn.init(), which would wrap a TLS socket a second time
                conn.initialized = True
                conn.parser = http.get_parser(self.cfg, conn.sock, conn.client)
            conn.parser.unreader.unread(bytes(data))    # the parser reads what we read first
        return super().handle(conn)

    # -- timeouts ---------------------------------------------------------------
    def murder_pending(self):
        super().murder_pending()
        now = time.monotonic()
        for conn, deadline in list(self.reading.items()):
            if deadline > now and self.alive:
                break                   # insertion order is deadline order
            self._drop(conn)

    def _drop(self, conn):
        self.reading.pop(conn, None)
        try:
            self.poller.unregister(conn.sock)
        except (KeyError, ValueError, OSError):
            pass
        self.nr_conns -= 1
        conn.close()


class TimeoutSSLSocket(ssl.SSLSocket):
    """A TLS socket that is never plain blocking: gthread's setblocking(True) sets a
    Python timeout of `io_timeout` seconds. A kernel timeout (_set_io_timeouts) does
    not bound a blocking TLS socket: OpenSSL takes its EAGAIN for "want more data"
    and Python's blocking read or write tries again, forever."""
    io_timeout = None

    def setblocking(self, flag):
        self.settimeout(self.io_timeout if flag else 0.0)


def _receive(sock, size=256 << 10):
    """What a non-blocking socket has now (b"": the client closed). TLS hands out one
    record (16 KiB at most) a read and may hold decrypted bytes, which the poller
    cannot see: read on until it wants more from the network."""
    data = sock.recv(size)
    while data and isinstance(sock, ssl.SSLSocket) and (len(data) < size or sock.pending()):
        try:
            more = sock.recv(size)
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
            break
        if not more:
            break                       # the close shows again on the next call
        data += more
    return data


def _send_raw(sock, data):
    """Write `data` past a TLS socket's encryption (best effort, non-blocking), after
    reading what the client sent: a close with unread bytes resets the connection,
    and the client could lose the answer."""
    with contextlib.suppress(OSError):
        socket.socket.recv(sock, 64 << 10)
    with contextlib.suppress(OSError):
        socket.socket.send(sock, data)


def _set_io_timeouts(sock, seconds):
    """Kernel send/receive timeouts: they bound the blocking reads and writes a
    thread does on this socket (Python's own timeout is reset by gthread)."""
    whole = int(seconds)
    tv = struct.pack("ll", whole, int((seconds - whole) * 1e6))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, tv)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, tv)


def _raise_open_file_limit():
    """Every held connection is a descriptor: take the hard limit, not a soft 1024."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 16)
    if soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):
            pass
