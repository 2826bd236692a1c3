"""A controllable HTTP server on 127.0.0.1: serves a binary cache plus scripted routes."""

from __future__ import annotations

import hashlib
import itertools
import ssl
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

CHUNK = 64 * 1024


@dataclass(frozen=True)
class Reply:
    """What a route answers.

    `hang`: accept the request and never answer (until the server stops).
    `stream_bytes`: send that many filler bytes as the body (no Content-Length
    unless given in `headers`). `endless`: send filler until the client goes away.
    `etag`: send it and answer 304 to a matching If-None-Match.
    `delay`: seconds to wait before answering.
    `drip`: seconds between single bytes of the body: `body`, then newlines without
    end (no Content-Length), until the server stops or the client goes away. Every
    read gets a byte in time, so only a deadline over the whole request ends it.
    `drip_headers`: the same for the head: the status line, then one byte of a header
    that never ends, every `drip_headers` seconds.
    `close`: read the request, then close the connection without answering.
    """

    status: int = 200
    body: bytes = b""
    headers: Sequence[tuple[str, str]] = ()
    delay: float = 0.0
    hang: bool = False
    stream_bytes: int | None = None
    endless: bool = False
    etag: str | None = None
    drip: float | None = None
    drip_headers: float | None = None
    close: bool = False


@dataclass(frozen=True)
class RecordedRequest:
    method: str
    path: str
    headers: dict[str, str]  # lower-cased names
    host: str  # the Host header, to tell 127.0.0.1 from localhost
    client_port: int = 0  # the client's end of the connection: one port, one connection
    query: str = ""  # after "?"; routes are chosen by path alone


ReplySource = Reply | Sequence[Reply] | Callable[[RecordedRequest], Reply]


@dataclass
class _Route:
    source: ReplySource
    served: int = 0

    def next_reply(self, request: RecordedRequest) -> Reply:
        source = self.source
        self.served += 1
        if isinstance(source, Reply):
            return source
        if callable(source):
            return source(request)
        # A sequence: successive replies, the last one repeats.
        return source[min(self.served - 1, len(source) - 1)]


def etag_for(body: bytes) -> str:
    return '"' + hashlib.sha256(body).hexdigest()[:20] + '"'


@dataclass
class TestServer:
    """Run with `start()`; `stop()` also releases hanging handlers."""

    __test__ = False  # not a pytest test class, despite the name

    cache_dir: Path
    host: str = "127.0.0.1"
    routes: dict[str, _Route] = field(default_factory=dict)
    recorded: list[RecordedRequest] = field(default_factory=list)
    stopping: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    tls: ssl.SSLContext | None = None  # serve https with this server-side context
    # HTTP/1.1 with connections kept alive, for connections accepted from now on; only
    # for plain replies (streaming and hanging ones rely on HTTP/1.0's one request).
    keep_alive: bool = False
    _httpd: ThreadingHTTPServer | None = None
    _thread: threading.Thread | None = None

    def start(self) -> None:
        handler = _make_handler(self)
        httpd = ThreadingHTTPServer((self.host, 0), handler)
        httpd.daemon_threads = True
        if self.tls is not None:
            httpd.socket = self.tls.wrap_socket(httpd.socket, server_side=True)
        self._httpd = httpd
        self._thread = threading.Thread(
            target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        self.stopping.set()
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()

    @property
    def port(self) -> int:
        assert self._httpd is not None, "server not started"
        return int(self._httpd.server_address[1])

    @property
    def base_url(self) -> str:
        return f"{self.scheme}://{self.host}:{self.port}"

    @property
    def scheme(self) -> str:
        return "https" if self.tls is not None else "http"

    def url(self, path: str = "/upstream", host: str | None = None) -> str:
        """URL of `path`; `host="localhost"` gives a different host name, same server."""
        return f"{self.scheme}://{host or self.host}:{self.port}{path}"

    def route(self, path: str, reply: ReplySource) -> None:
        """Answer `path` (without query) with `reply`; replaces an earlier route."""
        with self._lock:
            self.routes[path] = _Route(reply)

    def publish_body(self, body: bytes, path: str = "/upstream") -> None:
        """Serve `body` at `path` with an ETag, answering 304 when it matches."""
        self.route(path, Reply(body=body, etag=etag_for(body)))

    def requests(self, path: str | None = None) -> list[RecordedRequest]:
        with self._lock:
            return [r for r in self.recorded if path is None or r.path == path]

    def count(self, path: str | None = None) -> int:
        return len(self.requests(path))

    def reset_requests(self) -> None:
        with self._lock:
            self.recorded.clear()

    def _record(self, request: RecordedRequest) -> _Route | None:
        with self._lock:
            self.recorded.append(request)
            return self.routes.get(request.path)


def _make_handler(server: TestServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        # HTTP/1.0: one request per connection, which keeps streaming and
        # hanging replies simple.
        protocol_version = "HTTP/1.0"

        def handle(self) -> None:
            if server.keep_alive:
                self.protocol_version = "HTTP/1.1"
            super().handle()

        def log_message(self, format: str, *args: object) -> None:
            pass  # keep pytest output clean; requests are recorded instead

        def do_GET(self) -> None:
            self._handle(send_body=True)

        def do_HEAD(self) -> None:
            self._handle(send_body=False)

        def _handle(self, send_body: bool) -> None:
            path, _, query = self.path.partition("?")
            headers = {k.lower(): v for k, v in self.headers.items()}
            request = RecordedRequest(
                method=self.command,
                path=path,
                headers=headers,
                host=headers.get("host", ""),
                client_port=int(self.client_address[1]),
                query=query,
            )
            route = server._record(request)
            try:
                if route is None:
                    self._serve_cache_file(path, send_body)
                else:
                    self._serve_reply(route.next_reply(request), request, send_body)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client gave up, as some tests intend

        def _serve_cache_file(self, path: str, send_body: bool) -> None:
            relative = path.lstrip("/")
            file = server.cache_dir / relative
            if ".." in relative.split("/") or not relative or not file.is_file():
                self._send(Reply(status=404, body=b"404 not found\n"), send_body)
                return
            self._send(Reply(body=file.read_bytes()), send_body)

        def _serve_reply(self, reply: Reply, request: RecordedRequest, send_body: bool) -> None:
            if reply.hang:
                server.stopping.wait()
                return
            if reply.close:
                return  # nothing written; the server closes the socket after the handler
            if reply.delay and server.stopping.wait(reply.delay):
                return
            if reply.etag is not None and request.headers.get("if-none-match") == reply.etag:
                self.send_response(304)
                self.send_header("ETag", reply.etag)
                self.end_headers()
                return
            if reply.drip_headers is not None:
                head = f"HTTP/1.0 {reply.status} {self.responses[reply.status][0]}\r\nX-Drip: "
                self.wfile.write(head.encode("latin-1"))
                self._drip(itertools.repeat(ord("a")), reply.drip_headers)
                return
            self._send(reply, send_body)

        def _drip(self, data: Iterable[int], interval: float) -> None:
            """Write `data` one byte per `interval`; a closed client ends it with an
            OSError (BrokenPipeError, ConnectionResetError) that `_handle` expects."""
            for byte in data:
                self.wfile.write(bytes([byte]))
                if server.stopping.wait(interval):
                    return

        def _send(self, reply: Reply, send_body: bool) -> None:
            self.send_response(reply.status)
            names = {name.lower() for name, _ in reply.headers}
            for name, value in reply.headers:
                self.send_header(name, value)
            if reply.etag is not None and "etag" not in names:
                self.send_header("ETag", reply.etag)
            streaming = reply.endless or reply.stream_bytes is not None or reply.drip is not None
            if not streaming and "content-length" not in names:
                self.send_header("Content-Length", str(len(reply.body)))
            self.end_headers()
            if not send_body:
                return
            if not streaming:
                self.wfile.write(reply.body)
                return
            if reply.drip is not None:
                self._drip(itertools.chain(reply.body, itertools.repeat(ord("\n"))), reply.drip)
                return
            remaining = reply.stream_bytes
            filler = b"x" * CHUNK
            while not server.stopping.is_set() and (remaining is None or remaining > 0):
                piece = filler if remaining is None else filler[:remaining]
                self.wfile.write(piece)
                if remaining is not None:
                    remaining -= len(piece)
                if reply.endless:
                    time.sleep(0.001)  # keep a forever-stream from pinning a core

    return Handler
