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
print(sorted(m for m in ("psutil", "cryptography") if m in sys.modules))
"""


def test_a_local_pool_loads_neither_psutil_nor_cryptography():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
    out = subprocess.run([sys.executable, "-c", FIRST_POOL], env=env, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[-2] == "[]"


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
