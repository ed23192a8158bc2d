"""Large frames handed from a node to its worker in a memory file (Linux).

A ``dpool-node`` receives a large job argument from its client, checked
record by record (records.py), and its worker needs the same bytes to build
the argument.  Held in the node's memory until sent on, the frame made the
node's process tree hold it twice (the node's buffer, then the worker's
object).  Instead, the node writes the frame, as its authenticated bytes
arrive, into a memory file of its own (``memfd_create``: shared memory, no
disk, no name anyone else can open), and the frame is sent to the worker as
that file's descriptor (``SCM_RIGHTS`` on the node-worker socketpair, see
frames.FILE_FLAG).  The worker reads the file into the object it builds and,
when the node keeps no copy, frees each part it has read
(``fallocate(PUNCH_HOLE)``), so the tree holds the payload once, plus a
bounded chunk.

Only links that ask for it carry file frames: a decoder without a source of
descriptors refuses them (a client can't make a node read files).
"""
from __future__ import annotations

import ctypes
import os
import sys
from collections.abc import Callable

__all__ = ["AVAILABLE", "SpoolFile", "SpooledFrame", "read_file", "MIN_SPOOL"]

#: Frames at least this big are spooled (where asked for and available).
MIN_SPOOL = 1 << 20
#: Spooled frames a process holds at most (each is a descriptor); past it,
#: frames are received into memory as usual.
MAX_LIVE = 64
#: Bytes freed at a time from a spool file once read.
PUNCH_EVERY = 8 << 20
#: Bytes read from a spool file at a time.
READ_CHUNK = 1 << 20

_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02


def _load_fallocate() -> ctypes._CFuncPtr | None:   # type: ignore[name-defined]
    if not sys.platform.startswith("linux"):
        return None
    try:
        # (the process's own symbols, libc's among them: ctypes.util.find_library
        # would run ``ldconfig -p`` in a subprocess at every import of dpool)
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.fallocate
    except (OSError, AttributeError):
        return None
    fn.restype = ctypes.c_int
    fn.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong)
    return fn


_fallocate = _load_fallocate()
AVAILABLE = hasattr(os, "memfd_create") and _fallocate is not None


class SpooledFrame:
    """A received frame held in a memory file: ``fd`` (owned: closed when
    this object goes) and ``size``.  Set ``consume`` before sending it when
    nothing else will send it again: the receiver then frees its pages as
    it reads them."""

    __slots__ = ("fd", "size", "whole_bytes", "consume", "__weakref__")
    live = 0    # spooled frames not closed yet, in this process

    def __init__(self, fd: int, size: int, whole_bytes: bool) -> None:
        self.fd = fd
        self.size = size
        self.whole_bytes = whole_bytes   # a whole bytes object on the sender's side
        self.consume = False
        SpooledFrame.live += 1

    def __len__(self) -> int:
        return self.size

    def __repr__(self) -> str:
        return f"<SpooledFrame fd={self.fd} {self.size} bytes>"

    def close(self) -> None:
        fd, self.fd = self.fd, -1
        if fd >= 0:
            SpooledFrame.live -= 1
            os.close(fd)

    def __del__(self) -> None:
        self.close()


class SpoolFile:
    """A frame of ``size`` bytes being written into a new memory file;
    ``len()`` is the count written so far; :meth:`finish` gives the
    :class:`SpooledFrame`."""

    __slots__ = ("_frame", "_len")

    def __init__(self, size: int, whole_bytes: bool) -> None:
        fd = os.memfd_create("dpool-frame", os.MFD_CLOEXEC)
        self._frame = SpooledFrame(fd, size, whole_bytes)
        self._len = 0

    def __len__(self) -> int:
        return self._len

    def write(self, data: memoryview) -> None:
        fd = self._frame.fd
        try:
            while len(data):
                n = os.write(fd, data)
                self._len += n
                data = data[n:]
        except OSError as exc:   # ENOSPC, ENOMEM: no room for the frame
            raise MemoryError(f"cannot spool a frame: {exc}") from exc

    def finish(self) -> SpooledFrame:
        assert self._len == self._frame.size
        return self._frame


def punch(fd: int, offset: int, length: int) -> None:
    """Free ``length`` bytes of the file ``fd`` from ``offset`` (its size stays)."""
    assert _fallocate is not None
    if _fallocate(fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"fallocate(PUNCH_HOLE): {os.strerror(err)}")


def read_file(fd: int, size: int, consume: bool, room: Callable[[int], memoryview],
              advance: Callable[[int], None]) -> None:
    """Read ``size`` bytes of the file ``fd`` from its start into ``room(n)``
    (writable memory for up to ``n`` more bytes), reporting each read's count
    with ``advance(nbytes)``; with ``consume``, free each part once read.
    Raises ValueError if the file holds fewer bytes."""
    offset = punched = 0
    while offset < size:
        n = os.preadv(fd, [room(min(READ_CHUNK, size - offset))], offset)
        if n <= 0:
            raise ValueError(f"a spooled frame of {size} bytes holds only {offset}")
        advance(n)
        offset += n
        if consume and offset - punched >= PUNCH_EVERY:
            punch(fd, punched, offset - punched)
            punched = offset
    if consume and offset > punched:
        punch(fd, punched, offset - punched)
