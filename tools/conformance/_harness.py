"""What the stdlib-suite runners share: the paths, the optional dpool-node
(``remote`` mode) and the unittest run.  See docs/executor-and-pool.md
"External suites"."""
import contextlib
import os
import subprocess
import sys
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
#: Where fetch_suites.sh put the suites (test_concurrent_futures.py).
SUITES = os.environ.get("DPOOL_SUITES", "/tmp/dpool-suites")
SECRET = "conformance-secret"
#: The joblib release whose tests run_joblib.py runs (fetch_suites.sh's pin).
JOBLIB_VERSION = "1.6.0"


def use_paths(*first):
    """This folder and the suites' (and ``first``) on sys.path, here and in
    the workers."""
    paths = [*first, HERE, SUITES]
    sys.path[:0] = paths
    os.environ["PYTHONPATH"] = os.pathsep.join(
        p for p in (*paths, os.environ.get("PYTHONPATH")) if p)


@contextlib.contextmanager
def nodes(mode, cpus=16):
    """``remote``: a dpool-node on a free loopback port, named to every
    Executor and Pool made without ``nodes`` (DPOOL_NODES); ``local``: none."""
    if mode != "remote":
        yield
        return
    node = subprocess.Popen([sys.executable, "-m", "dpool.daemons.node", "--port", "0",
                             "--cpus", str(cpus)], stdout=subprocess.PIPE,
                            stdin=subprocess.DEVNULL, env=dict(os.environ, DPOOL_SECRET=SECRET))
    try:
        line = node.stdout.readline().decode()
        print(line.strip(), flush=True)
        os.environ["DPOOL_NODES"] = "127.0.0.1:" + line.split()[5].rsplit(":", 1)[1]
        os.environ["DPOOL_SECRET"] = SECRET
        yield
    finally:
        node.terminate()
        node.wait(30)


def run(mode, classes, patterns, module_setup=None, module_teardown=None):
    """Run the test classes (their tests matching ``patterns``); print a summary."""
    loader = unittest.TestLoader()
    loader.testNamePatterns = [f"*{p}*" for p in patterns] or None
    suite = unittest.TestSuite(loader.loadTestsFromTestCase(c) for c in classes)
    if module_setup is not None:
        module_setup()
    result = unittest.TextTestRunner(verbosity=2).run(suite)
    if module_teardown is not None:
        module_teardown()
    print(f"MODE {mode}: ran {result.testsRun}, failures {len(result.failures)}, "
          f"errors {len(result.errors)}, skipped {len(result.skipped)}")
    return result
