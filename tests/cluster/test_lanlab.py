"""The discovery lab itself (root): each host has its own host name,
broadcast reaches the hosts of its LAN only, the router forwards unicast
between the subnets (and stops when told), the UDP loss rule drops."""
import socket
import subprocess
import sys

import pytest

import dpool
from helpers import poll_for
from helpers_netns import LAB_SECRET, needs_lab
from tasks import hostname_after

pytestmark = [pytest.mark.root, pytest.mark.timeout(60), needs_lab]
PORT = 45678


def hostname_on(host):
    cmd = [*host.prefix(), sys.executable, "-c", "import socket; print(socket.gethostname())"]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=30,
                          check=True).stdout.strip()


def test_each_host_has_its_own_host_name(lanlab):
    names = {name: hostname_on(lanlab[name]) for name in ("a", "b", "c", "d")}
    assert names == {name: lanlab[name].hostname for name in names}
    assert len(set(names.values())) == 4
    assert socket.gethostname() not in names.values()


def receiver(lab, name):
    with lab.entered(name):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    sock.bind(("", PORT))
    sock.setblocking(False)
    return sock


def sender(lab, name):
    with lab.entered(name):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
    return sock


def drain(sock):
    got = []
    while True:
        try:
            got.append(sock.recvfrom(2048))
        except BlockingIOError:
            return got


def test_broadcast_reaches_the_lan_only(lanlab):
    names = ("a", "b", "c", "d", "e")
    socks = {name: receiver(lanlab, name) for name in names}
    out = sender(lanlab, "client")
    try:
        got = {name: [] for name in names}

        def arrived():
            for name, sock in socks.items():
                got[name] += drain(sock)
            return all(got[n] for n in ("a", "b", "c"))
        for address in ("10.77.0.255", "255.255.255.255", "10.78.0.255"):
            out.sendto(address.encode(), (address, PORT))
        poll_for(arrived, message="the broadcasts to reach a, b and c")
        # unicast to d: after it arrives, a broadcast would have too
        out.sendto(b"unicast", (lanlab["d"].address, PORT))
        poll_for(lambda: arrived() and got["d"], message="the unicast to reach d")
        for name in ("a", "b", "c"):
            assert {data for data, _ in got[name]} == {b"10.77.0.255", b"255.255.255.255"}
            assert {src for _, (src, _) in got[name]} == {lanlab["client"].address}
        assert [data for data, _ in got["d"]] == [b"unicast"]
        assert got["e"] == []
    finally:
        for sock in [out, *socks.values()]:
            sock.close()


def tcp_reaches(lab, src, dst, timeout=2.0):
    with lab.entered(dst):
        server = socket.create_server((lab[dst].address, 0))
    try:
        with lab.entered(src):
            client = socket.socket()
        with client:
            client.settimeout(timeout)
            try:
                client.connect(server.getsockname())
            except OSError:
                return False
            return True
    finally:
        server.close()


def test_router_forwards_between_the_subnets_until_turned_off(lanlab):
    assert tcp_reaches(lanlab, "client", "d")
    assert tcp_reaches(lanlab, "e", "a")
    lanlab.route(False)
    assert not tcp_reaches(lanlab, "client", "d", timeout=0.5)
    lanlab.route(True)
    assert tcp_reaches(lanlab, "client", "d")


def test_udp_loss_drops_a_share_and_counts(lanlab):
    sock = receiver(lanlab, "a")
    out = sender(lanlab, "client")
    try:
        lanlab.count("a")
        lanlab.udp_loss(30, names=["a"])
        for i in range(400):
            out.sendto(b"%d" % i, (lanlab["a"].address, PORT))
        poll_for(lambda: lanlab.counted("a") == 400, message="400 datagrams to reach a")
        dropped = lanlab.udp_dropped("a")
        assert 60 <= dropped <= 180, dropped   # 30% of 400 is 120 (sd ~9)
        got = []
        poll_for(lambda: got.extend(drain(sock)) or len(got) == 400 - dropped,
                 message="the others to be received")
    finally:
        out.close()
        sock.close()


def test_jobs_on_the_lab_nodes_see_their_hosts_names(lanlab, lab_nodes):
    """The nodes' worker processes inherit their host's name (the seed
    program's compute prints it)."""
    nodes = [lab_nodes(name) for name in ("a", "b", "c")]
    with lanlab.entered("client"):
        cluster = dpool.JobCluster(hostname_after, nodes=[n.addr for n in nodes],
                                   secret=LAB_SECRET)
    with cluster:
        poll_for(lambda: len(cluster.status().nodes) == 3, timeout=30,
                 message="the three nodes to be set up")
        jobs = [cluster.submit(0.5) for _ in range(6)]
        names = {job(timeout=30) for job in jobs}
    assert names == {lanlab[n].hostname for n in ("a", "b", "c")}
