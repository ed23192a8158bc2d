"""Serialization of functions, arguments, results and exceptions.

Everything dpool sends between a client and its workers is turned into a
list of *frames* (bytes-like objects) by :func:`dumps` and back by
:func:`loads`.  Frame 0 is a pickle stream (protocol 5); frames 1.. are
out-of-band buffers (PEP 574), so that large payloads are never copied into
the pickle stream and the transport can send them with scatter-gather I/O.

* Plain :mod:`pickle` is used wherever it works.  :mod:`cloudpickle` is used
  only for what plain pickle cannot do: functions and classes defined in
  ``__main__``, lambdas, closures and other nested definitions, and
  definitions from modules that cannot be imported by name on the other side
  (not in ``sys.modules`` or not holding the definition under its
  qualified name, modules registered with
  :func:`cloudpickle.register_pickle_by_value`).  Those are pickled by value;
  importable module-level functions and classes go by reference.
* Exact ``bytes``, ``bytearray`` and ``memoryview`` objects of at least
  :data:`OUT_OF_BAND_THRESHOLD` bytes found at the top of the object or inside
  its tuples/lists/dicts down to :data:`_SCAN_DEPTH` levels (an ``(args,
  kwargs)`` pair, an args tuple, a result) travel as out-of-band frames and
  come back as the same type.  ``memoryview`` objects anywhere in the
  structure, and objects that support pickle protocol 5 buffers natively
  (e.g. NumPy arrays; non-contiguous ones are made contiguous first), go
  out-of-band anywhere when they are large enough.
* Buffers on the receiving side: ``bytes`` are rebuilt with one copy (none if
  the frame already is a ``bytes`` object); a ``bytearray`` frame becomes the
  ``bytearray`` itself; ``memoryview`` and NumPy arrays are views of the
  frames (zero-copy), so the frames must not be reused afterwards.

Exceptions raised by user code on a worker are sent with
:func:`dump_exception` and rebuilt with :func:`load_exception`, which attaches
the remote traceback as ``__cause__`` (a :class:`RemoteTraceback`).
"""
import builtins
import io
import pickle
import re
import sys
import traceback
import types

import concurrent.futures.process as _cf_process
import multiprocessing.pool as _mp_pool

from dpool.errors import RemoteError

__all__ = [
    "OUT_OF_BAND_THRESHOLD",
    "RemoteTraceback",
    "dumps",
    "loads",
    "dumps_function",
    "loads_function",
    "dump_exception",
    "load_exception",
]

#: Buffers of at least this many bytes travel as separate (out-of-band) frames.
OUT_OF_BAND_THRESHOLD = 64 * 1024

PROTOCOL = 5

# How many container levels (exact tuple/list/dict) are searched for large
# bytes/bytearray objects (the C pickler writes those in-band without asking
# reducer_override): 2 covers ``dumps((args, kwargs))``.  memoryviews are
# handled by the pickler itself, at any depth.
_SCAN_DEPTH = 2
# At most this many container items are looked at by that search, so that
# dumping a big list does not cost a Python-level walk of all of it.
_SCAN_BUDGET = 1024
# The fast path (plain pickle.dumps) accepts containers of at most this size.
_FAST_MAX_LEN = 32

_ATOMS = frozenset({type(None), bool, int, float, str})
_EMPTY: dict = {}  # a call's keywords when it has none (pickled only, never changed)

_FunctionType = types.FunctionType
_ModuleType = types.ModuleType
_PickleBuffer = pickle.PickleBuffer


# --------------------------------------------------------------------------
# Fast path

def _is_simple(obj, depth=2):
    """Whether obj is only None/bool/int/float/str/small bytes, possibly in
    small tuples/lists/dicts nested at most ``depth`` levels."""
    t = type(obj)
    if t in _ATOMS:
        return True
    if t is bytes:
        return len(obj) < OUT_OF_BAND_THRESHOLD
    if not depth:
        return False
    if t is tuple or t is list:
        if len(obj) > _FAST_MAX_LEN:
            return False
        for x in obj:
            if type(x) not in _ATOMS and not _is_simple(x, depth - 1):
                return False
        return True
    if t is dict:
        if len(obj) > _FAST_MAX_LEN:
            return False
        for k, v in obj.items():
            if type(k) not in _ATOMS and not _is_simple(k, 0):
                return False
            if type(v) not in _ATOMS and not _is_simple(v, depth - 1):
                return False
        return True
    return False


# --------------------------------------------------------------------------
# Out-of-band buffers

class _OutOfBand:
    """Stands for a large bytes/bytearray in the object being pickled, so
    that it is pickled as a PickleBuffer (out-of-band) instead of in-band."""

    __slots__ = ("data",)

    def __init__(self, data):
        self.data = data

    def __reduce_ex__(self, protocol):
        data = self.data
        rebuild = _rebuild_bytes if type(data) is bytes else _rebuild_bytearray
        return rebuild, (_PickleBuffer(data),)


def _rebuild_bytes(buf):
    # bytes(b) is b itself when the frame already is a bytes object.
    return bytes(buf)


def _rebuild_bytearray(buf):
    if type(buf) is bytearray:
        return buf  # the frame itself: zero-copy
    return bytearray(buf)


def _reduce_memoryview(mv):
    fmt, shape = mv.format, mv.shape
    if not mv.c_contiguous:
        mv = mv.tobytes()  # C-order copy; format and shape restored on load
    elif fmt == "B" and mv.ndim == 1:
        fmt = shape = None  # nothing to restore
    return _rebuild_memoryview, (_PickleBuffer(mv), fmt, shape)


def _rebuild_memoryview(buf, fmt=None, shape=None):
    mv = memoryview(buf)
    if fmt is not None:
        try:
            if mv.format != "B" or mv.ndim != 1:
                mv = mv.cast("B")
            mv = mv.cast(fmt, shape)
        except (TypeError, ValueError):
            pass  # unusual format: leave it as a flat byte view
    return mv


class _Cycle(Exception):
    """A container refers back to one being copied by _swap_big_buffers."""


_BUSY = object()  # memo value of a container while it is being copied


def _swap_big_buffers(obj, depth, budget):
    """Return obj, or a shallow copy of it in which large bytes/bytearray
    objects (at most ``depth`` container levels down) are replaced by
    _OutOfBand wrappers.  budget is ``[items left to look at, memo]``; the
    memo gives an object seen twice the same wrapper or copy (one frame, and
    the identity is kept as plain pickle would).  Raises _Cycle when a
    container contains itself (the caller then pickles obj unchanged)."""
    t = type(obj)
    if t is bytes or t is bytearray:
        if len(obj) >= OUT_OF_BAND_THRESHOLD:
            memo = budget[1]
            wrapper = memo.get(id(obj))
            if wrapper is None:
                wrapper = memo[id(obj)] = _OutOfBand(obj)
            return wrapper
        return obj
    if t is not tuple and t is not list and t is not dict:
        return obj
    memo = budget[1]
    done = memo.get(id(obj))
    if done is not None:
        if done is _BUSY:
            raise _Cycle
        return done
    if not depth or len(obj) > budget[0]:
        memo[id(obj)] = obj
        return obj
    memo[id(obj)] = _BUSY
    new = _swap_items(obj, t, depth, budget)
    memo[id(obj)] = new
    return new


def _swap_items(obj, t, depth, budget):
    if t is tuple or t is list:
        n = len(obj)
        budget[0] -= n
        new = None
        for i, x in enumerate(obj):
            if type(x) in _ATOMS:
                continue
            y = _swap_big_buffers(x, depth - 1, budget)
            if y is not x:
                if new is None:
                    new = list(obj)
                new[i] = y
        if new is None:
            return obj
        return tuple(new) if t is tuple else new
    if t is dict:
        n = len(obj)
        budget[0] -= n
        new = None
        for k, v in obj.items():
            if type(v) in _ATOMS:
                continue
            y = _swap_big_buffers(v, depth - 1, budget)
            if y is not v:
                if new is None:
                    new = dict(obj)
                new[k] = y
        return obj if new is None else new
    return obj


# --------------------------------------------------------------------------
# Pickling by value (cloudpickle) only where needed

def _cloudpickle():
    """cloudpickle, imported by the first definition pickled by value (most
    programs' pools never need it: importing it costs a fresh process's first
    pool ~10% of its start-up, issue 13)."""
    import cloudpickle

    return cloudpickle


def _registered_by_value(module_name):
    # (a module registered by value was registered with cloudpickle: none
    # while it is not imported)
    cloudpickle = sys.modules.get("cloudpickle")
    if cloudpickle is None:
        return False
    try:
        registry = cloudpickle.list_registry_pickle_by_value()
    except AttributeError:  # pragma: no cover - very old cloudpickle
        return False
    if not registry:
        return False
    while True:
        if module_name in registry:
            return True
        module_name, dot, _ = module_name.rpartition(".")
        if not dot:
            return False


def _by_value(obj):
    """Whether a function or class must be pickled by value: plain pickle
    would store a reference the other side cannot resolve."""
    module_name = getattr(obj, "__module__", None)
    if not isinstance(module_name, str) or module_name == "__main__":
        return True
    qualname = getattr(obj, "__qualname__", None)
    if not isinstance(qualname, str) or "<" in qualname:  # <locals>, <lambda>
        return True
    module = sys.modules.get(module_name)
    if module is None:
        return True
    found = module
    try:
        for part in qualname.split("."):
            found = getattr(found, part)
    except AttributeError:
        return True
    if found is not obj:
        return True
    return _registered_by_value(module_name)


def _module_of(obj):
    module_name = getattr(obj, "__module__", None)
    module = sys.modules.get(module_name) if isinstance(module_name, str) else None
    return module if isinstance(module, _ModuleType) else None


class _GlobalsName(dict):
    """What cloudpickle sends as the globals of the functions of one module
    (pre-seeded in its ``globals_ref``): pickled as a call naming that
    module's shared namespace on the other side, not as a fresh dict."""

    __slots__ = ("module",)

    def __reduce_ex__(self, protocol):
        m = self.module
        return _shared_namespace, (m.__name__, getattr(m, "__file__", None),
                                   getattr(m, "__package__", None))


def _cloudpickle_reduce(obj):
    """By value, the globals of obj's module (functions, a class's methods)
    named: every function from one module gets one namespace per process."""
    module = _module_of(obj)
    if module is None or isinstance(obj, _ModuleType):
        return pickle.loads, (_cloudpickle().dumps(obj, protocol=PROTOCOL),)
    f = io.BytesIO()
    pickler = _cloudpickle().Pickler(f, protocol=PROTOCOL)
    name = pickler.globals_ref[id(module.__dict__)] = _GlobalsName()
    name.module = module
    pickler.dump(obj)
    return pickle.loads, (f.getvalue(),)


_DEFINITIONS = (types.FunctionType, type)


class SharedGlobals(dict):
    """The one namespace of a client module in this process (as the stdlib's
    workers share one ``__main__``): every function or class pickled by
    value from that module gets it as its globals.  cloudpickle updates a
    function's globals with the client's values of the names it uses each
    time one arrives; data values already here are kept ("first value
    wins": a worker's module is a snapshot, and what an initializer set with
    ``global``, or put in a module-level dict, stays set), while functions
    and classes arriving replace the ones here (a helper redefined in the
    client, e.g. in a notebook, is run as redefined).  Use ``dict.update``
    to overwrite everything."""

    __slots__ = ()

    def update(self, *args, **kwargs):
        for k, v in dict(*args, **kwargs).items():
            if k not in self or isinstance(v, _DEFINITIONS):
                self[k] = v


_shared_globals = {}  # module name -> SharedGlobals (a worker serves one session)


def _shared_namespace(name, file, package):
    ns = _shared_globals.get(name)
    if ns is None:
        ns = _shared_globals[name] = SharedGlobals(
            __name__=name, __file__=file, __package__=package,
            __builtins__=builtins)
    return ns


class _Pickler(pickle.Pickler):
    """Plain (C) pickler that delegates only by-value definitions to
    cloudpickle.  Note that the C pickler never calls reducer_override for
    exact None/bool/int/float/str/bytes/bytearray/tuple/list/dict/set."""

    last = None  # last object seen, to name it if pickling fails

    def reducer_override(self, obj):
        self.last = obj
        t = type(obj)
        if t is _FunctionType:
            if _by_value(obj):
                return _cloudpickle_reduce(obj)
            return NotImplemented
        if t is memoryview:
            return _reduce_memoryview(obj)
        if isinstance(obj, type):
            if _by_value(obj):
                return _cloudpickle_reduce(obj)
            return NotImplemented
        if t is _ModuleType:
            # plain pickle cannot pickle modules at all
            return _cloudpickle_reduce(obj)
        if (t.__name__ == "ndarray" and t.__module__ == "numpy"
                and obj.nbytes >= OUT_OF_BAND_THRESHOLD
                and not (obj.flags.c_contiguous or obj.flags.f_contiguous)
                and not obj.dtype.hasobject):
            # NumPy pickles non-contiguous arrays in-band: send a contiguous
            # copy out-of-band instead.
            return obj.copy().__reduce_ex__(PROTOCOL)
        return NotImplemented


def _buffer_callback(frames):
    append = frames.append

    def callback(buf):
        raw = buf.raw()
        if raw.nbytes < OUT_OF_BAND_THRESHOLD:
            return True  # small: in-band
        append(raw)
        return False

    return callback


def _describe(obj):
    t = type(obj)
    module = getattr(t, "__module__", None)
    name = getattr(t, "__qualname__", t.__name__)
    if module and module != "builtins":
        name = f"{module}.{name}"
    return name


def _pickle(obj, frames, callback):
    """Pickle obj into frames[0] (frames gets the out-of-band buffers)."""
    f = io.BytesIO()
    pickler = _Pickler(f, PROTOCOL, buffer_callback=callback)
    try:
        pickler.dump(obj)
    except RecursionError:
        raise
    except Exception as e:
        culprit = pickler.last if pickler.last is not None else obj
        # Last resort: whatever cloudpickle can do that plain pickle can't.
        del frames[1:]
        try:
            stream = _cloudpickle().dumps(obj, protocol=PROTOCOL,
                                       buffer_callback=callback)
        except Exception:
            # The pickler's own exception, as the stdlib's pools raise it
            # (a PicklingError, a TypeError, whatever __reduce__ raised).
            e.add_note(f"dpool cannot serialize {_describe(culprit)} object")
            raise e from None
        frames[0] = stream
        return
    frames[0] = f.getvalue()


# --------------------------------------------------------------------------
# Public API

def dumps(obj):
    """Serialize obj to a list of frames: ``[pickle stream, *buffers]``.

    If obj cannot be serialized, raises the pickler's own exception (as the
    stdlib does: a ``TypeError``, a ``PicklingError``, whatever a
    ``__reduce__`` raised), with a note naming the offending type.
    """
    if _is_simple(obj):
        return [pickle.dumps(obj, PROTOCOL)]
    try:
        obj = _swap_big_buffers(obj, _SCAN_DEPTH, [_SCAN_BUDGET, {}])
    except _Cycle:
        pass  # pickled as is: large bytes in-band, but the cycle intact
    frames = [None]
    _pickle(obj, frames, _buffer_callback(frames))
    return frames


def dumps_call(args, kwargs=None):
    """``dumps((args, kwargs or {}))``, a call's arguments, with the
    check for the fast path made once for the common case (a tuple of plain
    values, no keywords): it is on every submit's path."""
    if not kwargs and type(args) is tuple and len(args) <= _FAST_MAX_LEN:
        # (_is_simple(args, 1), inline: a tuple of atoms needs no call)
        for x in args:
            if type(x) not in _ATOMS and not _is_simple(x, 0):
                break
        else:
            return [pickle.dumps((args, _EMPTY), PROTOCOL)]
    return dumps((args, kwargs or {}))


def loads(frames):
    """Inverse of :func:`dumps`; frames may be bytes, bytearray or memoryview.

    Out-of-band buffers may be used without copying (memoryview, NumPy
    arrays, bytearray frames), so the frames must not be reused afterwards.
    """
    if len(frames) == 1:
        return pickle.loads(frames[0])
    return pickle.loads(frames[0], buffers=frames[1:])


def runtime_versions():
    """What a peer's pickles depend on, for the hello (see transport.auth)."""
    return {"python": "%d.%d" % sys.version_info[:2], "cloudpickle": _cloudpickle().__version__}


def dumps_function(fn):
    """Serialize a callable to one bytes blob (by reference when importable,
    by value with cloudpickle otherwise)."""
    frames = [None]
    _pickle(fn, frames, None)
    return frames[0]


def loads_function(data):
    """Inverse of :func:`dumps_function`."""
    return pickle.loads(data)


# --------------------------------------------------------------------------
# Exceptions

class RemoteTraceback(_cf_process._RemoteTraceback, _mp_pool.RemoteTraceback):
    """Set as ``__cause__`` of exceptions coming from a worker; its text is
    the remote traceback.  It is both the stdlib's classes for this
    (``concurrent.futures.process._RemoteTraceback`` and
    ``multiprocessing.pool.RemoteTraceback``), so code that checks for either
    finds it; ``tb`` is the traceback text, as theirs."""

    def __init__(self, tb):
        Exception.__init__(self, tb)
        self.tb = tb

    def __str__(self):
        return f'\n"""\n{self.tb}"""'


def _type_name(exc):
    t = type(exc)
    module = getattr(t, "__module__", None)
    if module in (None, "builtins", "__main__"):
        return t.__qualname__
    return f"{module}.{t.__qualname__}"


def _safe_str(exc):
    try:
        return str(exc)
    except Exception:
        return f"<unprintable {type(exc).__name__} object>"


_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


def _no_addresses(text):
    """text without the `` at 0x...`` of default reprs (an object in an
    exception's message is a copy, at another address, after a round trip)."""
    return _ADDRESS.sub("", text)


def dump_exception(exc, tb=None):
    """Serialize an exception raised on a worker, with its traceback text.

    If the exception does not survive a pickle round trip it is replaced by
    a :class:`dpool.errors.RemoteError` with its type name and message.

    Frame layout: frame 0 is a plain pickle of ``(type name, message,
    traceback text)``; the remaining frames are ``dumps(exception)``.
    """
    if tb is None:
        tb = exc.__traceback__
    tb_text = "".join(traceback.format_exception(type(exc), exc, tb))
    type_name = _type_name(exc)
    message = _safe_str(exc)
    header = pickle.dumps((type_name, message, tb_text), PROTOCOL)
    try:
        frames = dumps(exc)
        copy = loads(frames)
        if type(copy) is not type(exc) or _no_addresses(_safe_str(copy)) != _no_addresses(message):
            raise TypeError("exception does not survive a pickle round trip")
    except Exception:
        frames = dumps(RemoteError(type_name, message, tb_text))
    return [header, *frames]


def load_exception(frames):
    """Rebuild an exception sent by :func:`dump_exception`; its
    ``__cause__`` is a :class:`RemoteTraceback` with the remote traceback."""
    type_name, message, tb_text = pickle.loads(frames[0])
    try:
        exc = loads(frames[1:])
        if not isinstance(exc, BaseException):
            raise TypeError(f"not an exception: {type(exc)!r}")
    except Exception:
        # e.g. the exception's module cannot be imported here
        exc = RemoteError(type_name, message, tb_text)
    exc.__cause__ = RemoteTraceback(tb_text)
    return exc
