"""JobCluster to a dpool-node over TLS (server and client certificates)."""
import pytest

import dpool
from dpool.errors import BrokenCluster
from tasks import triple

# pki and tls_node: tests/conftest.py


def test_jobcluster_over_tls_with_client_certificate(tls_node, pki):
    with dpool.JobCluster(triple, nodes=[tls_node.address], secret=tls_node.secret,
                          cafile=pki["ca"], certfile=pki["client"], loglevel=None) as cluster:
        jobs = [cluster.submit(i) for i in range(5)]
        assert [job(timeout=10) for job in jobs] == [0, 3, 6, 9, 12]


def test_tls_node_refuses_a_client_without_certificate(tls_node, pki):
    with pytest.raises(BrokenCluster):
        dpool.JobCluster(triple, nodes=[tls_node.address], secret=tls_node.secret,
                         cafile=pki["ca"], loglevel=None)


def test_client_refuses_a_node_it_cannot_verify(tls_node, pki):
    with pytest.raises(BrokenCluster):
        dpool.JobCluster(triple, nodes=[tls_node.address], secret=tls_node.secret,
                         cafile=pki["other_ca"], certfile=pki["client"], loglevel=None)


def test_plain_client_is_refused_by_a_tls_node(tls_node):
    with pytest.raises(BrokenCluster):
        dpool.JobCluster(triple, nodes=[tls_node.address], secret=tls_node.secret, loglevel=None)
