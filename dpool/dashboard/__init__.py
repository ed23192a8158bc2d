"""A live web dashboard for a running Executor, Pool or JobCluster.

::

    from dpool.dashboard import serve
    with dpool.Pool() as pool:
        board = serve(pool)                 # http://127.0.0.1:PORT/ (port 0: a free one)
        print(board.url)
        pool.map(f, items)
        board.shutdown()

(dispy's ``DispyHTTPServer(cluster)`` is :mod:`dpool.httpd`, over the same
server.)  The page (stdlib ``http.server``, one static HTML file, no
dependency) polls ``/api/status`` every ``poll_sec`` seconds: the nodes
with their CPUs, load and jobs, jobs by status, throughput over time and
the most recent errors.

Bound to 127.0.0.1 by default.  Bound to any other address it needs a token
(one is made if none is given): ``board.url`` carries it as ``?token=...``;
requests without it get 403.  Without a token (loopback), a request whose
Host header is not a loopback name or address gets 403 (DNS rebinding).

::

    client loop thread                 HTTP threads (ThreadingHTTPServer)
    ──────────────────                 ─────────────────────────────────
    Client._emit ─► Monitor.on_event   GET /            ─► page.html
      (counts, errors, recent jobs)    GET /api/status  ─► Monitor.snapshot()
                                         (runs in the loop thread: client.call)
"""
import collections
import hmac
import ipaddress
import json
import logging
import pathlib
import secrets
import socket
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from .monitor import Monitor

__all__ = ["DashboardServer", "Monitor", "serve"]

log = logging.getLogger("dpool.dashboard")

PAGE = pathlib.Path(__file__).with_name("page.html")


def serve(*sources, host="127.0.0.1", port=0, poll_sec=2.0, token=None, show_job_args=True):
    """Start a dashboard for ``sources`` (Executors, Pools or JobClusters)
    in a background thread; returns the :class:`DashboardServer`."""
    server = DashboardServer(host=host, port=port, poll_sec=poll_sec, token=token,
                             show_job_args=show_job_args)
    for source in sources:
        server.add(source)
    return server


def _is_loopback(host):
    if host in ("localhost",):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class _HTTPServer6(ThreadingHTTPServer):
    address_family = socket.AF_INET6


def _host_name(header):
    """The name in a Host header, without port or brackets ('' if malformed)."""
    try:
        return urllib.parse.urlsplit("//" + header).hostname or ""
    except ValueError:
        return ""


class DashboardServer:
    """The HTTP server; ``add(source)`` puts a pool or cluster on the page."""

    request_timeout = 30.0  # seconds a connection may sit idle (one thread each)

    def __init__(self, host="127.0.0.1", port=0, poll_sec=2.0, token=None, show_job_args=True,
                 ssl_context=None):
        if poll_sec <= 0:
            raise ValueError(f"poll_sec must be positive, not {poll_sec!r}")
        self.poll_sec = float(poll_sec)
        self.show_job_args = bool(show_job_args)
        self.token = token if token is not None else (
            None if _is_loopback(host) else secrets.token_urlsafe(18))
        self.monitors = collections.OrderedDict()  # name -> Monitor
        self._lock = threading.Lock()
        self._page = PAGE.read_bytes()
        server_class = _HTTPServer6 if ":" in host else ThreadingHTTPServer
        self._httpd = server_class((host, port), self._handler_class())
        self._httpd.daemon_threads = True
        if ssl_context is not None:
            self._httpd.socket = ssl_context.wrap_socket(self._httpd.socket, server_side=True)
        self.scheme = "https" if ssl_context is not None else "http"
        self.host, self.port = self._httpd.server_address[:2]
        self._thread = threading.Thread(target=self._httpd.serve_forever,
                                        name="dpool-dashboard", daemon=True)
        self._thread.start()
        log.info("dashboard at %s", self.url)

    @property
    def url(self):
        host = self.host if ":" not in self.host else f"[{self.host}]"
        query = f"?token={self.token}" if self.token else ""
        return f"{self.scheme}://{host}:{self.port}/{query}"

    # ------------------------------------------------------------ sources

    def add(self, source, name=None):
        """Show ``source`` (an Executor, Pool, JobCluster or core Client)."""
        return self.add_monitor(Monitor(source, name=name, show_job_args=self.show_job_args))

    def add_monitor(self, monitor):
        """Show anything with ``name``, ``source``, ``snapshot()`` and
        ``detach()`` (a :class:`Monitor`, a :class:`~.nodes.NodesMonitor`)."""
        with self._lock:
            if monitor.name in self.monitors:
                monitor.name = f"{monitor.name}-{len(self.monitors) + 1}"
            self.monitors[monitor.name] = monitor
        return monitor

    def remove(self, source):
        with self._lock:
            for name, monitor in list(self.monitors.items()):
                if monitor.source is source:
                    del self.monitors[name]
                    monitor.detach()

    def status(self):
        """What ``/api/status`` returns, as a dict."""
        with self._lock:
            monitors = list(self.monitors.values())
        return {"time": time.time(), "poll_sec": self.poll_sec,
                "sources": [monitor.snapshot() for monitor in monitors]}

    # ------------------------------------------------------------ stopping

    def shutdown(self, wait=False):
        """Stop serving; with ``wait=True`` first give browsers ``poll_sec``
        seconds to fetch the final state (as dispy's httpd does)."""
        if wait:
            time.sleep(self.poll_sec)
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(10)
        with self._lock:
            monitors, self.monitors = list(self.monitors.values()), collections.OrderedDict()
        for monitor in monitors:
            monitor.detach()

    close = shutdown

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.shutdown()

    # ------------------------------------------------------------ HTTP

    def _authorized(self, handler):
        if self.token is None:  # loopback: refuse a rebound foreign name (DNS rebinding)
            return _is_loopback(_host_name(handler.headers.get("Host", "")))
        query = urllib.parse.parse_qs(urllib.parse.urlsplit(handler.path).query)
        given = (query.get("token") or [""])[0]
        bearer = handler.headers.get("Authorization", "")
        if bearer.startswith("Bearer "):
            given = given or bearer[7:]
        return hmac.compare_digest(given.encode(), self.token.encode())

    def _handler_class(self):
        board = self

        class Handler(BaseHTTPRequestHandler):
            server_version = "dpool-dashboard"
            timeout = board.request_timeout

            def do_GET(self):
                if not board._authorized(self):
                    self._send(403, b"403: this dashboard needs its token (?token=...)\n",
                               "text/plain")
                    return
                path = urllib.parse.urlsplit(self.path).path
                if path in ("/", "/index.html"):
                    self._send(200, board._page, "text/html; charset=utf-8")
                elif path == "/api/status":
                    body = json.dumps(board.status(), default=str).encode()
                    self._send(200, body, "application/json")
                else:
                    self._send(404, b"404: not found\n", "text/plain")

            def _send(self, code, body, ctype):
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Cache-Control", "no-store")
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, fmt, *args):
                log.debug("%s: %s", self.client_address[0], fmt % args)

        return Handler
