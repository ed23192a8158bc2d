"""Ask nodes for their status (``dpool status``, the dashboard).

A Status request travels on an ordinary authenticated connection, instead
of Session: the node answers with one Status message and takes no CPU.
"""
import asyncio
import logging
import socket
import ssl as _ssl

from .. import protocol as P
from ..errors import AuthenticationError, ConnectionClosed, DpoolError, VersionMismatch
from ..transport import connect
from .client import client_hello

log = logging.getLogger("dpool")


class NoSecret(DpoolError):
    """No secret to talk to this node with."""


async def _reachable(host: str, port: int, timeout: float) -> None:
    """Raise what a TCP connect raises (refused, unknown host, timeout)."""
    async with asyncio.timeout(timeout):
        _, writer = await asyncio.open_connection(host, port)
    writer.close()
    await writer.wait_closed()


async def query_node(host: str, port: int, secret: bytes | None, *, ssl=None,
                     timeout: float = 5.0) -> dict:
    """The node's status dict; raises what connecting raises (OSError,
    AuthenticationError, TimeoutError...) or ConnectionClosed."""
    if not secret and ssl is None:
        await _reachable(host, port, timeout)  # unreachable says more than "no secret"
        raise NoSecret("no secret: set DPOOL_SECRET or give --secret-file "
                       "(the secret the node was started with)")
    conn = await connect(host, port, secret=secret or b"", hello=client_hello(), ssl=ssl,
                         timeout=timeout)
    loop = asyncio.get_running_loop()
    reply = loop.create_future()

    def on_message(frames):
        if not reply.done():
            reply.set_result(frames)

    def on_close(exc=None):
        if not reply.done():
            reply.set_exception(ConnectionClosed(f"{host}:{port} closed the connection"))

    conn.set_receiver(on_message, on_close)
    try:
        conn.send([P.encode(P.Status, None)])
        frames = await asyncio.wait_for(reply, timeout)
        msg = P.decode(frames[0])
        if type(msg) is not P.Status or not isinstance(msg.info, dict):
            raise DpoolError(f"{host}:{port} answered Status with {P.op_of(msg).name}")
        return msg.info
    finally:
        conn.abort()


async def query_nodes(addresses, secrets, *, ssl=None, timeout: float = 5.0) -> list:
    """``query_node`` for every ``(host, port)``, at once; each answer is
    the status dict or the exception that prevented it."""
    return await asyncio.gather(
        *(query_node(host, port, secret, ssl=ssl, timeout=timeout)
          for (host, port), secret in zip(addresses, secrets)),
        return_exceptions=True)


def explain(exc: BaseException, timeout: float) -> str:
    """A one-line reason a node gave no status."""
    if isinstance(exc, AuthenticationError):
        return ("wrong secret: the node and this command do not share a secret "
                "(check DPOOL_SECRET or --secret-file)")
    if isinstance(exc, VersionMismatch):
        return f"version mismatch: {exc}"
    if isinstance(exc, _ssl.SSLError):
        return (f"TLS failed: {exc.reason or exc} (check --cafile, --certfile and --keyfile "
                f"against the node's --certfile and --cafile)")
    if isinstance(exc, ConnectionRefusedError):
        return "unreachable: connection refused (is dpool-node running there, on that port?)"
    if isinstance(exc, socket.gaierror):
        return f"unreachable: unknown host ({exc.strerror or exc})"
    if isinstance(exc, TimeoutError):
        return f"unreachable: no answer within {timeout:g} s"
    if isinstance(exc, ConnectionClosed):
        return "the node closed the connection without answering (an older dpool-node?)"
    if isinstance(exc, OSError):
        return f"unreachable: {exc.strerror or exc}"
    if isinstance(exc, DpoolError):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"


def state_of(exc: BaseException) -> str:
    """A short name for why a node gave no status (``state`` in dpool status)."""
    if isinstance(exc, AuthenticationError):
        return "wrong-secret"
    if isinstance(exc, NoSecret):
        return "no-secret"
    if isinstance(exc, _ssl.SSLError):
        return "tls-error"
    if isinstance(exc, (OSError, TimeoutError)) and not isinstance(exc, ConnectionClosed):
        return "unreachable"
    return "error"
