"""JobCluster to a dpool-node over TLS (server and client certificates)."""
import pytest

import dpool
from dpool.errors import BrokenCluster
from helpers import start_node
from tasks import triple

trustme = pytest.importorskip("trustme")


@pytest.fixture
def pki(tmp_path):
    ca = trustme.CA()
    paths = {name: tmp_path / f"{name}.pem" for name in ("ca", "node", "client", "other_ca")}
    ca.cert_pem.write_to_path(paths["ca"])
    node = ca.issue_cert("127.0.0.1", "localhost")
    node.private_key_and_cert_chain_pem.write_to_path(paths["node"])
    ca.issue_cert("client.example").private_key_and_cert_chain_pem.write_to_path(paths["client"])
    trustme.CA().cert_pem.write_to_path(paths["other_ca"])
    return {k: str(v) for k, v in paths.items()}


@pytest.fixture
def tls_node(tmp_path, pki, node_secret):
    node = start_node(tmp_path / "node", cpus=1, secret=node_secret,
                      args=("--certfile", pki["node"], "--cafile", pki["ca"]))
    yield node
    assert node.terminate() == 0


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
