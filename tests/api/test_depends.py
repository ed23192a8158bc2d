"""``depends=`` for the Executor and the Pool: a module (or a file) the nodes
don't have, sent to each node once before the first job (issue 12)."""
import importlib
import sys

import pytest

import dpool
from dpool.futures import Executor

pytestmark = pytest.mark.timeout(60)

MODULE = '''
def triple(x):
    return 3 * x


def read(name):
    with open(name) as f:
        return f.read()
'''


@pytest.fixture
def shipped(tmp_path, monkeypatch):
    """A module only this process can import (its folder is on our sys.path,
    not on the node's), and a data file next to it."""
    folder = tmp_path / "code"
    folder.mkdir()
    (folder / "dropin_shipped.py").write_text(MODULE)
    (folder / "dropin_data.txt").write_text("shipped data")
    monkeypatch.syspath_prepend(str(folder))
    module = importlib.import_module("dropin_shipped")
    yield module, folder / "dropin_data.txt"
    sys.modules.pop("dropin_shipped", None)


def on_node(cls, node, **kwargs):
    return cls(2, nodes=[node.address], secret=node.secret, **kwargs)


def test_executor_without_depends_fails_on_the_node(remote_node, shipped):
    module, _ = shipped
    with on_node(Executor, remote_node) as ex:
        with pytest.raises(ModuleNotFoundError, match="dropin_shipped"):
            ex.submit(module.triple, 2).result(30)


def test_executor_depends_ships_a_module_and_a_file(remote_node, shipped):
    module, data = shipped
    with on_node(Executor, remote_node, depends=[module, str(data)]) as ex:
        assert ex.submit(module.triple, 2).result(30) == 6
        assert list(ex.map(module.triple, range(4))) == [0, 3, 6, 9]
        assert ex.submit(module.read, data.name).result(30) == "shipped data"


def test_pool_depends_ships_a_module(remote_node, shipped):
    module, _ = shipped
    with on_node(dpool.Pool, remote_node, depends=[module]) as pool:
        assert pool.map(module.triple, range(5)) == [0, 3, 6, 9, 12]


def test_depends_takes_modules_and_files_only(shipped):
    module, _ = shipped
    with pytest.raises(TypeError, match="modules and file paths"):
        Executor(1, depends=[module.triple])
    with pytest.raises(FileNotFoundError):
        dpool.Pool(1, depends=["no/such/file.py"])


def test_local_workers_need_no_depends(shipped):
    module, _ = shipped
    with Executor(2, depends=[module]) as ex:
        assert ex.submit(module.triple, 5).result(30) == 15


def test_added_nodes_get_the_depends_of_an_executor_made_without_nodes(remote_node, shipped):
    module, _ = shipped
    with Executor(1, depends=[module]) as ex:
        assert ex.add_nodes([remote_node.address], secret=remote_node.secret) == 1
        client = ex._client
        remote = [link for link in client.nodes() if link.address == remote_node.address]
        futures = [ex.submit(module.triple, i) for i in range(12)]
        assert [f.result(30) for f in futures] == [3 * i for i in range(12)]
        assert remote[0].jobs_done > 0
