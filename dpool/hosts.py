"""Host names and addresses: the loopback check and the one node-address parser.

The bottom layer (with errors and config): the secret lookup in config, the
node server and the daemon all ask whether a host is this machine only.
"""
from __future__ import annotations

import ipaddress
import socket

__all__ = ["is_loopback", "is_pattern", "parse_address"]

#: A node address with one of these is a pattern for discovery (``*``, ``10.77.*``).
PATTERN_CHARS = "*?["


def is_pattern(host: str) -> bool:
    """Whether ``host`` is a pattern (see :mod:`dpool.core.discover`), not an address."""
    return any(c in host for c in PATTERN_CHARS)


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


def parse_address(node, default_port: int) -> tuple[str, int]:
    """One node address -> ``(host, port)``, for every API that takes nodes.

    ``node`` is ``"host"``, ``"host:port"``, ``"[ipv6]:port"``, a bare IPv6
    address, or a ``(host, port)`` pair; a missing port is ``default_port``.
    Raises ValueError naming the node for anything else.
    """
    if isinstance(node, str):
        text = node.strip()
        if text.startswith("["):  # [v6] or [v6]:port
            host, bracket, rest = text[1:].partition("]")
            if not bracket or (rest and not rest.startswith(":")):
                raise ValueError(f"invalid node {node!r}: expected [address]:port")
            port = rest[1:] or default_port
        elif text.count(":") == 1:
            host, port = text.split(":")
        else:  # a name, an IPv4 address or a bare IPv6 address
            host, port = text, default_port
    elif isinstance(node, (tuple, list)) and len(node) == 2:
        host, port = str(node[0]), node[1]
    else:
        raise ValueError(f"invalid node {node!r}: give 'host', 'host:port' or (host, port)")
    if not host.strip():
        raise ValueError(f"invalid node {node!r}: no host")
    try:
        port = int(port)
    except (TypeError, ValueError):
        raise ValueError(f"invalid node {node!r}: expected host:port") from None
    if not 0 < port <= 65535:  # getaddrinfo would wrap it around silently
        raise ValueError(f"invalid node {node!r}: the port must be 1 to 65535")
    return host.strip(), port
