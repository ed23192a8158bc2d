"""A newer CPython's test_concurrent_futures package (3.12+: one module
per area), copied by run_futures_new.py as ``cf<VERSION>`` (e.g.
``cf313``), its process-pool test classes made with dpool's Executor (and
FutureTests on dpool's Future), in a module of their own as
futures_conformance.py does for 3.11's (the workers import it).
DPOOL_CF_PACKAGE names the copy."""
import importlib
import os

from dpool.core.future import Future as DpoolFuture
from dpool.futures import Executor

PACKAGE = os.environ["DPOOL_CF_PACKAGE"]
#: module -> the mixins it makes process-pool test classes of
MIXINS = {"test_init": ["InitializerMixin", "FailingInitializerMixin"],
          "test_shutdown": ["ProcessPoolShutdownTest"],
          "test_wait": ["WaitTests"],
          "test_as_completed": ["AsCompletedTests"],
          "test_process_pool": ["ProcessPoolExecutorTest"],
          "test_deadlock": ["ExecutorDeadlockTest"]}

util = importlib.import_module(PACKAGE + ".util")
_future_module = importlib.import_module(PACKAGE + ".test_future")


class DpoolMixin(util.ExecutorMixin):
    executor_type = Executor
    ctx = "fork"  # (mp_context is accepted and ignored)


class DpoolFutureTests(_future_module.FutureTests):
    """FutureTests on dpool's Future class."""

    def setUp(self):
        super().setUp()
        self._future, _future_module.Future = _future_module.Future, DpoolFuture

    def tearDown(self):
        _future_module.Future = self._future
        super().tearDown()


def _script_ok(assert_python_ok):
    """The interpreter-exit tests' scripts import the executor as
    ``concurrent.futures.Executor`` and helpers from
    ``test.test_concurrent_futures``: dpool's and the copy's instead; not
    isolated, so that PYTHONPATH finds this dpool and the copy."""
    def script_ok(*args, **env_vars):
        args = [a.replace("from concurrent.futures import Executor",
                          "import multiprocessing; from dpool.futures import Executor")
                 .replace("from test.test_concurrent_futures.", f"from {PACKAGE}.")
                for a in args]
        env_vars.setdefault("PYTHONPATH", os.environ["PYTHONPATH"])
        return assert_python_ok(*args, __isolated=False, **env_vars)
    return script_ok


CLASSES = []
for _module_name, _mixins in MIXINS.items():
    _module = importlib.import_module(f"{PACKAGE}.{_module_name}")
    if hasattr(_module, "assert_python_ok"):
        _module.assert_python_ok = _script_ok(_module.assert_python_ok)
    for _mixin in _mixins:
        _before = set(globals())
        util.create_executor_tests(globals(), getattr(_module, _mixin),
                                   executor_mixins=(DpoolMixin,))
        CLASSES += [globals()[n] for n in sorted(set(globals()) - _before)
                    if n.startswith("Dpool")]
CLASSES.append(DpoolFutureTests)
