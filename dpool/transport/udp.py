"""Discovery over UDP: the sockets around :mod:`dpool.transport.discovery`.

::

    node (Responder)                              client / scheduler / relay (Seeker)
    ────────────────                              ───────────────────────────────────
    UDP node port (= its TCP port, 51350):        ping socket (ephemeral port):
      bound to the node's --host (0.0.0.0: all)     PING (padded to PING_SIZE) ──► each
      and to that interface's broadcast address     target: per-interface directed
    start: ANNOUNCE ──► broadcast, listen port      broadcast, or given addresses
    PING verified ──► PONG (never larger) ──────►   PONG / forwarded ANNOUNCE ──► on_found
                                                  listener (UDP 51351, SO_REUSEPORT:
                                                    every client on a host gets the
                                                    broadcasts) ──► ANNOUNCE ──► on_found

Everything runs on the caller's asyncio loop.  A datagram that fails
:class:`~dpool.transport.discovery.Verifier` is dropped, nothing is sent back,
and it is logged through a rate-limited :class:`RejectionLog`.  Broadcasts go
to each interface's directed broadcast address (from psutil), never to
255.255.255.255 (which a multi-homed host sends out of one interface only, or
not at all); ``multicast=True`` also sends to MULTICAST_GROUP.
"""
from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, TypeGuard, cast

from . import discovery as D
from .netaddr import interface_addresses, interfaces_with_ipv6
from .rejections import RejectionLog

__all__ = ["Responder", "Seeker", "Found", "broadcast_targets", "LISTEN_PORT", "at_times"]

log = logging.getLogger("dpool.discovery")

#: UDP port clients and schedulers listen on for announcements.
LISTEN_PORT = 51351
#: Organisation-local IPv4 group nodes also announce to with ``multicast=True``.
MULTICAST_GROUP = "239.192.51.35"
LOOPBACK_BROADCAST = "127.255.255.255"
#: Seconds after start at which a node announces itself (UDP may drop some).
ANNOUNCE_AT = (0.0, 0.5, 1.5, 4.0)

Address = tuple[str, int]


async def at_times(times: Iterable[float], action: Callable[[], None],
                   every: float | None = None, then: Callable[[], None] | None = None) -> None:
    """Call ``action`` at each of ``times`` (seconds from now); then, with
    ``every``, call ``then`` (default ``action``) every ``every`` seconds
    until cancelled.  The schedule of pings and announcements: UDP may drop
    any one of them."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    for at in times:
        await asyncio.sleep(max(0.0, start + at - loop.time()))
        action()
    while every is not None:
        await asyncio.sleep(every)
        (then or action)()


def _is_wildcard(host: str) -> bool:
    return host in ("", "0.0.0.0", "::")


def broadcast_for(host: str) -> str | None:
    """The directed broadcast address of the interface holding ``host``."""
    try:
        host = str(ipaddress.ip_address(host))
    except ValueError:       # a name
        host = socket.gethostbyname(host)
    if ipaddress.ip_address(host).is_loopback:
        return LOOPBACK_BROADCAST
    for _, addr, _, broadcast in interface_addresses():
        if addr == host:
            return broadcast
    return None


def broadcast_targets(port: int, loopback: bool = False) -> list[Address]:
    """Every interface's directed broadcast address at ``port`` (and, with
    ``loopback``, 127.255.255.255)."""
    found = {b for _, _, _, b in interface_addresses() if b}
    if loopback:
        found.add(LOOPBACK_BROADCAST)
    return [(b, port) for b in sorted(found)]


def local_addresses() -> list[str]:
    """This host's IPv4 addresses, loopback ones last."""
    addrs = [a for _, a, _, _ in interface_addresses()]
    return sorted(set(addrs), key=lambda a: (ipaddress.ip_address(a).is_loopback, a))


def _is_v6(host: str) -> bool:
    return ":" in host


def ipv6_targets(port: int) -> list[Address]:
    """The all-nodes group ff02::1 on every interface with an IPv6 address
    (IPv6 has no broadcast)."""
    return [(f"ff02::1%{name}", port) for name in sorted(interfaces_with_ipv6())]


def facing_address(peer: str) -> str | None:
    """The IPv4 address this host sends from to reach ``peer`` (a route
    lookup: connect() on a UDP socket sends nothing); None for IPv6 or no route."""
    if _is_v6(peer):
        return None
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
            probe.connect((peer, 9))
            return cast(str, probe.getsockname()[0])
    except OSError:
        return None


def _udp_socket(host: str, port: int, reuse_port: bool = False) -> socket.socket:
    v6 = _is_v6(host)
    sock = socket.socket(socket.AF_INET6 if v6 else socket.AF_INET, socket.SOCK_DGRAM)
    try:
        if v6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
        sock.bind((host, port))
    except BaseException:
        sock.close()
        raise
    sock.setblocking(False)
    return sock


class _Protocol(asyncio.DatagramProtocol):
    def __init__(self, receive: Callable[[bytes, Address, asyncio.DatagramTransport], None]):
        self.receive = receive
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: Any) -> None:
        if self.transport is not None:   # addr whole: an IPv6 one keeps its scope
            self.receive(data, addr, self.transport)

    def error_received(self, exc: Exception) -> None:
        log.debug("discovery socket: %s", exc)


class _Endpoint:
    """Sockets, a verifier and a rate-limited log of rejected datagrams."""

    def __init__(self, key: bytes, where: str, verifier: D.Verifier | None = None):
        self.key = key
        self.verifier = verifier or D.Verifier(key)
        self.rejections = RejectionLog(log, where, what="datagrams dropped")
        self.transports: list[asyncio.DatagramTransport] = []
        self.sent = 0
        self.rejected = 0

    async def _open(self, host: str, port: int, reuse_port: bool = False
                    ) -> asyncio.DatagramTransport:
        loop = asyncio.get_running_loop()
        sock = _udp_socket(host, port, reuse_port)
        transport, _ = await loop.create_datagram_endpoint(
            lambda: _Protocol(self._receive), sock=sock)
        self.transports.append(transport)
        return transport

    def _receive(self, data: bytes, addr: Address, transport: asyncio.DatagramTransport) -> None:
        try:
            msg = self.verifier.check(data, addr[0])
        except D.Rejected as exc:
            self.rejected += 1
            self.rejections.reject(addr[0], exc.reason, "discovery: dropped %s from %s:%d",
                                   exc, addr[0], addr[1])
            return
        self.handle(msg, addr, transport)

    def handle(self, msg: D.Message, addr: Address, transport: asyncio.DatagramTransport
               ) -> None:
        raise NotImplementedError

    def _send(self, transport: asyncio.DatagramTransport, data: bytes, addr: Address) -> None:
        try:
            transport.sendto(data, addr)
            self.sent += 1
        except OSError as exc:   # ENETUNREACH and the like: one target fails, not all
            log.debug("discovery: cannot send to %s:%d: %s", addr[0], addr[1], exc)

    @property
    def port(self) -> int:
        return self.transports[0].get_extra_info("sockname")[1]

    def close(self) -> None:
        for transport in self.transports:
            transport.close()
        self.transports.clear()
        self.rejections.close()


def join_group(transport: asyncio.DatagramTransport, iface: str) -> None:
    """Make the transport's socket a member of MULTICAST_GROUP on ``iface``."""
    mreq = socket.inet_aton(MULTICAST_GROUP) + socket.inet_aton(iface)
    transport.get_extra_info("socket").setsockopt(socket.IPPROTO_IP,
                                                  socket.IP_ADD_MEMBERSHIP, mreq)


class Responder(_Endpoint):
    """A node's side: answers verified pings, announces itself at start.

    ``body()`` makes the node's body (:func:`discovery.node_body`);
    ``announce_to`` are the addresses announcements go to (default: every
    directed broadcast address at LISTEN_PORT, or the loopback one for a
    node on loopback).
    """

    def __init__(self, key: bytes, body: Callable[[], Mapping[str, Any]], host: str,
                 port: int, announce_to: Iterable[Address] | None = None,
                 multicast: bool = False, listen_port: int = LISTEN_PORT,
                 facing_first: bool = False):
        super().__init__(key, "discovery (node)")
        self.body = body
        #: The body's addrs are this host's own: list first, in each datagram,
        #: the one facing its destination (a node on 0.0.0.0 with more than
        #: 4 addresses would otherwise send clients to one they can't reach).
        self.facing_first = facing_first
        self.host = host or "0.0.0.0"
        self.udp_port = port
        self.multicast = multicast
        self.listen_port = listen_port
        self.announce_to = list(announce_to) if announce_to is not None else None
        self.pongs = 0
        self._announcer: asyncio.Task | None = None

    async def start(self) -> Responder:
        """Open the sockets and start announcing; on failure (OSError: a
        port taken) close what was opened and raise."""
        try:
            main = await self._open(self.host, self.udp_port)
            self.udp_port = main.get_extra_info("sockname")[1]
            if not _is_wildcard(self.host) and not _is_v6(self.host):
                broadcast = broadcast_for(self.host)
                if broadcast:
                    await self._open(broadcast, self.udp_port)
            if self.multicast and not _is_v6(self.host):
                await self._open_multicast()
        except BaseException:
            self.close()
            raise
        self._announcer = asyncio.get_running_loop().create_task(
            at_times(ANNOUNCE_AT, self.announce))
        return self

    async def _open_multicast(self) -> None:
        """A socket bound to MULTICAST_GROUP, member on the node's interface;
        announcements to the group leave from the node's address."""
        iface = "0.0.0.0" if _is_wildcard(self.host) else self.host
        try:
            transport = await self._open(MULTICAST_GROUP, self.udp_port)
            join_group(transport, iface)
            self.transports[0].get_extra_info("socket").setsockopt(
                socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton(iface))
        except OSError as exc:
            log.warning("discovery: cannot use multicast group %s: %s", MULTICAST_GROUP, exc)

    def targets(self) -> list[Address]:
        if self.announce_to is not None:
            return self.announce_to
        if _is_v6(self.host):
            return ipv6_targets(self.listen_port)
        if _is_wildcard(self.host):
            out = broadcast_targets(self.listen_port)
        else:
            broadcast = broadcast_for(self.host)
            out = [(broadcast, self.listen_port)] if broadcast else []
        if self.multicast:
            out.append((MULTICAST_GROUP, self.listen_port))
        return out

    def announce(self) -> None:
        """Send one announcement to every target."""
        if not self.transports:
            return
        body = self.body()
        for target in self.targets():
            data = D.encode(self.key, D.ANNOUNCE, self._facing(body, target[0]))
            self._send(self.transports[0], data, target)

    def _facing(self, body: Mapping[str, Any], peer: str) -> Mapping[str, Any]:
        """``body`` with the address facing ``peer`` first in its addrs
        (with ``facing_first``; at most 4 are listed)."""
        addrs = body.get("addrs")
        if not self.facing_first or not isinstance(addrs, list):
            return body
        local = facing_address(peer)
        if local is None:
            return body
        return dict(body, addrs=[local, *(a for a in addrs if a != local)][:4])

    def handle(self, msg: D.Message, addr: Address, transport: asyncio.DatagramTransport
               ) -> None:
        if msg.kind != D.PING:
            return
        pong = D.reply(self.key, msg, self._facing(self.body(), addr[0]))
        if pong is None:
            self.rejected += 1
            self.rejections.reject(addr[0], "small", "discovery: a ping from %s:%d is smaller "
                                   "than the pong would be; not answered", addr[0], addr[1])
            return
        self.pongs += 1
        self._send(self.transports[0], pong, addr)   # from the node's own address

    def close(self) -> None:
        if self._announcer is not None:
            self._announcer.cancel()
        super().close()


def _scoped(addr: Any) -> str:
    """An address's host, with its scope if it is an IPv6 link-local one
    (recvfrom gives the scope apart: ``fe80::1`` + scope id 2 -> ``fe80::1%eth0``)."""
    host = addr[0]
    if len(addr) == 4 and addr[3] and "%" not in host:
        try:
            return f"{host}%{socket.if_indextoname(addr[3])}"
        except OSError:
            return f"{host}%{addr[3]}"
    return host


@dataclass(frozen=True)
class Found:
    """A node heard of: where to connect (TCP), what it said, who sent it."""
    address: Address
    name: str
    cpus: int
    free_cpus: int
    source: Address
    kind: int
    body: Mapping[str, Any]


def found_from(msg: D.Message, source: Address) -> Found | None:
    """The node a verified PONG or ANNOUNCE names; None if it names none.

    The TCP address: the datagram's source if the node lists it among its
    addresses, else the first address it lists (an external one behind NAT,
    or the address it is bound to), else the source."""
    body = msg.body
    port, cpus, free = body.get("port"), body.get("cpus", 0), body.get("free", 0)
    addrs, name = body.get("addrs") or [], body.get("name", "")
    if body.get("role") != "node" or not _is_int(cpus) or not _is_int(free) \
            or not _is_int(port) or not 0 < port <= 65535 or not isinstance(name, str) \
            or not isinstance(addrs, list) or not all(a and isinstance(a, str) for a in addrs):
        return None     # of the wrong shape: names no node
    host = source[0] if source[0] in addrs or not addrs else addrs[0]
    return Found((host, port), name[:D.NAME_MAX], cpus, free, source, msg.kind, body)


def _is_int(value: Any) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


class Seeker(_Endpoint):
    """A client's (scheduler's, relay's) side: pings, hears pongs and
    announcements, calls ``on_found(Found)`` for each (duplicates included:
    the caller keeps what it already knows).

    ``host`` is the address the ping socket binds (default all);
    ``listen_port`` the shared port announcements arrive at (None: don't
    listen; 0: an ephemeral one, for tests).  ``ping_to`` are the targets of
    :meth:`ping` (default: every directed broadcast address at
    ``node_port``).
    """

    def __init__(self, key: bytes, on_found: Callable[[Found], None], *,
                 node_port: int, host: str = "", listen_port: int | None = LISTEN_PORT,
                 ping_to: Iterable[Address] | None = None, multicast: bool = False):
        super().__init__(key, "discovery")
        self.on_found = on_found
        self.node_port = node_port
        self.host = host
        self.listen_port = listen_port
        self.multicast = multicast
        self.ping_to = list(ping_to) if ping_to is not None else None
        self._pinger: asyncio.DatagramTransport | None = None
        self._pinger6: asyncio.DatagramTransport | None = None

    async def start(self) -> Seeker:
        self._pinger = await self._open(self.host, 0)
        if not self.host and interfaces_with_ipv6():
            await self._open_ipv6()
        if self.listen_port is not None:
            try:
                listener = await self._open("", self.listen_port, reuse_port=True)
            except OSError as exc:
                log.warning("discovery: cannot listen for announcements on UDP port %d: %s "
                            "(pings still find nodes)", self.listen_port, exc)
            else:
                self.listen_port = listener.get_extra_info("sockname")[1]
                if self.multicast:
                    self._join_everywhere(listener)
        return self

    async def _open_ipv6(self) -> None:
        """IPv6 where the host has it: a ping socket, and a listener."""
        try:
            self._pinger6 = await self._open("::", 0)
            if self.listen_port is not None:
                await self._open("::", self.listen_port, reuse_port=True)
        except OSError as exc:
            log.warning("discovery: no IPv6: %s", exc)

    @staticmethod
    def _join_everywhere(transport: asyncio.DatagramTransport) -> None:
        """Join MULTICAST_GROUP on every interface with an IPv4 address."""
        for _, addr, _, _ in interface_addresses():
            try:
                join_group(transport, addr)
            except OSError as exc:
                log.debug("discovery: cannot join %s on %s: %s", MULTICAST_GROUP, addr, exc)

    def targets(self) -> list[Address]:
        """Where :meth:`ping` sends by default: :meth:`targets_at` node_port."""
        return self.targets_at(self.node_port)

    def targets_at(self, port: int) -> list[Address]:
        """``ping_to``, else every directed broadcast address (the group with
        multicast, ff02::1 on each interface with IPv6) at ``port``."""
        if self.ping_to is not None:
            return self.ping_to
        out = broadcast_targets(port, loopback=True)
        if self.multicast:
            out.append((MULTICAST_GROUP, port))
        if self._pinger6 is not None:
            out += ipv6_targets(port)
        return out

    def ping(self, targets: Iterable[Address] | None = None) -> None:
        """Send one ping (a fresh nonce) to each target; to the multicast
        group, out of every interface."""
        if self._pinger is None:
            return
        for target in (self.targets() if targets is None else targets):
            if target[0] == MULTICAST_GROUP:
                self._ping_group(target)
            elif _is_v6(target[0]):
                if self._pinger6 is not None:
                    self._send(self._pinger6, self._ping_data(), target)
            else:
                self._send(self._pinger, self._ping_data(), target)

    def _ping_data(self) -> bytes:
        return D.encode(self.key, D.PING, {"role": "client"}, pad_to=D.PING_SIZE)

    def _ping_group(self, target: Address) -> None:
        assert self._pinger is not None
        sock = self._pinger.get_extra_info("socket")
        for _, addr, _, _ in interface_addresses():
            try:
                sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton(addr))
            except OSError:
                continue
            self._send(self._pinger, self._ping_data(), target)

    def handle(self, msg: D.Message, addr: Address, transport: asyncio.DatagramTransport
               ) -> None:
        if msg.kind == D.PING:
            return
        found = found_from(msg, (_scoped(addr), addr[1]))
        if found is not None:
            self.on_found(found)
