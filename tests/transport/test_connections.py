"""Connections over every transport: tcp, tls, inproc, socketpair (+ blocking)."""
import array
import asyncio
import contextlib
import logging
import os
import socket
import ssl
import struct
import threading
import time

import pytest

from dpool.errors import (AuthenticationError, ConnectionClosed, ProtocolError,
                          VersionMismatch)
from dpool.transport import (PROTOCOL_VERSION, BlockingConnection, Limits, auth,
                             client_ssl_context, connect, encode, header, inproc_pair,
                             server_ssl_context, start_server, wrap_socket)

SECRET = b"test secret"
KINDS = ["tcp", "tls", "tls-client-cert", "inproc", "socketpair"]
pytestmark = pytest.mark.timeout(30)


def run(coro, timeout=20):
    async def main():
        async with asyncio.timeout(timeout):
            return await coro
    return asyncio.run(main())


async def until(condition, timeout=5.0):
    """Poll ``condition()`` until true (fails after ``timeout`` s)."""
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.005)


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    trustme = pytest.importorskip("trustme")
    path = tmp_path_factory.mktemp("certs")
    ca = trustme.CA()
    server = ca.issue_cert("127.0.0.1", "localhost", "::1")
    client = ca.issue_cert("client.dpool.test")
    files = {"ca": path / "ca.pem", "server": path / "server.pem",
             "client": path / "client.pem"}
    ca.cert_pem.write_to_path(files["ca"])
    server.private_key_and_cert_chain_pem.write_to_path(files["server"])
    client.private_key_and_cert_chain_pem.write_to_path(files["client"])
    return {k: str(v) for k, v in files.items()}


def ssl_contexts(kind, certs):
    if kind == "tls":
        return (server_ssl_context(certs["server"]),
                client_ssl_context(cafile=certs["ca"]))
    if kind == "tls-client-cert":
        return (server_ssl_context(certs["server"], cafile=certs["ca"],
                                   require_client_cert=True),
                client_ssl_context(cafile=certs["ca"], certfile=certs["client"]))
    return None, None


@contextlib.asynccontextmanager
async def serving(on_connection=None, *, host="127.0.0.1", **kwargs):
    """A server that queues accepted connections unless told otherwise."""
    accepted = asyncio.Queue()
    kwargs.setdefault("secret", SECRET)
    kwargs.setdefault("hello", {"side": "server"})
    server = await start_server(on_connection or accepted.put_nowait, host, 0, **kwargs)
    server.accepted = accepted
    async with server:
        yield server


@contextlib.asynccontextmanager
async def make_pair(kind, certs=None, limits=None):
    """(client-side, server-side) connected Connections of the given kind."""
    if kind == "inproc":
        a, b = inproc_pair(limits)
        conns = [a, b]
        yield a, b
    elif kind == "socketpair":
        s1, s2 = socket.socketpair()
        a, b = await wrap_socket(s1, limits), await wrap_socket(s2, limits)
        conns = [a, b]
        yield a, b
    else:
        server_ctx, client_ctx = ssl_contexts(kind, certs)
        async with serving(ssl=server_ctx, limits=limits) as server:
            a = await connect("127.0.0.1", server.port, secret=SECRET,
                              hello={"side": "client"}, ssl=client_ctx, limits=limits)
            b = await server.accepted.get()
            conns = [a, b]
            yield a, b
            a.abort()
            await a.wait_closed()
    for conn in conns:
        conn.abort()
        await conn.wait_closed()


def blob(n, seed=0):
    cycle = bytes(range(seed % 256, 256)) + bytes(range(seed % 256))
    return cycle * (n // 256) + b"x" * (n % 256)


MESSAGES = [
    [],
    [b""],
    [b"one"],
    [b"f%d" % i for i in range(1000)],
    [bytearray(b"mutable"), memoryview(b"view"), memoryview(array.array("i", [1, 2, 3]))],
    [b"head", blob(20 * 2**20), b"tail"],
]


def norm(message):
    return [bytes(memoryview(f).cast("B")) for f in message]


# -- round trips on every transport --------------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
def test_round_trip_recv_mode(kind, certs):
    async def main():
        async with make_pair(kind, certs) as (a, b):
            for msg in MESSAGES:
                a.send(msg)
            got = [await b.recv() for _ in MESSAGES]
            assert [norm(m) for m in got] == [norm(m) for m in MESSAGES]
            for msg in reversed(MESSAGES):                       # other direction
                b.send(msg)
            await b.drain()
            got = [await a.recv() for _ in MESSAGES]
            assert [norm(m) for m in got] == [norm(m) for m in reversed(MESSAGES)]
    run(main())


@pytest.mark.parametrize("kind", KINDS)
def test_round_trip_callback_mode_and_close(kind, certs):
    async def main():
        async with make_pair(kind, certs) as (a, b):
            got, closed = [], []
            b.set_receiver(got.append, closed.append)
            for i in range(500):
                a.send([b"%d" % i, b"x" * (i * 100)])
            a.send([blob(3 * 2**20)])
            a.close()
            await until(lambda: closed)
            assert closed == [None]
            assert [bytes(m[0]) for m in got[:500]] == [b"%d" % i for i in range(500)]
            assert norm(got[500]) == [blob(3 * 2**20)]
            assert b.closed and a.closed
            with pytest.raises(ConnectionClosed):
                a.send([b"late"])
            with pytest.raises(ConnectionClosed):
                await a.drain()
    run(main())


@pytest.mark.parametrize("kind", KINDS)
def test_messages_before_set_receiver_are_buffered(kind, certs):
    async def main():
        async with make_pair(kind, certs) as (a, b):
            for i in range(3):
                a.send([b"m%d" % i])
            a.close()
            await until(lambda: b.closed)
            got, closed = [], []
            b.set_receiver(got.append, closed.append)
            assert got == [[b"m0"], [b"m1"], [b"m2"]]
            assert closed == [None]
    run(main())


@pytest.mark.parametrize("kind", KINDS)
def test_recv_raises_connection_closed_at_eof(kind, certs):
    async def main():
        async with make_pair(kind, certs) as (a, b):
            a.send([b"last"])
            a.close()
            assert await b.recv() == [b"last"]
            with pytest.raises(ConnectionClosed):
                await b.recv()
    run(main())


@pytest.mark.parametrize("kind", KINDS)
def test_abort_fires_peer_on_close(kind, certs):
    async def main():
        async with make_pair(kind, certs) as (a, b):
            closed_a, closed_b = [], []
            a.set_receiver(lambda m: None, closed_a.append)
            b.set_receiver(lambda m: None, closed_b.append)
            a.abort()
            await until(lambda: closed_a and closed_b)
            assert closed_a == [None] and len(closed_b) == 1
    run(main())


@pytest.mark.parametrize("kind", ["tcp", "tls", "socketpair"])
def test_drain_waits_for_the_peer(kind, certs):
    async def main():
        async with make_pair(kind, certs) as (a, b):
            payload = blob(32 * 2**20)
            for _ in range(3):
                a.send([payload])
            draining = asyncio.ensure_future(a.drain())
            for _ in range(5):
                await asyncio.sleep(0)
            assert not draining.done()     # nobody reads: the buffer stays high
            for _ in range(3):
                assert norm(await b.recv()) == [payload]
            await draining
    run(main())


def test_callback_error_aborts_connection(caplog):
    async def main():
        async with make_pair("socketpair") as (a, b):
            closed = []

            def bad(frames):
                raise ValueError("boom")
            b.set_receiver(bad, closed.append)
            a.send([b"x"])
            await until(lambda: closed)
            assert isinstance(closed[0], ValueError)
    run(main())
    assert "on_message callback" in caplog.text


def test_inproc_passes_frames_without_copying():
    async def main():
        a, b = inproc_pair()
        frame = bytearray(10)
        a.send([frame])
        [got] = await b.recv()
        assert got is frame
        a.close()
        b.close()
        await a.wait_closed()
        await b.wait_closed()
    run(main())


def test_ipv6_loopback():
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    try:
        socket.socket(socket.AF_INET6).bind(("::1", 0))
    except OSError:
        pytest.skip("no ::1")

    async def main():
        async with serving(host="::1") as server:
            conn = await connect("::1", server.port, secret=SECRET, hello={})
            served = await server.accepted.get()
            assert conn.peer == f"[::1]:{server.port}"
            assert served.peer.startswith("[::1]:")
            conn.send([b"6"])
            assert await served.recv() == [b"6"]
            conn.abort()
            await conn.wait_closed()
    run(main())


# -- authentication and hello ---------------------------------------------------------------

def test_auth_and_hello_both_ways():
    async def main():
        async with serving(hello=lambda: {"name": "srv"}) as server:
            conn = await connect("127.0.0.1", server.port, secret=SECRET,
                                 hello={"name": "cli"})
            served = await server.accepted.get()
            assert conn.hello == {"name": "srv", "protocol": PROTOCOL_VERSION}
            assert served.hello == {"name": "cli", "protocol": PROTOCOL_VERSION}
            assert conn.peer == f"127.0.0.1:{server.port}"
            assert served.peer == "127.0.0.1:%d" % conn._stream._sock.getsockname()[1]
            conn.abort()
            await conn.wait_closed()
    run(main())


@pytest.mark.parametrize("client_secret, server_secret", [
    (b"wrong", SECRET), (SECRET, b"wrong"), (b"", SECRET)])
def test_wrong_secret(client_secret, server_secret, caplog):
    caplog.set_level(logging.WARNING, "dpool.transport")

    async def main():
        async with serving(secret=server_secret) as server:
            with pytest.raises(AuthenticationError):
                await connect("127.0.0.1", server.port, secret=client_secret, hello={})
            await until(lambda: caplog.records)
            good = await connect("127.0.0.1", server.port, secret=server_secret, hello={})
            assert (await server.accepted.get()).hello == {"protocol": PROTOCOL_VERSION}
            good.abort()
            await good.wait_closed()
    run(main())
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "127.0.0.1:" in warnings[0].getMessage()
    assert "authentication" in warnings[0].getMessage()


def test_client_rejects_server_without_the_secret():
    """A fake server that says OK but can't prove the secret."""
    after_proof = []

    async def handler(reader, writer):
        writer.write(auth.make_challenge())
        await reader.readexactly(auth.REPLY_SIZE)
        writer.write(os.urandom(auth.PROOF_SIZE))
        try:
            after_proof.append(await reader.read())   # the client sends nothing more
        except ConnectionError:
            after_proof.append(b"")
        writer.close()

    async def main():
        fake = await asyncio.start_server(handler, "127.0.0.1", 0)
        port = fake.sockets[0].getsockname()[1]
        with pytest.raises(AuthenticationError, match="node failed authentication"):
            await connect("127.0.0.1", port, secret=SECRET, hello={})
        await until(lambda: after_proof)
        assert after_proof == [b""]
        fake.close()
        await fake.wait_closed()
    run(main())


async def raw_client(port):
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    name = "127.0.0.1:%d" % writer.get_extra_info("sockname")[1]
    return reader, writer, name


@pytest.mark.parametrize("payload", [
    b"",                                     # silence until the deadline
    b"GET / HTTP/1.1\r\n\r\n",               # short garbage, then silence
    os.urandom(auth.REPLY_SIZE),             # right size, bad magic
    b"\x00" * 1000,                          # more than 256 pre-auth bytes
])
def test_bad_peers_before_auth(payload, caplog):
    caplog.set_level(logging.WARNING, "dpool.transport")

    async def main():
        async with serving(auth_timeout=0.3) as server:
            reader, writer, name = await raw_client(server.port)
            challenge = await reader.readexactly(auth.CHALLENGE_SIZE)
            assert challenge.startswith(auth.MAGIC)
            writer.write(payload)
            with contextlib.suppress(ConnectionError):
                assert await reader.read() == b""   # the server closed it
            writer.close()
            await until(lambda: caplog.records)
            good = await connect("127.0.0.1", server.port, secret=SECRET, hello={})
            await server.accepted.get()
            good.abort()
            await good.wait_closed()
            return name
    name = run(main())
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and name in warnings[0], warnings


@pytest.mark.parametrize("payload", [b"", b"\x16\x03\x01 not really TLS" * 10])
def test_bad_peers_before_tls_handshake(payload, certs, caplog):
    caplog.set_level(logging.WARNING, "dpool.transport")

    async def main():
        server_ctx, client_ctx = ssl_contexts("tls", certs)
        async with serving(ssl=server_ctx, auth_timeout=0.3) as server:
            reader, writer, name = await raw_client(server.port)
            writer.write(payload)
            with contextlib.suppress(ConnectionError):
                await reader.read()                    # until the server hangs up
            writer.close()
            await until(lambda: caplog.records)
            good = await connect("127.0.0.1", server.port, secret=SECRET, hello={},
                                 ssl=client_ctx)
            await server.accepted.get()
            good.abort()
            await good.wait_closed()
            return name
    name = run(main())
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and name in warnings[0], warnings


@pytest.mark.parametrize("how", ["limits", "garbage"])
def test_bad_frames_after_auth_close_only_that_connection(how, caplog):
    caplog.set_level(logging.WARNING, "dpool.transport")

    async def main():
        limits = Limits(max_frame_bytes=1000)
        async with serving(limits=limits) as server:
            bad = await connect("127.0.0.1", server.port, secret=SECRET, hello={})
            good = await connect("127.0.0.1", server.port, secret=SECRET, hello={})
            served_bad, served_good = [await server.accepted.get() for _ in range(2)]
            closed = []
            served_bad.set_receiver(lambda m: None, closed.append)
            if how == "limits":
                bad.send([b"x" * 1001])
            else:
                bad._stream.write([struct.pack("<IQ", 1, 2**59)])  # (bits 60-63: flags)
            await until(lambda: closed)
            assert isinstance(closed[0], ProtocolError)
            with pytest.raises(ConnectionClosed):
                await bad.recv()                      # the server hung up on it
            good.send([b"still fine"])
            assert await served_good.recv() == [b"still fine"]
            for conn in (bad, good):
                conn.abort()
                await conn.wait_closed()
            return served_bad.peer
    peer = run(main())
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and peer in warnings[0] and "limit" in warnings[0]


def test_peer_vanishing_mid_frame():
    async def main():
        s1, s2 = socket.socketpair()
        conn = await wrap_socket(s1)
        closed = []
        conn.set_receiver(lambda m: None, closed.append)
        s2.sendall(header([b"x" * 100]) + b"x" * 50)
        s2.close()
        await until(lambda: closed)
        assert isinstance(closed[0], ConnectionClosed)
        assert "middle of a message" in str(closed[0])
        await conn.wait_closed()
    run(main())


def test_version_mismatch_names_both_versions(monkeypatch, caplog):
    caplog.set_level(logging.WARNING, "dpool.transport")

    async def main():
        async with serving(hello=lambda: {"protocol": 1}) as server:
            monkeypatch.setattr(auth, "PROTOCOL_VERSION", 2)    # this client speaks 2
            with pytest.raises(VersionMismatch) as info:
                await connect("127.0.0.1", server.port, secret=SECRET, hello={})
            await until(lambda: caplog.records)
            return server.port, str(info.value)
    port, message = run(main())
    assert message == (f"protocol version mismatch: this side speaks 2, "
                       f"peer at 127.0.0.1:{port} speaks 1")
    [warning] = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert "this side speaks 1" in warning and "speaks 2" in warning


def test_connect_refused_and_timeout():
    ended = []

    async def silent(reader, writer):
        with contextlib.suppress(ConnectionError):
            await reader.read()
        ended.append(True)
        writer.close()

    async def main():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        with pytest.raises(ConnectionRefusedError):
            await connect("127.0.0.1", port, secret=SECRET, hello={})
        fake = await asyncio.start_server(silent, "127.0.0.1", 0)
        port = fake.sockets[0].getsockname()[1]
        with pytest.raises(TimeoutError):
            await connect("127.0.0.1", port, secret=SECRET, hello={}, timeout=0.2)
        await until(lambda: ended)
        fake.close()
        await fake.wait_closed()
    run(main())


def test_tls_client_without_cert_is_refused(certs, caplog):
    async def main():
        server_ctx, _ = ssl_contexts("tls-client-cert", certs)
        async with serving(ssl=server_ctx) as server:
            with pytest.raises((ssl.SSLError, ConnectionError, AuthenticationError)):
                await connect("127.0.0.1", server.port, secret=SECRET, hello={},
                              ssl=client_ssl_context(cafile=certs["ca"]))
            untrusted = client_ssl_context()       # system CAs don't know our CA
            with pytest.raises(ssl.SSLCertVerificationError):
                await connect("127.0.0.1", server.port, secret=SECRET, hello={},
                              ssl=untrusted)
    run(main())


def test_server_close_aborts_live_connections():
    async def main():
        closed = []

        async def serve(conn):
            conn.set_receiver(lambda m: None, closed.append)
            await asyncio.Event().wait()             # runs until cancelled
        server = await start_server(serve, "127.0.0.1", 0, secret=SECRET, hello={})
        conns = [await connect("127.0.0.1", server.port, secret=SECRET, hello={})
                 for _ in range(3)]
        await until(lambda: len(server.connections) == 3)
        server.close(abort_connections=True)
        await server.wait_closed()
        assert len(closed) == 3
        for conn in conns:
            with pytest.raises(ConnectionClosed):
                await conn.recv()
            await conn.wait_closed()
    run(main())


# -- socketpair + BlockingConnection (the node <-> worker link) -------------------------------

def test_blocking_connection_round_trip():
    async def main():
        s1, s2 = socket.socketpair()
        conn = await wrap_socket(s1)
        worker = BlockingConnection(s2)
        many = [b"%d" % i for i in range(5000)]
        big = blob(20 * 2**20)

        def echo():
            assert not worker.poll(0)
            for _ in range(4):
                assert worker.poll(10)
                worker.send(worker.recv())
            with pytest.raises(ConnectionClosed):
                worker.recv()
            worker.close()

        thread = threading.Thread(target=echo)
        thread.start()
        sent = [[], [b"tiny"], many, [b"a", big, b"b"]]
        for msg in sent:
            conn.send(msg)
        got = [await conn.recv() for _ in sent]
        assert [norm(m) for m in got] == [norm(m) for m in sent]
        conn.close()
        await conn.wait_closed()
        await asyncio.get_running_loop().run_in_executor(None, thread.join)
    run(main())


def test_take_in_never_blocks_and_sees_each_message_and_the_end():
    """take_in (a worker's look between jobs): after a look that found
    bytes it reads at once (no poll first), and a read that finds nothing
    neither blocks nor loses the next message; the end comes as True, then
    recv raises."""
    ours, theirs = socket.socketpair()
    conn, peer = BlockingConnection(theirs, fds=True), BlockingConnection(ours)
    try:
        assert not conn.take_in()               # nothing: a poll says so
        peer.send([b"one"])
        peer.send([b"two", b"2"])
        poll_until = time.monotonic() + 10
        while not conn.take_in():               # (until the bytes are there)
            assert time.monotonic() < poll_until
        assert [bytes(f) for f in conn.recv()] == [b"one"]
        assert conn.take_in()                   # "two" read with it, kept
        assert [bytes(f) for f in conn.recv()] == [b"two", b"2"]
        assert not conn.take_in()               # a read straight away: nothing, no block
        assert not conn.take_in()               # (then a poll again)
        peer.send([b"three"])
        assert conn.poll(10) and conn.take_in()
        assert [bytes(f) for f in conn.recv()] == [b"three"]
        peer.close()
        while not conn.take_in():               # the end, however the look is made
            assert time.monotonic() < poll_until
        with pytest.raises(ConnectionClosed):
            conn.recv()
    finally:
        conn.close()
        peer.close()


def test_blocking_connection_eof_mid_message_and_protocol_error():
    a, b = socket.socketpair()
    conn = BlockingConnection(b)
    a.sendall(header([b"abc"]) + b"a")
    a.close()
    with pytest.raises(ConnectionClosed, match="middle"):
        conn.recv()
    conn.close()
    a, b = socket.socketpair()
    conn = BlockingConnection(b, Limits(max_frames=10))
    a.sendall(struct.pack("<I", 11))
    with pytest.raises(ProtocolError, match="max_frames=10"):
        conn.recv()
    a.close()
    conn.close()
    with pytest.raises(ConnectionClosed):
        conn.send([b"after close"])


def test_silent_peers_cannot_exhaust_the_server(monkeypatch, caplog):
    """Past MAX_HANDSHAKES connections still authenticating, new ones are
    closed at once (logged once); when the silent ones go, real clients get in."""
    from dpool.transport import tcp

    monkeypatch.setattr(tcp, "MAX_HANDSHAKES", 3)
    caplog.set_level(logging.WARNING, "dpool.transport")

    async def main():
        async with serving(auth_timeout=10) as server:
            silent = [await raw_client(server.port) for _ in range(3)]
            await until(lambda: len(server._handshakes) == 3)
            reader, writer, _ = await raw_client(server.port)
            with contextlib.suppress(ConnectionError):
                assert await reader.read() == b""  # closed without a challenge
            writer.close()
            assert any("refusing connection" in r.getMessage() for r in caplog.records)
            for _, w, _ in silent:
                w.close()
            await until(lambda: not server._handshakes)
            good = await connect("127.0.0.1", server.port, secret=SECRET, hello={})
            await server.accepted.get()
            good.abort()
            await good.wait_closed()
    run(main())


def test_close_gives_up_on_a_peer_that_stopped_reading(monkeypatch):
    from dpool.transport import streams

    monkeypatch.setattr(streams, "CLOSE_TIMEOUT", 0.2)

    async def main():
        ours, theirs = socket.socketpair()
        try:
            conn = await wrap_socket(ours)
            conn.send([b"x" * (16 * 2**20)])  # far more than the socket buffers hold
            conn.close()
            await asyncio.wait_for(conn.wait_closed(), 5)
        finally:
            theirs.close()
    run(main())


def test_blocking_eof_mid_message_seen_by_poll_is_reported_as_such():
    import socket

    from dpool.errors import ConnectionClosed
    from dpool.transport import BlockingConnection, encode

    a, b = socket.socketpair()
    conn = BlockingConnection(b)
    try:
        a.sendall(b"".join(bytes(p) for p in encode([b"hello"]))[:-2])
        a.close()
        assert conn.poll(2.0)          # end of stream: recv() won't block
        with pytest.raises(ConnectionClosed, match="middle of a message"):
            conn.recv()
    finally:
        conn.close()


def test_messages_a_dead_peer_sent_are_delivered_before_a_failed_write_closes():
    """A worker sends its last result and dies; the node, not having read it
    yet, sends the worker more work. The failed write (EPIPE) used to close
    the connection at once, dropping the result still in the socket (the node
    then blamed the finished job for the worker's death). What the peer sent
    must be delivered before the close is reported."""
    async def main():
        ours, theirs = socket.socketpair()
        conn = await wrap_socket(ours, peer="worker")
        # (``theirs`` is closed below; ``ours`` by the connection)
        got, closed = [], asyncio.get_running_loop().create_future()
        conn.set_receiver(lambda frames: got.append(bytes(frames[0])),
                          lambda exc: closed.done() or closed.set_result(exc))
        for part in encode([b"last result"]):
            theirs.sendall(part)
        theirs.close()
        conn.send([b"more work"])    # flushed before the loop polls the socket
        await asyncio.wait_for(closed, 5)
        assert got == [b"last result"]
    asyncio.run(main())
