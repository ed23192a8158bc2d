"""joblib's own backend tests (joblib/test/test_parallel.py of the joblib
release fetch_suites.sh unpacked) run with dpool's backend among joblib's.

Importing ``dpool.joblib`` registers ``"dpool"`` in joblib's ``BACKENDS``
before the test module is imported, so every test parametrized over
``BACKENDS`` or ``ALL_VALID_BACKENDS`` gets a ``dpool`` case; the copy the
runner makes adds ``"dpool"`` to the module's ``PROCESS_BACKENDS`` list
(the tests parametrized over process backends), its one change. Only the
cases naming dpool are run (``-k dpool``, plus any given expression).

joblib's registry is per process: a test's subprocess script, or a task of
another backend naming "dpool" in its worker, finds no "dpool" there, as a
user's would without ``import dpool.joblib``.  ``--everywhere`` puts a
``sitecustomize`` doing that import on every process's path, to see what
fails beyond that.

usage: python tools/conformance/run_joblib.py [local|remote] [--everywhere] [-k EXPR] [args]
(after tools/conformance/fetch_suites.sh; PYTHONPATH must find dpool)
"""
import os
import sys

import _harness

JOBLIB = os.path.join(_harness.SUITES, "joblib-" + _harness.JOBLIB_VERSION)
RUN = os.path.join(_harness.SUITES, "joblib_run")
LIST = 'PROCESS_BACKENDS = ["multiprocessing", "loky"]'
INI = """[pytest]
markers =
    thread_unsafe: joblib's marker
timeout = 300
"""


def make_copy():
    """test_parallel.py with "dpool" in PROCESS_BACKENDS, in RUN."""
    os.makedirs(RUN, exist_ok=True)
    with open(os.path.join(JOBLIB, "joblib", "test", "test_parallel.py")) as f:
        text = f.read()
    if LIST not in text:
        raise SystemExit(f"{LIST!r} not found: not joblib {_harness.JOBLIB_VERSION}?")
    text = text.replace(LIST, LIST[:-1] + ', "dpool"]')
    with open(os.path.join(RUN, "test_parallel_dpool.py"), "w") as f:
        f.write(text)
    with open(os.path.join(RUN, "pytest.ini"), "w") as f:
        f.write(INI)
    os.makedirs(os.path.join(RUN, "everywhere"), exist_ok=True)
    with open(os.path.join(RUN, "everywhere", "sitecustomize.py"), "w") as f:
        f.write("import dpool.joblib  # noqa: F401  (run_joblib.py --everywhere)\n")


if __name__ == "__main__":
    MODE = sys.argv[1] if len(sys.argv) > 1 else "local"
    args = sys.argv[2:]
    everywhere = "--everywhere" in args
    if everywhere:
        args.remove("--everywhere")
    # (RUN: the test module, which a node's workers import its tasks from)
    _harness.use_paths(JOBLIB, RUN, *([os.path.join(RUN, "everywhere")] if everywhere else []))
    make_copy()
    if "-k" in args:
        i = args.index("-k") + 1
        args[i] = f"dpool and ({args[i]})"
    else:
        args += ["-k", "dpool"]
    with _harness.nodes(MODE):
        import pytest

        import dpool.joblib  # noqa: F401  (registers "dpool" in BACKENDS)

        os.chdir(RUN)
        code = pytest.main(["-p", "no:cacheprovider", "-rfE", "-q", "--rootdir", RUN,
                            "-c", os.path.join(RUN, "pytest.ini"),
                            "test_parallel_dpool.py", *args])
    print(f"MODE {MODE}: pytest exit {code}")
    sys.exit(code)
