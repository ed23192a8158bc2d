"""Fixtures of the scheduler's tests: three dpool-nodes on 127.0.0.2-4 and a
dpool-scheduler over them, on free ports."""
import pytest

from helpers import start_node
from helpers_sched import NODE_CPUS, SECRET, start_scheduler


@pytest.fixture(scope="module")
def three_nodes(tmp_path_factory):
    """Three dpool-node subprocesses (2 CPUs each) on 127.0.0.2, .3 and .4."""
    nodes = []
    try:
        for i in range(3):
            host = f"127.0.0.{i + 2}"
            node = start_node(tmp_path_factory.mktemp(f"node{i}"), cpus=NODE_CPUS, secret=SECRET,
                              args=("--host", host))
            node.host = host
            nodes.append(node)
        yield nodes
    finally:
        for node in nodes:
            node.terminate()


@pytest.fixture
def scheduler(tmp_path, three_nodes):
    """A dpool-scheduler subprocess over the three nodes."""
    sched = start_scheduler(tmp_path / "scheduler", [(n.host, n.port) for n in three_nodes],
                            SECRET)
    yield sched
    code = sched.terminate()
    assert code == 0, f"dpool-scheduler exited with {code}: {sched.stderr()}"
