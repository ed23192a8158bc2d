"""The one callback thread of the APIs: user callbacks run off the client's
loop thread, one at a time, in the order they were queued."""
from __future__ import annotations

import logging
import queue
import threading
from typing import Any, Callable

log = logging.getLogger("dpool")


class CallbackThread:
    """Runs ``fn(*args)`` for each :meth:`put`, one at a time, in order; a
    callback that raises is logged and the next one runs."""

    def __init__(self, name: str = "dpool-callbacks", held: bool = False) -> None:
        self.queue: queue.SimpleQueue[tuple[Callable[..., Any], tuple] | None] = \
            queue.SimpleQueue()
        # held: callbacks are queued, and run from release() on (or stop())
        self._open = threading.Event()
        if not held:
            self._open.set()
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.thread.start()

    def release(self) -> None:
        """Run the callbacks (held since the start, if ``held``)."""
        self._open.set()

    def put(self, fn: Callable[..., Any], *args: Any) -> None:
        self.queue.put((fn, args))

    def _run(self) -> None:
        self._open.wait()
        while True:
            item = self.queue.get()
            if item is None:
                return
            fn, args = item
            try:
                fn(*args)
            except Exception:
                log.exception("dpool: callback %s raised", getattr(fn, "__name__", fn))

    def stop(self, timeout: float | None = None, wait: bool = True) -> None:
        """Run the callbacks already queued, then end the thread (waiting
        for it up to ``timeout`` s if ``wait``, unless called from it)."""
        self._open.set()
        if self.thread.is_alive():
            self.queue.put(None)
            if wait and threading.current_thread() is not self.thread:
                self.thread.join(timeout)
