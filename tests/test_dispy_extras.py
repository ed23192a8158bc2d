"""dispy compatibility, continued: DispyNode.tx/rx, AvailInfo updates,
recover_jobs.  Through the public API, against dpool-node subprocesses."""
import pytest

import dpool as dispy
from conftest import poll_for
from helpers_engine import dpool_node, node_secret  # noqa: F401 (fixtures)

DispyNode = dispy.DispyNode
pytestmark = pytest.mark.timeout(30)
MB = 2**20


def size_of(data):
    return len(data)


def make_bytes(n):
    return b"x" * n


def cluster_on(node, fn, **kwargs):
    kwargs.setdefault("secret", node.secret)
    kwargs.setdefault("nodes", [node.address])
    return dispy.JobCluster(fn, **kwargs)


# ------------------------------------------------------------------ tx / rx

def test_tx_rx_count_the_bytes_sent_and_received(dpool_node, capsys):
    with cluster_on(dpool_node, size_of) as cluster:
        (node,) = cluster.status().nodes
        tx0, rx0 = node.tx, node.rx
        assert tx0 > 0 and rx0 > 0  # handshake, session, depends
        assert cluster.submit(b"a" * MB)(timeout=10) == MB
        (node,) = cluster.status().nodes
        assert node.tx - tx0 >= MB
        assert node.rx - rx0 < MB
    with cluster_on(dpool_node, make_bytes) as cluster:
        (node,) = cluster.status().nodes
        tx0, rx0 = node.tx, node.rx
        assert cluster.submit(MB)(timeout=10) == b"x" * MB
        (node,) = cluster.status().nodes
        assert node.rx - rx0 >= MB
        assert node.tx - tx0 < MB
        cluster.print_status()
    out = capsys.readouterr().out
    assert "Sent" in out and "Rcvd" in out
    assert "1.0 M" in out  # the 1 MB result, in dispy's units


# ------------------------------------------------------- AvailInfo (pulse_interval)

def test_pulse_interval_refreshes_avail_info(dpool_node):
    events = []

    def cluster_status(status, node, job):
        if status == DispyNode.AvailInfo:
            events.append((node.update_time, node.avail_info))

    with cluster_on(dpool_node, size_of, pulse_interval=0.1,
                    cluster_status=cluster_status) as cluster:
        (node,) = cluster.status().nodes
        first = node.update_time
        poll_for(lambda: len(events) >= 2, 5, message="two AvailInfo updates")
        (t1, info1), (t2, info2) = events[:2]
        assert first <= t1 <= t2
        for info in (info1, info2):
            assert isinstance(info, dispy.DispyNodeAvailInfo)
            assert info.memory > 0 and info.disk > 0
        assert node.avail_info is not None and node.update_time >= t2
    with pytest.raises(ValueError, match="pulse_interval"):
        cluster_on(dpool_node, size_of, pulse_interval=0.01)


def test_no_pulse_unless_asked(dpool_node):
    events = []
    with cluster_on(dpool_node, size_of,
                    cluster_status=lambda s, n, j: events.append(s)) as cluster:
        assert cluster.submit(b"abc")(timeout=10) == 3
    assert DispyNode.AvailInfo not in events
