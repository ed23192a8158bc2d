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

    __slots__ = ("conn", "sock", "_sealer", "_decoder", "_out", "_sends", "_seq", "sends")

    def __init__(self, conn: Connection, sock: socket.socket) -> None:
        self.conn, self.sock = conn, sock
        self._sealer = getattr(conn._stream, "_sealer", None)
        self._decoder = conn._decoder
        # The last send(): its wire bytes (None: not made yet, or sent and
        # counted), what each send(2) of them took, and the sealer's next
        # record when it began; ``sends``: how many send() calls began.
        self._out: bytes | None = None
        self._sends: list[int] = []
        self._seq = 0
        self.sends = 0

    def send(self, messages: Sequence[Sequence[Frame]]) -> None:
        """Send these messages in full (blocking while the socket is full;
        the connection's deadline bounds that); OSError if the peer is gone.
        Interrupted (KeyboardInterrupt), :meth:`outcome` says how far it got."""
        sealer = self._sealer
        # (one statement of plain stores: no interrupt can come in between)
        self._out, self._sends, self._seq, self.sends = \
            None, [], 0 if sealer is None else sealer._seq, self.sends + 1
        parts: list[Any] = [part for message in messages for part in encode(message)]
        if sealer is not None:
            parts = sealer.seal_all(collections.deque(parts))
        self._out = b"".join(parts)
        self.finish()

    def outcome(self, begun: int) -> tuple[bool, memoryview | None]:
        """After an interrupted :meth:`send` (``begun``: :attr:`sends` read
        before it was called): ``(False, None)`` if none of its bytes went
        (its records, never sent, are taken back: the next send seals with
        the same numbers, so each still goes on the wire at most once);
        ``(True, rest)`` if it went: in full (``rest`` None) or in part
        (``rest``: its bytes still to write, before anything else)."""
        out, sends = self._out, self._sends
        done = sum(sends)
        if self.sends == begun or not done:  # (not begun, or nothing written yet)
            if self.sends != begun and self._sealer is not None:
                self._sealer.rewind(self._seq)
            self._out, self._sends = None, []
            return False, None
        if out is None:  # sent and counted
            return True, None
        self._out = None
        self.conn.bytes_sent += done
        return True, memoryview(out)[done:] if done < len(out) else None

    def finish(self) -> None:
        """Write what is left of the last :meth:`send`.  Each count goes
        into ``_sends`` inside one C call (list.extend over map), so an
        interrupt between two bytecodes never loses how much was written."""
        out, sends, sock = self._out, self._sends, self.sock
        assert out is not None
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
        # (one statement: sent and counted, or neither)
        self.conn.bytes_sent, self._out = self.conn.bytes_sent + len(out), None

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
