"""Who gets to authenticate: per-address caps on pending handshakes, the
client's retry of an early close, and rate-limited logs of rejections."""
import asyncio
import logging
import socket

import pytest

from dpool.errors import HandshakeRefused
from dpool.transport import connect, tcp
from dpool.transport.rejections import RejectionLog
from test_connections import SECRET, run, serving, until

pytestmark = pytest.mark.timeout(30)


async def silent_from(host, port):
    """A connected socket from ``host`` that never speaks."""
    sock = socket.socket()
    sock.bind((host, 0))
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    return sock


def test_one_address_cannot_take_every_handshake_slot(monkeypatch):
    monkeypatch.setattr(tcp, "MAX_HANDSHAKES_PER_HOST", 2)

    async def main():
        async with serving(auth_timeout=10) as server:
            silent = [await silent_from("127.0.0.2", server.port) for _ in range(5)]
            await until(lambda: server._pending["127.0.0.2"] == 2)
            assert len(server._handshakes) == 2      # the other three were closed
            good = await connect("127.0.0.1", server.port, secret=SECRET, hello={}, timeout=5)
            await server.accepted.get()
            good.abort()
            await good.wait_closed()
            for sock in silent:
                sock.close()
            await until(lambda: not server._pending)
    run(main())


def test_an_early_close_is_retried_then_named(monkeypatch):
    """Closed before the handshake began: retried with backoff until the
    connect timeout, then HandshakeRefused says why (not "authentication")."""
    monkeypatch.setattr(tcp, "MAX_HANDSHAKES_PER_HOST", 1)

    async def main():
        async with serving(auth_timeout=10) as server:
            silent = await silent_from("127.0.0.1", server.port)
            await until(lambda: server._pending)
            with pytest.raises(HandshakeRefused) as info:
                await connect("127.0.0.1", server.port, secret=SECRET, hello={}, timeout=0.5)
            message = str(info.value)
            assert "before the handshake began" in message and "too many" in message
            times = int(message.split("(")[1].split()[0])
            assert times >= 3, message                 # it did retry
            # Retried until the silent peer goes: then it gets in.
            task = asyncio.ensure_future(
                connect("127.0.0.1", server.port, secret=SECRET, hello={}, timeout=10))
            await asyncio.sleep(0.1)
            assert not task.done()
            silent.close()
            good = await task
            await server.accepted.get()
            good.abort()
            await good.wait_closed()
    run(main())


def test_rejections_are_logged_once_per_period(caplog):
    caplog.set_level(logging.WARNING, "test.rejections")
    logger = logging.getLogger("test.rejections")

    async def main():
        rejections = RejectionLog(logger, "here:1", period=0.2)
        rejections.reject("10.0.0.1", "first", "rejected %s", "the first")
        for i in range(1000):
            rejections.reject(f"10.0.0.{2 + i % 7}", "refused" if i % 2 else "timeout", "x")
        assert len(caplog.records) == 1              # the rest waits for the period
        await until(lambda: len(caplog.records) == 2)
        rejections.reject("10.0.0.9", "late", "x")   # within the next period: counted
        rejections.close()                           # ... and logged at close
    run(main())
    first, summary, last = [r.getMessage() for r in caplog.records]
    assert first == "rejected the first"
    assert summary.startswith("here:1: 1000 more connections refused or rejected")
    assert "500 refused" in summary and "500 timeout" in summary
    assert "10.0.0.2 (143)" in summary and "2 more addresses" in summary
    assert "1 more connections" in last and "10.0.0.9 (1)" in last
