"""A budget for the bytes of messages being received, shared by connections.

Each connection reports how many bytes its partly received message holds
(:attr:`FrameDecoder.held`).  While the total is within ``limit`` everyone
reads on.  Past it, one connection (the first to find the budget exceeded)
may go on until its message is complete, so a message bigger than the whole
budget still gets through; every other connection that holds or wants more
stops reading (backpressure: the kernel's buffers fill and its peer's sends
block) until the total is back within the limit or the overdraft is free.
A connection whose partly received message is within ``allowance`` bytes
(4 MiB by default) is not stopped by the overdraft: one peer holding it (a
huge message sent slowly) must not stall the others' ordinary messages and
heartbeats (at a dpool-scheduler those are other clients:
tests/sched/test_sched_overdraft.py).  The allowance counts against the
limit all the same: it holds while what the others hold (all but it and
the overdraft) is within ``limit``, so many peers each within it (N clients
x 4 MiB) wait as any other past the limit.  So at most ``limit`` + one
message + ``allowance`` + one read per connection is held.
"""
from __future__ import annotations

import collections
from collections.abc import Callable

__all__ = ["ReceiveBudget", "DEFAULT_RECEIVE_BUDGET"]

DEFAULT_RECEIVE_BUDGET = 1 * 2**30
#: A connection holding at most this much of a message is never stopped.
DEFAULT_ALLOWANCE = 4 * 2**20


class ReceiveBudget:
    """Bytes being received across connections, at most ``limit`` (but one)."""

    def __init__(self, limit: int = DEFAULT_RECEIVE_BUDGET,
                 allowance: int = DEFAULT_ALLOWANCE) -> None:
        if limit <= 0:
            raise ValueError(f"a receive budget must be positive, not {limit}")
        self.limit = limit
        self.allowance = allowance
        self.used = 0
        self._held: dict[object, int] = {}    # connection -> bytes held
        self._overdraft: object = None        # the connection allowed past the limit
        # connection -> resume callback
        self._paused: collections.OrderedDict[object, Callable[[], object]] = \
            collections.OrderedDict()

    def __repr__(self) -> str:
        return (f"<ReceiveBudget {self.used}/{self.limit} bytes, "
                f"{len(self._paused)} paused>")

    def update(self, conn: object, held: int) -> bool:
        """Record that ``conn`` holds ``held`` bytes; False: it must stop reading."""
        self.used += held - self._held.pop(conn, 0)
        if held:
            self._held[conn] = held
        elif self._overdraft is conn:
            self._overdraft = None
        self._wake()
        if self.used <= self.limit or self._overdraft is conn or self._allowed(conn):
            return True
        if self._overdraft is None:
            self._overdraft = conn
            return True
        return False

    def pause(self, conn: object, resume: Callable[[], object]) -> None:
        """``conn`` stopped reading; ``resume()`` is called when it may go on."""
        self._paused[conn] = resume

    def forget(self, conn: object) -> None:
        """``conn`` is gone: release what it held."""
        self._paused.pop(conn, None)
        self.update(conn, 0)

    def _allowed(self, conn: object) -> bool:
        """``conn`` is within its allowance, and the others but it and the
        overdraft within the limit: the overdraft does not stop it."""
        held = self._held.get(conn, 0)
        overdraft = self._held.get(self._overdraft, 0) if self._overdraft is not None else 0
        return held <= self.allowance and self.used - overdraft - held <= self.limit

    def _wake(self) -> None:
        while self._paused and (self.used <= self.limit or self._overdraft is None):
            conn, resume = self._paused.popitem(last=False)
            if self.used > self.limit:
                self._overdraft = conn
            resume()
        if self._paused and self._overdraft is not None:
            for conn in [conn for conn in self._paused if self._allowed(conn)]:
                if conn in self._paused:  # a resume() before may have let it go
                    self._paused.pop(conn)()
