"""The client's sessions with its nodes: one :class:`NodeLink` per node.

:class:`Links` connects to a node and opens a session (the handshake up to
READY, REFUSED or BUSY), waits for a node busy with other clients, keeps the
heartbeat of each link, re-joins a lost node with backoff and hooks up
discovery (nodes found over UDP join).  It knows nothing of jobs: what a
session opens with, and what happens when a node becomes ready or is lost,
is its owner's (:class:`~dpool.core.client.Client`, see :class:`Owner`).
All of it runs in the owner's loop thread.
"""
import asyncio
import collections
import logging
from typing import Any, Callable, Protocol

from .. import liveness
from .. import protocol as P
from .. import serialize
from ..errors import AuthenticationError, ConnectionClosed, DpoolError, NodeLost, ProtocolError
from ..transport import PROTOCOL_VERSION, client_ssl_context, connect

log = logging.getLogger("dpool")

#: How often a busy node (its CPUs all taken by other clients) is asked again.
BUSY_POLL = 0.5


def describe(exc):
    """An exception's text, never empty (``TimeoutError()`` says nothing)."""
    text = str(exc)
    return text if text.strip() else type(exc).__name__


def client_hello():
    return {"protocol": PROTOCOL_VERSION, "role": "client", **serialize.runtime_versions()}


def tls_context(cafile=None, certfile=None, keyfile=None):
    """The TLS setup of every API: TLS to the nodes when any file is given.
    The nodes' certificates are checked against ``cafile`` (the system CAs if
    None); ``certfile`` and ``keyfile`` are this client's certificate, for
    nodes that require one.  None (no TLS) when no file is given."""
    if not (cafile or certfile):
        return None
    return client_ssl_context(cafile=cafile, certfile=certfile, keyfile=keyfile)


class NodeLink:
    """The client's side of one session with one node."""

    def __init__(self, address, conn=None):
        self.address = address  # (host, port) or "embedded"
        self.conn = conn
        self.info = {}
        self.fns = collections.OrderedDict()  # fn_id -> jobs in flight here (LRU order)
        self.ready = False
        self.error = None
        self.jobs_done = 0
        self.cpu_time = 0.0
        self.ready_future = None
        # Job ids given to this node and not done there: the only ones it may
        # report on (results, starts, provisional results, files).
        self.in_flight = set()
        self.heartbeat = None  # a liveness.Heartbeat while the session is open (TCP only)
        self.retry = True  # False: the node refused us, or we closed it: don't re-join
        # (token, terminate): take over the session a client that went away
        # left there (Client.recover) instead of opening one.
        self.recover = None
        self.adopted = []  # the Jobs of that session, once READY

    hold = False  # True: READY but not given jobs until an extension admits it
    busy = False  # True: the node answered Busy (other clients hold its CPUs)
    refusal = None  # the node's reason, if it refused the session
    draining = False  # True: the node said it is shutting down

    @property
    def name(self):
        return self.info.get("name") or str(self.address)

    @property
    def where(self):
        """host:port (nodes on one host share a name)."""
        if isinstance(self.address, tuple):
            return "%s:%s" % tuple(self.address)
        return str(self.address)

    @property
    def cpus(self):
        return self.info.get("cpus", 0)

    @property
    def tx(self):
        """Bytes sent to the node on this session's connection."""
        return self.conn.bytes_sent if self.conn is not None else 0

    @property
    def rx(self):
        """Bytes received from the node on this session's connection."""
        return self.conn.bytes_received if self.conn is not None else 0

    def traffic(self):
        """(tx, rx) in one call (once per finished job for JobCluster)."""
        conn = self.conn
        return (0, 0) if conn is None else (conn.bytes_sent, conn.bytes_received)

    def __repr__(self):
        return f"<node {self.name} {self.address}>"

    def forgettable(self, keep):
        """The least recently used functions in ``fns`` no job in flight
        needs, enough to bring it down to ``keep`` if it can (to be removed
        with :meth:`forget` as the node is told to forget them)."""
        fns, drop = self.fns, []  # type: Any, list[Any]
        excess = len(fns) - keep
        for fn_id, count in fns.items():
            if len(drop) >= excess:
                break
            if count == 0:
                drop.append(fn_id)
        return drop

    def forget(self, drop):
        for fn_id in drop:
            del self.fns[fn_id]


class Owner(Protocol):
    """What :class:`Links` needs from the client it serves."""

    loop: asyncio.AbstractEventLoop
    closed: bool
    secret: Any
    ssl: Any
    connect_timeout: float
    liveness: liveness.Settings

    def opening(self, link: NodeLink) -> list:
        """The messages that open ``link``'s session (may raise DpoolError: not used)."""

    def link_ready(self, link: NodeLink) -> None:
        """``link``'s session opened (READY): its info is set."""

    def cpus_changed(self, link: NodeLink, info: dict) -> None:
        """READY again on an open session: the node's CPUs changed."""

    def link_lost(self, link: NodeLink) -> None:
        """A ready link closed (``link.error`` says why); it may be re-joined."""

    def link_back(self, link: NodeLink) -> None:
        """A lost (or busy) node re-joined."""

    def claim(self, link: NodeLink) -> bool:
        """True if ``link``'s connection may be used now (False: another
        thread holds it for a moment and was asked to give it back)."""


def _ignore(link, msg, frames):
    """Heartbeat: its bytes already counted as a sign of life."""


class Links:
    """The owner's links to its nodes, and the tasks that keep them."""

    def __init__(self, owner: Owner):
        self.owner = owner
        self.loop = owner.loop
        self.links: list[NodeLink] = []
        self.handlers: dict[type, Callable[[NodeLink, Any, list], None]] = {
            P.Ready: self._on_ready, P.Refused: self._on_refused, P.Busy: self._on_busy,
            P.Heartbeat: _ignore}
        self.finder: Any = None  # a core.discover.Finder once discovery runs
        self._ticker: asyncio.TimerHandle | None = None  # the heartbeat timer
        self.rejoins: dict[Any, asyncio.Task] = {}  # address -> task retrying a lost/busy node
        self._busy_until: dict[Any, float] = {}  # address -> when to stop waiting for it
        self._busy_given_up: set = set()  # addresses left for being busy (discovery asks again)

    @property
    def closed(self):
        return self.owner.closed

    def any_ready(self):
        return any(link.ready for link in self.links)

    # ------------------------------------------------------ connecting

    async def connect(self, address, link=None, quiet=False, timeout=None):
        """Connect to a node and open a session, within connect_timeout.
        On failure the link keeps the error (never an empty text) and a node
        that may come back is retried in the background; a node busy with
        other clients is waited for (the user told once) up to the connect
        timeout from the first try."""
        host, port = address
        link = link or NodeLink(address)
        self._replace_link(link)
        owner = self.owner
        timeout = timeout or owner.connect_timeout
        start = self.loop.time()
        try:
            async with asyncio.timeout(timeout):
                link.conn = await connect(host, port, secret=owner.secret or b"",
                                          hello=client_hello, ssl=owner.ssl, timeout=timeout)
                await self.open_session(link)
            self._busy_given_up.discard(address)
        except (OSError, DpoolError, TimeoutError) as exc:
            if isinstance(exc, TimeoutError) and not str(exc):
                exc = TimeoutError(f"no answer from {host}:{port} within the connect "
                                   f"timeout of {timeout} s")
            link.error = link.error or exc
            if link.busy:
                self._on_busy_node(link, start)
            elif not quiet:
                log.warning("node %s:%s: %s", host, port, describe(link.error))
            if link.conn is not None:
                link.conn.abort()
            self._maybe_rejoin(link)

    def _on_busy_node(self, link, start):
        """``link``'s node is busy: say so once, and wait for it (the rejoin
        task retries) until the connect timeout from the first try."""
        if link.address not in self._busy_until:
            self._busy_until[link.address] = start + self.owner.connect_timeout
            level = logging.DEBUG if link.address in self._busy_given_up else logging.WARNING
            log.log(level, "node %s:%s is busy with another client (%s); waiting for it up "
                    "to the connect timeout of %g s", *link.address, describe(link.error),
                    self.owner.connect_timeout)

    def _replace_link(self, link):
        """Add ``link``; a lost link to the same address is replaced."""
        for i, old in enumerate(self.links):
            if old is link:
                return
            if old.address == link.address and not old.ready and old.error is not None:
                self.links[i] = link
                return
        self.links.append(link)

    async def open_session(self, link):
        """Open a session on ``link``'s connection; returns once READY."""
        self._replace_link(link)
        link.ready_future = self.loop.create_future()
        link.conn.set_receiver(lambda frames: self._on_message(link, frames),
                               lambda exc=None: self._on_closed(link, exc))
        if link.address != "embedded":  # in-process links don't go silent
            settings = self.owner.liveness
            link.conn.set_deadline(settings.deadline)
            link.heartbeat = liveness.Heartbeat(settings, self.loop.time(),
                                                link.conn.bytes_received, link.conn.bytes_sent)
            self._start_ticker()
        for message in self.owner.opening(link):
            link.conn.send(message)
        await asyncio.wait_for(link.ready_future, self.owner.connect_timeout)

    async def wait_busy(self):
        """No node is ready yet but some are busy with other clients: wait
        until one is ready or none is waited for (each at most its connect
        timeout; see :meth:`connect`)."""
        while not self.any_ready():
            if not any(address in self.rejoins for address in self._busy_until):
                return
            # Any retry may end it: another node, down at first, that is back.
            await asyncio.wait(list(self.rejoins.values()),
                               return_when=asyncio.FIRST_COMPLETED)

    def knows(self, address):
        """Whether ``address`` is a node in use, or lost and being retried."""
        return address in self.rejoins or any(link.address == address and link.ready
                                               for link in self.links)

    async def join(self, address):
        """Connect to one more node (a lost one is retried)."""
        await self.connect(address)

    # ----------------------------------------------------- the session

    def _on_message(self, link, frames):
        msg = P.decode(frames[0])
        handler = self.handlers.get(type(msg))
        if handler is None:  # e.g. a job-environment message with no JobEnv registered
            link.error = ProtocolError(f"node {link.name} sent {P.op_of(msg).name}, which "
                                       f"this client does not expect: closing its connection")
            log.error("%s", link.error)
            link.conn.abort()
            return
        handler(link, msg, frames)

    def _on_ready(self, link, msg, frames):
        if link.ready:  # again: a scheduler whose CPUs changed (nodes joined)
            self.owner.cpus_changed(link, msg.info)
            return
        link.info = msg.info
        link.ready = True
        if not link.ready_future.done():
            link.ready_future.set_result(None)
        self.owner.link_ready(link)

    def _on_refused(self, link, msg, frames):
        link.retry = False
        link.refusal = msg.reason
        link.error = DpoolError(msg.reason)
        if not link.ready_future.done():
            link.ready_future.set_exception(link.error)

    def _on_busy(self, link, msg, frames):
        link.busy = True
        link.error = DpoolError(msg.reason)
        if not link.ready_future.done():
            link.ready_future.set_exception(link.error)

    def _on_closed(self, link, exc):
        if link.error is None:
            link.error = exc or ConnectionClosed(f"node {link.name} closed the connection")
        link.heartbeat = None
        if link.ready_future is not None and not link.ready_future.done():
            link.ready_future.set_exception(link.error)
        was_ready, link.ready = link.ready, False
        if not was_ready:
            return
        self.owner.link_lost(link)
        self._maybe_rejoin(link)

    def close_link(self, link, bye=True):
        """End the session with one node (loop thread); see Client.close_link."""
        link.retry = False
        if link.conn is not None and not link.conn.closed:
            if link.ready and bye:
                link.conn.send([P.encode(P.Bye)])
            link.conn.close()

    # ------------------------------------------------ liveness and re-join

    def _start_ticker(self):
        if self._ticker is None and not self.closed:
            self._ticker = self.loop.call_later(self.owner.liveness.tick, self._tick)

    def _tick(self):
        """Every ``liveness.tick`` s: heartbeats out, silent nodes lost."""
        now = self.loop.time()
        settings = self.owner.liveness
        for link in list(self.links):
            hb, conn = link.heartbeat, link.conn
            if hb is None or conn is None or conn.closed or not self.owner.claim(link):
                continue
            verdict = hb.tick(now, conn.bytes_received, conn.bytes_sent)
            if verdict is liveness.SEND:
                conn.send([P.encode(P.Heartbeat)])
            elif verdict is liveness.LOST:
                link.error = NodeLost(f"node {link.name} ({link.where}) sent nothing for "
                                      f"{hb.silence(now):.1f} s (heartbeat deadline "
                                      f"{settings.deadline} s)")
                conn.abort()  # its close callback moves its jobs elsewhere
        self._ticker = self.loop.call_later(settings.tick, self._tick)

    def _maybe_rejoin(self, link):
        """Retry a lost node in the background, unless it refused us, we
        closed it, or it can't be used anyway (wrong secret, protocol)."""
        address = link.address
        if self.closed or not link.retry or not isinstance(address, tuple) \
                or address in self.rejoins \
                or isinstance(link.error, (AuthenticationError, ProtocolError)):
            return
        self.rejoins[address] = self.loop.create_task(self._rejoin(address))

    async def _rejoin(self, address):
        settings = self.owner.liveness
        backoff = liveness.Backoff(first=min(0.25, settings.interval),
                                   cap=max(1.0, min(5.0, settings.deadline / 2)))
        try:
            while not self.closed:
                until = self._busy_until.get(address)
                if until is not None and self.loop.time() >= until:
                    self._give_up_busy(address)
                    return
                await asyncio.sleep(backoff.next() if until is None else BUSY_POLL)
                link = NodeLink(address)
                timeout = None if until is None else max(0.5, until - self.loop.time())
                await self.connect(address, link, quiet=True, timeout=timeout)
                if link.ready:
                    if self._busy_until.pop(address, None) is not None:
                        log.info("node %s (%s:%s) is free now: using it", link.name, *address)
                    else:
                        log.warning("node %s (%s:%s) is back", link.name, *address)
                    self.owner.link_back(link)
                    return
                if not link.retry or isinstance(link.error, (AuthenticationError, ProtocolError)):
                    log.warning("node %s:%s: %s (not retried)", *address, describe(link.error))
                    return
        finally:
            self.rejoins.pop(address, None)
            self._busy_until.pop(address, None)  # (a busy wait ends with its retries)

    def _give_up_busy(self, address):
        """The connect timeout passed and the node is still busy: not used."""
        self._busy_until.pop(address, None)
        level = logging.DEBUG if address in self._busy_given_up else logging.WARNING
        self._busy_given_up.add(address)
        for link in self.links:
            if link.address == address and not link.ready and link.busy:
                link.error = DpoolError(f"{describe(link.error)}; still busy with another "
                                        f"client after the connect timeout of "
                                        f"{self.owner.connect_timeout:g} s")
                log.log(level, "node %s:%s: %s (not used)", *address, link.error)

    def gave_up_busy(self, address):
        """Whether ``address`` was left for being busy and is not being
        waited for now (discovery, hearing from it again, asks again)."""
        return address in self._busy_given_up and address not in self._busy_until \
            and not self.knows(address)

    # --------------------------------------------------------- discovery

    async def discover(self, settings, patterns=()):
        """Start looking for nodes over UDP with ``settings`` (a
        core.discover.Discovery), if not yet, and for ``patterns`` too."""
        from .discover import Finder

        if self.finder is None:
            self.finder = Finder(self, settings)
            await self.finder.start()
        if patterns:
            self.finder.add(patterns)

    # ---------------------------------------------------------- shutdown

    def stop(self):
        """Stop discovery, heartbeats and re-joins."""
        if self.finder is not None:
            self.finder.close()
        if self._ticker is not None:
            self._ticker.cancel()
        for task in list(self.rejoins.values()):
            task.cancel()

    def close_all(self):
        """Say BYE on every open session and close it (its close callback
        runs later)."""
        for link in self.links:
            if link.conn is not None and not link.conn.closed:
                if link.ready:
                    link.conn.send([P.encode(P.Bye)])
                link.ready = False
                link.conn.close()

    async def wait_closed(self, grace):
        """A graceful close (TLS's in particular) needs the loop for a
        moment more: wait for it, briefly, then abort what is left."""
        conns = [link.conn for link in self.links if link.conn is not None]
        if conns:
            done, pending = await asyncio.wait(
                [asyncio.ensure_future(conn.wait_closed()) for conn in conns], timeout=grace)
            for future in pending:
                future.cancel()
            for conn in conns:
                conn.abort()
