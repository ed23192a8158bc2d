"""Rate-limited logging of refused and rejected connections.

A flood of bad connections must not become a flood of log lines.  The first
rejection of a quiet period is logged at once, with its details; the ones
after it are counted, and one WARNING line per period sums them up: how
many, why, and from which addresses (the busiest first).
"""
from __future__ import annotations

import asyncio
import collections
import logging

#: Seconds between two summary lines.
PERIOD = 10.0
#: Addresses named in a summary line, at most (the busiest).
TOP_ADDRESSES = 5


class RejectionLog:
    """Counts rejections per reason and per source address; logs them sparingly."""

    def __init__(self, logger: logging.Logger, where: str, period: float = PERIOD,
                 what: str = "connections refused or rejected"):
        self.log = logger
        self.what = what
        self.where = where
        self.period = period
        self._quiet_until = float("-inf")   # loop time the current period ends
        self._reasons: collections.Counter = collections.Counter()
        self._hosts: collections.Counter = collections.Counter()
        self._timer: asyncio.TimerHandle | None = None

    def reject(self, host: str, reason: str, message: str, *args: object) -> None:
        """One rejected connection from ``host``; ``message % args`` is logged
        if it is the first of a period, else it counts under ``reason``."""
        loop = asyncio.get_running_loop()
        now = loop.time()
        if now >= self._quiet_until and self._timer is None:
            self._quiet_until = now + self.period
            self.log.warning(message, *args)
            return
        self._reasons[reason] += 1
        self._hosts[host] += 1
        if self._timer is None:
            self._timer = loop.call_at(self._quiet_until, self.flush)

    def flush(self) -> None:
        """Log the summary of the rejections counted so far (if any)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self._reasons:
            return
        total = sum(self._reasons.values())
        why = ", ".join(f"{n} {reason}" for reason, n in self._reasons.most_common())
        top = self._hosts.most_common(TOP_ADDRESSES)
        hosts = ", ".join(f"{host} ({n})" for host, n in top)
        if len(self._hosts) > len(top):
            hosts += f" and {len(self._hosts) - len(top)} more addresses"
        self.log.warning("%s: %d more %s (%s); from %s",
                         self.where, total, self.what, why, hosts)
        self._reasons.clear()
        self._hosts.clear()
        try:
            self._quiet_until = asyncio.get_running_loop().time() + self.period
        except RuntimeError:    # flushed at close, outside the loop
            pass

    def close(self) -> None:
        self.flush()
