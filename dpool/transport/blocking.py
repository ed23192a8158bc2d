"""A blocking Connection for worker processes (no asyncio, fast to start).

Same wire format as the asyncio side.  ``send`` writes the header and frames
with one ``sendmsg`` (small messages: one ``sendall`` of a joined buffer);
``recv`` reads with ``recv_into`` into the decoder's buffers, so large frames
land directly in their own ``bytearray``, and one read may yield several
queued messages.  No authentication: use it on trusted links (a socketpair to
the node).  With ``fds=True`` it also takes the descriptors of frames in
memory files that come with the messages (``SCM_RIGHTS``, see spool.py).
With ``records=`` (a handoff.RecordState) it goes on with a sealed
connection another process authenticated (a client's channel handed to a
worker): every byte in and out travels in AEAD records (records.py), and a
record is opened, its tag checked, before any of it is decoded.
"""
from __future__ import annotations

import array
import collections
import math
import os
import select
import socket
import time
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, cast

from dpool.errors import ConnectionClosed, ProtocolError

from .frames import IOV_MAX, FrameDecoder, Limits, Message, encode, in_stream
from .records import RECORD_DATA, RECORD_MAX, Sealer, SecureDecoder, take

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer as Frame

    from .handoff import RecordState

__all__ = ["BlockingConnection"]

#: Records sealed at most before they are sent (a sealed stream's send).
_SEALED_BATCH = 8

#: Room for the descriptors one read may bring (253: SCM_MAX_FD, the most
#: one sendmsg carries).
_ANCILLARY = socket.CMSG_SPACE(253 * array.array("i").itemsize)
# (plain ints: an enum's | and & cost more than the rest of a small read)
_CMSG_CLOEXEC = int(getattr(socket, "MSG_CMSG_CLOEXEC", 0))
_MSG_CTRUNC = int(socket.MSG_CTRUNC)
_DONTWAIT = int(socket.MSG_DONTWAIT)
_SCM_RIGHTS = (socket.SOL_SOCKET, int(socket.SCM_RIGHTS))


def sendmsg_all(sock: socket.socket, parts: Iterable[bytes | memoryview]) -> None:
    """Send every byte of the buffers ``parts`` (bytes or flat memoryviews)."""
    parts = list(parts)
    i = 0
    while i < len(parts):
        sent = sock.sendmsg(parts[i:i + IOV_MAX])
        while sent:
            size = len(parts[i])
            if sent >= size:
                sent -= size
                i += 1
            else:
                parts[i] = memoryview(parts[i])[sent:]
                sent = 0


class BlockingConnection:
    """Blocking message connection over a connected stream socket.

    ``send(frames)``, ``recv() -> list of frames`` (raises ConnectionClosed
    at end of stream, ProtocolError on a framing error), ``poll(timeout)``
    (True once a whole message can be received without blocking), ``close()``,
    ``fileno()``.  Not thread-safe: one sender thread and one receiver thread
    at most.
    """

    def __init__(self, sock: socket.socket, limits: Limits | None = None, *,
                 fds: bool = False, records: RecordState | None = None) -> None:
        sock.setblocking(True)
        self._sock = sock
        self._fds: collections.deque[int] | None = collections.deque() if fds else None
        self._decoder: FrameDecoder | SecureDecoder = FrameDecoder(
            limits, files=self._next_fd if fds else None)
        self._sealer: Sealer | None = None
        self._sealed: memoryview | None = None  # records sealed, to send (see _send_sealed)
        if records is not None:
            self._decoder = SecureDecoder(self._decoder, records.recv_key, records.recv_seq)
            self._sealer = Sealer(records.send_key, records.send_seq)
        self._messages: collections.deque[Message] = collections.deque()
        self._eof = False
        self._poller: select.poll | None = None
        self._found = False  # take_in's last look found bytes (see take_in)

    def fileno(self) -> int:
        return self._sock.fileno()

    @property
    def closed(self) -> bool:
        return self._sock.fileno() < 0

    def close(self) -> None:
        self._sock.close()
        while self._fds:
            os.close(self._fds.popleft())

    def take_fd(self) -> int:
        """A descriptor that came with a message that has no frame in a
        memory file (a client's channel, handed to a worker), ours to close."""
        return self._next_fd()

    def _next_fd(self) -> int:
        """The descriptor of the next frame in a memory file (ours to close)."""
        if not self._fds:
            raise ProtocolError("a frame in a memory file came without its descriptor")
        return self._fds.popleft()

    def _recv_fds(self, buf: memoryview, flags: int) -> int:
        """``recv_into``, keeping the descriptors that come with the bytes."""
        # (close-on-exec from the start: a descriptor may wait here while the
        # job before its message runs, and a process that job starts must not
        # inherit it)
        n, ancdata, msg_flags, _ = self._sock.recvmsg_into(
            [buf], _ANCILLARY, flags | _CMSG_CLOEXEC)
        assert self._fds is not None
        for level, kind, data in ancdata:
            if (level, kind) == _SCM_RIGHTS:
                fds = array.array("i")
                fds.frombytes(data[:len(data) - len(data) % fds.itemsize])
                self._fds.extend(fds)
        if msg_flags & _MSG_CTRUNC:
            raise ProtocolError("more descriptors than a message carries")
        return n

    def send(self, frames: Sequence[Frame]) -> None:
        parts: Sequence[bytes | memoryview] = in_stream(encode(frames))
        try:
            if self._sealer is not None:
                self._send_sealed(collections.deque(parts))
            elif len(parts) == 1:
                self._sock.sendall(parts[0])
            else:
                sendmsg_all(self._sock, parts)
        except OSError as exc:
            if self._sock.fileno() < 0 or isinstance(exc, (BrokenPipeError, ConnectionError)):
                raise ConnectionClosed(f"connection is closed: {exc}") from exc
            raise

    def _send_sealed(self, parts: collections.deque[bytes | memoryview]) -> None:
        """Seal and send ``parts`` a few records at a time (a large
        message is not sealed whole first: no second copy of it), each
        batch into the same buffer (``sendall`` has copied it to the kernel
        before it is reused: no fresh pages per record)."""
        sealer = cast("Sealer", self._sealer)
        out = self._sealed
        if out is None:
            out = self._sealed = memoryview(bytearray(_SEALED_BATCH * RECORD_MAX))
        while parts:
            end = 0
            while parts and len(out) - end >= RECORD_MAX:
                end += sealer.seal_into(take(parts, RECORD_DATA), out[end:])
            self._sock.sendall(out[:end])

    @property
    def has_data(self) -> bool:
        """True if a whole received message is waiting."""
        return bool(self._messages)

    def take_in(self) -> bool:
        """Read what has arrived, without blocking: True if a whole message
        waits (or the end: ``recv`` then raises).  When the last look found
        bytes, one non-blocking read (they tend to keep coming: a burst of
        jobs, a worker's next job sent while it ran one); else one ``poll``
        (cheaper than a read that fails), and the read only if it says so."""
        if self._messages or self._eof:
            return True
        if self._found:
            self._found = self._read(_DONTWAIT)
        else:
            poller = self._poller
            if poller is None:
                poller = self._poller = select.poll()
                poller.register(self._sock.fileno(), select.POLLIN)
            if poller.poll(0):
                self._found = self._read(_DONTWAIT)
        return bool(self._messages) or self._eof

    def recv(self) -> Message:
        messages = self._messages
        while not messages:
            self._read(0)
        return messages.popleft()

    def poll(self, timeout: float | None = 0.0) -> bool:
        """Wait up to ``timeout`` seconds (None: forever) for a whole message."""
        if self._messages:
            return True
        if self._eof:
            return True      # recv() will raise ConnectionClosed at once
        poller = self._poller
        if poller is None:
            poller = self._poller = select.poll()
            poller.register(self._sock.fileno(), select.POLLIN)
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._messages and not self._eof:
            if deadline is None:
                ms = None
            else:
                left = deadline - time.monotonic()
                if left < 0:
                    return False
                ms = math.ceil(left * 1000)
            if poller.poll(ms):
                self._read(_DONTWAIT)
        return True

    def _read(self, flags: int) -> bool:
        """Read once (``flags``: 0 to block, _DONTWAIT not to): False if
        nothing had come (a read that would block)."""
        decoder = self._decoder
        if self._eof:
            if decoder.partial:     # (the end was seen by poll())
                raise ConnectionClosed("connection closed by peer in the middle of a message")
            raise ConnectionClosed("connection closed by peer")
        buf = decoder.get_buffer()
        try:
            if self._fds is not None:
                n = self._recv_fds(buf, flags)
            else:
                n = self._sock.recv_into(buf, len(buf), flags)
        except BlockingIOError:
            return False
        except ConnectionResetError as exc:
            self._eof = True
            raise ConnectionClosed(f"connection reset by peer: {exc}") from exc
        if not n:
            self._eof = True
            if flags:
                return True
            if decoder.partial:
                raise ConnectionClosed("connection closed by peer in the middle of a message")
            raise ConnectionClosed("connection closed by peer")
        try:
            self._messages.extend(decoder.buffer_updated(n))
        except ProtocolError:
            self._eof = True
            raise
        return True
