"""A node's close() (dpool-node's SIGINT, a second SIGTERM, the end of a
drain) is prompt whatever its peers do, and still sends what a peer that
reads is owed: its connections' last messages go out before close()
returns (the daemon's loop ends right after), and a peer that stopped
reading (a half-close, FIN, with nothing read) is cut off once its output
makes no progress for ``SHUTDOWN_STALL`` seconds, not after the stream's
``CLOSE_TIMEOUT`` (10 s)."""
import asyncio
import socket
import threading

import pytest

from dpool import protocol as P
from dpool.core.client import client_hello
from dpool.node.server import NodeServer
from dpool.transport import connect, connection, streams, tcp

pytestmark = pytest.mark.timeout(120)

BIG = bytes(range(256)) * (64 << 10)  # 16 MiB: more than the socket buffers hold


async def _node_and_session():
    """A node on port 0 and a client with a session on it; returns (node,
    the client's connection, the messages it received, the node's side)."""
    node = NodeServer("127.0.0.1", 0, cpus=1, discover=False)
    await node.start()
    conn = await connect("127.0.0.1", node.port, secret=node.secret, hello=client_hello(),
                         timeout=10)
    got: list = []
    conn.set_receiver(got.append, lambda exc=None: got.append(None))
    conn.send([P.encode(P.Session, {})])
    for _ in range(10000):
        if got:
            break
        await asyncio.sleep(0.001)
    assert got and type(P.decode(got[0][0])) is P.Ready, got
    theirs = next(iter(node.server.connections))
    return node, conn, got, theirs


def test_a_half_closed_peer_that_reads_nothing_does_not_hold_the_close(monkeypatch):
    # Neither the stream's give-up (CLOSE_TIMEOUT) nor the kernel's (the
    # unacknowledged data's deadline, TCP_USER_TIMEOUT) end it here: they
    # were what ended the wait, after 10 s.
    monkeypatch.setattr(streams, "CLOSE_TIMEOUT", 600.0)
    monkeypatch.setattr(tcp, "set_tcp_options",
                        lambda sock, deadline=0: streams.set_tcp_options(sock, 600.0))
    monkeypatch.setattr(connection, "set_tcp_options",
                        lambda sock, deadline=0: streams.set_tcp_options(sock, 600.0))

    async def main():
        node, conn, got, theirs = await _node_and_session()
        try:
            theirs.send([P.encode(P.Done, []), BIG])   # most of it stays queued
            conn._stream.pause_reading()
            conn._stream.get_extra_info("socket").shutdown(socket.SHUT_WR)
            for _ in range(10000):   # (the node reads the FIN: closed to sends)
                if theirs.closed:
                    break
                await asyncio.sleep(0.001)
            assert theirs.closed
            await asyncio.wait_for(node.close(), 30)   # (before: 10 s, or 600 here)
        finally:
            conn.abort()
            await node.close()
    asyncio.run(main())


def test_a_peer_that_reads_gets_all_that_was_queued_before_the_close_returns():
    """The node's loop ends as close() returns (dpool-node): before, what
    its connections still held was dropped then."""
    ready, go = threading.Event(), threading.Event()
    box = {}

    def node_thread():
        async def main():
            node = NodeServer("127.0.0.1", 0, cpus=1, discover=False)
            await node.start()
            box["node"] = node
            ready.set()
            await asyncio.to_thread(go.wait, 60)
            conns = list(node.server.connections)
            for conn in conns:
                conn.send([P.encode(P.Done, []), BIG])
            await node.close()
            box["closed"] = [conn.closed for conn in conns]
        asyncio.run(main())

    thread = threading.Thread(target=node_thread)
    thread.start()
    try:
        assert ready.wait(60)
        node = box["node"]

        async def client():
            conn = await connect("127.0.0.1", node.port, secret=node.secret,
                                 hello=client_hello(), timeout=10)
            got: asyncio.Queue = asyncio.Queue()
            conn.set_receiver(got.put_nowait, lambda exc=None: got.put_nowait(None))
            conn.send([P.encode(P.Session, {})])
            messages = [await asyncio.wait_for(got.get(), 30)]
            go.set()
            while messages[-1] is not None:
                messages.append(await asyncio.wait_for(got.get(), 30))
            conn.abort()
            return messages
        messages = asyncio.run(client())
    finally:
        go.set()
        thread.join(60)
    assert box["closed"] == [True]
    assert any(len(frames) == 2 and bytes(frames[1]) == BIG for frames in messages[:-1]), \
        "the peer did not get the message queued before the close"
