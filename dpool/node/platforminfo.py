"""``platform.platform()``, dispy's ``platform`` field of a node's
``avail_info``, computed once per process, in a thread started early.

Its first call runs ``uname -p`` in a subprocess (``platform.uname()``'s
processor field): a few milliseconds on an embedded node's first session
answer, the path of a fresh process's first pool (issue 13).  A client
starts it as it forks its embedded node's zygote (:func:`start`), so the
subprocess runs while the client starts its loop thread and its node; the
session answer then takes the value (:func:`get`), exact as before.
"""
import threading

_lock = threading.Lock()
_thread: "threading.Thread | None" = None


def start() -> None:
    """Compute it in a daemon thread, once per process."""
    global _thread
    with _lock:
        if _thread is None:
            _thread = threading.Thread(target=_platform, name="dpool-platform", daemon=True)
            _thread.start()


def get() -> str:
    """``platform.platform()``, waiting for :func:`start`'s thread if one runs."""
    thread = _thread
    if thread is not None:
        thread.join()
    return _platform()


def _platform() -> str:
    """(``platform`` imported here, in the thread: its import compiles a
    dozen regular expressions, a millisecond or two of the first pool's)"""
    import platform

    return platform.platform()
