"""The message-oriented connection used by everything above the transport.

Data flow (one event loop owns the connection; no other thread touches it)::

    send(frames) --encode--> stream.write(parts) --sendmsg/TLS--> peer
    peer --recv_into(decoder.get_buffer())--> decoder.buffer_updated(n)
         --> [message, ...] --> on_message(frames)   (callback mode)
                            \\-> pending deque --> await recv()   (pull mode)

The stream below is a plain socket driven by the loop's reader/writer
callbacks (streams.SocketStream) or an asyncio TLS transport
(streams.TransportAdapter); both call back into ``_get_buffer``,
``_buffer_updated``, ``_pause_writing``, ``_resume_writing`` and
``_connection_lost``.  A connection starts in pre-auth mode when it still has
to authenticate (see auth.py): then received bytes are collected, at most
``PREAUTH_MAX`` of them, for the handshake's fixed-size reads.
"""
from __future__ import annotations

import asyncio
import collections
import logging
import socket
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any, Protocol, cast

from dpool.errors import ConnectionClosed, ProtocolError

from .auth import PREAUTH_MAX, Keys
from .budget import ReceiveBudget
from .frames import (Descriptor, FdMarker, FrameDecoder, Limits, Message, Part, TapHook,
                     _nbytes, encode)
from .records import Sealer, SecureDecoder
from . import spool as _spool
from .streams import set_tcp_options

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer as Frame

log = logging.getLogger("dpool.transport")

__all__ = ["Connection", "inproc_pair"]

OnMessage = Callable[[Message], object]
OnClose = Callable[[BaseException | None], object]


class Relay(Protocol):
    """A message being relayed out (forward.Forward)."""

    def nudge(self) -> None: ...
    def abort(self) -> None: ...


class Stream(Protocol):
    """What a Connection writes to (streams.SocketStream, TransportAdapter)."""

    @property
    def active(self) -> bool: ...
    @property
    def unsent(self) -> int: ...
    def write(self, parts: list[Part]) -> None: ...
    def write_records(self, pieces: list[bytes | memoryview]) -> None: ...
    def close(self) -> None: ...
    def abort(self) -> None: ...
    def set_sealer(self, sealer: Sealer) -> None: ...
    def get_extra_info(self, name: str, default: Any = None) -> Any: ...
    def pause_reading(self) -> None: ...
    def resume_reading(self) -> None: ...


class Connection:
    """A message-oriented, ordered, reliable connection.

    Contract:

    * A message is a list of frames (bytes-like objects).  Messages arrive
      complete and in the order they were sent.  Received frames are
      ``bytes`` when small and ``bytearray`` when large, except a large
      frame that was a whole ``bytes`` object when sent: ``bytes`` (on
      CPython, see frames.BYTES_FLAG).
    * Use the connection from the one event loop that created it.
    * ``send(frames)`` never blocks: the message is queued in full or, if
      the connection is closed, ``ConnectionClosed`` is raised and nothing
      is sent.  Large frames are kept by reference until written: don't
      mutate them after ``send`` (bytes are immutable; take care with
      bytearrays and memoryviews).  Call ``await drain()`` to wait until the
      write buffer is below its high-water mark (flow control).
    * Receive either with callbacks, ``set_receiver(on_message, on_close)``
      (``on_message(frames)`` called synchronously for each message, in
      order; messages received earlier are delivered inside
      ``set_receiver``; ``on_close(exc_or_None)`` called once when the
      connection ends), or by ``await recv()``, which raises
      ``ConnectionClosed`` once the connection has ended and all received
      messages have been returned.  An exception from ``on_message`` is
      logged and aborts the connection.
    * ``close()`` stops receiving, flushes what was sent, then closes;
      ``abort()`` drops unsent data and closes now.  Either way the
      connection ends soon after (``await wait_closed()``).  A peer that
      breaks the framing (bad count, length over the limits, end of stream
      in the middle of a message) ends the connection with a
      ``ProtocolError``/``ConnectionClosed`` given to ``on_close``; protocol
      errors are logged once at WARNING with the peer's address.
    * ``peer`` names the other end ("host:port", "inproc", "socketpair");
      ``hello`` is the peer's hello dict (None on unauthenticated links).
    * ``bytes_sent`` / ``bytes_received`` count the bytes written to and
      read from the stream (handshake and framing included; on TLS the
      plaintext handed to / received from the TLS layer; in-process, the
      frames' bytes).  One integer add per read or write call.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, peer: str,
                 limits: Limits | None = None, *, preauth: bool = False,
                 budget: ReceiveBudget | None = None) -> None:
        self._loop = loop
        self._budget = budget        # a ReceiveBudget shared with other connections
        self.peer = peer
        self.hello: dict[str, Any] | None = None
        self._limits = limits or Limits()
        # The 256 KiB receive buffer only once authenticated (cheap pre-auth).
        self._decoder: FrameDecoder | SecureDecoder = (
            cast(FrameDecoder, None) if preauth else FrameDecoder(self._limits))
        self._stream = cast(Stream, None)     # the stream attaches itself (streams.py)
        self._preauth = preauth
        self._log_errors = not preauth
        self._hs_buf = bytearray()
        self._hs_rx = memoryview(bytearray(PREAUTH_MAX + 1))
        self._hs_waiter: asyncio.Future[None] | None = None
        self._pending: collections.deque[Message] = collections.deque()
        self._more = False           # messages of this read wait behind the one handled
        self._on_message: OnMessage | None = None
        self._on_close: OnClose | None = None
        self._recv_waiter: asyncio.Future[None] | None = None
        self._closing = False        # close() or abort() called, or failed
        self._lost = False           # the stream is gone
        self._exc: BaseException | None = None  # why the connection ended, if not cleanly
        self._close_reported = False
        self._write_paused = False
        self._drain_waiters: list[asyncio.Future[None]] = []
        self._lost_future = loop.create_future()
        self._spool: Callable[[bytes | bytearray], bool] | None = None
        self._tap: TapHook | None = None
        self._relay: Relay | None = None     # a message being relayed out (forward.py)
        self._held: list[list[Part]] = []   # messages sent meanwhile, written after it
        self.bytes_sent = 0
        self.bytes_received = 0

    def __repr__(self) -> str:
        state = "closed" if self.closed else "open"
        return f"<{type(self).__name__} {self.peer} {state}>"

    # -- public API ------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._closing or self._lost

    @property
    def unsent(self) -> int:
        """Bytes sent that are still queued here (not in the kernel's buffer yet)."""
        stream = self._stream
        return 0 if stream is None or self._lost else stream.unsent

    def send(self, frames: Sequence[Frame]) -> None:
        if self._closing or self._lost:
            raise self._closed_error()
        if self._relay is not None:   # after the message being relayed
            self._held.append(encode(frames))
            self._relay.nudge()
            return
        self._stream.write(encode(frames))

    def send_with(self, frames: Sequence[Frame], fd: int) -> None:
        """Send ``frames`` with the descriptor ``fd`` (``SCM_RIGHTS``, with
        the message's first byte; Unix socket streams without records): the
        peer takes it with ``BlockingConnection.take_fd``.  ``fd`` must stay
        open until the peer says it has it."""
        if self._closing or self._lost:
            raise self._closed_error()
        parts = encode(frames)
        parts.insert(0, FdMarker([Descriptor(fd)]))
        self._stream.write(parts)

    def send_all(self, messages: Sequence[Sequence[Frame]]) -> None:
        """Send ``messages`` in order, as one write where it can: one
        syscall (and one record) for a few small messages that go together."""
        if self._closing or self._lost:
            raise self._closed_error()
        encoded = [encode(frames) for frames in messages]
        if self._relay is not None or any(type(parts[0]) is FdMarker for parts in encoded):
            for frames in messages:  # (after a relayed message; descriptors: one at a time)
                self.send(frames)
            return
        self._stream.write([part for parts in encoded for part in parts])

    # -- relaying a message as it arrives (forward.py) -------------------------

    @property
    def relaying(self) -> bool:
        """True while a message is being relayed out on this connection."""
        return self._relay is not None

    def begin_relay(self, relay: Relay) -> None:
        """From now until :meth:`end_relay`, ``relay`` writes one message
        with :meth:`relay_write`; messages sent meanwhile wait for its end."""
        assert self._relay is None
        self._relay = relay

    def relay_write(self, parts: list[Part]) -> None:
        if not (self._closing or self._lost):
            self._stream.write(parts)

    def relay_records(self, pieces: list[bytes | memoryview]) -> None:
        """Write ``pieces`` of a relayed message, each sealed at once in
        records of its own (their memory may be reused on return)."""
        if not (self._closing or self._lost):
            self._stream.write_records(pieces)

    def end_relay(self) -> None:
        """The relayed message is complete (or abandoned): what was sent
        meanwhile goes out now."""
        self._relay = None
        held, self._held = self._held, []
        for parts in held:
            self.relay_write(parts)

    @property
    def write_paused(self) -> bool:
        """True while more is queued than the high-water mark."""
        return self._write_paused

    def when_writable(self, callback: Callable[[], object]) -> None:
        """Call ``callback()`` once the queue is below the low-water mark
        again, or the connection has closed."""
        waiter: asyncio.Future[None] = self._loop.create_future()
        waiter.add_done_callback(lambda _: callback())
        if self._closing or self._lost or not self._write_paused:
            waiter.set_result(None)
        else:
            self._drain_waiters.append(waiter)

    def pause_reading(self) -> None:
        if not (self._closing or self._lost):
            self._stream.pause_reading()

    def resume_reading(self) -> None:
        self._resume_reading()

    def tap_large_messages(self, tap: TapHook) -> None:
        """Offer each received message that has a frame of at least
        frames.MIN_TAP bytes to ``tap`` as that frame begins (see
        frames.TapHook): for a node relaying a worker's result."""
        self._tap = tap
        self._set_spool()

    async def drain(self) -> None:
        if self._closing or self._lost:
            raise self._closed_error()
        if self._write_paused:
            waiter: asyncio.Future[None] = self._loop.create_future()
            self._drain_waiters.append(waiter)
            await waiter

    def set_receiver(self, on_message: OnMessage, on_close: OnClose | None = None) -> None:
        if not callable(on_message):
            raise TypeError("on_message must be callable")
        if self._recv_waiter is not None:
            raise RuntimeError("set_receiver() called while recv() is waiting")
        self._on_message = on_message
        self._on_close = on_close
        pending = self._pending
        while pending and self._on_message is on_message:
            if not self._call_receiver(on_message, pending.popleft()):
                break
        if self._lost:
            self._report_close()

    async def recv(self) -> Message:
        if self._on_message is not None:
            raise RuntimeError("recv() can't be used after set_receiver()")
        if self._recv_waiter is not None:
            raise RuntimeError("recv() is already waiting")
        while not self._pending:
            if self._closing or self._lost:
                raise self._closed_error()
            self._recv_waiter = self._loop.create_future()
            try:
                await self._recv_waiter
            finally:
                self._recv_waiter = None
        return self._pending.popleft()

    def close(self) -> None:
        if self._relay is not None:   # (what is held goes before the close)
            self._relay.abort()
        if not (self._closing or self._lost):
            self._closing = True
            self._wake_waiters()
            self._stream.close()

    def abort(self) -> None:
        if not self._lost:
            self._closing = True
            self._wake_waiters()
            self._stream.abort()

    def lend(self) -> socket.socket | None:
        """Stop reading and return a duplicate of the stream's socket, for a
        thread that talks to the peer itself while this connection rests (the
        embedded node lends an idle worker to the client).  None when that
        can't be done now: closed, not a plain socket stream, or a message
        received or queued in part.  :meth:`take_back` resumes reading."""
        stream = self._stream
        idle = getattr(stream, "idle", None)
        if self.closed or self._pending or idle is None or not idle() \
                or self._decoder is None or self._decoder.partial:
            return None
        sock = stream.get_extra_info("socket")
        if sock is None:
            return None
        lent: socket.socket = sock.dup()
        stream.pause_reading()
        return lent

    @property
    def mid_read(self) -> bool:
        """True in a message's handler while messages read with it wait
        behind it (decoded, their records opened: a stream handed on now
        would go on past them, handoff.py)."""
        return self._more

    def take_back(self, messages: Sequence[Message] = (),
                  error: BaseException | None = None, rest: Any = None) -> None:
        """Read again after :meth:`lend` (the borrower is done with the peer).
        ``messages``: what the borrower read and leaves to this connection's
        receiver (delivered now, in order); ``error``: the borrower found the
        stream broken (a bad record, or cut in the middle): the connection
        ends with it; ``rest``: the wire bytes of a write the borrower began
        and could not finish (interrupted), sent first."""
        if error is not None:
            self._fail(error)
            return
        if rest:
            cast(Any, self._stream).write_wire(rest)  # (lend() lends a SocketStream only)
        self._resume_reading()
        if messages:
            self._deliver(messages)

    async def wait_closed(self) -> None:
        await asyncio.shield(self._lost_future)

    def spool_large_frames(self, spool: Callable[[bytes | bytearray], bool]) -> None:
        """Receive the large frames of each message whose first frame makes
        ``spool(frame0)`` true into memory files (spool.SpooledFrame) instead
        of memory, where the system has them (Linux): for a node, whose
        workers take such frames by descriptor.  Each record is still
        authenticated before its bytes are written."""
        if _spool.AVAILABLE:
            self._spool = spool
            self._set_spool()

    def _set_spool(self) -> None:
        decoder = self._decoder
        if isinstance(decoder, SecureDecoder):
            decoder = decoder.inner
        if decoder is not None:
            decoder.spool = self._spool
            decoder.tap = self._tap

    def set_deadline(self, seconds: float) -> None:
        """Have the kernel fail this connection when the peer stops answering
        for ``seconds`` (keepalive, TCP_USER_TIMEOUT); no-op off TCP."""
        stream = self._stream
        sock = stream.get_extra_info("socket") if stream is not None else None
        if sock is not None and not self.closed:
            set_tcp_options(sock, seconds)

    # -- errors and close reporting -----------------------------------------------

    def _closed_error(self) -> ConnectionClosed:
        err = ConnectionClosed(f"connection to {self.peer} is closed")
        if self._exc is not None:
            err.__cause__ = self._exc
        return err

    def _fail(self, exc: BaseException) -> None:
        """End the connection because of ``exc`` (a peer or callback error)."""
        if self._lost or self._exc is not None:
            return
        self._exc = exc
        if self._log_errors and isinstance(exc, ProtocolError):
            log.warning("closing connection to %s: %s", self.peer, exc)
        self.abort()

    def _report_close(self) -> None:
        if self._close_reported:
            return
        self._close_reported = True
        on_close = self._on_close
        # Drop the callbacks: they usually hold the object that holds this
        # connection, and that cycle would keep both (and their buffers)
        # alive until the garbage collector runs.
        self._on_message = self._on_close = None
        if on_close is not None:
            try:
                on_close(self._exc)
            except Exception:
                log.exception("on_close callback for %s failed", self.peer)

    def _wake_waiters(self) -> None:
        for waiter in (self._recv_waiter, self._hs_waiter):
            if waiter is not None and not waiter.done():
                waiter.set_result(None)
        if self._closing or self._lost:
            waiters, self._drain_waiters = self._drain_waiters, []
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_exception(self._closed_error())

    # -- receiving ---------------------------------------------------------------

    def _call_receiver(self, on_message: OnMessage, frames: Message) -> bool:
        try:
            on_message(frames)
        except Exception as exc:
            self._receiver_failed(exc)
            return False
        return True

    def _receiver_failed(self, exc: Exception) -> None:
        log.exception("on_message callback for %s failed; aborting the connection", self.peer,
                      exc_info=exc)
        self._fail(exc)

    def _deliver(self, messages: Sequence[Message]) -> None:
        on_message = self._on_message
        if on_message is None:
            self._pending.extend(messages)
            waiter = self._recv_waiter
            if waiter is not None and not waiter.done():
                waiter.set_result(None)
            return
        last = len(messages) - 1
        for i, frames in enumerate(messages):
            if self._closing:
                return
            if self._on_message is not on_message:   # changed by a callback
                on_message = self._on_message
                if on_message is None:
                    self._pending.extend(messages[i:])
                    return
            self._more = i < last
            try:   # (as _call_receiver, inline: once per message)
                on_message(frames)
            except Exception as exc:
                self._receiver_failed(exc)
                return
        self._more = False

    # -- stream callbacks ------------------------------------------------------

    def _get_buffer(self) -> memoryview:
        if self._preauth:
            return self._hs_rx
        return self._decoder.get_buffer()

    def _buffer_updated(self, nbytes: int) -> None:
        if self._closing:
            return
        if self._preauth:
            self._hs_buf += self._hs_rx[:nbytes]
            if len(self._hs_buf) > PREAUTH_MAX:
                self._fail(ProtocolError(
                    f"{self.peer} sent more than {PREAUTH_MAX} bytes before authenticating"))
            elif self._hs_waiter is not None and not self._hs_waiter.done():
                self._hs_waiter.set_result(None)
            return
        try:
            messages = self._decoder.buffer_updated(nbytes)
        except ProtocolError as exc:
            self._fail(exc)
            return
        if self._budget is not None and not self._budget.update(self, self._decoder.held):
            self._stream.pause_reading()
            self._budget.pause(self, self._resume_reading)
        if messages:
            self._deliver(messages)

    def _resume_reading(self) -> None:
        if not (self._closing or self._lost):
            self._stream.resume_reading()

    def _pause_writing(self) -> None:
        self._write_paused = True

    def _resume_writing(self) -> None:
        self._write_paused = False
        waiters, self._drain_waiters = self._drain_waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    def _connection_lost(self, exc: BaseException | None) -> None:
        if self._lost:
            return
        self._lost = True
        if self._exc is None:
            if exc is None and not self._closing and not self._preauth \
                    and self._decoder.partial:
                exc = ConnectionClosed(
                    f"{self.peer} closed the connection in the middle of a message")
            self._exc = exc
        if self._decoder is not None:
            self._decoder.discard()   # frees a partly received message now
        self._decoder = cast(FrameDecoder, None)
        if self._budget is not None:
            self._budget.forget(self)
        self._wake_waiters()
        self._lost_future.set_result(None)
        if self._on_message is not None or self._on_close is not None:
            self._report_close()

    # -- pre-auth helpers (used by auth.py) -----------------------------------

    async def _read_exact(self, n: int) -> bytes:
        while len(self._hs_buf) < n:
            if self._closing or self._lost:
                raise self._closed_error()
            self._hs_waiter = self._loop.create_future()
            try:
                await self._hs_waiter
            finally:
                self._hs_waiter = None
        data = bytes(self._hs_buf[:n])
        del self._hs_buf[:n]
        return data

    def _write_raw(self, data: bytes) -> None:
        if self._closing or self._lost:
            raise self._closed_error()
        self._stream.write([data])

    def _start_framing(self, keys: Keys | None = None) -> None:
        """Leave pre-auth mode; with ``keys`` (auth.Keys) every byte from now
        on travels in AEAD records (records.py)."""
        self._decoder = FrameDecoder(self._limits)
        if keys is not None:
            self._decoder = SecureDecoder(self._decoder, keys.recv)
            self._stream.set_sealer(Sealer(keys.send))
        self._set_spool()
        self._preauth = False
        leftover, self._hs_buf = bytes(self._hs_buf), bytearray()
        if leftover:
            try:
                messages = self._decoder.feed(leftover)
            except ProtocolError as exc:
                self._fail(exc)
                return
            self._deliver(messages)


class _InprocConnection(Connection):
    """One end of :func:`inproc_pair`: frames are handed over, never copied."""

    def __init__(self, loop: asyncio.AbstractEventLoop, limits: Limits | None = None) -> None:
        super().__init__(loop, "inproc", limits)
        self._other = cast(_InprocConnection, None)   # set by inproc_pair
        self._aborted = False

    def send(self, frames: Iterable[Frame]) -> None:
        if self._closing or self._lost:
            raise self._closed_error()
        message: list[Any] = list(frames)   # handed over as they are, not copied
        size = 0
        for frame in message:  # (inline: once per message, a job's on some legs)
            size += len(frame) if type(frame) is bytes else _nbytes(frame)
        self.bytes_sent += size
        self._loop.call_soon(self._other._receive, message, self, size)

    def send_all(self, messages: Sequence[Sequence[Frame]]) -> None:
        for frames in messages:
            self.send(frames)

    def _receive(self, frames: list[Any], sender: _InprocConnection, size: int) -> None:
        if sender._aborted or self._closing or self._lost:
            return
        self.bytes_received += size
        limits = self._limits
        if len(frames) > limits.max_frames:
            self._fail(ProtocolError(f"message declares {len(frames)} frames, "
                                     f"over the limit max_frames={limits.max_frames}"))
            return
        self._deliver((frames,))

    def close(self) -> None:
        if not (self._closing or self._lost):
            self._closing = True
            self._wake_waiters()
            self._loop.call_soon(self._connection_lost, None)
            self._loop.call_soon(self._other._connection_lost, None)

    def abort(self) -> None:
        if not self._lost:
            self._closing = True
            self._aborted = True
            self._wake_waiters()
            self._loop.call_soon(self._connection_lost, None)
            if not self._other._lost:
                self._loop.call_soon(self._other._connection_lost,
                                     ConnectionResetError("inproc peer aborted the connection"))


def inproc_pair(limits: Limits | None = None) -> tuple[Connection, Connection]:
    """Two connected Connections in the running loop, without sockets."""
    loop = asyncio.get_running_loop()
    a, b = _InprocConnection(loop, limits), _InprocConnection(loop, limits)
    a._other, b._other = b, a
    return a, b
