"""Relaying a large message from one connection to another as it arrives.

A ``dpool-node`` passes a client's large job argument on to the worker that
runs the job, and a worker's result on to its client.  For an argument (the
node's Session.stream_argument), the client's connection is the source and
the worker's the destination: the worker reads the argument while the client
still sends it, the node holds a bounded part, and a client cut in the middle
aborts the message (the worker drops it; the session ends with its client).
The rest of this describes results, the first use.  Held whole
until complete, a 1 GB result made the node's process tree hold it twice
(the worker's object and the node's copy).  Instead, the node taps the
worker connection's decoder (frames.TapHook) when the result's first large
frame begins, and a :class:`Forward` writes the message to the client as
its bytes arrive: the header first (the frames' lengths are known then),
the frames already received, then each remaining frame as a *streamed*
frame (frames.STREAM_FLAG): chunks of the bytes as they came, each after a
word of its length, sealed into records like every other byte on the
connection.  The node holds a bounded amount: the decoder's 256 KiB buffer
and what waits in the client connection's queue (past its high-water mark
the node stops reading the worker until the queue drains).

Ending: the message's last chunk word is held back until the node has
decided to deliver the result (:meth:`Forward.finish`: ``CHUNK_END``).  If
the worker dies, or is killed (cancel), or sends something the node's
decoder refuses, in the middle of the message, :meth:`Forward.abort` writes
``CHUNK_ABORT`` instead: the client's decoder drops the partial message and
reads on; the node then reports the job's fate (WorkerLost, cancelled) in an
ordinary message.  Messages the node sends meanwhile wait until the relayed
one has ended (Connection.send holds them); while the worker sends nothing,
each of them makes the relay write an empty chunk, so the client still sees
the node alive.  A source silent for ``stall`` seconds (the worker stopped
in the middle of its result) while messages wait (not while the relay
itself holds the source back) has its relay cut: ``CHUNK_ABORT``, the
waiting messages go out, :attr:`Forward.cut` is set, and the rest of the
source's message is dropped as it comes (the caller reports the job's
result as lost).  A node killed mid-relay ends the connection in the middle
of a message: the client sees the node lost, as for any other message.
"""
from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from .frames import (BYTES_FLAG, CHUNK, CHUNK_ABORT, CHUNK_END, STREAM_FLAG, _header_struct,
                     _length_word, _nbytes)

if TYPE_CHECKING:
    from .connection import Connection

__all__ = ["Forward"]

_END = CHUNK.pack(CHUNK_END)
_ABORT = CHUNK.pack(CHUNK_ABORT)
_EMPTY = CHUNK.pack(0)
#: Seconds a relay's source may send nothing while messages wait behind it
#: (what a dpool-node gives its relays; a Forward made without ``stall`` waits).
STALL = 10.0


class Forward:
    """One message written to ``dest`` as it arrives from ``source``.

    ``head`` are its first frames, already received (the first one possibly
    rewritten by the caller); ``lengths`` and ``flags`` are those the source
    declared for all of its frames (frames.FrameDecoder's): the frames after
    ``head`` follow as streamed frames through :meth:`data` and
    :meth:`frame_end`.
    """

    def __init__(self, dest: Connection, source: Connection, head: Sequence[Any],
                 lengths: Sequence[int], flags: Sequence[int] | None,
                 stall: float | None = None) -> None:
        self._dest = dest
        self._source = source
        self._open = True
        self._paused = False
        self._quiet = True   # nothing written since the last nudge
        #: True once the relay was cut for a silent source (see the module doc).
        self.cut = False
        self._stall = stall
        self._last = time.monotonic()   # when the source last sent (or was let go on)
        self._timer: asyncio.TimerHandle | None = None
        first = len(head)
        words = [_length_word(f, _nbytes(f)) for f in head]
        for i in range(first, len(lengths)):
            bytes_flag = flags[i] & BYTES_FLAG if flags is not None else 0
            words.append(lengths[i] | STREAM_FLAG | bytes_flag)
        dest.begin_relay(self)
        dest.relay_write([_header_struct(len(words)).pack(len(words), *words),
                          *(bytes(f) for f in head if _nbytes(f))])

    # -- from the source's decoder (frames.Tap) -------------------------------

    def data(self, view: memoryview) -> None:
        """The next bytes of the current frame (sealed now, or copied: the
        view is reused)."""
        if not self._open:
            return
        self._quiet = False
        self._last = time.monotonic()
        dest = self._dest
        dest.relay_records([CHUNK.pack(len(view)), view])
        if dest.write_paused:
            # (again if something else, a receive budget, resumed it meanwhile)
            self._source.pause_reading()
            if not self._paused:
                self._paused = True
                dest.when_writable(self._resume)

    def frame_end(self, last: bool) -> None:
        """The current frame is complete; the last one's end waits for
        :meth:`finish` (the caller's decision to deliver)."""
        if self._open and not last:
            self._dest.relay_write([_END])

    def abort(self) -> None:
        """Abandon the message: the receiver drops what it got of it."""
        self._end(_ABORT)

    # -- from the caller --------------------------------------------------------

    @property
    def holding(self) -> bool:
        """True while the relay holds its source back (``dest`` is full)."""
        return self._paused

    def finish(self) -> None:
        """Complete the message (all of it came from the source)."""
        self._end(_END)

    def nudge(self) -> None:
        """Something waits to be sent: show the peer we are alive if this
        relay wrote nothing since the last nudge (the source is silent)."""
        if self._open and self._quiet:
            self._dest.relay_write([_EMPTY])
        self._quiet = True
        if self._open and self._timer is None and self._stall is not None:
            self._wait_stall()

    def _wait_stall(self) -> None:
        assert self._stall is not None
        self._timer = asyncio.get_running_loop().call_later(
            max(0.0, self._last + self._stall - time.monotonic()), self._check_stall)

    def _check_stall(self) -> None:
        """(timer) Cut the relay if its source has been silent for ``stall``
        seconds; a source the relay holds back (paused) is not silent."""
        self._timer = None
        if not self._open:
            return
        now = time.monotonic()
        assert self._stall is not None
        if self._paused:
            self._last = now
        elif now - self._last >= self._stall:
            self.cut = True
            self.abort()
            return
        self._wait_stall()

    def _end(self, word: bytes) -> None:
        if not self._open:
            return
        self._open = False
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._dest.relay_write([word])
        self._dest.end_relay()
        self._resume()

    def _resume(self) -> None:
        if self._paused:
            self._paused = False
            self._last = time.monotonic()
            self._source.resume_reading()
