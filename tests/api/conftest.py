"""Fixtures of the API tests (Executor, Pool and their conformance suites)."""
import pytest

from helpers import start_node


@pytest.fixture(scope="module")
def remote_node(tmp_path_factory):
    """A dpool-node subprocess (2 CPUs, a fixed secret) shared by a module's tests."""
    node = start_node(tmp_path_factory.mktemp("node"), cpus=2, secret=b"conformance-secret")
    yield node
    node.terminate()


@pytest.fixture
def out(tmp_path):
    """A folder where counted jobs record each execution (helpers_faults)."""
    path = tmp_path / "executions"
    path.mkdir()
    return str(path)
