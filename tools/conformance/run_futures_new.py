"""A newer CPython's test_concurrent_futures (a package from 3.12 on),
its process-pool tests run against ``dpool.futures.Executor`` (and
FutureTests against dpool's Future), under this interpreter (3.11: the few
``test.support`` names the package needs are added by support_compat.py).

The package fetch_suites.sh put in $DPOOL_SUITES/test_concurrent_futures-VERSION
is copied as the package ``cfVERSION`` (``cf313``), with ``import
support_compat`` at the top of its ``__init__``: its only change.

usage: python tools/conformance/run_futures_new.py VERSION [local|remote] [name patterns...]
  e.g. run_futures_new.py 3.13 local
"""
import os
import shutil
import sys
import unittest

import _harness


def make_copy(version):
    """$DPOOL_SUITES/cfXY: the fetched package, importing support_compat."""
    source = os.path.join(_harness.SUITES, "test_concurrent_futures-" + version)
    name = "cf" + version.replace(".", "")
    target = os.path.join(_harness.SUITES, name)
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__"))
    init = os.path.join(target, "__init__.py")
    with open(init) as f:
        text = f.read()
    with open(init, "w") as f:
        f.write("import support_compat  # noqa: F401  (tools/conformance)\n" + text)
    return name


if __name__ == "__main__":
    VERSION = sys.argv[1]
    MODE = sys.argv[2] if len(sys.argv) > 2 else "local"
    _harness.use_paths()
    os.environ["DPOOL_CF_PACKAGE"] = make_copy(VERSION)
    with _harness.nodes(MODE):
        import futures_new_conformance as suite

        _harness.run(MODE, suite.CLASSES, sys.argv[3:], suite.util.setup_module,
                     unittest.case.doModuleCleanups)
