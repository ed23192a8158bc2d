"""The scheduler's side of its nodes (``dpool-scheduler``, see broker.py).

::

    Broker ──► NodePort (one per node) ── anchor session: holds the node's CPUs
                  │                         for the scheduler, heartbeats, re-join
                  └── Leg (one per client using the node): a shared session of
                      the node opened for that client, carrying its computation
                      (initializer, depends, setup) and its jobs

A leg is a node session like any client's (same handshake, records,
heartbeats); its options carry ``shared`` so that the node lets several
legs share the CPUs its anchor holds.  The scheduler never places more jobs
on a node than it has CPUs: the CPU accounting is the broker's.
"""
from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable
from typing import Any

from .. import liveness
from .. import protocol as P
from ..errors import DpoolError, ProtocolError
from ..transport import Connection, connect
from .client import client_hello, describe

log = logging.getLogger("dpool.scheduler")


class Watch:
    """Heartbeats out and a deadline in, for a set of connections: one
    timer for them all.  ``add(conn, settings)``; a connection silent past
    its deadline is aborted (its close callback does the rest)."""

    def __init__(self, tick: float = 0.25) -> None:
        self.tick = tick
        self.beats: dict[Connection, liveness.Heartbeat] = {}
        self._timer: asyncio.TimerHandle | None = None

    def add(self, conn: Connection, settings: liveness.Settings) -> None:
        loop = asyncio.get_running_loop()
        conn.set_deadline(settings.deadline)
        self.beats[conn] = liveness.Heartbeat(settings, loop.time(), conn.bytes_received,
                                              conn.bytes_sent)
        if self._timer is None:
            self._timer = loop.call_later(min(self.tick, settings.tick), self._tick)

    def discard(self, conn: Connection) -> None:
        self.beats.pop(conn, None)

    def _tick(self) -> None:
        loop = asyncio.get_running_loop()
        now = loop.time()
        for conn, beat in list(self.beats.items()):
            if conn.closed:
                del self.beats[conn]
                continue
            verdict = beat.tick(now, conn.bytes_received, conn.bytes_sent)
            if verdict is liveness.SEND:
                conn.send([P.encode(P.Heartbeat)])
            elif verdict is liveness.LOST:
                log.warning("%s sent nothing for %.1f s (deadline %s s): treating it as gone",
                            conn.peer, beat.silence(now), beat.settings.deadline)
                del self.beats[conn]
                conn.abort()
        self._timer = loop.call_later(self.tick, self._tick) if self.beats else None

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.beats.clear()


class Link:
    """One session the scheduler holds on a node (an anchor or a leg)."""

    def __init__(self, port: NodePort) -> None:
        self.port = port
        self.conn: Connection | None = None
        self.ready = False
        self.closed = False
        self.info: dict = {}
        self._ready: asyncio.Future | None = None

    async def open(self, options: dict, frames: list, preamble: Callable[[], list],
                   on_message: Callable[[Link, Any, list], None],
                   on_close: Callable[[Link, BaseException | None], None]) -> None:
        """Connect, send Session (+ ``frames``) and what ``preamble()`` holds;
        return at Ready.  Raises on failure (the caller logs it)."""
        port = self.port
        timeout = port.connect_timeout
        loop = asyncio.get_running_loop()
        self._ready = loop.create_future()
        async with asyncio.timeout(timeout):
            conn = await connect(port.host, port.port, secret=port.secret, hello=client_hello(),
                                 ssl=port.ssl, timeout=timeout)
            if self.closed:
                conn.abort()
                raise DpoolError("closed")
            self.conn = conn
            def closed(exc: BaseException | None = None) -> None:
                self._on_close(exc, on_close)
            conn.set_receiver(functools.partial(self._on_frames, on_message=on_message),
                              closed)   # (a partial: no Python frame of its own per message)
            options = dict(options, heartbeat=port.liveness.as_option())
            conn.send([P.encode(P.Session, options), *frames])
            for message in preamble():
                conn.send(message)
            port.watch.add(conn, port.liveness)
            await self._ready

    def _on_frames(self, frames: list, on_message: Callable[[Link, Any, list], None]) -> None:
        try:
            msg = P.decode(frames[0])
        except ProtocolError as exc:
            log.warning("node %s: %s; closing the session", self.port, exc)
            self.abort()
            return
        kind = type(msg)
        if kind is P.Ready:
            self.info, self.ready = msg.info, True
            if self._ready is not None and not self._ready.done():
                self._ready.set_result(None)
        elif kind is P.Refused or kind is P.Busy:  # Busy: another client holds its CPUs
            self._fail(DpoolError(f"node {self.port}: {msg.reason}"))
        elif kind is not P.Heartbeat:
            on_message(self, msg, frames)

    def _fail(self, exc: BaseException) -> None:
        if self._ready is not None and not self._ready.done():
            self._ready.set_exception(exc)
        self.abort()

    def _on_close(self, exc: BaseException | None,
                  on_close: Callable[[Link, BaseException | None], None]) -> None:
        if self._ready is not None and not self._ready.done():
            self._ready.set_exception(exc or DpoolError(f"node {self.port} closed the session"))
        was_ready, self.ready = self.ready, False
        self.closed = True
        if self.conn is not None:
            self.port.watch.discard(self.conn)
        if was_ready:
            on_close(self, exc)

    def send(self, frames: list) -> bool:
        if self.conn is None or self.conn.closed:
            return False
        self.conn.send(frames)
        return True

    def bye(self) -> None:
        """End the session: the node kills its running jobs, frees its workers."""
        self.closed = True
        if self.conn is not None and not self.conn.closed:
            self.conn.send([P.encode(P.Bye)])
            self.conn.close()

    def abort(self) -> None:
        self.closed = True
        if self.conn is not None:
            self.conn.abort()


class NodePort:
    """One node the scheduler drives: its address, its CPUs, the jobs of all
    clients running there (``busy``), its anchor session and re-join."""

    def __init__(self, host: str, port: int, *, secret: bytes, ssl: Any, watch: Watch,
                 settings: liveness.Settings, connect_timeout: float, group: str) -> None:
        self.host, self.port = host, port
        self.group = group  # this scheduler's name for its shared sessions (option ``shared``)
        self.secret, self.ssl = secret, ssl
        self.watch = watch
        self.liveness = settings
        self.connect_timeout = connect_timeout
        self.anchor: Link | None = None
        self.cpus = 0
        self.busy = 0  # jobs placed here and not done
        self.draining = False
        self.name = f"{host}:{port}"
        self.error: BaseException | None = None
        self.rejoin: asyncio.Task | None = None
        self.closed = False
        self.found = False  # found by discovery (forgotten when lost for long)

    def __repr__(self) -> str:
        return self.name

    @property
    def address(self) -> tuple[str, int]:
        return (self.host, self.port)

    @property
    def node_id(self) -> str | None:
        """The id the node sent in its anchor session's Ready (after the
        authenticated handshake): the same node at any address."""
        node_id = (self.anchor.info if self.anchor else {}).get("id")
        return node_id if isinstance(node_id, str) and node_id else None

    @property
    def ready(self) -> bool:
        return self.anchor is not None and self.anchor.ready and not self.closed

    def free(self, ahead: bool = False) -> int:
        """Jobs this node may take now: one per CPU, or with ``ahead`` (one
        client alone on the scheduler) one more per CPU, waiting in its
        session so that no CPU idles for a round trip to the scheduler."""
        if self.draining or not self.ready:
            return 0
        return self.cpus * (2 if ahead else 1) - self.busy

    async def join(self, on_message: Callable[[Link, Any, list], None],
                   on_close: Callable[[Link, BaseException | None], None]) -> bool:
        """Open the anchor session; True when the node is ready."""
        anchor = Link(self)
        try:
            await anchor.open({"shared": self.group, "anchor": True}, [], list, on_message,
                              on_close)
        except (OSError, DpoolError, TimeoutError) as exc:
            anchor.abort()
            self.error = exc
            return False
        self.anchor, self.error, self.draining, self.busy = anchor, None, False, 0
        self.cpus = anchor.info.get("cpus", 0)
        self.name = f"{anchor.info.get('name', self.host)} ({self.host}:{self.port})"
        return True

    async def keep_joining(self, on_message: Callable[[Link, Any, list], None],
                           on_close: Callable[[Link, BaseException | None], None],
                           on_ready: Callable[[NodePort], None], give_up: float | None = None,
                           on_gone: Callable[[NodePort], None] | None = None) -> None:
        """Retry the node with backoff until it answers (or we close); with
        ``give_up``, call ``on_gone`` instead once that many seconds passed."""
        backoff = liveness.Backoff(first=min(0.25, self.liveness.interval),
                                   cap=max(1.0, min(5.0, self.liveness.deadline / 2)))
        loop = asyncio.get_running_loop()
        until = None if give_up is None else loop.time() + give_up
        try:
            while not self.closed:
                if await self.join(on_message, on_close):
                    on_ready(self)
                    return
                log.debug("node %s:%s: %s", self.host, self.port, describe(self.error))
                if until is not None and loop.time() >= until and on_gone is not None:
                    break
                await asyncio.sleep(backoff.next())
        finally:
            self.rejoin = None
        if not self.closed and on_gone is not None:
            on_gone(self)

    def close(self) -> None:
        self.closed = True
        if self.rejoin is not None:
            self.rejoin.cancel()
        if self.anchor is not None:
            self.anchor.bye()
