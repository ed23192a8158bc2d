"""Network interface addresses (for broadcast discovery) and loopback checks."""
from __future__ import annotations

import ipaddress
import socket

import psutil

__all__ = ["interface_addresses", "is_loopback"]


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


def _ip_is_loopback(text: str) -> bool:
    ip = ipaddress.ip_address(text.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


def is_loopback(host) -> bool:
    """True if ``host`` (an address or a name) only means this machine's loopback.

    Names are resolved; a name is loopback when all its addresses are.
    ``''``, ``'0.0.0.0'`` and ``'::'`` (all interfaces) are not loopback.
    """
    if not host:
        return False
    host = str(host).strip("[]")
    try:
        return _ip_is_loopback(host)
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError):
        return False
    return bool(infos) and all(_ip_is_loopback(info[4][0]) for info in infos)
