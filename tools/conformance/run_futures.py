"""CPython 3.11's test_concurrent_futures, its process-pool tests run
against ``dpool.futures.Executor`` (and FutureTests against dpool's Future).

usage: python tools/conformance/run_futures.py [local|remote] [name patterns...]
(after tools/conformance/fetch_suites.sh; PYTHONPATH must find dpool)
"""
import sys
import unittest

import _harness

_harness.use_paths()
MODE = sys.argv[1] if len(sys.argv) > 1 else "local"

if __name__ == "__main__":
    with _harness.nodes(MODE):
        import futures_conformance as suite

        _harness.run(MODE, suite.CLASSES, sys.argv[2:], suite.t.setUpModule,
                     unittest.case.doModuleCleanups)
