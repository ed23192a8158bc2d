"""A pool used and closed, then the interpreter exits: it exits at once and
quietly (no "Task was destroyed but it is pending", no hang), whichever
way the pool was left, with ``maxtasksperchild`` (workers exiting and
being replaced around the end) or without.  A pool closed and never joined
used to hang the exit for good: its ``__del__`` (at interpreter exit)
started a thread to release it, and no thread starts then.

Each case is a fresh interpreter: what is checked happens at its exit."""
import os
import subprocess
import sys
import textwrap

import pytest

from tests.helpers import REPO_ROOT

SCRIPT = textwrap.dedent("""
    import sys
    import dpool

    def double(x):
        return 2 * x

    if __name__ == "__main__":
        how, n, per_child = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
        pool = dpool.Pool(1, maxtasksperchild=per_child or None)
        results = [pool.apply_async(double, (i,)) for i in range(n)]
        print(sum(r.get(60) for r in results))
        if how == "close":           # closed, never joined: collected at exit
            pool.close()
        elif how == "close-join":
            pool.close()
            pool.join()
        elif how == "terminate":
            pool.terminate()
""")


@pytest.mark.parametrize("per_child", [1, 0])
@pytest.mark.parametrize("how", ["close", "close-join", "terminate"])
def test_a_used_and_closed_pool_exits_quietly(how, per_child, tmp_path):
    script = tmp_path / "use_pool.py"
    script.write_text(SCRIPT)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]))
    n = 5  # (per_child=1: each worker exits with its task, the last one around the end)
    run = subprocess.run([sys.executable, str(script), how, str(n), str(per_child)],
                         capture_output=True, text=True, env=env, timeout=30)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == [str(n * (n - 1))]
    assert run.stderr == "", run.stderr


DROPPED_AT_EXIT = textwrap.dedent("""
    import atexit
    import gc
    import threading

    import dpool

    def no_new_thread(*args, **kwargs):  # what Python 3.12+ does at exit
        raise RuntimeError("can't create new thread at interpreter shutdown")

    def at_exit():
        global pool
        threading._start_new_thread = no_new_thread
        pool = None   # its __del__ runs here, in an atexit handler
        gc.collect()

    if __name__ == "__main__":
        pool = dpool.Pool(1)
        print(pool.apply(abs, (-3,)))
        pool.close()  # closed, never joined
        atexit.register(at_exit)
""")


def test_a_pool_dropped_where_no_thread_starts_exits_quietly(tmp_path):
    """Python 3.12+ refuses to start a thread in an atexit handler
    (RuntimeError "can't create new thread at interpreter shutdown") while
    ``sys.is_finalizing()`` is still False: a closed Pool collected there
    is released at once, with nothing on stderr."""
    script = tmp_path / "drop_pool.py"
    script.write_text(DROPPED_AT_EXIT)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]))
    run = subprocess.run([sys.executable, str(script)],
                         capture_output=True, text=True, env=env, timeout=30)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["3"]
    assert run.stderr == "", run.stderr
