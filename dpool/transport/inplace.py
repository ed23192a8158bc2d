"""A ``bytes`` object filled in place as its bytes arrive (CPython only).

A large ``bytes`` frame (one the sender marked as a whole ``bytes`` object, see
frames.py) is received into a ``bytes`` object of its own instead of a
``bytearray``, so that the receiver needs no ``bytes(frame)`` copy to rebuild
the user's ``bytes`` (a copy that costs a second full-size buffer, i.e. twice
the memory for an instant and a pass of first-touch page faults).

The object is made with the documented C API (``PyBytes_FromStringAndSize``
with NULL: contents uninitialized, to be filled before the object is shared;
``_PyBytes_Resize``: grow a brand new bytes object) and written through its
address; nobody else sees it until :meth:`GrowingBytes.finish`.  Like the
``bytearray`` it replaces, it grows with the bytes that really arrived (by
1/8 at a time, never past the declared size), so a declared length costs
nothing by itself.  Where this is not CPython, :data:`AVAILABLE` is False and
frames.py keeps using a ``bytearray``.
"""
from __future__ import annotations

import ctypes
import sys

__all__ = ["AVAILABLE", "GrowingBytes", "address_of"]

#: At least this much room is added when the object grows.
MIN_GROWTH = 1 << 20


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


_API = _load_api()
AVAILABLE = _API is not None
#: Where a bytes object's data starts (``ob_sval``), from the object's address.
_DATA = bytes.__basicsize__ - 1


def address_of(buffer: bytearray) -> tuple[int, object]:
    """The address of a ``bytearray``'s data, and an object that must be kept
    alive while the address is used (it also stops the bytearray resizing)."""
    holder = (ctypes.c_char * len(buffer)).from_buffer(buffer)
    return ctypes.addressof(holder), holder


class GrowingBytes:
    """A ``bytes`` object of ``size`` bytes under construction: append with
    :meth:`extend`, get it with :meth:`finish` once all ``size`` bytes are in.
    ``len()`` is the number of bytes appended so far.  Dropped unfinished, it
    frees what it holds."""

    __slots__ = ("_api", "_ptr", "_len", "_cap", "_size")

    def __init__(self, size: int) -> None:
        assert _API is not None and size >= 2   # 0 and 1 byte: shared singletons
        self._api = _API
        self._size = size
        self._len = 0
        self._ptr = ctypes.c_void_p(_API.new(None, 2))
        if not self._ptr.value:
            raise MemoryError
        self._cap = 2

    def __len__(self) -> int:
        return self._len

    def __del__(self) -> None:
        if self._ptr.value:
            self._api.decref(self._ptr)
            self._ptr.value = None

    def _resize(self, cap: int) -> None:
        # On failure CPython frees the object, sets the pointer to NULL and
        # raises MemoryError (ctypes re-raises it here); the object is gone
        # then, and passing NULL to the C API again would crash.
        if not self._ptr.value:
            raise MemoryError("this bytes object was freed when it could not grow")
        self._api.resize(ctypes.byref(self._ptr), cap)
        self._cap = cap

    def extend(self, address: int, nbytes: int) -> None:
        """Append ``nbytes`` bytes read from memory at ``address``."""
        need = self._len + nbytes
        if need > self._size:
            raise ValueError(f"{need} bytes do not fit in a frame of {self._size}")
        if need > self._cap:
            self._resize(min(self._size, need + max(need >> 3, MIN_GROWTH)))
        base = self._ptr.value
        assert base
        ctypes.memmove(base + _DATA + self._len, address, nbytes)
        self._len = need

    def finish(self) -> bytes:
        """The complete object (all ``size`` bytes in)."""
        if self._len != self._size:
            raise ValueError(f"frame has {self._len} of its {self._size} bytes")
        if self._cap != self._size or not self._ptr.value:
            self._resize(self._size)
        # Ours no more before anything can raise (a KeyboardInterrupt as a
        # call returns): at worst the object leaks, it is never freed twice.
        ptr, self._ptr = self._ptr, ctypes.c_void_p()
        data: bytes = ctypes.cast(ptr, ctypes.py_object).value
        self._api.decref(ptr)     # `data` holds the only reference now
        return data
