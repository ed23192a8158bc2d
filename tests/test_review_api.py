"""Review of the public APIs: each test pins a bug found by comparing
dpool.futures.Executor / dpool.Pool / dpool.JobCluster with the stdlib or
dispy."""
import gc
import subprocess
import sys
import textwrap
import threading
import warnings

import pytest

import conformance_helpers as h
import dpool
from conftest import poll_for
from dpool.errors import BrokenCluster


def _threads_named(name):
    return [t for t in threading.enumerate() if t.name == name and t.is_alive()]


def test_shutdown_without_wait_finishes_the_work_before_the_interpreter_exits(tmp_path):
    # ProcessPoolExecutor: the submitted work still runs when the program
    # ends right after shutdown(wait=False).  dpool's closing thread was a
    # daemon, so the work was dropped at exit.
    out = tmp_path / "out"
    script = tmp_path / "prog.py"
    script.write_text(textwrap.dedent(f"""
        from dpool.futures import Executor

        def work(path):
            import time
            time.sleep(0.3)
            open(path, "w").write("done")

        if __name__ == "__main__":
            ex = Executor(1)
            ex.submit(work, {str(out)!r})
            ex.shutdown(wait=False)
    """))
    subprocess.run([sys.executable, str(script)], timeout=30, check=True, cwd=tmp_path)
    assert out.read_text() == "done"
