"""Ask nodes for their status (``dpool status``, the dashboard).

A Status request travels on an ordinary authenticated connection, instead
of Session: the node answers with one Status message and takes no CPU.
"""
import asyncio
import logging

from .. import protocol as P
from ..errors import ConnectionClosed, DpoolError
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
        conn.send([P.encode(P.Status(None))])
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
