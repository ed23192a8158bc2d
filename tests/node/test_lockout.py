"""Issue 8, findings 3 and 8: a flood of silent connections from one address
must not lock other clients out, and must not flood the node's log."""
import selectors
import socket
import threading
import time

import pytest

from dpool.core.client import Client
from helpers import poll_for
from tasks import double

pytestmark = pytest.mark.timeout(60)

ATTACKER = "127.0.0.2"  # loopback is the whole 127/8: the flood has its own address


class SilentFlood:
    """Keeps up to ``count`` silent connections from ATTACKER to ``address``
    open, opening a new one whenever the node closes one (at most ``rate``
    opens a second), in a thread."""

    def __init__(self, address, count=300, rate=2000):
        self.address, self.count, self.rate = address, count, rate
        self.opened = self.closed_by_node = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="silent-flood")

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join(10)

    def _open(self, sel):
        sock = socket.socket()
        sock.bind((ATTACKER, 0))
        sock.setblocking(False)
        try:
            sock.connect(self.address)
        except BlockingIOError:
            pass
        sel.register(sock, selectors.EVENT_READ)
        self.opened += 1

    def _run(self):
        sel = selectors.DefaultSelector()
        try:
            t0 = time.monotonic()
            while not self.stop.is_set():
                allowed = int((time.monotonic() - t0) * self.rate) + self.count
                while len(sel.get_map()) < self.count and self.opened < allowed:
                    self._open(sel)
                for key, _ in sel.select(0.01):
                    try:
                        data = key.fileobj.recv(4096)   # the challenge, then EOF
                    except OSError:
                        data = b""
                    if not data:
                        self.closed_by_node += 1
                        sel.unregister(key.fileobj)
                        key.fileobj.close()
        finally:
            for key in list(sel.get_map().values()):
                key.fileobj.close()
            sel.close()


def test_a_flood_from_one_address_does_not_lock_out_another(dpool_node):
    with SilentFlood(dpool_node.address) as flood:
        poll_for(lambda: flood.closed_by_node >= 300, 20,
                 message="the flood to fill the node's handshake slots")
        # The client gives up after 1 s: it must connect and run a job by then.
        client = Client([dpool_node.address], secret=dpool_node.secret, connect_timeout=1.0)
        try:
            t0 = time.monotonic()
            client.start()
            assert client.submit(double, (21,)).future.result(timeout=5) == 42
            elapsed = time.monotonic() - t0
        finally:
            client.close()
        assert flood.thread.is_alive()
    print(f"connected and ran a job in {elapsed * 1000:.0f} ms during a flood "
          f"({flood.opened} connections opened)")
    # Rate-limited log: hundreds of refusals, a handful of lines.
    lines = [line for line in dpool_node.stderr().splitlines() if " WARNING " in line]
    assert flood.closed_by_node >= 300
    assert len(lines) <= 10, "\n".join(lines[:20])
