"""A peer that shuts down its writing side (FIN: ``shutdown(SHUT_WR)``) and
goes on reading still gets what was queued for it (streams.py,
SocketStream): the stream stops reading, sends what it holds, then ends
the connection (cleanly, once all is sent).  A peer that closed altogether
still ends it at once."""
import asyncio
import socket
import threading

import pytest

from dpool.transport.tcp import wrap_socket

pytestmark = pytest.mark.timeout(60)

BIG = bytes(range(256)) * (32 << 10)  # 8 MiB: more than the socket buffers hold


def read_to_the_end(sock, out):
    while chunk := sock.recv(1 << 20):
        out.append(chunk)


def test_a_half_closed_peer_still_gets_what_was_queued():
    ours, theirs = socket.socketpair()
    got = []
    reader = threading.Thread(target=read_to_the_end, args=(theirs, got))

    async def run():
        conn = await wrap_socket(ours)
        conn.send([BIG])                  # most of it stays queued
        theirs.shutdown(socket.SHUT_WR)   # done sending, still reading
        reader.start()
        await asyncio.wait_for(conn.wait_closed(), 30)
        return conn

    try:
        conn = asyncio.run(run())
        reader.join(30)
    finally:
        theirs.close()
    data = b"".join(got)
    assert len(data) > len(BIG) and data.endswith(BIG), \
        f"the peer got {len(data)} bytes of a {len(BIG)}-byte message"
    assert conn.closed and conn._exc is None


def test_a_peer_gone_altogether_still_ends_the_connection():
    ours, theirs = socket.socketpair()

    async def run():
        conn = await wrap_socket(ours)
        conn.send([BIG])
        theirs.close()
        await asyncio.wait_for(conn.wait_closed(), 30)
        return conn

    assert asyncio.run(run()).closed  # (our sends fail: EPIPE, as before)
