"""Handing an authenticated connection on to another process.

A node gives a client's second connection (its *channel*, see
docs/performance.md "Round trips via a node: taking the node off the
path") to one of its workers: the socket goes by ``SCM_RIGHTS`` and the
record state (each direction's key and next sequence number) as
:class:`RecordState`'s fixed 80 bytes on the same trusted socketpair.  The
worker then reads and writes the connection itself with a
:class:`~dpool.transport.blocking.BlockingConnection` made with
``records=``: the sequence numbers go on from where the node left them, so
the client sees one ordered, authenticated stream, and every record's tag
is checked before a byte of it is decoded.  The node never touches that
record stream again (no nonce is ever used twice under a key).
"""
from __future__ import annotations

import socket
import struct
from typing import TYPE_CHECKING, NamedTuple

from dpool.errors import ProtocolError

from .records import Sealer, SecureDecoder

if TYPE_CHECKING:
    from .connection import Connection

__all__ = ["RecordState", "hand_off", "sealed"]

_STATE = struct.Struct("<32sQ32sQ")


class RecordState(NamedTuple):
    """Where a sealed connection's two record streams are."""

    send_key: bytes
    send_seq: int     # the number of the next record to seal
    recv_key: bytes
    recv_seq: int     # the number of the next record to open

    def pack(self) -> bytes:
        return _STATE.pack(*self)

    @classmethod
    def unpack(cls, data: bytes | bytearray | memoryview) -> RecordState:
        if len(data) != _STATE.size:
            raise ProtocolError(f"record state of {len(data)} bytes, not {_STATE.size}")
        return cls(*_STATE.unpack(data))


def sealed(conn: Connection) -> bool:
    """Whether ``conn`` travels in this module's sealed records (not TLS):
    only such a connection can ever be handed on."""
    return isinstance(getattr(conn._stream, "_sealer", None), Sealer) \
        and isinstance(conn._decoder, SecureDecoder)


def hand_off(conn: Connection) -> tuple[socket.socket, RecordState] | None:
    """Take ``conn``'s socket and record state out of it and close it here
    (nothing more is read or written on it by this process): for another
    process to go on with the connection.  None, and ``conn`` left as it
    was, when that can't be done now: not an idle plain socket stream with
    sealed records (TLS, or something sent or received in part), or
    messages read with the one being handled wait behind it."""
    sealer = getattr(conn._stream, "_sealer", None)
    decoder = conn._decoder
    if not isinstance(sealer, Sealer) or not isinstance(decoder, SecureDecoder) \
            or conn.mid_read:
        return None
    sock = conn.lend()
    if sock is None:
        return None
    state = RecordState(sealer.key, sealer.seq, decoder.key, decoder.seq)
    conn.close()
    return sock, state
