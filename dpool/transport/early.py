"""A fresh client's first connection, begun before its heavy imports.

A client meeting a node stretches the shared secret under the node's salt
(scrypt, ~50 ms by design: :func:`dpool.transport.auth.stretch`), which it
learns from the node's challenge, the first thing on the connection.  In a
fresh process that stretch came after ``asyncio`` and the client core were
imported (tens of ms of the GIL), then ran with the GIL idle (issue 13: a
fresh process's first pool via a node).  :func:`begin` starts the
connection as the pool is made, before those imports: it connects, sends
the client's reply (step 2: a nonce) (in the calling thread if that is
quick, see ``HERE_TIMEOUT``), and a thread reads the challenge (step 1)
and stretches the secret for its salt while the process imports the rest
(scrypt releases the GIL).  The client's connection to that
address then takes the socket (:func:`find`) and carries on the same
handshake from step 3 (:func:`dpool.transport.auth.client_handshake`), the
key cached by then.  Nothing changes in what is sent or checked: the bytes
on the wire are the same, only read by another thread first; nothing read
here is unpickled (the challenge is a fixed-size string of bytes).

Plain TCP only (TLS wraps the socket first), and only the first address.
Whatever fails here (refused, timed out, not a dpool node) is dropped: the
client connects as usual and meets the error itself.  A connection not
taken is closed by :meth:`Early.close` (the pool's start calls it after
its first connection, whatever happened).
"""
from __future__ import annotations

import socket
import threading
from concurrent.futures import Future

from .auth import CHALLENGE_SIZE, SHORT_SECRET, make_reply, parse_challenge, stretch_early

#: The thread's connect and read deadline, seconds: what takes longer is
#: left to the client's own connection (whose timeout is the user's).
EARLY_TIMEOUT = 2.0
#: How long the calling thread itself waits to connect to a numeric address,
#: seconds, before it leaves that to the thread: a thread that meets a
#: blocking call waits for the GIL again after it (up to
#: ``sys.getswitchinterval()``, 5 ms, each time) while the process imports,
#: so the quick steps are taken here (connecting to a loopback or LAN node
#: takes well under a millisecond); the challenge, which waits for the
#: node's process, is the thread's to read.
HERE_TIMEOUT = 0.05

_lock = threading.Lock()
_begun: dict[tuple[str, int, bytes], "Early"] = {}


class Early:
    """One connection begun (here, then in a thread): its socket, the reply
    sent and the challenge read, once :attr:`ready` is done (its result
    None on failure); the thread then stretches the secret for the salt."""

    def __init__(self, host: str, port: int, secret: bytes, timeout: float) -> None:
        self.key = (host, port, secret)
        self.ready: Future = Future()
        self._taken = False
        self._sock: socket.socket | None = None
        self._reply = make_reply()
        self._raw = b""
        if _numeric(host, port) is not None:
            try:
                self._sock = _connect(host, port, HERE_TIMEOUT)
                self._sock.sendall(self._reply)
            except OSError:  # (timed out, refused...: the thread tries again, or fails)
                self._sock = self._close(self._sock)
        self._thread = threading.Thread(target=self._run, args=(host, port, secret, timeout),
                                        name="dpool-early-connect", daemon=True)
        self._thread.start()

    @staticmethod
    def _close(sock: socket.socket | None) -> None:
        if sock is not None:
            sock.close()

    def _steps(self, host: str, port: int, timeout: float) -> None:
        """Connect and send the reply (unless done), read the challenge."""
        if self._sock is None:
            self._sock = _connect(host, port, timeout)
            self._sock.sendall(self._reply)
        self._sock.settimeout(timeout)
        while len(self._raw) < CHALLENGE_SIZE:
            # (no more than the challenge: what follows is the handshake's)
            chunk = self._sock.recv(CHALLENGE_SIZE - len(self._raw))
            if not chunk:
                raise ConnectionError("closed")
            self._raw += chunk

    def _run(self, host: str, port: int, secret: bytes, timeout: float) -> None:
        try:
            self._steps(host, port, timeout)
            challenge = parse_challenge(self._raw)
        except Exception:  # (the client's own connection meets it again)
            self._close(self._sock)
            self.ready.set_result(None)
            return
        got = (self._sock, self._reply, self._raw)
        # The key is stretched (holding the stretch lock, taken before the
        # socket is handed over: the handshake's own stretch waits for it)
        stretch_early(secret, challenge.salt, lambda: self.ready.set_result(got))

    def take(self) -> tuple[socket.socket, bytes, bytes] | None:
        """The connection (socket, reply sent, challenge read), once :attr:`ready`
        is done; None if it failed or was taken (or closed) already."""
        got = self.ready.result(0)
        with _lock:
            if self._taken or got is None:
                return None
            self._taken = True
            _begun.pop(self.key, None)
        got[0].setblocking(False)
        return got

    def close(self) -> None:
        """Drop the connection unless it was taken (does not wait for the
        thread's stretch: the key is cached when it ends)."""
        with _lock:
            if _begun.get(self.key) is self:
                del _begun[self.key]
            taken, self._taken = self._taken, True
        if not taken:
            self.ready.add_done_callback(_close_socket)


def _close_socket(ready: Future) -> None:
    got = ready.result()
    if got is not None:
        got[0].close()


def _numeric(host: str, port: int) -> list | None:
    try:
        return socket.getaddrinfo(host.encode("ascii"), port, type=socket.SOCK_STREAM,
                                  flags=socket.AI_NUMERICHOST)
    except (UnicodeError, OSError):
        return None


def _connect(host: str, port: int, timeout: float) -> socket.socket:
    """A blocking connection to ``host:port`` (a name is resolved as bytes:
    no codec import in this thread, which runs during the process's imports)."""
    infos = _numeric(host, port) or socket.getaddrinfo(host.encode("ascii"), port,
                                                       type=socket.SOCK_STREAM)
    err: OSError | None = None
    for family, type_, proto, _, addr in infos:
        sock = socket.socket(family, type_, proto)
        sock.settimeout(timeout)
        try:
            sock.connect(addr)
            return sock
        except OSError as exc:
            sock.close()
            err = exc
    raise err or OSError(f"no address for {host}")


def begin(host: str, port: int, secret: bytes, timeout: float = EARLY_TIMEOUT) -> Early | None:
    """Begin the connection to ``host:port`` in a thread (see the module's
    doc); None where it is not done (a short secret, whose warning the
    client's own stretch gives; a non-ASCII name; one begun already)."""
    if not isinstance(secret, bytes) or len(secret) < SHORT_SECRET or not host.isascii():
        return None
    with _lock:
        if (host, port, secret) in _begun:
            return None
        early = Early(host, port, secret, timeout)
        _begun[early.key] = early
    return early


def find(host: str, port: int, secret: bytes) -> Early | None:
    """The connection :func:`begin` began to ``host:port`` with ``secret``, if any
    (wait for its :attr:`~Early.ready`, then :meth:`~Early.take` it)."""
    with _lock:
        return _begun.get((host, port, secret))
