"""Task functions for the conformance suites (tests/api/test_conformance_*.py).

They live in an importable module (``tests/`` is on ``sys.path`` under
pytest) so that the stdlib pools, which pickle functions by reference, can
run them too; dpool's workers import them the same way.
"""
import os
import signal
import threading
import time

_initialized = None


class Unpicklable:
    """An object no pickler can serialize (it holds a lock)."""

    def __init__(self):
        self.lock = threading.Lock()


def identity(x):
    return x


def square(x):
    return x * x


def add(a, b=0, *, c=0):
    return a + b + c


def sleep_then(seconds, value=None):
    time.sleep(seconds)
    return value


def raise_value_error(message):
    raise ValueError(message)


def fail_on(x, bad):
    if x == bad:
        raise ValueError(f"bad item {x}")
    return x


def sleep_return(seconds):
    time.sleep(seconds)
    return seconds


def fail_on_3(x):
    return fail_on(x, 3)


def getpid(_=None):
    return os.getpid()


def exit_worker(code=1):
    os._exit(code)


def kill_worker(_=None):
    os.kill(os.getpid(), signal.SIGKILL)


def die_or_value(x):
    if x == "die":
        os._exit(7)
    return x


def return_unpicklable():
    return Unpicklable()


def set_initialized(value):
    global _initialized
    _initialized = value


def get_initialized(_=None):
    return _initialized


def failing_initializer():
    raise RuntimeError("initializer failed on purpose")


def raise_timeout_error():
    raise TimeoutError("raised by the task, not a wait")
