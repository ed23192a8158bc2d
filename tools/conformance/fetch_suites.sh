#!/bin/bash
# Fetch the external suites dpool is checked against (not vendored):
#   - CPython 3.11's Lib/test/test_concurrent_futures.py (Debian's
#     libpython3.11-testsuite; the interpreter's own test package has
#     _test_multiprocessing.py, and test_concurrent_futures.py too when
#     installed with its tests),
#   - dispy 4.15.1's examples (py3/examples of its PyPI source archive),
#   - CPython 3.12.1's and 3.13.0's test_concurrent_futures packages (from
#     that interpreter's own test package when it is installed, else from
#     GitHub at that tag) into test_concurrent_futures-3.12, -3.13,
#   - joblib 1.6.0's wheel (its tests are in the package) into joblib-1.6.0,
#   - the Python 3.11 docs' HTML (Debian's python3.11-doc, 3.11.2) into
#     python3.11-doc, for the example programs of its pool pages.
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
own_cf_package() {  # an installed python TAG's test_concurrent_futures, if any
    local tag=$1 py
    for py in "python${tag%.*}" "$(pyenv root 2>/dev/null)/versions/$tag/bin/python${tag%.*}"; do
        "$py" -c "import os, sys, test.test_concurrent_futures.util as u
assert sys.version.split()[0] == '$tag'
print(os.path.dirname(u.__file__))" 2>/dev/null && return
    done
    true
}
cf_files="__init__ executor test_as_completed test_deadlock test_future test_init
  test_process_pool test_shutdown test_thread_pool test_wait util"
for tag in 3.12.1 3.13.0; do
    v=${tag%.*}; target=test_concurrent_futures-$v
    [ -d "$target" ] && continue
    own=$(own_cf_package "$tag")
    if [ -n "$own" ]; then
        cp -r "$own" "$target" && rm -rf "$target/__pycache__"
    else
        rm -rf "$target.part" && mkdir -p "$target.part"
        if (for f in $cf_files; do
                curl -fsSL -o "$target.part/$f.py" \
                    "https://raw.githubusercontent.com/python/cpython/v$tag/Lib/test/test_concurrent_futures/$f.py" || exit 1
            done); then
            mv "$target.part" "$target"
        else
            echo "$target: not fetched (no python$v with it, GitHub unreachable)" >&2
            rm -rf "$target.part"
        fi
    fi
done
if [ ! -d joblib-1.6.0 ]; then
    pip download --no-deps joblib==1.6.0 -d wheels
    python -m zipfile -e wheels/joblib-1.6.0-py3-none-any.whl joblib-1.6.0
fi
if [ ! -d python3.11-doc ]; then
    apt-get download python3.11-doc=3.11.2-6+deb12u9 || apt-get download python3.11-doc
    dpkg -x python3.11-doc_*.deb python3.11-doc
fi
echo "$dir"
