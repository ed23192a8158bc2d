"""What a scheduler keeps for a client that went away (``dpool-scheduler``,
see broker.py): dispy's ``recover_jobs`` through a scheduler.

A client whose session carries a ``recover_token`` (JobCluster and
SharedJobCluster with ``recover_file``) and whose connection drops without
Bye is *detached*: its jobs go on (queued ones are placed as before), and
the Done messages for it are kept here, as they came, within the node's
limits (``KEEP_MAX_RESULTS`` results, ``KEEP_MAX_BYTES`` bytes), for
``keep_results`` seconds.  ``recover_jobs`` then sends Recover(token) on a
new connection: it gets Ready with the kept and unfinished job ids, the kept
results, then the others as they end (ClientSession.reattach).  Those limits
bound what all the detached sessions of a scheduler keep together too
(:class:`Keeping`): a session whose result would pass them is discarded, so
N dead clients keep no more than one may.
"""
from __future__ import annotations

import asyncio
from collections.abc import Callable

from .. import protocol as P
from ..transport.frames import total_bytes
from ..node.recovery import KEEP_RESULTS, Keeping

__all__ = ["Kept", "Keeping", "KEEP_RESULTS"]


class Kept:
    """The results kept for a detached client, and its expiry timer."""

    def __init__(self, keep: float, on_expiry: Callable[[], None], together: Keeping) -> None:
        self.messages: list[list] = []  # Done messages, as they came
        self.job_ids: list[int] = []
        self.bytes = 0
        self.together = together
        self.timer = asyncio.get_running_loop().call_later(keep, on_expiry)

    def add(self, frames: list) -> bool:
        """Keep a message for the client if it is a Done; False once past
        the limits (the session is then discarded)."""
        msg = P.decode(frames[0])
        if type(msg) is not P.Done:  # starts, provisional results...: not kept
            return True
        size = total_bytes(frames)
        self.messages.append(frames)
        self.job_ids.extend(record[0] for record in msg.results)
        self.bytes += size
        self.together.results += len(msg.results)
        self.together.bytes += size
        return self.together.within()

    def cancel(self) -> None:
        """Ended or recovered: what it kept is no longer counted."""
        if not self.timer.cancelled():
            self.timer.cancel()
            self.together.results -= len(self.job_ids)
            self.together.bytes -= self.bytes
