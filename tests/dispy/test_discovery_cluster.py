"""Discovery end to end on loopback: dpool-nodes on 127.0.0.2 and 127.0.0.3
(the same port number, as nodes of a LAN) found by JobCluster, Executor and
Pool with ``'*'`` and patterns, over pings to the loopback broadcast address
and the nodes' announcements.  Ports are ephemeral (never 51350-51352), and
pings go only to 127.255.255.255 (DPOOL_DISCOVER_TO)."""
import socket
import threading

import pytest

import dpool
from dpool.errors import BrokenCluster
from helpers import free_port_on, node_env, poll_for, start_node
from tasks import identity

pytestmark = pytest.mark.timeout(90)

SECRET = b"discovery cluster test secret 32"


def _free_port():
    return free_port_on(("127.0.0.2", "127.0.0.3"))


@pytest.fixture
def lan(tmp_path, monkeypatch):
    """Start nodes with ``lan.start(k)`` (on 127.0.0.k); clients ping the
    loopback broadcast address and listen for announcements on an
    ephemeral-range port."""
    port, announce = _free_port(), _free_port()
    monkeypatch.setenv("DPOOL_DISCOVER_TO", "127.255.255.255")
    monkeypatch.setenv("DPOOL_ANNOUNCE_PORT", str(announce))
    nodes = []

    class Lan:
        def __init__(self):
            self.port, self.announce, self.nodes = port, announce, nodes

        def start(self, k, secret=SECRET, cpus=1):
            node = start_node(tmp_path / f"node{k}-{len(nodes)}", port=port, cpus=cpus,
                              secret=secret, args=("--host", f"127.0.0.{k}",
                                                   "--announce-port", str(announce)),
                              env=node_env(secret))
            nodes.append(node)
            return node
    yield Lan()
    for node in nodes:
        node.terminate()


def _hosts(cluster, n=8):
    jobs = [cluster.submit(i) for i in range(n)]
    assert [job() for job in jobs] == list(range(n))
    return {job.ip_addr for job in jobs}


def test_star_finds_every_node_and_only_after_the_handshake(lan):
    lan.start(2)
    lan.start(3)
    lan.start(4, secret=b"another secret, not the cluster's")   # announces, never used
    with dpool.JobCluster(identity, nodes=["*"], node_port=lan.port, secret=SECRET) as cluster:
        poll_for(lambda: len(cluster.status().nodes) == 2)
        assert _hosts(cluster) <= {"127.0.0.2", "127.0.0.3"}
        assert {n.ip_addr for n in cluster.status().nodes} == {"127.0.0.2", "127.0.0.3"}


@pytest.mark.parametrize("pattern, expected", [("127.0.0.3", {"127.0.0.3"}),
                                               ("127.0.0.?", {"127.0.0.2", "127.0.0.3"}),
                                               ("127.0.0.[3]", {"127.0.0.3"}),
                                               ("127.0.*", {"127.0.0.2", "127.0.0.3"})])
def test_patterns_pick_nodes(lan, pattern, expected):
    lan.start(2)
    lan.start(3)
    nodes = [dpool.NodeAllocate(pattern, port=lan.port)]
    with dpool.JobCluster(identity, nodes=nodes, secret=SECRET) as cluster:
        poll_for(lambda: {n.ip_addr for n in cluster.status().nodes} == expected)
        assert _hosts(cluster) <= expected


def test_a_node_started_later_joins_and_is_initialized(lan):
    lan.start(2)
    seen, lock = [], threading.Lock()

    def cluster_status(status, node, job):
        with lock:
            seen.append((status, node.ip_addr if node else None))
    with dpool.JobCluster(identity, nodes=["*"], node_port=lan.port, secret=SECRET,
                          cluster_status=cluster_status) as cluster:
        assert {n.ip_addr for n in cluster.status().nodes} == {"127.0.0.2"}
        lan.start(3)
        poll_for(lambda: (dpool.DispyNode.Initialized, "127.0.0.3") in seen, timeout=15,
                 message="the later node announced and joined")
        assert "127.0.0.3" in {n.ip_addr for n in cluster.status().nodes}


def test_discover_nodes_adds_a_pattern_to_a_running_cluster(lan):
    lan.start(2)
    lan.start(3)
    with dpool.JobCluster(identity, nodes=["127.0.0.2"], node_port=lan.port,
                          secret=SECRET) as cluster:
        assert {n.ip_addr for n in cluster.status().nodes} == {"127.0.0.2"}
        assert cluster.discover_nodes("*") == 0   # as dispy's (its task's value)
        poll_for(lambda: len(cluster.status().nodes) == 2, timeout=15)


def test_a_busy_node_given_up_joins_once_it_is_free(lan, caplog):
    """A discovered node busy with another client is waited for up to the
    connect timeout, then left; it keeps answering pings, and once free it
    joins (as a node started later would), instead of being ignored for good."""
    lan.start(2)
    lan.start(3)
    other = dpool.JobCluster(identity, nodes=["127.0.0.3"], node_port=lan.port, secret=SECRET)
    try:
        with caplog.at_level("WARNING", logger="dpool"), \
                dpool.JobCluster(identity, nodes=["*"], node_port=lan.port, secret=SECRET,
                                 connect_timeout=2) as cluster:
            assert {n.ip_addr for n in cluster.status().nodes} == {"127.0.0.2"}
            poll_for(lambda: any("still busy" in r.getMessage() for r in caplog.records),
                     timeout=15, message="the busy node was given up")
            other.close()
            other = None
            poll_for(lambda: len(cluster.status().nodes) == 2, timeout=30,
                     message="the node, free now, joined")
            assert _hosts(cluster) <= {"127.0.0.2", "127.0.0.3"}
    finally:
        if other is not None:
            other.close()


def test_nothing_found_says_what_was_looked_for(lan):
    with pytest.raises(BrokenCluster, match="discovery found no node matching"):
        dpool.JobCluster(identity, nodes=["*"], node_port=lan.port, secret=SECRET,
                         connect_timeout=2)


def test_no_secret_says_how_to_give_one(lan):
    with pytest.raises(ValueError, match="DPOOL_SECRET"):
        dpool.JobCluster(identity, nodes=["*"], node_port=lan.port)


def test_executor_and_pool_with_star(lan, monkeypatch):
    from dpool.futures import Executor

    lan.start(2)
    lan.start(3)
    with Executor(nodes=f"*:{lan.port}", secret=SECRET) as ex:
        poll_for(lambda: len(ex._client.nodes()) == 2)
        assert list(ex.map(identity, range(6))) == list(range(6))
    monkeypatch.setenv("DPOOL_NODES", f"*:{lan.port}")
    monkeypatch.setenv("DPOOL_SECRET", SECRET.decode())
    with dpool.Pool() as pool:
        poll_for(lambda: len(pool._client.nodes()) == 2)
        assert pool.map(identity, range(6)) == list(range(6))


class _Forwarder:
    """A TCP port forward (what a NAT gateway does): ``listen`` -> ``target``."""

    def __init__(self, listen, target):
        self.target = target
        self.server = socket.create_server(listen)
        self.socks = [self.server]
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            peer = socket.create_connection(self.target)
            self.socks += [conn, peer]
            for a, b in ((conn, peer), (peer, conn)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(a, b):
        try:
            while data := a.recv(65536):
                b.sendall(data)
        except OSError:
            pass
        finally:
            try:
                b.shutdown(socket.SHUT_WR)
            except OSError:
                pass

    def close(self):
        for s in self.socks:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()
        self.thread.join(5)


def test_a_node_behind_nat_is_reached_at_its_ext_host(lan, tmp_path):
    """dpool-node --ext-host: the node announces the gateway's address (here
    127.0.0.4, forwarding to the node on 127.0.0.2) and the client connects
    there."""
    forward = _Forwarder(("127.0.0.4", lan.port), ("127.0.0.2", lan.port))
    try:
        node = start_node(tmp_path / "natted", port=lan.port, cpus=1, secret=SECRET,
                          args=("--host", "127.0.0.2", "--ext-host", "127.0.0.4",
                                "--announce-port", str(lan.announce)), env=node_env(SECRET))
        lan.nodes.append(node)
        with dpool.JobCluster(identity, nodes=["*"], node_port=lan.port,
                              secret=SECRET) as cluster:
            assert _hosts(cluster, 3) == {"127.0.0.4"}
    finally:
        for node in lan.nodes:
            node.terminate()
        lan.nodes.clear()
        forward.close()


def test_a_node_with_no_discovery_answers_nothing(lan, tmp_path):
    node = start_node(tmp_path / "quiet", port=lan.port, cpus=1, secret=SECRET,
                      args=("--host", "127.0.0.2", "--no-discovery"), env=node_env(SECRET))
    lan.nodes.append(node)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.2", lan.port))   # the node holds no UDP port
    with pytest.raises(BrokenCluster, match="discovery found no node"):
        dpool.JobCluster(identity, nodes=["*"], node_port=lan.port, secret=SECRET,
                         connect_timeout=2)
