"""Discovery for a client: nodes found over UDP join the client's nodes.

::

    client loop thread
    ──────────────────
    Finder.start: Seeker (dpool.transport.udp) pings at PING_AT, then every
      PING_EVERY s; hears pongs and announcements (nodes starting later)
    on_found(Found) ─► matches a pattern? not known yet? ─► Links.connect:
      the full TCP handshake and session, as for a node named by address

A node found by discovery is used only once its TCP handshake has proved
that it knows the secret: a datagram only tells the client where to look.
"""
from __future__ import annotations

import asyncio
import fnmatch
import logging
import os
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from ..hosts import PATTERN_CHARS, is_pattern, parse_address  # noqa: F401 (API)
from ..transport import discovery as D
from ..transport import udp

log = logging.getLogger("dpool")

#: Seconds after start at which the client pings (then every PING_EVERY s):
#: 8 rounds in the first 7.5 s, so that with 30% of datagrams lost each way
#: (a round fails for a node with 1 - 0.7 * 0.7 = 0.51) a node is missed by
#: all of them with 0.51**8 = 0.5%, by the 10 rounds of the first 17.5 s 0.12%.
PING_AT = (0.0, 0.3, 0.7, 1.2, 2.0, 3.0, 5.0, 7.5)
PING_EVERY = 5.0
#: Seconds a client starting with discovery waits for nodes to answer, at
#: least (it goes on at once past that when a node is ready).
SETTLE = 1.0
#: Nodes a Finder remembers at most (and node ids): past it, the one heard
#: from least recently is forgotten.
MAX_FOUND = 4096
#: Seconds after which a node not heard from is forgotten (heard again, it
#: is found anew).
FORGET_AFTER = 600.0

#: Comma-separated addresses to ping instead of every interface's broadcast
#: address (a subnet's broadcast address, or hosts across a router).
TARGETS_ENV = "DPOOL_DISCOVER_TO"
#: The UDP port announcements go to and clients listen on (default 51351).
ANNOUNCE_PORT_ENV = "DPOOL_ANNOUNCE_PORT"


@dataclass
class Discovery:
    """What to look for: ``patterns`` are ``(host pattern, port)`` pairs
    (``fnmatch`` on the node's address or name: ``*``, ``10.77.*``,
    ``10.77.0.1?``); ``ping_to`` (tests, relays) replaces the broadcast
    targets; ``listen_port`` None: don't listen for announcements."""
    patterns: list[tuple[str, int]]
    secret: bytes
    node_port: int
    listen_port: int | None = udp.LISTEN_PORT
    ping_to: list[tuple[str, int]] | None = None
    host: str = ""
    multicast: bool = False
    wait: float | None = None        # default: the client's connect timeout

    def matches(self, found: udp.Found) -> bool:
        host, port = found.address
        return any(port == want_port and (fnmatch.fnmatchcase(host, pattern)
                                          or fnmatch.fnmatchcase(found.name, pattern))
                   for pattern, want_port in self.patterns)

    def ports(self) -> set[int]:
        return {port for _, port in self.patterns} or {self.node_port}


def announce_port() -> int:
    """The announcement port: ``$DPOOL_ANNOUNCE_PORT``, else 51351."""
    text = os.environ.get(ANNOUNCE_PORT_ENV, "").strip()
    if not text:
        return udp.LISTEN_PORT
    if not text.isdigit() or not 0 < int(text) <= 65535:
        raise ValueError(f"{ANNOUNCE_PORT_ENV}={text!r} is not a UDP port")
    return int(text)


def settings(patterns: Iterable[tuple[str, int]], secret: bytes, node_port: int,
             **options) -> Discovery:
    """A :class:`Discovery` for ``patterns``, ``$DPOOL_DISCOVER_TO`` (the
    targets of pings, each ``host`` or ``host:port``) and
    ``$DPOOL_ANNOUNCE_PORT`` taken into account."""
    patterns = list(patterns)
    ports = {port for _, port in patterns} or {node_port}
    targets = [part.strip() for part in os.environ.get(TARGETS_ENV, "").split(",")
               if part.strip()]
    ping_to = None
    if targets:
        ping_to = [parse_address(t, port) for t in targets for port in sorted(ports)]
    options.setdefault("listen_port", announce_port())
    return Discovery(patterns, secret, node_port, ping_to=ping_to, **options)


class Finder:
    """Runs discovery for one client's :class:`~dpool.core.links.Links`
    (loop thread): found nodes join through it."""

    def __init__(self, client, settings: Discovery):
        self.client = client
        self.settings = settings
        # Nodes heard of, least recently heard first, and when (the clock's time).
        self.found: OrderedDict[tuple[str, int], udp.Found] = OrderedDict()
        self.heard: dict[tuple[str, int], float] = {}
        self.ids: OrderedDict[str, tuple[str, int]] = OrderedDict()  # node id -> address used
        self.clock: Callable[[], float] = time.monotonic
        self.connecting: dict[tuple[str, int], asyncio.Task] = {}
        self.seeker: udp.Seeker | None = None
        self._pinger: asyncio.Task | None = None

    async def start(self) -> None:
        s = self.settings
        self.seeker = udp.Seeker(D.discovery_key(s.secret), self._on_found,
                                 node_port=s.node_port, host=s.host,
                                 listen_port=s.listen_port, ping_to=s.ping_to,
                                 multicast=s.multicast)
        await self.seeker.start()
        self._pinger = asyncio.get_running_loop().create_task(
            udp.at_times(PING_AT, self.ping, every=PING_EVERY, then=self._ping_again))

    def add(self, patterns: Iterable[tuple[str, int]]) -> None:
        """Look for more patterns (dispy's discover_nodes), pinging at once."""
        for pattern in patterns:
            if pattern not in self.settings.patterns:
                self.settings.patterns.append(pattern)
        for known in list(self.found.values()):
            self._on_found(known, again=True)
        self.ping()

    def ping(self) -> None:
        if self.seeker is None:
            return
        s = self.settings
        if s.ping_to is not None:
            self.seeker.ping()
            return
        for port in self.settings.ports():
            self.seeker.ping(self.seeker.targets_at(port))

    def _ping_again(self) -> None:
        self.forget_old()
        self.ping()

    def _on_found(self, found: udp.Found, again: bool = False) -> None:
        address = found.address
        if self.client.closed:
            return
        known = address in self.found
        self._remember(found)
        if known and not again and not self.client.gave_up_busy(address):
            return   # known (a node left for being busy is asked again)
        if not self.settings.matches(found) or self._linked(address) \
                or self._elsewhere(found):
            return
        log.info("discovered node %s at %s:%d", found.name, *address)
        task = asyncio.get_running_loop().create_task(self.client.join(address))
        self.connecting[address] = task
        task.add_done_callback(lambda _: self.connecting.pop(address, None))

    def _remember(self, found: udp.Found) -> None:
        """``found`` heard now; past MAX_FOUND the least recently heard is forgotten."""
        address = found.address
        self.found[address] = found
        self.found.move_to_end(address)
        self.heard[address] = self.clock()
        if len(self.found) > MAX_FOUND:
            oldest, _ = self.found.popitem(last=False)
            del self.heard[oldest]

    def forget_old(self) -> None:
        """Forget the nodes not heard from for FORGET_AFTER s, and the ids
        of the nodes forgotten (each ping round)."""
        found, heard = self.found, self.heard
        limit = self.clock() - FORGET_AFTER
        while found and heard[next(iter(found))] < limit:
            del heard[found.popitem(last=False)[0]]
        self.ids = OrderedDict((node_id, address) for node_id, address in self.ids.items()
                               if address in found)

    def _elsewhere(self, found: udp.Found) -> bool:
        """Whether the node is used (or being joined) at another address: a
        node on 0.0.0.0 is heard at each of its addresses the client's pings
        reach (127.0.0.1 and its LAN address, on its own host)."""
        node_id = found.body.get("id")
        if not isinstance(node_id, str) or not node_id:
            return False
        first = self.ids.setdefault(node_id, found.address)
        self.ids.move_to_end(node_id)
        if len(self.ids) > MAX_FOUND:
            self.ids.popitem(last=False)
        if first != found.address and (first in self.connecting or any(
                link.address == first and link.ready for link in self.client.links)):
            return True   # (one being retried there does not count: it may be unreachable)
        self.ids[node_id] = found.address
        return False

    def _linked(self, address: tuple[str, int]) -> bool:
        """Connected, connecting or being retried (a lost node rejoins by itself)."""
        return address in self.connecting or self.client.knows(address)

    async def settled(self, timeout: float) -> None:
        """Return once a node is ready and no discovered node is still
        connecting (after SETTLE s at least), or after ``timeout`` s."""
        loop = asyncio.get_running_loop()
        start = loop.time()
        while loop.time() - start < timeout:
            ready = any(link.ready for link in self.client.links)
            if ready and not self.connecting and loop.time() - start >= SETTLE:
                return
            await asyncio.sleep(0.05)

    def close(self) -> None:
        if self._pinger is not None:
            self._pinger.cancel()
        for task in list(self.connecting.values()):
            task.cancel()
        if self.seeker is not None:
            self.seeker.close()
