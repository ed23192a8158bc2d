"""Fixtures of the multi-host tests: a :class:`helpers_netns.LanLab` (hosts
in network and UTS namespaces on two subnets; root) and ``dpool-node``
processes on its hosts."""
import pytest

from helpers import start_node
from helpers_netns import LAB_SECRET, LanLab


@pytest.fixture
def lanlab(request):
    """The default lab (client, nodes a b c on the LAN; d, e on LAN2);
    ``@pytest.mark.lab(extra=[...], ...)`` passes other LanLab arguments."""
    marker = request.node.get_closest_marker("lab")
    lab = LanLab(**(marker.kwargs if marker else {}))
    try:
        yield lab.up()
    finally:
        lab.down()


@pytest.fixture
def lab_nodes(lanlab, tmp_path):
    """start(name, *args): a dpool-node (1 CPU, the lab's secret) on host
    ``name``, listening on its address at ``port`` (0: a free one)."""
    started = []

    def start(name, port=0, args=()):
        host = lanlab[name]
        node = start_node(tmp_path / f"node-{name}", cpus=1, secret=LAB_SECRET, port=port,
                          prefix=host.prefix(), args=["--host", host.address, *args])
        node.host = host
        node.addr = (host.address, node.port)
        started.append(node)
        return node
    yield start
    for node in started:
        node.kill()
