"""Message protection: the byte stream after the handshake cut into AEAD records.

On a connection without TLS, everything after the handshake (framing
included) travels in records::

    +-----------+----------------------------------+---------+
    | len: <I   | ciphertext (len - 16 bytes)      | tag: 16 |
    +-----------+----------------------------------+---------+

sealed with AES-256-GCM (``cryptography``; OpenSSL with AES-NI does 9 GB/s a
core here, ChaCha20-Poly1305 3.5 GB/s).  Each direction has its own key
(:func:`dpool.transport.auth.derive_keys`) and counts its records from 0; the
count is the nonce, and the length header is the associated data.  A record
that was forged, changed, replayed, reordered or dropped fails its tag, and
the receiver raises :class:`~dpool.errors.ProtocolError` (the connection then
closes with one log line).

A record holds at most ``RECORD_DATA`` bytes of the stream, so a frame of any
size is checked piece by piece as it arrives and nothing waits for a whole
frame before being verified.  The sender seals records lazily, as the socket
takes them (see streams.py), so a large frame is never held twice.  The
receiver decrypts each record straight into the frame decoder's buffer (the
frame's own buffer for large frames).
"""
from __future__ import annotations

import collections
import struct
from typing import TYPE_CHECKING, Any

from dpool.errors import ProtocolError

from .frames import FrameDecoder, Message, feed_buffered

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer

__all__ = ["OVERHEAD", "RECORD_DATA", "RECORD_MAX", "Sealer", "SecureDecoder", "take"]

#: A queue of byte parts (bytes or flat memoryviews) waiting to be sent.
Parts = collections.deque[Any]

RECORD_DATA = 256 * 1024           # stream bytes per record, at most
TAG = 16
_LEN = struct.Struct("<I")
HEAD = _LEN.size
RECORD_MAX = HEAD + RECORD_DATA + TAG
OVERHEAD = HEAD + TAG              # a record's bytes besides its data


def _nonce(seq: int) -> bytes:
    return seq.to_bytes(12, "big")


# cryptography is imported with the first sealed connection, not with dpool:
# a client that only uses its embedded node never needs it, and its ~2,800
# GC-tracked objects would be walked by each full collection of the client.

def _aesgcm(key: bytes) -> Any:
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM
    return AESGCM(key)


def _invalid_tag() -> type[Exception]:
    from cryptography.exceptions import InvalidTag
    return InvalidTag


class Sealer:
    """The sending half: seals stream bytes into records, counting them."""

    __slots__ = ("_aead", "_seq", "key")

    def __init__(self, key: bytes, seq: int = 0) -> None:
        self.key = key       # (kept to hand the stream on: see handoff.py)
        self._aead = _aesgcm(key)
        self._seq = seq

    def seal(self, data: bytes | memoryview) -> list[bytes]:
        """``[header, ciphertext+tag]`` for up to ``RECORD_DATA`` bytes of ``data``."""
        head = _LEN.pack(len(data) + TAG)
        sealed = self._aead.encrypt(_nonce(self._seq), data, head)
        self._seq += 1
        return [head, sealed]

    def seal_into(self, data: bytes | memoryview, out: memoryview) -> int:
        """Seal up to ``RECORD_DATA`` bytes of ``data`` into ``out`` (at
        least ``len(data) + OVERHEAD`` bytes), header included; the record's
        size.  No new buffer per record: a large message sealed into one
        reused buffer does not fault fresh pages in for each record."""
        size = len(data) + TAG
        _LEN.pack_into(out, 0, size)
        self._aead.encrypt_into(_nonce(self._seq), data, out[:HEAD], out[HEAD:HEAD + size])
        self._seq += 1
        return HEAD + size

    @property
    def seq(self) -> int:
        """The number of the next record."""
        return self._seq

    def rewind(self, seq: int) -> None:
        """Take back the records sealed since record ``seq``.  Only for
        records none of whose bytes were sent (an interrupted direct call,
        see lent.py): each nonce still goes on the wire at most once."""
        if not 0 <= seq <= self._seq:
            raise ValueError(f"can't rewind record {self._seq} to {seq}")
        self._seq = seq

    def seal_all(self, parts: Parts) -> list[bytes]:
        """Every byte of ``parts`` (a deque, emptied) as a list of record pieces."""
        out: list[bytes] = []
        while parts:
            out += self.seal(take(parts, RECORD_DATA))
        return out


def take(parts: Parts, limit: int) -> bytes | memoryview:
    """Remove and return up to ``limit`` bytes from the front of the deque
    ``parts`` (bytes or flat memoryviews): a slice of the first part when it
    is big enough, else the first parts joined."""
    first = parts[0]
    size = len(first)
    if size >= limit:
        view = memoryview(first)
        if size == limit:
            parts.popleft()
        else:
            parts[0] = view[limit:]
        return view[:limit]
    pieces: list[bytes | memoryview] = []
    total = 0
    while parts and total < limit:
        piece = parts[0]
        room = limit - total
        if len(piece) <= room:
            parts.popleft()
        else:
            view = memoryview(piece)
            piece, parts[0] = view[:room], view[room:]
        pieces.append(piece)
        total += len(piece)
    return pieces[0] if len(pieces) == 1 else b"".join(pieces)


class SecureDecoder:
    """The receiving half: opens records and hands the stream to ``inner``
    (a :class:`~dpool.transport.frames.FrameDecoder`), with the same
    ``get_buffer`` / ``buffer_updated`` / ``feed`` / ``partial`` interface."""

    def __init__(self, inner: FrameDecoder, key: bytes, seq: int = 0) -> None:
        self._inner = inner
        self.key = key       # (kept to hand the stream on: see handoff.py)
        self._aead = _aesgcm(key)
        self._seq = seq
        self._buf = bytearray(2 * RECORD_MAX)
        self._mv = memoryview(self._buf)
        self._pos = 0
        self._end = 0
        self._plain: memoryview | None = None   # a record that doesn't fit the decoder's room
        self._left: memoryview | None = None    # the rest of it, held back (see _feed)
        self._failed: ProtocolError | None = None

    @property
    def inner(self) -> FrameDecoder:
        return self._inner

    @property
    def partial(self) -> bool:
        return self._pos != self._end or self._left is not None or self._inner.partial

    @property
    def seq(self) -> int:
        """The number of the next record to open."""
        return self._seq

    @property
    def held(self) -> int:
        return self._inner.held

    def get_buffer(self) -> memoryview:
        pos, end = self._pos, self._end
        if pos == end:
            self._pos = self._end = 0
        elif len(self._buf) - end < RECORD_MAX:
            keep = end - pos      # part of one record: move it to the front
            self._mv[:keep] = self._mv[pos:end]
            self._pos, self._end = 0, keep
        return self._mv[self._end:]

    def buffer_updated(self, nbytes: int) -> list[Message]:
        if self._failed is not None:
            raise self._failed
        self._end += nbytes
        try:
            return self._open_records()
        except ProtocolError as exc:
            self._failed = exc
            self._inner.discard()
            raise

    def feed(self, data: ReadableBuffer) -> list[Message]:
        return feed_buffered(self, data)

    def discard(self) -> None:
        self._inner.discard()

    def _open_records(self) -> list[Message]:
        out: list[Message] = []
        if self._left is not None:   # (the rest of a record, held back: see _feed)
            out += self._feed(self._left, False)
            if self._left is not None:
                return out
        mv, pos, end = self._mv, self._pos, self._end
        try:
            while end - pos >= HEAD:
                size = _LEN.unpack_from(mv, pos)[0]
                if not TAG <= size <= RECORD_DATA + TAG:
                    raise ProtocolError(f"record of {size} bytes is outside "
                                        f"{TAG}..{RECORD_DATA + TAG}: not a dpool record")
                if end - pos < HEAD + size:
                    break
                out += self._open(mv[pos:pos + HEAD], mv[pos + HEAD:pos + HEAD + size],
                                  bool(out))
                pos += HEAD + size
                if out and self._inner.tap_waits:
                    # (the inner decoder's tap is asked once they are taken,
                    # those of earlier records too; the records left are
                    # opened at the next read: a record was taken, so the
                    # buffer has room for it)
                    break
        finally:
            self._pos = pos
        return out

    def _open(self, head: memoryview, sealed: memoryview, pending: bool) -> list[Message]:
        nonce, seq = _nonce(self._seq), self._seq
        self._seq += 1
        inner = self._inner
        size = len(sealed) - TAG
        dst = inner.get_buffer()
        direct = len(dst) >= size
        if not direct:    # (the record ends past the room the decoder has)
            if self._plain is None:
                self._plain = memoryview(bytearray(RECORD_DATA))
            dst = self._plain
        try:
            self._aead.decrypt_into(nonce, sealed, head, dst[:size])
        except _invalid_tag():
            raise ProtocolError(f"record {seq} failed authentication (forged, changed, "
                                f"replayed, reordered or dropped data)") from None
        if not direct:
            return self._feed(dst[:size], pending)
        inner.pending = pending   # (messages of earlier records not returned yet)
        try:
            return inner.buffer_updated(size)
        finally:
            inner.pending = False

    def _feed(self, plain: memoryview, pending: bool) -> list[Message]:
        """Feed a record's bytes to the inner decoder in pieces (they don't
        fit its room).  A piece may complete messages before a large frame
        the inner decoder's tap is to be asked about: the rest waits
        (``_left``), to be fed at the next read, once they are returned.  (A
        frame the tap takes is at least frames.MIN_TAP bytes, more than the
        buffers hold: more of it is still to be read.)"""
        inner = self._inner
        out: list[Message] = []
        self._left = None
        try:
            while len(plain):
                inner.pending = pending or bool(out)
                dst = inner.get_buffer()
                k = min(len(dst), len(plain))
                dst[:k] = plain[:k]
                plain = plain[k:]
                out += inner.buffer_updated(k)
                if inner.tap_waits and len(plain):
                    self._left = plain
                    break
        finally:
            inner.pending = False
        return out
