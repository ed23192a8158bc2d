"""TCP (optionally TLS) connections and servers, and wrapping trusted sockets.

Connecting::

    connect(host, port) -- getaddrinfo, non-blocking connect, [TLS handshake]
        -> Connection(pre-auth) -- auth.client_handshake (auth + hello)
        -> Connection with .hello = the server's hello

Serving (one listening socket, accepted from a loop reader callback)::

    accept -> past MAX_HANDSHAKES_PER_HOST connections still authenticating
              from that address (an IPv6 /64 counting as one) or MAX_HANDSHAKES
              in all: closed at once
           -> task: [TLS handshake] + auth.server_handshake under auth_timeout
        failure: close that connection only; the server keeps serving; logged
                 rate-limited (see rejections.py: the first one of a period
                 with the peer address and reason, then one summary a period)
        success: on_connection(conn) (plain function or coroutine function)

A client whose connection is closed before the handshake began (the server
was at one of its caps) retries with backoff until its connect timeout; one
closed while the client stretched the secret for the server's salt (past
the server's pre-auth deadline) connects again at once, with the key cached.
"""
from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import functools
import inspect
import ipaddress
import logging
import random
import socket
import ssl as _ssl
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from dpool.errors import (AuthenticationError, ConnectionClosed, HandshakeRefused,
                          ProtocolError, VersionMismatch)

from .auth import (MAGIC, PREAUTH_MAX, PROCESS_SALT, Hello, StretchedTooLate, check_secret,
                   client_handshake, encode_hello, import_crypto, own_hello,
                   server_handshake, stretch, tls_required_notice)
from . import early as _early
from .budget import ReceiveBudget
from .connection import Connection
from .frames import Limits
from .rejections import RejectionLog
from .streams import SocketStream, TransportAdapter, accept_tls, set_tcp_options

log = logging.getLogger("dpool.transport")

#: Connections allowed to be authenticating at once; more are closed at once.
MAX_HANDSHAKES = 256
#: ... of which from one source address (so one address can't take them all).
MAX_HANDSHAKES_PER_HOST = 32
#: Seconds a connection may take to authenticate (server side).
AUTH_TIMEOUT = 3.0
#: A client closed before the handshake began retries after this many
#: seconds, doubling up to RETRY_MAX, until its connect timeout.
RETRY_FIRST = 0.02
RETRY_MAX = 0.5

__all__ = ["connect", "start_server", "Server", "wrap_socket",
           "server_ssl_context", "client_ssl_context"]

#: Called with each authenticated connection; may return an awaitable to run.
OnConnection = Callable[[Connection], Awaitable[object] | None]


def format_peer(addr: Any) -> str:
    """``host:port`` (``[host]:port`` for IPv6) for a socket address."""
    if isinstance(addr, tuple) and len(addr) >= 2:
        host, port = addr[0], addr[1]
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return f"unix:{addr}" if addr else "socketpair"


def source_key(addr: Any) -> str:
    """Whom a connection from ``addr`` counts against: its IPv4 address (also
    when IPv4-mapped), or its IPv6 /64, as a single host is given a whole /64."""
    host = addr[0] if isinstance(addr, tuple) else ""
    try:
        ip = ipaddress.ip_address(host.split("%")[0])
    except ValueError:
        return host
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return host


async def _open(loop: asyncio.AbstractEventLoop, sock: socket.socket, limits: Limits | None,
                ssl: _ssl.SSLContext | None, *, server_side: bool,
                server_hostname: str | None = None,
                budget: ReceiveBudget | None = None) -> Connection:
    """A pre-auth Connection on the connected socket ``sock``."""
    set_tcp_options(sock)
    conn = Connection(loop, format_peer(sock.getpeername()), limits, preauth=True,
                      budget=budget)
    if ssl is None:
        SocketStream(loop, sock, conn)
        return conn
    adapter = TransportAdapter(conn)
    if server_side:
        await accept_tls(loop, sock, adapter, ssl)
    else:
        await loop.create_connection(lambda: adapter, sock=sock, ssl=ssl,
                                     server_hostname=server_hostname)
    return conn


def _discard(conn: Connection | None, sock: socket.socket) -> None:
    """Abort ``conn`` if its stream is up, else just close ``sock``."""
    stream = conn._stream if conn is not None else None
    if conn is not None and stream is not None and stream.active:
        conn.abort()
    else:
        sock.close()


async def _speaks_plain_dpool(loop: asyncio.AbstractEventLoop,
                             sock: socket.socket) -> bool:
    """Wait for the first byte ``sock`` sends: True if it starts a plaintext
    dpool handshake rather than TLS (a TLS client speaks first too)."""
    sock.setblocking(False)
    readable: asyncio.Future[None] = loop.create_future()
    def ready() -> None:
        if not readable.done():
            readable.set_result(None)
    loop.add_reader(sock.fileno(), ready)
    try:
        await readable
    finally:
        loop.remove_reader(sock.fileno())
    try:
        first = sock.recv(1, socket.MSG_PEEK)
    except OSError:
        return False            # let the TLS handshake report it
    return first == MAGIC[:1]


def _numeric(host: str, port: int) -> list | None:
    """getaddrinfo's answer for a numeric address, at once (no resolver
    thread; as bytes, without the idna codec's import: a fresh client's first
    connection, issue 13); None for a name."""
    try:
        return socket.getaddrinfo(host.encode("ascii") if isinstance(host, str) else host,
                                  port, type=socket.SOCK_STREAM, flags=socket.AI_NUMERICHOST)
    except (UnicodeError, OSError, TypeError):
        return None


async def _connect_socket(loop: asyncio.AbstractEventLoop, host: str,
                          port: int) -> socket.socket:
    infos = _numeric(host, port) or await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    errors: list[OSError] = []
    for family, type_, proto, _, addr in infos:
        sock = socket.socket(family, type_, proto)
        try:
            sock.setblocking(False)
            await loop.sock_connect(sock, addr)
            return sock
        except BaseException as exc:
            sock.close()
            if not isinstance(exc, OSError):
                raise
            errors.append(exc)
    raise errors[0]


async def _ended_or_aborted(conns: list[Connection], stall: float) -> None:
    """Wait for ``conns`` (closing) to end; abort each whose unsent output
    did not shrink in the last ``stall`` seconds."""
    ending = {asyncio.ensure_future(conn.wait_closed()): conn for conn in conns}
    unsent = {conn: conn.unsent for conn in conns}
    while ending:
        done, _ = await asyncio.wait(ending, timeout=stall)
        for task in done:
            del ending[task]
        for conn in ending.values():
            left = conn.unsent
            if left >= unsent[conn]:
                conn.abort()
            unsent[conn] = left


async def connect(host: str, port: int, *, secret: bytes, hello: Hello,
                  ssl: _ssl.SSLContext | None = None,
                  server_hostname: str | None = None, timeout: float = 10.0,
                  limits: Limits | None = None) -> Connection:
    """Connect, authenticate and exchange hellos; ``conn.hello`` is the server's.

    A connection the server closes before the handshake began is retried
    with backoff (RETRY_FIRST doubling to RETRY_MAX) within ``timeout``.
    Raises the ``OSError`` of the connect (e.g. ``ConnectionRefusedError``),
    ``HandshakeRefused`` if the server kept closing it that early,
    ``AuthenticationError``, ``ProtocolError``/``VersionMismatch`` or
    ``TimeoutError`` when all that takes longer than ``timeout`` seconds.
    """
    secret = check_secret(secret)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    delay, refusals, restretched = RETRY_FIRST, 0, False
    while True:
        try:
            return await _connect_once(loop, host, port, secret, hello, ssl,
                                       server_hostname, deadline, timeout, limits)
        except StretchedTooLate as exc:
            if restretched:
                raise AuthenticationError(str(exc)) from exc
            restretched = True     # the key is cached now: again, at once
            log.debug("%s:%s: %s; connecting again", host, port, exc)
        except HandshakeRefused:
            refusals += 1
            if deadline - loop.time() <= delay:
                raise HandshakeRefused(
                    f"{host}:{port} closed the connection before the handshake began "
                    f"({refusals} times in {timeout} s): the node refuses new connections "
                    f"while too many are still authenticating (from this address or in "
                    f"all), as under a flood of connections") from None
            await asyncio.sleep(delay * random.uniform(0.5, 1.0))
            delay = min(2 * delay, RETRY_MAX)


async def _connect_once(loop: asyncio.AbstractEventLoop, host: str, port: int, secret: bytes,
                        hello: Hello, ssl: _ssl.SSLContext | None,
                        server_hostname: str | None, deadline: float, timeout: float,
                        limits: Limits | None) -> Connection:
    sock: socket.socket | None = None
    conn: Connection | None = None
    begun: tuple[bytes, bytes] | None = None
    try:
        async with asyncio.timeout_at(deadline):
            if ssl is None and (early := _early.find(host, port, secret)) is not None:
                await asyncio.wrap_future(early.ready)
                if (got := early.take()) is not None:
                    sock, begun = got[0], got[1:]
            if sock is None:
                sock = await _connect_socket(loop, host, port)
            conn = await _open(loop, sock, limits, ssl, server_side=False,
                               server_hostname=server_hostname or host)
            await client_handshake(conn, secret, hello, tls=ssl is not None, begun=begun)
    except TimeoutError:
        if sock is not None:
            _discard(conn, sock)
        raise TimeoutError(f"connecting to {host}:{port} took longer than "
                           f"{timeout} s") from None
    except BaseException as exc:
        if sock is not None:
            _discard(conn, sock)
        if isinstance(exc, AuthenticationError) and conn is not None and not begun \
                and conn.bytes_received == 0 and isinstance(exc.__cause__, ConnectionClosed) \
                and not isinstance(exc.__cause__.__cause__, _ssl.SSLError):  # (a TLS alert)
            raise HandshakeRefused(f"{host}:{port} closed the connection before the "
                                   f"handshake began") from None
        raise
    assert conn is not None
    conn._log_errors = True
    return conn


class Server:
    """A listening socket accepting authenticated connections.

    ``close(abort_connections=False)`` stops accepting and drops connections
    still in their handshake; with ``abort_connections=True`` it also aborts
    the connections handed to ``on_connection`` and cancels the coroutines
    ``on_connection`` returned.  ``async with server:`` closes it with
    ``abort_connections=True`` and waits.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, lsock: socket.socket,
                 on_connection: OnConnection, secret: bytes, hello: Hello,
                 ssl: _ssl.SSLContext | None, limits: Limits | None,
                 auth_timeout: float, receive_budget: ReceiveBudget | None = None) -> None:
        self._loop = loop
        self._lsock = lsock
        self._on_connection = on_connection
        self._secret = secret
        self._hello = hello
        self._ssl = ssl
        self._limits = limits
        self._auth_timeout = auth_timeout
        self.receive_budget = receive_budget
        self.address = lsock.getsockname()[:2]
        self.port = self.address[1]
        self._handshakes: set[asyncio.Task[None]] = set()  # tasks still authenticating
        self._pending: collections.Counter[str] = collections.Counter()  # address -> of those
        self.rejections = RejectionLog(log, format_peer(self.address))
        self._handlers: set[asyncio.Task[None]] = set()  # running on_connection coroutines
        self._conns: set[Connection] = set()  # every connection not yet ended
        self._live: set[Connection] = set()   # connections handed to on_connection
        self._closed = False
        self._aborted = False
        loop.add_reader(lsock.fileno(), self._accept_ready)

    def __repr__(self) -> str:
        return f"<Server {format_peer(self.address)}{' closed' if self._closed else ''}>"

    @property
    def connections(self) -> set[Connection]:
        """The live connections handed to ``on_connection``."""
        return set(self._live)

    def close(self, abort_connections: bool = False) -> None:
        if not self._closed:
            self._closed = True
            self._loop.remove_reader(self._lsock.fileno())
            self._lsock.close()
            self.rejections.close()
        for task in self._handshakes:
            task.cancel()
        for conn in list(self._conns - self._live):
            conn.abort()
        if abort_connections:
            self._aborted = True
            for task in self._handlers:
                task.cancel()
            for conn in list(self._live):
                conn.abort()

    async def wait_closed(self, stall: float | None = None) -> None:
        """Wait for the handshakes cancelled by :meth:`close` and for the
        connections closed by then to end.  With ``stall``, one whose
        output made no progress for ``stall`` seconds (a peer that reads
        nothing: it would hold its close up to ``CLOSE_TIMEOUT``) is
        aborted instead: what a peer that reads is owed still goes out."""
        tasks = set(self._handshakes)
        if self._aborted:
            tasks |= self._handlers
        await asyncio.gather(*tasks, return_exceptions=True)
        closing = [c for c in list(self._conns) if c.closed]
        if stall is None:
            await asyncio.gather(*[c.wait_closed() for c in closing])
        else:
            await _ended_or_aborted(closing, stall)

    async def __aenter__(self) -> Server:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.close(abort_connections=True)
        await self.wait_closed()

    def _accept_ready(self) -> None:
        for _ in range(64):
            try:
                sock, addr = self._lsock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.warning("accept on %s failed: %s", format_peer(self.address), exc)
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    # Out of resources: stop accepting for a while.
                    fd = self._lsock.fileno()
                    self._loop.remove_reader(fd)
                    self._loop.call_later(1.0, self._resume_accepting)
                return
            host = source_key(addr)
            if len(self._handshakes) >= MAX_HANDSHAKES \
                    or self._pending[host] >= MAX_HANDSHAKES_PER_HOST:
                self._refuse(sock, addr, host)
                continue
            self._pending[host] += 1
            task = self._spawn(self._handshakes, self._handshake(sock, addr))
            task.add_done_callback(functools.partial(self._handshake_ended, host))

    def _refuse(self, sock: socket.socket, addr: Any, host: str) -> None:
        # Peers that connect and stay silent must not exhaust our fds and
        # lock out real clients: past a cap, new connections are closed at
        # once (the client sees HandshakeRefused and retries with backoff).
        sock.close()
        if len(self._handshakes) >= MAX_HANDSHAKES:
            why = f"{MAX_HANDSHAKES} connections still authenticating"
        else:
            why = f"{MAX_HANDSHAKES_PER_HOST} connections from {host} still authenticating"
        self.rejections.reject(host, "refused at the cap", "refusing connection from %s: %s",
                               format_peer(addr), why)

    def _handshake_ended(self, host: str, _task: asyncio.Task[None]) -> None:
        self._pending[host] -= 1
        if self._pending[host] <= 0:
            del self._pending[host]

    def _resume_accepting(self) -> None:
        if not self._closed:
            self._loop.add_reader(self._lsock.fileno(), self._accept_ready)

    def _spawn(self, tasks: set[asyncio.Task[None]],
               coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = self._loop.create_task(coro)
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        return task

    def _track(self, conn: Connection) -> None:
        self._conns.add(conn)

        def forget(_: object) -> None:
            self._conns.discard(conn)
            self._live.discard(conn)
        conn._lost_future.add_done_callback(forget)

    async def _handshake(self, sock: socket.socket, addr: Any) -> None:
        peer = format_peer(addr)
        host = source_key(addr) or peer
        reject = self.rejections.reject
        conn = None
        try:
            async with asyncio.timeout(self._auth_timeout):
                if self._ssl is not None and await _speaks_plain_dpool(self._loop, sock):
                    with contextlib.suppress(OSError):
                        sock.recv(PREAUTH_MAX)   # (unread bytes would turn close into a reset)
                        sock.send(tls_required_notice())
                    raise ProtocolError("a plaintext dpool client; this node requires TLS")
                conn = await _open(self._loop, sock, self._limits, self._ssl,
                                   server_side=True, budget=self.receive_budget)
                self._track(conn)
                await server_handshake(conn, self._secret, self._hello,
                                       protect=self._ssl is None)
        except asyncio.CancelledError:
            _discard(conn, sock)
            raise
        except VersionMismatch as exc:
            reject(host, "version mismatch", "closing connection from %s: %s", peer, exc)
            assert conn is not None
            conn.close()    # graceful: our hello tells the client our version
            return
        except TimeoutError:
            reject(host, "no authentication in time",
                   "closing connection from %s: no authentication within %s s",
                   peer, self._auth_timeout)
            _discard(conn, sock)
            return
        except Exception as exc:
            reject(host, type(exc).__name__, "rejected connection from %s: %s: %s", peer,
                   type(exc).__name__, exc)
            if conn is None or not conn.closed:    # (a FAIL reply is being flushed)
                _discard(conn, sock)
            return
        assert conn is not None
        conn._log_errors = True
        self._live.add(conn)
        try:
            result = self._on_connection(conn)
        except Exception:
            log.exception("on_connection failed for %s", peer)
            conn.abort()
            return
        if inspect.isawaitable(result):
            self._spawn(self._handlers, self._run_handler(conn, result))

    async def _run_handler(self, conn: Connection,
                           awaitable: Awaitable[object]) -> None:
        try:
            await awaitable
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("on_connection failed for %s", conn.peer)
            conn.abort()


async def start_server(on_connection: OnConnection, host: str, port: int, *, secret: bytes,
                       hello: Hello, ssl: _ssl.SSLContext | None = None,
                       limits: Limits | None = None,
                       auth_timeout: float = AUTH_TIMEOUT, backlog: int = 1024,
                       receive_budget: ReceiveBudget | None = None) -> Server:
    """Listen on ``host:port`` (port 0 picks one: see ``Server.port``).

    ``hello`` is a dict or a callable returning one (called per connection).
    ``receive_budget`` bounds the bytes of partly received messages across
    all its connections (see budget.py; default: 1 GiB).
    """
    secret = check_secret(secret)
    if not callable(hello):
        encode_hello(own_hello(hello))     # fail now if it isn't JSON
    stretch(secret, PROCESS_SALT)          # once, now, rather than in the first handshake
    if ssl is None:
        import_crypto()                    # sealed records: cryptography missing fails now
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
    family, type_, proto, _, addr = infos[0]
    lsock = socket.socket(family, type_, proto)
    try:
        lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        lsock.bind(addr)
        lsock.listen(backlog)
        lsock.setblocking(False)
    except BaseException:
        lsock.close()
        raise
    return Server(loop, lsock, on_connection, secret, hello, ssl, limits, auth_timeout,
                  receive_budget or ReceiveBudget())


async def wrap_socket(sock: socket.socket, limits: Limits | None = None,
                      peer: str = "socketpair") -> Connection:
    """A Connection over a connected, trusted stream socket: no auth, no hello."""
    loop = asyncio.get_running_loop()
    conn = Connection(loop, peer, limits)
    SocketStream(loop, sock, conn)
    return conn


def server_ssl_context(certfile: str, keyfile: str | None = None, cafile: str | None = None,
                       require_client_cert: bool = False) -> _ssl.SSLContext:
    """TLS >= 1.2 server context; ``require_client_cert`` needs ``cafile``."""
    ctx = _ssl.create_default_context(_ssl.Purpose.CLIENT_AUTH, cafile=cafile)
    ctx.minimum_version = _ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(certfile, keyfile)
    if require_client_cert:
        if cafile is None:
            raise ValueError("require_client_cert=True needs a cafile to verify clients")
        ctx.verify_mode = _ssl.CERT_REQUIRED
    return ctx


def client_ssl_context(cafile: str | None = None, certfile: str | None = None,
                       keyfile: str | None = None) -> _ssl.SSLContext:
    """TLS >= 1.2 client context verifying the server against ``cafile``
    (the system CAs if None); ``certfile``/``keyfile`` for a client cert."""
    ctx = _ssl.create_default_context(_ssl.Purpose.SERVER_AUTH, cafile=cafile)
    ctx.minimum_version = _ssl.TLSVersion.TLSv1_2
    if certfile is not None:
        ctx.load_cert_chain(certfile, keyfile)
    return ctx
