#!/bin/bash
# Fetch the external suites dpool is checked against (not vendored):
#   - CPython 3.11's Lib/test/test_concurrent_futures.py (Debian's
#     libpython3.11-testsuite; the interpreter's own test package has
#     _test_multiprocessing.py, and test_concurrent_futures.py too when
#     installed with its tests),
#   - dispy 4.15.1's examples (py3/examples of its PyPI source archive).
# usage: tools/conformance/fetch_suites.sh [DIR]   (default /tmp/dpool-suites)
set -e
dir=${1:-/tmp/dpool-suites}
mkdir -p "$dir" && cd "$dir"
if [ ! -f test_concurrent_futures.py ]; then
    own=$(python -c 'import os, test; print(os.path.join(os.path.dirname(test.__file__), "test_concurrent_futures.py"))')
    if [ -f "$own" ]; then
        cp "$own" .
    else
        apt-get download libpython3.11-testsuite
        dpkg -x libpython3.11-testsuite_*.deb deb
        cp deb/usr/lib/python3.11/test/test_concurrent_futures.py .
    fi
fi
if [ ! -d dispy_examples ]; then
    pip download --no-deps --no-binary :all: dispy==4.15.1 -d sdist
    tar xzf sdist/dispy-4.15.1.tar.gz
    cp -r dispy-4.15.1/py3/examples dispy_examples
fi
echo "$dir"
