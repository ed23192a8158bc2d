"""``bytes`` and ``bytearray`` objects filled in place as their bytes arrive
(CPython only).

A large frame is received into an object of its own: a ``bytes`` object for
one the sender marked as a whole ``bytes`` object (see frames.py), so that the
receiver needs no ``bytes(frame)`` copy to rebuild the user's ``bytes`` (a copy
that costs a second full-size buffer, i.e. twice the memory for an instant and
a pass of first-touch page faults), else a ``bytearray`` (out-of-band pickle
buffers: NumPy arrays).  The socket reads (or records are decrypted) straight
into the object's memory (:meth:`GrowingBytes.room`): no pass through a
receive buffer and no second copy.

The object is made with the documented C API (``PyBytes_FromStringAndSize``
with NULL: contents uninitialized, to be filled before the object is shared;
``_PyBytes_Resize``: grow a brand new bytes object; ``PyByteArray_Resize``;
``PyMemoryView_FromMemory`` for the room handed out) and written through its
address; nobody else sees it until :meth:`GrowingBytes.finish`.  Like a
``bytearray`` appended to, it grows with the bytes that really arrived (by 1/8
at a time, never past the declared size), so a declared length costs nothing
by itself.

Fresh memory costs a page fault per 4 KiB page the first time it is written
(most of the time of a large transfer here: docs/performance.md, "Where the
time goes at 1 GB"); the pages just ahead of what has arrived are faulted in
``POPULATE`` bytes at a time with one ``madvise(MADV_POPULATE_WRITE)`` (Linux
5.14+; 30% less kernel time than a fault per page), never past the object's
capacity, which stays within 1/8 of what arrived.  Where this is not CPython,
:data:`AVAILABLE` is False and frames.py appends to a ``bytearray``.
"""
from __future__ import annotations

import ctypes
import os
import sys
import threading

__all__ = ["AVAILABLE", "GrowingBytes", "address_of"]

#: At least this much room is added when the object grows.
MIN_GROWTH = 256 << 10
#: Pages are faulted in this many bytes at a time, ahead of the bytes arriving.
POPULATE = 8 << 20
#: An object this big, once this much of it has arrived, has its pages
#: faulted in by a thread of its own (:class:`_Populator`), at most this many
#: threads in a process, up to this far ahead of the bytes arriving.
THREAD_MIN = 32 << 20
THREAD_AFTER = 4 << 20
MAX_THREADS = 2
THREAD_AHEAD = 64 << 20
_PAGE = 4096
_MADV_POPULATE_WRITE = 23
_PYBUF_WRITE = 0x200


class _Api:
    """The C functions used, with their signatures (CPython only).  Objects
    are handled as raw ``PyObject *`` (owned references, freed by hand): a
    ``ctypes.py_object`` would keep a second reference, and
    ``_PyBytes_Resize`` needs the only one."""

    def __init__(self) -> None:
        api = ctypes.pythonapi
        self.new = api.PyBytes_FromStringAndSize
        self.new.restype = ctypes.c_void_p
        self.new.argtypes = (ctypes.c_void_p, ctypes.c_ssize_t)
        self.resize = api._PyBytes_Resize
        self.resize.restype = ctypes.c_int
        self.resize.argtypes = (ctypes.POINTER(ctypes.c_void_p), ctypes.c_ssize_t)
        self.new_array = api.PyByteArray_FromStringAndSize
        self.new_array.restype = ctypes.c_void_p
        self.new_array.argtypes = (ctypes.c_void_p, ctypes.c_ssize_t)
        self.resize_array = api.PyByteArray_Resize
        self.resize_array.restype = ctypes.c_int
        self.resize_array.argtypes = (ctypes.c_void_p, ctypes.c_ssize_t)
        self.array_data = api.PyByteArray_AsString
        self.array_data.restype = ctypes.c_void_p
        self.array_data.argtypes = (ctypes.c_void_p,)
        self.view = api.PyMemoryView_FromMemory
        self.view.restype = ctypes.py_object
        self.view.argtypes = (ctypes.c_void_p, ctypes.c_ssize_t, ctypes.c_int)
        self.decref = api.Py_DecRef
        self.decref.restype = None
        self.decref.argtypes = (ctypes.c_void_p,)


def _load_api() -> _Api | None:
    if sys.implementation.name != "cpython":
        return None
    try:
        return _Api()
    except (AttributeError, OSError):
        return None


def _load_madvise() -> ctypes._CFuncPtr | None:   # type: ignore[name-defined]
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).madvise   # (releases the GIL)
    except (OSError, AttributeError):
        return None
    fn.restype = ctypes.c_int
    fn.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    return fn


_API = _load_api()
AVAILABLE = _API is not None
_madvise = _load_madvise()
#: Where a bytes object's data starts (``ob_sval``), from the object's address.
_DATA = bytes.__basicsize__ - 1


def address_of(buffer: bytearray) -> tuple[int, object]:
    """The address of a ``bytearray``'s data, and an object that must be kept
    alive while the address is used (it also stops the bytearray resizing)."""
    holder = (ctypes.c_char * len(buffer)).from_buffer(buffer)
    return ctypes.addressof(holder), holder


def populate(address: int, nbytes: int) -> None:
    """Fault in the whole pages of ``nbytes`` at ``address`` for writing, in
    one system call (a hint: nothing happens where it is not supported)."""
    global _madvise
    start = -(-address // _PAGE) * _PAGE
    end = (address + nbytes) // _PAGE * _PAGE
    if end <= start or _madvise is None:
        return
    if _madvise(start, end - start, _MADV_POPULATE_WRITE) != 0 \
            and ctypes.get_errno() == 22:     # EINVAL: a kernel before 5.14
        _madvise = None


class _Populator:
    """A thread faulting in the pages of an object under construction ahead
    of where it is being written, so that the page faults (most of the cost
    of receiving a large frame) take the other CPU instead of the receiving
    thread's: :meth:`ahead` asks for the pages up to an offset, :meth:`stop`
    ends the thread.  The object's memory is only touched under
    :attr:`lock`, which its owner holds to move or free it.  The thread
    holds no reference to the object (dropped, it is freed and stops us)."""

    live = 0     # threads running, in this process
    _count = threading.Lock()    # (for live)

    def __init__(self, address: int, offset: int) -> None:
        self.lock = threading.Lock()
        self.address = address      # of the object's data (updated under lock)
        self._cv = threading.Condition(threading.Lock())
        self._target = self._done = offset    # (the pages before it are in)
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="dpool-populate", daemon=True)
        self._counted(1)
        try:
            self._thread.start()
        except BaseException:
            self._counted(-1)
            raise

    @classmethod
    def _counted(cls, change: int) -> None:
        with cls._count:
            cls.live += change

    def ahead(self, offset: int) -> None:
        """Fault in the pages up to ``offset`` (within the object's capacity)."""
        if offset > self._target:
            with self._cv:
                self._target = offset
                self._cv.notify()

    def _run(self) -> None:
        try:
            while True:
                with self._cv:
                    while self._target <= self._done and not self._stopped:
                        self._cv.wait()
                    if self._stopped:
                        return
                    start, end = self._done, min(self._target, self._done + POPULATE)
                with self.lock:
                    if not self._stopped:
                        populate(self.address + start, end - start)
                self._done = end
        finally:
            self._counted(-1)

    @classmethod
    def _after_fork(cls) -> None:
        """(in a forked child) None of the parent's threads run here: none is
        counted, and the count's lock may have been held by one of them."""
        cls.live = 0
        cls._count = threading.Lock()

    def stop(self) -> None:
        """End the thread (at once: it may finish a chunk it began)."""
        with self._cv:
            self._stopped = True
            self._cv.notify()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_Populator._after_fork)


class GrowingBytes:
    """A ``bytes`` object (or, with ``array=True``, a ``bytearray``) of
    ``size`` bytes under construction: write into :meth:`room` and count
    the bytes with :meth:`advance`, or append with :meth:`extend`; get it
    with :meth:`finish` once all ``size`` bytes are in.  ``len()`` is the
    number of bytes in so far.  Dropped unfinished, it frees what it holds."""

    __slots__ = ("_api", "_ptr", "_len", "_cap", "_size", "_array", "_data", "_populated",
                 "_populator")

    def __init__(self, size: int, array: bool = False) -> None:
        assert _API is not None and size >= 2   # 0 and 1 byte: shared singletons
        self._api = _API
        self._size = size
        self._array = array
        self._len = self._populated = 0
        self._ptr = ctypes.c_void_p(_API.new_array(None, 0) if array else _API.new(None, 2))
        if not self._ptr.value:
            raise MemoryError
        # A new bytes object already has room for 2 bytes: its data address
        # is needed before the first resize (appending 1 or 2 bytes first).
        self._cap = 0 if array else 2
        self._data = 0 if array else self._ptr.value + _DATA
        self._populator: _Populator | None = None

    def __len__(self) -> int:
        return self._len

    def __del__(self) -> None:
        populator = self._populator
        if populator is not None:
            populator.stop()
            with populator.lock:    # (not in the middle of our pages)
                self._free()
        else:
            self._free()

    def _free(self) -> None:
        if self._ptr.value:
            self._api.decref(self._ptr)
            self._ptr.value = None

    def _resize(self, cap: int) -> None:
        # On failure CPython frees a bytes object, sets the pointer to NULL
        # and raises MemoryError (ctypes re-raises it here); the object is
        # gone then, and passing NULL to the C API again would crash.
        ptr = self._ptr
        if not ptr.value:
            raise MemoryError("this bytes object was freed when it could not grow")
        if self._array:
            self._api.resize_array(ptr, cap)
            self._data = self._api.array_data(ptr) or 0
        else:
            self._api.resize(ctypes.byref(ptr), cap)
            self._data = ptr.value + _DATA if ptr.value else 0
        self._cap = cap

    def _reserve(self, nbytes: int) -> int:
        """Room for ``nbytes`` more bytes (at most what is left of ``size``):
        grown if need be, its pages faulted in; the address of that room."""
        need = self._len + nbytes
        if need > self._size:
            raise ValueError(f"{need} bytes do not fit in a frame of {self._size}")
        populator = self._populator
        if need > self._cap:
            cap = min(self._size, need + max(need >> 3, MIN_GROWTH))
            if populator is None:
                self._resize(cap)
            else:
                with populator.lock:    # (our pages may move)
                    self._resize(cap)
                    populator.address = self._data
        if populator is not None:
            populator.ahead(min(self._cap, self._len + THREAD_AHEAD))
        elif need > self._populated and self._size >= POPULATE:
            if self._size >= THREAD_MIN and self._len >= THREAD_AFTER \
                    and _Populator.live < MAX_THREADS and _madvise is not None:
                try:
                    self._populator = _Populator(self._data, self._populated)
                except RuntimeError:   # no thread to be had: as before, then
                    pass
                else:
                    return self._reserve(nbytes)
            start = max(self._populated, self._len)
            self._populated = min(self._cap, max(need, self._len + POPULATE))
            populate(self._data + start, self._populated - start)
        return self._data + self._len

    def room(self, limit: int) -> memoryview:
        """Writable memory for the next bytes, at most ``limit`` (and what is
        left of ``size``); count what was written with :meth:`advance`.
        Valid until the next call of any other method."""
        n = min(limit, self._size - self._len)
        return self._api.view(self._reserve(n), n, _PYBUF_WRITE)

    def advance(self, nbytes: int) -> None:
        """``nbytes`` bytes were written at the start of the last :meth:`room`."""
        if not 0 <= nbytes <= self._cap - self._len:
            raise ValueError(f"{nbytes} bytes do not fit in the room given")
        self._len += nbytes

    def extend(self, address: int, nbytes: int) -> None:
        """Append ``nbytes`` bytes read from memory at ``address``."""
        ctypes.memmove(self._reserve(nbytes), address, nbytes)
        self._len += nbytes

    def finish(self) -> bytes | bytearray:
        """The complete object (all ``size`` bytes in)."""
        if self._len != self._size:
            raise ValueError(f"frame has {self._len} of its {self._size} bytes")
        populator, self._populator = self._populator, None
        if populator is not None:
            populator.stop()
            with populator.lock:    # (it no longer touches our pages)
                pass
        if self._cap != self._size or not self._ptr.value:
            self._resize(self._size)
        # Ours no more before anything can raise (a KeyboardInterrupt as a
        # call returns): at worst the object leaks, it is never freed twice.
        ptr, self._ptr = self._ptr, ctypes.c_void_p()
        data: bytes | bytearray = ctypes.cast(ptr, ctypes.py_object).value
        self._api.decref(ptr)     # `data` holds the only reference now
        return data
