"""An Executor never shut down, then the interpreter exits: its work is
finished and the interpreter exits (as with the stdlib's executors).  It
used to hang the exit for good: its ``__del__``, run at finalization,
started a thread to close it, and no thread starts then (``Thread.start()``
waits forever).

Each case is a fresh interpreter: what is checked happens at its exit."""
import os
import subprocess
import sys
import textwrap

import pytest

from tests.helpers import REPO_ROOT

SCRIPT = textwrap.dedent("""
    import sys, time
    from dpool.futures import Executor

    def write(path):
        time.sleep(0.3)
        with open(path, "w") as f:
            f.write("done")
        return 1

    if __name__ == "__main__":
        how, path = sys.argv[1], sys.argv[2]
        ex = Executor(1)
        print(ex.submit(abs, -3).result(60))
        if how == "pending":          # submitted, not waited for: runs before the exit
            ex.submit(write, path)
        elif how == "no-wait":
            ex.submit(write, path)
            ex.shutdown(wait=False)
        elif how == "raises":         # the script fails with the executor open
            raise SystemExit(3)
""")


@pytest.mark.parametrize("how", ["forgotten", "pending", "no-wait", "raises"])
def test_an_executor_left_open_lets_the_interpreter_exit(how, tmp_path):
    script = tmp_path / "use_executor.py"
    script.write_text(SCRIPT)
    marker = tmp_path / "marker"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]))
    run = subprocess.run([sys.executable, str(script), how, str(marker)],
                         capture_output=True, text=True, env=env, timeout=60)
    assert run.returncode == (3 if how == "raises" else 0), run.stderr
    assert run.stdout.split() == ["3"]
    assert run.stderr == "", run.stderr
    if how in ("pending", "no-wait"):
        assert marker.read_text() == "done"  # (the work given was finished)


FORK_SCRIPT = textwrap.dedent("""
    import multiprocessing, os, sys, time
    from dpool.futures import Executor

    def wait_for(path):
        while not os.path.exists(path):
            time.sleep(0.01)
        return "released"

    if __name__ == "__main__":
        path = sys.argv[1]
        ex = Executor(1)
        future = ex.submit(wait_for, path)   # runs until the parent says
        child = multiprocessing.get_context("fork").Process(target=int)
        child.start()
        child.join(30)
        print(child.exitcode, flush=True)
        if child.exitcode is None:
            child.kill()
            child.join()
        open(path, "w").close()
        print(future.result(60), flush=True)
        ex.shutdown()
""")


def test_a_forked_child_exits_while_the_parents_executor_has_work(tmp_path):
    """A child forked by multiprocessing runs ``threading._shutdown`` (the
    executors' exit hook) when its target returns: the parent's executor,
    copied into it, is not the child's to finish (as with the stdlib's, the
    child does not wait for the parent's work): it used to wait there for
    the parent's job, for good."""
    script = tmp_path / "fork_with_executor.py"
    script.write_text(FORK_SCRIPT)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]))
    run = subprocess.run([sys.executable, str(script), str(tmp_path / "go")],
                         capture_output=True, text=True, env=env, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["0", "released"], run.stderr
