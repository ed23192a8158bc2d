"""Network interface addresses (for broadcast discovery).

The loopback check is in :mod:`dpool.hosts` (the bottom layer: the config
uses it too)."""
from __future__ import annotations

import ipaddress
import socket

import psutil

__all__ = ["interface_addresses"]


def interface_addresses() -> list[tuple[str, str, str | None, str | None]]:
    """``(ifname, ipv4 address, netmask, broadcast)`` for every IPv4 address.

    The broadcast address is computed from the netmask when the system does
    not report one (except on loopback and /31, /32 networks, which have none).
    """
    result = []
    for name, addrs in psutil.net_if_addrs().items():
        for addr in addrs:
            if addr.family != socket.AF_INET:
                continue
            broadcast = addr.broadcast
            if broadcast is None and addr.netmask:
                net = ipaddress.IPv4Network(f"{addr.address}/{addr.netmask}", strict=False)
                if net.prefixlen < 31 and not net.is_loopback:
                    broadcast = str(net.broadcast_address)
            result.append((name, addr.address, addr.netmask, broadcast))
    return result
