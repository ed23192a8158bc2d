"""Executor and Pool to a dpool-node over TLS: the same TLS arguments and
setup as JobCluster (tests/dispy/test_tls_cluster.py)."""
import pytest

import dpool
from dpool.errors import BrokenCluster
from dpool.futures import Executor
from tasks import triple

# pki and tls_node: tests/conftest.py


def test_executor_over_tls_with_client_certificate(tls_node, pki):
    with Executor(nodes=[tls_node.address], secret=tls_node.secret, cafile=pki["ca"],
                  certfile=pki["client"]) as ex:
        assert list(ex.map(triple, range(5), timeout=30)) == [0, 3, 6, 9, 12]


def test_pool_over_tls_with_client_certificate(tls_node, pki):
    with dpool.Pool(nodes="127.0.0.1:%d" % tls_node.port, secret=tls_node.secret,
                    cafile=pki["ca"], certfile=pki["client"]) as pool:
        assert pool.map(triple, range(5)) == [0, 3, 6, 9, 12]


@pytest.mark.parametrize("api", [Executor, dpool.Pool])
def test_tls_node_refuses_a_client_without_certificate(tls_node, pki, api):
    with pytest.raises(BrokenCluster):
        api(nodes=[tls_node.address], secret=tls_node.secret, cafile=pki["ca"])


@pytest.mark.parametrize("api", [Executor, dpool.Pool])
def test_client_refuses_a_node_it_cannot_verify(tls_node, pki, api):
    with pytest.raises(BrokenCluster):
        api(nodes=[tls_node.address], secret=tls_node.secret, cafile=pki["other_ca"],
            certfile=pki["client"])


@pytest.mark.parametrize("api", [Executor, dpool.Pool])
def test_plain_client_is_refused_by_a_tls_node(tls_node, api):
    with pytest.raises(BrokenCluster):
        api(nodes=[tls_node.address], secret=tls_node.secret)
