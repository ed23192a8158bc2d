"""dpool's transport: moves opaque frames between authenticated peers.

No pickle here.  See frames.py (wire format), auth.py (handshake), and
connection.py (the Connection contract).

The names below are imported on first use (PEP 562): a worker process
needs only :class:`BlockingConnection` and the framing, not asyncio, TLS
and the handshake's cryptography (issue 13: start-up time).
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .auth import PROTOCOL_VERSION
    from .blocking import BlockingConnection
    from .connection import Connection, inproc_pair
    from .frames import FrameDecoder, Limits, encode, header
    from .tcp import (Server, client_ssl_context, connect, server_ssl_context, start_server,
                      wrap_socket)

_LAZY = {
    "PROTOCOL_VERSION": "auth", "BlockingConnection": "blocking", "Connection": "connection",
    "inproc_pair": "connection", "FrameDecoder": "frames", "Limits": "frames",
    "encode": "frames", "header": "frames", "Server": "tcp", "client_ssl_context": "tcp",
    "connect": "tcp", "server_ssl_context": "tcp", "start_server": "tcp",
    "wrap_socket": "tcp",
}

__all__ = [
    "PROTOCOL_VERSION", "Limits", "FrameDecoder", "header", "encode", "Connection",
    "connect", "start_server", "Server", "inproc_pair", "wrap_socket",
    "BlockingConnection", "server_ssl_context", "client_ssl_context",
]


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    globals()[name] = value
    return value
