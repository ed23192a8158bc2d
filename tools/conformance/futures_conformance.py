"""CPython's test_concurrent_futures process-pool test classes made with
dpool's Executor (and FutureTests on dpool's Future), in a module of their
own: the workers import it, so that a test class's methods sent as tasks
pickle by reference as in CPython's own run (on a node too)."""
import os

import test_concurrent_futures as t

from dpool.core.future import Future as DpoolFuture
from dpool.futures import Executor

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


CLASSES = []
for _mixin in MIXINS:
    _before = set(vars(t))
    t.create_executor_tests(_mixin, executor_mixins=(DpoolMixin,))
    for _name in sorted(set(vars(t)) - _before):
        _cls = globals()[_name] = getattr(t, _name)
        _cls.__module__ = __name__
        CLASSES.append(_cls)
CLASSES.append(DpoolFutureTests)
