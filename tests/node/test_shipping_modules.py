"""Shipping one's own module to nodes that don't have it (docs/multi-host.md):
by value with cloudpickle.register_pickle_by_value, or with JobCluster's
depends; without either, the job fails with ModuleNotFoundError."""
import importlib
import os
import sys

import cloudpickle
import pytest

import dpool

pytestmark = pytest.mark.timeout(60)

SOURCE = '''
def where(x):
    import os
    return os.getpid(), helper(x)

def helper(x):
    return x * 10
'''


@pytest.fixture
def own_module(tmp_path, monkeypatch):
    """A module only this process can import (not on the node's path)."""
    name = f"dpool_own_module_{os.getpid()}"
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / f"{name}.py").write_text(SOURCE)
    monkeypatch.syspath_prepend(str(folder))
    module = importlib.import_module(name)
    yield module
    sys.modules.pop(name, None)


def test_not_shipped_fails_clearly(dpool_node, node_secret, own_module):
    with dpool.Pool(1, nodes=[dpool_node.address], secret=node_secret) as pool:
        with pytest.raises(ModuleNotFoundError, match=own_module.__name__):
            pool.apply(own_module.where, (1,))


def test_by_value_with_cloudpickle(dpool_node, node_secret, own_module):
    cloudpickle.register_pickle_by_value(own_module)
    try:
        with dpool.Pool(1, nodes=[dpool_node.address], secret=node_secret) as pool:
            pid, value = pool.apply(own_module.where, (4,))
    finally:
        cloudpickle.unregister_pickle_by_value(own_module)
    assert value == 40 and pid != os.getpid()


def test_with_jobcluster_depends(dpool_node, node_secret, own_module):
    with dpool.JobCluster(own_module.where, nodes=[dpool_node.address], secret=node_secret,
                          depends=[own_module]) as cluster:
        job = cluster.submit(5)
        assert job(timeout=30) is not None, job.exception
        assert job.result[1] == 50
