"""A fresh process's first pool (issue 13): what it imports, and the
figures its embedded node reports without psutil."""
import os
import subprocess
import sys

import psutil
import pytest

from dpool.node.env import session

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

FIRST_POOL = """
import sys
from dpool.futures import Executor
with Executor(1) as ex:
    assert ex.submit(abs, -3).result() == 3
print(sorted(m for m in ("psutil", "cryptography", "cloudpickle") if m in sys.modules))
"""


def _loaded(code):
    """The last line a fresh interpreter running ``code`` prints."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout.split("\n")[-2]


def test_a_local_pool_loads_neither_psutil_nor_cryptography_nor_cloudpickle():
    """(cloudpickle: only a function pickled by value needs it, see below)"""
    assert _loaded(FIRST_POOL) == "[]"


@pytest.mark.parametrize("api", ["import dpool.futures", "import dpool.pool",
                                 "import dpool as dispy; dispy.JobCluster"])
def test_importing_an_api_does_not_import_cloudpickle(api):
    assert _loaded(f"import sys; {api}; print('cloudpickle' in sys.modules)") == "False"


BY_VALUE = """
import sys
from dpool.futures import Executor
with Executor(1) as ex:
    before = "cloudpickle" in sys.modules
    assert ex.submit(lambda x: -x, 3).result() == -3
print(before, "cloudpickle" in sys.modules)
"""


def test_a_function_pickled_by_value_imports_cloudpickle_when_sent():
    """A lambda (a __main__ function) goes by value: cloudpickle is imported
    then, and the worker (forked from a zygote that preloads it) loads it."""
    assert _loaded(BY_VALUE) == "False True"


FIRST_NODE_POOL = """
import sys
from dpool.futures import Executor
with Executor(1, nodes=[{address!r}], secret={secret!r}) as ex:
    assert ex.submit(abs, -3).result() == 3
print(sorted(m for m in ("psutil", "encodings.idna") if m in sys.modules))
"""


def test_a_pool_via_a_node_at_a_numeric_address_needs_no_resolver(dpool_node, node_secret):
    """127.0.0.1 is connected to without a getaddrinfo in a thread (whose
    host name encoding imports the idna codec)."""
    code = FIRST_NODE_POOL.format(address=tuple(dpool_node.address), secret=node_secret)
    assert _loaded(code) == "[]"


LIGHT_IMPORT = """
import sys
import dpool.futures, dpool.pool
print(sorted(m for m in ("asyncio", "ssl", "dpool.core.client") if m in sys.modules))
"""


def test_importing_the_stdlib_drop_ins_leaves_the_client_core_to_the_pool():
    """The client core (asyncio, ssl with it) is imported as the first pool
    is made: via a node, while its first connection's thread stretches the
    secret (dpool.transport.early)."""
    assert _loaded(LIGHT_IMPORT) == "[]"


EARLY = """
from dpool.transport import early
taken, take = [], early.Early.take
early.Early.take = lambda self: taken.append(take(self)) or taken[-1]
from dpool.futures import Executor
with Executor(1, nodes=[{address!r}], secret={secret!r}) as ex:
    assert ex.submit(abs, -3).result() == 3
print(sum(got is not None for got in taken), early._begun)
"""


def test_a_fresh_pool_via_a_node_takes_its_early_connection(dpool_node, node_secret):
    """One connection begun before the client core's imports, taken by the
    client's connection to the node, none left behind."""
    code = EARLY.format(address=tuple(dpool_node.address), secret=node_secret)
    assert _loaded(code) == "1 {}"


@pytest.mark.skipif(not os.path.exists("/proc/meminfo"), reason="Linux /proc")
def test_avail_info_from_proc_matches_psutil(tmp_path):
    first = session._avail_from_proc(str(tmp_path))
    theirs = {"memory": psutil.virtual_memory().available,
              "disk": psutil.disk_usage(str(tmp_path)).free,
              "swap": 100.0 - psutil.swap_memory().percent}
    second = session._avail_from_proc(str(tmp_path))
    for info in (first, second):
        assert set(info) == {"cpu", "memory", "disk", "swap"}
        assert 0.0 <= info["cpu"] <= 100.0
        assert info["swap"] == pytest.approx(theirs["swap"], abs=1.0)
        # (the machine goes on meanwhile: within 5% of what psutil read)
        assert info["memory"] == pytest.approx(theirs["memory"], rel=0.05)
        assert info["disk"] == pytest.approx(theirs["disk"], rel=0.05)


def test_avail_info_has_the_platform(tmp_path):
    import platform

    info = session.avail_info(str(tmp_path))
    assert info["platform"] == platform.platform()
    assert session.avail_info(str(tmp_path / "gone")) is None
