"""Network interface addresses (for broadcast discovery).

The loopback check is in :mod:`dpool.hosts` (the bottom layer: the config
uses it too)."""
from __future__ import annotations

import ipaddress
import socket
from typing import Any

__all__ = ["interface_addresses", "interfaces_with_ipv6"]


def interface_addresses() -> list[tuple[str, str, str | None, str | None]]:
    """``(ifname, ipv4 address, netmask, broadcast)`` for every IPv4 address.

    The broadcast address is computed from the netmask when the system does
    not report a usable one (except on loopback and /31, /32 networks, which
    have none): an address added without ``brd`` is reported by psutil with
    its own address, or 0.0.0.0, as its "broadcast".
    """
    result = []
    for name, addrs in _net_if_addrs().items():
        for addr in addrs:
            if addr.family != socket.AF_INET:
                continue
            result.append((name, addr.address, addr.netmask, _broadcast(addr)))
    return result


def _broadcast(addr: Any) -> str | None:
    if not addr.netmask:
        return addr.broadcast
    net = ipaddress.IPv4Network(f"{addr.address}/{addr.netmask}", strict=False)
    if net.prefixlen >= 31 or net.is_loopback:
        return None
    reported = addr.broadcast
    if reported and reported != addr.address and ipaddress.IPv4Address(reported) in net:
        return reported
    return str(net.broadcast_address)


def interfaces_with_ipv6() -> set[str]:
    """The names of the interfaces, loopback aside, that have an IPv6 address."""
    return {name for name, addrs in _net_if_addrs().items()
            for addr in addrs if addr.family == socket.AF_INET6
            and not ipaddress.IPv6Address(addr.address.split("%", 1)[0]).is_loopback}


def _net_if_addrs() -> dict[str, list[Any]]:
    """psutil's, imported on the first look (a client that never looks for
    nodes, e.g. with its embedded node only, keeps its ~2,100 GC-tracked
    objects out of its heap)."""
    import psutil
    return psutil.net_if_addrs()
