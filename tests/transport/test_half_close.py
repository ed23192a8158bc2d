"""A peer that shuts down its writing side (FIN: ``shutdown(SHUT_WR)``) and
goes on reading still gets what was queued for it (streams.py,
SocketStream): the stream stops reading, sends what it holds, then ends
the connection (cleanly, once all is sent).  A peer that closed altogether
still ends it at once."""
import asyncio
import socket
import threading

import pytest

from dpool.errors import ConnectionClosed
from dpool.transport import client_ssl_context, connect, server_ssl_context, start_server
from dpool.transport.tcp import wrap_socket

pytestmark = pytest.mark.timeout(60)

SECRET = b"a half-close test secret, long enough"
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


def test_after_the_peers_fin_the_connection_is_closed_to_sends():
    # Connection.send's contract: a message is queued in full, or
    # ConnectionClosed is raised.  After a peer's FIN the stream only
    # flushes what was queued: a later send was dropped without a word
    # (conn.closed stayed False for up to CLOSE_TIMEOUT), so a node sent a
    # recoverable session's results into the void instead of keeping them.
    ours, theirs = socket.socketpair()
    got = []
    reader = threading.Thread(target=read_to_the_end, args=(theirs, got))

    async def run():
        conn = await wrap_socket(ours)
        conn.send([BIG])                  # most of it stays queued
        theirs.shutdown(socket.SHUT_WR)   # the FIN is in our socket now
        for _ in range(100):              # loop turns (no sleeps): it is read in one
            if conn.closed:
                break
            await asyncio.sleep(0)
        closed = conn.closed
        refused = False
        try:
            conn.send([b"after the FIN"])
        except ConnectionClosed:
            refused = True
        reader.start()
        await asyncio.wait_for(conn.wait_closed(), 30)
        return conn, closed, refused

    try:
        conn, closed, refused = asyncio.run(run())
        reader.join(30)
    finally:
        theirs.close()
    assert closed and refused, "a send after the peer's FIN was neither queued nor refused"
    data = b"".join(got)
    assert data.endswith(BIG) and b"after the FIN" not in data
    assert conn._exc is None  # (what was queued went out: a clean end)


def test_over_tls_too_a_peers_fin_closes_the_connection_to_sends(pki):
    # The TLS stream (asyncio's) flushed what was queued on a FIN already,
    # but conn.closed stayed False and sends were dropped without a word
    # until the transport was gone, as for plain sockets before.
    async def run():
        server = await start_server(accepted.put_nowait, "127.0.0.1", 0, secret=SECRET,
                                    hello={}, ssl=server_ssl_context(pki["node"]))
        try:
            ours = await connect("127.0.0.1", server.port, secret=SECRET, hello={},
                                 ssl=client_ssl_context(cafile=pki["ca"]))
            theirs = await accepted.get()
            got = []
            ours.set_receiver(lambda frames: got.append(bytes(frames[0])))
            ours._stream.transport.pause_reading()   # reads nothing for now
            theirs.send([BIG])                        # queued at the server
            ours._stream.get_extra_info("socket").shutdown(socket.SHUT_WR)  # FIN only
            for _ in range(100):                      # loop turns (no sleeps)
                if theirs.closed:
                    break
                await asyncio.sleep(0)
            closed = theirs.closed
            refused = False
            try:
                theirs.send([b"after the FIN"])
            except ConnectionClosed:
                refused = True
            ours._stream.transport.resume_reading()
            await asyncio.wait_for(theirs.wait_closed(), 30)
            await asyncio.wait_for(ours.wait_closed(), 30)
            return closed, refused, got
        finally:
            server.close(abort_connections=True)
            await server.wait_closed()

    accepted = asyncio.Queue()
    closed, refused, got = asyncio.run(run())
    assert closed and refused, "a send after the peer's FIN was neither queued nor refused"
    assert got == [BIG]
