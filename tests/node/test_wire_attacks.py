"""On-path attacks after the handshake (issue 8, finding 1): a proxy on
loopback relays a real client's handshake, then injects, replays or drops
bytes.  Every message after the handshake is sealed (AES-GCM records), so
each of these closes the connection with one log line and runs nothing."""
import pickle
import socket
import threading

import pytest

import dpool
from dpool.transport.frames import encode as encode_frames
from helpers import SystemOnUnpickle, poll_for
from tasks import double

pytestmark = pytest.mark.timeout(60)


class Proxy:
    """Relays one client connection to ``target``; records what the client
    sent (``from_client``, one entry per recv) and can inject bytes."""

    def __init__(self, target):
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address = self.listener.getsockname()
        self.target = target
        self.from_client = []
        self.upstream = None
        self.dropped = 0
        self.hold_client = threading.Event()   # set: stop relaying client -> node
        self.threads = [threading.Thread(target=self._accept, daemon=True)]
        self.threads[0].start()

    def _accept(self):
        try:
            client, _ = self.listener.accept()
        except OSError:
            return
        self.client = client
        self.upstream = socket.create_connection(self.target)
        for src, dst, log in ((client, self.upstream, self.from_client),
                              (self.upstream, client, None)):
            thread = threading.Thread(target=self._pump, args=(src, dst, log), daemon=True)
            self.threads.append(thread)
            thread.start()

    def _pump(self, src, dst, log):
        try:
            while True:
                data = src.recv(1 << 16)
                if not data:
                    break
                if log is not None:
                    if self.hold_client.is_set():
                        self.dropped += len(data)  # dropped on the floor
                        continue
                    log.append(data)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def inject(self, data):
        self.upstream.sendall(data)

    def close(self):
        self.listener.close()
        for sock in (getattr(self, "client", None), self.upstream):
            if sock is not None:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
        for thread in self.threads:
            thread.join(10)
        for sock in (getattr(self, "client", None), self.upstream):
            if sock is not None:
                sock.close()


def closing_lines(node):
    return [line for line in node.stderr().splitlines()
            if "closing connection" in line or "bad message" in line]


@pytest.mark.parametrize("attack", ["inject-pickle", "replay", "drop-then-send"])
def test_on_path_attacker_gets_nothing_run_and_the_connection_closes(dpool_node, tmp_path,
                                                                     attack):
    marker = tmp_path / "pwned"
    proxy = Proxy(dpool_node.address)
    try:
        cluster = dpool.JobCluster(double, nodes=[proxy.address], secret=dpool_node.secret)
        try:
            assert cluster.submit(21)(timeout=20) == 42       # the handshake went through
            if attack == "inject-pickle":
                evil = pickle.dumps(SystemOnUnpickle(f"touch {marker}"))
                proxy.inject(b"".join(bytes(p) for p in encode_frames([evil])))
            elif attack == "replay":
                proxy.inject(proxy.from_client[-1])
            else:
                proxy.hold_client.set()
                cluster.submit(1)                              # its bytes are dropped
                poll_for(lambda: proxy.dropped, 10, message="the proxy to drop a message")
                proxy.hold_client.clear()
                cluster.submit(2)                              # these go through
            poll_for(lambda: closing_lines(dpool_node) or marker.exists(), 15,
                     message="the node to close the tampered connection")
        finally:
            cluster.close()
    finally:
        proxy.close()
    assert not marker.exists(), "the injected pickle ran on the node"
    lines = closing_lines(dpool_node)
    assert len(lines) == 1 and "record" in lines[0], lines
