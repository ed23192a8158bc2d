"""dpool-scheduler over TLS, on loopback: towards its clients (--certfile,
--keyfile, --cafile, as dpool-node) and towards its nodes (--node-certfile,
--node-keyfile, --node-cafile, as a client's certfile/keyfile/cafile)."""
import pytest

import dpool
from dpool.errors import BrokenCluster
from helpers import start_node
from helpers_sched import SECRET, start_scheduler
from tasks import triple

# pki: tests/conftest.py (a node certificate for 127.0.0.1, a client one, another CA)


@pytest.fixture
def tls_nodes(tmp_path, pki):
    """Two dpool-nodes on 127.0.0.1 speaking TLS and requiring client certificates."""
    nodes = []
    try:
        for i in range(2):
            nodes.append(start_node(tmp_path / f"tls-node{i}", cpus=1, secret=SECRET,
                                    args=("--certfile", pki["node"], "--cafile", pki["ca"])))
        yield nodes
    finally:
        for node in nodes:
            node.terminate()


def _tls_scheduler(tmp_path, nodes, pki, node_side=True):
    args = ["--certfile", pki["node"], "--cafile", pki["ca"]]
    if node_side:
        args += ["--node-certfile", pki["client"], "--node-cafile", pki["ca"]]
    return start_scheduler(tmp_path / "scheduler", [n.address for n in nodes], SECRET,
                           args=args)


def _cluster(sched, **kwargs):
    return dpool.SharedJobCluster(triple, scheduler_host="127.0.0.1",
                                  scheduler_port=sched.port, secret=SECRET, loglevel=None,
                                  **kwargs)


def test_shared_cluster_over_tls_both_ways(tmp_path, tls_nodes, pki):
    sched = _tls_scheduler(tmp_path, tls_nodes, pki)
    try:
        assert sched.cpus == 2  # it joined both TLS nodes with its node certificate
        cluster = _cluster(sched, cafile=pki["ca"], certfile=pki["client"])
        try:
            jobs = [cluster.submit(i) for i in range(6)]
            assert [job(timeout=30) for job in jobs] == [3 * i for i in range(6)]
        finally:
            cluster.close()
    finally:
        assert sched.terminate() == 0, sched.stderr()


def test_tls_scheduler_refuses_a_client_without_certificate(tmp_path, tls_nodes, pki):
    sched = _tls_scheduler(tmp_path, tls_nodes, pki)
    try:
        with pytest.raises(BrokenCluster):
            _cluster(sched, cafile=pki["ca"], connect_timeout=3)
        with pytest.raises(BrokenCluster):  # nor one speaking plain TCP
            _cluster(sched, connect_timeout=3)
    finally:
        assert sched.terminate() == 0, sched.stderr()


def test_a_client_refuses_a_scheduler_it_cannot_verify(tmp_path, tls_nodes, pki):
    sched = _tls_scheduler(tmp_path, tls_nodes, pki)
    try:
        with pytest.raises(BrokenCluster):
            _cluster(sched, cafile=pki["other_ca"], certfile=pki["client"], connect_timeout=3)
    finally:
        assert sched.terminate() == 0, sched.stderr()


def test_tls_nodes_refuse_a_scheduler_without_node_certificate(tmp_path, tls_nodes, pki):
    sched = _tls_scheduler(tmp_path, tls_nodes, pki, node_side=False)
    try:
        assert sched.cpus == 0  # no node could be joined (retried in the background)
    finally:
        assert sched.terminate() == 0, sched.stderr()
