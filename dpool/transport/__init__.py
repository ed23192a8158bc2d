"""dpool's transport: moves opaque frames between authenticated peers.

No pickle here.  See frames.py (wire format), auth.py (handshake), and
connection.py (the Connection contract).
"""
from .auth import PROTOCOL_VERSION
from .blocking import BlockingConnection
from .connection import Connection, inproc_pair
from .frames import FrameDecoder, Limits, encode, header
from .tcp import (Server, client_ssl_context, connect, server_ssl_context, start_server,
                  wrap_socket)

__all__ = [
    "PROTOCOL_VERSION", "Limits", "FrameDecoder", "header", "encode", "Connection",
    "connect", "start_server", "Server", "inproc_pair", "wrap_socket",
    "BlockingConnection", "server_ssl_context", "client_ssl_context",
]
