"""Discovery across network-namespace hosts (root), on the default ports
(inside the namespaces only): per-interface directed broadcast from a
multi-homed client, and a node bound to its LAN address found by a client
on its own host."""
import logging
import shutil

import pytest

import dpool
from helpers import poll_for, start_node
from helpers_netns import entered, lab_nodes, lab_up
from tasks import identity

pytestmark = [pytest.mark.root, pytest.mark.timeout(90),
              pytest.mark.skipif(not shutil.which("ip"), reason="needs ip (iproute2)")]
SECRET = b"discovery netns test secret, 32b"


@pytest.fixture
def lab():
    with lab_up(nodes=2) as lab:
        yield lab


@pytest.fixture
def nodes(lab, tmp_path):
    """start(k): dpool-node on 10.210.k.2:51350 in the lab's node namespace k."""
    with lab_nodes(lab, tmp_path, SECRET, cpus=1, stop=lambda node: node.terminate()) as start:
        yield lambda k: start(k, port=51350)


def _ips(cluster, n=6):
    jobs = [cluster.submit(i) for i in range(n)]
    assert [job() for job in jobs] == list(range(n))
    return {job.ip_addr for job in jobs}


def test_star_broadcasts_on_every_interface_of_a_multihomed_client(lab, nodes):
    """The client host has two links (10.210.1.1/24, 10.210.2.1/24): one
    ping per interface's broadcast address finds the node on each."""
    nodes(1)
    nodes(2)
    with entered(lab.client):
        with dpool.JobCluster(identity, nodes=["*"], secret=SECRET) as cluster:
            poll_for(lambda: len(cluster.status().nodes) == 2)
            assert {n.ip_addr for n in cluster.status().nodes} == {"10.210.1.2", "10.210.2.2"}
            _ips(cluster)


def test_a_node_on_its_lan_address_is_found_on_its_own_host(lab, nodes, caplog):
    """A dpool-node bound to 10.210.1.2 (not 127.0.0.1): a client on its
    host with no nodes given uses it (not an embedded node), and so does
    nodes=['*']."""
    nodes(1)
    with entered(lab.nodes[0]), caplog.at_level(logging.INFO, logger="dpool"):
        with dpool.JobCluster(identity, secret=SECRET) as cluster:
            assert _ips(cluster) == {"10.210.1.2"}
        assert "using the dpool-node at 10.210.1.2:51350" in caplog.text
        with dpool.JobCluster(identity, nodes=["*"], secret=SECRET) as cluster:
            assert _ips(cluster) == {"10.210.1.2"}


def test_multicast_finds_a_node_that_broadcast_does_not_reach(lab, tmp_path):
    """dpool-node --multicast and JobCluster(ipv4_udp_multicast=True): the
    client pings 239.192.51.35 out of each interface; the node's subnet has
    no directed broadcast address here (a /31 link), so only multicast finds it."""
    from helpers_netns import run

    ns = lab.nodes[0]
    run("ip", "-n", ns, "addr", "add", "10.211.0.1/31", "dev", "eth0")
    run("ip", "-n", lab.client, "addr", "add", "10.211.0.0/31", "dev", "v1")
    for where in (ns, lab.client):
        run("ip", "-n", where, "route", "add", "224.0.0.0/4", "dev",
            "eth0" if where == ns else "v1")
    node = start_node(tmp_path / "mc", cpus=1, secret=SECRET, port=51350,
                      prefix=lab.exec_prefix(ns),
                      args=["--host", "10.211.0.1", "--multicast"])
    try:
        with entered(lab.client):
            with dpool.JobCluster(identity, nodes=["10.211.*"], secret=SECRET,
                                  ipv4_udp_multicast=True, connect_timeout=5) as cluster:
                assert _ips(cluster) == {"10.211.0.1"}
    finally:
        node.terminate()


def test_ipv6_nodes_are_found_through_the_all_nodes_group(lab, tmp_path):
    """IPv6 has no broadcast: a client pings ff02::1 on each interface with
    IPv6, and a node on '::' answers from its address."""
    from helpers_netns import run

    ns = lab.nodes[0]
    run("ip", "-n", ns, "addr", "add", "fd00:210:1::2/64", "dev", "eth0", "nodad")
    run("ip", "-n", lab.client, "addr", "add", "fd00:210:1::1/64", "dev", "v1", "nodad")
    node = start_node(tmp_path / "v6", cpus=1, secret=SECRET, port=51350,
                      prefix=lab.exec_prefix(ns), args=["--host", "::"])
    try:
        with entered(lab.client):
            with dpool.JobCluster(identity, nodes=["*"], secret=SECRET,
                                  connect_timeout=5) as cluster:
                poll_for(lambda: cluster.status().nodes)
                ips = {n.ip_addr for n in cluster.status().nodes}
                assert len(ips) == 1 and ":" in ips.pop()
                assert [job() for job in [cluster.submit(i) for i in range(3)]] == [0, 1, 2]
    finally:
        node.terminate()


def test_a_wildcard_node_with_many_addresses_is_reached_at_the_one_facing_the_client(
        lab, tmp_path):
    """A node on 0.0.0.0 lists at most 4 of its addresses (sorted): with 4
    more that sort before its LAN address (as docker bridges or a VPN on a
    busy host), the client still connects to the address it heard it from,
    the one facing it, not to the first listed (unreachable from the client)."""
    from helpers_netns import run

    ns = lab.nodes[0]
    for i in range(1, 5):
        run("ip", "-n", ns, "addr", "add", f"10.10.0.{i}/32", "dev", "lo")
    node = start_node(tmp_path / "wild", cpus=1, secret=SECRET, port=51350,
                      prefix=lab.exec_prefix(ns), args=["--host", "0.0.0.0"])
    try:
        with entered(lab.client):
            with dpool.JobCluster(identity, nodes=["*"], secret=SECRET,
                                  connect_timeout=5) as cluster:
                assert _ips(cluster) == {lab.address(1)}
    finally:
        node.terminate()


def test_a_wildcard_node_on_the_clients_host_is_used_once(lab, tmp_path, caplog):
    """A client on the host of a node on 0.0.0.0 hears it at two addresses
    (its pings to 127.255.255.255 and to the LAN's broadcast address both
    reach it): it opens one session, not a second that the node refuses as
    busy (the node's body carries an id per node process)."""
    ns = lab.nodes[0]
    node = start_node(tmp_path / "wild", cpus=1, secret=SECRET, port=51350,
                      prefix=lab.exec_prefix(ns), args=["--host", "0.0.0.0"])
    try:
        with entered(ns), caplog.at_level("DEBUG", logger="dpool"):
            with dpool.JobCluster(identity, nodes=["*"], secret=SECRET,
                                  connect_timeout=5) as cluster:
                _ips(cluster)
                assert len(cluster.status().nodes) == 1
                assert not [r for r in caplog.records if "busy" in r.getMessage()]
    finally:
        node.terminate()
