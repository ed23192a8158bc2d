"""One thread's own use of a resting connection's socket.

:meth:`Connection.lend` stops the loop from reading a plain socket stream
and returns a duplicate of its socket; :class:`LentSocket` lets the
borrowing thread write messages on it and read messages from it with the
connection's own framing and record state (``Sealer`` and
``SecureDecoder``: the sequence numbers go on from where the loop left them,
so the peer sees one ordered, authenticated stream; nothing is decoded
before its record's tag is checked).  The borrower is the only one to touch
the connection until :meth:`Connection.take_back`; the byte counters go on
counting (the heartbeat sees the traffic).
"""
from __future__ import annotations

import collections
import select
import socket
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from .frames import Message, encode

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer as Frame

    from .connection import Connection

__all__ = ["LentSocket", "send_all"]


class LentSocket:
    """Write and read ``conn``'s messages on ``sock`` (from ``conn.lend()``)."""

    __slots__ = ("conn", "sock", "_sealer", "_decoder", "_out", "_sends", "_seq")

    def __init__(self, conn: Connection, sock: socket.socket) -> None:
        self.conn, self.sock = conn, sock
        self._sealer = getattr(conn._stream, "_sealer", None)
        self._decoder = conn._decoder
        self._out: bytes | None = None  # the bytes of the send() under way
        self._sends: list[int] | None = None  # what each send(2) took (None: none under way)
        self._seq = 0  # the sealer's next record when that send() began

    def send(self, messages: Sequence[Sequence[Frame]]) -> None:
        """Send these messages in full (blocking while the socket is full;
        the connection's deadline bounds that); OSError if the peer is gone.
        Interrupted (KeyboardInterrupt), :meth:`unsend` says how far it got."""
        sealer = self._sealer
        # (one statement of plain stores: no interrupt can come in between)
        self._out, self._sends, self._seq = None, [], 0 if sealer is None else sealer._seq
        parts: list[Any] = [part for message in messages for part in encode(message)]
        if sealer is not None:
            parts = sealer.seal_all(collections.deque(parts))
        self._out = b"".join(parts)
        self.finish()

    def unsend(self) -> bool | None:
        """After an interrupted :meth:`send`: True if none of its bytes
        went (its records, never sent, are taken back: the next send seals
        with the same numbers, so each still goes on the wire at most once);
        False if some did (:meth:`finish` sends the rest); None if it can't
        tell (the send had not begun, or had ended): the caller must end the
        connection."""
        sends = self._sends
        if sends is None:
            return None
        if sum(sends):
            return False
        if self._sealer is not None:
            self._sealer.rewind(self._seq)
        self._out = self._sends = None
        return True

    def finish(self) -> None:
        """Write what is left of the last :meth:`send`.  Each count goes
        into ``_sends`` inside one C call (list.extend over map), so an
        interrupt between two bytecodes never loses how much was written."""
        out, sends, sock = self._out, self._sends, self.sock
        assert out is not None and sends is not None
        view = memoryview(out)
        waiter = None
        while (done := sum(sends)) < len(out):
            try:
                sends.extend(map(sock.send, (view[done:],)))
            except (BlockingIOError, InterruptedError):
                if waiter is None:
                    waiter = select.poll()
                    waiter.register(sock.fileno(), select.POLLOUT)
                waiter.poll()
        self.conn.bytes_sent += len(out)
        self._out = self._sends = None

    def receive(self) -> list[Message] | None:
        """The messages one read of what is there completes (maybe none);
        None at the end of the stream.  Raises BlockingIOError when nothing
        is there, ProtocolError for a bad record or frame, OSError."""
        decoder = self._decoder
        n = self.sock.recv_into(decoder.get_buffer())
        if not n:
            return None
        self.conn.bytes_received += n
        return decoder.buffer_updated(n)


def send_all(sock: Any, parts: list[Any]) -> None:
    """Write every buffer of ``parts`` to a non-blocking socket."""
    out = None
    while parts:
        try:
            sent = sock.sendmsg(parts)
        except (BlockingIOError, InterruptedError):
            if out is None:
                out = select.poll()
                out.register(sock.fileno(), select.POLLOUT)
            out.poll()
            continue
        while sent:
            size = len(parts[0])
            if sent >= size:
                sent -= size
                parts.pop(0)
            else:
                parts[0] = memoryview(parts[0])[sent:]
                sent = 0
