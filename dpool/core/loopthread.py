"""The client's private asyncio loop thread, and the embedded node's zygote
forked before it starts (see :mod:`dpool.core.client`)."""
import asyncio
import os
import threading
import time

#: Native ids of loop threads joined, which the OS may list for a moment more.
_ending_threads: set[int] = set()


def _fork_zygote():
    """An embedded node's zygote forked from this process (see
    :meth:`dpool.node.zygote.Zygote.fork`), or None where that's not safe.
    A loop thread joined just now (the previous client's, closed right
    before this one starts) ends in the kernel a moment after its join
    returns: waited for, briefly, so that it does not count as a thread."""
    from ..node import platforminfo
    from ..node.zygote import Zygote

    if _ending_threads and threading.active_count() == 1:
        deadline = time.monotonic() + 0.05
        while True:
            _ending_threads.difference_update(
                [tid for tid in _ending_threads if not os.path.exists(f"/proc/self/task/{tid}")])
            if not _ending_threads or time.monotonic() > deadline:
                break
            time.sleep(0.0005)
    zygote = Zygote.fork()
    platforminfo.start()  # (its subprocess runs meanwhile: see platforminfo)
    return zygote


class LoopThread:
    """One private asyncio loop in a daemon thread."""

    def __init__(self, name="dpool-client"):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.thread.start()

    def _run(self):
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()
        # Let callbacks scheduled during shutdown run, then close.
        self.loop.run_until_complete(asyncio.sleep(0))
        self.loop.close()

    def run(self, coro, timeout=None):
        """Run a coroutine on the loop and wait for it from another thread."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def call(self, fn, *args):
        self.loop.call_soon_threadsafe(fn, *args)

    def stop(self, timeout=10):
        if self.thread.is_alive():
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(timeout)
            if not self.thread.is_alive() and self.thread.native_id is not None:
                _ending_threads.add(self.thread.native_id)
