"""Heartbeat and re-join timing: pure decisions, ``now`` passed in.

Both ends of every client <-> node session run a :class:`Heartbeat` on a
timer (the driver reads the clock and the connection's byte counters, this
module decides).  Any byte received counts as a sign of life, so a long
transfer never looks like silence; when nothing was sent for ``interval``
seconds the driver sends a HEARTBEAT message.  A peer that sent nothing for
``deadline`` seconds is lost: the client reruns the node's jobs elsewhere, the
node ends the client's session (its lease).  The client chooses both numbers
and tells the node in its SESSION options.

:class:`Backoff` spaces the attempts to reconnect to a lost node.
"""
from __future__ import annotations

import math
import os
from .records import Value

HEARTBEAT_ENV = "DPOOL_HEARTBEAT"  # "interval,deadline" in seconds
CONNECT_TIMEOUT_ENV = "DPOOL_CONNECT_TIMEOUT"
HEARTBEAT_INTERVAL = 1.0  # seconds between heartbeats (LAN default)
HEARTBEAT_DEADLINE = 10.0  # seconds of silence after which the peer is lost
CONNECT_TIMEOUT = 10.0  # seconds for connect + handshake + session start
MIN_INTERVAL = 0.05
MAX_DEADLINE = 3600.0

SEND = "send"  # time to send a heartbeat
LOST = "lost"  # the peer was silent past the deadline


class Settings(Value):
    """How often to send heartbeats and how much silence means "lost"."""

    __slots__ = _fields = ("interval", "deadline")

    def __init__(self, interval: float = HEARTBEAT_INTERVAL,
                 deadline: float = HEARTBEAT_DEADLINE) -> None:
        self.interval = interval
        self.deadline = deadline
        if not MIN_INTERVAL <= self.interval <= MAX_DEADLINE:
            raise ValueError(f"heartbeat interval {self.interval!r} s: must be "
                             f"{MIN_INTERVAL} to {MAX_DEADLINE} s")
        if not 2 * self.interval <= self.deadline <= MAX_DEADLINE:
            raise ValueError(f"heartbeat deadline {self.deadline!r} s: must be at least twice "
                             f"the interval ({self.interval} s) and at most {MAX_DEADLINE} s")

    @property
    def tick(self) -> float:
        """How often the driver should call :meth:`Heartbeat.tick`: a lost
        peer is noticed within ``deadline + tick``."""
        return min(self.interval, self.deadline / 4) / 2

    def as_option(self) -> tuple:
        return (self.interval, self.deadline)


def settings(heartbeat=None) -> Settings:
    """Settings from ``(interval, deadline)``, else ``$DPOOL_HEARTBEAT``
    ("interval,deadline"), else the defaults; bad values raise ValueError."""
    if heartbeat is None:
        text = os.environ.get(HEARTBEAT_ENV, "").strip()
        if not text:
            return Settings()
        try:
            heartbeat = tuple(float(part) for part in text.split(","))
        except ValueError:
            heartbeat = text
        where = f" (from ${HEARTBEAT_ENV}={text!r})"
    else:
        where = ""
    if isinstance(heartbeat, Settings):
        return heartbeat
    try:
        if isinstance(heartbeat, (str, bytes)):  # ("15" is not (1, 5))
            raise TypeError
        interval, deadline = (float(x) for x in heartbeat)
    except (TypeError, ValueError):
        raise ValueError(f"heartbeat must be (interval, deadline) in seconds, "
                         f"not {heartbeat!r}{where}") from None
    try:
        return Settings(interval, deadline)
    except ValueError as exc:
        raise ValueError(f"{exc}{where}") from None


def peer_settings(option) -> Settings:
    """The settings a peer asked for (SESSION options), clamped into range.
    A number that is not finite is refused (ValueError naming the option):
    ``nan`` fails every comparison of the clamp, an infinite one means no
    deadline; the node and the scheduler refuse such a Session."""
    try:
        interval, deadline = (float(x) for x in option)
    except (TypeError, ValueError):
        return Settings()
    if not (math.isfinite(interval) and math.isfinite(deadline)):
        raise ValueError(f"heartbeat={option!r}: the interval and the deadline must be "
                         f"finite numbers of seconds")
    interval = min(max(interval, MIN_INTERVAL), MAX_DEADLINE / 2)
    return Settings(interval, min(max(deadline, 2 * interval), MAX_DEADLINE))


def connect_timeout(value=None) -> float:
    """``value``, else ``$DPOOL_CONNECT_TIMEOUT``, else 10 s; must be > 0."""
    where = ""
    if value is None:
        text = os.environ.get(CONNECT_TIMEOUT_ENV, "").strip()
        if not text:
            return CONNECT_TIMEOUT
        value, where = text, f" (from ${CONNECT_TIMEOUT_ENV}={text!r})"
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        seconds = -1.0
    if not seconds > 0:
        raise ValueError(f"connect_timeout must be a positive number of seconds, "
                         f"not {value!r}{where}")
    return seconds


class Heartbeat:
    """One connection's liveness, decided from byte counters at each tick."""

    __slots__ = ("settings", "heard_at", "sent_at", "_rx", "_tx")

    def __init__(self, settings: Settings, now: float, rx: int = 0, tx: int = 0):
        self.settings = settings
        self.heard_at = self.sent_at = now
        self._rx, self._tx = rx, tx

    def tick(self, now: float, rx: int, tx: int) -> str | None:
        """``rx``/``tx``: bytes received/sent so far.  Returns LOST when
        nothing was received for longer than the deadline, SEND when nothing
        was sent for an interval (the caller sends a heartbeat), else None."""
        if rx != self._rx:
            self._rx, self.heard_at = rx, now
        if tx != self._tx:
            self._tx, self.sent_at = tx, now
        if now - self.heard_at > self.settings.deadline:
            return LOST
        if now - self.sent_at >= self.settings.interval:
            self.sent_at = now
            return SEND
        return None

    def silence(self, now: float) -> float:
        """Seconds since anything was received."""
        return now - self.heard_at


class Backoff:
    """Delays between reconnection attempts: ``first``, doubling, up to ``cap``."""

    __slots__ = ("first", "cap", "_next")

    def __init__(self, first: float = 0.25, cap: float = 5.0):
        self.first, self.cap = first, cap
        self._next = first

    def next(self) -> float:
        delay = self._next
        self._next = min(self.cap, delay * 2)
        return delay

    def reset(self) -> None:
        self._next = self.first
