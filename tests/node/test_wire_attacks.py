"""On-path attacks after the handshake (issue 8, finding 1): a proxy on
loopback relays a real client's handshake, then injects, replays or drops
bytes.  Every message after the handshake is sealed (AES-GCM records), so
each of these closes the connection with one log line and runs nothing."""
import collections
import pickle
import socket
import struct
import threading

import psutil
import pytest

import dpool
from dpool.transport.frames import encode as encode_frames
from helpers import SystemOnUnpickle, authenticated_socket, cluster_on, poll_for, start_node
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


# -- memory: declared lengths, the receive budget, freeing at once (finding 4) ------------

def rss(node):
    return psutil.Process(node.pid).memory_info().rss


def push(sock, total, chunk=1 << 20):
    """Send up to ``total`` more bytes of a frame body on a SealedSocket; stop
    when the peer stops reading for 2 s (backpressure).  Returns about how
    many bytes the kernel took (a record cut short waits for the next call)."""
    sock.settimeout(2)
    pending, sent = getattr(sock, "pending", b""), 0
    while sent < total or pending:
        if not pending:
            k = min(chunk, total - sent)
            pending = b"".join(sock.sealer.seal_all(collections.deque([b"z" * k])))
            sent += k
        try:
            pending = pending[sock.sock.send(pending):]
        except TimeoutError:
            break
    sock.pending = pending
    return max(0, sent - len(pending))


def test_declared_3gib_frame_costs_only_the_bytes_sent_and_is_freed_at_once(dpool_node):
    before = rss(dpool_node)
    with authenticated_socket(dpool_node.port, dpool_node.secret) as sock:
        sock.sendall(struct.pack("<IQ", 1, 3 * 2**30))
        assert push(sock, 64 * 2**20) == 64 * 2**20
        poll_for(lambda: rss(dpool_node) - before > 48 * 2**20, 10,
                 message="the node to receive the 64 MiB")
        grown = rss(dpool_node) - before
        with cluster_on(dpool_node, double) as cluster:   # others are served meanwhile
            assert [cluster.submit(i)(timeout=10) for i in range(3)] == [0, 2, 4]
        assert grown < 64 * 2**20 + 48 * 2**20, grown
    poll_for(lambda: rss(dpool_node) - before < 32 * 2**20, 10,
             message="the node to free the partial frame once its peer is gone")


@pytest.fixture
def budget_node(tmp_path, node_secret):
    node = start_node(tmp_path / "node", cpus=1, secret=node_secret,
                      args=["--receive-budget", "16M"])
    yield node
    assert node.terminate() == 0, node.stderr()


def test_receive_budget_stops_reading_past_it(budget_node):
    node = budget_node
    before = rss(node)
    first = authenticated_socket(node.port, node.secret)
    second = authenticated_socket(node.port, node.secret)
    try:
        for sock in (first, second):
            sock.sendall(struct.pack("<IQ", 1, 2**30))
        # the first takes the budget and the one overdraft: it is read on
        assert push(first, 48 * 2**20) == 48 * 2**20
        # the second stalls once the node stops reading it
        stalled = push(second, 48 * 2**20)
        assert stalled < 24 * 2**20, stalled
        assert rss(node) - before < 48 * 2**20 + stalled + 48 * 2**20
        first.close()                     # frees the budget: the second goes on
        assert push(second, 32 * 2**20) == 32 * 2**20
    finally:
        first.close()
        second.close()
    with cluster_on(node, double) as cluster:
        assert cluster.submit(4)(timeout=10) == 8
