"""A fresh client's first connection begun in a thread before its imports
(dpool.transport.early, issue 13): taken by the client's connection to that
address, which carries on the same handshake; whatever goes wrong with it
leaves the connection to the client, as it was."""
import asyncio
import socket
import time

import pytest

from dpool.errors import AuthenticationError
from dpool.transport import early
from dpool.transport.tcp import connect, start_server

SECRET = b"a secret long enough for a test!"


def _serve(**kwargs):
    """A server answering each message with itself, and the connections it got."""
    got = []

    async def serve(conn):
        got.append(conn)
        try:
            while True:
                conn.send(await conn.recv())
        except Exception:
            pass
    return start_server(serve, "127.0.0.1", 0, secret=SECRET, hello={}, **kwargs), got


async def _begun(port, secret=SECRET):
    """Begun, and its connect and read done (the server on this loop answers)."""
    found = early.begin("127.0.0.1", port, secret)
    assert found is not None and await asyncio.wrap_future(found.ready) is not None
    return found


def test_a_connection_begun_early_is_taken_and_authenticated():
    async def main():
        starting, got = _serve()
        server = await starting
        begun = await _begun(server.port)
        try:
            conn = await connect("127.0.0.1", server.port, secret=SECRET, hello={})
            assert early.find("127.0.0.1", server.port, SECRET) is None  # (taken)
            assert begun.take() is None
            conn.send([b"ping"])
            assert [bytes(f) for f in await conn.recv()] == [b"ping"]
            assert conn.peer == got[0].peer or len(got) == 1  # one connection, the begun one
            conn.close()
            await conn.wait_closed()
        finally:
            begun.close()
            server.close(abort_connections=True)
            await server.wait_closed()
    asyncio.run(main())


def test_a_node_that_gave_up_on_the_begun_connection_is_met_again():
    """The node's pre-auth deadline passed while the process imported (a
    loaded machine): the client connects again at once, the key cached."""
    async def main():
        starting, got = _serve(auth_timeout=0.2)
        server = await starting
        begun = await _begun(server.port)
        deadline = time.monotonic() + 10
        while server._handshakes and time.monotonic() < deadline:  # (its deadline passes)
            await asyncio.sleep(0.01)
        assert not server._handshakes
        try:
            conn = await connect("127.0.0.1", server.port, secret=SECRET, hello={})
            conn.send([b"ping"])
            assert [bytes(f) for f in await conn.recv()] == [b"ping"]
            conn.close()
            await conn.wait_closed()
        finally:
            begun.close()
            server.close(abort_connections=True)
            await server.wait_closed()
    asyncio.run(main())


def test_a_wrong_secret_begun_early_fails_as_without():
    async def main():
        server = await _serve()[0]
        wrong = b"another secret, long enough too!"
        begun = await _begun(server.port, wrong)
        try:
            with pytest.raises(AuthenticationError, match="did not prove it knows"):
                await connect("127.0.0.1", server.port, secret=wrong, hello={})
        finally:
            begun.close()
            server.close(abort_connections=True)
            await server.wait_closed()
    asyncio.run(main())


def test_a_connection_begun_and_not_taken_is_closed():
    """(the autouse fixture checks the socket is closed: no fd left)"""
    async def main():
        server = await _serve()[0]
        begun = await _begun(server.port)
        begun.close()
        assert begun.take() is None and early.find("127.0.0.1", server.port, SECRET) is None
        assert begun.ready.result()[0].fileno() == -1
        server.close(abort_connections=True)
        await server.wait_closed()
    asyncio.run(main())


def test_nothing_listening_leaves_the_error_to_the_client():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]   # (bound, not listening: refused)
        begun = early.begin("127.0.0.1", port, SECRET)
        assert begun is not None and begun.ready.result(10) is None

        async def main():
            with pytest.raises(ConnectionRefusedError):
                await connect("127.0.0.1", port, secret=SECRET, hello={}, timeout=5)
        try:
            asyncio.run(main())
        finally:
            begun.close()


def test_not_begun_for_a_short_secret_or_twice():
    """A short secret's warning is the client's own stretch's to give."""
    assert early.begin("127.0.0.1", 9, b"short") is None
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
        first = early.begin("127.0.0.1", port, SECRET)
        try:
            assert first is not None and early.begin("127.0.0.1", port, SECRET) is None
            first.ready.result(10)
        finally:
            first.close()
