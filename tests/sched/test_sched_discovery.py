"""dpool-scheduler finding its nodes by discovery, on loopback: dpool-nodes
on 127.0.0.5-7 (one port number, as nodes of a LAN), a scheduler given
``--nodes '*:PORT'`` pinging the loopback broadcast address
(DPOOL_DISCOVER_TO) and hearing announcements on a free port
(DPOOL_ANNOUNCE_PORT): never the default ports."""
import subprocess
import sys

import pytest

from dpool.core.client import Client
from helpers import free_port_on, node_env, poll_for, start_node
from helpers_sched import SECRET, start_scheduler
from tasks import nap_for

pytestmark = pytest.mark.timeout(90)
HOSTS = ("127.0.0.5", "127.0.0.6", "127.0.0.7")


def _free_port():
    return free_port_on(HOSTS)


@pytest.fixture
def lan(tmp_path):
    """``lan.start(k)``: a node of 2 CPUs on HOSTS[k], all on one port;
    ``lan.env``: the discovery environment of a scheduler finding them."""
    port, announce = _free_port(), _free_port()
    nodes = []

    class Lan:
        env = {"DPOOL_DISCOVER_TO": "127.255.255.255", "DPOOL_ANNOUNCE_PORT": str(announce)}

        def __init__(self):
            self.port, self.nodes = port, nodes

        def start(self, k):
            node = start_node(tmp_path / f"node{k}-{len(nodes)}", port=port, cpus=2,
                              secret=SECRET, args=("--host", HOSTS[k],
                                                   "--announce-port", str(announce)))
            node.host = HOSTS[k]
            nodes.append(node)
            return node
    yield Lan()
    for node in nodes:
        node.kill()


def test_a_scheduler_with_a_pattern_finds_the_nodes_and_later_ones(lan, tmp_path):
    lan.start(0)
    lan.start(1)
    sched = start_scheduler(tmp_path / "sched", [("127.0.0.*", lan.port)], SECRET, env=lan.env)
    c = None
    try:
        assert sched.cpus == 4   # both nodes found before it serves
        c = Client([sched.address], secret=SECRET, session={"notify_start": True}).start()
        assert c.nodes()[0].cpus == 4
        jobs = [c.submit(nap_for, (0.3,)) for _ in range(4)]
        assert [j.future.result(30) for j in jobs] == [0.3] * 4
        assert {j.where for j in jobs} == set(HOSTS[:2])
        # A node started later announces itself: the scheduler joins it and
        # tells its client (Ready) of the new CPU total.
        lan.start(2)
        poll_for(lambda: c.nodes()[0].cpus == 6, 20, message="the third node's CPUs")
        jobs = [c.submit(nap_for, (0.5,)) for _ in range(6)]
        assert {j.future.result(30) for j in jobs} == {0.5}
        assert {j.where for j in jobs} == set(HOSTS)
    finally:
        if c is not None:
            c.close()
        assert sched.terminate() == 0, sched.stderr()


def test_a_pattern_matching_no_node_leaves_the_scheduler_waiting(lan, tmp_path):
    lan.start(0)
    sched = start_scheduler(tmp_path / "sched", [("10.99.*", lan.port)], SECRET, env=lan.env)
    try:
        assert sched.cpus == 0   # serving, with no node yet: clients are refused until one joins
        with pytest.raises(Exception, match="no node ready"):
            Client([sched.address], secret=SECRET, connect_timeout=3).start()
    finally:
        assert sched.terminate() == 0, sched.stderr()


def test_discovery_without_a_secret_is_refused_with_a_clear_error():
    env = node_env(DPOOL_DISCOVER_TO="127.255.255.255")
    proc = subprocess.run([sys.executable, "-m", "dpool.daemons.scheduler", "--port", "0",
                           "--nodes", "*"], env=env, capture_output=True, text=True,
                          timeout=60, stdin=subprocess.DEVNULL)
    assert proc.returncode == 2
    assert "needs their secret" in proc.stderr and "DPOOL_SECRET" in proc.stderr
