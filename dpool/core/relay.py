"""``dpool-relay``'s logic: carry discovery across a router.

Broadcasts stop at a router, so a client on one subnet hears neither the
announcements nor the pongs of nodes on another.  A relay runs on a host of
the nodes' subnet and passes them on::

    nodes' subnet                     relay (this module)                    elsewhere
    ─────────────                     ───────────────────                    ─────────
    node ANNOUNCE (broadcast) ──►  listener, UDP 51351 ─┐
    node PONG (to the relay)  ──►  ping socket          ├► verified, not relayed
                                                        │  already? ─► ANNOUNCE
    PING (broadcast) ◄── at start, every --interval,    │  signed anew ──────────────► --client
                         and on a client's ping          │                             HOST:51351
                                   relay port, UDP 51352 ◄─ verified PING ─────────── client
                                     └─ the nodes it knows, as ANNOUNCEs (never more
                                        bytes than that client's pings) ────────────► its source

Only datagrams that verify under the cluster's discovery key (MAC,
freshness, replay cache: :class:`~dpool.transport.discovery.Verifier`) are
acted on, and nodes are heard only from the relay's own subnets; everything
else is dropped (with a rate-limited log line) and nothing is sent back.
What the relay sends on is a new ANNOUNCE it signs itself, carrying the
node's own body with its address first and ``via`` (so the client connects
to the node, never to the relay); the client then does the full TCP
handshake with the node, as for any discovered node.

No amplification: a client named with ``--client`` (the operator's choice)
gets every node the relay hears; an address learned from its pings (a
client pinging the relay, e.g. ``DPOOL_DISCOVER_TO=relayhost:51352``) is
sent at most as many bytes as it has sent the relay in verified pings
(:class:`Credit`).  Loops: what a relay sends carries ``via`` (its name,
under the MAC), and a relay passes on nothing that has one.

No state that matters: the nodes table is soft (entries expire after
``3 * interval``) and refilled by pinging at start, so a restarted relay
finds its nodes again within a ping.
"""
from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from ..transport import discovery as D
from ..transport import udp
from ..transport.netaddr import interface_addresses

__all__ = ["Relay", "Credit", "relayed_body", "INTERVAL", "PING_AT", "MAX_NODES"]

log = logging.getLogger("dpool.relay")

Address = tuple[str, int]

#: Seconds between the relay's pings of its subnet (after the first ones).
INTERVAL = 10.0
#: Seconds after start at which the relay pings its subnet (UDP may drop some).
PING_AT = (0.0, 0.5, 1.5)
#: The fewest seconds between two pings of the subnet a client's ping causes.
MIN_PING_GAP = 1.0
#: Learned clients remembered at most (the oldest is forgotten first).
MAX_LEARNED = 256
#: Nodes remembered at most (the one heard from longest ago is forgotten first).
MAX_NODES = 2048
#: The most credit (bytes) a learned client may hold.
MAX_CREDIT = 8 * D.MAX_DATAGRAM


def relayed_body(body: Mapping[str, Any], source: str, via: str) -> dict[str, Any] | None:
    """The body the relay announces for a node heard from ``source``: the
    node's own without ``re`` (a pong's), its addresses with ``source``
    first if listed (else as the node gave them: an ``--ext-host`` behind
    NAT), plus ``via``, the relay's name; None if it came through a relay
    already (it has a ``via``: never relayed twice, so relays can't loop)."""
    if "via" in body:
        return None
    addrs = [str(a) for a in body.get("addrs") or []]
    out = {k: v for k, v in body.items() if k != "re"}
    if source in addrs or not addrs:
        addrs = [source, *(a for a in addrs if a != source)]
    out["addrs"] = addrs[:4]
    out["via"] = str(via)[:D.NAME_MAX]
    return out


def local_networks() -> list[ipaddress.IPv4Network]:
    """The IPv4 networks of this host's interfaces (loopback included)."""
    return [ipaddress.IPv4Network(f"{addr}/{mask}", strict=False)
            for _, addr, mask, _ in interface_addresses() if mask]


@dataclass
class Credit:
    """Bytes a learned client may still be sent: what it sent in verified
    pings minus what it was sent (never more than MAX_CREDIT)."""
    bytes: int = 0
    expires: float = 0.0
    cursor: int = 0          # where the next reply starts in the nodes table

    def grant(self, size: int, until: float) -> None:
        self.bytes = min(MAX_CREDIT, self.bytes + size)
        self.expires = until

    def spend(self, size: int) -> bool:
        if size > self.bytes:
            return False
        self.bytes -= size
        return True


@dataclass
class _Heard:
    body: dict[str, Any]
    expires: float


@dataclass
class Stats:
    forwarded: int = 0        # ANNOUNCEs sent to clients
    subnet_pings: int = 0
    client_pings: int = 0
    withheld: int = 0         # not sent to a learned client: no credit left


class Relay(udp.Seeker):
    """A :class:`~dpool.transport.udp.Seeker` that passes on what it hears.

    ``clients`` get every node heard (at their announcement port);
    ``port`` is the UDP port clients may ping (``RELAY_PORT``, 0: any);
    ``ping_to`` replaces the subnet's broadcast targets (tests); ``name``
    (default: the host name) is the ``via`` of what it sends.
    """

    def __init__(self, key: bytes, clients: Iterable[Address] = (), *, node_port: int,
                 port: int, host: str = "", listen_port: int | None = udp.LISTEN_PORT,
                 interval: float = INTERVAL, ping_to: Iterable[Address] | None = None,
                 name: str | None = None, clock: Callable[[], float] = time.monotonic):
        super().__init__(key, self._heard, node_port=node_port, host=host,
                         listen_port=listen_port, ping_to=ping_to)
        self.clients = list(clients)
        self.name = name or socket.gethostname()
        self.relay_port = port
        self.interval = interval
        self.clock = clock
        self.nodes: OrderedDict[Address, _Heard] = OrderedDict()
        self.learned: OrderedDict[Address, Credit] = OrderedDict()
        self.stats = Stats()
        self._last_ping = float("-inf")
        self._pinger_task: asyncio.Task | None = None
        self._client_side: asyncio.DatagramTransport | None = None
        self._networks: list[ipaddress.IPv4Network] | None = None

    async def start(self) -> Relay:
        await super().start()
        self._client_side = await self._open(self.host, self.relay_port)
        self.relay_port = self._client_side.get_extra_info("sockname")[1]
        self._pinger_task = asyncio.get_running_loop().create_task(
            udp.at_times(PING_AT, self.ping_subnet, every=self.interval))
        return self

    def close(self) -> None:
        if self._pinger_task is not None:
            self._pinger_task.cancel()
        super().close()

    # ----------------------------------------------------------- the subnet

    def targets(self) -> list[Address]:
        if self.ping_to is not None:
            return self.ping_to
        if self.host and not udp._is_wildcard(self.host):
            broadcast = udp.broadcast_for(self.host)
            return [(broadcast, self.node_port)] if broadcast else []
        return udp.broadcast_targets(self.node_port)

    def ping_subnet(self) -> None:
        """Ping the subnet once; a failure (no broadcast address: --host's
        name did not resolve, say) is logged and the next ping tried anew."""
        self._last_ping = self.clock()
        self.stats.subnet_pings += 1
        try:
            self.ping()
        except (OSError, ValueError) as exc:
            log.warning("cannot ping the subnet: %s (trying again at the next ping)", exc)

    def _heard(self, found: udp.Found) -> None:
        """A verified ANNOUNCE or PONG from the subnet."""
        body = relayed_body(found.body, found.source[0], self.name)
        if body is None or not self.local(found.source[0]):
            return
        try:
            data = D.encode(self.key, D.ANNOUNCE, body)
        except ValueError:       # it fitted; with our via it would not
            self.rejected += 1
            self.rejections.reject(found.source[0], "large", "relay: node %s's announcement "
                                   "from %s is too large to relay; dropped",
                                   body.get("name", "?"), found.source[0])
            return
        now = self.clock()
        key = (found.source[0], int(body["port"]))
        new = key not in self.nodes
        self.nodes[key] = _Heard(body, now + 3 * self.interval)
        self.nodes.move_to_end(key)
        self._forget_nodes(now)
        if new:
            log.info("heard node %s at %s:%d", body.get("name", "?"), *key)
        for client in self.clients:
            self._forward(data, client)
        for client, credit in list(self.learned.items()):
            self._to_learned(data, client, credit, now)

    def local(self, address: str) -> bool:
        """Is ``address`` on one of this host's subnets?  (What is relayed
        comes from the relay's own subnet, not from anyone who can reach it.)"""
        if self._networks is None:
            self._networks = local_networks()
        ip = ipaddress.ip_address(address)
        return any(ip in net for net in self._networks)

    def known(self) -> list[dict[str, Any]]:
        """The bodies of the nodes heard lately (expired ones dropped)."""
        self._forget_nodes(self.clock())
        return [heard.body for heard in self.nodes.values()]

    def _forget_nodes(self, now: float) -> None:
        """Drop the nodes not heard for 3 intervals, and the oldest past
        MAX_NODES (the table is in the order they were last heard)."""
        nodes = self.nodes
        while nodes and (len(nodes) > MAX_NODES or next(iter(nodes.values())).expires < now):
            nodes.popitem(last=False)

    # -------------------------------------------------------------- clients

    def handle(self, msg: D.Message, addr: Address, transport: asyncio.DatagramTransport
               ) -> None:
        if msg.kind != D.PING:
            super().handle(msg, addr, transport)
        elif transport is self._client_side and not self._from_itself(addr):
            self._client_ping(msg, addr)

    def _from_itself(self, addr: Address) -> bool:
        """Is ``addr`` the relay's own ping socket?  (Its subnet ping reached
        its client port: answering would make it ping itself again and again.)"""
        return (self._pinger is not None and addr[1] == self._pinger.get_extra_info(
            "sockname")[1] and addr[0] in udp.local_addresses())

    def _client_ping(self, msg: D.Message, addr: Address) -> None:
        """A verified ping from a client: learn it, send what we know (within
        its credit), ping the subnet (at most every MIN_PING_GAP s)."""
        now = self.clock()
        self.stats.client_pings += 1
        credit = self.learned.pop(addr, None) or Credit()
        self.learned[addr] = credit
        credit.grant(msg.size, now + 3 * self.interval)
        self._forget_learned(now)
        known = self.known()
        if known:
            start = credit.cursor % len(known)
            for body in known[start:] + known[:start]:
                if not self._to_learned(D.encode(self.key, D.ANNOUNCE, body), addr, credit,
                                        now):
                    break
                credit.cursor += 1
        if now - self._last_ping >= MIN_PING_GAP:
            self.ping_subnet()

    def _forget_learned(self, now: float) -> None:
        for addr in [a for a, c in self.learned.items() if c.expires < now]:
            del self.learned[addr]
        while len(self.learned) > MAX_LEARNED:
            self.learned.popitem(last=False)

    def _to_learned(self, data: bytes, addr: Address, credit: Credit, now: float) -> bool:
        if credit.expires < now or not credit.spend(len(data)):
            self.stats.withheld += 1
            return False
        self._forward(data, addr)
        return True

    def _forward(self, data: bytes, addr: Address) -> None:
        if self._client_side is not None:
            self.stats.forwarded += 1
            self._send(self._client_side, data, addr)
