"""CPython 3.11's _test_multiprocessing Pool tests (the "processes" kind)
run against ``dpool.Pool`` in place of ``multiprocessing.Pool``.

usage: python tools/conformance/run_pool.py [local|remote] [name patterns...]
(PYTHONPATH must find dpool; the interpreter's own test package is used)
"""
import sys

import _harness

_harness.use_paths()
MODE = sys.argv[1] if len(sys.argv) > 1 else "local"

CLASSES = ["WithProcessesTestPool", "WithProcessesTestPoolWorkerErrors",
           "WithProcessesTestPoolWorkerLifetime", "TestInitializers",
           "TestStdinBadfiledescriptor", "TestPoolNotLeakOnFailure"]

if __name__ == "__main__":
    with _harness.nodes(MODE):
        import mp_pool_conformance as suite  # (after DPOOL_NODES is set)

        found = [getattr(suite, n, None) or getattr(suite.m, n) for n in CLASSES]
        _harness.run(MODE, found, sys.argv[2:], suite.setUpModule, suite.tearDownModule)
