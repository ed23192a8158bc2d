"""Light futures: a ``concurrent.futures.Future`` at 120 bytes, resolved in batches.

::

    Client.submit ──► Future()            120 bytes, 1 GC-tracked object
                                          (the stdlib's: 1.6 KB, 6 of them)
    loop thread ──► set_running([future, ...])   (a RUN batch: one lock)
    loop thread ──► resolve([(future, value, error), ...])
                      one lock for the batch: results and states set,
                      then waiters woken, then done-callbacks run, in order
    user thread ──► result(), exception(), concurrent.futures.wait(),
                    as_completed()   (a Condition made only for a future
                                      someone waits on before it is done)

A stdlib ``Future`` makes a ``threading.Condition`` (an ``RLock`` and a
``deque``) and two lists when it is created, and takes its lock on every
call.  With a million futures queued, that is 1.6 GB and millions of
objects for the garbage collector to walk.  This subclass keeps the
stdlib's attribute names and states (``concurrent.futures.wait`` and
``as_completed`` read ``_state``, lock ``_condition`` and add to
``_waiters``), but makes the condition and the waiter list only when they
are asked for, and moves every state change under one module-wide lock,
held for a whole batch of results at once.

Why that is safe: a state change and the check "has anyone made a
condition?" happen under ``_lock``; a condition is made under ``_lock`` too;
whoever then waits checks the state under that condition.  So either the
waiter sees the new state, or the resolver sees the condition and then
changes the state under it too, telling the waiters in the same hold, as
the stdlib does (``wait`` and ``as_completed`` read the states and then
add their waiter, all under the conditions: a state changed between the
two, then told, was counted twice).
"""
import threading
from concurrent.futures import CancelledError, InvalidStateError, TimeoutError
from concurrent.futures import Future as _StdFuture
from concurrent.futures._base import (_STATE_TO_DESCRIPTION_MAP, CANCELLED,
                                      CANCELLED_AND_NOTIFIED, FINISHED, LOGGER, PENDING,
                                      RUNNING)
from typing import Any, Callable, Iterable

__all__ = ["DONE", "STARTED", "Future", "resolve", "set_running"]

_lock = threading.Lock()  # every state change of every Future of this module
STARTED = RUNNING  # (``_state == STARTED``: running(), without the call)
_DONE = DONE = frozenset((CANCELLED, CANCELLED_AND_NOTIFIED, FINISHED))  # (``_state in DONE``)
_CANCELLED = frozenset((CANCELLED, CANCELLED_AND_NOTIFIED))


class Future(_StdFuture):
    """A ``concurrent.futures.Future`` (``isinstance`` holds, and ``wait``,
    ``as_completed``, ``asyncio.wrap_future`` work on it) that costs 120
    bytes until someone waits on it, and that :func:`resolve` resolves in
    batches."""

    __slots__ = ("_state", "_result", "_exception", "_done_callbacks", "_cond", "_wl")

    def __init__(self) -> None:  # (no super().__init__: it makes the Condition)
        self._state = PENDING
        self._result: Any = None
        self._exception: BaseException | None = None
        self._done_callbacks: list[Callable[[Any], object]] | None = None
        self._cond: threading.Condition | None = None
        self._wl: list[Any] | None = None

    # -- what concurrent.futures.wait / as_completed use

    @property  # (the stdlib's is a plain attribute)
    def _condition(self) -> threading.Condition:  # type: ignore[override]
        cond = self._cond
        if cond is None:
            with _lock:
                if self._cond is None:
                    self._wl = []
                    self._cond = threading.Condition()
                cond = self._cond
        return cond

    @property
    def _waiters(self) -> list[Any]:  # type: ignore[override]
        self._condition  # noqa: B018 (made with the condition, under _lock)
        assert self._wl is not None
        return self._wl

    def __getstate__(self) -> Any:
        # The stdlib's fails on its lock; this one has none until waited on.
        raise TypeError(f"cannot pickle {type(self).__name__!r} object")

    # -- reading

    def __repr__(self) -> str:
        state = self._state
        if state == FINISHED:
            if self._exception is not None:
                return f"<{type(self).__name__} at {id(self):#x} state=finished " \
                       f"raised {type(self._exception).__name__}>"
            return f"<{type(self).__name__} at {id(self):#x} state=finished " \
                   f"returned {type(self._result).__name__}>"
        return f"<{type(self).__name__} at {id(self):#x} " \
               f"state={_STATE_TO_DESCRIPTION_MAP[state]}>"

    def cancelled(self) -> bool:
        return self._state in _CANCELLED

    def running(self) -> bool:
        return self._state == RUNNING

    def done(self) -> bool:
        return self._state in _DONE

    def _wait(self, timeout: float | None) -> str:
        """The final state, waiting up to ``timeout`` for it (TimeoutError)."""
        state = self._state
        if state in _DONE:
            return state
        cond = self._condition
        with cond:
            if not cond.wait_for(self.done, timeout):
                raise TimeoutError()
        return self._state

    def result(self, timeout: float | None = None) -> Any:
        try:
            if self._wait(timeout) != FINISHED:
                raise CancelledError()
            if self._exception is not None:
                raise self._exception
            return self._result
        finally:
            self = None  # type: ignore[assignment]  # (no cycle through the traceback)

    def exception(self, timeout: float | None = None) -> BaseException | None:
        if self._wait(timeout) != FINISHED:
            raise CancelledError()
        return self._exception

    def add_done_callback(self, fn: Callable[[Any], object]) -> None:
        with _lock:
            if self._state not in _DONE:
                if self._done_callbacks is None:
                    self._done_callbacks = []
                self._done_callbacks.append(fn)
                return
        _call(fn, self)

    # -- state changes (one at a time; a batch with resolve())

    def cancel(self) -> bool:
        with _lock:
            state = self._state
            if state in (RUNNING, FINISHED):
                return False
            if state in _CANCELLED:
                return True
            self._state = CANCELLED
            callbacks, cond = self._take()
        _notify(self, cond, None)
        _run(self, callbacks)
        return True

    def _unstart(self) -> bool:
        """A future whose job was given back unstarted (a scheduler still
        queued it): cancelled after all (its waiters told); False if it is
        done already."""
        def unstart() -> tuple[str, Any] | None:
            if self._state not in (RUNNING, PENDING):
                return None
            self._state = CANCELLED_AND_NOTIFIED
            return "add_cancelled", self._take()[0]
        with _lock:
            told = unstart() if self._cond is None else None
            if told is None and self._cond is None:
                return self._state in _CANCELLED
        told = told or _waited(self, unstart)
        if told is None:
            return self._state in _CANCELLED
        _run(self, told[1])
        return True

    def set_running_or_notify_cancel(self) -> bool:
        with _lock:
            state = self._state
            if state == PENDING:
                self._state = RUNNING
                return True
            if state != CANCELLED:
                LOGGER.critical("Future %s in unexpected state: %s", id(self), state)
                raise RuntimeError("Future in unexpected state")
            if self._cond is None:  # nobody waits on it: nobody to tell
                self._state = CANCELLED_AND_NOTIFIED
                return False
        _waited(self, _cancel_told(self))
        return False

    def set_result(self, result: Any) -> None:
        resolve(((self, result, None),), strict=True)

    def set_exception(self, exception: BaseException | None) -> None:
        resolve(((self, None, exception),), strict=True)

    def _take(self) -> tuple[list[Callable[[Any], object]] | None, threading.Condition | None]:
        """(under _lock) the callbacks to run and the condition to notify."""
        callbacks, self._done_callbacks = self._done_callbacks, None
        return callbacks, self._cond


def set_running(futures: Iterable[Future], start: bool = True) -> list[Future]:
    """``set_running_or_notify_cancel()`` of each future, under one lock for
    the batch (a RUN message's jobs): returns the futures that were
    cancelled (their waiters told), the others are running now.  With
    ``start=False`` (jobs sent to a dpool-scheduler, which queues them) the
    others stay pending: they run once their job starts on a node."""
    cancelled = []
    with _lock:
        for future in futures:
            state = future._state
            if state == PENDING:
                if start:
                    future._state = RUNNING
            elif state == CANCELLED:
                if future._cond is None:  # nobody waits on it: nobody to tell
                    future._state = CANCELLED_AND_NOTIFIED
                cancelled.append(future)
            else:
                LOGGER.critical("Future %s in unexpected state: %s", id(future), state)
                raise RuntimeError("Future in unexpected state")
    for future in cancelled:
        if future._state == CANCELLED:  # (waited on: told under its condition)
            _waited(future, _cancel_told(future))
    return cancelled


def resolve(outcomes: Iterable[tuple[Future, Any, BaseException | None]],
            strict: bool = False) -> None:
    """Set each future's result (``error`` None) or exception, under one
    lock for the batch; then wake its waiters and run its done-callbacks,
    future by future in the order given.  A future already done is skipped
    (``strict``: raises ``InvalidStateError``, as ``set_result`` does)."""
    after: list[tuple[Future, Any, Any]] = []
    with _lock:
        for future, value, error in outcomes:
            if future._state in _DONE:
                if strict:
                    raise InvalidStateError(f"{future._state}: {future!r}")
                continue
            if future._cond is not None:  # waited on: set under its condition, below
                after.append((future, value, error))
                continue
            future._result, future._exception = value, error
            future._state = FINISHED
            if future._done_callbacks is not None:
                after.append((future, _SET, future._take()[0]))
    for future, value, error in after:
        if value is _SET:
            _run(future, error)
            continue
        told = _waited(future, _finish(future, value, error, strict))
        if told is not None:
            _run(future, told[1])


_SET = object()  # (in resolve's list: a future set already, with its callbacks)


def _finish(future: Future, value: Any, error: BaseException | None,
            strict: bool) -> Callable[[], tuple[str, Any] | None]:
    def finish() -> tuple[str, Any] | None:
        if future._state in _DONE:
            if strict:
                raise InvalidStateError(f"{future._state}: {future!r}")
            return None
        future._result, future._exception = value, error
        future._state = FINISHED
        return ("add_exception" if error is not None else "add_result"), future._take()[0]
    return finish


def _cancel_told(future: Future) -> Callable[[], tuple[str, Any] | None]:
    def tell() -> tuple[str, Any] | None:
        if future._state != CANCELLED:
            return None
        future._state = CANCELLED_AND_NOTIFIED
        return "add_cancelled", None
    return tell


def _waited(future: Future,
            change: Callable[[], tuple[str, Any] | None]) -> tuple[str, Any] | None:
    """Make ``change()`` (under _lock: ``(waiter method, callbacks)``, or
    None if it no longer applies) to a future someone waits on, as the
    stdlib changes a state: under the future's condition, its waiters told
    in the same hold.  concurrent.futures.wait and as_completed read the
    states under the conditions and then install their waiter: a state
    changed between the two outside the condition was counted done there
    AND told to the waiter (wait() returned with futures not done)."""
    cond = future._cond  # (made already: nobody waits on a future without one)
    assert cond is not None
    with cond:
        with _lock:
            told = change()
        if told is not None:
            for waiter in future._wl or ():
                getattr(waiter, told[0])(future)
            cond.notify_all()
    return told


def _notify(future: Future, cond: threading.Condition | None, what: str | None) -> None:
    if cond is None:
        return
    with cond:
        if what is not None:
            for waiter in future._wl or ():
                getattr(waiter, what)(future)
        cond.notify_all()


def _run(future: Future, callbacks: list[Callable[[Any], object]] | None) -> None:
    for fn in callbacks or ():
        _call(fn, future)


def _call(fn: Callable[[Any], object], future: Future) -> None:
    try:
        fn(future)
    except Exception:
        LOGGER.exception("exception calling callback for %r", future)
