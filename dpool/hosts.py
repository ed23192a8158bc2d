"""Host names and addresses: the loopback check.

The bottom layer (with errors and config): the secret lookup in config, the
node server and the daemon all ask whether a host is this machine only.
"""
from __future__ import annotations

import ipaddress
import socket

__all__ = ["is_loopback"]


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
