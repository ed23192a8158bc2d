"""Framing without I/O: how a message of frames is laid out on the wire.

One message on the wire::

    +---------+-----------+-----+-----------+---------+-----+---------+
    | n: <I   | len0: <Q  | ... | lenN-1:<Q | frame 0 | ... | frame N-1
    +---------+-----------+-----+-----------+---------+-----+---------+

A frame is any C-contiguous bytes-like object (``bytes``, ``bytearray``,
``memoryview``, a ``PickleBuffer``'s memoryview...).  Nothing here looks inside
a frame.  The top bit of a length (``BYTES_FLAG``) says that the frame is a
whole ``bytes`` object on the sender's side (set for frames of at least
``COALESCE`` bytes): the receiver then rebuilds it as a ``bytes`` object in
place (inplace.py), so that turning it back into the user's ``bytes`` costs
no copy.  ``FILE_FLAG`` says that the frame's bytes are not in the stream but
in a memory file whose descriptor came with the message (``SCM_RIGHTS``), and
``CONSUME_FLAG`` that the receiver may free the file's pages as it reads
them: only between a node and its workers, see spool.py; a decoder that was
given no source of descriptors refuses such frames.

Sending: :func:`encode` returns the header plus the frames as a list ready for
a scatter-gather write; small pieces are joined (cheap, fewer iovecs), large
frames are passed by reference and never copied.

Receiving: :class:`FrameDecoder` is a pure incremental decoder.  It follows
the ``asyncio.BufferedProtocol`` pattern: :meth:`FrameDecoder.get_buffer`
hands out the memory the next bytes should be read into and
:meth:`FrameDecoder.buffer_updated` consumes them.  Headers and small frames
go through one reusable receive buffer; a frame (or a header) of at least
``LARGE`` bytes gets its own ``bytearray``, which grows as its bytes arrive
(the socket reads into the reusable buffer, each read is appended; a ``bytes``
frame grows the same way as a ``bytes`` object, see inplace.py): nothing
is ever allocated from a declared length, so a peer that declares a huge
frame costs only the bytes it really sends.  (Appending costs one copy from
a cache-hot buffer; the alternative, a zero-filled buffer of the declared
size, costs a pass over all of it up front.)  ``held`` counts the bytes of
the message being received, for a receive budget.  Every declared count and
length is checked against :class:`Limits` first.
"""
from __future__ import annotations

import functools
import os
import struct
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from dpool.errors import ProtocolError
from dpool.records import Record

from . import inplace, spool

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer as Frame  # bytes, bytearray, memoryview, ...

__all__ = ["Limits", "header", "encode", "FrameDecoder", "LARGE", "Message"]

#: Frames (and headers) at least this big are received into their own buffer.
LARGE = 64 * 1024
#: Frames smaller than this are joined with their neighbours when sending.
COALESCE = 32 * 1024
RECV_BUFFER_SIZE = 256 * 1024
#: Bytes read at most at once into a large frame's own object, or into a
#: relay's buffer (a frame a tap passes on as it arrives), once the frame has
#: 8 times that much: fewer reads, each a turn of the event loop and a pass
#: through the decoder, than the receive buffer's size allows.
LARGE_READ = 1 << 20

#: A received message: its frames (``bytes``, ``bytearray`` for large ones
#: that were not a whole ``bytes`` object on the sender's side).
Message = list[bytes | bytearray]
#: Set in a frame's length word when the frame is a whole ``bytes`` object.
BYTES_FLAG = 1 << 63
#: Set when the frame's bytes are in a memory file passed with the message.
FILE_FLAG = 1 << 62
#: With FILE_FLAG: the receiver may free the file's pages as it reads them.
CONSUME_FLAG = 1 << 61
#: The frame's bytes come in chunks, each after a word of its length, until
#: a word says the frame ended (``CHUNK_END``) or that the message was
#: abandoned (``CHUNK_ABORT``): a frame relayed as it arrives (forward.py).
STREAM_FLAG = 1 << 60
_FLAGS = BYTES_FLAG | FILE_FLAG | CONSUME_FLAG | STREAM_FLAG
_LENGTH_MASK = STREAM_FLAG - 1
#: In a streamed frame: a chunk's length word (< ``CHUNK_END``; 0 is an empty
#: chunk, which only shows the sender is alive), or one of these two.
CHUNK = struct.Struct("<Q")
CHUNK_END = 1 << 63
CHUNK_ABORT = 1 << 62


class Relayed:
    """In a message received with a :attr:`FrameDecoder.tap`: a frame that
    went to the tap instead of being held (its size)."""

    __slots__ = ("size",)

    def __init__(self, size: int) -> None:
        self.size = size


class Tap(Protocol):
    """Where a tapped message's frames go as their bytes arrive (forward.Forward)."""

    def data(self, view: memoryview) -> None: ...
    def frame_end(self, last: bool) -> None: ...
    def abort(self) -> None: ...


#: ``tap(frames_so_far, lengths, flags)``, asked when a message's first frame
#: of at least ``MIN_TAP`` bytes begins: a Tap to take the rest of the
#: message, or None (the message is received as usual).  Not asked while
#: messages completed before it in the same read wait to be returned (the
#: tap's owner would pass this one on before having seen them): those are
#: returned first, and the tap is asked when the next bytes come (the
#: frame's first bytes wait in the receive buffer meanwhile).
TapHook = Callable[[list[Any], tuple[int, ...], tuple[int, ...] | None], "Tap | None"]
#: Frames at least this big may be tapped.
MIN_TAP = 1 << 20

#: What a large item is received into.
Big = bytearray | inplace.GrowingBytes | spool.SpoolFile

_COUNT = struct.Struct("<I")
_unpack_count = _COUNT.unpack_from


class Limits(Record):
    """Upper bounds on what a peer may declare; checked before allocating."""

    _fields = ("max_frames", "max_frame_bytes", "max_message_bytes")

    def __init__(self, max_frames: int = 65536, max_frame_bytes: int = 4 * 2**30,
                 max_message_bytes: int = 8 * 2**30) -> None:
        self.max_frames = max_frames
        self.max_frame_bytes = max_frame_bytes
        self.max_message_bytes = max_message_bytes


@functools.lru_cache(maxsize=256)
def _lengths_struct(n: int) -> struct.Struct:
    return struct.Struct(f"<{n}Q")


@functools.lru_cache(maxsize=256)
def _header_struct(n: int) -> struct.Struct:
    return struct.Struct(f"<I{n}Q")


def _nbytes(frame: Any) -> int:
    if type(frame) is bytes or type(frame) is spool.SpooledFrame:
        return len(frame)
    return memoryview(frame).nbytes


def total_bytes(frames: Sequence[Any]) -> int:
    """The bytes a message's frames hold (a lone pickle: no generator)."""
    if len(frames) == 1 and type(frames[0]) is bytes:
        return len(frames[0])
    return sum(memoryview(frame).nbytes for frame in frames)


def _is_whole_bytes(frame: Frame) -> bool:
    if type(frame) is bytes:
        return True
    return (type(frame) is memoryview and type(frame.obj) is bytes
            and frame.nbytes == len(frame.obj))


def _length_word(frame: Any, size: int) -> int:
    """``size``, flagged when a large frame is a whole ``bytes`` object, or
    is in a memory file."""
    if type(frame) is spool.SpooledFrame:
        return (size | FILE_FLAG | (CONSUME_FLAG if frame.consume else 0)
                | (BYTES_FLAG if frame.whole_bytes else 0))
    return size | BYTES_FLAG if size >= COALESCE and _is_whole_bytes(frame) else size


def header(frames: Sequence[Frame]) -> bytes:
    """The wire header (frame count, then each frame's length) for ``frames``."""
    n = len(frames)
    return _header_struct(n).pack(n, *[_length_word(f, _nbytes(f)) for f in frames])


def _as_bytes_view(frame: Frame) -> memoryview:
    """A flat byte view of ``frame`` (slicing it counts bytes)."""
    view = memoryview(frame)
    if view.format != "B" or view.ndim != 1:
        view = view.cast("B")
    return view


class Descriptor:
    """A descriptor that goes with a message by itself (no frame of the
    message is in it: a socket handed to a worker, see handoff.py)."""

    __slots__ = ("fd",)

    def __init__(self, fd: int) -> None:
        self.fd = fd


class FdMarker:
    """In :func:`encode`'s list, first: the memory files of the message's
    spooled frames, whose descriptors go with the bytes that follow (no
    bytes of its own)."""

    __slots__ = ("frames",)

    def __init__(self, frames: Sequence[spool.SpooledFrame | Descriptor]) -> None:
        self.frames = frames

    def __len__(self) -> int:
        return 0

    def fds(self) -> list[int]:
        return [frame.fd for frame in self.frames]


#: What :func:`encode` returns a list of.
Part = bytes | memoryview | FdMarker


def in_stream(parts: list[Part]) -> list[bytes | memoryview]:
    """``parts`` for a stream that passes no descriptors (TypeError if they
    hold frames in memory files)."""
    if parts and type(parts[0]) is FdMarker:
        raise TypeError("frames in memory files go only over a Unix socket")
    return parts  # type: ignore[return-value]


def encode(frames: Sequence[Any]) -> list[Part]:
    """Header and frames as a list of buffers for one scatter-gather write.

    Runs of small frames are joined together with the header; frames of at
    least ``COALESCE`` bytes are returned as flat memoryviews of the caller's
    objects (no copy).  Empty pieces are left out.  Spooled frames (memory
    files, see spool.py) have no bytes in the stream: an :class:`FdMarker`
    heads the list then, for a stream that passes descriptors.
    """
    n = len(frames)
    # (len inline for bytes, most frames: encode runs once per message)
    lengths = [len(f) if type(f) is bytes else _nbytes(f) for f in frames]
    if sum(lengths) < COALESCE:
        head = _header_struct(n).pack(n, *lengths)
        return [b"".join([head, *frames])] if n else [head]
    head = _header_struct(n).pack(n, *map(_length_word, frames, lengths))
    parts: list[Part] = []
    run: list[Frame] = [head]
    spooled: list[spool.SpooledFrame] = []
    for frame, size in zip(frames, lengths):
        if size < COALESCE:
            if size:
                run.append(frame)
            continue
        if type(frame) is spool.SpooledFrame:
            spooled.append(frame)
            continue
        if run:
            parts.append(b"".join(run))
            run = []
        parts.append(_as_bytes_view(frame))
    if run:
        parts.append(b"".join(run))
    if spooled:
        parts.insert(0, FdMarker(spooled))
    return parts


class BufferedDecoder(Protocol):
    """What :func:`feed_buffered` drives (FrameDecoder, records.SecureDecoder)."""

    def get_buffer(self) -> memoryview: ...
    def buffer_updated(self, nbytes: int) -> list[Message]: ...


def feed_buffered(decoder: BufferedDecoder, data: Frame) -> list[Message]:
    """Copy ``data`` through ``decoder.get_buffer()``/``buffer_updated()``
    (any decoder with that interface); return the messages it completed."""
    src = _as_bytes_view(data)
    out: list[Message] = []
    while len(src):
        dst = decoder.get_buffer()
        k = min(len(dst), len(src))
        dst[:k] = src[:k]
        src = src[k:]
        out += decoder.buffer_updated(k)
    return out


class FrameDecoder:
    """Incremental decoder of a stream of messages.

    Either call :meth:`feed` with arbitrary chunks of the stream, or drive it
    like a ``BufferedProtocol``: read into ``get_buffer()``, then report the
    count with ``buffer_updated(n)``.  Both return the list of messages
    completed so far; a message is a list of frames (``bytes`` for small
    frames, ``bytearray`` for large ones).  Any violation raises
    :class:`~dpool.errors.ProtocolError`, after which the decoder stays
    failed.
    """

    def __init__(self, limits: Limits | None = None, *,
                 buffer_size: int = RECV_BUFFER_SIZE, large: int = LARGE,
                 files: Callable[[], int] | None = None) -> None:
        if buffer_size < 2 * large:
            raise ValueError("buffer_size must be at least twice `large`")
        self.limits = limits or Limits()
        # Where the descriptors of frames in memory files come from (FILE_FLAG;
        # None: such frames are refused), and what such a frame is read through.
        self._files = files
        self._scratch: memoryview | None = None
        #: ``spool(frame0) -> bool``: whether the large frames of a message
        #: whose first frame is ``frame0`` go into memory files (spool.py).
        self.spool: Callable[[bytes | bytearray], bool] | None = None
        self._spooling: bool | None = None    # that answer, for the current message
        #: ``tap(...)``: see TapHook; a message it takes is relayed, not held.
        self.tap: TapHook | None = None
        self._tapping: Tap | None = None   # the tap of the current message
        self._tap_left = -1    # bytes of the current frame still to tap; -1: not begun
        self._tapped = 0       # bytes of the current message tapped so far
        self._relay: memoryview | None = None   # see _relay_room
        self._into_relay = False    # the last get_buffer() was _relay_room's
        self._sbig: Big | None = None   # a streamed frame (STREAM_FLAG) being received
        self._chunk = 0        # bytes of its current chunk still to come
        self._large = large
        self._buf = bytearray(buffer_size)
        self._mv = memoryview(self._buf)
        self._pos = 0          # first unconsumed byte in _buf
        self._end = 0          # end of received bytes in _buf
        self._count = -1       # frames in the current message; -1: reading count
        self._lengths: tuple[int, ...] | None = None  # the current message's frame lengths
        self._frames: list[bytes | bytearray] | None = None  # its frames decoded so far
        self._big: Big | None = None  # growing as its bytes arrive
        self._flags: tuple[int, ...] | None = None  # flag bits per frame, or None: none set
        self._address = 0       # of _buf's data (for GrowingBytes), when used
        self._address_holder: object = None
        self._big_size = 0     # the size it will have
        self._held = 0         # bytes of the current message held in frames
        self._failed: ProtocolError | None = None

    @property
    def partial(self) -> bool:
        """True when part of a message has been received but not all of it."""
        return self._count >= 0 or self._pos != self._end

    @property
    def held(self) -> int:
        """Bytes of the message being received that are held in memory."""
        held = self._held + (len(self._big) if self._big is not None else 0)
        return held + len(self._sbig) if self._sbig is not None else held

    def get_buffer(self) -> memoryview:
        """Writable memory for the next bytes of the stream (never empty)."""
        big = self._big
        if big is not None:   # (then nothing is pending in _buf)
            if type(big) is inplace.GrowingBytes:
                return self._room(big, self._read_size(len(big)))
            return self._mv[:min(len(self._buf), self._big_size - len(big))]
        big = self._sbig
        if big is not None and self._chunk and self._pos == self._end \
                and type(big) is inplace.GrowingBytes:
            return self._room(big, min(self._read_size(len(big)), self._chunk))
        pos, end = self._pos, self._end
        if pos == end:
            self._pos = self._end = 0
            if self._tap_left > 0 and self._tapping is not None:
                return self._relay_room()
            return self._mv
        if len(self._buf) - end < self._large:
            # What is left is part of one item smaller than `large`.
            keep = end - pos
            self._mv[:keep] = self._mv[pos:end]
            self._pos, self._end = 0, keep
        return self._mv[self._end:]

    def _read_size(self, have: int) -> int:
        """How much to read at once into a frame that has ``have`` bytes."""
        return max(len(self._buf), min(LARGE_READ, have >> 3))

    def _relay_room(self) -> memoryview:
        """Where the next bytes of a frame being tapped are read (nothing
        else is pending): a buffer of its own, up to LARGE_READ bytes once
        8 times that much has been relayed, handed to the tap as is."""
        size = self._read_size(self._tapped)
        if size < LARGE_READ:   # (not 8 times LARGE_READ yet: no buffer of half the bytes)
            return self._mv
        if self._relay is None:
            self._relay = memoryview(bytearray(LARGE_READ))
        self._into_relay = True
        return self._relay[:min(size, self._tap_left)]

    def buffer_updated(self, nbytes: int) -> list[Message]:
        """Consume ``nbytes`` just written into the last ``get_buffer()``."""
        if self._failed is not None:
            raise self._failed
        try:
            if self._into_relay:
                return self._relayed(nbytes)
            big = self._big
            if big is not None:
                if type(big) is inplace.GrowingBytes:
                    big.advance(nbytes)
                else:
                    self._append(big, 0, nbytes)
                if len(big) < self._big_size:
                    return []
                self._finish_big()
            elif self._chunk and self._pos == self._end \
                    and type(self._sbig) is inplace.GrowingBytes:
                self._sbig.advance(nbytes)     # (into the room get_buffer gave)
                self._chunk -= nbytes
            else:
                self._end += nbytes
            return self._parse()
        except ProtocolError as exc:
            self._failed = exc
            self.discard()
            raise
        except MemoryError as exc:
            # The bytes just read are lost with the frame: the stream can't go on.
            raise self._out_of_memory(exc) from exc

    def _relayed(self, nbytes: int) -> list[Message]:
        """``nbytes`` were read into :meth:`_relay_room`'s buffer: to the tap."""
        self._into_relay = False
        if self._tapping is None or self._relay is None:   # (discarded meanwhile)
            return []
        self._tapping.data(self._relay[:nbytes])
        self._tap_left -= nbytes
        self._tapped += nbytes
        # (the frame's end, tap.frame_end, comes from _parse's _tap_frame)
        return self._parse() if not self._tap_left else []

    def _out_of_memory(self, exc: MemoryError) -> ProtocolError:
        failed = self._failed = ProtocolError(f"out of memory receiving a message "
                                              f"({self.held} bytes of it held)")
        failed.__cause__ = exc.with_traceback(None)   # (its frames would hold the frame's memory)
        self.discard()
        return failed

    def _room(self, big: inplace.GrowingBytes, limit: int) -> memoryview:
        """The next bytes of ``big``'s frame go straight into it; out of
        memory, into the reusable buffer, and the decoder fails (when they
        are reported: get_buffer raises nothing)."""
        try:
            return big.room(limit)
        except MemoryError as exc:
            self._out_of_memory(exc)
            return self._mv

    def discard(self) -> None:
        """Drop the part of a message received so far (the stream failed):
        its memory, or its memory file, is freed now, not when a reference
        cycle through the error's traceback is collected."""
        self._big = self._sbig = None
        self._frames = None
        self._chunk, self._tap_left, self._tapped = 0, -1, 0
        self._relay, self._into_relay = None, False
        tap, self._tapping = self._tapping, None
        if tap is not None:
            tap.abort()

    def feed(self, data: Frame) -> list[Message]:
        """Consume a chunk of the stream; return the messages it completed."""
        return feed_buffered(self, data)

    # -- internals -----------------------------------------------------------

    def _set_count(self, count: int) -> None:
        limit = self.limits.max_frames
        if count > limit:
            raise ProtocolError(
                f"message declares {count} frames, over the limit max_frames={limit}")
        self._count = count

    def _set_lengths(self, lengths: tuple[int, ...]) -> None:
        limits = self.limits
        biggest = max(lengths)
        self._flags = self._spooling = None
        if biggest > _LENGTH_MASK:
            flags = self._flags = tuple(x & _FLAGS for x in lengths)
            lengths = tuple(x & _LENGTH_MASK for x in lengths)
            biggest = max(lengths)
            if self._files is None and any(x & FILE_FLAG for x in flags):
                raise ProtocolError("a frame in a memory file, on a link that takes none")
        if biggest > limits.max_frame_bytes:
            raise ProtocolError(
                f"frame length {biggest} bytes is over the limit "
                f"max_frame_bytes={limits.max_frame_bytes}")
        total = sum(lengths)
        if total > limits.max_message_bytes:
            raise ProtocolError(
                f"message length {total} bytes is over the limit "
                f"max_message_bytes={limits.max_message_bytes}")
        self._lengths = lengths
        self._frames = []

    def _append(self, big: Big, pos: int, nbytes: int) -> None:
        """Append ``_buf[pos:pos + nbytes]`` to ``big``."""
        if type(big) is bytearray:
            big += self._mv[pos:pos + nbytes]
            return
        if type(big) is spool.SpoolFile:
            big.write(self._mv[pos:pos + nbytes])
            return
        assert isinstance(big, inplace.GrowingBytes)
        if not self._address:
            self._address, self._address_holder = inplace.address_of(self._buf)
        big.extend(self._address + pos, nbytes)

    def _new_big(self, size: int) -> Big:
        """An empty buffer for the next item of ``size`` bytes: a memory file
        when spooling (see :attr:`spool`), a growing ``bytes`` object for a
        frame flagged as one (where possible), else a bytearray."""
        flags, frames = self._flags, self._frames
        whole_bytes = bool(flags is not None and frames is not None
                           and flags[len(frames)] & BYTES_FLAG)
        if frames and self.spool is not None and size >= spool.MIN_SPOOL \
                and spool.SpooledFrame.live < spool.MAX_LIVE:
            if self._spooling is None:
                self._spooling = bool(self.spool(frames[0]))
            if self._spooling:
                try:
                    return spool.SpoolFile(size, whole_bytes)
                except OSError:   # no descriptor left (EMFILE): in memory then
                    pass
        if inplace.AVAILABLE:
            return inplace.GrowingBytes(size, array=not whole_bytes)
        return bytearray()

    def _read_file(self, size: int, flags: int) -> bytes | bytearray:
        """A frame of ``size`` bytes in a memory file (FILE_FLAG), read now."""
        assert self._files is not None
        fd = self._files()
        try:
            big = self._new_big(size)
            if type(big) is inplace.GrowingBytes:
                # (straight into the object: no pass through a buffer)
                spool.read_file(fd, size, bool(flags & CONSUME_FLAG), big.room, big.advance)
            else:
                if self._scratch is None:
                    self._scratch = memoryview(bytearray(RECV_BUFFER_SIZE))
                view, grown = self._scratch, big
                assert type(grown) is bytearray

                def append(n: int) -> None:
                    grown.__iadd__(view[:n])

                spool.read_file(fd, size, bool(flags & CONSUME_FLAG), lambda n: view[:n], append)
        except (OSError, ValueError) as exc:
            raise ProtocolError(f"cannot read a frame in a memory file: {exc}") from None
        finally:
            os.close(fd)
        return _finished(big)

    def _start_big(self, size: int, pos: int, end: int) -> tuple[bytes | bytearray | None, int]:
        """Give the item of ``size`` bytes at ``pos`` its own buffer, holding
        what has arrived of it so far."""
        have = min(size, end - pos)
        big = self._new_big(size)
        self._append(big, pos, have)
        if have == size:
            self._held += size
            return _finished(big), pos + have
        self._big, self._big_size = big, size
        return None, pos + have

    def _finish_big(self) -> None:
        big = self._big
        assert big is not None
        self._big = None
        if self._lengths is None:
            self._set_lengths(_lengths_struct(self._count).unpack_from(_finished(big)))
        else:
            assert self._frames is not None
            self._held += len(big)
            self._frames.append(_finished(big))

    def _whole_small(self, pos: int, end: int) -> tuple[Message, int] | None:
        """The message at ``pos`` if it is all in the buffer, its frames
        each smaller than ``large``, within the limits (the common case: a
        job's header and payload, a batch of results), and the position
        after it; else None (the general path takes it)."""
        mv, limits = self._mv, self.limits
        count = _unpack_count(mv, pos)[0]
        body = pos + 4 + 8 * count
        if body > end or not 0 < count <= limits.max_frames:
            return None
        lengths = _lengths_struct(count).unpack_from(mv, pos + 4)
        stop, biggest = body + sum(lengths), max(lengths)
        if stop > end or biggest >= self._large or biggest > limits.max_frame_bytes \
                or stop - body > limits.max_message_bytes:
            return None
        frames: Message = []
        for size in lengths:
            frames.append(bytes(mv[body:body + size]))
            body += size
        return frames, stop

    #: True when the last call returned early: messages before a frame the
    #: tap is to be asked about (an outer decoder returns them at once too).
    tap_waits = False
    #: Set by a decoder that feeds this one (records.SecureDecoder) while
    #: messages this one returned are not returned to the owner yet: the tap
    #: waits for them as for messages completed in the same call.
    pending = False

    def _parse(self) -> list[Message]:
        self.tap_waits = False
        out: list[Message] = []
        mv, large = self._mv, self._large
        pos, end = self._pos, self._end
        try:
            while True:
                if self._lengths is None:
                    if self._count < 0:
                        if end - pos < 4:
                            break
                        whole = self._whole_small(pos, end)
                        if whole is not None:
                            out.append(whole[0])
                            pos = whole[1]
                            continue
                        count = _unpack_count(mv, pos)[0]
                        pos += 4
                        self._set_count(count)
                        if count == 0:
                            out.append([])
                            self._count = -1
                            continue
                    need = 8 * self._count
                    if end - pos < need:
                        if need >= large:
                            _, pos = self._start_big(need, pos, end)
                        break
                    self._set_lengths(_lengths_struct(self._count).unpack_from(mv, pos))
                    pos += need
                lengths, frames = self._lengths, self._frames
                assert lengths is not None and frames is not None
                flags = self._flags
                while len(frames) < len(lengths):
                    size = lengths[len(frames)]
                    if size >= MIN_TAP and self.tap is not None and self._tapping is None \
                            and frames:
                        if out or self.pending:   # (they go first; the tap is asked next read)
                            self.tap_waits = True
                            return out
                        self._tapping = self.tap(frames, lengths, flags)
                    if self._tapping is not None:
                        pos = self._tap_frame(size, pos, end, len(frames) + 1 == len(lengths))
                        if self._tap_left >= 0:
                            return out
                        frames.append(Relayed(size))   # type: ignore[arg-type]
                    elif flags is not None and flags[len(frames)] & STREAM_FLAG:
                        got, pos = self._streamed(size, pos, end)
                        if got is None:
                            return out
                        if got is _ABORTED:
                            self._reset()
                            break
                        frames.append(got)
                    elif flags is not None and flags[len(frames)] & FILE_FLAG:
                        frames.append(self._read_file(size, flags[len(frames)]))
                        self._held += size
                    elif size >= large:
                        big, pos = self._start_big(size, pos, end)
                        if big is None:
                            return out
                        frames.append(big)
                    elif end - pos >= size:
                        frames.append(bytes(mv[pos:pos + size]))
                        self._held += size
                        pos += size
                    else:
                        return out
                else:
                    out.append(frames)
                    self._reset()
        finally:
            self._pos = pos
        return out

    def _reset(self) -> None:
        """Ready for the next message."""
        self._count, self._lengths, self._frames = -1, None, None
        self._flags = self._spooling = None
        self._tapping = None
        self._held = self._tapped = 0
        self._relay = None

    def _tap_frame(self, size: int, pos: int, end: int, last: bool) -> int:
        """Hand what has arrived of the current frame to the tap; the
        position after it (``_tap_left`` is -1 once the frame is whole)."""
        tap = self._tapping
        assert tap is not None
        if self._tap_left < 0:
            self._tap_left = size
        n = min(self._tap_left, end - pos)
        if n:
            tap.data(self._mv[pos:pos + n])
            pos += n
            self._tap_left -= n
            self._tapped += n
        if not self._tap_left:
            self._tap_left = -1
            tap.frame_end(last)
        return pos

    def _streamed(self, size: int, pos: int, end: int) -> tuple[Any, int]:
        """Read chunks of a streamed frame (STREAM_FLAG) of ``size`` bytes:
        ``(frame, pos)`` once its end came, ``(_ABORTED, pos)`` if the
        message was abandoned, ``(None, pos)`` if more is to come."""
        mv = self._mv
        big = self._sbig
        if big is None:
            big = self._sbig = self._new_big(size) if size >= self._large else bytearray()
        while True:
            left = self._chunk
            if left:
                n = min(left, end - pos)
                if not n:
                    return None, pos
                self._append(big, pos, n)
                pos += n
                self._chunk = left - n
                continue
            if end - pos < CHUNK.size:
                return None, pos
            word = CHUNK.unpack_from(mv, pos)[0]
            pos += CHUNK.size
            if word == CHUNK_ABORT:
                self._sbig = None
                return _ABORTED, pos
            if word == CHUNK_END:
                if len(big) != size:
                    raise ProtocolError(f"a streamed frame ended after {len(big)} of its "
                                        f"{size} bytes")
                self._sbig = None
                self._held += size
                frame = _finished(big)
                return (frame if size >= self._large else bytes(frame)), pos
            if word > size - len(big):
                raise ProtocolError(f"a chunk of {word} bytes overruns its streamed frame "
                                    f"({len(big)} of {size} bytes received)")
            self._chunk = word


#: What :meth:`FrameDecoder._streamed` returns for an abandoned message.
_ABORTED = object()


def _finished(big: Big) -> Any:
    """The frame ``big`` holds: a bytearray, bytes, or a spool.SpooledFrame."""
    return big if type(big) is bytearray else big.finish()  # type: ignore[union-attr]


def _iov_max() -> int:
    try:
        return min(os.sysconf("SC_IOV_MAX"), 1024)
    except (AttributeError, ValueError, OSError):
        return 16


#: The most buffers one ``sendmsg`` takes (what a write of :func:`encode`'s
#: list is cut into).
IOV_MAX = _iov_max()
