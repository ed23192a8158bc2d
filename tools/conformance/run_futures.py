"""CPython 3.11's test_concurrent_futures, its process-pool tests run
against ``dpool.futures.Executor`` (and FutureTests against dpool's Future).

usage: python tools/conformance/run_futures.py [local|remote] [name patterns...]
(after tools/conformance/fetch_suites.sh; PYTHONPATH must find dpool)
"""
import os
import sys
import unittest

import _harness

_harness.use_paths()
MODE = sys.argv[1] if len(sys.argv) > 1 else "local"

import test_concurrent_futures as t  # noqa: E402
from dpool.core.future import Future as DpoolFuture  # noqa: E402
from dpool.futures import Executor  # noqa: E402

MIXINS = [t.InitializerMixin, t.FailingInitializerMixin, t.ProcessPoolShutdownTest,
          t.WaitTests, t.AsCompletedTests, t.ProcessPoolExecutorTest,
          t.ExecutorDeadlockTest]


def assert_python_ok(*args, **env_vars):
    """The interpreter-exit tests' scripts import the executor as
    ``concurrent.futures.<its class name>`` ("Executor", the abstract
    class): dpool's in its place, and the suites' copy of the test module;
    not isolated (-I, -E), so that PYTHONPATH finds this dpool."""
    args = [a.replace("from concurrent.futures import Executor",
                      "import multiprocessing; from dpool.futures import Executor")
             .replace("from test.test_concurrent_futures import",
                      "from test_concurrent_futures import") for a in args]
    env_vars.setdefault("PYTHONPATH", os.environ["PYTHONPATH"])
    return _assert_python_ok(*args, __isolated=False, **env_vars)


_assert_python_ok, t.assert_python_ok = t.assert_python_ok, assert_python_ok


class DpoolMixin(t.ExecutorMixin):
    executor_type = Executor
    ctx = "fork"  # (mp_context is accepted and ignored)


class DpoolFutureTests(t.FutureTests):
    """FutureTests on dpool's Future class."""

    def setUp(self):
        super().setUp()
        self._future, t.Future = t.Future, DpoolFuture

    def tearDown(self):
        t.Future = self._future
        super().tearDown()


def classes():
    made = []
    for mixin in MIXINS:
        before = set(vars(t))
        t.create_executor_tests(mixin, executor_mixins=(DpoolMixin,))
        made += [getattr(t, name) for name in sorted(set(vars(t)) - before)]
    return made + [DpoolFutureTests]


if __name__ == "__main__":
    with _harness.nodes(MODE):
        result = _harness.run(MODE, classes(), sys.argv[2:], t.setUpModule,
                              unittest.case.doModuleCleanups)
