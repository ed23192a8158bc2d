"""Who gets to authenticate: per-address caps on pending handshakes, the
client's retry of an early close, and rate-limited logs of rejections."""
import asyncio
import contextlib
import ctypes
import logging
import os
import socket
import subprocess
import threading

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


@contextlib.contextmanager
def netns_with_local_prefix(prefix):
    """A network namespace (unique to this run) whose loopback owns every
    address of the IPv6 ``prefix`` (an AnyIP route), as a host given a /64 does."""
    name = f"dpoolsec{os.getpid()}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        subprocess.run(["ip", "-n", name, "-6", "route", "add", "local", prefix, "dev", "lo"],
                       check=True)
        yield f"/run/netns/{name}"
    finally:
        subprocess.run(["ip", "netns", "del", name], check=True)


def run_in_netns(path, coro_fn):
    """``asyncio.run(coro_fn())`` in a thread that entered the namespace at
    ``path`` (a thread's sockets belong to its namespace); its result."""
    result = {}

    def body():
        libc = ctypes.CDLL(None, use_errno=True)
        fd = os.open(path, os.O_RDONLY)
        try:
            if libc.setns(fd, 0x40000000) != 0:          # CLONE_NEWNET
                raise OSError(ctypes.get_errno(), "setns")
        finally:
            os.close(fd)
        try:
            result["value"] = run(coro_fn())
        except BaseException as exc:
            result["error"] = exc
    thread = threading.Thread(target=body, name="in-netns")
    thread.start()
    thread.join(30)
    if "error" in result:
        raise result["error"]
    return result["value"]


@pytest.mark.root
def test_one_ipv6_host_cannot_take_every_handshake_slot_with_many_addresses(monkeypatch):
    """A host is given a whole /64 of IPv6 addresses: counted per address, it
    could fill every slot from its own prefix and lock everybody else out."""
    monkeypatch.setattr(tcp, "MAX_HANDSHAKES", 8)
    monkeypatch.setattr(tcp, "MAX_HANDSHAKES_PER_HOST", 2)
    FREEBIND = 15

    async def silent6(source, port):
        sock = socket.socket(socket.AF_INET6)
        sock.setsockopt(socket.SOL_IP, FREEBIND, 1)
        sock.bind((source, 0))
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, ("::1", port))
        return sock

    async def main():
        async with serving(host="::1", auth_timeout=10) as server:
            silent = [await silent6(f"2001:db8:0:1::{i + 1:x}", server.port)
                      for i in range(tcp.MAX_HANDSHAKES)]
            await until(lambda: len(server._handshakes) + server.rejections._reasons.total()
                        >= tcp.MAX_HANDSHAKES - 1)
            try:
                good = await connect("::1", server.port, secret=SECRET, hello={}, timeout=2)
            finally:
                for sock in silent:
                    sock.close()
            await server.accepted.get()
            good.abort()
            await good.wait_closed()
            await until(lambda: not server._pending)

    with netns_with_local_prefix("2001:db8:0:1::/64") as path:
        run_in_netns(path, main)
