"""Byte streams under a Connection: plain sockets and asyncio TLS transports.

Both offer ``write(parts)``, ``close()``, ``abort()`` and call back into the
connection (``_get_buffer``, ``_buffer_updated``, ``_pause_writing``,
``_resume_writing``, ``_connection_lost``).

:class:`SocketStream` drives a non-blocking socket with the loop's
``add_reader``/``add_writer``: ``recv_into`` straight into the decoder's
buffer, and ``sendmsg`` of the queued parts, which are kept by reference, so a
large frame is never copied (asyncio's own socket transport on Python 3.11
joins ``writelines`` and copies unsent data into its buffer).  With a sealer
(records.py), written parts wait as plaintext and are sealed into records
only as the socket takes them (``SEAL_AHEAD`` bytes ahead at most), so a
large frame is never held twice.  On a Unix socket, a message with frames in
memory files (spool.py) sends their descriptors with its first bytes
(``SCM_RIGHTS``); an :class:`~dpool.transport.frames.FdMarker` in the queue
marks where.
"""
from __future__ import annotations

import asyncio
import array
import asyncio.sslproto
import collections
import selectors
import socket
from typing import TYPE_CHECKING, Any, Callable

from .frames import IOV_MAX, FdMarker, Part, in_stream
from .records import RECORD_DATA, TAG, Parts, Sealer, take

if TYPE_CHECKING:
    from .connection import Connection

CLOSE_TIMEOUT = 10.0  # seconds a graceful close waits for unsent data to go out
HIGH_WATER = 4 * 2**20
LOW_WATER = 1 * 2**20
SEAL_AHEAD = 1 * 2**20


#: Seconds after which a TCP connection whose peer stopped answering fails by
#: itself (the heartbeat deadline, see dpool.liveness, replaces it per session).
DEFAULT_DEADLINE = 10.0


def set_tcp_options(sock: socket.socket, deadline: float = DEFAULT_DEADLINE) -> None:
    """TCP_NODELAY, and a dead peer noticed by the kernel within ``deadline``
    seconds: keepalive probes on an idle connection, TCP_USER_TIMEOUT when
    sent data stays unacknowledged (so a blocked send can't outlive the
    deadline).  Nothing on non-TCP sockets."""
    if sock.family not in (socket.AF_INET, socket.AF_INET6):
        return
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    idle = max(1, int(deadline / 3))
    interval = max(1, int(deadline / 10))
    count = max(1, int((deadline - idle) / interval))
    for name, value in (("TCP_KEEPIDLE", idle), ("TCP_KEEPINTVL", interval),
                        ("TCP_KEEPCNT", count), ("TCP_USER_TIMEOUT", int(deadline * 1000))):
        option = getattr(socket, name, None)
        if option is not None:  # Linux has them all; others keep their defaults
            sock.setsockopt(socket.IPPROTO_TCP, option, value)


#: The longest wait the loop asks of its selector, as asyncio's own
#: (base_events.MAXIMUM_SELECT_TIMEOUT): epoll takes ~24.8 days at most.
MAX_WAIT = 24 * 3600.0


class CountingSelector(selectors.DefaultSelector):
    """The loop's selector, counting its waits: each loop iteration waits
    once, so a stream tells the first message of an iteration from the
    ones after it by the count, with no callback per message.

    It also runs the callbacks given to :func:`after_pass` once the pass
    that gave them is over (all its handles have run), before the loop
    waits again: work batched over a pass (a node's dispatch and its
    results' flush, the messages one read brought) is done in the same
    wake-up, where ``call_soon`` would cost the loop one more pass (an
    ``epoll_wait`` and a ``_run_once``) for it."""

    epoch = 0
    loop: asyncio.AbstractEventLoop | None = None

    def __init__(self) -> None:
        super().__init__()
        self._after: list[Callable[[], object]] = []

    def after(self, callback: Callable[[], object]) -> None:
        """Run ``callback`` when this pass is over (see :func:`after_pass`)."""
        self._after.append(callback)

    def select(self, timeout: float | None = None) -> Any:
        self.epoch += 1
        if self._after:
            timeout = self._run_after(timeout)
        return super().select(timeout)

    def _run_after(self, timeout: float | None) -> float | None:
        """Run the after_pass callbacks (those they give run after the next
        pass); the wait's timeout, shortened to what they scheduled."""
        after, self._after = self._after, []
        loop = self.loop
        for i, callback in enumerate(after):
            try:
                callback()
            except (SystemExit, KeyboardInterrupt):
                self._after[:0] = after[i + 1:]  # (the rest: when the loop runs again)
                raise
            except BaseException as exc:  # (as a Handle reports a callback's error)
                if loop is None:
                    raise
                loop.call_exception_handler({
                    "message": f"Exception in callback {callback!r} (after a pass)",
                    "exception": exc})
        # (asyncio's own loop state: what the loop's pass computed the
        # timeout from, before these callbacks ran)
        if self._after or getattr(loop, "_ready", None) or getattr(loop, "_stopping", False):
            return 0
        scheduled = getattr(loop, "_scheduled", None)
        if scheduled and loop is not None:
            due = min(max(0.0, scheduled[0].when() - loop.time()), MAX_WAIT)
            return due if timeout is None else min(timeout, due)
        return timeout


def new_event_loop() -> asyncio.AbstractEventLoop:
    """An event loop whose streams cork without a callback per lone
    message (see :meth:`SocketStream.write`) and that runs :func:`after_pass`
    callbacks in the pass's own wake-up: dpool-node's and dpool-scheduler's."""
    selector = CountingSelector()
    loop = asyncio.SelectorEventLoop(selector)
    selector.loop = loop
    return loop


def after_pass(callback: Callable[[], object]) -> None:
    """Call ``callback`` once the running loop's current pass is over: on a
    :func:`new_event_loop` loop before it waits again (in the same
    wake-up), on any other as ``call_soon`` (the next pass).  Errors are
    reported to the loop's exception handler, as a callback's."""
    loop = asyncio.get_running_loop()
    selector = getattr(loop, "_selector", None)
    if type(selector) is CountingSelector and selector.loop is loop:
        selector.after(callback)
    else:
        loop.call_soon(callback)


def advance(parts: Parts, sent: int) -> None:
    """Drop ``sent`` bytes from the front of a deque of byte ``parts``."""
    while sent:
        first = parts[0]
        size = len(first)
        if sent >= size:
            parts.popleft()
            sent -= size
        else:
            parts[0] = memoryview(first)[sent:]
            return


class SocketStream:
    """A connected non-blocking stream socket owned by one event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop, sock: socket.socket,
                 conn: Connection) -> None:
        self._loop = loop
        self._sock = sock
        self._fd = sock.fileno()
        self._conn = conn
        self._out: Parts = collections.deque()    # wire bytes ready to send
        self._out_bytes = 0                 # bytes not yet sent (plain or sealed)
        self._plain: Parts = collections.deque()  # with a sealer: parts not yet sealed
        self._sealed_bytes = 0              # with a sealer: bytes in _out
        self._sealer: Sealer | None = None
        self._markers = 0                   # FdMarkers in _out
        self._paused = False
        self._closing = False
        self._done = False
        selector = getattr(loop, "_selector", None)
        self._selector = selector if type(selector) is CountingSelector \
            and selector.loop is loop else None
        self._epoch = -1                    # the loop iteration of the last write
        sock.setblocking(False)
        conn._stream = self
        loop.add_reader(self._fd, self._read_ready)

    active = True

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "socket":
            return self._sock
        if name == "peername":
            try:
                return self._sock.getpeername()
            except OSError:
                return default
        return default

    def _read_ready(self) -> None:
        conn = self._conn
        try:   # (conn._get_buffer(), inline: once per read)
            n = self._sock.recv_into(conn._hs_rx if conn._preauth else conn._decoder.get_buffer())
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._finish(exc)
            return
        if n:
            conn.bytes_received += n
            conn._buffer_updated(n)
        elif (self._out or self._plain) and not conn._preauth and not conn._decoder.partial:
            # The peer shut down its writing side (FIN), and may still read
            # (shutdown(SHUT_WR), or a proxy passing a half-close on): what
            # is queued for it goes first, then it ends, as on the
            # connection's close() (which it is: closed to sends from now
            # on, ConnectionClosed, not dropped without a word).  Cut in
            # the middle of a message: ended now, with that error.
            conn.close()
        else:
            self._finish(None)

    def _read_what_is_left(self) -> None:
        """Read and deliver what the kernel holds for us, without waiting."""
        while not self._closing:
            try:
                n = self._sock.recv_into(self._conn._get_buffer())
            except OSError:    # nothing more (EAGAIN), or the reset itself
                return
            if not n:
                return
            self._conn.bytes_received += n
            self._conn._buffer_updated(n)

    @property
    def unsent(self) -> int:
        """Bytes queued here, not yet in the kernel's buffer."""
        return self._out_bytes

    def idle(self) -> bool:
        """True when nothing is queued to send and the stream is open."""
        return not (self._out or self._plain or self._closing)

    def pause_reading(self) -> None:
        if not self._closing:
            self._loop.remove_reader(self._fd)

    def resume_reading(self) -> None:
        if not self._closing:
            self._loop.add_reader(self._fd, self._read_ready)

    def set_sealer(self, sealer: Sealer) -> None:
        """Seal everything written from now on (records.Sealer)."""
        self._sealer = sealer

    def write(self, parts: list[Part]) -> None:
        # The first message of a loop iteration goes out at once (a lone
        # message waits for nothing: the round trip's case); the messages
        # that follow it in the same iteration are corked until its end and
        # go out in one sendmsg (one syscall for a whole batch of small
        # messages instead of one each; with a sealer, one record for all).
        # On a loop with a CountingSelector the iteration is told by its
        # count, and a callback is scheduled only for what waits (the rest
        # of the iteration's messages, or what the socket did not take).
        if self._closing:
            return
        if parts and type(parts[0]) is FdMarker:
            if self._sealer is not None or self._sock.family != socket.AF_UNIX:
                raise TypeError("frames in memory files go only over a Unix socket")
            self._markers += 1
        (self._out if self._sealer is None else self._plain).extend(parts)
        self._out_bytes += sum(map(len, parts))
        selector = self._selector
        if selector is not None:
            if not self._flush_pending and not self._writer_on:
                if self._epoch != selector.epoch:  # the iteration's first: out now
                    self._epoch = selector.epoch
                    self._write_now()
                if self._out or self._plain:
                    self._flush_pending = True
                    selector.after(self._flush)  # (at the end of this pass)
        elif not self._flush_pending and not self._writer_on:
            self._flush_pending = True
            self._loop.call_soon(self._flush)
            self._write_now()
        if not self._paused and self._out_bytes > HIGH_WATER:
            self._paused = True
            self._conn._pause_writing()

    def write_records(self, pieces: list[bytes | memoryview]) -> None:
        """Write ``pieces``, each sealed now into records of its own, so
        the caller may reuse their memory at once and the receiver gets
        each piece in records that hold nothing else (a relayed chunk's
        bytes go straight into the frame they are part of, see
        frames.FrameDecoder.get_buffer).  Without a sealer, or behind more
        than SEAL_AHEAD bytes of plaintext not sealed yet: joined (a copy)
        and written as usual."""
        sealer = self._sealer
        if sealer is None or self._closing or sum(map(len, self._plain)) > SEAL_AHEAD:
            self.write([b"".join(pieces)])
            return
        plain = self._plain
        while plain:     # (in order: what was written before goes first)
            self._seal(take(plain, RECORD_DATA))
        for piece in pieces:
            view = memoryview(piece)
            self._out_bytes += len(view)
            for start in range(0, len(view), RECORD_DATA):
                self._seal(view[start:start + RECORD_DATA])
        self.write([])     # (sent, or its sending scheduled, as any write)

    def write_wire(self, data: Part) -> None:
        """Send ``data`` as it is (bytes already framed and sealed: the rest
        of a write a borrower of the socket began, :mod:`.lent`), before
        anything written later (the stream was idle when lent)."""
        if self._closing:
            return
        self._out.appendleft(data)
        self._out_bytes += len(data)
        self._sealed_bytes += len(data)
        self.write([])  # (sent as write() sends)

    _flush_pending = False
    _writer_on = False

    def _flush(self) -> None:
        self._flush_pending = False
        if self._done or not (self._out or self._plain):
            return
        self._write_ready()
        if self._out and not self._done and not self._writer_on:
            self._writer_on = True
            self._loop.add_writer(self._fd, self._write_ready)

    def _write_now(self) -> None:
        """One send of what is queued, as far as the kernel takes it now.
        An error is left to the flush already scheduled, which meets it
        again and closes the stream outside the caller's stack."""
        if self._plain:
            self._seal_more()
        out = self._out
        if not out:
            return
        try:
            sent = self._send_some(out)
        except OSError:
            return
        if sent == self._out_bytes and not self._markers and not self._plain:
            out.clear()   # (all of it, the usual case: nothing to walk through)
        else:
            advance(out, sent)
        self._out_bytes -= sent
        self._sealed_bytes -= sent
        self._conn.bytes_sent += sent

    def _send_some(self, out: Parts) -> int:
        """Send what the socket takes of ``out`` now (descriptors with their
        message's first byte); the bytes sent."""
        if self._markers:
            return self._send_marked(out)
        if len(out) == 1:
            return self._sock.send(out[0])
        return self._sock.sendmsg([out[i] for i in range(min(len(out), IOV_MAX))])

    def _seal_more(self) -> None:
        """Seal queued plaintext into ``_out`` until SEAL_AHEAD bytes wait there."""
        plain = self._plain
        while plain and self._sealed_bytes < SEAL_AHEAD:
            self._seal(take(plain, RECORD_DATA))

    def _seal(self, data: bytes | memoryview) -> None:
        """Seal ``data`` (counted in ``_out_bytes`` already) into a record in ``_out``."""
        sealer = self._sealer
        assert sealer is not None
        head, body = sealer.seal(data)
        self._out.append(head)
        self._out.append(body)
        size = len(head) + len(body)
        self._sealed_bytes += size
        self._out_bytes += size - (len(body) - TAG)

    def _write_ready(self) -> None:
        out = self._out
        try:
            while True:
                if self._plain:
                    self._seal_more()
                if not out:
                    break
                sent = self._send_some(out)
                advance(out, sent)
                self._out_bytes -= sent
                self._sealed_bytes -= sent
                self._conn.bytes_sent += sent
                if not sent or len(out) < IOV_MAX and out:
                    break  # the kernel buffer is full: wait for writability
        except (BlockingIOError, InterruptedError):
            pass
        except OSError as exc:
            # The peer is gone (EPIPE, ECONNRESET), but what it sent before
            # going is still in our receive buffer: a worker's last result,
            # say. Deliver it before the close.
            self._read_what_is_left()
            self._finish(exc)
            return
        if self._paused and self._out_bytes <= LOW_WATER:
            self._paused = False
            self._conn._resume_writing()
        if not out and not self._plain:
            if self._writer_on:
                self._writer_on = False
                self._loop.remove_writer(self._fd)
            if self._closing:
                self._finish(None)

    def _send_marked(self, out: Parts) -> int:
        """Send from ``out``, which holds FdMarkers: the parts up to the next
        marker, with the descriptors of the marker at the front, if any."""
        first = out[0]
        marker = first if type(first) is FdMarker else None
        iov = []
        for i in range(1 if marker is not None else 0, min(len(out), IOV_MAX)):
            part = out[i]
            if type(part) is FdMarker:
                break
            iov.append(part)
        if marker is None:
            return self._sock.sendmsg(iov)
        fds = array.array("i", marker.fds())
        sent = self._sock.sendmsg(iov, [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)])
        out.popleft()     # the descriptors went with the first byte
        self._markers -= 1
        return sent

    def close(self) -> None:
        """Stop reading; close once everything queued has been sent."""
        if self._closing:
            return
        self._closing = True
        self._loop.remove_reader(self._fd)
        if not (self._out or self._plain):
            self._loop.call_soon(self._finish, None)
        else:  # a peer that stopped reading must not hold the socket forever
            self._loop.call_later(CLOSE_TIMEOUT, self._give_up_close)

    def _give_up_close(self) -> None:
        if not self._done:
            self._stop()
            self._finish(ConnectionError(f"peer did not read the last {self._out_bytes} "
                                         f"bytes within {CLOSE_TIMEOUT} s of close"))

    def abort(self) -> None:
        self._stop()
        self._loop.call_soon(self._finish, None)

    def _fail_soon(self, exc: BaseException) -> None:
        self._stop()
        self._loop.call_soon(self._finish, exc)

    def _stop(self) -> None:
        if self._done:          # the fd may already belong to someone else
            return
        self._closing = True
        self._out.clear()
        self._plain.clear()
        self._markers = 0
        self._loop.remove_reader(self._fd)
        self._loop.remove_writer(self._fd)

    def _finish(self, exc: BaseException | None) -> None:
        if self._done:
            return
        self._done = True
        self._closing = True
        self._loop.remove_reader(self._fd)
        self._loop.remove_writer(self._fd)
        self._out.clear()
        self._plain.clear()
        self._markers = 0
        self._sock.close()
        self._conn._connection_lost(exc)


class TransportAdapter(asyncio.BufferedProtocol):
    """asyncio BufferedProtocol glue for transports we don't drive (TLS)."""

    def __init__(self, conn: Connection) -> None:
        self._conn = conn
        self._transport: asyncio.Transport | None = None
        conn._stream = self

    # stream interface
    @property
    def active(self) -> bool:
        return self._transport is not None

    @property
    def transport(self) -> asyncio.Transport:
        assert self._transport is not None, "not connected yet"
        return self._transport

    def write(self, parts: list[Part]) -> None:
        data = in_stream(parts)
        self._conn.bytes_sent += sum(map(len, data))
        self.transport.writelines(data)

    def write_records(self, pieces: list[bytes | memoryview]) -> None:
        self.write([b"".join(pieces)])

    @property
    def unsent(self) -> int:
        return self.transport.get_write_buffer_size() if self._transport is not None else 0

    def close(self) -> None:
        self.transport.close()

    def abort(self) -> None:
        self.transport.abort()

    def set_sealer(self, sealer: Sealer) -> None:
        raise NotImplementedError("TLS streams are not sealed again")

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self.transport.get_extra_info(name, default)

    def pause_reading(self) -> None:
        self.transport.pause_reading()

    def resume_reading(self) -> None:
        if not self.transport.is_closing():
            self.transport.resume_reading()

    # asyncio.BufferedProtocol interface
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        transport.set_write_buffer_limits(high=HIGH_WATER, low=LOW_WATER)

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._conn._get_buffer()

    def buffer_updated(self, nbytes: int) -> None:
        self._conn.bytes_received += nbytes
        self._conn._buffer_updated(nbytes)

    def eof_received(self) -> bool:
        # The peer's FIN: the connection is closed to sends, as a
        # SocketStream's (asyncio's TLS sends what is queued, then ends).
        conn = self._conn
        if not conn._preauth and not conn._decoder.partial:
            conn.close()
        return False

    def pause_writing(self) -> None:
        self._conn._pause_writing()

    def resume_writing(self) -> None:
        self._conn._resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        self._conn._connection_lost(exc)


class _AlertingSSLProtocol(asyncio.sslproto.SSLProtocol):
    """asyncio's TLS protocol, but a failed handshake sends its alert (e.g.
    "certificate required", "unknown ca") before the connection closes, so
    the peer learns why; asyncio 3.11-3.13 drops it."""

    def _on_handshake_complete(self, handshake_exc):  # type: ignore[no-untyped-def]
        if handshake_exc is not None:
            try:
                self._process_outgoing()  # type: ignore[attr-defined]
            except Exception:  # pragma: no cover - best effort only
                pass
        super()._on_handshake_complete(handshake_exc)


async def accept_tls(loop: asyncio.AbstractEventLoop, sock: socket.socket,
                     adapter: TransportAdapter, ssl: Any) -> None:
    """The server side of a TLS handshake on the accepted ``sock``; what
    ``loop.connect_accepted_socket(..., ssl=ssl)`` does, with the alert kept."""
    waiter = loop.create_future()
    protocol = _AlertingSSLProtocol(loop, adapter, ssl, waiter, server_side=True)
    transport, _ = await loop.connect_accepted_socket(lambda: protocol, sock)
    try:
        await waiter
    except BaseException:
        transport.close()
        raise

