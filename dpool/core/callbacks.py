"""The one callback thread of the APIs: user callbacks run off the client's
loop thread, one at a time, in the order they were queued."""
import logging
import queue
import threading

log = logging.getLogger("dpool")


class CallbackThread:
    """Runs ``fn(*args)`` for each :meth:`put`, one at a time, in order; a
    callback that raises is logged and the next one runs."""

    def __init__(self, name="dpool-callbacks"):
        self.queue = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.thread.start()

    def put(self, fn, *args):
        self.queue.put((fn, args))

    def _run(self):
        while True:
            item = self.queue.get()
            if item is None:
                return
            fn, args = item
            try:
                fn(*args)
            except Exception:
                log.exception("dpool: callback %s raised", getattr(fn, "__name__", fn))

    def stop(self, timeout=None, wait=True):
        """Run the callbacks already queued, then end the thread (waiting
        for it up to ``timeout`` s if ``wait``, unless called from it)."""
        if self.thread.is_alive():
            self.queue.put(None)
            if wait and threading.current_thread() is not self.thread:
                self.thread.join(timeout)
